"""Backends that add the routed top-k LoRA products to a site's output.

Every backend computes, for each token n,

    y_n = scale * sum_j w_nj * (x_n @ A[i_nj]) @ B[i_nj]

from flat inputs, returns float32, and is jit-able with static shapes. They differ only in how the
work is laid out, which is what decides speed:

- ``dense``:   every expert's shrink for every token, weighted by an (N, E) matrix that is zero
               outside the top-k. E / k times the necessary work; simple and exact.
- ``gather``:  copies the k chosen experts' A and B for every token. Moves N*k*(I*R + R*O)
               numbers, so it only pays off for a handful of tokens (decoding).
- ``grouped``: sorts the N*k (token, expert) assignments by expert into a padded layout of
               fixed-size row blocks, each block owned by one expert, and runs batched matmuls
               over chunks of blocks in a ``lax.scan``. Work is N*k rows plus padding.
- ``ragged``:  the same sort, then ``jax.lax.ragged_dot`` (grouped matmul primitive; fast on
               TPU, lowered poorly by XLA on CPU).

Callers go through ``goose_jax.routing.formula.combine_lora``, which validates, flattens leading
axes and
picks a backend; this module trusts its inputs.

Shapes follow the package legend (the ``goose_jax`` module docstring); inputs are flat: x (N, I).
Also used here: A assignments (N * k), M row blocks, G blocks per scan step, S rows per block,
P padded rows (M * S). Measured: bench/README.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

Array = jax.Array

# Bytes of gathered input rows and output rows (I + O floats each) one scan step of the grouped
# backend works on, and the bounds on its rows. On XLA's CPU backend (YNNPACK dots) steps of about
# 3 MiB measured fastest on every T5-base site shape: 512 rows at 768 x 768, 256 at 768 x 2048
# and 2048 x 768; twice that measured the same or slower, and one whole-array step (no loop)
# 5-8x slower, the gathered and output rows then far outgrowing the caches (bench/README.md).
_STEP_BYTES = 3 << 20
_MIN_STEP_ROWS, _MAX_STEP_ROWS = 64, 512
# Sort keys ``expert * A + position`` must stay below this (int32); past it, argsort.
_SORT_KEY_LIMIT = 2**31
_MIN_BLOCK, _MAX_BLOCK = 8, 64


def _compute_dtype(x: Array, w: Array):
    # Matmul operands share one dtype (ragged_dot requires it); accumulation is float32 anyway.
    return jnp.promote_types(x.dtype, w.dtype)


def _weights_NE(weights_Nk: Array, index_Nk: Array, num_experts: int) -> Array:
    """Scatters the top-k weights into a dense (N, E) matrix; repeated experts add up."""
    one_hot_NkE = jax.nn.one_hot(index_Nk, num_experts, dtype=jnp.float32)
    return jnp.einsum("nk,nke->ne", weights_Nk.astype(jnp.float32), one_hot_NkE)


def combine_dense(x_NI, lora_a_EIR, lora_b_ERO, weights_Nk, index_Nk, scale, precision=None):
    """Dense masked combination: every expert's shrink for every token."""
    num_experts = lora_a_EIR.shape[0]
    dtype = _compute_dtype(x_NI, lora_a_EIR)
    h_NER = jnp.einsum(
        "ni,eir->ner", x_NI.astype(dtype), lora_a_EIR.astype(dtype),
        precision=precision, preferred_element_type=jnp.float32,
    )
    w_NE = _weights_NE(weights_Nk, index_Nk, num_experts) * scale
    return jnp.einsum(
        "ner,ero->no", h_NER * w_NE[:, :, None], lora_b_ERO.astype(jnp.float32),
        precision=precision,
    )


def combine_gather(x_NI, lora_a_EIR, lora_b_ERO, weights_Nk, index_Nk, scale, precision=None):
    """Per-token gather of the k chosen experts' A and B."""
    dtype = _compute_dtype(x_NI, lora_a_EIR)
    a_NkIR = lora_a_EIR.astype(dtype)[index_Nk]
    h_NkR = jnp.einsum(
        "ni,nkir->nkr", x_NI.astype(dtype), a_NkIR,
        precision=precision, preferred_element_type=jnp.float32,
    )
    h_NkR = h_NkR * (weights_Nk.astype(jnp.float32) * scale)[:, :, None]
    b_NkRO = lora_b_ERO.astype(jnp.float32)[index_Nk]
    return jnp.einsum("nkr,nkro->no", h_NkR, b_NkRO, precision=precision)


def grouped_block_size(num_tokens: int, top_k: int, num_experts: int, rank: int) -> int:
    """Rows per expert block for the grouped backend, a power of two in [8, 64].

    A block of S rows costs its S rows of x and output plus a copy of its expert's A and B
    (R rows each of the same widths), so with about n = N * k / E assignments per used expert
    the work is E * ceil(n / S) * (S + 2 R) row-equivalents; the smallest S of the least work
    is taken. At N * k = 4096 and R = 16 that is 64 at E = 36, 32 at E = 166 and 8 at
    E = 1000, the sizes that measured fastest at one site (bench/README.md).
    """
    used = max(min(num_experts, num_tokens * top_k), 1)
    per_expert = max(num_tokens * top_k, 1) / used
    sizes = [1 << p for p in range(_MIN_BLOCK.bit_length() - 1, _MAX_BLOCK.bit_length())]
    return min(sizes, key=lambda s: (math.ceil(per_expert / s) * (s + 2 * rank), s))


def grouped_step_rows(block_size: int, d_in: int, d_out: int) -> int:
    """Rows per scan step of the grouped backend: about ``_STEP_BYTES`` of float32 input and
    output rows, a power of two in [64, 512] and at least one block."""
    rows = _STEP_BYTES // (4 * (d_in + d_out))
    rows = 1 << max(rows, 1).bit_length() - 1
    return max(min(max(rows, _MIN_STEP_ROWS), _MAX_STEP_ROWS), block_size)


def sort_by_expert(index_Nk: Array, num_experts: int):
    """Stable sort of the flat assignments by expert: the flat expert ids, the order that sorts
    them, the sorted ids, and the per-expert counts.

    Where it fits in int32, one sort of the keys ``expert * A + position`` gives both the order
    and the sorted ids: on CPU, 0.15 ms for 4096 assignments against 0.53 ms for the
    two-operand sort of a stable ``argsort`` (bench/README.md). Ids up to E (``combine_lora``'s
    marker of a remote expert) are allowed.
    """
    expert_A = index_Nk.reshape(-1).astype(jnp.int32)
    num_assign = expert_A.shape[0]
    if (num_experts + 1) * num_assign <= _SORT_KEY_LIMIT:
        key_A = jnp.sort(expert_A * num_assign + jnp.arange(num_assign, dtype=jnp.int32))
        order_A, sorted_expert_A = key_A % num_assign, key_A // num_assign
    else:
        order_A = jnp.argsort(expert_A, stable=True)
        sorted_expert_A = expert_A[order_A]
    counts_E = jnp.bincount(expert_A, length=num_experts).astype(jnp.int32)
    return expert_A, order_A, sorted_expert_A, counts_E


def combine_grouped(
    x_NI, lora_a_EIR, lora_b_ERO, weights_Nk, index_Nk, scale, precision=None, block_size=None,
):
    """Blocked grouped matmul: assignments sorted by expert into one-expert row blocks.

    Each expert's group of assignments is padded up to a multiple of the block size S, so the
    padded layout has at most N*k + min(E, N*k) * (S - 1) rows whatever the routing: a static
    bound, hence static shapes, and exact results. Padding rows carry weight 0. A ``lax.scan``
    walks the blocks G at a time; each step gathers its rows of x and its blocks' A and B, runs
    two small batched matmuls and scatter-adds the rows into the (N, O) output. Steps past the
    last used block (the static bound assumes the worst padding) skip their work through
    ``lax.cond``; a scan with a static length, unlike a ``while_loop``, stays differentiable.

    Accumulating into the output in the loop, rather than writing every padded row out and
    gathering the k rows of each token afterwards, saves two passes over (rows x O) floats, which
    shows more in the whole model than at one site (bench/README.md). The k terms of a token are
    added in expert order; on GPU, XLA's scatter-add may add duplicates in any order, so results
    can differ there in the last float32 bits from run to run.
    """
    num_tokens, d_in = x_NI.shape
    num_experts, _, rank = lora_a_EIR.shape
    d_out = lora_b_ERO.shape[-1]
    top_k = index_Nk.shape[-1]
    num_assign = num_tokens * top_k
    size = block_size or grouped_block_size(num_tokens, top_k, num_experts, rank)
    max_rows = num_assign + min(num_experts, num_assign) * (size - 1)
    # Small inputs (decoding) take one step no longer than their bound.
    per_step = min(grouped_step_rows(size, d_in, d_out) // size, -(-max_rows // size))
    num_steps = -(-max_rows // (size * per_step))
    num_blocks = num_steps * per_step
    num_rows = num_blocks * size

    _, order_A, sorted_expert_A, counts_E = sort_by_expert(index_Nk, num_experts)
    padded_E = (counts_E + size - 1) // size * size
    padded_start_E = jnp.cumsum(padded_E) - padded_E
    start_E = jnp.cumsum(counts_E) - counts_E
    # Position in the padded layout of the i-th assignment in sorted order.
    row_sorted_A = (padded_start_E[sorted_expert_A] + jnp.arange(num_assign, dtype=jnp.int32)
                    - start_E[sorted_expert_A])
    token_P = jnp.zeros((num_rows,), jnp.int32).at[row_sorted_A].set(
        order_A.astype(jnp.int32) // top_k)
    weight_P = jnp.zeros((num_rows,), jnp.float32).at[row_sorted_A].set(
        weights_Nk.reshape(-1).astype(jnp.float32)[order_A] * scale)
    # Groups are padded to whole blocks, so each block lies inside one expert's group. Marking
    # each group's first block and counting marks gives the owner of every block (an empty group
    # shares its mark position with the next group, which then wins). Blocks past the last group
    # are all padding and may use any expert.
    first_block_E = padded_start_E // size
    marks_M = jnp.zeros((num_blocks,), jnp.int32).at[first_block_E].add(1, mode="drop")
    expert_M = jnp.clip(jnp.cumsum(marks_M) - 1, 0, num_experts - 1)
    used_steps = (jnp.sum(padded_E) + size * per_step - 1) // (size * per_step)

    dtype = _compute_dtype(x_NI, lora_a_EIR)
    x_NI = x_NI.astype(dtype)
    lora_a_EIR = lora_a_EIR.astype(dtype)
    lora_b_ERO = lora_b_ERO.astype(jnp.float32)

    def work(y_NO, token_GS, expert_G, weight_GS):
        h_GSR = jnp.einsum(
            "gsi,gir->gsr", x_NI[token_GS], lora_a_EIR[expert_G],
            precision=precision, preferred_element_type=jnp.float32,
        )
        h_GSR = h_GSR * weight_GS[:, :, None]
        y_GSO = jnp.einsum("gsr,gro->gso", h_GSR, lora_b_ERO[expert_G], precision=precision)
        # Padding rows add 0 to token 0.
        return y_NO.at[token_GS.reshape(-1)].add(y_GSO.reshape(-1, d_out))

    def step(y_NO, inputs):
        i, token_GS, expert_G, weight_GS = inputs
        y_NO = jax.lax.cond(i < used_steps, work, lambda y, *_: y,
                            y_NO, token_GS, expert_G, weight_GS)
        return y_NO, None

    y_NO = jnp.zeros((num_tokens, d_out), jnp.float32)
    steps = (
        token_P.reshape(num_steps, per_step, size),
        expert_M.reshape(num_steps, per_step),
        weight_P.reshape(num_steps, per_step, size),
    )
    if num_steps == 1:  # small inputs (decoding): skip the loop, which also compiles faster
        return work(y_NO, *jax.tree.map(lambda a: a[0], steps))
    y_NO, _ = jax.lax.scan(step, y_NO, (jnp.arange(num_steps),) + steps)
    return y_NO


def combine_ragged(x_NI, lora_a_EIR, lora_b_ERO, weights_Nk, index_Nk, scale, precision=None):
    """Sorted assignments through ``jax.lax.ragged_dot`` (no padding)."""
    num_tokens, _ = x_NI.shape
    num_experts = lora_a_EIR.shape[0]
    d_out = lora_b_ERO.shape[-1]
    top_k = index_Nk.shape[-1]
    _, order_A, _, counts_E = sort_by_expert(index_Nk, num_experts)
    dtype = _compute_dtype(x_NI, lora_a_EIR)
    x_AI = x_NI.astype(dtype)[order_A // top_k]
    h_AR = jax.lax.ragged_dot(
        x_AI, lora_a_EIR.astype(dtype), counts_E,
        precision=precision, preferred_element_type=jnp.float32,
    )
    h_AR = h_AR * (weights_Nk.reshape(-1).astype(jnp.float32) * scale)[order_A][:, None]
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

    - ``dense`` while E <= 8: computing every expert costs E / k times the needed LoRA work,
      which is still small, and it is one plain matmul pair (at E = 8 the two measured within
      10 % of each other, dense ahead before grouped's current block and step rule and
      grouped once after it; grouped is clearly faster from E = 16).
    - ``gather`` while there are no more assignments than experts (N * k <= E, i.e. decoding a
      small batch): copying k experts per token moves less than one copy of the library, and
      grouped's padding (up to E blocks) would dominate; at the boundary the two measured alike.
    - otherwise ``grouped``, except on TPU, where ``ragged`` (``jax.lax.ragged_dot``, the
      grouped-matmul primitive with native TPU kernels) is used; on CPU ragged_dot lowers
      poorly. TPU and GPU have not been measured; GPU follows the CPU rule.

    Measured: bench/README.md (``bench/routing_site.py``).
    """
    platform = platform or jax.default_backend()
    if num_experts <= 8:
        return "dense"
    if num_tokens * top_k <= num_experts:
        return "gather"
    return "ragged" if platform == "tpu" else "grouped"
