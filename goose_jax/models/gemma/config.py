"""The config of the Gemma family (Gemma, Gemma 2): one frozen dataclass.

``GemmaConfig`` mirrors Hugging Face's ``GemmaConfig`` / ``Gemma2Config`` (``from_hf_dict`` /
``to_hf_dict``) and ``GemmaConfig.preset`` names the published sizes. Like the other families'
configs it is hashable (a jit static argument) and validated where it is written.

Gemma 2 adds, per ``config.json``: attention-logit and final-logit soft-capping, a query scale
``query_pre_attn_scalar ** -0.5`` instead of ``head_dim ** -0.5``, and ``layer_types``, which
layers attend within a ``sliding_window`` (by default every even layer, from the first) and which
to every earlier position. Rotary embeddings are the default ones; a ``rope_type`` other than
"default" is refused.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from goose_jax.core.errors import ConfigError
from goose_jax.models.config import REMAT_NAMES, DTypePolicy

FAMILIES = ("gemma", "gemma2")
SLIDING, FULL = "sliding_attention", "full_attention"
ACTIVATIONS = ("gelu_pytorch_tanh", "gelu")
_ARCHITECTURES = {"gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM"}


def alternating_layers(num_layers: int) -> tuple[str, ...]:
    """Gemma 2's default ``layer_types``: sliding-window layers at even indices, full at odd."""
    return tuple(SLIDING if i % 2 == 0 else FULL for i in range(num_layers))


def _rope_theta(d: Mapping[str, Any], source: str) -> float:
    """``rope_theta`` from ``rope_parameters`` (transformers 5) or the top level (4); ConfigError
    for another rope type or two values that disagree."""
    thetas = []
    for key in ("rope_parameters", "rope_scaling"):
        value = d.get(key)
        if value in (None, {}):
            continue
        if not isinstance(value, Mapping):
            raise ConfigError(f"{source}: {key} {value!r} is not supported; expected an object")
        rope_type = value.get("rope_type", value.get("type", "default"))
        if rope_type != "default":
            raise ConfigError(f"{source}: {key}.rope_type {rope_type!r} is not supported for "
                              "Gemma; only 'default'")
        if value.get("rope_theta") is not None:
            thetas.append(value["rope_theta"])
    if d.get("rope_theta") is not None:
        thetas.append(d["rope_theta"])
    for theta in thetas:
        if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not theta > 0:
            raise ConfigError(f"{source}: rope_theta {theta!r} is not a positive number")
    if len(set(thetas)) > 1:
        raise ConfigError(f"{source}: the rope_theta values disagree: {thetas}")
    return float(thetas[0]) if thetas else 10000.0


@dataclasses.dataclass(frozen=True)
class GemmaConfig:
    """Architecture of a Gemma or Gemma 2 decoder.

    Attributes (HF's names in brackets where they differ):
      family: "gemma" or "gemma2" (the HF ``model_type`` written back).
      d_model [hidden_size], d_ff [intermediate_size], num_layers [num_hidden_layers],
      num_heads [num_attention_heads], num_kv_heads [num_key_value_heads], head_dim: K.
      hidden_activation: the GeGLU's gelu, "gelu_pytorch_tanh" (tanh approximation) or
        "gelu" (exact; Gemma 2 only: Gemma's config value "gelu" means the tanh one, as in
        transformers).
      attention_bias: q, k, v and o carry biases.
      query_pre_attn_scalar: queries are scaled by its inverse square root (Gemma 2); None
        means ``head_dim`` (Gemma).
      attn_logit_softcapping, final_logit_softcapping: attention scores and final logits
        become ``cap * tanh(x / cap)`` (Gemma 2); None: not capped.
      sliding_window, layer_types: the layers whose type is "sliding_attention" see only the
        last ``sliding_window`` positions (Gemma 2); Gemma's layers are all "full_attention".
      tie_word_embeddings: the output head reuses ``embed_tokens/embedding`` (every published
        Gemma).
      scan_layers, remat: the layers as one scanned body, and rematerialisation in training
        (``models.scan``); not part of the architecture.
    """

    family: str = "gemma"
    vocab_size: int = 256000
    d_model: int = 2048
    d_ff: int = 16384
    num_layers: int = 18
    num_heads: int = 8
    num_kv_heads: int = 1
    head_dim: int = 256
    hidden_activation: str = "gelu_pytorch_tanh"
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 8192
    attention_bias: bool = False
    query_pre_attn_scalar: float | None = None
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    sliding_window: int | None = None
    layer_types: tuple[str, ...] | None = None
    tie_word_embeddings: bool = True
    bos_token_id: int | None = 2
    eos_token_id: int | None = 1
    pad_token_id: int = 0
    dtype: DTypePolicy = DTypePolicy()
    scan_layers: bool = False
    remat: str = "none"

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ConfigError(f"GemmaConfig.family must be one of {list(FAMILIES)}, got "
                              f"{self.family!r}")
        if not isinstance(self.scan_layers, bool):
            raise ConfigError(f"GemmaConfig.scan_layers must be True or False, got "
                              f"{self.scan_layers!r}")
        if self.remat not in REMAT_NAMES:
            raise ConfigError(f"GemmaConfig.remat must be one of {list(REMAT_NAMES)}, got "
                              f"{self.remat!r}")
        for name in ("vocab_size", "d_model", "d_ff", "num_layers", "num_heads", "num_kv_heads",
                     "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"GemmaConfig.{name} must be a positive integer, got "
                                  f"{value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"GemmaConfig.num_heads ({self.num_heads}) must be a multiple of "
                              f"num_kv_heads ({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"GemmaConfig.head_dim must be even (rotary embeddings rotate "
                              f"pairs), got {self.head_dim}")
        if self.hidden_activation not in ACTIVATIONS:
            raise ConfigError(f"GemmaConfig.hidden_activation {self.hidden_activation!r} is not "
                              f"supported; supported: {list(ACTIVATIONS)}")
        for name in ("rms_norm_eps", "rope_theta", "query_pre_attn_scalar",
                     "attn_logit_softcapping", "final_logit_softcapping"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool)
                                      or not isinstance(value, (int, float)) or not value > 0):
                raise ConfigError(f"GemmaConfig.{name} must be a positive number, got {value!r}")
        if self.sliding_window is not None and (
                not isinstance(self.sliding_window, int) or isinstance(self.sliding_window, bool)
                or self.sliding_window < 1):
            raise ConfigError(f"GemmaConfig.sliding_window must be None or a positive integer, "
                              f"got {self.sliding_window!r}")
        if self.layer_types is not None:
            if (not isinstance(self.layer_types, tuple) or len(self.layer_types) != self.num_layers
                    or any(t not in (SLIDING, FULL) for t in self.layer_types)):
                raise ConfigError(f"GemmaConfig.layer_types must be a tuple of {self.num_layers} "
                                  f"of {[SLIDING, FULL]}, got {self.layer_types!r}")
            if SLIDING in self.layer_types and self.sliding_window is None:
                raise ConfigError("GemmaConfig: sliding_attention layers need a sliding_window")
        if self.family == "gemma":
            v2 = [n for n in ("query_pre_attn_scalar", "attn_logit_softcapping",
                              "final_logit_softcapping", "sliding_window", "layer_types")
                  if getattr(self, n) is not None]
            if v2 or self.hidden_activation != "gelu_pytorch_tanh":
                raise ConfigError(f"GemmaConfig: a gemma (v1) model has none of {v2 or ['gelu']}"
                                  "; those are gemma2's")
        if not isinstance(self.dtype, DTypePolicy):
            raise ConfigError(f"GemmaConfig.dtype must be a DTypePolicy, got "
                              f"{type(self.dtype).__name__}")

    @property
    def groups(self) -> int:
        """Query heads per key/value head."""
        return self.num_heads // self.num_kv_heads

    @property
    def query_scale(self) -> float:
        """What attention multiplies q . k by: ``query_pre_attn_scalar ** -0.5`` (Gemma 2),
        else ``head_dim ** -0.5``."""
        scalar = self.query_pre_attn_scalar
        return (self.head_dim if scalar is None else scalar) ** -0.5

    @property
    def sliding_layers(self) -> tuple[bool, ...]:
        """Per layer, whether it attends within ``sliding_window``."""
        types = self.layer_types or (FULL,) * self.num_layers
        return tuple(t == SLIDING for t in types)

    @property
    def embed_scale(self) -> float:
        """What the embedding rows are multiplied by: sqrt(D)."""
        return math.sqrt(self.d_model)

    @property
    def layer_counts(self) -> dict[str, int]:
        """Layers per stack, by the stack's scope (``models.scan``): one, at the root."""
        return {"": self.num_layers}

    def replace(self, **changes) -> GemmaConfig:
        return dataclasses.replace(self, **changes)

    def with_dtypes(self, param_dtype: str = "float32",
                    compute_dtype: str = "float32") -> GemmaConfig:
        return self.replace(dtype=DTypePolicy(param_dtype, compute_dtype))

    # --- Hugging Face config.json --------------------------------------------------------------

    @classmethod
    def from_hf_dict(cls, d: Mapping[str, Any], *, source: str = "config.json") -> GemmaConfig:
        """Builds a config from a Hugging Face Gemma / Gemma 2 ``config.json`` dict.

        Raises:
          ConfigError: naming ``source``, for another model type, missing keys or a setting
            goose-jax does not compute (rope scaling, bidirectional attention, another
            activation).
        """
        family = d.get("model_type")
        if family not in FAMILIES:
            raise ConfigError(f"{source}: model_type {family!r} is not a Gemma model; "
                              f"supported: {list(FAMILIES)}")
        missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size",
                               "num_hidden_layers", "num_attention_heads") if k not in d]
        if missing:
            raise ConfigError(f"{source}: {family} config lacks required keys {missing}")
        if d.get("use_bidirectional_attention"):
            raise ConfigError(f"{source}: use_bidirectional_attention is not supported; "
                              "goose-jax's Gemma is causal")
        act = d.get("hidden_activation") or d.get("hidden_act") or "gelu_pytorch_tanh"
        if family == "gemma" and act == "gelu":
            act = "gelu_pytorch_tanh"  # transformers reads Gemma's legacy "gelu" so
        if act == "gelu_new":
            act = "gelu_pytorch_tanh"   # the same tanh approximation
        if act not in ACTIVATIONS:
            raise ConfigError(f"{source}: hidden_activation {act!r} is not supported; only "
                              f"{list(ACTIVATIONS)} (GeGLU)")
        eos = d.get("eos_token_id")
        if isinstance(eos, (list, tuple)):
            eos = eos[0] if eos else None
        pad = d.get("pad_token_id")
        heads = int(d["num_attention_heads"])
        v2: dict[str, Any] = {}
        if family == "gemma2":
            layers = int(d["num_hidden_layers"])
            types = d.get("layer_types")
            v2 = dict(
                query_pre_attn_scalar=d.get("query_pre_attn_scalar", 256),
                attn_logit_softcapping=d.get("attn_logit_softcapping", 50.0),
                final_logit_softcapping=d.get("final_logit_softcapping", 30.0),
                sliding_window=d.get("sliding_window", 4096),
                layer_types=alternating_layers(layers) if types is None else tuple(types))
            if v2["sliding_window"] is None:   # no window: every layer full
                v2["layer_types"] = (FULL,) * layers
        try:
            return cls(
                family=family, vocab_size=int(d["vocab_size"]), d_model=int(d["hidden_size"]),
                d_ff=int(d["intermediate_size"]), num_layers=int(d["num_hidden_layers"]),
                num_heads=heads, num_kv_heads=int(d.get("num_key_value_heads") or heads),
                head_dim=int(d.get("head_dim") or int(d["hidden_size"]) // heads),
                hidden_activation=act, rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
                rope_theta=_rope_theta(d, source),
                max_position_embeddings=int(d.get("max_position_embeddings", 8192)),
                attention_bias=bool(d.get("attention_bias", False)),
                tie_word_embeddings=bool(d.get("tie_word_embeddings", True)),
                bos_token_id=d.get("bos_token_id"), eos_token_id=eos,
                pad_token_id=int(pad if pad is not None else eos if eos is not None else 0),
                **v2)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"{source}: {e}") from None

    def to_hf_dict(self) -> dict[str, Any]:
        """The ``config.json`` dictionary transformers reads back as this model."""
        d: dict[str, Any] = {
            "architectures": [_ARCHITECTURES[self.family]],
            "model_type": self.family,
            "vocab_size": self.vocab_size,
            "hidden_size": self.d_model,
            "intermediate_size": self.d_ff,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            # Both spellings: transformers 5 reads rope_parameters, 4 reads rope_theta.
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
            "rope_theta": self.rope_theta,
            "attention_bias": self.attention_bias,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "dtype": self.dtype.param_dtype,
        }
        if self.family == "gemma":
            d["hidden_act"] = self.hidden_activation
        else:
            d.update(hidden_activation=self.hidden_activation,
                     query_pre_attn_scalar=self.query_pre_attn_scalar,
                     attn_logit_softcapping=self.attn_logit_softcapping,
                     final_logit_softcapping=self.final_logit_softcapping,
                     sliding_window=self.sliding_window,
                     layer_types=list(self.layer_types or (FULL,) * self.num_layers))
        return d

    # --- presets -------------------------------------------------------------------------------

    @classmethod
    def preset(cls, name: str) -> GemmaConfig:
        """Published shapes: ``gemma-2b``, ``gemma-7b``, ``gemma2-2b``, ``gemma2-9b``, and
        ``tiny`` / ``gemma2-tiny`` (for tests)."""
        try:
            return _PRESETS[name]
        except KeyError:
            raise ConfigError(f"unknown Gemma preset {name!r}; known: {sorted(_PRESETS)}") \
                from None


def _gemma2(num_layers: int, **kwargs) -> GemmaConfig:
    kwargs.setdefault("query_pre_attn_scalar", 256)
    return GemmaConfig(family="gemma2", num_layers=num_layers, attn_logit_softcapping=50.0,
                       final_logit_softcapping=30.0, sliding_window=4096,
                       layer_types=alternating_layers(num_layers), **kwargs)


_PRESETS = {
    "gemma-2b": GemmaConfig(d_model=2048, d_ff=16384, num_layers=18, num_heads=8,
                            num_kv_heads=1, head_dim=256),
    "gemma-7b": GemmaConfig(d_model=3072, d_ff=24576, num_layers=28, num_heads=16,
                            num_kv_heads=16, head_dim=256),
    "gemma2-2b": _gemma2(26, d_model=2304, d_ff=9216, num_heads=8, num_kv_heads=4,
                         head_dim=256),
    "gemma2-9b": _gemma2(42, d_model=3584, d_ff=14336, num_heads=16, num_kv_heads=8,
                         head_dim=256),
    "tiny": GemmaConfig(vocab_size=101, d_model=24, d_ff=40, num_layers=2, num_heads=4,
                        num_kv_heads=2, head_dim=8, max_position_embeddings=64),
    "gemma2-tiny": GemmaConfig(family="gemma2", vocab_size=101, d_model=24, d_ff=40,
                               num_layers=4, num_heads=4, num_kv_heads=2, head_dim=8,
                               max_position_embeddings=64, query_pre_attn_scalar=12,
                               attn_logit_softcapping=5.0, final_logit_softcapping=3.0,
                               sliding_window=3, layer_types=alternating_layers(4)),
}
