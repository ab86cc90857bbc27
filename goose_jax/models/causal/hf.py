"""Hugging Face decoder-only checkpoints <-> goose-jax parameter pytrees, for any family that
names its tensors by one table (``HFLayout.tensor_map``).

Reads a local directory (``config.json`` plus ``model.safetensors``, or sharded safetensors with
``model.safetensors.index.json``, or ``pytorch_model.bin``) through ``models.hf_folder``
(never the network), and writes one back as transformers writes it.

Kernels are stored (I, O), the transpose of a PyTorch ``nn.Linear.weight`` (O, I): the table
says which tensors are transposed.

Tying follows ``config.json``'s ``tie_word_embeddings``, as transformers does: a tied
checkpoint's ``lm_head.weight``, if present and bit-for-bit the embedding, is not read; one that
differs from the embedding is kept as an untied head (``load_folder``).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from goose_jax.core.errors import CheckpointError, ConfigError
from goose_jax.models.config import DTypePolicy
from goose_jax.models.hf_folder import (
    CONFIG_NAME,
    SAFE_WEIGHTS_NAME,
    SHARD_PATTERNS,
    WEIGHT_FILES,
    bits_equal,
    check_model_folder,
    names_shown,
    read_config_json,
    read_hf_state,
    write_model_folder,
)

Params = dict[str, Any]
HEAD, EMBED = "lm_head.weight", "model.embed_tokens.weight"
# Buffers older checkpoints carry that the model recomputes.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclasses.dataclass(frozen=True)
class HFLayout:
    """How one family's checkpoints are laid out.

    Attributes:
      tensor_map: ``cfg -> (HF name, our param path, transposed)`` for every HF tensor.
      abstract_variables: ``cfg -> `` the model's abstract variables (``jax.eval_shape`` of its
        init), whose ``params`` give every parameter's shape.
      config_from_hf_dict: ``(d, *, source) -> cfg`` for a ``config.json`` dict.
    """

    tensor_map: Callable[[Any], Iterator[tuple[str, tuple[str, ...], bool]]]
    abstract_variables: Callable[[Any], dict]
    config_from_hf_dict: Callable[..., Any]


def expected_shapes(layout: HFLayout, cfg) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Every base parameter's key path and shape, from the config alone."""
    tree = nn.meta.unbox(layout.abstract_variables(cfg))["params"]
    return {tuple(k.key for k in p): tuple(leaf.shape)
            for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def state_to_params(layout: HFLayout, cfg, state: Mapping[str, Any], *,
                    source: str = "state dict") -> Params:
    """HF tensors (name -> array, read on access) -> our params, cast to ``cfg.dtype.param``.

    Raises:
      CheckpointError: naming ``source``, for missing, unexpected or misshapen tensors.
    """
    wanted = list(layout.tensor_map(cfg))
    names = {hf for hf, _, _ in wanted}
    missing = [hf for hf in names if hf not in state]
    if missing:
        raise CheckpointError(f"{source}: lacks {len(missing)} tensor(s) a {cfg.family} of this "
                              f"config.json needs: {names_shown(sorted(missing))}")
    extra = [k for k in state if k not in names and not k.endswith(_IGNORED_SUFFIXES)
             and not (cfg.tie_word_embeddings and k == HEAD)]
    if extra:
        raise CheckpointError(f"{source}: holds {len(extra)} tensor(s) this config.json does not "
                              f"describe: {names_shown(sorted(extra))}; is config.json the one "
                              "written with these weights?")
    expected = expected_shapes(layout, cfg)
    params: Params = {}
    for hf, path, transpose in wanted:
        value = np.asarray(state[hf])
        value = value.T if transpose else value
        if tuple(value.shape) != expected[path]:
            raise CheckpointError(f"{source}: tensor {hf} has shape {tuple(value.shape)} (ours "
                                  f"transposed), expected {expected[path]} from config.json")
        node = params
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = jnp.asarray(value, dtype=cfg.dtype.param)
    return params


def params_to_state(layout: HFLayout, cfg, params: Params) -> dict[str, np.ndarray]:
    """Our params -> HF tensors (C-contiguous NumPy, each in its own dtype).

    Raises:
      CheckpointError: a tensor the config needs is absent or misshapen.
    """
    expected = expected_shapes(layout, cfg)
    out = {}
    for hf, path, transpose in layout.tensor_map(cfg):
        node = params
        try:
            for key in path:
                node = node[key]
        except (KeyError, TypeError):
            raise CheckpointError(f"params: lacks {'/'.join(path)}, which this config "
                                  "needs") from None
        value = np.asarray(node)
        if tuple(value.shape) != expected[path]:
            raise CheckpointError(f"params: {'/'.join(path)} has shape {tuple(value.shape)}, "
                                  f"expected {expected[path]}")
        out[hf] = np.ascontiguousarray(value.T if transpose else value)
    return out


def read_config(layout: HFLayout, path: str | os.PathLike):
    """The config of a checkpoint directory's ``config.json``.

    Raises:
      CheckpointError: the file is missing, not JSON, or not a model of the family.
    """
    d, config_path = read_config_json(path)
    try:
        return layout.config_from_hf_dict(d, source=config_path)
    except ConfigError as e:
        raise CheckpointError(str(e)) from None


def load_folder(layout: HFLayout, path: str | os.PathLike, *,
                dtype: DTypePolicy | None = None) -> tuple[Any, Params]:
    """(cfg, params) of a local Hugging Face checkpoint directory of the family.

    Args:
      layout: the family's layout.
      path: a directory with ``config.json`` and weights (``model.safetensors``, sharded
        safetensors with ``model.safetensors.index.json``, or ``pytorch_model.bin``), or a
        Hugging Face cache entry ``models--org--name``.
      dtype: dtype policy of the returned config; parameters are cast to ``dtype.param``.
        Default: float32 parameters and compute, whatever the file stores.

    Raises:
      CheckpointError: naming the file and the problem, for any bad input.
    """
    cfg = read_config(layout, path)
    if dtype is not None:
        cfg = cfg.replace(dtype=dtype)
    state, source = read_hf_state(path)
    if cfg.tie_word_embeddings and HEAD in state and EMBED in state and not bits_equal(
            np.asarray(state[HEAD]), np.asarray(state[EMBED])):
        # transformers keeps a stored head that differs from the embedding, whatever the config
        # says about tying: so do we.
        cfg = cfg.replace(tie_word_embeddings=False)
    return cfg, state_to_params(layout, cfg, state, source=source)


def save_folder(layout: HFLayout, cfg, params: Params, path: str | os.PathLike, *,
                overwrite: bool = False) -> list[str]:
    """Writes a Hugging Face checkpoint directory (``config.json`` + ``model.safetensors``) that
    transformers loads as the config's architecture, crash-safe
    (``models.hf_folder.write_model_folder``).

    Returns:
      The paths written: the config, then the weights.

    Raises:
      CheckpointError: ``params`` does not fit ``cfg``, ``cfg`` cannot be expressed for its
        family, or ``path`` cannot take the model (``models.hf_folder.check_model_folder``).
    """
    try:
        config = cfg.to_hf_dict()
    except ConfigError as e:
        raise CheckpointError(f"{os.fspath(path)}: {e}") from None
    check_model_folder(path, WEIGHT_FILES, overwrite=overwrite)
    state = params_to_state(layout, cfg, params)
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    return write_model_folder(path, SAFE_WEIGHTS_NAME, state, CONFIG_NAME, text,
                              superseded=(*WEIGHT_FILES, *SHARD_PATTERNS))
