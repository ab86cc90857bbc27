"""Greedy generation for the decoder-only family, with a key/value cache, jitted with static
shapes.

Shapes follow the package legend (the ``goose_jax`` module docstring); S = L + T the cache slots.

Every prompt is first left-aligned (its padding moved to the front, the order of its real tokens
kept), so that all rows end at slot L - 1 and every generated token of every row goes to the same
slot L + i: one ``dynamic_update_slice`` per step, no per-row scatter. Positions stay those of the
unpadded row (``decoder.positions_from_mask``), so left and right padding generate the same
tokens. The prompt runs once through the model, filling slots 0 .. L - 1 of the cache; then each
step feeds one token per row inside a ``jax.lax.while_loop`` that ends when every row has emitted
EOS or T tokens exist.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from goose_jax.config import FAST_COMPILE_OPTIONS
from goose_jax.decoder import Decoder, _variables, positions_from_mask
from goose_jax.decoder_config import DecoderConfig
from goose_jax.errors import ConfigError
from goose_jax.t5 import Adapter, _resolve

Array = jax.Array


def left_align(ids_BL: Array, mask_BL: Array) -> tuple[Array, Array]:
    """Moves each row's padding to its front, keeping the order of its real tokens."""
    order_BL = jnp.argsort(mask_BL != 0, axis=-1, stable=True)
    return (jnp.take_along_axis(ids_BL, order_BL, axis=-1),
            jnp.take_along_axis(mask_BL, order_BL, axis=-1))


def _generate_impl(cfg, variables, ids_BL, mask_BL, max_new_tokens, adapter=None):
    model = Decoder(cfg, adapter)
    ids_BL, mask_BL = left_align(ids_BL, mask_BL)
    B, L = ids_BL.shape
    T = max_new_tokens
    S = L + T
    # Generated slots are real keys; those not yet written are hidden by the causal rule.
    cache_mask_BS = jnp.concatenate([mask_BL, jnp.ones((B, T), mask_BL.dtype)], axis=1)
    eos = -1 if cfg.eos_token_id is None else cfg.eos_token_id

    logits_BLV, state = model.apply(variables, ids_BL, positions_from_mask(mask_BL),
                                    cache_mask_BS, decode=True, max_len=S, mutable=["cache"])
    tok_B = jnp.argmax(logits_BLV[:, -1], axis=-1).astype(jnp.int32)
    next_pos_B = jnp.sum(mask_BL != 0, axis=-1).astype(jnp.int32)
    out_BT = jnp.zeros((B, T), jnp.int32).at[:, 0].set(tok_B)
    done_B = tok_B == eos

    def cond(carry):
        i, _, _, _, done_B = carry
        return (i < T) & ~jnp.all(done_B)

    def body(carry):
        i, out_BT, cache, tok_B, done_B = carry
        logits_B1V, mutated = model.apply({**variables, "cache": cache}, tok_B[:, None],
                                          (next_pos_B + i - 1)[:, None], cache_mask_BS,
                                          decode=True, max_len=S, mutable=["cache"])
        new_B = jnp.argmax(logits_B1V[:, -1], axis=-1).astype(jnp.int32)
        new_B = jnp.where(done_B, cfg.pad_token_id, new_B)
        out_BT = jax.lax.dynamic_update_slice_in_dim(out_BT, new_B[:, None], i, axis=1)
        return i + 1, out_BT, mutated["cache"], new_B, done_B | (new_B == eos)

    carry = (jnp.asarray(1, jnp.int32), out_BT, state["cache"], tok_B, done_B)
    return jax.lax.while_loop(cond, body, carry)[1]


_STATIC = ("cfg", "max_new_tokens", "adapter")
_generate = jax.jit(_generate_impl, static_argnames=_STATIC)
_generate_fast = jax.jit(_generate_impl, static_argnames=_STATIC,
                         compiler_options=FAST_COMPILE_OPTIONS)


def generate_decoder_greedy(cfg: DecoderConfig, params, input_ids_BL, max_new_tokens: int,
                            attention_mask_BL=None, *, routing=None,
                            adapter: Adapter | None = None, collections: dict | None = None,
                            fast_compile: bool = False) -> Array:
    """Greedy continuation of (padded) prompts, equal to HF ``generate(do_sample=False)``.

    Args:
      cfg: the model config.
      params: the base parameter tree.
      input_ids_BL: (B, L) int prompts, padded on either side (see module doc).
      max_new_tokens: T, the most tokens generated per row.
      attention_mask_BL: (B, L) 1 for real tokens, 0 for padding; None means all real.
      routing: a ``goose_jax.routers.Routed`` (any routing method over an expert library).
      adapter: optional site adapter (LoRA, gates, routing).
      collections: extra variable collections the adapter reads.
      fast_compile: compile with ``config.FAST_COMPILE_OPTIONS``.

    Returns:
      int32 (B, T): the new tokens only; a row stops at its ``cfg.eos_token_id`` and is padded
      with ``cfg.pad_token_id`` after it (as HF pads finished rows).
    """
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    adapter, collections = _resolve(adapter, collections, routing)
    ids = jnp.asarray(input_ids_BL, jnp.int32)
    mask = (jnp.ones(ids.shape, jnp.int32) if attention_mask_BL is None
            else jnp.asarray(attention_mask_BL, jnp.int32))
    run = _generate_fast if fast_compile else _generate
    return run(cfg, _variables(params, collections), ids, mask, max_new_tokens,
               adapter=adapter)
