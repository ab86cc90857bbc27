"""The Gemma family in Flax Linen: Gemma (v1) and Gemma 2.

Shapes follow the package legend (the ``goose_jax`` module docstring); Q, S, G and J as in
``goose_jax.models.causal.model``.

Every linear layer is a ``Linear`` *site* named by its scope path, as in the other families:
``layers_3/self_attn/q|k|v|o`` and ``layers_3/mlp/gate|up|down``; the adapters of
``goose_jax.experts`` and ``goose_jax.routing`` plug in unchanged.

The numerics follow transformers' ``GemmaForCausalLM`` and ``Gemma2ForCausalLM``:

- the token embedding multiplied by sqrt(D), in the embedding's dtype;
- RMS norms that multiply by ``1 + scale`` in float32 (scales start at zero);
- grouped-query attention with rotary embeddings (HF's ``rotate_half`` layout), scaled by
  ``head_dim ** -0.5`` (Gemma) or ``query_pre_attn_scalar ** -0.5`` (Gemma 2);
- a GeGLU feed-forward ``down(gelu(gate(x)) * up(x))``, the tanh-approximated gelu;
- the tied head.

Gemma 2 also soft-caps attention scores (``attn_logit_softcapping``) and the final logits
(``final_logit_softcapping``), norms each sub-layer's output as well as its input
(``post_attn_norm``, ``post_mlp_norm``), and lets the layers ``layer_types`` marks
"sliding_attention" see only the last ``sliding_window`` positions.

Layer types and scan. Every layer has the same parameters; what differs is which attention
bias it reads. The blocks carry their own index beside the residual stream, and each picks its
bias from a per-layer table by that index, so the unrolled and the scanned stacks
(``models.scan.run_blocks``) run one body for any pattern of layer types.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from goose_jax.models import layers
from goose_jax.models.causal.model import (
    apply_rotary,
    attention_bias,
    decode_cache,
    default_inv_freq,
    grouped_attention,
    padded_logits,
    rotary,
    softcap_logits,
)
from goose_jax.models.gemma.config import GemmaConfig
from goose_jax.models.scan import per_layer, run_blocks, stack_layers
from goose_jax.models.sites import Adapter

Array = jax.Array


def init_std(cfg: GemmaConfig, module: str, param: str, shape: tuple[int, ...]) -> float | None:
    """Gemma's initial scales (``models.layers.InitRule``): 0.02 for kernels and the embedding
    (``initializer_range``), zeros for the norms' scales (they multiply by ``1 + scale``) and
    biases."""
    return layers.INIT_STD if param in ("kernel", "embedding") else 0.0


Linear = functools.partial(layers.Linear, init_rule=init_std)


def RMSNorm(cfg: GemmaConfig, *, name: str) -> layers.RMSNorm:  # noqa: N802 (a module)
    """Gemma's RMSNorm: ``x / rms(x) * (1 + scale)``, all in float32, then cast."""
    return layers.RMSNorm(cfg, eps=cfg.rms_norm_eps, float32_scale=True, unit_offset=True,
                          init_rule=init_std, name=name)


class Attention(nn.Module):
    """Grouped-query self-attention with rotary embeddings, q/k/v/o sites, the query scale and
    soft-capping of ``cfg``, and a decoding cache (as ``models.llama.model.Attention``)."""

    cfg: GemmaConfig
    adapter: Any = None

    @nn.compact
    def __call__(self, x_BQD: Array, cos_BQK: Array, sin_BQK: Array, bias: Array, *,
                 decode: bool = False, pos: Array | None = None,
                 max_len: int | None = None) -> Array:
        cfg = self.cfg
        H, G, K = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        site = functools.partial(Linear, cfg=cfg, use_bias=cfg.attention_bias,
                                 adapter=self.adapter)
        B, Q = x_BQD.shape[:2]
        q_BQHK = site(H * K, ("embed", "joined_kv"), name="q")(x_BQD).reshape(B, Q, H, K)
        k_BQGK = site(G * K, ("embed", "joined_kv"), name="k")(x_BQD).reshape(B, Q, G, K)
        v_BQGK = site(G * K, ("embed", "joined_kv"), name="v")(x_BQD).reshape(B, Q, G, K)
        q_BQHK = apply_rotary(q_BQHK, cos_BQK, sin_BQK)
        k_BQGK = apply_rotary(k_BQGK, cos_BQK, sin_BQK)
        if decode:
            k_BSGK, v_BSGK = decode_cache(self, k_BQGK, v_BQGK, pos, max_len, cfg.dtype.compute)
        else:
            k_BSGK, v_BSGK = k_BQGK, v_BQGK
        out_BQJ = grouped_attention(q_BQHK, k_BSGK, v_BSGK, bias, cfg.query_scale,
                                    cfg.dtype.compute, softcap=cfg.attn_logit_softcapping)
        return site(cfg.d_model, ("joined_kv", "embed"), name="o")(out_BQJ)


class MLP(nn.Module):
    """GeGLU feed-forward ``down(gelu(gate(x)) * up(x))``: (B, Q, D) -> (B, Q, D)."""

    cfg: GemmaConfig
    adapter: Any = None

    @nn.compact
    def __call__(self, x_BQD: Array) -> Array:
        cfg = self.cfg
        site = functools.partial(Linear, cfg=cfg, adapter=self.adapter)
        gate_BQF = site(cfg.d_ff, ("embed", "mlp"), name="gate")(x_BQD)
        h_BQF = jax.nn.gelu(gate_BQF, approximate=cfg.hidden_activation != "gelu")
        h_BQF = h_BQF * site(cfg.d_ff, ("embed", "mlp"), name="up")(x_BQD)
        return site(cfg.d_model, ("mlp", "embed"), name="down")(h_BQF)


class Block(nn.Module):
    """One layer. The carry is (residual stream (B, Q, D), this layer's index): the index picks
    the layer's attention bias, the sliding-window one where ``cfg.sliding_layers`` says so."""

    cfg: GemmaConfig
    adapter: Any = None
    decode: bool = False
    max_len: int | None = None

    @nn.compact
    def __call__(self, carry: tuple[Array, Array], cos_BQK: Array, sin_BQK: Array,
                 full_bias: Array, sliding_bias: Array | None,
                 pos: Array | None = None) -> tuple[Array, Array]:
        cfg = self.cfg
        x_BQD, index = carry
        bias = full_bias
        if sliding_bias is not None:
            sliding = jnp.asarray(cfg.sliding_layers)[index]
            bias = jnp.where(sliding, sliding_bias, full_bias)
        v2 = cfg.family == "gemma2"
        h_BQD = RMSNorm(cfg, name="input_norm")(x_BQD)
        h_BQD = Attention(cfg, self.adapter, name="self_attn")(
            h_BQD, cos_BQK, sin_BQK, bias, decode=self.decode, pos=pos, max_len=self.max_len)
        if v2:
            h_BQD = RMSNorm(cfg, name="post_attn_norm")(h_BQD)
        x_BQD = x_BQD + h_BQD
        h_BQD = MLP(cfg, self.adapter, name="mlp")(RMSNorm(cfg, name="pre_mlp_norm")(x_BQD))
        if v2:
            h_BQD = RMSNorm(cfg, name="post_mlp_norm")(h_BQD)
        return x_BQD + h_BQD, index + 1


class Gemma(nn.Module):
    """The Gemma / Gemma 2 language model; ``__call__`` returns float32 logits (B, Q, V), with
    the calling convention of ``models.causal`` (as ``models.llama.model.Llama``).

    Attributes:
      cfg: the model config.
      adapter: optional ``Adapter`` called by every site (LoRA, gates, routing).
    """

    cfg: GemmaConfig
    adapter: Any = None

    @nn.compact
    def __call__(self, ids_BQ: Array, positions_BQ: Array, mask_BS: Array, *,
                 decode: bool = False, max_len: int | None = None) -> Array:
        cfg = self.cfg
        embed = layers.Embedding(cfg, multiplier=cfg.embed_scale, init_rule=init_std,
                                 name="embed_tokens")
        Q = ids_BQ.shape[1]
        pos = None
        if decode:
            index = self.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
            pos = index.value
            index.value = pos + Q
        start = 0 if pos is None else pos
        full_bias = attention_bias(mask_BS, Q, start)
        sliding_bias = (attention_bias(mask_BS, Q, start, cfg.sliding_window)
                        if any(cfg.sliding_layers) else None)
        cos_BQK, sin_BQK = rotary(default_inv_freq(cfg.rope_theta, cfg.head_dim), positions_BQ)
        carry = (embed(ids_BQ), jnp.zeros((), jnp.int32))
        x_BQD, _ = run_blocks(Block, cfg.num_layers, carry, cos_BQK, sin_BQK, full_bias,
                              sliding_bias, pos, prefix="layers_", cfg=cfg, adapter=self.adapter,
                              decode=decode, max_len=max_len)
        x_BQD = RMSNorm(cfg, name="final_norm")(x_BQD)
        if cfg.tie_word_embeddings:
            logits = embed.attend(x_BQD)
        else:
            logits = layers.Head(cfg, init_rule=init_std, name="lm_head")(x_BQD)
        return softcap_logits(logits, cfg.final_logit_softcapping)


# --- functional API ---------------------------------------------------------------------------


def abstract_variables(cfg: GemmaConfig) -> dict:
    """The model's variables as ``jax.ShapeDtypeStruct`` (nothing is allocated)."""
    ids = jax.ShapeDtypeStruct((1, 4), jnp.int32)
    return jax.eval_shape(Gemma(cfg).init, jax.random.key(0), ids, ids, ids)


def init_params(cfg: GemmaConfig, rng: Array | int = 0) -> dict:
    """Random base parameters (``init_std``), drawn with NumPy so that no preset compiles.

    Args:
      cfg: the model config.
      rng: an int seed, or a JAX PRNG key (its key data seeds the generator).
    """
    if cfg.scan_layers:   # the same draws as the per-layer tree, stacked
        return stack_layers(init_params(per_layer(cfg), rng), cfg)
    return layers.draw_params(nn.meta.unbox(abstract_variables(cfg))["params"], init_std, cfg,
                              rng)


def param_logical_axes(cfg: GemmaConfig) -> dict:
    """The logical axis names of every base parameter, a pytree of PartitionSpec."""
    return nn.get_partition_spec(abstract_variables(cfg))["params"]


SITE_ORDER = ("self_attn/q", "self_attn/k", "self_attn/v", "self_attn/o", "mlp/gate", "mlp/up",
              "mlp/down")


def site_shapes(cfg: GemmaConfig) -> dict[str, tuple[int, int]]:
    """Every adapter site, ``{"layers_0/self_attn/q": (I, O), ...}``, layers ascending, each in
    ``SITE_ORDER``. From the config alone."""
    H, G, K, D, F = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.d_model, cfg.d_ff
    shapes = {"self_attn/q": (D, H * K), "self_attn/k": (D, G * K), "self_attn/v": (D, G * K),
              "self_attn/o": (H * K, D), "mlp/gate": (D, F), "mlp/up": (D, F),
              "mlp/down": (F, D)}
    return {f"layers_{i}/{s}": shapes[s] for i in range(cfg.num_layers) for s in SITE_ORDER}


def gemma_logits(cfg: GemmaConfig, params, input_ids_BT, attention_mask_BT=None, *,
                 routing=None, adapter: Adapter | None = None,
                 collections: dict | None = None) -> Array:
    """Logits of a (padded) batch, equal to HF ``GemmaForCausalLM`` / ``Gemma2ForCausalLM``
    logits at real tokens (``models.causal.model.padded_logits``: arguments, padding and
    positions)."""
    return padded_logits(Gemma, cfg, params, input_ids_BT, attention_mask_BT, routing=routing,
                         adapter=adapter, collections=collections)
