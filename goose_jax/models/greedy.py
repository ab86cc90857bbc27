"""The greedy decoding loop every model family's generation runs, jitted with static shapes.

A family supplies its first step (prompt processing) and a ``step`` function over its own cache;
the loop feeds each row's last token, stops a row at EOS, pads after it, and carries the routing
telemetry counts and each row's finiteness. Shapes follow the package legend (the ``goose_jax``
module docstring).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from goose_jax.core.errors import NonFiniteError

Array = jax.Array


def greedy_loop(step, cache, tok_B, finite_B, counts, real_B, max_new_tokens: int, eos_id: int,
                pad_id: int):
    """The greedy decoding loop of every model family, from its first new token on.

    Args:
      step: ``step(cache, tok_B, i, count_B) -> (new_B, cache, counts, finite_B)`` feeds each
        row's token i - 1 and returns its argmax successor, the cache, the step's telemetry
        counts and whether each row's logits were finite; ``count_B`` says which rows count
        the fed token (real rows that have not finished).
      cache, tok_B, finite_B, counts: after the first token (B,): the cache, the token, its
        finiteness and the counts so far.
      real_B: (B,) rows that hold a real input (batch padding rows do not).
      max_new_tokens: T.
      eos_id, pad_id: a row stops at ``eos_id`` and is padded with ``pad_id`` after it.

    Returns:
      (tokens (B, T) int32, counts, (B,) whether each real row's logits stayed finite; batch
      padding rows may hold anything and read True).
    """
    B, T = tok_B.shape[0], max_new_tokens
    out_BT = jnp.zeros((B, T), jnp.int32).at[:, 0].set(tok_B)
    done_B = tok_B == eos_id

    def cond(state):
        i, _, _, _, done_B, _, _ = state
        return (i < T) & ~jnp.all(done_B)

    def body(state):
        i, out_BT, cache, tok_B, done_B, counts, finite_B = state
        # A row counts this step's token only while it has not finished.
        new_B, cache, step_counts, step_finite_B = step(cache, tok_B, i, real_B & ~done_B)
        finite_B = finite_B & (step_finite_B | done_B)
        counts = {s: c + step_counts[s] if s in step_counts else c for s, c in counts.items()}
        new_B = jnp.where(done_B, pad_id, new_B)
        out_BT = jax.lax.dynamic_update_slice_in_dim(out_BT, new_B[:, None], i, axis=1)
        return i + 1, out_BT, cache, new_B, done_B | (new_B == eos_id), counts, finite_B

    state = (jnp.asarray(1, jnp.int32), out_BT, cache, tok_B, done_B, counts, finite_B)
    state = jax.lax.while_loop(cond, body, state)
    return state[1], state[5], state[6] | ~real_B


def greedy_result(tokens_BT: Array, counts: dict, finite_B: Array, *, telemetry: bool,
                  check_finite: bool):
    """What every family's greedy generation returns from ``greedy_loop``'s result: the tokens,
    with ``telemetry`` the pair (tokens, counts).

    Raises:
      NonFiniteError: with ``check_finite``, when the logits of a real row became NaN or inf
        before it finished (argmax over NaN would quietly emit token 0); waits for the result.
    """
    if check_finite and not bool(jnp.all(finite_B)):
        bad = int(jnp.sum(~finite_B))
        raise NonFiniteError(f"greedy generation: the logits of {bad} of {finite_B.shape[0]} rows "
                             "became NaN or inf (non-finite or overflowing weights in the base "
                             "model or the adapter, or a dtype too narrow)")
    return (tokens_BT, counts) if telemetry else tokens_BT
