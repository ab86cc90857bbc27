"""The T5 family in Flax Linen: v1.0, v1.1 / LM-adapted, FLAN-T5.

Shapes follow the package legend (the ``goose_jax`` module docstring). Also used here: Q and S,
the query and key lengths of an attention layer (each L or T), J = H * K the joined width of all
heads, P relative-position buckets.

Every linear layer is a ``Linear`` *site* with a stable name, its Flax scope path joined by
slashes, for example ``encoder/block_3/self_attn/q`` or ``decoder/block_0/ffn/wi_0``. A site
computes ``y = x @ kernel`` and then hands ``(module, x, y)`` to the model's ``adapter``, if one
is set. Adapters (LoRA, gated LoRA, routed experts) live outside this file and read their weights
from their own variable collections at the same scope path (``lora/encoder/block_3/self_attn/q``),
so the base ``params`` tree never changes shape and experts never touch model code.

The numerics follow transformers' ``T5ForConditionalGeneration``: RMS norm without mean or bias,
no 1/sqrt(K) in attention (it is folded into the initialisation), one relative-position bias
table per stack computed in the first layer and shared by the rest, and for v1.0 the tied output
head applied after scaling by ``d_model ** -0.5``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from goose_jax.models import attention, layers
from goose_jax.models.scan import per_layer, run_blocks, stack_layers
from goose_jax.models.sites import Adapter, resolve_adapter
from goose_jax.models.t5.config import T5Config

Array = jax.Array
# Added to attention scores at masked positions. Finite so that bias + mask cannot overflow.
_MASKED = -1e9


def _activation(name: str) -> Callable[[Array], Array]:
    if name == "relu":
        return jax.nn.relu
    if name == "gelu":
        return functools.partial(jax.nn.gelu, approximate=False)
    if name in ("gelu_new", "gelu_pytorch_tanh"):
        return functools.partial(jax.nn.gelu, approximate=True)
    if name in ("silu", "swish"):
        return jax.nn.silu
    raise ValueError(f"unsupported activation {name!r}")


def _init_std(cfg: T5Config, module: str, param: str, shape: tuple[int, ...]) -> float | None:
    """T5's initial standard deviation of the base parameter ``param`` of module ``module``
    (the ``models.layers.InitRule`` of the family).

    Kernels (I, O) draw with std ``I ** -0.5``, and the query kernel with ``(I * K) ** -0.5``:
    T5 folds attention's 1/sqrt(K) into q (transformers' T5 initialises q, k, v, o, wi and wo
    with exactly these). Embedding tables (the shared embedding, the relative-position tables)
    draw with std 1. None means ones: the RMS norms' scales.
    """
    if param == "scale":
        return None
    if param == "embedding":
        return 1.0
    std = shape[0] ** -0.5
    return std * cfg.d_kv**-0.5 if module == "q" else std


class Linear(layers.Linear):
    """A named linear site without bias: ``y = x @ kernel (+ adapter)``, with T5's scales."""

    init_rule: layers.InitRule = _init_std


class Embedding(layers.Embedding):
    """The shared (V, D) token embedding (``attend``: the tied head), with T5's scales."""

    init_rule: layers.InitRule = _init_std


class Head(layers.Head):
    """The untied output head of T5 v1.1 / FLAN-T5 (not an adapter site)."""

    init_rule: layers.InitRule = _init_std


def RMSNorm(cfg: T5Config, *, name: str) -> layers.RMSNorm:  # noqa: N802 (a module)
    """T5's layer norm: scale only, no mean subtraction, statistics and scale in float32."""
    return layers.RMSNorm(cfg, eps=cfg.layer_norm_epsilon, float32_scale=True,
                          init_rule=_init_std, name=name)


@functools.lru_cache(maxsize=64)
def relative_position_buckets(q_len: int, k_len: int, bidirectional: bool, num_buckets: int,
                              max_distance: int, q_offset: int = 0) -> np.ndarray:
    """Bucket index of every (query, key) pair, shape (q_len, k_len), int32.

    Computed in NumPy at trace time (shapes are static) with float32 arithmetic in the same order
    as transformers' T5, so that bucket boundaries fall exactly where the checkpoints expect them.
    """
    q_pos = np.arange(q_len, dtype=np.int64)[:, None] + q_offset
    k_pos = np.arange(k_len, dtype=np.int64)[None, :]
    rel = k_pos - q_pos
    buckets = np.zeros_like(rel)
    n = num_buckets
    if bidirectional:
        n //= 2
        buckets += (rel > 0).astype(np.int64) * n
        rel = np.abs(rel)
    else:
        rel = -np.minimum(rel, 0)
    max_exact = n // 2
    is_small = rel < max_exact
    with np.errstate(divide="ignore"):
        ratio = np.log(rel.astype(np.float32) / np.float32(max_exact))
    ratio = ratio / np.float32(math.log(max_distance / max_exact)) * np.float32(n - max_exact)
    large = max_exact + np.where(is_small, 0, ratio).astype(np.int64)
    large = np.minimum(large, n - 1)
    buckets += np.where(is_small, rel, large)
    return buckets.astype(np.int32)


class RelativePositionBias(nn.Module):
    """One stack's learned (P, H) table of attention biases, one per relative-position bucket."""

    cfg: T5Config

    @nn.compact
    def __call__(self, buckets_QS: Array) -> Array:
        """Returns the bias (1, H, Q, S) in float32 for a (Q, S) bucket matrix."""
        table_PH = self.param(
            "embedding",
            nn.with_logical_partitioning(
                layers.initializer(_init_std, self.cfg, self.name, "embedding"),
                ("relpos_buckets", "heads")),
            (self.cfg.relative_attention_num_buckets, self.cfg.num_heads), self.cfg.dtype.param)
        bias_QSH = jnp.take(table_PH.astype(jnp.float32), buckets_QS, axis=0)
        return jnp.transpose(bias_QSH, (2, 0, 1))[None]


class Attention(nn.Module):
    """Multi-head attention with q, k, v, o sites and an optional decoding cache.

    In decode mode a self-attention layer keeps (B, S, J) key and value caches (S = ``max_len``
    slots) and writes the new token at ``pos``; a cross-attention layer projects the encoder
    output once, at the first step, and reads its cached keys and values afterwards.

    Attributes:
      cfg: the model config.
      adapter: optional ``Adapter`` of the q, k, v and o sites.
      cross: cross-attention (keys and values from the encoder output) rather than self-attention.
    """

    cfg: T5Config
    adapter: Any = None
    cross: bool = False

    @nn.compact
    def __call__(self, x_BQD: Array, kv_BSD: Array, bias_BHQS: Array, *, decode: bool = False,
                 pos: Array | None = None, max_len: int | None = None) -> Array:
        """Attends from ``x_BQD`` to ``kv_BSD``; returns the o site's output (B, Q, D).

        Args:
          x_BQD: (B, Q, D) the queries' inputs; Q = 1 when decoding.
          kv_BSD: (B, S, D) the keys' and values' inputs: ``x_BQD`` for self-attention, the
            encoder output (B, L, D) for cross-attention.
          bias_BHQS: float32, broadcastable to (B, H, Q, S): relative positions and masks.
          decode: one step of cached decoding (the ``cache`` collection mutable).
          pos: int32 () the new token's cache slot; max_len: S of the cache (self, decode only).
        """
        cfg = self.cfg
        H, K = cfg.num_heads, cfg.d_kv
        site = functools.partial(Linear, cfg=cfg, adapter=self.adapter)
        q_layer = site(H * K, ("embed", "joined_kv"), name="q")
        k_layer = site(H * K, ("embed", "joined_kv"), name="k")
        v_layer = site(H * K, ("embed", "joined_kv"), name="v")
        o_layer = site(cfg.d_model, ("joined_kv", "embed"), name="o")

        B, Q = x_BQD.shape[:2]
        q_BQHK = q_layer(x_BQD).reshape(B, Q, H, K)
        if decode and self.cross:
            # The initialiser runs only at the first step; later steps read the projection.
            ck = self.variable("cache", "cached_key", lambda: k_layer(kv_BSD))
            cv = self.variable("cache", "cached_value", lambda: v_layer(kv_BSD))
            k_BSJ, v_BSJ = ck.value, cv.value
        elif decode:
            shape = (B, max_len, H * K)
            ck = self.variable("cache", "cached_key", jnp.zeros, shape, cfg.dtype.compute)
            cv = self.variable("cache", "cached_value", jnp.zeros, shape, cfg.dtype.compute)
            ck.value = jax.lax.dynamic_update_slice_in_dim(ck.value, k_layer(kv_BSD), pos, axis=1)
            cv.value = jax.lax.dynamic_update_slice_in_dim(cv.value, v_layer(kv_BSD), pos, axis=1)
            k_BSJ, v_BSJ = ck.value, cv.value
        else:
            k_BSJ, v_BSJ = k_layer(kv_BSD), v_layer(kv_BSD)
        S = k_BSJ.shape[1]
        k_BSHK = k_BSJ.reshape(B, S, H, K)
        v_BSHK = v_BSJ.reshape(B, S, H, K)

        out_BQHK = attention.attend(q_BQHK, k_BSHK, v_BSHK, bias_BHQS, cfg.dtype.compute)
        return o_layer(out_BQHK.reshape(B, Q, H * K))


class FeedForward(nn.Module):
    """T5's feed-forward layer ``wo(act(wi(x)))``, gated ``wo(act(wi_0(x)) * wi_1(x))`` as
    ``cfg.feed_forward_proj`` says: (B, L, D) (or (B, T, D)) -> the same shape."""

    cfg: T5Config
    adapter: Any = None

    @nn.compact
    def __call__(self, x_BLD: Array) -> Array:
        cfg = self.cfg
        site = functools.partial(Linear, cfg=cfg, adapter=self.adapter)
        act = _activation(cfg.activation)
        if cfg.is_gated:
            h_BLF = act(site(cfg.d_ff, ("embed", "mlp"), name="wi_0")(x_BLD))
            h_BLF = h_BLF * site(cfg.d_ff, ("embed", "mlp"), name="wi_1")(x_BLD)
        else:
            h_BLF = act(site(cfg.d_ff, ("embed", "mlp"), name="wi")(x_BLD))
        return site(cfg.d_model, ("mlp", "embed"), name="wo")(h_BLF)


class EncoderBlock(nn.Module):
    """One encoder layer: pre-norm self-attention, then pre-norm feed-forward, each residual.

    ``x_BLD`` (B, L, D) is the residual stream, ``bias_BHLL`` float32 (B, H, L, L) the
    relative-position bias plus the padding mask; returns the stream after the layer.
    """

    cfg: T5Config
    adapter: Any = None

    @nn.compact
    def __call__(self, x_BLD: Array, bias_BHLL: Array) -> Array:
        h_BLD = RMSNorm(self.cfg, name="self_attn_norm")(x_BLD)
        x_BLD = x_BLD + Attention(self.cfg, self.adapter, name="self_attn")(
            h_BLD, h_BLD, bias_BHLL)
        h_BLD = RMSNorm(self.cfg, name="ffn_norm")(x_BLD)
        return x_BLD + FeedForward(self.cfg, self.adapter, name="ffn")(h_BLD)


class DecoderBlock(nn.Module):
    """One decoder layer: causal self-attention, cross-attention to the encoder output, then
    feed-forward; each pre-norm and residual.

    ``y_BTD`` (B, T, D) is the residual stream (T = 1 when decoding), ``enc_BLD`` (B, L, D) the
    encoder output, ``self_bias`` float32 (1, H, T, T) the relative-position bias plus the causal
    mask ((1, H, 1, max_len) when decoding), ``cross_bias`` float32 (B, 1, 1, L) the encoder's
    padding mask; ``decode``, ``pos`` and ``max_len`` as in ``Attention`` (the static two as
    attributes: scan and remat pass only arrays). Returns (B, T, D).
    """

    cfg: T5Config
    adapter: Any = None
    decode: bool = False
    max_len: int | None = None

    @nn.compact
    def __call__(self, y_BTD: Array, enc_BLD: Array, self_bias: Array, cross_bias: Array,
                 pos: Array | None = None) -> Array:
        decode = self.decode
        h_BTD = RMSNorm(self.cfg, name="self_attn_norm")(y_BTD)
        y_BTD = y_BTD + Attention(self.cfg, self.adapter, name="self_attn")(
            h_BTD, h_BTD, self_bias, decode=decode, pos=pos, max_len=self.max_len)
        h_BTD = RMSNorm(self.cfg, name="cross_attn_norm")(y_BTD)
        y_BTD = y_BTD + Attention(self.cfg, self.adapter, cross=True, name="cross_attn")(
            h_BTD, enc_BLD, cross_bias, decode=decode)
        h_BTD = RMSNorm(self.cfg, name="ffn_norm")(y_BTD)
        return y_BTD + FeedForward(self.cfg, self.adapter, name="ffn")(h_BTD)


def _padding_bias(mask_BL: Array) -> Array:
    """(B, L) 1/0 mask -> (B, 1, 1, L) additive float32 bias."""
    return jnp.where(mask_BL.astype(bool), 0.0, _MASKED)[:, None, None, :].astype(jnp.float32)


class Encoder(nn.Module):
    """The encoder stack: the relative-position bias (computed once, shared by every layer),
    ``num_encoder_layers`` ``EncoderBlock`` s and a final RMS norm.

    Takes the embedded tokens ``x_BLD`` (B, L, D) and ``mask_BL`` (B, L) (1 real, 0 padding);
    returns the encoder output (B, L, D) in the compute dtype.
    """

    cfg: T5Config
    adapter: Any = None

    @nn.compact
    def __call__(self, x_BLD: Array, mask_BL: Array) -> Array:
        cfg = self.cfg
        L = x_BLD.shape[1]
        buckets_LL = relative_position_buckets(L, L, True, cfg.relative_attention_num_buckets,
                                               cfg.relative_attention_max_distance)
        bias_1HLL = RelativePositionBias(cfg, name="relpos_bias")(jnp.asarray(buckets_LL))
        bias_BHLL = bias_1HLL + _padding_bias(mask_BL)
        x_BLD = run_blocks(EncoderBlock, cfg.num_encoder_layers, x_BLD, bias_BHLL,
                           cfg=cfg, adapter=self.adapter)
        return RMSNorm(cfg, name="final_norm")(x_BLD)


class Decoder(nn.Module):
    """The decoder stack: causal relative-position bias (computed once, shared by every layer),
    ``num_decoder_layers`` ``DecoderBlock`` s and a final RMS norm.

    Takes the embedded decoder inputs ``y_BTD`` (B, T, D), the encoder output ``enc_BLD``
    (B, L, D) and its padding mask ``enc_mask_BL``; returns (B, T, D) in the compute dtype. With
    ``decode=True`` each call takes one new token (T = 1), keeps its position in the ``cache``
    collection (``index``) and attends to ``max_len`` cache slots.
    """

    cfg: T5Config
    adapter: Any = None

    @nn.compact
    def __call__(self, y_BTD: Array, enc_BLD: Array, enc_mask_BL: Array, *, decode: bool = False,
                 max_len: int | None = None) -> Array:
        cfg = self.cfg
        relpos = RelativePositionBias(cfg, name="relpos_bias")
        nb, md = cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance
        pos = None
        if decode:
            # One new token at position `pos` attends to cache slots 0..pos.
            index = self.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
            pos = index.value
            table = jnp.asarray(relative_position_buckets(max_len, max_len, False, nb, md))
            bias_1H1S = relpos(jax.lax.dynamic_slice_in_dim(table, pos, 1, axis=0))
            causal_S = jnp.where(jnp.arange(max_len) <= pos, 0.0, _MASKED)
            self_bias = bias_1H1S + causal_S[None, None, None, :]
            index.value = pos + 1
        else:
            T = y_BTD.shape[1]
            bias_1HTT = relpos(jnp.asarray(relative_position_buckets(T, T, False, nb, md)))
            causal_TT = np.where(np.tril(np.ones((T, T), dtype=bool)), 0.0, _MASKED)
            self_bias = bias_1HTT + jnp.asarray(causal_TT, jnp.float32)[None, None]
        cross_bias = _padding_bias(enc_mask_BL)
        y_BTD = run_blocks(DecoderBlock, cfg.num_decoder_layers, y_BTD, enc_BLD, self_bias,
                           cross_bias, pos, cfg=cfg, adapter=self.adapter, decode=decode,
                           max_len=max_len)
        return RMSNorm(cfg, name="final_norm")(y_BTD)


class T5(nn.Module):
    """Encoder-decoder T5. ``__call__`` returns float32 logits (B, T, V).

    Attributes:
      cfg: the model config.
      adapter: optional ``Adapter`` called by every site (LoRA, gates, routing).
    """

    cfg: T5Config
    adapter: Any = None

    def setup(self):
        self.shared = Embedding(self.cfg)
        self.encoder = Encoder(self.cfg, self.adapter)
        self.decoder = Decoder(self.cfg, self.adapter)
        if not self.cfg.tie_word_embeddings:
            self.lm_head = Head(self.cfg)

    def encode(self, input_ids_BL: Array, mask_BL: Array) -> Array:
        """Runs the encoder once (``model.apply(..., method=T5.encode)``).

        Args:
          input_ids_BL: (B, L) int encoder tokens.
          mask_BL: (B, L) 1 for real tokens, 0 for padding.

        Returns:
          (B, L, D) the encoder output, in the compute dtype.
        """
        return self.encoder(self.shared(input_ids_BL), mask_BL)

    def decode(self, decoder_ids_BT: Array, enc_BLD: Array, enc_mask_BL: Array, *,
               decode: bool = False, max_len: int | None = None) -> Array:
        """Runs the decoder and the output head over an encoder output.

        Args:
          decoder_ids_BT: (B, T) int decoder inputs, starting with the decoder start token;
            (B, 1), the step's one new token, with ``decode=True``.
          enc_BLD: (B, L, D) ``encode``'s output.
          enc_mask_BL: (B, L) the encoder's padding mask.
          decode: one step of cached decoding (the ``cache`` collection mutable; the first call
            creates it).
          max_len: the cache's length, the most tokens a generation can reach (decode only).

        Returns:
          float32 logits (B, T, V).
        """
        y_BTD = self.decoder(self.shared(decoder_ids_BT), enc_BLD, enc_mask_BL, decode=decode,
                             max_len=max_len)
        if self.cfg.scale_decoder_outputs:
            y_BTD = y_BTD * (self.cfg.d_model**-0.5)
        if self.cfg.tie_word_embeddings:
            return self.shared.attend(y_BTD)
        return self.lm_head(y_BTD)

    def __call__(self, input_ids_BL: Array, decoder_ids_BT: Array, mask_BL: Array) -> Array:
        return self.decode(decoder_ids_BT, self.encode(input_ids_BL, mask_BL), mask_BL)


# --- functional API ---------------------------------------------------------------------------


def abstract_variables(cfg: T5Config) -> dict:
    """The model's variables as shapes (partitioning boxes kept): no compute, even for XL."""
    ids = jax.ShapeDtypeStruct((1, 4), jnp.int32)
    return jax.eval_shape(T5(cfg).init, jax.random.key(0), ids, ids, ids)


def init_params(cfg: T5Config, rng: Array | int = 0) -> dict:
    """Random base parameters with T5's initial scales, drawn with NumPy (nothing compiles).

    The one base initialiser: each parameter has the distribution ``T5(cfg).init`` gives it
    (``_init_std``), drawn from a NumPy generator, so the largest presets need no compilation.

    Args:
      cfg: the model config (shapes and the parameter dtype).
      rng: an int seed, or a JAX PRNG key (its key data seeds the generator).

    Returns:
      The base parameter tree (plain arrays, no partitioning boxes); stacked along the layers
      with ``cfg.scan_layers`` (the same draws as the per-layer tree, ``models.scan.stack_layers``).
    """
    if cfg.scan_layers:
        return stack_layers(init_params(per_layer(cfg), rng), cfg)
    return layers.draw_params(nn.meta.unbox(abstract_variables(cfg))["params"], _init_std,
                              cfg, rng)


def param_logical_axes(cfg: T5Config) -> dict:
    """The logical axis names of every base parameter, as a pytree of PartitionSpec (with
    ``cfg.scan_layers``, the stacked tree's, each block parameter led by ``"layers"``)."""
    return nn.get_partition_spec(abstract_variables(cfg))["params"]


def site_shapes(cfg: T5Config) -> dict[str, tuple[int, int]]:
    """Every adapter site of the model, ``{"encoder/block_0/self_attn/q": (I, O), ...}``.

    Ordered encoder first, then decoder, blocks ascending, as the model calls them. Computed from
    abstract shapes, so it costs nothing even for XL. Per layer even with ``cfg.scan_layers``.
    """
    abstract = nn.meta.unbox(abstract_variables(per_layer(cfg)))
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(abstract["params"])[0]:
        names = [k.key for k in path]
        if names[-1] == "kernel" and names[0] in ("encoder", "decoder"):
            out["/".join(names[:-1])] = tuple(leaf.shape)

    def order(name):
        parts = name.split("/")
        block = int(parts[1].split("_")[1])
        return (parts[0] != "encoder", block, _SITE_ORDER.index("/".join(parts[2:])))

    return {k: out[k] for k in sorted(out, key=order)}


_SITE_ORDER = tuple(f"{a}/{p}" for a in ("self_attn", "cross_attn") for p in "qkvo") + tuple(
    f"ffn/{p}" for p in ("wi", "wi_0", "wi_1", "wo"))


def model_variables(cfg, params, collections):
    """The variables the module applies: ``params`` and ``collections``, layers stacked when
    ``cfg.scan_layers``."""
    variables = {"params": params, **(collections or {})}
    # Either layout is accepted; a stacked tree passes through unchanged (no copy).
    return stack_layers(variables, cfg) if cfg.scan_layers else variables


def ones_mask(ids):
    """An all-ones int32 attention mask of ``ids``'s shape."""
    return jnp.ones(ids.shape, jnp.int32)


@functools.partial(jax.jit, static_argnames=("cfg", "adapter"))
def _logits(cfg, variables, input_ids_BL, decoder_ids_BT, mask_BL, adapter=None):
    return T5(cfg, adapter).apply(variables, input_ids_BL, decoder_ids_BT, mask_BL)


def t5_logits(cfg: T5Config, params, input_ids_BL, decoder_input_ids_BT, attention_mask_BL=None,
              *, routing=None, adapter: Adapter | None = None,
              collections: dict | None = None) -> Array:
    """Teacher-forced logits, equal to HF ``T5ForConditionalGeneration(...).logits``.

    Args:
      cfg: the model config.
      params: the base parameter tree.
      input_ids_BL: int encoder tokens.
      decoder_input_ids_BT: int decoder inputs (starting with the decoder start token).
      attention_mask_BL: 1 for real encoder tokens, 0 for padding; None means all real (as HF).
      routing: a ``goose_jax.routing.methods.Routed`` (any routing method over an expert library).
      adapter: optional site adapter (LoRA, gates, routing).
      collections: extra variable collections the adapter reads (e.g. ``{"lora": ...}``).

    Returns:
      float32 logits (B, T, V).
    """
    adapter, collections = resolve_adapter(adapter, collections, routing)
    input_ids_BL = jnp.asarray(input_ids_BL, jnp.int32)
    decoder_input_ids_BT = jnp.asarray(decoder_input_ids_BT, jnp.int32)
    mask = ones_mask(input_ids_BL) if attention_mask_BL is None else jnp.asarray(attention_mask_BL)
    variables = model_variables(cfg, params, collections)
    return _logits(cfg, variables, input_ids_BL, decoder_input_ids_BT, mask, adapter=adapter)
