"""Pure train steps: LoRA experts, PHATGOOSE gates, multitask models; many experts at once.

Shapes follow the package legend (the ``goose_jax`` module docstring): E counts the experts
trained side by side, L is the input length and T the target length. Also used here:
A microbatches (gradient accumulation), M examples per microbatch.

What trains is always one pytree, differentiated alone (``jax.grad`` with respect to it); the
rest of the model enters the step as frozen arguments:

    kind       trainable tree              frozen trees                 site adapter
    "expert"   experts (lora_a, lora_b)    base params                  LoRAAdapter("sum")
    "gate"     gates (gate)                base params, experts         LoRAAdapter("gated")
    "full"     base params                 none                         none

The base is a T5 or a decoder-only model (``goose_jax.models.families``); on a decoder-only one the
loss is the causal-LM loss of the target tokens (``goose_jax.models.causal.loss``), summed and
counted as the T5's ``token_nll``, and everything else here is the same.

The optimiser (``make_optimizer``) is ``optax.multi_transform`` with a freeze mask over the
trainable tree: leaves whose path matches ``TrainConfig.freeze`` get ``optax.set_to_zero()``.
That is the second guard, and lets a config train only some sites.

Many at once: with ``Program(many=True)`` one jitted step trains E experts (or E gates), each on
its own batch, by ``jax.vmap`` over the leading expert axis of the trainable tree, the frozen
per-expert tree (gate training), the optimiser state and the batch ``[E, A, M, L]``; the base
params are shared. Each vmapped instance sees its expert with a leading axis of 1 (``lora_a``
(1, I, R)), exactly the single-expert layout, so clipping, Adam and the loss are per expert:
each expert is its own run. Sharding the expert axis over the ``expert`` mesh axis
(``core.sharding.shard_experts``) splits the experts across devices. Single-expert training is E =
1.

Gradient accumulation runs inside the step (``lax.scan`` over A microbatches). The loss is the
token cross-entropy summed over the whole effective batch and divided by its number of target
tokens, so ``A x M`` equals one batch of ``A * M`` (the original release instead averaged each
microbatch and divided by A).

The batches come from ``goose_jax.data.batching`` (example sources, ``Batcher``,
``global_batch``); the loop that runs these steps, with checkpoints and metrics, is
``goose_jax.training.loop.train_loop``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from goose_jax.core import sharding
from goose_jax.core.errors import ConfigError, TrainConfigError
from goose_jax.experts.lora import (
    DEFAULT_SITES,
    EXPERTS,
    GATES,
    LoRAAdapter,
    LoRAConfig,
    select_sites,
)
from goose_jax.models import families
from goose_jax.models.config import FAST_COMPILE_OPTIONS, REMAT_NAMES

Array = jax.Array

TRAIN, FREEZE = "train", "freeze"
KINDS = ("expert", "gate", "full")
_DTYPES = ("float32", "bfloat16")


# Examples one training step may hold (micro_batch x grad_accum): far above any real setting
# (the paper's is 1,024), low enough that a typo is refused before the batcher allocates it.
MAX_EFFECTIVE_BATCH = 1 << 20


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of one training job (defaults: the paper's expert training).

    Attributes:
      steps: optimiser steps of expert and multitask training.
      gate_steps: optimiser steps of gate training (the paper: 100).
      lr, weight_decay, eps, b1, b2: AdamW.
      warmup_ratio: linear warm-up over ``int(warmup_ratio * steps)`` steps, then constant. The
        first step already uses ``lr / warmup_steps`` (the original's lr = 0 first step is not
        reproduced).
      clip: global-norm clipping per expert; 0 disables.
      micro_batch, grad_accum: examples per microbatch and microbatches per step; the effective
        batch is their product.
      seed: initialisation and data order.
      max_input_length, max_target_length: tokens, EOS included; longer texts are truncated.
      eval_every, checkpoint_every, log_every: intervals in steps (0 disables eval / periodic
        checkpoints; the final step is always checkpointed). Evaluation (held-out loss, and
        validation with the best step kept, ``goose_jax.evaluation.validation``) also runs at step
        0 and
        at the last step.
      keep_checkpoints: how many training checkpoints a work directory keeps.
      lora_rank, lora_sites, lora_scale, lora_init_std: the experts (see ``LoRAConfig``).
      freeze: regular expression full-matched against each trainable leaf's path
        (``"decoder/block_0/ffn/wo/lora_a"``); matching leaves are kept frozen. Empty: none.
      base_model: the base model: a local HF or goose-jax directory, or ``random:PRESET`` (a
        seeded random preset, for smoke runs). ``goose-train --base`` overrides it.
      param_dtype: storage of the frozen trees (base, and experts during gate training);
        trainable trees are always float32.
      compute_dtype: matmul dtype.
      tokenizer: ``"base"`` (the HF tokenizer saved beside the base model) or ``"byte"``.
      multitask_mode: ``"lora"`` (one LoRA on the mixture) or ``"full"`` (fine-tune the base).
      num_experts: expected number of expert datasets (0: any).
      expert_names: default expert names, in data-file order.
      fast_compile: compile the steps with XLA's backend optimisation off: several times
        faster to compile on CPU, up to 2x slower to run (tests, smoke runs).
      mesh: device mesh sizes, e.g. ``"data=2,expert=4"`` (``goose-train --mesh`` overrides);
        empty: one device on a single process, and in a process group all global devices with
        the expert axis as large as the expert and device counts allow. Not part of a run's
        identity: a run may resume on another mesh.
      validation_metric: how experts whose validation examples have no choices are scored
        during training (``goose_jax.evaluation.validation``): ``"exact_match"`` or ``"rouge_l"``,
        with
        at most ``max_target_length`` new tokens.
      validation_rules: ``""`` (``validation_metric`` as above) or ``"release"``: each expert
        is scored by its dataset's rule in the original release
        (``goose_jax.evaluation.release_validation``: metric, generation length, values rounded to 3
        decimals before the best step is chosen), found by the expert's name.
      remat: activation rematerialisation per block during training (``T5Config.remat``):
        "none", "block" (keep each block's inputs, recompute the rest in the backward pass) or
        "dots" (keep the sites' matmul outputs). Changes memory and time, not the numbers.
        T5 bases only: a decoder-only base refuses any other value than "none".
    """

    steps: int = 1000
    gate_steps: int = 100
    lr: float = 5e-3
    weight_decay: float = 0.0
    eps: float = 1e-8
    b1: float = 0.9
    b2: float = 0.999
    warmup_ratio: float = 0.06
    clip: float = 1.0
    micro_batch: int = 32
    grad_accum: int = 32
    seed: int = 42
    max_input_length: int = 512
    max_target_length: int = 512
    eval_every: int = 100
    checkpoint_every: int = 100
    log_every: int = 10
    keep_checkpoints: int = 2
    lora_rank: int = 16
    lora_sites: str = DEFAULT_SITES
    lora_scale: float | None = None
    lora_init_std: float = 0.01
    freeze: str = ""
    base_model: str = ""
    param_dtype: str = "float32"
    compute_dtype: str = "float32"
    tokenizer: str = "base"
    multitask_mode: str = "lora"
    num_experts: int = 0
    expert_names: tuple[str, ...] = ()
    fast_compile: bool = False
    mesh: str = ""
    validation_metric: str = "exact_match"
    validation_rules: str = ""
    remat: str = "none"

    def __post_init__(self):
        def fail(name, want):
            raise TrainConfigError(f"TrainConfig.{name} must be {want}, got "
                                   f"{getattr(self, name)!r}")

        def is_int(v):
            return isinstance(v, int) and not isinstance(v, bool)

        for name in ("steps", "gate_steps", "micro_batch", "grad_accum", "max_input_length",
                     "max_target_length", "log_every", "keep_checkpoints", "lora_rank"):
            if not is_int(getattr(self, name)) or getattr(self, name) < 1:
                fail(name, "a positive integer")
        for name in ("eval_every", "checkpoint_every", "num_experts", "seed"):
            if not is_int(getattr(self, name)) or getattr(self, name) < 0:
                fail(name, "an integer >= 0")
        checks = {"lr": (lambda v: v > 0, "> 0"), "eps": (lambda v: v > 0, "> 0"),
                  "weight_decay": (lambda v: v >= 0, ">= 0"), "clip": (lambda v: v >= 0, ">= 0"),
                  "lora_init_std": (lambda v: v >= 0, ">= 0"),
                  "b1": (lambda v: 0 <= v < 1, "in [0, 1)"),
                  "b2": (lambda v: 0 <= v < 1, "in [0, 1)"),
                  "warmup_ratio": (lambda v: 0 <= v < 1, "in [0, 1)"),
                  "param_dtype": (lambda v: v in _DTYPES, f"one of {_DTYPES}"),
                  "compute_dtype": (lambda v: v in _DTYPES, f"one of {_DTYPES}"),
                  "tokenizer": (lambda v: v in ("base", "byte"), "'base' or 'byte'"),
                  "multitask_mode": (lambda v: v in ("lora", "full"), "'lora' or 'full'"),
                  "expert_names": (lambda v: isinstance(v, tuple), "a tuple of strings"),
                  "validation_metric": (lambda v: v in ("exact_match", "rouge_l"),
                                        "'exact_match' or 'rouge_l'"),
                  "validation_rules": (lambda v: v in ("", "release"), "'' or 'release'"),
                  "remat": (lambda v: v in REMAT_NAMES, f"one of {REMAT_NAMES}")}
        for name, (ok, want) in checks.items():
            if not ok(getattr(self, name)):
                fail(name, want)
        for field in dataclasses.fields(self):  # inf passes "> 0": every number must be finite
            value = getattr(self, field.name)
            if isinstance(value, float) and not math.isfinite(value):
                fail(field.name, "a finite number")
        if self.lora_scale is not None and (isinstance(self.lora_scale, bool) or not isinstance(
                self.lora_scale, (int, float)) or self.lora_scale == 0):
            fail("lora_scale", "a finite non-zero number, or None for 1/lora_rank")
        if self.micro_batch * self.grad_accum > MAX_EFFECTIVE_BATCH:
            raise TrainConfigError(
                f"TrainConfig.micro_batch x grad_accum = {self.micro_batch} x {self.grad_accum} "
                f"examples per step; at most {MAX_EFFECTIVE_BATCH:,} (each step holds them all)")
        if self.mesh:
            try:
                sharding.parse_mesh(self.mesh)
            except ValueError as e:
                raise TrainConfigError(f"TrainConfig.mesh: {e}") from None
        for name in ("lora_sites", "freeze"):
            try:
                re.compile(getattr(self, name))
            except re.error as e:
                raise TrainConfigError(f"TrainConfig.{name} is not a regular expression: "
                                       f"{e}") from None

    def check_family(self, model: families.ModelConfig) -> None:
        """Checks that every option of this config applies to ``model``'s family.

        Raises:
          TrainConfigError: ``remat`` on a family that does not rematerialise (``remats``).
        """
        fam = families.of(model)
        if not fam.remats and self.remat != "none":
            raise TrainConfigError(
                f"TrainConfig.remat={self.remat!r}: rematerialisation is not implemented for "
                f"{fam.describe(fam.name_of(model))} bases; set remat=none")

    def check_model(self, model: families.ModelConfig) -> None:
        """Checks the settings that depend on the base model, before any work starts.

        Raises:
          TrainConfigError: ``lora_sites`` matches no site of ``model``.
        """
        try:
            select_sites(model, self.lora)
        except ConfigError as e:
            raise TrainConfigError(str(e).replace("LoRAConfig.sites", "TrainConfig.lora_sites",
                                                  1)) from None

    @property
    def effective_batch(self) -> int:
        return self.micro_batch * self.grad_accum

    @property
    def lora(self) -> LoRAConfig:
        return LoRAConfig(rank=self.lora_rank, sites=self.lora_sites, scale=self.lora_scale,
                          init_std=self.lora_init_std)

    def replace(self, **changes) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v)
                for f in dataclasses.fields(self)}


# --- optimiser -----------------------------------------------------------------------------------


def warmup_constant(lr: float, warmup_steps: int) -> optax.Schedule:
    """``lr * min(1, (count + 1) / warmup_steps)``: the first update already moves."""
    if warmup_steps <= 0:
        return optax.constant_schedule(lr)

    def schedule(count):
        return lr * jnp.minimum(1.0, (count + 1) / warmup_steps)

    return schedule


def _path(keys) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in keys)


def freeze_labels(pattern: str, tree: Any) -> Any:
    """``TRAIN`` / ``FREEZE`` per leaf: frozen where ``pattern`` full-matches the leaf path."""
    rx = re.compile(pattern) if pattern else None
    return jax.tree_util.tree_map_with_path(
        lambda p, _: FREEZE if rx is not None and rx.fullmatch(_path(p)) else TRAIN, tree)


def make_optimizer(tcfg: TrainConfig, steps: int) -> optax.GradientTransformation:
    """Clip (global norm) then AdamW with warm-up, under the freeze mask of ``tcfg.freeze``."""
    warmup = int(tcfg.warmup_ratio * steps)
    adamw = optax.adamw(warmup_constant(tcfg.lr, warmup), b1=tcfg.b1, b2=tcfg.b2, eps=tcfg.eps,
                        weight_decay=tcfg.weight_decay)
    train = optax.chain(optax.clip_by_global_norm(tcfg.clip), adamw) if tcfg.clip > 0 else adamw
    return optax.multi_transform({TRAIN: train, FREEZE: optax.set_to_zero()},
                                 functools.partial(freeze_labels, tcfg.freeze))


# --- loss ----------------------------------------------------------------------------------------


# --- programs ------------------------------------------------------------------------------------


@flax.struct.dataclass
class TrainState:
    """What changes during training. With ``many``, trainable and opt_state lead with E.

    Attributes:
      step: int32 scalar, optimiser steps taken.
      trainable: the tree being trained (experts, gates, or base params).
      opt_state: the optax state of ``trainable``.
    """

    step: Array
    trainable: Any
    opt_state: Any


@dataclasses.dataclass(frozen=True)
class Program:
    """A training job's static part: what trains, how, how long. Hashable (a jit static arg).

    Attributes:
      kind: "expert", "gate" or "full" (see the module doc).
      model: the model config with the dtype policy the frozen trees are stored in: a T5
        (``token_nll``) or a decoder-only model (the causal-LM loss of
        ``models.causal.loss.causal_nll``).
      train: the hyper-parameters.
      steps: total optimiser steps (sets the warm-up length).
      lora_scale: the LoRA scale (ignored for "full").
      many: vmap over a leading expert axis (E runs side by side); False is a plain
        single-model step (multitask).
      mesh: the device mesh the steps run on, or None (one device, layouts left to jit). With a
        mesh every jitted program declares its input and output shardings (``shardings``):
        the base by the rules table, the expert-stacked trees (trainable, optimiser state,
        frozen experts, metrics) with E over ``expert``, the batch as ``global_batch`` lays it
        out, and ``init`` builds the state directly in its layout.
    """

    kind: str
    model: families.ModelConfig
    train: TrainConfig
    steps: int
    lora_scale: float = 1.0
    many: bool = True
    mesh: Mesh | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise TrainConfigError(f"Program.kind must be one of {KINDS}, got {self.kind!r}")
        if self.kind == "full" and self.many:
            raise TrainConfigError("full fine-tuning trains one model: use many=False")
        self.train.check_family(families.check_config(self.model))

    @property
    def optimizer(self) -> optax.GradientTransformation:
        return make_optimizer(self.train, self.steps)

    @property
    def adapter(self) -> LoRAAdapter | None:
        if self.kind == "full":
            return None
        return LoRAAdapter(self.lora_scale, "gated" if self.kind == "gate" else "sum")

    def variables(self, base, frozen, trainable) -> dict:
        if self.kind == "expert":
            return {"params": base, EXPERTS: trainable}
        if self.kind == "gate":
            return {"params": base, EXPERTS: frozen, GATES: trainable}
        return {"params": trainable}

    def init(self, trainable) -> TrainState:
        """A fresh state; ``trainable`` leaves are cast to float32. On a mesh it is built by one
        jitted program with output shardings: each device computes only its own share of the
        optimiser state (never the whole expert stack on one device)."""
        if self.mesh is None:
            trainable = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), trainable)
            return TrainState(jnp.zeros((), jnp.int32), trainable,
                              self._jit(_init_impl)(self, trainable))
        return self._mesh_jit(_init_state_impl, (trainable,), False)[0](trainable)

    def state_shapes(self, trainable) -> TrainState:
        """The state ``init(trainable)`` builds, as ``jax.ShapeDtypeStruct`` leaves (with their
        shardings on a mesh): ``trainable`` may itself be abstract; nothing is computed."""
        shapes = jax.eval_shape(functools.partial(_init_state_impl, self), trainable)
        return shapes if self.mesh is None else sharding.abstract(
            shapes, self._per_expert(shapes))

    def shardings(self, base, frozen, state, batch) -> tuple:
        """The declared ``NamedSharding`` trees of ``(base, frozen, state, batch)`` on the mesh
        (the inputs of ``step``; ``evaluate`` takes the trainable tree in place of the state,
        laid out like it). Arrays or shapes; None stays None.

        Raises:
          TrainConfigError: the program has no mesh.
        """
        if self.mesh is None:
            raise TrainConfigError("Program.shardings: this program has no mesh")
        return (None if base is None else sharding.param_shardings(
                    base, _base_specs(self.model), self.mesh),
                None if frozen is None else sharding.leading_shardings(frozen, self.mesh),
                self._per_expert(state),
                None if batch is None else sharding.batch_shardings(batch, self.mesh, self.many))

    def step_fn(self, base, frozen, state, batch, *, donate: bool = False):
        """The jitted step for inputs shaped like these (arrays or ``jax.ShapeDtypeStruct``):
        call it as ``step_fn(...)(base, frozen, state, batch)``. On a mesh its input and output
        shardings are declared (``shardings``; the new state leaves as the old one came in, so
        ``donate`` reuses its buffers), and ``.lower(...)`` of abstract inputs compiles it
        without any data (``bench/pod_plan.py``)."""
        if self.mesh is None:
            return functools.partial(self._jit(_step_impl, (3,) if donate else ()), self)
        return self._mesh_jit(_step_impl, (base, frozen, state, batch), True,
                              (2,) if donate else ())[0]

    def step(self, base, frozen, state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        """One optimiser step (jitted).

        Args:
          base: the base params (shared by all experts).
          frozen: the frozen per-expert tree (experts during gate training) or None.
          state: the current state.
          batch: ``inputs`` / ``input_mask`` [E, A, M, L] and ``targets`` [E, A, M, T]
            (no E axis when not ``many``).

        Returns:
          (new state, metrics): ``loss`` (mean target-token NLL), ``tokens``, ``grad_norm``
          (before clipping), each (E,) when ``many``; ``lr`` a scalar.
        """
        return self._run(_step_impl, (base, frozen, state, batch), ())

    def step_donating(self, base, frozen, state: TrainState, batch: dict):
        """``step`` that donates ``state``'s buffers (the caller must not reuse ``state``)."""
        return self._run(_step_impl, (base, frozen, state, batch), (2,))

    def evaluate(self, base, frozen, trainable, batch: dict) -> dict:
        """Mean target-token NLL (``loss``) and ``tokens`` on ``batch``, without updating."""
        return self._run(_evaluate_impl, (base, frozen, trainable, batch), ())

    def _run(self, fn, args: tuple, donate: tuple):
        if self.mesh is None:
            return self._jit(fn, tuple(i + 1 for i in donate))(self, *args)
        jitted, in_shardings = self._mesh_jit(fn, args, True, donate)
        # Inputs already laid out as declared pass through untouched (``put_global``).
        return jitted(*sharding.put_global(args, in_shardings))

    def _per_expert(self, tree):
        if self.many:
            return sharding.leading_shardings(tree, self.mesh)
        return sharding.replicated_shardings(tree, self.mesh)

    def _mesh_jit(self, fn, args: tuple, declare_inputs: bool, donate: tuple = ()):
        # (jitted, input shardings), once per (fn, program, donation, input shapes). Outputs are
        # laid out per expert (or replicated) like the inputs, so a state goes round unchanged.
        leaves, treedef = jax.tree.flatten(args)
        key = (fn, self, declare_inputs, donate, treedef,
               tuple((tuple(np.shape(x)), np.dtype(x.dtype)) for x in leaves))
        if key not in _MESH_JITS:
            bound = functools.partial(fn, self)
            out = self._per_expert(jax.eval_shape(bound, *args))
            options = FAST_COMPILE_OPTIONS if self.train.fast_compile else None
            in_shardings = self.shardings(*args) if declare_inputs else None
            kwargs = {"in_shardings": in_shardings} if declare_inputs else {}
            _MESH_JITS[key] = (jax.jit(bound, out_shardings=out, donate_argnums=donate,
                                       compiler_options=options, **kwargs), in_shardings)
        return _MESH_JITS[key]

    def _jit(self, fn, donate: tuple = ()):
        # One jitted function per (fn, options); the program is its static first argument, so
        # equal programs share compiled code.
        return _jitted(fn, self.train.fast_compile, donate)

    # Per expert (or for the one model): no leading E axis on anything.
    def _expand(self, tree):
        return jax.tree.map(lambda x: x[None], tree) if self.many else tree

    def _nll(self, base, frozen, trainable, micro):
        variables = self.variables(base, self._expand(frozen), self._expand(trainable))
        return families.of(self.model).token_nll(self.model, variables, micro, self.adapter,
                                                 remat=self.train.remat)

    def _update(self, base, frozen, trainable, opt_state, batch):
        def micro(carry, mb):
            g_acc, nll_acc, n_acc = carry
            (nll, n), g = jax.value_and_grad(self._nll, argnums=2, has_aux=True)(
                base, frozen, trainable, mb)
            return (jax.tree.map(jnp.add, g_acc, g), nll_acc + nll, n_acc + n), None

        zeros = jax.tree.map(jnp.zeros_like, trainable)
        zero = jnp.zeros((), jnp.float32)
        (grads, nll, n), _ = jax.lax.scan(micro, (zeros, zero, zero), batch)
        n_safe = jnp.maximum(n, 1.0)
        grads = jax.tree.map(lambda g: g / n_safe, grads)
        updates, opt_state = self.optimizer.update(grads, opt_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        metrics = {"loss": nll / n_safe, "tokens": n, "grad_norm": optax.global_norm(grads)}
        return trainable, opt_state, metrics

    def _eval(self, base, frozen, trainable, batch):
        def micro(carry, mb):
            nll, n = self._nll(base, frozen, trainable, mb)
            return (carry[0] + nll, carry[1] + n), None

        zero = jnp.zeros((), jnp.float32)
        (nll, n), _ = jax.lax.scan(micro, (zero, zero), batch)
        return {"loss": nll / jnp.maximum(n, 1.0), "tokens": n}


def _step_impl(program: Program, base, frozen, state: TrainState, batch):
    update = program._update
    if program.many:
        update = jax.vmap(update, in_axes=(None, 0, 0, 0, 0))
    trainable, opt_state, metrics = update(base, frozen, state.trainable, state.opt_state, batch)
    schedule = warmup_constant(program.train.lr, int(program.train.warmup_ratio * program.steps))
    metrics["lr"] = jnp.asarray(schedule(state.step), jnp.float32)
    return TrainState(state.step + 1, trainable, opt_state), metrics


def _init_impl(program: Program, trainable):
    init = program.optimizer.init
    return (jax.vmap(init) if program.many else init)(trainable)


def _init_state_impl(program: Program, trainable):
    trainable = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), trainable)
    return TrainState(jnp.zeros((), jnp.int32), trainable, _init_impl(program, trainable))


def _evaluate_impl(program: Program, base, frozen, trainable, batch):
    fn = program._eval
    if program.many:
        fn = jax.vmap(fn, in_axes=(None, 0, 0, 0))
    return fn(base, frozen, trainable, batch)


_MESH_JITS: dict = {}


@functools.cache
def _base_specs(model: families.ModelConfig):
    return families.param_logical_axes(model)


@functools.cache
def _jitted(fn, fast: bool, donate: tuple = ()):
    return jax.jit(fn, static_argnums=(0,), donate_argnums=donate,
                   compiler_options=FAST_COMPILE_OPTIONS if fast else None)


# --- trees ----------------------------------------------------------------------------------------


def cast_floats(tree: Any, dtype) -> Any:
    """Casts the floating-point leaves of ``tree`` to ``dtype`` (a frozen base in bf16)."""
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating)
                        and x.dtype != dtype else x, tree)


def stack_trees(trees: Sequence[Any]) -> Any:
    """Concatenates trees with a leading E axis (each (1, ...) or (E_i, ...)) along it."""
    return jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=0), *trees)


def slice_tree(tree: Any, index: int) -> Any:
    """Expert ``index`` of a stacked tree, keeping the leading axis: (1, ...)."""
    return jax.tree.map(lambda x: x[index:index + 1], tree)
