"""Model checkpoints: a base model's parameters with the family and architecture that read
them back (``save_model`` / ``load_model``), on the one Orbax wrapper (``core.checkpoint``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from goose_jax.core.checkpoint import (
    META_NAME,
    TREE_DIR,
    absolute,
    read_meta,
    reconvert_hint,
    restore_tree,
    save_tree,
)
from goose_jax.core.errors import CheckpointError, ConfigError, one_line
from goose_jax.models import families
from goose_jax.models.config import DTypePolicy
from goose_jax.models.families import ModelConfig
from goose_jax.models.t5.config import T5Config

# --- models -------------------------------------------------------------------------------------
#
# A model checkpoint's metadata records the family and the architecture (``families.
# config_record``) plus the dtype policy the record leaves out:
#     {"kind": "model", "family": "t5" | "llama" | "qwen2" | "mistral",
#      "config": {...}, "dtype_policy": {"param_dtype": ..., "compute_dtype": ...}}
# T5 checkpoints written before decoder-only support hold {"kind": "t5", "t5_config": {...},
# "tie_word_embeddings": ..., "dtype_policy": ...} and load as they did.

MODEL_KIND = "model"


def save_model(path: str | os.PathLike, cfg: ModelConfig, params: Any, *,
               overwrite: bool = False) -> str:
    """Saves a model (config + params) of any family as a goose-jax checkpoint.

    Args:
      path: checkpoint directory.
      cfg: the model's config, a ``T5Config`` or ``DecoderConfig``.
      params: its params pytree (checked against ``cfg`` first:
      ``models.families.validate_params``).
      overwrite: replace an existing goose-jax checkpoint.

    Returns:
      The absolute checkpoint path.

    Raises:
      CheckpointError: params do not fit ``cfg``, or ``path`` exists.
    """
    families.validate_params(cfg, params)
    metadata = {
        "kind": MODEL_KIND,
        "family": families.family(cfg),
        "config": families.config_record(cfg),
        "dtype_policy": {"param_dtype": cfg.dtype.param_dtype,
                         "compute_dtype": cfg.dtype.compute_dtype},
    }
    return save_tree(path, params, metadata=metadata, overwrite=overwrite)


def read_model_config(path: str | os.PathLike, *,
                      family: str | Sequence[str] | None = None) -> ModelConfig:
    """The config a model checkpoint records, without reading its tree.

    Args:
      path: checkpoint directory.
      family: the family (or families) the caller expects (``models.families.FAMILIES`` names); a
        checkpoint of another is refused. Default: any.

    Raises:
      CheckpointError: missing path, not a goose-jax model checkpoint, invalid metadata, or a
        model of another family than ``family``.
    """
    path = absolute(path)
    metadata = read_meta(path).get("metadata") or {}
    meta_path = os.path.join(path, META_NAME)
    kind = metadata.get("kind")
    if kind not in (MODEL_KIND, families.T5):
        raise CheckpointError(f"{meta_path}: not a T5 model checkpoint, nor a decoder-only one "
                              f"(kind {kind!r}); use restore_tree for other trees")
    try:
        if kind == families.T5:   # written before decoder-only support
            cfg = T5Config.from_hf_dict(metadata["t5_config"], source=meta_path).replace(
                tie_word_embeddings=bool(metadata["tie_word_embeddings"]))
        else:
            cfg = families.config_from_record(metadata["config"], metadata["family"],
                                              source=meta_path)
        cfg = cfg.replace(dtype=DTypePolicy(**metadata["dtype_policy"]))
    except ConfigError as e:   # names the file and the field already
        raise CheckpointError(f"{one_line(e)}; {reconvert_hint(path)}") from None
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{meta_path}: invalid model metadata: {one_line(e)}; "
                              f"{reconvert_hint(path)}") from None
    wanted = (family,) if isinstance(family, str) else family
    if wanted is not None and families.family(cfg) not in wanted:
        raise CheckpointError(
            f"{path}: holds a {families.describe(families.family(cfg))} model, expected "
            f"{' or '.join(families.describe(w) for w in wanted)}; pass a checkpoint of that "
            "family")
    return cfg


def load_model(path: str | os.PathLike, *, shardings: Any = None, verify: bool = True,
               family: str | Sequence[str] | None = None) -> tuple[ModelConfig, Any]:
    """Loads a model saved by ``save_model`` (or a T5 saved before decoder-only support).

    Args:
      path: checkpoint directory.
      shardings: see ``restore_tree``.
      verify: check every file's sha256 against the one recorded at save (about 1.5 GB/s on
        one core: a few seconds for a T5-XL in bfloat16; sizes are always checked).
      family: see ``read_model_config``.

    Returns:
      (cfg, params): equal to what was saved; params as jax arrays in their saved dtypes.

    Raises:
      CheckpointError: missing path, not a goose-jax model checkpoint, a model of another
        family than ``family``, a damaged file, or params that do not fit the stored config.
    """
    path = absolute(path)
    cfg = read_model_config(path, family=family)
    params = restore_tree(path, shardings=shardings, verify=verify)
    tree_dir = os.path.join(path, str(read_meta(path).get("tree", TREE_DIR)))
    families.validate_params(cfg, params, source=tree_dir)
    return cfg, params
