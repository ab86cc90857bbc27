"""The T5 family's config: one frozen dataclass (v1.0, v1.1 / LM-adapted, FLAN-T5), and presets.

Frozen and validated in ``__post_init__`` (hashable: a jit static argument), as every config.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from goose_jax.core.errors import ConfigError
from goose_jax.models.config import REMAT_NAMES, DTypePolicy

# HF spells a T5 feed-forward as "{act}" or "gated-{act}"; "gated-gelu" historically means the
# tanh approximation ("gelu_new"), which is what T5 v1.1 and FLAN-T5 were trained with.
_ACTIVATIONS = ("relu", "gelu", "gelu_new", "gelu_pytorch_tanh", "silu", "swish")


@dataclasses.dataclass(frozen=True)
class T5Config:
    """Architecture of a T5 encoder-decoder (v1.0, v1.1 / LM-adapted, FLAN-T5).

    Attributes mirror Hugging Face's ``T5Config`` names where one exists.
      tie_word_embeddings: the output head reuses ``shared/embedding`` (no ``lm_head`` params).
      scale_decoder_outputs: multiply the final decoder states by ``d_model ** -0.5`` before the
        head (T5 v1.0 does; v1.1 / FLAN-T5 do not).
      scan_layers: run each stack as one ``nn.scan`` over its blocks (one block body to compile,
        not 24 + 24 at XL sizes); the model then reads trees stacked along a leading layer axis
        (``goose_jax.models.scan``). Not part of the checkpoint format: HF files stay per layer.
      remat: activation rematerialisation per block: "none", "block" (keep only each block's
        inputs) or "dots" (keep the sites' matmul outputs); see ``models.scan.REMAT_POLICIES``.
    """

    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_heads: int = 8
    num_encoder_layers: int = 6
    num_decoder_layers: int = 6
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    feed_forward_proj: str = "relu"
    tie_word_embeddings: bool = True
    scale_decoder_outputs: bool = True
    layer_norm_epsilon: float = 1e-6
    dropout_rate: float = 0.0
    pad_token_id: int = 0
    eos_token_id: int = 1
    decoder_start_token_id: int = 0
    dtype: DTypePolicy = DTypePolicy()
    scan_layers: bool = False
    remat: str = "none"

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "d_kv", "d_ff", "num_heads", "num_encoder_layers",
                     "num_decoder_layers", "relative_attention_num_buckets",
                     "relative_attention_max_distance"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"T5Config.{name} must be a positive integer, got {value!r}")
        parts = self.feed_forward_proj.split("-")
        if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
            raise ConfigError(
                "T5Config.feed_forward_proj must be '{act}' or 'gated-{act}', "
                f"got {self.feed_forward_proj!r}")
        if self.activation not in _ACTIVATIONS:
            raise ConfigError(f"T5Config.feed_forward_proj: unsupported activation "
                             f"{parts[-1]!r}; supported: {list(_ACTIVATIONS)}")
        if not 0.0 <= self.dropout_rate < 1.0:
            raise ConfigError(
                f"T5Config.dropout_rate must be in [0, 1), got {self.dropout_rate}")
        if self.layer_norm_epsilon <= 0:
            raise ConfigError(
                f"T5Config.layer_norm_epsilon must be > 0, got {self.layer_norm_epsilon}")
        if not isinstance(self.scan_layers, bool):
            raise ConfigError(f"T5Config.scan_layers must be True or False, got "
                              f"{self.scan_layers!r}")
        if self.remat not in REMAT_NAMES:
            raise ConfigError(f"T5Config.remat must be one of {list(REMAT_NAMES)}, got "
                              f"{self.remat!r}")
        if not isinstance(self.dtype, DTypePolicy):
            raise ConfigError(
                f"T5Config.dtype must be a DTypePolicy, got {type(self.dtype).__name__}")

    @property
    def is_gated(self) -> bool:
        return self.feed_forward_proj.startswith("gated-")

    @property
    def activation(self) -> str:
        if self.feed_forward_proj == "gated-gelu":
            return "gelu_new"
        return self.feed_forward_proj.split("-")[-1]

    @property
    def inner_dim(self) -> int:
        return self.num_heads * self.d_kv

    @property
    def layer_counts(self) -> dict[str, int]:
        """Layers per stack, by the stack's scope (``models.scan``)."""
        return {"encoder": self.num_encoder_layers, "decoder": self.num_decoder_layers}

    def replace(self, **changes) -> T5Config:
        return dataclasses.replace(self, **changes)

    def with_dtypes(self, param_dtype: str = "float32", compute_dtype: str = "float32") -> T5Config:
        return self.replace(dtype=DTypePolicy(param_dtype, compute_dtype))

    # --- Hugging Face config.json --------------------------------------------------------------

    @classmethod
    def from_hf_dict(cls, d: Mapping[str, Any], *, source: str = "config.json") -> T5Config:
        """Builds a config from a Hugging Face T5 ``config.json`` dictionary.

        Raises:
          ValueError: naming ``source`` when the dictionary does not describe a T5.
        """
        model_type = d.get("model_type")
        if model_type not in ("t5", "mt5", "umt5") and "T5ForConditionalGeneration" not in (
                d.get("architectures") or []):
            raise ConfigError(f"{source}: not a T5 config (model_type={model_type!r}, "
                             f"architectures={d.get('architectures')!r}); expected model_type 't5'")
        if model_type == "umt5":
            raise ConfigError(f"{source}: umT5 (per-layer position biases) is not supported")
        missing = [k for k in ("vocab_size", "d_model", "d_kv", "d_ff", "num_heads", "num_layers")
                   if k not in d]
        if missing:
            raise ConfigError(f"{source}: T5 config lacks required keys {missing}")
        tie = bool(d.get("tie_word_embeddings", True))
        # transformers 5 writes tie_word_embeddings=True for every T5 and records the v1.0 / v1.1
        # difference as scale_decoder_outputs; older files only have tie_word_embeddings.
        scale = bool(d.get("scale_decoder_outputs", tie))
        eos = d.get("eos_token_id", 1)
        if isinstance(eos, (list, tuple)):
            eos = eos[0]
        pad = d.get("pad_token_id", 0)
        pad = 0 if pad is None else pad
        start = d.get("decoder_start_token_id", pad)
        try:
            return cls(
                vocab_size=int(d["vocab_size"]), d_model=int(d["d_model"]), d_kv=int(d["d_kv"]),
                d_ff=int(d["d_ff"]), num_heads=int(d["num_heads"]),
                num_encoder_layers=int(d["num_layers"]),
                num_decoder_layers=int(d.get("num_decoder_layers") or d["num_layers"]),
                relative_attention_num_buckets=int(d.get("relative_attention_num_buckets", 32)),
                relative_attention_max_distance=int(d.get("relative_attention_max_distance", 128)),
                feed_forward_proj=str(d.get("feed_forward_proj", "relu")),
                tie_word_embeddings=tie, scale_decoder_outputs=scale,
                layer_norm_epsilon=float(d.get("layer_norm_epsilon", 1e-6)),
                dropout_rate=float(d.get("dropout_rate", 0.0) or 0.0),
                pad_token_id=int(pad), eos_token_id=int(1 if eos is None else eos),
                decoder_start_token_id=int(pad if start is None else start),
            )
        except ValueError as e:
            raise ConfigError(f"{source}: {e}") from None

    def to_hf_dict(self) -> dict[str, Any]:
        """The ``config.json`` dictionary transformers (4.x and 5.x) reads back as this model."""
        return {
            "architectures": ["T5ForConditionalGeneration"],
            "model_type": "t5",
            "vocab_size": self.vocab_size,
            "d_model": self.d_model,
            "d_kv": self.d_kv,
            "d_ff": self.d_ff,
            "num_heads": self.num_heads,
            "num_layers": self.num_encoder_layers,
            "num_decoder_layers": self.num_decoder_layers,
            "relative_attention_num_buckets": self.relative_attention_num_buckets,
            "relative_attention_max_distance": self.relative_attention_max_distance,
            "feed_forward_proj": self.feed_forward_proj,
            # transformers 4 decides both tying and output scaling from this one flag.
            "tie_word_embeddings": self.scale_decoder_outputs,
            "scale_decoder_outputs": self.scale_decoder_outputs,
            "layer_norm_epsilon": self.layer_norm_epsilon,
            "dropout_rate": self.dropout_rate,
            "pad_token_id": self.pad_token_id,
            "eos_token_id": self.eos_token_id,
            "decoder_start_token_id": self.decoder_start_token_id,
            "is_encoder_decoder": True,
            "dtype": self.dtype.param_dtype,
        }

    # --- presets -------------------------------------------------------------------------------

    @classmethod
    def preset(cls, name: str) -> T5Config:
        """Published sizes: ``t5-small``, ``t5-base``, ``t5-v1_1-{small,base,large,xl}``,
        ``t5-xl-lm-adapt`` (the PHATGOOSE base) and ``tiny`` (for tests)."""
        try:
            return _PRESETS[name]
        except KeyError:
            raise ConfigError(f"unknown T5 preset {name!r}; known: {sorted(_PRESETS)}") from None


def _v11(d_model, d_ff, heads, layers):
    return T5Config(d_model=d_model, d_kv=64, d_ff=d_ff, num_heads=heads,
                    num_encoder_layers=layers, num_decoder_layers=layers,
                    feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                    scale_decoder_outputs=False)


_PRESETS = {
    "t5-small": T5Config(d_model=512, d_kv=64, d_ff=2048, num_heads=8, num_encoder_layers=6,
                         num_decoder_layers=6),
    "t5-base": T5Config(d_model=768, d_kv=64, d_ff=3072, num_heads=12, num_encoder_layers=12,
                        num_decoder_layers=12),
    "t5-v1_1-small": _v11(512, 1024, 6, 8),
    "t5-v1_1-base": _v11(768, 2048, 12, 12),
    "t5-v1_1-large": _v11(1024, 2816, 16, 24),
    "t5-v1_1-xl": _v11(2048, 5120, 32, 24),
    "t5-xl-lm-adapt": _v11(2048, 5120, 32, 24),
    "tiny": T5Config(vocab_size=101, d_model=24, d_kv=8, d_ff=40, num_heads=3,
                     num_encoder_layers=2, num_decoder_layers=3,
                     relative_attention_num_buckets=8, relative_attention_max_distance=20,
                     feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                     scale_decoder_outputs=False),
}
