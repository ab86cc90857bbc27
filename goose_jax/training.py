"""Pure train steps: LoRA experts, PHATGOOSE gates, multitask models; many experts at once.

Legend: E experts trained side by side, A microbatches (gradient accumulation), M micro batch,
L input length, T target length, V vocab, D d_in of a site, R LoRA rank, O d_out.

What trains is always one pytree, differentiated alone (``jax.grad`` with respect to it); the
rest of the model enters the step as frozen arguments:

    kind       trainable tree              frozen trees                 site adapter
    "expert"   experts (lora_a, lora_b)    base params                  LoRAAdapter("sum")
    "gate"     gates (gate)                base params, experts         LoRAAdapter("gated")
    "full"     base params                 none                         none

The optimiser (``make_optimizer``) is ``optax.multi_transform`` with a freeze mask over the
trainable tree: leaves whose path matches ``TrainConfig.freeze`` get ``optax.set_to_zero()``.
That is the second guard, and lets a config train only some sites.

Many at once: with ``Program(many=True)`` one jitted step trains E experts (or E gates), each on
its own batch, by ``jax.vmap`` over the leading expert axis of the trainable tree, the frozen
per-expert tree (gate training), the optimiser state and the batch ``[E, A, M, L]``; the base
params are shared. Each vmapped instance sees its expert with a leading axis of 1 (``lora_a``
(1, D, R)), exactly the single-expert layout, so clipping, Adam and the loss are per expert:
each expert is its own run. Sharding the expert axis over the ``expert`` mesh axis
(``shard_experts``) splits the experts across devices. Single-expert training is E = 1.

Gradient accumulation runs inside the step (``lax.scan`` over A microbatches). The loss is the
token cross-entropy summed over the whole effective batch and divided by its number of target
tokens, so ``A x M`` equals one batch of ``A * M`` (the original release instead averaged each
microbatch and divided by A).

Data: an ``ExampleSource`` is a sequence of (input, target) pairs, each a string or a
pre-tokenised int sequence; ``Batcher`` turns one into step batches whose content is a pure
function of (seed, stream, position), which makes an interrupted run resume bit-exactly.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
from collections.abc import Sequence
from typing import Any, Protocol

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from goose_jax import sharding
from goose_jax.config import T5Config
from goose_jax.errors import DataError, TrainConfigError
from goose_jax.experts import (
    DEFAULT_SITES,
    EXPERTS,
    GATES,
    LoRAAdapter,
    LoRAConfig,
    nest_sites,
    select_sites,
)
from goose_jax.t5 import FAST_COMPILE_OPTIONS, T5

Array = jax.Array

TRAIN, FREEZE = "train", "freeze"
KINDS = ("expert", "gate", "full")
_DTYPES = ("float32", "bfloat16")


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
        checkpoints; the final step is always checkpointed).
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
                  "expert_names": (lambda v: isinstance(v, tuple), "a tuple of strings")}
        for name, (ok, want) in checks.items():
            if not ok(getattr(self, name)):
                fail(name, want)
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


def shift_right(targets_BT: Array, start_id: int) -> Array:
    """Decoder inputs for teacher forcing: the targets shifted right after the start token."""
    start = jnp.full(targets_BT.shape[:-1] + (1,), start_id, targets_BT.dtype)
    return jnp.concatenate([start, targets_BT[..., :-1]], axis=-1)


def token_nll(cfg: T5Config, variables: dict, batch: dict, adapter=None) -> tuple[Array, Array]:
    """Summed target-token cross-entropy and the number of target tokens (pad 0 is masked).

    Args:
      cfg: the model config.
      variables: ``{"params": ..., "experts": ..., "gates": ...}`` as the adapter needs.
      batch: ``inputs`` (B, L), ``input_mask`` (B, L), ``targets`` (B, T) int arrays.
      adapter: the site adapter.

    Returns:
      (nll_sum, tokens): float32 scalars.
    """
    targets_BT = batch["targets"]
    dec_BT = shift_right(targets_BT, cfg.decoder_start_token_id)
    logits_BTV = T5(cfg, adapter).apply(variables, batch["inputs"], dec_BT, batch["input_mask"])
    nll_BT = optax.softmax_cross_entropy_with_integer_labels(logits_BTV.astype(jnp.float32),
                                                             targets_BT)
    w_BT = (targets_BT != cfg.pad_token_id).astype(jnp.float32)
    return jnp.sum(nll_BT * w_BT), jnp.sum(w_BT)


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
      model: the model config with the dtype policy the frozen trees are stored in.
      train: the hyper-parameters.
      steps: total optimiser steps (sets the warm-up length).
      lora_scale: the LoRA scale (ignored for "full").
      many: vmap over a leading expert axis (E runs side by side); False is a plain
        single-model step (multitask).
    """

    kind: str
    model: T5Config
    train: TrainConfig
    steps: int
    lora_scale: float = 1.0
    many: bool = True

    def __post_init__(self):
        if self.kind not in KINDS:
            raise TrainConfigError(f"Program.kind must be one of {KINDS}, got {self.kind!r}")
        if self.kind == "full" and self.many:
            raise TrainConfigError("full fine-tuning trains one model: use many=False")

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
        """A fresh state; ``trainable`` leaves are cast to float32."""
        trainable = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), trainable)
        return TrainState(jnp.zeros((), jnp.int32), trainable,
                          self._jit(_init_impl)(self, trainable))

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
        return self._jit(_step_impl)(self, base, frozen, state, batch)

    def step_donating(self, base, frozen, state: TrainState, batch: dict):
        """``step`` that donates ``state``'s buffers (the caller must not reuse ``state``)."""
        return self._jit(_step_impl, (3,))(self, base, frozen, state, batch)

    def evaluate(self, base, frozen, trainable, batch: dict) -> dict:
        """Mean target-token NLL (``loss``) and ``tokens`` on ``batch``, without updating."""
        return self._jit(_evaluate_impl)(self, base, frozen, trainable, batch)

    def _jit(self, fn, donate: tuple = ()):
        # One jitted function per (fn, options); the program is its static first argument, so
        # equal programs share compiled code.
        return _jitted(fn, self.train.fast_compile, donate)

    # Per expert (or for the one model): no leading E axis on anything.
    def _expand(self, tree):
        return jax.tree.map(lambda x: x[None], tree) if self.many else tree

    def _nll(self, base, frozen, trainable, micro):
        variables = self.variables(base, self._expand(frozen), self._expand(trainable))
        return token_nll(self.model, variables, micro, self.adapter)

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


def _evaluate_impl(program: Program, base, frozen, trainable, batch):
    fn = program._eval
    if program.many:
        fn = jax.vmap(fn, in_axes=(None, 0, 0, 0))
    return fn(base, frozen, trainable, batch)




@functools.cache
def _jitted(fn, fast: bool, donate: tuple = (), static: tuple = (0,)):
    return jax.jit(fn, static_argnums=static, donate_argnums=donate,
                   compiler_options=FAST_COMPILE_OPTIONS if fast else None)



# --- trees and sharding --------------------------------------------------------------------------


def cast_floats(tree: Any, dtype) -> Any:
    """Casts the floating-point leaves of ``tree`` to ``dtype`` (a frozen base in bf16)."""
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating)
                        and x.dtype != dtype else x, tree)


def init_expert_stack(cfg: T5Config, lora: LoRAConfig, rngs: Sequence[Array], *,
                      fast_compile: bool = False) -> dict:
    """E fresh experts stacked (E, ...), expert e drawn from ``rngs[e]`` alone.

    The same distribution as ``experts.init_experts`` (A ~ N(0, init_std^2), B = 0), drawn as
    one normal vector per expert that is cut into the sites' A matrices (one random kernel to
    compile instead of one per site). An expert's weights depend on its own key only, not on E
    or its position: trained alone or among others, it starts from the same point.
    """
    return _jitted(_init_stack, fast_compile, static=(0, 1))(cfg, lora, jnp.stack(list(rngs)))


def _init_stack(cfg: T5Config, lora: LoRAConfig, keys):
    sites = select_sites(cfg, lora)
    sizes = [d_in * lora.rank for d_in, _ in sites.values()]
    offsets = np.cumsum([0] + sizes)

    def one(key):
        z = lora.init_std * jax.random.normal(key, (int(offsets[-1]),), jnp.float32)
        return nest_sites({name: {
            "lora_a": z[offsets[i]:offsets[i + 1]].reshape(d_in, lora.rank),
            "lora_b": jnp.zeros((lora.rank, d_out), jnp.float32)}
            for i, (name, (d_in, d_out)) in enumerate(sites.items())})

    return jax.vmap(one)(keys)


def stack_trees(trees: Sequence[Any]) -> Any:
    """Concatenates trees with a leading E axis (each (1, ...) or (E_i, ...)) along it."""
    return jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=0), *trees)


def slice_tree(tree: Any, index: int) -> Any:
    """Expert ``index`` of a stacked tree, keeping the leading axis: (1, ...)."""
    return jax.tree.map(lambda x: x[index:index + 1], tree)


def _shard_leading(tree, mesh, rest_logical: tuple = ()):
    def spec(x):
        axes = (("expert",) + rest_logical)[:np.ndim(x)]
        while axes and axes[-1] is None:  # P("expert") as jit writes it, not P("expert", None)
            axes = axes[:-1]
        return jax.sharding.PartitionSpec(*axes)

    return sharding.shard_params(tree, jax.tree.map(spec, tree), mesh)


def shard_experts(tree: Any, mesh: jax.sharding.Mesh) -> Any:
    """Places a tree with a leading expert axis (experts, gates, optimiser state) on ``mesh``:
    that axis over the ``expert`` mesh axis (the one rules table decides), the rest replicated.
    Scalars, and axes the mesh does not divide, are replicated."""
    return _shard_leading(tree, mesh)


def shard_state(state: TrainState, mesh: jax.sharding.Mesh) -> TrainState:
    """A ``many`` state on ``mesh``, placed as the jitted step returns it (so the second step
    does not compile again): experts over ``expert``, the step count replicated."""
    return TrainState(*_shard_leading((state.step, state.trainable, state.opt_state), mesh))


def shard_batch(batch: dict, mesh: jax.sharding.Mesh) -> dict:
    """Places an [E, A, M, L] batch: experts over ``expert``, microbatch rows over ``data``."""
    return _shard_leading(batch, mesh, (None, "batch"))


def _batch_shardings(shapes: dict, mesh: jax.sharding.Mesh, many: bool) -> dict:
    logical = ("expert", None, "batch") if many else (None, "batch")
    specs = {k: jax.sharding.PartitionSpec(*logical) for k in shapes}
    return sharding.param_shardings(shapes, specs, mesh)


def global_batch(batchers: Sequence[Batcher], positions: Sequence[int],
                 mesh: jax.sharding.Mesh | None = None, *, many: bool = True) -> dict:
    """One step's batch, built where it is needed.

    Without a mesh: NumPy arrays, ``stack_batches`` of every batcher's batch (``many``) or the
    one batcher's batch. With a mesh (of one process or several): global arrays laid out as
    ``shard_batch`` lays them out, each process reading and tokenising only the experts and
    microbatch rows its own devices hold. The values are those of the single-process batch,
    whatever the mesh or the number of processes, since a batch is a pure function of
    (seed, stream, position).

    Args:
      batchers: one per expert (``many``), or one.
      positions: each batcher's stream position.
      mesh: the device mesh, or None.
      many: the batch has a leading expert axis E.

    Returns:
      ``inputs`` / ``input_mask`` [E, A, M, L] and ``targets`` [E, A, M, T] (no E without
      ``many``), int32.
    """
    if mesh is None:
        parts = [b.batch(p) for b, p in zip(batchers, positions)]
        return stack_batches(parts) if many else parts[0]
    b0 = batchers[0]
    lengths = {"inputs": b0.lengths[0], "input_mask": b0.lengths[0], "targets": b0.lengths[1]}
    lead = (len(batchers),) if many else ()
    shapes = {k: jax.ShapeDtypeStruct(lead + (b0.grad_accum, b0.micro_batch, n), np.int32)
              for k, n in lengths.items()}
    shardings = _batch_shardings(shapes, mesh, many)
    cache: dict = {}

    def block(experts: range, rows: slice) -> dict:
        # Devices that hold the same block (replicas over "model") share one build.
        key = (experts.start, experts.stop, rows.start, rows.stop)
        if key not in cache:
            parts = [batchers[e].batch(positions[e], rows) for e in experts]
            cache[key] = stack_batches(parts) if many else parts[0]
        return cache[key]

    def build(name):
        def callback(index):
            index = tuple(index) + (slice(None),) * (len(shapes[name].shape) - len(index))
            if many:
                experts = range(len(batchers))[index[0]]
                rows = slice(*index[2].indices(b0.micro_batch))
                return block(experts, rows)[name][:, index[1], :, index[3]]
            rows = slice(*index[1].indices(b0.micro_batch))
            return block(range(1), rows)[name][index[0], :, index[2]]
        return jax.make_array_from_callback(shapes[name].shape, shardings[name], callback)

    return {name: build(name) for name in shapes}


# --- data ----------------------------------------------------------------------------------------


class ExampleSource(Protocol):
    """A finite sequence of (input, target) examples: strings or pre-tokenised int sequences."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> tuple[str | Sequence[int], str | Sequence[int]]: ...


class Tokenizer(Protocol):
    pad_id: int

    def encode_batch(self, texts: Sequence[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
        ...


class JsonlSource:
    """Examples from a JSON-lines file, one ``{"input": ..., "target": ...}`` object per line.

    Values are strings, or lists of ints (already tokenised, used as they are). Blank lines are
    skipped. The file is read once, at construction.

    Raises:
      DataError: naming the file (and line) when it is missing, malformed or empty.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.path.abspath(os.fspath(path))
        self.name = os.path.splitext(os.path.basename(self.path))[0]
        try:
            with open(self.path, encoding="utf-8") as f:
                lines = f.readlines()
        except OSError as e:
            raise DataError(f"{self.path}: cannot read the data file: {e.strerror}") from None
        self.examples = []
        for i, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                ok = isinstance(row, dict) and all(_is_example_part(row.get(k))
                                                   for k in ("input", "target"))
            except ValueError:
                ok = False
            if not ok:
                raise DataError(f"{self.path}:{i}: expected a JSON object with 'input' and "
                                "'target' (strings or lists of ints)")
            self.examples.append((row["input"], row["target"]))
        if not self.examples:
            raise DataError(f"{self.path}: no examples (empty dataset)")

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int):
        return self.examples[index]


def _is_example_part(v) -> bool:
    return isinstance(v, str) or (isinstance(v, list) and all(
        isinstance(t, int) and not isinstance(t, bool) for t in v))


class ConcatSource:
    """Several sources as one (a multitask mixture, examples-proportional)."""

    def __init__(self, sources: Sequence[ExampleSource]):
        self.sources = list(sources)
        self.offsets = np.cumsum([0] + [len(s) for s in self.sources])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, index: int):
        k = int(np.searchsorted(self.offsets, index, side="right")) - 1
        return self.sources[k][index - int(self.offsets[k])]


class Batcher:
    """Step batches of one example stream, a pure function of (seed, stream, position).

    The stream visits its examples in epochs, each in the order of a permutation drawn from
    ``(seed, stream, epoch)``; ``batch(position)`` holds the ``batch_size`` examples from
    ``position`` on (positions count examples, across epochs). So a resumed run that knows its
    position reads exactly what an uninterrupted run would have.
    """

    def __init__(self, source: ExampleSource, tokenizer: Tokenizer, *, micro_batch: int,
                 grad_accum: int, max_input_length: int, max_target_length: int, seed: int,
                 stream: int = 0, vocab_size: int | None = None):
        if len(source) == 0:
            raise DataError(f"{getattr(source, 'path', 'data source')}: no examples")
        self.source, self.tokenizer = source, tokenizer
        self.micro_batch, self.grad_accum = micro_batch, grad_accum
        self.lengths = (max_input_length, max_target_length)
        self.seed, self.stream, self.vocab_size = seed, stream, vocab_size

    @classmethod
    def from_config(cls, source, tokenizer, tcfg: TrainConfig, stream: int = 0,
                    vocab_size: int | None = None) -> Batcher:
        return cls(source, tokenizer, micro_batch=tcfg.micro_batch, grad_accum=tcfg.grad_accum,
                   max_input_length=tcfg.max_input_length,
                   max_target_length=tcfg.max_target_length, seed=tcfg.seed, stream=stream,
                   vocab_size=vocab_size)

    @property
    def batch_size(self) -> int:
        return self.micro_batch * self.grad_accum

    @functools.lru_cache(maxsize=4)  # noqa: B019 -- a few epochs' permutations, per batcher
    def _permutation(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng((self.seed, self.stream, epoch))
        return rng.permutation(len(self.source))

    def indices(self, position: int) -> np.ndarray:
        """Example indices of the batch starting at ``position``: (batch_size,)."""
        n = len(self.source)
        pos = position + np.arange(self.batch_size)
        return np.array([self._permutation(int(p // n))[int(p % n)] for p in pos], np.int64)

    def _encode(self, parts, max_length: int) -> tuple[np.ndarray, np.ndarray]:
        ids = np.full((len(parts), max_length), self.tokenizer.pad_id, np.int32)
        mask = np.zeros((len(parts), max_length), np.int32)
        texts = [(i, p) for i, p in enumerate(parts) if isinstance(p, str)]
        if texts:
            t_ids, t_mask = self.tokenizer.encode_batch([p for _, p in texts], max_length)
            rows = [i for i, _ in texts]
            ids[rows], mask[rows] = t_ids, t_mask
        for i, p in enumerate(parts):
            if not isinstance(p, str):
                p = list(p)[:max_length]
                ids[i, :len(p)], mask[i, :len(p)] = p, 1
        if self.vocab_size is not None and ids.size and ids.max() >= self.vocab_size:
            raise DataError(f"{getattr(self.source, 'path', 'data')}: token id {ids.max()} is "
                            f"outside the model's vocabulary ({self.vocab_size}); wrong "
                            "tokenizer for this model?")
        return ids, mask

    def batch(self, position: int, rows: slice | None = None) -> dict[str, np.ndarray]:
        """``inputs`` / ``input_mask`` (A, M, L) and ``targets`` (A, M, T), int32.

        Args:
          position: the stream position of the batch's first example.
          rows: only these microbatch rows (a slice of M), e.g. the rows one host's devices
            hold; only their examples are read and tokenised. Default: all M.
        """
        picked = self.indices(position).reshape(self.grad_accum, self.micro_batch)
        if rows is not None:
            picked = picked[:, rows]
        examples = [self.source[int(i)] for i in picked.reshape(-1)]
        inputs, input_mask = self._encode([e[0] for e in examples], self.lengths[0])
        targets, _ = self._encode([e[1] for e in examples], self.lengths[1])
        shape = (self.grad_accum, picked.shape[1])
        return {"inputs": inputs.reshape(shape + (-1,)),
                "input_mask": input_mask.reshape(shape + (-1,)),
                "targets": targets.reshape(shape + (-1,))}


def stack_batches(batches: Sequence[dict]) -> dict[str, np.ndarray]:
    """E per-stream batches -> one batch with a leading E axis."""
    return {k: np.stack([b[k] for b in batches]) for k in batches[0]}
