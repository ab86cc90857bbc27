"""The model families goose-jax routes over, and the one place that tells them apart.

Two families share the site seam (a named site computes ``x @ kernel`` and hands
``(module, x, y)`` to an adapter): the encoder-decoder T5 (``goose_jax.models.t5.model``,
configured by
``T5Config``) and the decoder-only Llama family (``goose_jax.models.llama.model``,
``DecoderConfig``: Llama,
Qwen2, Mistral). LoRA, gates, routing, the library and the tools above the seam ask this module
what differs (the site names and shapes, the parameters, how a config is recorded) instead of
testing the config type themselves.

A family is named by a string: ``"t5"``, or the decoder's ``DecoderConfig.family`` (``"llama"``,
``"qwen2"``, ``"mistral"``). Expert libraries record it, and refuse a base of another family.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Union

from goose_jax.core.errors import ConfigError
from goose_jax.models.llama.config import FAMILIES as DECODER_FAMILIES
from goose_jax.models.llama.config import DecoderConfig
from goose_jax.models.t5.config import T5Config

ModelConfig = Union[T5Config, DecoderConfig]  # noqa: UP007 (a runtime alias, for isinstance)
T5 = "t5"
FAMILIES = (T5,) + DECODER_FAMILIES

# Every site of each kind of model, full-matched against site names: attention q/k/v/o (self and
# cross) and every FFN matrix for T5; q/k/v/o and gate/up/down for the decoder-only family.
T5_SITES = r"(encoder|decoder)/block_\d+/(self_attn|cross_attn)/[qkvo]|" \
           r"(encoder|decoder)/block_\d+/ffn/(wi|wi_0|wi_1|wo)"
DECODER_SITES = r"layers_\d+/(self_attn/[qkvo]|mlp/(gate|up|down))"


def check_config(cfg: Any) -> ModelConfig:
    """``cfg`` if it configures a supported model; ConfigError (one line) otherwise."""
    if not isinstance(cfg, (T5Config, DecoderConfig)):
        raise ConfigError(f"expected a T5Config or DecoderConfig, got {type(cfg).__name__}")
    return cfg


def family(cfg: ModelConfig) -> str:
    """``"t5"``, ``"llama"``, ``"qwen2"`` or ``"mistral"``."""
    return T5 if isinstance(check_config(cfg), T5Config) else cfg.family


def is_decoder_only(cfg: ModelConfig) -> bool:
    return isinstance(check_config(cfg), DecoderConfig)


def describe(name: str) -> str:
    """A family name for messages: ``"T5"`` or ``"decoder-only (llama)"``."""
    return "T5" if name == T5 else f"decoder-only ({name})"


def site_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """Every adapter site of the model, ``{name: (I, O)}``, from the config alone."""
    if is_decoder_only(cfg):
        from goose_jax.models.llama import model as decoder

        return decoder.site_shapes(cfg)
    from goose_jax.models.t5 import model as t5

    return t5.site_shapes(cfg)


def all_sites_pattern(cfg: ModelConfig) -> str:
    """The regular expression that selects every site of ``cfg``'s family."""
    return DECODER_SITES if is_decoder_only(cfg) else T5_SITES


def init_params(cfg: ModelConfig, seed: int = 0) -> dict:
    """Random base parameters of ``cfg``'s model (the family's ``init_params``)."""
    if is_decoder_only(cfg):
        from goose_jax.models.llama import model as decoder

        return decoder.init_params(cfg, seed)
    from goose_jax.models.t5 import model as t5

    return t5.init_params(cfg, seed)


def param_logical_axes(cfg: ModelConfig) -> dict:
    """The logical axis names of every base parameter (the family's ``param_logical_axes``)."""
    if is_decoder_only(cfg):
        from goose_jax.models.llama import model as decoder

        return decoder.param_logical_axes(cfg)
    from goose_jax.models.t5 import model as t5

    return t5.param_logical_axes(cfg)


def config_from_hf_dict(d: Mapping[str, Any], *, source: str = "config.json") -> ModelConfig:
    """The config of a Hugging Face ``config.json`` dict: a T5 (``model_type`` t5, mt5, umt5
    or a T5 architecture) or a Llama-family decoder (``model_type`` llama, qwen2, mistral)."""
    check_model_type(d, source=source)
    if d.get("model_type") in DECODER_FAMILIES:
        return DecoderConfig.from_hf_dict(d, source=source)
    return T5Config.from_hf_dict(d, source=source)


def check_model_type(d: Mapping[str, Any], *, source: str = "config.json") -> None:
    """Raises ConfigError for a config without ``model_type`` that is not a T5 by its
    ``architectures`` (the one case a T5 is recognised by): the family is what tells a loader
    how to read the folder, so a Llama's config would otherwise be judged "not a T5 config".
    Names the ``model_type`` to add when ``architectures`` suggests one."""
    architectures = d.get("architectures") or []
    if d.get("model_type") not in (None, "") or "T5ForConditionalGeneration" in architectures:
        return
    named = [f for f in DECODER_FAMILIES
             if any(isinstance(a, str) and a.lower().startswith(f) for a in architectures)]
    hint = (f"architectures={architectures!r} suggest {named[0]!r}: add "
            f'"model_type": "{named[0]}"' if named else f"architectures={architectures!r}")
    raise ConfigError(f"{source}: no model_type; goose-jax reads model_type one of "
                      f"{['t5', 'mt5', *DECODER_FAMILIES]} ({hint})")


def config_record(cfg: ModelConfig) -> dict[str, Any]:
    """What identifies a base architecture in a library manifest or checkpoint: the HF config
    dict without the storage dtype (a bf16 copy is the same base), with
    ``tie_word_embeddings``."""
    d = check_config(cfg).to_hf_dict()
    d.pop("dtype", None)
    d.pop("torch_dtype", None)
    d["tie_word_embeddings"] = cfg.tie_word_embeddings
    return d


def config_from_record(d: Mapping[str, Any], name: str, *, source: str) -> ModelConfig:
    """Inverse of ``config_record`` for a model of family ``name``.

    Raises:
      ConfigError: an unknown family, or a record that does not build its config (naming
        ``source``).
    """
    if name not in FAMILIES:
        raise ConfigError(f"{source}: unknown model family {name!r}; known: {list(FAMILIES)}")
    d = dict(d)
    tie = d.pop("tie_word_embeddings", None)
    if not isinstance(tie, bool):
        raise ConfigError(f"{source}: field 'tie_word_embeddings': expected true or false, "
                          f"found {tie!r:.60}")
    cls = T5Config if name == T5 else DecoderConfig
    cfg = cls.from_hf_dict(d, source=source).replace(tie_word_embeddings=tie)
    if family(cfg) != name:
        raise ConfigError(f"{source}: the config is of family {family(cfg)!r}, recorded as "
                          f"{name!r}")
    return cfg


def validate_params(cfg: ModelConfig, params: Mapping[str, Any], *,
                    source: str = "params") -> None:
    """Checks that ``params`` has exactly the names and shapes a model with ``cfg`` needs (the
    T5's ``interop.hf.validate_params``, or the decoder's tensor table).

    Raises:
      CheckpointError: naming ``source`` and the first missing, unexpected or misshapen entries.
    """
    if is_decoder_only(cfg):
        from goose_jax.models.llama.hf import expected_shapes
        from goose_jax.models.t5.hf import check_param_tree

        check_param_tree(expected_shapes(cfg), params, source=source)
        return
    from goose_jax.models.t5.hf import validate_params as validate_t5

    validate_t5(cfg, params, source=source)
