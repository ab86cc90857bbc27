"""The softmax attention core: every head's scores, softmax and weighted values.

Shapes follow the package legend (the ``goose_jax`` module docstring); Q and S are the query
and key lengths, G the batch rows of one step. The layout and the batch steps were chosen on
XLA's CPU backend, where they made T5-base's attention about 4x faster (bench/README.md,
``bench/t5_forward.py``); other backends run the whole batch in one step.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array

# Attention scores per head that one step of the CPU attention computes (``attention_rows``).
CPU_SCORES_PER_HEAD = 2 * 128 * 128


def attention_rows(B: int, Q: int, S: int) -> int:
    """Batch rows per step of ``attend``: all B except on XLA's CPU backend, where steps of
    about ``CPU_SCORES_PER_HEAD`` scores a head keep each step's scores in cache through the
    softmax (a power of two dividing B)."""
    if jax.default_backend() != "cpu" or B * Q * S <= CPU_SCORES_PER_HEAD:
        return B
    rows = 1
    while rows * 2 * Q * S <= CPU_SCORES_PER_HEAD and B % (rows * 2) == 0:
        rows *= 2
    return rows


def _attend_rows(q_BQHK: Array, k_BSHK: Array, v_BSHK: Array, bias_BHQS: Array,
                 compute: Any) -> Array:
    # Both products with heads before positions: XLA's CPU backend lowers the positions-major
    # einsums (bqhk,bshk->bhqs and bhqs,bshk->bqhk) to a second product whose output comes out
    # (B, H, K, Q), and the attention ran 3-4x slower that way at T5-base sizes.
    q_BHQK, k_BHSK, v_BHSK = (t.transpose(0, 2, 1, 3) for t in (q_BQHK, k_BSHK, v_BSHK))
    scores_BHQS = jnp.einsum("bhqk,bhsk->bhqs", q_BHQK, k_BHSK,
                             preferred_element_type=jnp.float32) + bias_BHQS
    probs_BHQS = jax.nn.softmax(scores_BHQS, axis=-1).astype(compute)
    out_BHQK = jnp.einsum("bhqs,bhsk->bhqk", probs_BHQS, v_BHSK)
    return out_BHQK.transpose(0, 2, 1, 3)


def attend(q_BQHK: Array, k_BSHK: Array, v_BSHK: Array, bias_BHQS: Array,
           compute: Any) -> Array:
    """Softmax attention of every head, (B, Q, H, K) contexts; scores and softmax in float32.

    ``bias_BHQS`` broadcasts to (B, H, Q, S). On XLA's CPU backend long sequences run a few
    batch rows a step (``attention_rows``), about 1.3x less work than the whole batch at once
    at T5-base sizes (bench/README.md).
    """
    B, Q = q_BQHK.shape[:2]
    G = attention_rows(B, Q, k_BSHK.shape[1])
    if G == B:
        return _attend_rows(q_BQHK, k_BSHK, v_BSHK, bias_BHQS, compute)
    rows_bias = bias_BHQS.shape[0] == B  # else one bias for every row

    def split(t):
        return t.reshape(B // G, G, *t.shape[1:])

    def step(args):
        q_GQHK, k_GSHK, v_GSHK, bias = args
        return _attend_rows(q_GQHK, k_GSHK, v_GSHK, bias if rows_bias else bias_BHQS, compute)

    out = jax.lax.map(step, (split(q_BQHK), split(k_BSHK), split(v_BSHK),
                             split(bias_BHQS) if rows_bias else None))
    return out.reshape(q_BQHK.shape)
