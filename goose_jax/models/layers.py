"""The layers every model family builds from: the linear site, the RMS norm, the token embedding
and the untied output head, and the one random initialiser of base parameters.

Shapes follow the package legend (the ``goose_jax`` module docstring). Every module reads its
dtypes from ``cfg.dtype`` (a ``models.config.DTypePolicy``): parameters are stored in the
parameter dtype and computed with in the compute dtype.

What differs between families is passed in, not branched on here:

- the initial scales, by an ``init_rule`` ``(cfg, module, param, shape) -> std``: a positive
  float draws ``std * N(0, 1)``, 0.0 gives zeros (Gemma's norm scales); None gives ones for a
  norm's ``scale`` and zeros for anything else (biases);
  the default, ``normal_std``, is transformers' ``initializer_range`` 0.02 for kernels and
  embeddings;
- the norm's epsilon, whether its scale multiplies in float32 before the cast back (T5, Gemma)
  or after it in the compute dtype (Llama), and Gemma's ``1 + scale``;
- a factor the embedding multiplies its rows by (Gemma's sqrt(D)), in the parameter dtype.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
#: ``(cfg, module name, parameter name, shape) -> std``, None for the constant initialisers.
InitRule = Callable[[Any, str, str, tuple[int, ...]], "float | None"]
#: transformers' ``initializer_range`` of the decoder-only families.
INIT_STD = 0.02


def normal_std(cfg: Any, module: str, param: str, shape: tuple[int, ...]) -> float | None:
    """``INIT_STD`` for kernels and embeddings; None (ones for norm scales, zeros for biases)
    for the rest."""
    return INIT_STD if param in ("kernel", "embedding") else None


def initializer(rule: InitRule, cfg: Any, module: str, param: str):
    """``rule`` as a Flax initializer of parameter ``param`` of module ``module``."""

    def init(key, shape, dtype=jnp.float32):
        std = rule(cfg, module, param, tuple(shape))
        if not std:
            ones = std is None and param == "scale"
            return (jnp.ones if ones else jnp.zeros)(shape, dtype)
        return std * jax.random.normal(key, shape, dtype)

    return init


def draw_params(shapes: Any, rule: InitRule, cfg: Any, rng: Array | int = 0) -> Any:
    """Random base parameters of the abstract tree ``shapes`` (leaves with ``shape`` and
    ``dtype``), each drawn as ``rule`` says, from a NumPy generator: no compilation, so the
    largest presets initialise in the time the draws take.

    Args:
      shapes: the parameter tree, unboxed (``nn.meta.unbox``); the last two keys of a leaf's
        path are its module and parameter names.
      rule: the family's ``InitRule``.
      cfg: the model config ``rule`` reads.
      rng: an int seed, or a JAX PRNG key (its key data seeds the generator).
    """
    if isinstance(rng, (int, np.integer)):
        gen = np.random.default_rng(int(rng))
    else:
        gen = np.random.default_rng(np.asarray(jax.random.key_data(rng)).ravel())

    def draw(path, leaf):
        module, param = (str(k.key) for k in path[-2:])
        std = rule(cfg, module, param, tuple(leaf.shape))
        if not std:
            ones = std is None and param == "scale"
            return (jnp.ones if ones else jnp.zeros)(leaf.shape, leaf.dtype)
        values = gen.standard_normal(leaf.shape, np.float32) * np.float32(std)
        return jnp.asarray(values.astype(leaf.dtype))

    return jax.tree_util.tree_map_with_path(draw, shapes)


class Linear(nn.Module):
    """A named linear site: ``y = x @ kernel (+ bias) (+ adapter)``, x (..., I) -> (..., O).

    Attributes:
      features: output width O.
      axes: logical axis names of the (I, O) kernel.
      cfg: the model config (dtype policy; what ``init_rule`` reads).
      use_bias: the site has an (O,) bias (Qwen2's q, k and v).
      adapter: optional ``goose_jax.models.sites.Adapter`` applied after the base matmul.
      init_rule: the family's initial scales.
    """

    features: int
    axes: tuple[str, str]
    cfg: Any
    use_bias: bool = False
    adapter: Any = None
    init_rule: InitRule = normal_std

    @property
    def site(self) -> str:
        return "/".join(self.path)

    @nn.compact
    def __call__(self, x: Array) -> Array:
        param = self.cfg.dtype.param
        kernel_IO = self.param("kernel", nn.with_logical_partitioning(
            initializer(self.init_rule, self.cfg, self.name, "kernel"), self.axes),
            (x.shape[-1], self.features), param)
        compute = self.cfg.dtype.compute
        y = jnp.dot(x.astype(compute), kernel_IO.astype(compute))
        if self.use_bias:
            bias_O = self.param("bias", nn.with_logical_partitioning(
                initializer(self.init_rule, self.cfg, self.name, "bias"), self.axes[1:]),
                (self.features,), param)
            y = y + bias_O.astype(compute).reshape((1,) * (y.ndim - 1) + (-1,))
        if self.adapter is not None:
            y = self.adapter(self, x, y)
        return y


class RMSNorm(nn.Module):
    """Root-mean-square norm without mean or bias, statistics in float32: (..., D) -> the same
    shape in the compute dtype.

    Attributes:
      cfg: the model config.
      eps: added to the mean square.
      float32_scale: multiply by the scale in float32, then cast (T5, Gemma); otherwise cast the
        normed input first and multiply in the compute dtype (Llama).
      unit_offset: multiply by ``1 + scale`` (Gemma, whose scales start at zero).
      init_rule: the family's initial scales.
    """

    cfg: Any
    eps: float = 1e-6
    float32_scale: bool = False
    unit_offset: bool = False
    init_rule: InitRule = normal_std

    @nn.compact
    def __call__(self, x_BQD: Array) -> Array:
        scale_D = self.param("scale", nn.with_logical_partitioning(
            initializer(self.init_rule, self.cfg, self.name, "scale"), ("embed",)),
            (x_BQD.shape[-1],), self.cfg.dtype.param)
        compute = self.cfg.dtype.compute
        x32_BQD = x_BQD.astype(jnp.float32)
        var_BQ1 = jnp.mean(jnp.square(x32_BQD), axis=-1, keepdims=True)
        y_BQD = x32_BQD * jax.lax.rsqrt(var_BQ1 + self.eps)
        shape = (1,) * (y_BQD.ndim - 1) + (-1,)
        if self.float32_scale:
            scale_D = scale_D.astype(jnp.float32)
            scale_D = 1.0 + scale_D if self.unit_offset else scale_D
            return (y_BQD * scale_D.reshape(shape)).astype(compute)
        scale_D = scale_D.astype(compute)
        scale_D = 1 + scale_D if self.unit_offset else scale_D
        return scale_D.reshape(shape) * y_BQD.astype(compute)


class Embedding(nn.Module):
    """The (V, D) token embedding: int ids (B, Q) -> (B, Q, D) in the compute dtype. ``attend``
    is the tied output head, (B, Q, D) -> float32 logits (B, Q, V).

    Attributes:
      cfg: the model config (``vocab_size``, ``d_model``).
      multiplier: the rows are multiplied by this, in the parameter dtype (Gemma's sqrt(D),
        rounded to that dtype as transformers rounds it); None: not at all.
      init_rule: the family's initial scales.
    """

    cfg: Any
    multiplier: float | None = None
    init_rule: InitRule = normal_std

    def setup(self):
        self.embedding = self.param(
            "embedding", nn.with_logical_partitioning(
                initializer(self.init_rule, self.cfg, self.name, "embedding"),
                ("vocab", "embed")),
            (self.cfg.vocab_size, self.cfg.d_model), self.cfg.dtype.param)

    def __call__(self, ids_BQ: Array) -> Array:
        rows_BQD = jnp.take(self.embedding, ids_BQ, axis=0)
        if self.multiplier is not None:
            # As transformers: the factor as a float32 tensor, cast to the embedding's dtype.
            rows_BQD = rows_BQD * jnp.asarray(np.float32(self.multiplier)).astype(rows_BQD.dtype)
        return rows_BQD.astype(self.cfg.dtype.compute)

    def attend(self, x_BQD: Array) -> Array:
        compute = self.cfg.dtype.compute
        return jnp.dot(x_BQD.astype(compute), self.embedding.astype(compute).T,
                       preferred_element_type=jnp.float32)


class Head(nn.Module):
    """The untied output head (not an adapter site): (B, Q, D) -> float32 logits (B, Q, V)."""

    cfg: Any
    init_rule: InitRule = normal_std

    @nn.compact
    def __call__(self, x_BQD: Array) -> Array:
        kernel_DV = self.param("kernel", nn.with_logical_partitioning(
            initializer(self.init_rule, self.cfg, self.name, "kernel"), ("embed", "vocab")),
            (self.cfg.d_model, self.cfg.vocab_size), self.cfg.dtype.param)
        compute = self.cfg.dtype.compute
        return jnp.dot(x_BQD.astype(compute), kernel_DV.astype(compute),
                       preferred_element_type=jnp.float32)
