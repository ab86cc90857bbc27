"""Per-token top-k routing among LoRA experts, and the routed LoRA sum.

PHATGOOSE (PHATGOOSE.md section 5), per site and per token, with x the site input (width I) and
G the (E, I) stacked gate vectors:

    ln(v) = (v - mean(v)) / sqrt(var(v) + 1e-5)       no affine, over the last axis
    s     = ln(x) . ln(G)^T / sqrt(I)                   float32
    top   = the k largest scores (jax.lax.top_k)
    w     = softmax(s[top])                             float32
    y     = sum_j w_j * (x A_top_j) B_top_j * scale     added to the base layer's output

Shapes follow the package legend (the ``goose_jax`` module docstring). Everything here is a pure
function of arrays; a library stacks its experts on a leading E axis: A (E, I, R), B (E, R, O),
gates (E, I). Routing functions accept any leading batch axes on x, (..., I), and return
matching leading axes; flattened, those are the N tokens. The public functions' parameter names
(``x_TD``, ``lora_a_EDR``, ``weights_Tk``, ``mask_T``, ...) predate the legend and stay as they
are for keyword callers: in them T means tokens (N) and D a site's input width (I).

Ties: ``jax.lax.top_k`` orders equal scores by expert index, lower first. Duplicate gate rows
therefore always route to the lower-numbered expert first, deterministically.

Bad input (k outside [1, E], an empty library, mismatched shapes, NaN or inf in gate vectors)
raises ``RoutingError`` (a ``ValueError``) while tracing, before anything compiles. Value checks
(NaN, index range) need concrete arrays, so they run when called outside ``jit`` and are skipped
for tracers.

Combination backends (``combine_lora(backend=...)``, implementations and the reasons for each
in ``routing_backends``): ``dense``, ``gather``, ``grouped`` and ``ragged``; ``auto`` picks one
from the sizes (``routing.backends.choose_backend``). Routing runs apart from the combination:
sharing one matmul between the router scores and a dense shrink (x @ [ln(G)^T | A_cat]) gained
nothing, because the shrink is R times the scores' work. Measured: bench/README.md.
"""

from __future__ import annotations

import functools
import math
from typing import Literal

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from goose_jax.core.errors import RoutingError
from goose_jax.routing import backends as routing_backends
from goose_jax.routing.backends import choose_backend

Array = jax.Array

LN_EPS = 1e-5
# The original release divides Arrow scores by a temperature of 10 and by sqrt(d_in).
ARROW_RELEASE_TEMPERATURE = 10.0
# ``temperature="release"`` selects that divisor, 10 * sqrt(I), per site.
RELEASE = "release"

__all__ = [
    "ARROW_RELEASE_TEMPERATURE", "LN_EPS", "RELEASE", "RouteOutput", "RouteStats", "RoutingError",
    "arrow_route", "arrow_scores", "arrow_temperature", "arrow_vectors", "check_temperature",
    "choose_backend", "combine_lora",
    "phatgoose_route", "phatgoose_scores", "prepare_router", "route_stats", "standardize",
    "topk_softmax",
]



@flax.struct.dataclass
class RouteOutput:
    """One routing decision per token.

    Attributes:
      weights: float32 (..., k) softmax over the kept scores; sums to 1 per token.
      index: int32 (..., k) expert indices, best first.
      scores: float32 (..., E) all experts' scores.
    """

    weights: Array  # (..., k)
    index: Array  # (..., k)
    scores: Array  # (..., E)


@flax.struct.dataclass
class RouteStats:
    """Routing telemetry for one site, as jit outputs.

    Attributes:
      counts: int32 (E,) assignments per expert over the counted tokens (each token adds k).
      weight: float32 (E,) routing weight summed per expert (sums to the number of tokens).
      mean_weight: float32 (k,) mean weight of the j-th kept expert (slot 0 is the best).
      entropy: float32 () mean entropy in nats of the per-token weights over the kept experts.
      num_tokens: float32 () tokens counted (after the mask).
    """

    counts: Array
    weight: Array
    mean_weight: Array
    entropy: Array
    num_tokens: Array


# ----------------------------------------------------------------------------------------------
# Validation. Shapes are static under jit, so these run at trace time, before compilation.


def _concrete(array) -> np.ndarray | None:
    """The array's values if they are known now (not a tracer), else None."""
    if isinstance(array, jax.core.Tracer):
        return None
    if isinstance(array, jax.Array) and not array.is_fully_addressable:
        return None  # sharded across hosts: no single process can read it
    return np.asarray(array)


def _check_top_k(top_k, num_experts: int) -> int:
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)):
        raise RoutingError(
            f"top_k must be a Python int (it fixes array shapes); found {type(top_k).__name__} "
            f"{top_k!r}")
    if not 1 <= top_k <= num_experts:
        raise RoutingError(
            f"top_k must be between 1 and the number of experts ({num_experts}); found {top_k}")
    return int(top_k)


def _check_vectors(vectors_EI, d_in: int | None, what: str) -> None:
    """Router vectors: (E, I) with E >= 1, I equal to x's last axis, finite when concrete."""
    shape = tuple(np.shape(vectors_EI))
    if len(shape) != 2:
        raise RoutingError(f"{what} must have shape (E, d_in); found shape {shape}")
    if shape[0] == 0:
        raise RoutingError(f"{what}: the expert library is empty (E = 0); need at least 1 expert")
    if d_in is not None and shape[1] != d_in:
        raise RoutingError(
            f"{what} have d_in {shape[1]} but the site input x has d_in {d_in} "
            f"(a library for a different base model or site?)")
    values = _concrete(vectors_EI)
    if values is not None:
        bad = ~np.isfinite(values.astype(np.float32))
        if bad.any():
            rows = np.unique(np.nonzero(bad)[0])
            raise RoutingError(
                f"{what} contain NaN or inf in {len(rows)} of {shape[0]} experts "
                f"(first bad expert rows: {rows[:5].tolist()}); expected finite values")


def _check_x(x) -> int:
    shape = tuple(np.shape(x))
    if len(shape) < 1 or shape[-1] == 0:
        raise RoutingError(f"x must have shape (..., d_in) with d_in >= 1; found shape {shape}")
    return shape[-1]


# ----------------------------------------------------------------------------------------------
# Routers.


@functools.partial(jax.jit, static_argnames="eps")
def standardize(v: Array, eps: float = LN_EPS) -> Array:
    """Layer norm without affine over the last axis, in float32.

    Args:
      v: (..., I) any float dtype.
      eps: added to the variance. Keep 1e-5 for PHATGOOSE: gate vectors have small variance and
        the eps acts as a per-expert temperature.

    Returns:
      (..., I) float32, ``(v - mean) / sqrt(var + eps)``.
    """
    v = jnp.asarray(v).astype(jnp.float32)
    mean = jnp.mean(v, axis=-1, keepdims=True)
    centered = v - mean
    var = jnp.mean(centered * centered, axis=-1, keepdims=True)
    return centered * jax.lax.rsqrt(var + eps)


def prepare_router(gates_ED: Array) -> Array:
    """Standardizes the stacked gate vectors once, for ``phatgoose_route(gates_normed=True)``.

    Args:
      gates_ED: (E, I) trained gate vectors of one site.

    Returns:
      (E, I) float32 ``ln(G)``.
    """
    _check_vectors(gates_ED, None, "gate vectors")
    return standardize(gates_ED)


def topk_softmax(scores_TE: Array, top_k: int) -> RouteOutput:
    """Keeps the k best scores per token and softmaxes over them, in float32.

    Equal scores are kept in order of expert index, lower first (``jax.lax.top_k``).

    Args:
      scores_TE: (..., E) router scores.
      top_k: k, 1 <= k <= E.

    Returns:
      RouteOutput with weights (..., k) float32, index (..., k) int32, scores (..., E) float32.
    """
    top_k = _check_top_k(top_k, np.shape(scores_TE)[-1])
    return _topk_softmax(scores_TE, top_k)


# Public functions validate in Python, then call one jitted core: eager calls run as a single
# cached computation instead of op by op, and calls under an outer jit simply inline it.
@functools.partial(jax.jit, static_argnames="top_k")
def _topk_softmax(scores_NE: Array, top_k: int) -> RouteOutput:
    scores_NE = scores_NE.astype(jnp.float32)
    kept_Nk, index_Nk = jax.lax.top_k(scores_NE, top_k)
    weights_Nk = jax.nn.softmax(kept_Nk, axis=-1)
    return RouteOutput(weights=weights_Nk, index=index_Nk.astype(jnp.int32), scores=scores_NE)


def phatgoose_scores(x_TD: Array, gates_ED: Array, *, gates_normed: bool = False) -> Array:
    """PHATGOOSE router scores ``ln(x) . ln(G)^T / sqrt(I)`` in float32.

    Args:
      x_TD: (..., I) site inputs, any float dtype.
      gates_ED: (E, I) gate vectors, or ``prepare_router(gates)`` with ``gates_normed=True``.
      gates_normed: whether ``gates_ED`` is already standardized.

    Returns:
      (..., E) float32 scores.
    """
    d_in = _check_x(x_TD)
    _check_vectors(gates_ED, d_in, "gate vectors")
    return _phatgoose_scores(x_TD, gates_ED, gates_normed)


@functools.partial(jax.jit, static_argnames="gates_normed")
def _phatgoose_scores(x_NI: Array, gates_EI: Array, gates_normed: bool) -> Array:
    gn_EI = gates_EI.astype(jnp.float32) if gates_normed else standardize(gates_EI)
    # ln(x) . g = ((x - mean) . g) / sqrt(var + eps): x is centred, the product taken, and the
    # per-token scale applied to the (..., E) scores, which saves writing and reading a scaled
    # copy of x (the scores measured 20-30 % faster on CPU; bench/README.md). Centring before
    # the product, rather than subtracting mean(x) * sum(g) after it, keeps near-constant inputs
    # exact: that correction cancels digits when |mean(x)| is large against x's spread.
    x_NI = x_NI.astype(jnp.float32)
    centered_NI = x_NI - jnp.mean(x_NI, axis=-1, keepdims=True)
    var_N1 = jnp.mean(centered_NI * centered_NI, axis=-1, keepdims=True)
    # HIGHEST keeps float32 matmuls exact on TPU, where the default uses bfloat16 passes: near
    # ties in the scores decide which experts win.
    dots_NE = jnp.einsum("...i,ei->...e", centered_NI, gn_EI, precision=jax.lax.Precision.HIGHEST)
    return dots_NE * (jax.lax.rsqrt(var_N1 + LN_EPS) / math.sqrt(x_NI.shape[-1]))


def phatgoose_route(
    x_TD: Array, gates_ED: Array, top_k: int = 2, *, gates_normed: bool = False,
) -> tuple[Array, Array]:
    """Routes every token to its top-k experts, PHATGOOSE style.

    Args:
      x_TD: (..., I) site inputs, any float dtype (routing runs in float32).
      gates_ED: (E, I) gate vectors, or their ``prepare_router`` form with ``gates_normed=True``.
      top_k: experts per token, 1 <= k <= E.
      gates_normed: whether ``gates_ED`` is already standardized.

    Returns:
      weights: (..., k) float32, softmax over the kept scores.
      index: (..., k) int32 expert indices, best first; ties go to the lower index.
    """
    scores = phatgoose_scores(x_TD, gates_ED, gates_normed=gates_normed)
    route = topk_softmax(scores, top_k)
    return route.weights, route.index


@jax.jit
def arrow_vectors(lora_a_EDR: Array, lora_b_ERO: Array) -> Array:
    """Arrow router vectors: each expert's top singular direction in input space.

    For ``delta_W = A @ B`` (I x O, applied as ``x @ delta_W``) this is the top left singular
    vector, found through a QR of A so that only an (R, O) SVD is needed. The sign is arbitrary,
    which Arrow's ``|x . u|`` ignores.

    Args:
      lora_a_EDR: (E, I, R).
      lora_b_ERO: (E, R, O).

    Returns:
      (E, I) float32 unit vectors.
    """
    q_EIR, r_ERR = jnp.linalg.qr(jnp.asarray(lora_a_EDR, jnp.float32))
    core_ERO = jnp.einsum("eij,ejo->eio", r_ERR, jnp.asarray(lora_b_ERO, jnp.float32))
    u_ERR, _, _ = jnp.linalg.svd(core_ERO, full_matrices=False)
    return jnp.einsum("eir,er->ei", q_EIR, u_ERR[:, :, 0])


def check_temperature(temperature) -> float | str:
    """An Arrow temperature as routing uses it: a finite float > 0, or ``"release"``.

    Raises:
      RoutingError: anything else (a bool, a non-positive or non-finite number, another word).
    """
    if temperature == RELEASE:
        return RELEASE
    if isinstance(temperature, (bool, str)) or not isinstance(temperature, (int, float,
                                                                               np.number)):
        raise RoutingError(f"Arrow temperature must be > 0 (a finite number) or {RELEASE!r}; "
                           f"found {temperature!r}")
    value = float(temperature)
    if not (math.isfinite(value) and value > 0):
        raise RoutingError(f"Arrow temperature must be > 0 (a finite number) or {RELEASE!r}; "
                           f"found {temperature!r}")
    return value


def arrow_temperature(temperature: float | Literal["release"], d_in: int) -> float:
    """The divisor of a site's Arrow scores: ``temperature``, or ``10 * sqrt(I)`` for
    ``"release"`` (the original release's ``Router.temperature`` and ``scaling_scores``)."""
    temperature = check_temperature(temperature)
    if temperature == RELEASE:
        return ARROW_RELEASE_TEMPERATURE * math.sqrt(d_in)
    return temperature


def arrow_scores(
    x_TD: Array, vectors_ED: Array, *, temperature: float | Literal["release"] = 1.0,
) -> Array:
    """Arrow scores ``|x . u| / temperature`` (x is not normalised), float32.

    Args:
      x_TD: (..., I) site inputs.
      vectors_ED: (E, I) router vectors (``arrow_vectors``).
      temperature: a positive divisor, or ``"release"`` for the original release's
        ``10 * sqrt(I)``. It changes the mixing weights, never which experts win.

    Returns:
      (..., E) float32 scores.
    """
    d_in = _check_x(x_TD)
    _check_vectors(vectors_ED, d_in, "Arrow router vectors")
    return _arrow_scores(x_TD, vectors_ED, arrow_temperature(temperature, d_in))


@jax.jit
def _arrow_scores(x_NI: Array, vectors_EI: Array, temperature: float) -> Array:
    dots_NE = jnp.einsum(
        "...i,ei->...e", x_NI.astype(jnp.float32), vectors_EI.astype(jnp.float32),
        precision=jax.lax.Precision.HIGHEST,
    )
    return jnp.abs(dots_NE) / temperature


def arrow_route(
    x_TD: Array, vectors_ED: Array, top_k: int = 2, *,
    temperature: float | Literal["release"] = 1.0,
) -> tuple[Array, Array]:
    """Arrow routing: top-k of ``|x . u| / temperature``, softmax over the kept scores.

    Args:
      x_TD: (..., I) site inputs.
      vectors_ED: (E, I) router vectors.
      top_k: experts per token.
      temperature: see ``arrow_scores``; 1.0 as in mttl, ``"release"`` as in the original code.

    Returns:
      weights (..., k) float32 and index (..., k) int32, as ``phatgoose_route``.
    """
    route = topk_softmax(arrow_scores(x_TD, vectors_ED, temperature=temperature), top_k)
    return route.weights, route.index


# ----------------------------------------------------------------------------------------------
# The routed LoRA sum.


def _check_combine(x, lora_a_EIR, lora_b_ERO, weights_Nk, index_Nk) -> None:
    x_shape, a_shape, b_shape = np.shape(x), np.shape(lora_a_EIR), np.shape(lora_b_ERO)
    w_shape, i_shape = np.shape(weights_Nk), np.shape(index_Nk)
    d_in = _check_x(x)
    if len(a_shape) != 3 or len(b_shape) != 3:
        raise RoutingError(
            f"expected lora_a (E, d_in, r) and lora_b (E, r, d_out); found shapes {a_shape} and "
            f"{b_shape}")
    if a_shape[0] == 0:
        raise RoutingError("the expert library is empty (E = 0); need at least 1 expert")
    if b_shape[0] != a_shape[0] or b_shape[1] != a_shape[2]:
        raise RoutingError(
            f"lora_b shape {b_shape} does not fit lora_a shape {a_shape}: expected "
            f"({a_shape[0]}, {a_shape[2]}, d_out)")
    if a_shape[1] != d_in:
        raise RoutingError(
            f"lora_a has d_in {a_shape[1]} but the site input x has d_in {d_in} "
            f"(a library for a different base model or site?)")
    if w_shape != i_shape:
        raise RoutingError(
            f"weights and index must have the same shape; found {w_shape} and {i_shape}")
    if len(i_shape) != len(x_shape) or i_shape[:-1] != x_shape[:-1] or i_shape[-1] < 1:
        raise RoutingError(
            f"expected weights/index of shape {x_shape[:-1] + ('k',)} for x of shape {x_shape}; "
            f"found {i_shape}")
    if not jnp.issubdtype(jnp.result_type(index_Nk), jnp.integer):
        raise RoutingError(f"index must be integer; found dtype {jnp.result_type(index_Nk)}")
    values = _concrete(index_Nk)
    if values is not None and values.size and (values.min() < 0 or values.max() >= a_shape[0]):
        raise RoutingError(
            f"expert index out of range: expected 0 <= index < {a_shape[0]}; found values from "
            f"{values.min()} to {values.max()}")


def combine_lora(
    x_TD: Array,
    lora_a_EDR: Array,
    lora_b_ERO: Array,
    weights_Tk: Array,
    index_Tk: Array,
    scale: float | Array,
    *,
    backend: str = "auto",
    precision: jax.lax.PrecisionLike = None,
    block_size: int | None = None,
) -> Array:
    """The routed LoRA sum ``sum_j w_j * (x A_{i_j}) B_{i_j} * scale`` for every token.

    Accumulates in float32 and returns x's dtype. Add the result to the base layer's output.

    Args:
      x_TD: (..., I) site inputs.
      lora_a_EDR: (E, I, R) stacked A (shrink) factors.
      lora_b_ERO: (E, R, O) stacked B (expand) factors.
      weights_Tk: (..., k) routing weights.
      index_Tk: (..., k) integer expert indices. Under a trace, index E (one past the stack)
        with weight 0 marks a choice that another device's slice of the library serves
        (``goose_jax.routing.expert_parallel``): every backend adds nothing for it (gathers clamp,
        scatters drop), and grouped gives it no rows of work.
      scale: LoRA scale (1 / r for PHATGOOSE experts); a Python float or a scalar array.
      backend: "auto", "dense", "gather", "grouped" or "ragged" (see ``routing_backends``).
      precision: matmul precision; None uses the platform default (on TPU, float32 matmuls then
        run in bfloat16 passes: pass ``jax.lax.Precision.HIGHEST`` for exact float32).
      block_size: rows per expert block of the "grouped" backend; None picks it from the shapes.

    Returns:
      (..., O) array in x's dtype.
    """
    _check_combine(x_TD, lora_a_EDR, lora_b_ERO, weights_Tk, index_Tk)
    if backend != "auto" and backend not in routing_backends.BACKENDS:
        raise RoutingError(
            f"unknown combine backend {backend!r}; expected 'auto' or one of "
            f"{sorted(routing_backends.BACKENDS)}")
    if block_size is not None and (isinstance(block_size, bool) or not isinstance(
            block_size, (int, np.integer)) or block_size < 1):
        raise RoutingError(f"block_size must be a positive int or None; found {block_size!r}")
    lead, top_k = np.shape(x_TD)[:-1], np.shape(index_Tk)[-1]
    if backend == "auto":
        backend = choose_backend(math.prod(lead), top_k, np.shape(lora_a_EDR)[0])
    return _combine_lora(
        x_TD, lora_a_EDR, lora_b_ERO, weights_Tk, index_Tk, scale,
        backend=backend, precision=precision,
        block_size=int(block_size) if backend == "grouped" and block_size else None,
    )


@functools.partial(jax.jit, static_argnames=("backend", "precision", "block_size"))
def _combine_lora(x, lora_a_EIR, lora_b_ERO, weights, index, scale, *, backend, precision,
                  block_size):
    lead, d_in = x.shape[:-1], x.shape[-1]
    d_out, top_k = lora_b_ERO.shape[-1], index.shape[-1]
    num_tokens = math.prod(lead)
    if num_tokens == 0:
        return jnp.zeros(lead + (d_out,), x.dtype)
    options = {"block_size": block_size} if block_size else {}
    y_NO = routing_backends.BACKENDS[backend](
        x.reshape(num_tokens, d_in), lora_a_EIR, lora_b_ERO,
        weights.reshape(num_tokens, top_k), index.reshape(num_tokens, top_k),
        jnp.asarray(scale, jnp.float32), precision=precision, **options,
    )
    return y_NO.reshape(lead + (d_out,)).astype(x.dtype)


# ----------------------------------------------------------------------------------------------
# Telemetry.


def route_stats(
    weights_Tk: Array, index_Tk: Array, num_experts: int, mask_T: Array | None = None,
) -> RouteStats:
    """Per-site routing telemetry, jit-able.

    Args:
      weights_Tk: (..., k) routing weights.
      index_Tk: (..., k) expert indices.
      num_experts: E (static).
      mask_T: optional (...) mask of tokens to count (padding excluded); all tokens if None.

    Returns:
      RouteStats; means are over counted tokens (0 when none is counted).
    """
    w_shape, i_shape = np.shape(weights_Tk), np.shape(index_Tk)
    if w_shape != i_shape or len(w_shape) < 1:
        raise RoutingError(
            f"weights and index must have the same shape (..., k); found {w_shape} and {i_shape}")
    if mask_T is not None and np.shape(mask_T) != w_shape[:-1]:
        raise RoutingError(
            f"mask must have shape {w_shape[:-1]} (weights without k); found {np.shape(mask_T)}")
    if isinstance(num_experts, bool) or not isinstance(num_experts, (int, np.integer)) or (
            num_experts < 1):
        raise RoutingError(f"num_experts must be a positive int; found {num_experts!r}")
    if mask_T is None:
        mask_T = jnp.ones(w_shape[:-1], jnp.float32)
    return _route_stats(weights_Tk, index_Tk, int(num_experts), mask_T)


@functools.partial(jax.jit, static_argnames="num_experts")
def _route_stats(weights_Nk, index_Nk, num_experts, mask_N) -> RouteStats:
    top_k = weights_Nk.shape[-1]
    weights_Nk = weights_Nk.astype(jnp.float32).reshape(-1, top_k)
    index_Nk = index_Nk.reshape(-1, top_k)
    mask_N = mask_N.reshape(-1).astype(jnp.float32)
    mask_Nk = jnp.broadcast_to(mask_N[:, None], weights_Nk.shape)
    counts_E = jnp.zeros((num_experts,), jnp.int32).at[index_Nk].add(mask_Nk.astype(jnp.int32))
    weight_E = jnp.zeros((num_experts,), jnp.float32).at[index_Nk].add(weights_Nk * mask_Nk)
    num_tokens = jnp.sum(mask_N)
    denom = jnp.maximum(num_tokens, 1.0)
    mean_weight_k = jnp.sum(weights_Nk * mask_Nk, axis=0) / denom
    # 0 * log 0 is 0: a kept expert with weight exactly 0 adds nothing to the entropy.
    plogp_Nk = jnp.where(weights_Nk > 0, weights_Nk * jnp.log(jnp.maximum(weights_Nk, 1e-30)), 0.0)
    entropy = jnp.sum(-jnp.sum(plogp_Nk, axis=-1) * mask_N) / denom
    return RouteStats(
        counts=counts_E, weight=weight_E, mean_weight=mean_weight_k, entropy=entropy,
        num_tokens=num_tokens,
    )
