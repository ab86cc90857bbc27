"""The T5 family in Flax Linen: v1.0, v1.1 / LM-adapted, FLAN-T5.

Shape legend: B batch, L encoder length, T decoder length, S key length, D d_model, F d_ff,
H heads, K head dim, V vocab, N relative-position buckets.

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
from typing import Any, Protocol

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from goose_jax.config import T5Config
from goose_jax.errors import ConfigError

Array = jax.Array
# Added to attention scores at masked positions. Finite so that bias + mask cannot overflow.
_MASKED = -1e9


class Adapter(Protocol):
    """What a site calls after its base matmul. Must be hashable (it is a jit static argument).

    ``module`` is the calling ``Linear``: ``module.site`` is its name, and the adapter may read
    variables of its own collections there (``module.get_variable('lora', 'a')``).
    """

    def __call__(self, module: Linear, x: Array, y: Array) -> Array: ...


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


def _normal(stddev: float):
    return nn.initializers.normal(stddev=stddev)


class Linear(nn.Module):
    """A named linear site without bias: ``y = x @ kernel (+ adapter)``.

    Attributes:
      features: output width.
      axes: logical axis names of the (d_in, d_out) kernel.
      cfg: the model config (dtype policy).
      adapter: optional ``Adapter`` applied after the base matmul.
      init_scale: extra factor on the 1/sqrt(d_in) initialisation (T5 folds 1/sqrt(K) into q).
    """

    features: int
    axes: tuple[str, str]
    cfg: T5Config
    adapter: Any = None
    init_scale: float = 1.0

    @property
    def site(self) -> str:
        return "/".join(self.path)

    @nn.compact
    def __call__(self, x: Array) -> Array:
        d_in = x.shape[-1]
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(_normal(self.init_scale * d_in**-0.5), self.axes),
            (d_in, self.features), self.cfg.dtype.param)
        compute = self.cfg.dtype.compute
        y = jnp.dot(x.astype(compute), kernel.astype(compute))
        if self.adapter is not None:
            y = self.adapter(self, x, y)
        return y


class RMSNorm(nn.Module):
    """T5's layer norm: scale only, no mean subtraction, statistics in float32."""

    cfg: T5Config

    @nn.compact
    def __call__(self, x_BLD: Array) -> Array:
        scale_D = self.param(
            "scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
            (x_BLD.shape[-1],), self.cfg.dtype.param)
        x32 = x_BLD.astype(jnp.float32)
        var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
        y = x32 * jax.lax.rsqrt(var + self.cfg.layer_norm_epsilon)
        return (y * scale_D.astype(jnp.float32)).astype(self.cfg.dtype.compute)


class Embedding(nn.Module):
    """The shared token embedding; ``attend`` is the tied output head."""

    cfg: T5Config

    def setup(self):
        self.embedding = self.param(
            "embedding", nn.with_logical_partitioning(_normal(1.0), ("vocab", "embed")),
            (self.cfg.vocab_size, self.cfg.d_model), self.cfg.dtype.param)

    def __call__(self, ids: Array) -> Array:
        return jnp.take(self.embedding, ids, axis=0).astype(self.cfg.dtype.compute)

    def attend(self, x_BTD: Array) -> Array:
        compute = self.cfg.dtype.compute
        return jnp.dot(x_BTD.astype(compute), self.embedding.astype(compute).T,
                       preferred_element_type=jnp.float32)


class Head(nn.Module):
    """The untied output head of T5 v1.1 / FLAN-T5 (not an adapter site)."""

    cfg: T5Config

    @nn.compact
    def __call__(self, x_BTD: Array) -> Array:
        kernel_DV = self.param(
            "kernel",
            nn.with_logical_partitioning(_normal(self.cfg.d_model**-0.5), ("embed", "vocab")),
            (self.cfg.d_model, self.cfg.vocab_size), self.cfg.dtype.param)
        compute = self.cfg.dtype.compute
        return jnp.dot(x_BTD.astype(compute), kernel_DV.astype(compute),
                       preferred_element_type=jnp.float32)


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
    cfg: T5Config

    @nn.compact
    def __call__(self, buckets_QS: Array) -> Array:
        """Returns the bias (1, H, Q, S) in float32 for a (Q, S) bucket matrix."""
        table_NH = self.param(
            "embedding", nn.with_logical_partitioning(_normal(1.0), ("relpos_buckets", "heads")),
            (self.cfg.relative_attention_num_buckets, self.cfg.num_heads), self.cfg.dtype.param)
        bias_QSH = jnp.take(table_NH.astype(jnp.float32), buckets_QS, axis=0)
        return jnp.transpose(bias_QSH, (2, 0, 1))[None]


class Attention(nn.Module):
    """Multi-head attention with q, k, v, o sites and an optional decoding cache.

    In decode mode a self-attention layer keeps (B, S_max, H, K) key and value caches and writes
    the new token at ``pos``; a cross-attention layer projects the encoder output once, at the
    first step, and reads its cached keys and values afterwards.
    """

    cfg: T5Config
    adapter: Any = None
    cross: bool = False

    @nn.compact
    def __call__(self, x_BTD: Array, kv_BSD: Array, bias_BHTS: Array, *, decode: bool = False,
                 pos: Array | None = None, max_len: int | None = None) -> Array:
        cfg = self.cfg
        H, K = cfg.num_heads, cfg.d_kv
        site = functools.partial(Linear, cfg=cfg, adapter=self.adapter)
        q_layer = site(H * K, ("embed", "joined_kv"), init_scale=K**-0.5, name="q")
        k_layer = site(H * K, ("embed", "joined_kv"), name="k")
        v_layer = site(H * K, ("embed", "joined_kv"), name="v")
        o_layer = site(cfg.d_model, ("joined_kv", "embed"), name="o")

        B, T = x_BTD.shape[:2]
        q_BTHK = q_layer(x_BTD).reshape(B, T, H, K)
        if decode and self.cross:
            # The initialiser runs only at the first step; later steps read the projection.
            ck = self.variable("cache", "cached_key", lambda: k_layer(kv_BSD))
            cv = self.variable("cache", "cached_value", lambda: v_layer(kv_BSD))
            k_BSE, v_BSE = ck.value, cv.value
        elif decode:
            shape = (B, max_len, H * K)
            ck = self.variable("cache", "cached_key", jnp.zeros, shape, cfg.dtype.compute)
            cv = self.variable("cache", "cached_value", jnp.zeros, shape, cfg.dtype.compute)
            ck.value = jax.lax.dynamic_update_slice_in_dim(ck.value, k_layer(kv_BSD), pos, axis=1)
            cv.value = jax.lax.dynamic_update_slice_in_dim(cv.value, v_layer(kv_BSD), pos, axis=1)
            k_BSE, v_BSE = ck.value, cv.value
        else:
            k_BSE, v_BSE = k_layer(kv_BSD), v_layer(kv_BSD)
        S = k_BSE.shape[1]
        k_BSHK = k_BSE.reshape(B, S, H, K)
        v_BSHK = v_BSE.reshape(B, S, H, K)

        scores_BHTS = jnp.einsum("bthk,bshk->bhts", q_BTHK, k_BSHK,
                                 preferred_element_type=jnp.float32) + bias_BHTS
        probs_BHTS = jax.nn.softmax(scores_BHTS, axis=-1).astype(cfg.dtype.compute)
        out_BTHK = jnp.einsum("bhts,bshk->bthk", probs_BHTS, v_BSHK)
        return o_layer(out_BTHK.reshape(B, T, H * K))


class FeedForward(nn.Module):
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
    cfg: T5Config
    adapter: Any = None

    @nn.compact
    def __call__(self, x_BLD: Array, bias_BHLL: Array) -> Array:
        h = RMSNorm(self.cfg, name="self_attn_norm")(x_BLD)
        x_BLD = x_BLD + Attention(self.cfg, self.adapter, name="self_attn")(h, h, bias_BHLL)
        h = RMSNorm(self.cfg, name="ffn_norm")(x_BLD)
        return x_BLD + FeedForward(self.cfg, self.adapter, name="ffn")(h)


class DecoderBlock(nn.Module):
    cfg: T5Config
    adapter: Any = None

    @nn.compact
    def __call__(self, y_BTD: Array, enc_BLD: Array, self_bias: Array, cross_bias: Array, *,
                 decode: bool = False, pos: Array | None = None,
                 max_len: int | None = None) -> Array:
        h = RMSNorm(self.cfg, name="self_attn_norm")(y_BTD)
        y_BTD = y_BTD + Attention(self.cfg, self.adapter, name="self_attn")(
            h, h, self_bias, decode=decode, pos=pos, max_len=max_len)
        h = RMSNorm(self.cfg, name="cross_attn_norm")(y_BTD)
        y_BTD = y_BTD + Attention(self.cfg, self.adapter, cross=True, name="cross_attn")(
            h, enc_BLD, cross_bias, decode=decode)
        h = RMSNorm(self.cfg, name="ffn_norm")(y_BTD)
        return y_BTD + FeedForward(self.cfg, self.adapter, name="ffn")(h)


def _padding_bias(mask_BL: Array) -> Array:
    """(B, L) 1/0 mask -> (B, 1, 1, L) additive float32 bias."""
    return jnp.where(mask_BL.astype(bool), 0.0, _MASKED)[:, None, None, :].astype(jnp.float32)


class Encoder(nn.Module):
    cfg: T5Config
    adapter: Any = None

    @nn.compact
    def __call__(self, x_BLD: Array, mask_BL: Array) -> Array:
        cfg = self.cfg
        L = x_BLD.shape[1]
        buckets_LL = relative_position_buckets(L, L, True, cfg.relative_attention_num_buckets,
                                               cfg.relative_attention_max_distance)
        bias = RelativePositionBias(cfg, name="relpos_bias")(jnp.asarray(buckets_LL))
        bias_BHLL = bias + _padding_bias(mask_BL)
        for i in range(cfg.num_encoder_layers):
            x_BLD = EncoderBlock(cfg, self.adapter, name=f"block_{i}")(x_BLD, bias_BHLL)
        return RMSNorm(cfg, name="final_norm")(x_BLD)


class Decoder(nn.Module):
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
            bias = relpos(jax.lax.dynamic_slice_in_dim(table, pos, 1, axis=0))
            causal_S = jnp.where(jnp.arange(max_len) <= pos, 0.0, _MASKED)
            self_bias = bias + causal_S[None, None, None, :]
            index.value = pos + 1
        else:
            T = y_BTD.shape[1]
            bias = relpos(jnp.asarray(relative_position_buckets(T, T, False, nb, md)))
            causal_TT = np.where(np.tril(np.ones((T, T), dtype=bool)), 0.0, _MASKED)
            self_bias = bias + jnp.asarray(causal_TT, jnp.float32)[None, None]
        cross_bias = _padding_bias(enc_mask_BL)
        for i in range(cfg.num_decoder_layers):
            y_BTD = DecoderBlock(cfg, self.adapter, name=f"block_{i}")(
                y_BTD, enc_BLD, self_bias, cross_bias, decode=decode, pos=pos, max_len=max_len)
        return RMSNorm(cfg, name="final_norm")(y_BTD)


class T5(nn.Module):
    """Encoder-decoder T5. ``__call__`` returns float32 logits (B, T, V)."""

    cfg: T5Config
    adapter: Any = None

    def setup(self):
        self.shared = Embedding(self.cfg)
        self.encoder = Encoder(self.cfg, self.adapter)
        self.decoder = Decoder(self.cfg, self.adapter)
        if not self.cfg.tie_word_embeddings:
            self.lm_head = Head(self.cfg)

    def encode(self, input_ids_BL: Array, mask_BL: Array) -> Array:
        return self.encoder(self.shared(input_ids_BL), mask_BL)

    def decode(self, decoder_ids_BT: Array, enc_BLD: Array, enc_mask_BL: Array, *,
               decode: bool = False, max_len: int | None = None) -> Array:
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


def init_params(cfg: T5Config, rng: Array | int = 0) -> dict:
    """Random base parameters (plain arrays, no partitioning boxes)."""
    if isinstance(rng, int):
        rng = jax.random.key(rng)
    ids = jnp.ones((1, 4), jnp.int32)
    variables = jax.jit(T5(cfg).init)(rng, ids, ids, ids)
    return nn.meta.unbox(variables["params"])


def param_logical_axes(cfg: T5Config) -> dict:
    """The logical axis names of every base parameter, as a pytree of PartitionSpec."""
    ids = jax.ShapeDtypeStruct((1, 4), jnp.int32)
    abstract = jax.eval_shape(T5(cfg).init, jax.random.key(0), ids, ids, ids)
    return nn.get_partition_spec(abstract)["params"]


def site_shapes(cfg: T5Config) -> dict[str, tuple[int, int]]:
    """Every adapter site of the model, ``{"encoder/block_0/self_attn/q": (d_in, d_out), ...}``.

    Ordered encoder first, then decoder, blocks ascending, as the model calls them. Computed from
    abstract shapes, so it costs nothing even for XL.
    """
    ids = jax.ShapeDtypeStruct((1, 4), jnp.int32)
    abstract = nn.meta.unbox(jax.eval_shape(T5(cfg).init, jax.random.key(0), ids, ids, ids))
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


def _variables(params, collections):
    return {"params": params, **(collections or {})}


def _ones_mask(ids):
    return jnp.ones(ids.shape, jnp.int32)


@functools.partial(jax.jit, static_argnames=("cfg", "adapter"))
def _logits(cfg, variables, input_ids_BL, decoder_ids_BT, mask_BL, adapter=None):
    return T5(cfg, adapter).apply(variables, input_ids_BL, decoder_ids_BT, mask_BL)


def _resolve(adapter, collections, routing):
    if routing is None:
        return adapter, collections
    if adapter is not None or collections is not None:
        raise ValueError("pass either routing= or adapter= / collections=, not both")
    return routing.adapter, routing.collections


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
      routing: a ``goose_jax.routers.Routed`` (any routing method over an expert library).
      adapter: optional site adapter (LoRA, gates, routing).
      collections: extra variable collections the adapter reads (e.g. ``{"lora": ...}``).

    Returns:
      float32 logits (B, T, V).
    """
    adapter, collections = _resolve(adapter, collections, routing)
    input_ids_BL = jnp.asarray(input_ids_BL, jnp.int32)
    decoder_input_ids_BT = jnp.asarray(decoder_input_ids_BT, jnp.int32)
    mask = _ones_mask(input_ids_BL) if attention_mask_BL is None else jnp.asarray(attention_mask_BL)
    return _logits(cfg, _variables(params, collections), input_ids_BL, decoder_input_ids_BT,
                   mask, adapter=adapter)


# XLA's CPU backend spends most of a small model's compile time in LLVM optimisation and its
# fusion emitters; without them small models compile several times faster and run up to 2x
# slower (tests, smoke runs, the miniature world).
FAST_COMPILE_OPTIONS = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}


def _generate_impl(cfg, variables, input_ids_BL, mask_BL, max_new_tokens, adapter=None):
    model = T5(cfg, adapter)
    B = input_ids_BL.shape[0]
    N = max_new_tokens
    enc_BLD = model.apply(variables, input_ids_BL, mask_BL, method=T5.encode)

    def step(cache, tok_B):
        vs = dict(variables) if cache is None else {**variables, "cache": cache}
        logits, mutated = model.apply(vs, tok_B[:, None], enc_BLD, mask_BL, decode=True,
                                      max_len=N, method=T5.decode, mutable=["cache"])
        return jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32), mutated["cache"]

    start_B = jnp.full((B,), cfg.decoder_start_token_id, jnp.int32)
    tok_B, cache = step(None, start_B)
    out_BN = jnp.zeros((B, N), jnp.int32).at[:, 0].set(tok_B)
    done_B = tok_B == cfg.eos_token_id

    def cond(state):
        i, _, _, _, done_B = state
        return (i < N) & ~jnp.all(done_B)

    def body(state):
        i, out_BN, cache, tok_B, done_B = state
        new_B, cache = step(cache, tok_B)
        new_B = jnp.where(done_B, cfg.pad_token_id, new_B)
        out_BN = jax.lax.dynamic_update_slice_in_dim(out_BN, new_B[:, None], i, axis=1)
        return i + 1, out_BN, cache, new_B, done_B | (new_B == cfg.eos_token_id)

    state = (jnp.asarray(1, jnp.int32), out_BN, cache, tok_B, done_B)
    return jax.lax.while_loop(cond, body, state)[1]


_GENERATE_STATIC = ("cfg", "max_new_tokens", "adapter")
_generate = jax.jit(_generate_impl, static_argnames=_GENERATE_STATIC)
_generate_fast = jax.jit(_generate_impl, static_argnames=_GENERATE_STATIC,
                         compiler_options=FAST_COMPILE_OPTIONS)


def generate_greedy(cfg: T5Config, params, input_ids_BL, max_new_tokens: int,
                    attention_mask_BL=None, *, routing=None, adapter: Adapter | None = None,
                    collections: dict | None = None, fast_compile: bool = False) -> Array:
    """Greedy decoding with a key/value cache, jitted with static shapes.

    ``fast_compile`` compiles with ``FAST_COMPILE_OPTIONS`` (quicker to compile, slower to run).

    Returns:
      int32 (B, max_new_tokens): the new tokens without the decoder start token; a row stops at
      its EOS and is padded with ``cfg.pad_token_id`` (0) after it. Every decoder step is one
      token through every site, so routing adapters route each generated token on its own.
    """
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    adapter, collections = _resolve(adapter, collections, routing)
    input_ids_BL = jnp.asarray(input_ids_BL, jnp.int32)
    mask = _ones_mask(input_ids_BL) if attention_mask_BL is None else jnp.asarray(attention_mask_BL)
    fn = _generate_fast if fast_compile else _generate
    return fn(cfg, _variables(params, collections), input_ids_BL, mask, int(max_new_tokens),
              adapter=adapter)


def random_params(cfg, seed: int) -> dict:
    """A seeded random base drawn with NumPy (no compilation): T5's init scales, for smoke runs."""
    ids = jax.ShapeDtypeStruct((1, 4), jnp.int32)
    shapes = nn.meta.unbox(jax.eval_shape(T5(cfg).init, jax.random.key(0), ids, ids, ids))
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = "/".join(str(k.key) for k in path)
        if name.endswith("norm/scale"):
            return jnp.ones(leaf.shape, leaf.dtype)
        std = 1.0 if name.endswith("embedding") else leaf.shape[0] ** -0.5
        return jnp.asarray(rng.normal(0.0, std, leaf.shape).astype(leaf.dtype))

    return jax.tree_util.tree_map_with_path(draw, shapes["params"])
