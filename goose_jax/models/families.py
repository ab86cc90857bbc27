"""The family registry: which ``ModelFamily`` (``goose_jax.models.family``) a config, a family
name or a Hugging Face ``config.json`` belongs to, and the questions every package asks of it.

A family is named by a string: ``"t5"``, or the decoder's ``DecoderConfig.family`` (``"llama"``,
``"qwen2"``, ``"mistral"``). Expert libraries and checkpoints record it, and refuse a base of
another family. Adding a family is one sub-package of ``goose_jax.models`` and one line of
``REGISTRY``; nothing above ``models`` tests a config's type.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Union

from goose_jax.core.errors import ConfigError
from goose_jax.models.family import ModelFamily
from goose_jax.models.gemma.config import GemmaConfig
from goose_jax.models.gemma.family import FAMILY as GEMMA
from goose_jax.models.llama.config import DecoderConfig
from goose_jax.models.llama.family import FAMILY as LLAMA
from goose_jax.models.t5.config import T5Config
from goose_jax.models.t5.family import FAMILY as T5_FAMILY

#: Every registered family; the first reads a ``config.json`` whose ``model_type`` no family
#: names (T5 checkpoints recognised by their ``architectures``).
REGISTRY: tuple[ModelFamily, ...] = (T5_FAMILY, LLAMA, GEMMA)

ModelConfig = Union[T5Config, DecoderConfig, GemmaConfig]  # noqa: UP007 (a runtime alias, for annotations)
T5 = "t5"
FAMILIES = tuple(name for fam in REGISTRY for name in fam.names)
DECODER_FAMILIES = tuple(name for fam in REGISTRY if fam.decoder_only for name in fam.names)
_BY_TYPE = {fam.config_type: fam for fam in REGISTRY}
_BY_NAME = {name: fam for fam in REGISTRY for name in fam.names}
_BY_MODEL_TYPE = {t: fam for fam in REGISTRY for t in fam.hf_model_types}


def of(cfg: Any) -> ModelFamily:
    """The family of a model config; ConfigError (one line) for anything else."""
    fam = _BY_TYPE.get(type(cfg))
    if fam is None:
        known = " or ".join(f.config_type.__name__ for f in REGISTRY)
        raise ConfigError(f"expected a {known}, got {type(cfg).__name__}")
    return fam


def named(name: str) -> ModelFamily:
    """The family registered under ``name``; ConfigError for an unknown name."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise ConfigError(f"unknown model family {name!r}; known: {list(FAMILIES)}") from None


def check_config(cfg: Any) -> ModelConfig:
    """``cfg`` if it configures a supported model; ConfigError (one line) otherwise."""
    of(cfg)
    return cfg


def family(cfg: ModelConfig) -> str:
    """``"t5"``, ``"llama"``, ``"qwen2"`` or ``"mistral"``."""
    return of(cfg).name_of(cfg)


def describe(name: str) -> str:
    """A family name for messages: ``"T5"`` or ``"decoder-only (llama)"``."""
    return named(name).describe(name)


def site_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """Every adapter site of the model, ``{name: (I, O)}``, from the config alone."""
    return of(cfg).site_shapes(cfg)


def all_sites_pattern(cfg: ModelConfig) -> str:
    """The regular expression that selects every site of ``cfg``'s family."""
    return of(cfg).sites_pattern


def init_params(cfg: ModelConfig, seed: int = 0) -> dict:
    """Random base parameters of ``cfg``'s model (the family's ``init_params``)."""
    return of(cfg).init_params(cfg, seed)


def param_logical_axes(cfg: ModelConfig) -> dict:
    """The logical axis names of every base parameter (the family's ``param_logical_axes``)."""
    return of(cfg).param_logical_axes(cfg)


def for_hf_dict(d: Mapping[str, Any], *, source: str = "config.json") -> ModelFamily:
    """The family that reads a Hugging Face ``config.json`` dict (by its ``model_type``)."""
    check_model_type(d, source=source)
    return _BY_MODEL_TYPE.get(d.get("model_type"), REGISTRY[0])


def config_from_hf_dict(d: Mapping[str, Any], *, source: str = "config.json") -> ModelConfig:
    """The config of a Hugging Face ``config.json`` dict: a T5 (``model_type`` t5, mt5, umt5
    or a T5 architecture) or a Llama-family decoder (``model_type`` llama, qwen2, mistral)."""
    return for_hf_dict(d, source=source).config_from_hf_dict(d, source=source)


def check_model_type(d: Mapping[str, Any], *, source: str = "config.json") -> None:
    """Raises ConfigError for a config without ``model_type`` that is not a T5 by its
    ``architectures`` (the one case a T5 is recognised by): the family is what tells a loader
    how to read the folder, so a Llama's config would otherwise be judged "not a T5 config".
    Names the ``model_type`` to add when ``architectures`` suggests one."""
    architectures = d.get("architectures") or []
    if d.get("model_type") not in (None, "") or "T5ForConditionalGeneration" in architectures:
        return
    # The longest name an architecture starts with (Gemma2ForCausalLM: gemma2, not gemma).
    named_ = sorted((f for f in DECODER_FAMILIES
                     if any(isinstance(a, str) and a.lower().startswith(f)
                            for a in architectures)), key=len, reverse=True)
    hint = (f"architectures={architectures!r} suggest {named_[0]!r}: add "
            f'"model_type": "{named_[0]}"' if named_ else f"architectures={architectures!r}")
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
    cfg = named(name).config_from_hf_dict(d, source=source).replace(tie_word_embeddings=tie)
    if family(cfg) != name:
        raise ConfigError(f"{source}: the config is of family {family(cfg)!r}, recorded as "
                          f"{name!r}")
    return cfg


def validate_params(cfg: ModelConfig, params: Mapping[str, Any], *,
                    source: str = "params") -> None:
    """Checks that ``params`` has exactly the names and shapes a model with ``cfg`` needs.

    Raises:
      CheckpointError: naming ``source`` and the first missing, unexpected or misshapen entries.
    """
    of(cfg).validate_params(cfg, params, source=source)


def base_shardings(cfg: ModelConfig, mesh) -> dict:
    """The ``NamedSharding`` of every base parameter of ``cfg``'s model on ``mesh``."""
    return of(cfg).base_shardings(cfg, mesh)
