"""The decoder-only family in Flax Linen: Llama (1-3.x), Qwen2, Mistral.

Shapes follow the package legend (the ``goose_jax`` module docstring). Also used here: Q and S,
the query and key lengths of an attention layer (S is the cache length when decoding), G the
key/value heads (grouped-query attention: each serves H // G = n query heads), J = H * K.

Every linear layer is a ``Linear`` *site* named by its scope path, as in
``goose_jax.models.t5.model``:
``layers_3/self_attn/q|k|v|o`` and ``layers_3/mlp/gate|up|down``. A site computes
``y = x @ kernel (+ bias)`` and hands ``(module, x, y)`` to the model's ``adapter``; the adapters
of ``goose_jax.experts.lora`` (LoRA, gates) and ``goose_jax.routing.methods`` (routing) read
their own variable collections at the same scope path and plug in unchanged.

The numerics follow transformers' ``LlamaForCausalLM`` (and Qwen2, Mistral): pre-norm blocks
with RMSNorm (statistics in float32, the scale applied after casting back, as HF does), rotary
position embeddings on the two halves of each head (HF's ``rotate_half`` layout, into which HF
checkpoints are already permuted), attention scaled by ``K ** -0.5`` with the softmax in
float32, a SwiGLU feed-forward ``down(silu(gate(x)) * up(x))``, a final RMSNorm and a tied or
untied head.

Padding, positions, the attention bias and the grouped-query attention core are those of every
decoder-only family (``goose_jax.models.causal.model``); the shared layers are
``goose_jax.models.layers``.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from goose_jax.models import layers
from goose_jax.models.causal.model import (
    apply_rotary,
    attention_bias,
    decode_cache,
    default_inv_freq,
    grouped_attention,
    padded_logits,
    rotary,
)
from goose_jax.models.layers import Embedding, Head, Linear
from goose_jax.models.llama.config import DecoderConfig
from goose_jax.models.scan import per_layer, run_blocks, stack_layers
from goose_jax.models.sites import Adapter

Array = jax.Array


def RMSNorm(cfg: DecoderConfig, *, name: str) -> layers.RMSNorm:  # noqa: N802 (a module)
    """HF Llama's RMSNorm: statistics in float32, then ``scale * x`` in the compute dtype."""
    return layers.RMSNorm(cfg, eps=cfg.rms_norm_eps, name=name)


# --- rotary position embeddings -----------------------------------------------------------------


@functools.lru_cache(maxsize=32)
def rope_inv_freq(cfg: DecoderConfig) -> np.ndarray:
    """The (K/2,) float32 inverse frequencies of ``cfg.rope_type``, in transformers' order of
    float32 operations (``modeling_rope_utils``)."""
    inv = default_inv_freq(cfg.rope_theta, cfg.head_dim)
    if cfg.rope_type == "linear":
        return (inv / np.float32(cfg.rope_factor)).astype(np.float32)
    if cfg.rope_type == "llama3":
        factor = np.float32(cfg.rope_factor)
        low, high = cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
        old = cfg.rope_original_max_position_embeddings
        low_wavelen, high_wavelen = old / low, old / high
        wavelen = np.float32(2 * np.pi) / inv
        scaled = np.where(wavelen > low_wavelen, inv / factor, inv).astype(np.float32)
        smooth = ((old / wavelen - low) / (high - low)).astype(np.float32)
        smoothed = ((1 - smooth) * scaled / factor + smooth * scaled).astype(np.float32)
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return np.where(medium, smoothed, scaled).astype(np.float32)
    return inv


# --- layers -------------------------------------------------------------------------------------


class Attention(nn.Module):
    """Grouped-query self-attention with rotary embeddings, q/k/v/o sites and a decoding cache.

    In decode mode the layer keeps (B, S, G, K) key and value caches (S = ``max_len`` slots,
    keys stored rotated) and writes the Q new tokens at slots ``pos .. pos + Q - 1``.
    """

    cfg: DecoderConfig
    adapter: Any = None

    @nn.compact
    def __call__(self, x_BQD: Array, cos_BQK: Array, sin_BQK: Array, bias: Array, *,
                 decode: bool = False, pos: Array | None = None,
                 max_len: int | None = None) -> Array:
        """Returns the o site's output (B, Q, D).

        Args:
          x_BQD: (B, Q, D) the normed residual stream.
          cos_BQK, sin_BQK: the rotary tables at the queries' positions (``rotary``).
          bias: float32 (B, 1, 1, Q, S) from ``attention_bias``.
          decode: write this call's keys and values into the ``cache`` collection and attend
            to all of its S = ``max_len`` slots.
          pos: int32 () the first new slot (decode only).
        """
        cfg = self.cfg
        H, G, K = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        site = functools.partial(Linear, cfg=cfg, adapter=self.adapter)
        B, Q = x_BQD.shape[:2]
        q_BQHK = site(H * K, ("embed", "joined_kv"), use_bias=cfg.qkv_bias, name="q")(x_BQD)
        k_BQGK = site(G * K, ("embed", "joined_kv"), use_bias=cfg.qkv_bias, name="k")(x_BQD)
        v_BQGK = site(G * K, ("embed", "joined_kv"), use_bias=cfg.qkv_bias, name="v")(x_BQD)
        q_BQHK = apply_rotary(q_BQHK.reshape(B, Q, H, K), cos_BQK, sin_BQK)
        k_BQGK = apply_rotary(k_BQGK.reshape(B, Q, G, K), cos_BQK, sin_BQK)
        v_BQGK = v_BQGK.reshape(B, Q, G, K)
        if decode:
            k_BSGK, v_BSGK = decode_cache(self, k_BQGK, v_BQGK, pos, max_len, cfg.dtype.compute)
        else:
            k_BSGK, v_BSGK = k_BQGK, v_BQGK
        out_BQJ = grouped_attention(q_BQHK, k_BSGK, v_BSGK, bias, K**-0.5, cfg.dtype.compute)
        return site(cfg.d_model, ("joined_kv", "embed"), use_bias=cfg.o_bias, name="o")(out_BQJ)


class MLP(nn.Module):
    """SwiGLU feed-forward ``down(silu(gate(x)) * up(x))``: (B, Q, D) -> (B, Q, D)."""

    cfg: DecoderConfig
    adapter: Any = None

    @nn.compact
    def __call__(self, x_BQD: Array) -> Array:
        cfg = self.cfg
        site = functools.partial(Linear, cfg=cfg, use_bias=cfg.mlp_bias, adapter=self.adapter)
        h_BQF = jax.nn.silu(site(cfg.d_ff, ("embed", "mlp"), name="gate")(x_BQD))
        h_BQF = h_BQF * site(cfg.d_ff, ("embed", "mlp"), name="up")(x_BQD)
        return site(cfg.d_model, ("mlp", "embed"), name="down")(h_BQF)


class Block(nn.Module):
    """One layer: pre-norm self-attention, then pre-norm SwiGLU, each residual."""

    cfg: DecoderConfig
    adapter: Any = None
    decode: bool = False
    max_len: int | None = None

    @nn.compact
    def __call__(self, x_BQD: Array, cos_BQK: Array, sin_BQK: Array, bias: Array,
                 pos: Array | None = None) -> Array:
        h_BQD = RMSNorm(self.cfg, name="input_norm")(x_BQD)
        x_BQD = x_BQD + Attention(self.cfg, self.adapter, name="self_attn")(
            h_BQD, cos_BQK, sin_BQK, bias, decode=self.decode, pos=pos, max_len=self.max_len)
        h_BQD = RMSNorm(self.cfg, name="post_attn_norm")(x_BQD)
        return x_BQD + MLP(self.cfg, self.adapter, name="mlp")(h_BQD)


class Llama(nn.Module):
    """The decoder-only language model; ``__call__`` returns float32 logits (B, Q, V).

    Attributes:
      cfg: the model config.
      adapter: optional ``Adapter`` called by every site (LoRA, gates, routing).
    """

    cfg: DecoderConfig
    adapter: Any = None

    @nn.compact
    def __call__(self, ids_BQ: Array, positions_BQ: Array, mask_BS: Array, *,
                 decode: bool = False, max_len: int | None = None) -> Array:
        """Logits of ``ids_BQ``.

        Args:
          ids_BQ: (B, Q) int tokens.
          positions_BQ: (B, Q) int their rotary positions
            (``models.causal.model.positions_from_mask``).
          mask_BS: (B, S) 1 for real keys, 0 for padding: over the Q tokens themselves (S = Q),
            or with ``decode`` over the S = ``max_len`` cache slots.
          decode: cached decoding (``cache`` mutable): the Q tokens fill the next cache slots,
            from the ``cache`` ``index`` on (0 at the first call, which creates the cache).
          max_len: the cache's length (decode only).
        """
        cfg = self.cfg
        embed = Embedding(cfg, name="embed_tokens")
        Q = ids_BQ.shape[1]
        pos = None
        if decode:
            index = self.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
            pos = index.value
            index.value = pos + Q
        bias = attention_bias(mask_BS, Q, 0 if pos is None else pos, cfg.sliding_window)
        cos_BQK, sin_BQK = rotary(rope_inv_freq(cfg), positions_BQ)
        x_BQD = embed(ids_BQ)
        x_BQD = run_blocks(Block, cfg.num_layers, x_BQD, cos_BQK, sin_BQK, bias, pos,
                           prefix="layers_", cfg=cfg, adapter=self.adapter, decode=decode,
                           max_len=max_len)
        x_BQD = RMSNorm(cfg, name="final_norm")(x_BQD)
        if cfg.tie_word_embeddings:
            return embed.attend(x_BQD)
        return Head(cfg, name="lm_head")(x_BQD)


# --- functional API ---------------------------------------------------------------------------


def abstract_variables(cfg: DecoderConfig) -> dict:
    """The model's variables as ``jax.ShapeDtypeStruct`` (nothing is allocated)."""
    ids = jax.ShapeDtypeStruct((1, 4), jnp.int32)
    return jax.eval_shape(Llama(cfg).init, jax.random.key(0), ids, ids, ids)


def init_params(cfg: DecoderConfig, rng: Array | int = 0) -> dict:
    """Random base parameters (std 0.02 kernels and embedding, unit norms, zero biases), drawn
    with NumPy so that no preset needs a compilation.

    Args:
      cfg: the model config.
      rng: an int seed, or a JAX PRNG key (its key data seeds the generator).
    """
    if cfg.scan_layers:   # the same draws as the per-layer tree, stacked
        return stack_layers(init_params(per_layer(cfg), rng), cfg)
    return layers.draw_params(nn.meta.unbox(abstract_variables(cfg))["params"],
                              layers.normal_std, cfg, rng)


def param_logical_axes(cfg: DecoderConfig) -> dict:
    """The logical axis names of every base parameter, a pytree of PartitionSpec."""
    return nn.get_partition_spec(abstract_variables(cfg))["params"]


SITE_ORDER = ("self_attn/q", "self_attn/k", "self_attn/v", "self_attn/o", "mlp/gate", "mlp/up",
              "mlp/down")


def site_shapes(cfg: DecoderConfig) -> dict[str, tuple[int, int]]:
    """Every adapter site, ``{"layers_0/self_attn/q": (I, O), ...}``, layers ascending, each in
    ``SITE_ORDER``. From the config alone (no parameters are built)."""
    H, G, K, D, F = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.d_model, cfg.d_ff
    shapes = {"self_attn/q": (D, H * K), "self_attn/k": (D, G * K), "self_attn/v": (D, G * K),
              "self_attn/o": (H * K, D), "mlp/gate": (D, F), "mlp/up": (D, F),
              "mlp/down": (F, D)}
    return {f"layers_{i}/{s}": shapes[s] for i in range(cfg.num_layers) for s in SITE_ORDER}


def decoder_logits(cfg: DecoderConfig, params, input_ids_BT, attention_mask_BT=None, *,
                   routing=None, adapter: Adapter | None = None,
                   collections: dict | None = None) -> Array:
    """Logits of a (padded) batch, equal to HF ``LlamaForCausalLM(...).logits`` at real tokens
    (``models.causal.model.padded_logits``: the arguments, padding and positions).

    Returns:
      float32 logits (B, T, V).
    """
    return padded_logits(Llama, cfg, params, input_ids_BT, attention_mask_BT, routing=routing,
                         adapter=adapter, collections=collections)
