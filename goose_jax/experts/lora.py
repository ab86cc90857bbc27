"""LoRA experts and PHATGOOSE gates at the model's named sites, stacked on an expert axis.

Shapes follow the package legend (the ``goose_jax`` module docstring).

Trees. Expert weights and gates are their own pytrees (Flax variable collections), nested exactly
like the base ``params`` down to the site, so a site finds its own weights at its own path:

    experts: {"encoder": {"block_0": {"self_attn": {"q": {"lora_a": (E, I, R),
                                                          "lora_b": (E, R, O)}}}}}
    gates:   {... same path ...: {"gate": (E, I)}}

The base ``params`` tree is never touched. A site without an entry simply has no expert.

``LoRAAdapter`` is the site adapter for training and for fixed mixtures:
  - ``mode="sum"``: ``y + sum_e (x A_e) B_e * scale`` (one expert when E = 1: expert training);
  - ``mode="mean"``: the same with weight 1/E per expert (the "uniform" baseline);
  - ``mode="gated"``: ``y + sum_e sigmoid(x . g_e) * (x A_e) B_e * scale`` (gate training).
Routing among experts is a different adapter (``goose_jax.routing.formula``) over the same trees.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from goose_jax.core import sharding
from goose_jax.core.errors import ConfigError
from goose_jax.core.trees import flatten_sites, nest_sites
from goose_jax.models import families
from goose_jax.models.config import FAST_COMPILE_OPTIONS

Array = jax.Array

EXPERTS = "experts"
GATES = "gates"

# Every attention projection (self and cross) and every FFN matrix, encoder and decoder: the
# paper's 432 sites on T5-XL. On a decoder-only model the default means every site of that
# family (its ``sites_pattern``).
DEFAULT_SITES = families.named("t5").sites_pattern


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """Where experts go and how they are shaped.

    Attributes:
      rank: R.
      sites: regular expression, full-matched against site names (``gj.site_shapes``).
      scale: multiplier on ``(x A) B``. The paper uses 1/r; PEFT adapters use alpha/r or
        alpha/sqrt(r) (see ``peft_scale``). None means 1/rank.
      init_std: A ~ N(0, init_std^2); B = 0.
    """

    rank: int = 16
    sites: str = DEFAULT_SITES
    scale: float | None = None
    init_std: float = 0.01

    def __post_init__(self):
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ConfigError(f"LoRAConfig.rank must be a positive integer, got {self.rank!r}")
        try:
            re.compile(self.sites)
        except re.error as e:
            raise ConfigError(f"LoRAConfig.sites is not a valid regular expression: {e}") from None
        if self.init_std < 0:
            raise ConfigError(f"LoRAConfig.init_std must be >= 0, got {self.init_std}")

    @property
    def lora_scale(self) -> float:
        return 1.0 / self.rank if self.scale is None else float(self.scale)


def peft_scale(rank: int, alpha: float, use_rslora: bool = False) -> float:
    """PEFT's scaling: alpha / r, or alpha / sqrt(r) with rsLoRA."""
    return alpha / (rank**0.5 if use_rslora else rank)


def site_pattern(cfg: families.ModelConfig, lora: LoRAConfig) -> str:
    """``lora.sites``, except that the default selects every site of ``cfg``'s family."""
    return families.all_sites_pattern(cfg) if lora.sites == DEFAULT_SITES else lora.sites


def select_sites(cfg: families.ModelConfig, lora: LoRAConfig) -> dict[str, tuple[int, int]]:
    """The sites (name -> (I, O)) that ``lora.sites`` selects, in model order."""
    pattern = re.compile(site_pattern(cfg, lora))
    shapes = families.site_shapes(cfg)
    chosen = {name: shape for name, shape in shapes.items() if pattern.fullmatch(name)}
    if not chosen:
        raise ConfigError(f"LoRAConfig.sites {lora.sites!r} matches no site of this model; "
                         f"sites look like {next(iter(shapes))!r}")
    return chosen


def init_experts(cfg: families.ModelConfig, lora: LoRAConfig, experts: int | Sequence[Array],
                 rng: Array | int = 0, dtype=jnp.float32, *, fast_compile: bool = False,
                 mesh: Mesh | None = None) -> dict:
    """Fresh experts stacked on a leading axis: A ~ N(0, init_std^2) (E, I, R), B = 0 (E, R, O).

    Expert e is drawn from its own key alone, as one normal vector cut into the sites' A
    matrices (one random kernel to compile instead of one per site). Its weights depend on that
    key only, not on E or its position: trained alone or among others (keyed by name, as
    goose-train does), it starts from the same point.

    Args:
      cfg: the base model's config.
      lora: rank, sites and init scale.
      experts: the experts' own keys (expert e from ``experts[e]``), or a count E, then expert
        e's key is ``fold_in(rng, e)``.
      rng: the root key (or seed) of a count; ignored with keys.
      dtype: the returned leaves' dtype.
      fast_compile: compile with XLA's backend optimisation off (tests, smoke runs).
      mesh: build the stack already laid out on this mesh, E over ``expert``
        (``core.sharding.leading_shardings``): one jitted program with output shardings in which
        each
        device draws only its own experts, so the whole stack never exists on one device or
        host. The values are those of ``mesh=None``.

    Raises:
      ConfigError: no experts, or ``lora.sites`` matches no site of ``cfg``.
    """
    if isinstance(experts, int):
        if isinstance(rng, int):
            rng = jax.random.key(rng)
        experts = [jax.random.fold_in(rng, e) for e in range(experts)]
    if len(experts) < 1:
        raise ConfigError(f"init_experts needs at least one expert, got {len(experts)}")
    select_sites(cfg, lora)  # one clear error outside jit when no site matches
    keys = jnp.stack(list(experts))
    if mesh is None:
        stack = _init_fn(fast_compile)(cfg, lora, keys)
    else:
        # Key data, replicated as host values: a jit over a mesh of several processes takes
        # global arrays only.
        impl = jax.random.key_impl(keys)
        key_data = sharding.replicate(np.asarray(jax.random.key_data(keys)), mesh)

        def draw(data):
            return _init_stack(cfg, lora, jax.random.wrap_key_data(data, impl=impl))

        out = sharding.leading_shardings(jax.eval_shape(draw, key_data), mesh)
        stack = jax.jit(draw, out_shardings=out, compiler_options=FAST_COMPILE_OPTIONS
                        if fast_compile else None)(key_data)
    return jax.tree.map(lambda x: x.astype(dtype), stack) if dtype != jnp.float32 else stack


@functools.cache
def _init_fn(fast: bool):
    return jax.jit(_init_stack, static_argnums=(0, 1),
                   compiler_options=FAST_COMPILE_OPTIONS if fast else None)


def _init_stack(cfg: families.ModelConfig, lora: LoRAConfig, keys) -> dict:
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


def init_gates(experts: dict, dtype=jnp.float32, *, mesh: Mesh | None = None) -> dict:
    """Zero gate vectors (E, I) for every site of ``experts`` (sigmoid starts at 0.5).

    ``experts`` may be abstract (shapes only). With ``mesh`` the gates are built laid out, E over
    ``expert``, each device writing only its own share.
    """
    shapes = nest_sites({name: {"gate": jax.ShapeDtypeStruct(leaf["lora_a"].shape[:2], dtype)}
                         for name, leaf in flatten_sites(experts).items()})

    def zeros():
        return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

    if mesh is None:
        return zeros()
    return jax.jit(zeros, out_shardings=sharding.leading_shardings(shapes, mesh))()


def lora_delta(x_D: Array, lora_a_EDR: Array, lora_b_ERO: Array, weights_E: Array | None,
               scale: float) -> Array:
    """``sum_e w_e (x A_e) B_e * scale`` over any leading axes of x, accumulated in float32.

    ``weights_E`` may also carry the token axes (``(..., E)``) for per-token weights (gates).
    The parameter names predate the package legend and stay for keyword callers: ``x_D`` is
    (..., I), ``lora_a_EDR`` is (E, I, R).
    """
    compute = x_D.dtype
    h_ER = jnp.einsum("...i,eir->...er", x_D, lora_a_EDR.astype(compute),
                      preferred_element_type=jnp.float32)
    if weights_E is not None:
        w = weights_E[..., None].astype(jnp.float32)
        h_ER = h_ER * w.reshape((1,) * (h_ER.ndim - w.ndim) + w.shape)  # explicit broadcast
    out = jnp.einsum("...er,ero->...o", h_ER.astype(compute), lora_b_ERO.astype(compute),
                     preferred_element_type=jnp.float32)
    return out * scale


@dataclasses.dataclass(frozen=True)
class LoRAAdapter:
    """Site adapter for expert training, gate training and fixed mixtures (see module doc)."""

    scale: float
    mode: str = "sum"

    def __post_init__(self):
        if self.mode not in ("sum", "mean", "gated"):
            raise ValueError(
                f"LoRAAdapter.mode must be 'sum', 'mean' or 'gated', got {self.mode!r}")

    def __call__(self, module, x: Array, y: Array) -> Array:
        if not module.has_variable(EXPERTS, "lora_a"):
            return y
        a_EIR = module.get_variable(EXPERTS, "lora_a")
        b_ERO = module.get_variable(EXPERTS, "lora_b")
        E = a_EIR.shape[0]
        if self.mode == "gated":
            g_EI = module.get_variable(GATES, "gate")
            logits = jnp.einsum("...i,ei->...e", x.astype(jnp.float32), g_EI.astype(jnp.float32))
            weights = jax.nn.sigmoid(logits)
        elif self.mode == "mean":
            weights = jnp.full((E,), 1.0 / E, jnp.float32)
        else:
            weights = None
        delta = lora_delta(x.astype(y.dtype), a_EIR, b_ERO, weights, self.scale)
        return y + delta.astype(y.dtype)


def dense_delta(lora_a_EDR: Array, lora_b_ERO: Array, scale: float) -> Array:
    """The dense weight update of each expert, ``A_e B_e * scale``: (E, I, O).

    ``lora_a_EDR`` (E, I, R) is named from before the package legend, kept for keyword callers.
    """
    return jnp.einsum("eir,ero->eio", lora_a_EDR, lora_b_ERO) * scale
