"""The pieces of a decoder-only model every such family builds with: padding-aware positions,
the attention bias (causal, sliding window, padding), rotary embeddings, grouped-query attention
with its decoding cache, and the logits of a padded batch.

Shapes follow the package legend (the ``goose_jax`` module docstring). Also used here: Q and S,
the query and key lengths of an attention layer (S is the cache length when decoding), G the
key/value heads (each serves H // G = n query heads), F = K / 2 rotary frequencies.

Padding. A token's rotary position is the number of real tokens before it in its row
(``positions_from_mask``), so left and right padding give every real token the same position,
and the same logits, as an unpadded row; keys at padding are masked out.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from goose_jax.models.scan import stack_layers
from goose_jax.models.sites import resolve_adapter

Array = jax.Array
# Added to attention scores at masked keys; finite so that a query with no visible key (a
# padding query) stays finite.
MASKED = -1e9


def positions_from_mask(mask_BQ: Array) -> Array:
    """int32 (B, Q): each token's count of real tokens before it in its row (padding: 0)."""
    mask = mask_BQ.astype(jnp.int32)
    return jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0) * mask


def attention_bias(mask_BS: Array, q_len: int, start: Array | int = 0,
                   window: int | None = None) -> Array:
    """float32 (B, 1, 1, Q, S) additive bias: causal by slot, the sliding window, and padding.

    Query q sits at slot ``start + q``; key slot s is visible iff it is real (``mask_BS``), not
    after q, and (with a ``window`` W) after ``q - W``, transformers' window rule.
    """
    q_Q = jnp.arange(q_len, dtype=jnp.int32) + start
    s_S = jnp.arange(mask_BS.shape[1], dtype=jnp.int32)
    visible_QS = s_S[None, :] <= q_Q[:, None]
    if window is not None:
        visible_QS = visible_QS & (s_S[None, :] > q_Q[:, None] - window)
    visible_BQS = visible_QS[None] & mask_BS.astype(bool)[:, None, :]
    return jnp.where(visible_BQS, 0.0, MASKED).astype(jnp.float32)[:, None, None]


@functools.lru_cache(maxsize=32)
def default_inv_freq(theta: float, head_dim: int) -> np.ndarray:
    """The (F,) float32 inverse frequencies ``theta ** (-2f / K)`` in transformers' order of
    float32 operations (``modeling_rope_utils``'s default rope)."""
    K = head_dim
    exponent = np.arange(0, K, 2, dtype=np.int64).astype(np.float32) / np.float32(K)
    return (np.float32(1.0) / np.power(np.float32(theta), exponent)).astype(np.float32)


def rotary(inv_F: np.ndarray, positions_BQ: Array) -> tuple[Array, Array]:
    """cos and sin, each float32 (B, Q, K), of the rotary embedding at ``positions_BQ``."""
    angles_BQF = positions_BQ.astype(jnp.float32)[..., None] * jnp.asarray(inv_F)[None, None, :]
    angles_BQK = jnp.concatenate([angles_BQF, angles_BQF], axis=-1)
    return jnp.cos(angles_BQK), jnp.sin(angles_BQK)


def apply_rotary(x_BQHK: Array, cos_BQK: Array, sin_BQK: Array) -> Array:
    """Rotates the two halves of each head: ``x cos + rotate_half(x) sin`` (HF's layout, into
    which HF checkpoints' q and k are already permuted)."""
    half = x_BQHK.shape[-1] // 2
    rotated = jnp.concatenate([-x_BQHK[..., half:], x_BQHK[..., :half]], axis=-1)
    cos, sin = cos_BQK[:, :, None, :], sin_BQK[:, :, None, :]
    return (x_BQHK * cos.astype(x_BQHK.dtype) + rotated * sin.astype(x_BQHK.dtype))


def decode_cache(module: nn.Module, k_BQGK: Array, v_BQGK: Array, pos: Array, max_len: int,
                 dtype: Any) -> tuple[Array, Array]:
    """Writes the Q new keys and values at slots ``pos .. pos + Q - 1`` of ``module``'s
    (B, S, G, K) ``cache`` (S = ``max_len``, created at the first call) and returns the whole
    caches. Call inside the module's compact method."""
    B, _, G, K = k_BQGK.shape
    shape = (B, max_len, G, K)
    ck = module.variable("cache", "cached_key", jnp.zeros, shape, dtype)
    cv = module.variable("cache", "cached_value", jnp.zeros, shape, dtype)
    ck.value = jax.lax.dynamic_update_slice_in_dim(ck.value, k_BQGK, pos, axis=1)
    cv.value = jax.lax.dynamic_update_slice_in_dim(cv.value, v_BQGK, pos, axis=1)
    return ck.value, cv.value


def grouped_attention(q_BQHK: Array, k_BSGK: Array, v_BSGK: Array, bias: Array, scale: float,
                      compute: Any, softcap: float | None = None) -> Array:
    """Grouped-query attention, (B, Q, H * K): query head h = g * n + i reads key head g.

    Scores are ``scale * q . k`` in float32, soft-capped to ``softcap * tanh(s / softcap)``
    where given (Gemma 2), then ``bias`` (B, 1, 1, Q, S) is added and the softmax taken in
    float32; the weights are cast to ``compute`` for the values.
    """
    B, Q, H, K = q_BQHK.shape
    G = k_BSGK.shape[2]
    q_BQGnK = q_BQHK.reshape(B, Q, G, H // G, K)
    scores = jnp.einsum("bqgnk,bsgk->bgnqs", q_BQGnK, k_BSGK,
                        preferred_element_type=jnp.float32) * np.float32(scale)
    if softcap is not None:
        scores = np.float32(softcap) * jnp.tanh(scores / np.float32(softcap))
    probs = jax.nn.softmax(scores + bias, axis=-1).astype(compute)
    out_BQGnK = jnp.einsum("bgnqs,bsgk->bqgnk", probs, v_BSGK)
    return out_BQGnK.reshape(B, Q, H * K)


def softcap_logits(logits: Array, cap: float | None) -> Array:
    """``cap * tanh(logits / cap)`` (Gemma 2's final logits); ``logits`` when ``cap`` is None."""
    if cap is None:
        return logits
    return np.float32(cap) * jnp.tanh(logits / np.float32(cap))


def model_variables(cfg, params, collections) -> dict:
    """The variables a model runs with: ``params`` and the adapter's ``collections``, stacked
    along the layers when ``cfg.scan_layers`` (either layout is accepted; a stacked tree passes
    through unchanged, no copy)."""
    variables = {"params": params, **(collections or {})}
    return stack_layers(variables, cfg) if cfg.scan_layers else variables


@functools.partial(jax.jit, static_argnames=("model", "cfg", "adapter"))
def _logits(model, cfg, variables, ids_BT, mask_BT, adapter=None):
    return model(cfg, adapter).apply(variables, ids_BT, positions_from_mask(mask_BT), mask_BT)


def padded_logits(model: type, cfg, params, input_ids_BT, attention_mask_BT=None, *,
                  routing=None, adapter=None, collections: dict | None = None) -> Array:
    """float32 logits (B, T, V) of a (padded) batch through the decoder-only ``model`` class.

    Args:
      model: the family's model class.
      cfg: its config.
      params: the base parameter tree.
      input_ids_BT: (B, T) int tokens, padded on the left or the right.
      attention_mask_BT: (B, T) 1 for real tokens, 0 for padding; None means all real. Real
        tokens get the positions of their unpadded row (see module doc); the logits at padding
        are not meaningful.
      routing: a ``goose_jax.routing.methods.Routed`` (any routing method over an expert library).
      adapter: optional site adapter (LoRA, gates, routing).
      collections: extra variable collections the adapter reads (e.g. ``{"experts": ...}``).
    """
    adapter, collections = resolve_adapter(adapter, collections, routing)
    ids = jnp.asarray(input_ids_BT, jnp.int32)
    mask = (jnp.ones(ids.shape, jnp.int32) if attention_mask_BT is None
            else jnp.asarray(attention_mask_BT, jnp.int32))
    return _logits(model, cfg, model_variables(cfg, params, collections), ids, mask,
                   adapter=adapter)
