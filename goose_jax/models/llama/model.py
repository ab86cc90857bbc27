"""The decoder-only family in Flax Linen: Llama (1-3.x), Qwen2, Mistral.

Shapes follow the package legend (the ``goose_jax`` module docstring). Also used here: Q and S,
the query and key lengths of an attention layer (S is the cache length when decoding), G the
key/value heads (grouped-query attention: each serves H // G = n query heads), J = H * K.

Every linear layer is a ``Linear`` *site* named by its scope path, as in
``goose_jax.models.t5.model``:
``layers_3/self_attn/q|k|v|o`` and ``layers_3/mlp/gate|up|down``. A site computes
``y = x @ kernel (+ bias)`` and hands ``(module, x, y)`` to the model's ``adapter``; the adapters
of ``goose_jax.experts.lora`` (LoRA, gates) and ``goose_jax.routing.methods`` (routing) read their
own
variable collections at the same scope path and plug in unchanged.

The numerics follow transformers' ``LlamaForCausalLM`` (and Qwen2, Mistral): pre-norm blocks
with RMSNorm (statistics in float32, the scale applied after casting back, as HF does), rotary
position embeddings on the two halves of each head (HF's ``rotate_half`` layout, into which HF
checkpoints are already permuted), attention scaled by ``K ** -0.5`` with the softmax in
float32, a SwiGLU feed-forward ``down(silu(gate(x)) * up(x))``, a final RMSNorm and a tied or
untied head.

Padding. A token's rotary position is the number of real tokens before it in its row
(``positions_from_mask``), so left and right padding give every real token the same position,
and the same logits, as an unpadded row; keys at padding are masked out. Generation
(``goose_jax.models.llama.generation``) left-aligns every prompt first, so that all rows append
their
new tokens at the same cache slot.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from goose_jax.models.llama.config import DecoderConfig
from goose_jax.models.scan import per_layer, run_blocks, stack_layers
from goose_jax.models.sites import Adapter, resolve_adapter

Array = jax.Array
# Added to attention scores at masked keys; finite so that a query with no visible key (a
# padding query) stays finite.
_MASKED = -1e9
# transformers' initializer_range for every family here.
INIT_STD = 0.02


def _init_std(param: str) -> float | None:
    """Initial std of a base parameter: 0.02 for kernels and embeddings (HF's
    ``initializer_range``); None for norm scales (ones) and biases (zeros)."""
    return INIT_STD if param in ("kernel", "embedding") else None


def _initializer(param: str):
    def init(key, shape, dtype=jnp.float32):
        std = _init_std(param)
        if std is None:
            return (jnp.ones if param == "scale" else jnp.zeros)(shape, dtype)
        return std * jax.random.normal(key, shape, dtype)

    return init


class Linear(nn.Module):
    """A named linear site: ``y = x @ kernel (+ bias) (+ adapter)``, x (..., I) -> (..., O).

    Attributes:
      features: output width O.
      axes: logical axis names of the (I, O) kernel.
      cfg: the model config (dtype policy).
      use_bias: the site has an (O,) bias (Qwen2's q, k and v).
      adapter: optional ``goose_jax.models.sites.Adapter`` applied after the base matmul.
    """

    features: int
    axes: tuple[str, str]
    cfg: DecoderConfig
    use_bias: bool = False
    adapter: Any = None

    @property
    def site(self) -> str:
        return "/".join(self.path)

    @nn.compact
    def __call__(self, x: Array) -> Array:
        param = self.cfg.dtype.param
        kernel_IO = self.param("kernel", nn.with_logical_partitioning(
            _initializer("kernel"), self.axes), (x.shape[-1], self.features), param)
        compute = self.cfg.dtype.compute
        y = jnp.dot(x.astype(compute), kernel_IO.astype(compute))
        if self.use_bias:
            bias_O = self.param("bias", nn.with_logical_partitioning(
                _initializer("bias"), self.axes[1:]), (self.features,), param)
            y = y + bias_O.astype(compute).reshape((1,) * (y.ndim - 1) + (-1,))
        if self.adapter is not None:
            y = self.adapter(self, x, y)
        return y


class RMSNorm(nn.Module):
    """HF Llama's RMSNorm: statistics in float32, then ``scale * x`` in the compute dtype.

    (B, Q, D) -> the same shape.
    """

    cfg: DecoderConfig

    @nn.compact
    def __call__(self, x_BQD: Array) -> Array:
        scale_D = self.param("scale", nn.with_logical_partitioning(_initializer("scale"),
                                                                   ("embed",)),
                             (x_BQD.shape[-1],), self.cfg.dtype.param)
        compute = self.cfg.dtype.compute
        x32_BQD = x_BQD.astype(jnp.float32)
        var_BQ1 = jnp.mean(jnp.square(x32_BQD), axis=-1, keepdims=True)
        y_BQD = (x32_BQD * jax.lax.rsqrt(var_BQ1 + self.cfg.rms_norm_eps)).astype(compute)
        return scale_D.astype(compute).reshape((1,) * (y_BQD.ndim - 1) + (-1,)) * y_BQD


class Embedding(nn.Module):
    """The (V, D) token embedding; ``attend`` is the tied head, (B, Q, D) -> float32 (B, Q, V)."""

    cfg: DecoderConfig

    def setup(self):
        self.embedding = self.param(
            "embedding", nn.with_logical_partitioning(_initializer("embedding"),
                                                      ("vocab", "embed")),
            (self.cfg.vocab_size, self.cfg.d_model), self.cfg.dtype.param)

    def __call__(self, ids_BQ: Array) -> Array:
        return jnp.take(self.embedding, ids_BQ, axis=0).astype(self.cfg.dtype.compute)

    def attend(self, x_BQD: Array) -> Array:
        compute = self.cfg.dtype.compute
        return jnp.dot(x_BQD.astype(compute), self.embedding.astype(compute).T,
                       preferred_element_type=jnp.float32)


class Head(nn.Module):
    """The untied output head (not an adapter site): (B, Q, D) -> float32 logits (B, Q, V)."""

    cfg: DecoderConfig

    @nn.compact
    def __call__(self, x_BQD: Array) -> Array:
        kernel_DV = self.param("kernel", nn.with_logical_partitioning(
            _initializer("kernel"), ("embed", "vocab")),
            (self.cfg.d_model, self.cfg.vocab_size), self.cfg.dtype.param)
        compute = self.cfg.dtype.compute
        return jnp.dot(x_BQD.astype(compute), kernel_DV.astype(compute),
                       preferred_element_type=jnp.float32)


# --- rotary position embeddings -----------------------------------------------------------------


@functools.lru_cache(maxsize=32)
def rope_inv_freq(cfg: DecoderConfig) -> np.ndarray:
    """The (K/2,) float32 inverse frequencies of ``cfg.rope_type``, in transformers' order of
    float32 operations (``modeling_rope_utils``)."""
    K = cfg.head_dim
    exponent = np.arange(0, K, 2, dtype=np.int64).astype(np.float32) / np.float32(K)
    inv = (np.float32(1.0) / np.power(np.float32(cfg.rope_theta), exponent)).astype(np.float32)
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


def rotary(cfg: DecoderConfig, positions_BQ: Array) -> tuple[Array, Array]:
    """cos and sin, each float32 (B, Q, K), of the rotary embedding at ``positions_BQ``."""
    inv_F = jnp.asarray(rope_inv_freq(cfg))
    angles_BQF = positions_BQ.astype(jnp.float32)[..., None] * inv_F[None, None, :]
    angles_BQK = jnp.concatenate([angles_BQF, angles_BQF], axis=-1)
    return jnp.cos(angles_BQK), jnp.sin(angles_BQK)


def apply_rotary(x_BQHK: Array, cos_BQK: Array, sin_BQK: Array) -> Array:
    """Rotates the two halves of each head: ``x cos + rotate_half(x) sin`` (HF's layout)."""
    half = x_BQHK.shape[-1] // 2
    rotated = jnp.concatenate([-x_BQHK[..., half:], x_BQHK[..., :half]], axis=-1)
    cos, sin = cos_BQK[:, :, None, :], sin_BQK[:, :, None, :]
    return (x_BQHK * cos.astype(x_BQHK.dtype) + rotated * sin.astype(x_BQHK.dtype))


# --- layers -------------------------------------------------------------------------------------


def positions_from_mask(mask_BQ: Array) -> Array:
    """int32 (B, Q): each token's count of real tokens before it in its row (padding: 0)."""
    mask = mask_BQ.astype(jnp.int32)
    return jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0) * mask


def attention_bias(cfg: DecoderConfig, mask_BS: Array, q_len: int, start: Array | int = 0
                   ) -> Array:
    """float32 (B, 1, 1, Q, S) additive bias: causal by slot, the sliding window, and padding.

    Query q sits at slot ``start + q``; key slot s is visible iff it is real (``mask_BS``), not
    after q, and (with ``cfg.sliding_window`` W) after ``q - W``, transformers' window rule.
    """
    q_Q = jnp.arange(q_len, dtype=jnp.int32) + start
    s_S = jnp.arange(mask_BS.shape[1], dtype=jnp.int32)
    visible_QS = s_S[None, :] <= q_Q[:, None]
    if cfg.sliding_window is not None:
        visible_QS = visible_QS & (s_S[None, :] > q_Q[:, None] - cfg.sliding_window)
    visible_BQS = visible_QS[None] & mask_BS.astype(bool)[:, None, :]
    return jnp.where(visible_BQS, 0.0, _MASKED).astype(jnp.float32)[:, None, None]


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
            shape = (B, max_len, G, K)
            ck = self.variable("cache", "cached_key", jnp.zeros, shape, cfg.dtype.compute)
            cv = self.variable("cache", "cached_value", jnp.zeros, shape, cfg.dtype.compute)
            ck.value = jax.lax.dynamic_update_slice_in_dim(ck.value, k_BQGK, pos, axis=1)
            cv.value = jax.lax.dynamic_update_slice_in_dim(cv.value, v_BQGK, pos, axis=1)
            k_BSGK, v_BSGK = ck.value, cv.value
        else:
            k_BSGK, v_BSGK = k_BQGK, v_BQGK
        n = H // G
        q_BQGnK = q_BQHK.reshape(B, Q, G, n, K)   # query head h = g * n + i reads key head g
        scores = jnp.einsum("bqgnk,bsgk->bgnqs", q_BQGnK, k_BSGK,
                            preferred_element_type=jnp.float32) * np.float32(K**-0.5)
        probs = jax.nn.softmax(scores + bias, axis=-1).astype(cfg.dtype.compute)
        out_BQGnK = jnp.einsum("bgnqs,bsgk->bqgnk", probs, v_BSGK)
        return site(cfg.d_model, ("joined_kv", "embed"), use_bias=cfg.o_bias, name="o")(
            out_BQGnK.reshape(B, Q, H * K))


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
          positions_BQ: (B, Q) int their rotary positions (``positions_from_mask``).
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
        bias = attention_bias(cfg, mask_BS, Q, 0 if pos is None else pos)
        cos_BQK, sin_BQK = rotary(cfg, positions_BQ)
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
    if isinstance(rng, (int, np.integer)):
        gen = np.random.default_rng(int(rng))
    else:
        gen = np.random.default_rng(np.asarray(jax.random.key_data(rng)).ravel())
    shapes = nn.meta.unbox(abstract_variables(cfg))["params"]

    def draw(path, leaf):
        param = str(path[-1].key)
        std = _init_std(param)
        if std is None:
            return (jnp.ones if param == "scale" else jnp.zeros)(leaf.shape, leaf.dtype)
        values = gen.standard_normal(leaf.shape, np.float32) * np.float32(std)
        return jnp.asarray(values.astype(leaf.dtype))

    return jax.tree_util.tree_map_with_path(draw, shapes)


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


def model_variables(cfg, params, collections):
    """The variables the module applies: ``params`` and ``collections``, layers stacked when
    ``cfg.scan_layers``."""
    variables = {"params": params, **(collections or {})}
    # Either layout is accepted; a stacked tree passes through unchanged (no copy).
    return stack_layers(variables, cfg) if cfg.scan_layers else variables


@functools.partial(jax.jit, static_argnames=("cfg", "adapter"))
def _logits(cfg, variables, ids_BT, mask_BT, adapter=None):
    return Llama(cfg, adapter).apply(variables, ids_BT, positions_from_mask(mask_BT), mask_BT)


def decoder_logits(cfg: DecoderConfig, params, input_ids_BT, attention_mask_BT=None, *,
                   routing=None, adapter: Adapter | None = None,
                   collections: dict | None = None) -> Array:
    """Logits of a (padded) batch, equal to HF ``LlamaForCausalLM(...).logits`` at real tokens.

    Args:
      cfg: the model config.
      params: the base parameter tree.
      input_ids_BT: (B, T) int tokens, padded on the left or the right.
      attention_mask_BT: (B, T) 1 for real tokens, 0 for padding; None means all real. Real
        tokens get the positions of their unpadded row (see module doc); the logits at padding
        are not meaningful.
      routing: a ``goose_jax.routing.methods.Routed`` (any routing method over an expert library).
      adapter: optional site adapter (LoRA, gates, routing).
      collections: extra variable collections the adapter reads (e.g. ``{"experts": ...}``).

    Returns:
      float32 logits (B, T, V).
    """
    adapter, collections = resolve_adapter(adapter, collections, routing)
    ids = jnp.asarray(input_ids_BT, jnp.int32)
    mask = (jnp.ones(ids.shape, jnp.int32) if attention_mask_BT is None
            else jnp.asarray(attention_mask_BT, jnp.int32))
    return _logits(cfg, model_variables(cfg, params, collections), ids, mask, adapter=adapter)
