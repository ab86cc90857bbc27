"""The config of the decoder-only family (Llama, Qwen2, Mistral): one frozen dataclass.

``DecoderConfig`` mirrors Hugging Face's ``LlamaConfig`` / ``Qwen2Config`` / ``MistralConfig``
(``from_hf_dict`` / ``to_hf_dict``), and ``DecoderConfig.preset`` names the common sizes. Like
``T5Config`` it is hashable (a jit static argument) and validated where it is written.

Rotary position embeddings: ``rope_type`` "default", "linear" and "llama3" (Llama 3.1 / 3.2)
are supported; "dynamic", "yarn", "longrope" and the others transformers knows are refused with
a ``ConfigError`` rather than silently computed as "default". ``read_rope`` is the one reader of
the rope keys, in both layouts (``rope_parameters``, ``rope_scaling`` + ``rope_theta``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from goose_jax.core.errors import ConfigError
from goose_jax.models.config import REMAT_NAMES, DTypePolicy

FAMILIES = ("llama", "qwen2", "mistral")
ROPE_TYPES = ("default", "linear", "llama3")
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                  "mistral": "MistralForCausalLM"}


# The keys each supported rope_type reads (besides rope_type / type); anything else is refused.
_ROPE_PARAMS = {"default": ("rope_theta",), "linear": ("rope_theta", "factor"),
                "llama3": ("rope_theta", "factor", "low_freq_factor", "high_freq_factor",
                           "original_max_position_embeddings")}


def _number(key: str, value: Any, source: str, *, integer: bool = False) -> float | int:
    ok = (isinstance(value, int) if integer else isinstance(value, (int, float)))
    if not ok or isinstance(value, bool) or not (value > 0) or value == float("inf"):
        kind = "a positive integer" if integer else "a positive number"
        raise ConfigError(f"{source}: {key} {value!r} is not supported; expected {kind}")
    return value


def _rope_layout(d: Mapping[str, Any], key: str, source: str) -> dict[str, Any] | None:
    """One rope layout (``rope_parameters`` or ``rope_scaling``) as {rope_type, params...}, or
    None where the key is absent, null or empty."""
    value = d.get(key)
    if value is None or value == {}:
        return None
    if not isinstance(value, Mapping):
        raise ConfigError(f"{source}: {key} {value!r} is not supported; expected an object "
                          f"such as {{\"rope_type\": \"linear\", \"factor\": 2.0}}")
    names = [n for n in ("rope_type", "type") if n in value]
    types = {value[n] for n in names if isinstance(value[n], str)}
    if len(types) > 1:
        raise ConfigError(f"{source}: {key} names two rope types: type {value['type']!r}, "
                          f"rope_type {value['rope_type']!r}")
    rope_type = value[names[0]] if names else "default"
    if rope_type not in _ROPE_PARAMS:
        raise ConfigError(f"{source}: {key}.{names[0] if names else 'rope_type'} {rope_type!r} "
                          f"is not supported; supported: {list(_ROPE_PARAMS)}")
    out: dict[str, Any] = {"rope_type": rope_type}
    for name, v in value.items():
        if name in names:
            continue
        if name not in _ROPE_PARAMS[rope_type]:
            raise ConfigError(f"{source}: {key}.{name} {v!r} is not supported with rope_type "
                              f"{rope_type!r}; it reads only {list(_ROPE_PARAMS[rope_type])}")
        out[name] = _number(f"{key}.{name}", v, source,
                            integer=name == "original_max_position_embeddings")
    return out


def read_rope(d: Mapping[str, Any], source: str = "config.json") -> dict[str, Any]:
    """The rotary settings of a Hugging Face decoder ``config.json``, from either layout.

    transformers 5 writes ``rope_parameters`` (with ``rope_theta`` inside); transformers 4
    wrote ``rope_scaling`` (``type`` or ``rope_type``) beside a top-level ``rope_theta``. Both
    are read; where a file has both (goose-jax writes both, equal) they must agree on every
    value either gives, as must every ``rope_theta`` given. Only what
    ``goose_jax.models.llama.model``
    computes is accepted: ``rope_type`` default, linear or llama3 with the keys that type
    reads; another type, another key, or a value that is not a positive number is refused.

    Returns:
      {"rope_type", "rope_theta", and the type's other keys where given}.

    Raises:
      ConfigError: one line naming ``source``, the key and its value.
    """
    layouts = {k: _rope_layout(d, k, source) for k in ("rope_parameters", "rope_scaling")}
    given = {k: v for k, v in layouts.items() if v is not None}
    if len(given) == 2:
        a, b = given["rope_parameters"], given["rope_scaling"]
        for name in ["rope_type", *sorted((set(a) | set(b)) - {"rope_type"})]:
            if name == "rope_theta" and (name not in a or name not in b):
                continue
            if a.get(name) != b.get(name):
                raise ConfigError(f"{source}: rope_parameters and rope_scaling disagree on "
                                  f"{name} ({a.get(name)!r} and {b.get(name)!r}); keep one")
    rope = dict(given.get("rope_parameters") or given.get("rope_scaling") or
                {"rope_type": "default"})
    thetas = {f"{k}.rope_theta": v["rope_theta"] for k, v in given.items() if "rope_theta" in v}
    if d.get("rope_theta") is not None:
        thetas["rope_theta"] = _number("rope_theta", d["rope_theta"], source)
    if len(set(thetas.values())) > 1:
        raise ConfigError(f"{source}: the rope_theta values disagree: "
                          + ", ".join(f"{k} {v!r}" for k, v in thetas.items()))
    rope["rope_theta"] = next(iter(thetas.values()), 10000.0)
    lacking = [k for k in _ROPE_PARAMS[rope["rope_type"]][1:4] if k not in rope]
    if lacking:
        raise ConfigError(f"{source}: rope_type {rope['rope_type']!r} needs {lacking} in "
                          f"{next(iter(given))}")
    if d.get("partial_rotary_factor") not in (None, 1, 1.0):
        raise ConfigError(f"{source}: partial_rotary_factor {d['partial_rotary_factor']!r} is "
                          "not supported; rotary embeddings cover the whole head (1.0)")
    return rope


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """Architecture of a decoder-only transformer of the Llama family.

    Attributes (HF's names in brackets where they differ):
      family: "llama", "qwen2" or "mistral" (the HF ``model_type`` written back).
      d_model [hidden_size], d_ff [intermediate_size], num_layers [num_hidden_layers],
      num_heads [num_attention_heads], num_kv_heads [num_key_value_heads] (grouped-query
        attention: each key/value head serves ``num_heads // num_kv_heads`` query heads),
      head_dim: K; HF's default is ``d_model // num_heads``.
      rope_theta, rope_type, rope_factor, rope_low_freq_factor, rope_high_freq_factor,
        rope_original_max_position_embeddings: HF's ``rope_parameters`` (see module doc).
      sliding_window: a query sees only the last ``sliding_window`` positions (Mistral); None
        means full causal attention.
      qkv_bias: q, k and v carry biases (Qwen2; Llama's ``attention_bias``); o_bias: o does
        (Llama's ``attention_bias`` only); mlp_bias: gate, up and down do (Llama's ``mlp_bias``).
      tie_word_embeddings: the output head reuses ``embed_tokens/embedding``.
      scan_layers: run the layers as one ``nn.scan`` over a stacked body (one layer to compile;
        the trees it reads are stacked, ``models.scan.stack_layers``).
      remat: activation rematerialisation per layer in training: "none", "block" (keep only
        each layer's input) or "dots" (keep the sites' matmul outputs); see
        ``models.scan.REMAT_POLICIES``. Neither is part of the architecture (not recorded).
    """

    family: str = "llama"
    vocab_size: int = 32000
    d_model: int = 4096
    d_ff: int = 11008
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    head_dim: int = 128
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_type: str = "default"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position_embeddings: int = 8192
    max_position_embeddings: int = 4096
    sliding_window: int | None = None
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    pad_token_id: int = 0
    dtype: DTypePolicy = DTypePolicy()
    scan_layers: bool = False
    remat: str = "none"

    def __post_init__(self):
        if not isinstance(self.scan_layers, bool):
            raise ConfigError(f"DecoderConfig.scan_layers must be True or False, got "
                              f"{self.scan_layers!r}")
        if self.remat not in REMAT_NAMES:
            raise ConfigError(f"DecoderConfig.remat must be one of {list(REMAT_NAMES)}, got "
                              f"{self.remat!r}")
        if self.family not in FAMILIES:
            raise ConfigError(f"DecoderConfig.family must be one of {list(FAMILIES)}, got "
                              f"{self.family!r}")
        for name in ("vocab_size", "d_model", "d_ff", "num_layers", "num_heads", "num_kv_heads",
                     "head_dim", "max_position_embeddings",
                     "rope_original_max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"DecoderConfig.{name} must be a positive integer, got "
                                  f"{value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"DecoderConfig.num_heads ({self.num_heads}) must be a multiple of "
                              f"num_kv_heads ({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"DecoderConfig.head_dim must be even (rotary embeddings rotate "
                              f"pairs), got {self.head_dim}")
        if self.rope_type not in ROPE_TYPES:
            raise ConfigError(f"DecoderConfig.rope_type {self.rope_type!r} is not supported; "
                              f"supported: {list(ROPE_TYPES)}")
        if self.rope_theta <= 0 or self.rope_factor <= 0 or self.rms_norm_eps <= 0:
            raise ConfigError("DecoderConfig.rope_theta, rope_factor and rms_norm_eps must be "
                              f"> 0, got {self.rope_theta}, {self.rope_factor}, "
                              f"{self.rms_norm_eps}")
        if self.rope_type == "llama3" and not (
                0 < self.rope_low_freq_factor < self.rope_high_freq_factor):
            raise ConfigError("DecoderConfig: llama3 rope needs 0 < rope_low_freq_factor < "
                              f"rope_high_freq_factor, got {self.rope_low_freq_factor}, "
                              f"{self.rope_high_freq_factor}")
        if self.sliding_window is not None and (
                not isinstance(self.sliding_window, int) or self.sliding_window < 1):
            raise ConfigError(f"DecoderConfig.sliding_window must be None or a positive "
                              f"integer, got {self.sliding_window!r}")
        if not isinstance(self.dtype, DTypePolicy):
            raise ConfigError(f"DecoderConfig.dtype must be a DTypePolicy, got "
                              f"{type(self.dtype).__name__}")

    @property
    def groups(self) -> int:
        """Query heads per key/value head."""
        return self.num_heads // self.num_kv_heads

    def replace(self, **changes) -> DecoderConfig:
        return dataclasses.replace(self, **changes)

    def with_dtypes(self, param_dtype: str = "float32",
                    compute_dtype: str = "float32") -> DecoderConfig:
        return self.replace(dtype=DTypePolicy(param_dtype, compute_dtype))

    # --- Hugging Face config.json --------------------------------------------------------------

    @classmethod
    def from_hf_dict(cls, d: Mapping[str, Any], *, source: str = "config.json") -> DecoderConfig:
        """Builds a config from a Hugging Face Llama / Qwen2 / Mistral ``config.json`` dict.

        Reads the rotary settings from ``rope_parameters`` (transformers 5) or ``rope_theta`` +
        ``rope_scaling`` (transformers 4).

        Raises:
          ConfigError: naming ``source``, for another model type, missing keys or a rotary
            scaling that is not supported.
        """
        family = d.get("model_type")
        if family not in FAMILIES:
            raise ConfigError(f"{source}: model_type {family!r} is not a supported decoder-only "
                              f"model; supported: {list(FAMILIES)}")
        missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size",
                               "num_hidden_layers", "num_attention_heads") if k not in d]
        if missing:
            raise ConfigError(f"{source}: {family} config lacks required keys {missing}")
        if family == "qwen2" and d.get("use_sliding_window"):
            raise ConfigError(f"{source}: Qwen2 use_sliding_window (per-layer windows) is not "
                              "supported; set it to false")
        if d.get("hidden_act", "silu") not in ("silu", "swish"):
            raise ConfigError(f"{source}: hidden_act {d.get('hidden_act')!r} is not supported; "
                              "only silu (SwiGLU)")
        if d.get("pretraining_tp", 1) not in (1, None):
            raise ConfigError(f"{source}: pretraining_tp must be 1")
        rope = read_rope(d, source)
        rope_type = rope["rope_type"]
        heads = int(d["num_attention_heads"])
        window = d.get("sliding_window") if family == "mistral" else None
        eos = d.get("eos_token_id")
        if isinstance(eos, (list, tuple)):
            eos = eos[0] if eos else None
        pad = d.get("pad_token_id")
        attention_bias = bool(d.get("attention_bias", False))
        try:
            return cls(
                family=family, vocab_size=int(d["vocab_size"]), d_model=int(d["hidden_size"]),
                d_ff=int(d["intermediate_size"]), num_layers=int(d["num_hidden_layers"]),
                num_heads=heads, num_kv_heads=int(d.get("num_key_value_heads") or heads),
                head_dim=int(d.get("head_dim") or int(d["hidden_size"]) // heads),
                rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
                rope_theta=float(rope["rope_theta"]), rope_type=rope_type,
                rope_factor=float(rope.get("factor", 1.0)),
                rope_low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
                rope_high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
                # Only llama3 scaling reads it; otherwise the field keeps its default, so that
                # a config survives to_hf_dict -> from_hf_dict unchanged.
                rope_original_max_position_embeddings=int(
                    rope.get("original_max_position_embeddings")
                    or d.get("max_position_embeddings", 8192)) if rope_type == "llama3"
                else cls.rope_original_max_position_embeddings,
                max_position_embeddings=int(d.get("max_position_embeddings", 4096)),
                sliding_window=None if window is None else int(window),
                qkv_bias=family == "qwen2" or attention_bias,
                o_bias=family == "llama" and attention_bias,
                mlp_bias=family == "llama" and bool(d.get("mlp_bias", False)),
                tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
                bos_token_id=d.get("bos_token_id"), eos_token_id=eos,
                # No pad id (Llama's configs): pad with EOS, as HF pipelines do; id 0 is a
                # real token of Llama 3 that the loss would mask. The loss handles pad == EOS.
                pad_token_id=int(pad if pad is not None else eos if eos is not None else 0),
            )
        except (ValueError, TypeError) as e:
            raise ConfigError(f"{source}: {e}") from None

    @property
    def layer_counts(self) -> dict[str, int]:
        """Layers per stack, by the stack's scope (``models.scan``): one, at the root."""
        return {"": self.num_layers}

    def to_hf_dict(self) -> dict[str, Any]:
        """The ``config.json`` dictionary transformers reads back as this model."""
        rope: dict[str, Any] = {"rope_type": self.rope_type, "rope_theta": self.rope_theta}
        if self.rope_type in ("linear", "llama3"):
            rope["factor"] = self.rope_factor
        if self.rope_type == "llama3":
            rope.update(low_freq_factor=self.rope_low_freq_factor,
                        high_freq_factor=self.rope_high_freq_factor,
                        original_max_position_embeddings=(
                            self.rope_original_max_position_embeddings))
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
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            # Both spellings: transformers 5 reads rope_parameters, 4 reads the other two.
            "rope_parameters": rope,
            "rope_theta": self.rope_theta,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "dtype": self.dtype.param_dtype,
        }
        if self.rope_type != "default":
            d["rope_scaling"] = rope
        if self.family == "llama":
            if self.qkv_bias != self.o_bias:
                raise ConfigError("DecoderConfig: a llama checkpoint has biases on q, k, v and o "
                                  f"together (attention_bias); got qkv_bias={self.qkv_bias}, "
                                  f"o_bias={self.o_bias}")
            d.update(attention_bias=self.qkv_bias, mlp_bias=self.mlp_bias)
        elif self.qkv_bias != (self.family == "qwen2") or self.o_bias or self.mlp_bias:
            raise ConfigError(f"DecoderConfig: a {self.family} checkpoint cannot express "
                              f"qkv_bias={self.qkv_bias}, o_bias={self.o_bias}, "
                              f"mlp_bias={self.mlp_bias}")
        if self.family == "mistral":
            d["sliding_window"] = self.sliding_window
        elif self.sliding_window is not None:
            raise ConfigError(f"DecoderConfig: sliding_window is written only for mistral, not "
                              f"{self.family}")
        if self.family == "qwen2":
            d["use_sliding_window"] = False
        return d

    # --- presets -------------------------------------------------------------------------------

    @classmethod
    def preset(cls, name: str) -> DecoderConfig:
        """Published shapes: ``llama-3-8b``, ``llama-3.1-8b``, ``llama-3.2-1b``, ``qwen2-0.5b``,
        ``qwen2-7b``, ``mistral-7b``, and ``tiny`` (for tests)."""
        try:
            return _PRESETS[name]
        except KeyError:
            raise ConfigError(f"unknown decoder preset {name!r}; known: {sorted(_PRESETS)}") \
                from None


_LLAMA3 = dict(family="llama", vocab_size=128256, rms_norm_eps=1e-5, rope_theta=500000.0,
               bos_token_id=128000, eos_token_id=128001)
_LLAMA31_ROPE = dict(rope_type="llama3", rope_factor=8.0, rope_low_freq_factor=1.0,
                     rope_high_freq_factor=4.0, rope_original_max_position_embeddings=8192,
                     max_position_embeddings=131072)
_PRESETS = {
    "llama-3-8b": DecoderConfig(**_LLAMA3, d_model=4096, d_ff=14336, num_layers=32,
                                num_heads=32, num_kv_heads=8, head_dim=128,
                                max_position_embeddings=8192),
    "llama-3.1-8b": DecoderConfig(**_LLAMA3, **_LLAMA31_ROPE, d_model=4096, d_ff=14336,
                                  num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128),
    "llama-3.2-1b": DecoderConfig(**{**_LLAMA3, **_LLAMA31_ROPE, "rope_factor": 32.0},
                                  d_model=2048, d_ff=8192, num_layers=16, num_heads=32,
                                  num_kv_heads=8, head_dim=64, tie_word_embeddings=True),
    "qwen2-0.5b": DecoderConfig(family="qwen2", vocab_size=151936, d_model=896, d_ff=4864,
                                num_layers=24, num_heads=14, num_kv_heads=2, head_dim=64,
                                rope_theta=1000000.0, max_position_embeddings=32768,
                                qkv_bias=True, tie_word_embeddings=True, bos_token_id=None,
                                eos_token_id=151643, pad_token_id=151643),
    "qwen2-7b": DecoderConfig(family="qwen2", vocab_size=152064, d_model=3584, d_ff=18944,
                              num_layers=28, num_heads=28, num_kv_heads=4, head_dim=128,
                              rope_theta=1000000.0, max_position_embeddings=32768,
                              qkv_bias=True, bos_token_id=None, eos_token_id=151643,
                              pad_token_id=151643),
    "mistral-7b": DecoderConfig(family="mistral", vocab_size=32000, d_model=4096, d_ff=14336,
                                num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128,
                                rms_norm_eps=1e-5, max_position_embeddings=32768,
                                sliding_window=4096),
    "tiny": DecoderConfig(family="llama", vocab_size=101, d_model=24, d_ff=40, num_layers=2,
                          num_heads=4, num_kv_heads=2, head_dim=6, max_position_embeddings=64),
}
