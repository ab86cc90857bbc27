"""Backends that add the routed top-k LoRA products to a site's output.

Every backend computes, for each token t,

    y_t = scale * sum_j w_tj * (x_t @ A[i_tj]) @ B[i_tj]

from flat inputs, returns float32, and is jit-able with static shapes. They differ only in how the
work is laid out, which is what decides speed:

- ``dense``:   every expert's shrink for every token, weighted by a (T, E) matrix that is zero
               outside the top-k. E / k times the necessary work; simple and exact.
- ``gather``:  copies the k chosen experts' A and B for every token. Moves T*k*(D*R + R*O)
               numbers, so it only pays off for a handful of tokens (decoding).
- ``grouped``: sorts the T*k (token, expert) assignments by expert into a padded layout of
               fixed-size row blocks, each block owned by one expert, and runs batched matmuls
               over chunks of blocks in a ``lax.scan``. Work is T*k rows plus padding.
- ``ragged``:  the same sort, then ``jax.lax.ragged_dot`` (grouped matmul primitive; fast on
               TPU, lowered poorly by XLA on CPU).

Callers go through ``goose_jax.routing.combine_lora``, which validates, flattens leading axes and
picks a backend; this module trusts its inputs.

Legend: T tokens, D d_in, O d_out, E experts, R LoRA rank, k top-k, N row blocks,
C blocks per scan step, S block size (rows), P padded rows (N * S).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

Array = jax.Array

# Rows handled per scan step in the grouped backend. Measured on a 2-core CPU at T=2048, D=O=768:
# 64 to 256 rows per step were within noise of each other; whole-array batched matmuls (one step)
# were about 1.5x slower, because the gathered rows, weights and outputs no longer stay in cache.
_ROWS_PER_STEP = 128
_MIN_BLOCK, _MAX_BLOCK = 8, 64


def _compute_dtype(x: Array, w: Array):
    # Matmul operands share one dtype (ragged_dot requires it); accumulation is float32 anyway.
    return jnp.promote_types(x.dtype, w.dtype)


def _weights_TE(weights_Tk: Array, index_Tk: Array, num_experts: int) -> Array:
    """Scatters the top-k weights into a dense (T, E) matrix; repeated experts add up."""
    one_hot_TkE = jax.nn.one_hot(index_Tk, num_experts, dtype=jnp.float32)
    return jnp.einsum("tk,tke->te", weights_Tk.astype(jnp.float32), one_hot_TkE)


def combine_dense(x_TD, lora_a_EDR, lora_b_ERO, weights_Tk, index_Tk, scale, precision=None):
    """Dense masked combination: every expert's shrink for every token."""
    num_experts = lora_a_EDR.shape[0]
    dtype = _compute_dtype(x_TD, lora_a_EDR)
    h_TER = jnp.einsum(
        "td,edr->ter", x_TD.astype(dtype), lora_a_EDR.astype(dtype),
        precision=precision, preferred_element_type=jnp.float32,
    )
    w_TE = _weights_TE(weights_Tk, index_Tk, num_experts) * scale
    return jnp.einsum(
        "ter,ero->to", h_TER * w_TE[:, :, None], lora_b_ERO.astype(jnp.float32),
        precision=precision,
    )


def combine_gather(x_TD, lora_a_EDR, lora_b_ERO, weights_Tk, index_Tk, scale, precision=None):
    """Per-token gather of the k chosen experts' A and B."""
    dtype = _compute_dtype(x_TD, lora_a_EDR)
    a_TkDR = lora_a_EDR.astype(dtype)[index_Tk]
    h_TkR = jnp.einsum(
        "td,tkdr->tkr", x_TD.astype(dtype), a_TkDR,
        precision=precision, preferred_element_type=jnp.float32,
    )
    h_TkR = h_TkR * (weights_Tk.astype(jnp.float32) * scale)[:, :, None]
    b_TkRO = lora_b_ERO.astype(jnp.float32)[index_Tk]
    return jnp.einsum("tkr,tkro->to", h_TkR, b_TkRO, precision=precision)


def grouped_block_size(num_tokens: int, top_k: int, num_experts: int, rank: int) -> int:
    """Rows per expert block for the grouped backend, a power of two in [8, 64].

    Padding costs about E * S rows of work and gathering each block's weights about
    (T * k / S) * R rows' worth, so the sum is smallest near S = sqrt(T * k * R / E). On CPU the
    best measured size sat at half that (S=8 at E=166 and S=16 at E=36 for T=2048, R=16): small
    blocks keep each step's working set in cache.
    """
    ideal = 0.5 * math.sqrt(max(num_tokens * top_k, 1) * rank / num_experts)
    size = 1 << max(int(math.floor(math.log2(max(ideal, 1.0)))), 0)
    return int(min(max(size, _MIN_BLOCK), _MAX_BLOCK))


def _sort_by_expert(index_Tk: Array, num_experts: int):
    """Stable sort of the flat assignments by expert, with per-expert counts and offsets."""
    expert_A = index_Tk.reshape(-1).astype(jnp.int32)
    order_A = jnp.argsort(expert_A, stable=True)
    counts_E = jnp.bincount(expert_A, length=num_experts).astype(jnp.int32)
    return expert_A, order_A, counts_E


def combine_grouped(
    x_TD, lora_a_EDR, lora_b_ERO, weights_Tk, index_Tk, scale, precision=None, block_size=None,
):
    """Blocked grouped matmul: assignments sorted by expert into one-expert row blocks.

    Each expert's group of assignments is padded up to a multiple of the block size S, so the
    padded layout has at most T*k + min(E, T*k) * (S - 1) rows whatever the routing: a static
    bound, hence static shapes, and exact results. Padding rows carry weight 0. A ``lax.scan``
    walks the blocks C at a time; each step gathers its rows of x and its blocks' A and B, runs
    two small batched matmuls and scatter-adds the rows into the (T, O) output. Steps past the
    last used block (the static bound assumes the worst padding) skip their work through
    ``lax.cond``; a scan with a static length, unlike a ``while_loop``, stays differentiable.

    Accumulating into the output in the loop, rather than writing every padded row out and
    gathering the k rows of each token afterwards, saves two passes over (rows x O) floats
    (measurements in ``goose_jax/routing.py``). The k terms of a token are added in expert
    order; on GPU, XLA's scatter-add may add duplicates in any order, so results can differ
    there in the last float32 bits from run to run.
    """
    num_tokens, _ = x_TD.shape
    num_experts, _, rank = lora_a_EDR.shape
    d_out = lora_b_ERO.shape[-1]
    top_k = index_Tk.shape[-1]
    num_assign = num_tokens * top_k
    size = block_size or grouped_block_size(num_tokens, top_k, num_experts, rank)
    per_step = max(1, _ROWS_PER_STEP // size)
    max_rows = num_assign + min(num_experts, num_assign) * (size - 1)
    num_steps = -(-max_rows // (size * per_step))
    num_blocks = num_steps * per_step
    num_rows = num_blocks * size

    expert_A, order_A, counts_E = _sort_by_expert(index_Tk, num_experts)
    padded_E = (counts_E + size - 1) // size * size
    padded_start_E = jnp.cumsum(padded_E) - padded_E
    start_E = jnp.cumsum(counts_E) - counts_E
    sorted_expert_A = expert_A[order_A]
    # Position in the padded layout of the i-th assignment in sorted order.
    row_sorted_A = (padded_start_E[sorted_expert_A] + jnp.arange(num_assign, dtype=jnp.int32)
                    - start_E[sorted_expert_A])
    token_P = jnp.zeros((num_rows,), jnp.int32).at[row_sorted_A].set(
        order_A.astype(jnp.int32) // top_k)
    weight_P = jnp.zeros((num_rows,), jnp.float32).at[row_sorted_A].set(
        weights_Tk.reshape(-1).astype(jnp.float32)[order_A] * scale)
    # Groups are padded to whole blocks, so each block lies inside one expert's group. Marking
    # each group's first block and counting marks gives the owner of every block (an empty group
    # shares its mark position with the next group, which then wins). Blocks past the last group
    # are all padding and may use any expert.
    first_block_E = padded_start_E // size
    marks_N = jnp.zeros((num_blocks,), jnp.int32).at[first_block_E].add(1, mode="drop")
    expert_N = jnp.clip(jnp.cumsum(marks_N) - 1, 0, num_experts - 1)
    used_steps = (jnp.sum(padded_E) + size * per_step - 1) // (size * per_step)

    dtype = _compute_dtype(x_TD, lora_a_EDR)
    x_TD = x_TD.astype(dtype)
    lora_a_EDR = lora_a_EDR.astype(dtype)
    lora_b_ERO = lora_b_ERO.astype(jnp.float32)

    def work(y_TO, token_CS, expert_C, weight_CS):
        h_CSR = jnp.einsum(
            "csd,cdr->csr", x_TD[token_CS], lora_a_EDR[expert_C],
            precision=precision, preferred_element_type=jnp.float32,
        )
        h_CSR = h_CSR * weight_CS[:, :, None]
        y_CSO = jnp.einsum("csr,cro->cso", h_CSR, lora_b_ERO[expert_C], precision=precision)
        # Padding rows add 0 to token 0.
        return y_TO.at[token_CS.reshape(-1)].add(y_CSO.reshape(-1, d_out))

    def step(y_TO, inputs):
        i, token_CS, expert_C, weight_CS = inputs
        y_TO = jax.lax.cond(i < used_steps, work, lambda y, *_: y,
                            y_TO, token_CS, expert_C, weight_CS)
        return y_TO, None

    y_TO = jnp.zeros((num_tokens, d_out), jnp.float32)
    steps = (
        token_P.reshape(num_steps, per_step, size),
        expert_N.reshape(num_steps, per_step),
        weight_P.reshape(num_steps, per_step, size),
    )
    if num_steps == 1:  # small inputs (decoding): skip the loop, which also compiles faster
        return work(y_TO, *jax.tree.map(lambda a: a[0], steps))
    y_TO, _ = jax.lax.scan(step, y_TO, (jnp.arange(num_steps),) + steps)
    return y_TO


def combine_ragged(x_TD, lora_a_EDR, lora_b_ERO, weights_Tk, index_Tk, scale, precision=None):
    """Sorted assignments through ``jax.lax.ragged_dot`` (no padding)."""
    num_tokens, _ = x_TD.shape
    num_experts = lora_a_EDR.shape[0]
    d_out = lora_b_ERO.shape[-1]
    top_k = index_Tk.shape[-1]
    _, order_A, counts_E = _sort_by_expert(index_Tk, num_experts)
    dtype = _compute_dtype(x_TD, lora_a_EDR)
    x_AD = x_TD.astype(dtype)[order_A // top_k]
    h_AR = jax.lax.ragged_dot(
        x_AD, lora_a_EDR.astype(dtype), counts_E,
        precision=precision, preferred_element_type=jnp.float32,
    )
    h_AR = h_AR * (weights_Tk.reshape(-1).astype(jnp.float32) * scale)[order_A][:, None]
    y_AO = jax.lax.ragged_dot(
        h_AR, lora_b_ERO.astype(jnp.float32), counts_E,
        precision=precision, preferred_element_type=jnp.float32,
    )
    num_assign = num_tokens * top_k
    inverse_A = jnp.zeros((num_assign,), jnp.int32).at[order_A].set(
        jnp.arange(num_assign, dtype=jnp.int32))
    return y_AO[inverse_A].reshape(num_tokens, top_k, d_out).sum(axis=1)


BACKENDS: dict[str, Callable[..., Array]] = {
    "dense": combine_dense,
    "gather": combine_gather,
    "grouped": combine_grouped,
    "ragged": combine_ragged,
}


def choose_backend(
    num_tokens: int, top_k: int, num_experts: int, platform: str | None = None,
) -> str:
    """The backend ``combine_lora(..., backend="auto")`` uses for these sizes.

    Measured with ``bench/routing_site.py`` on a 2-core CPU (D = O = 768, R = 16, k = 2; combine
    time over the site's base matmul time, medians; the table is in ``goose_jax/routing.py``):

    - ``dense`` while E <= 8: computing every expert costs E / k times the needed LoRA work,
      which is still small, and it is one plain matmul pair. At T = 2048: E = 8 dense 0.35x,
      grouped 0.46x; E = 16 grouped 0.45x, dense 0.70x.
    - ``gather`` while there are no more assignments than experts (T * k <= E, i.e. decoding a
      small batch): copying k experts per token moves less than one copy of the library, and
      grouped's padding (up to E blocks) would dominate. T = 8, E = 166: gather 0.66x, grouped
      1.34x; T = 64, E = 166 (the boundary): gather 1.38x, grouped 1.35x.
    - otherwise ``grouped`` (T = 2048, E = 166: 0.46x against dense 5.6x, gather 2.9x, ragged
      34x), except on TPU, where ``ragged`` (``jax.lax.ragged_dot``, the grouped-matmul
      primitive with native TPU kernels) is used. TPU and GPU have not been measured; GPU
      follows the CPU rule.
    """
    platform = platform or jax.default_backend()
    if num_experts <= 8:
        return "dense"
    if num_tokens * top_k <= num_experts:
        return "gather"
    return "ragged" if platform == "tpu" else "grouped"
