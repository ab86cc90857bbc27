"""Hugging Face Llama / Qwen2 / Mistral checkpoints <-> goose-jax decoder parameter pytrees.

Reads a local directory (``config.json`` plus ``model.safetensors``, or sharded safetensors with
``model.safetensors.index.json``, or ``pytorch_model.bin``) into the nested dict
``goose_jax.models.llama.model.Llama`` reads, and writes one back as transformers writes it. The
files are
found and read by ``goose_jax.models.t5.hf`` (``read_hf_state``) and ``goose_jax.core.tensorfile``;
never the network.

Shapes follow the package legend; G key/value heads, J = H * K. Kernels are stored (I, O), the
transpose of a PyTorch ``nn.Linear.weight`` (O, I). HF's q and k weights are already permuted
for the ``rotate_half`` rotary layout, which ``goose_jax.models.llama.model`` uses too: no
permutation here.

Tying follows ``config.json``'s ``tie_word_embeddings``, as transformers does: a tied
checkpoint's ``lm_head.weight``, if present and bit-for-bit the embedding, is not read; one that
differs from the embedding is kept as an untied head (``load_hf_llama``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
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
from goose_jax.models.llama.config import DecoderConfig
from goose_jax.models.llama.model import abstract_variables

Params = dict[str, Any]
_HEAD, _EMBED = "lm_head.weight", "model.embed_tokens.weight"
# Buffers older checkpoints carry that the model recomputes.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
_PROJ = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
         "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj",
         "down": "mlp.down_proj"}


def tensor_map(cfg: DecoderConfig) -> Iterator[tuple[str, tuple[str, ...], bool]]:
    """Every HF tensor of ``cfg``: (HF name, our param path, transposed)."""
    yield "model.embed_tokens.weight", ("embed_tokens", "embedding"), False
    for i in range(cfg.num_layers):
        hf, ours = f"model.layers.{i}", f"layers_{i}"
        yield f"{hf}.input_layernorm.weight", (ours, "input_norm", "scale"), False
        yield f"{hf}.post_attention_layernorm.weight", (ours, "post_attn_norm", "scale"), False
        for name, proj in _PROJ.items():
            scope = "self_attn" if proj.startswith("self_attn") else "mlp"
            yield f"{hf}.{proj}.weight", (ours, scope, name, "kernel"), True
            biased = (cfg.qkv_bias if name in "qkv" else cfg.o_bias if name == "o"
                      else cfg.mlp_bias)
            if biased:
                yield f"{hf}.{proj}.bias", (ours, scope, name, "bias"), False
    yield "model.norm.weight", ("final_norm", "scale"), False
    if not cfg.tie_word_embeddings:
        yield "lm_head.weight", ("lm_head", "kernel"), True


def expected_shapes(cfg: DecoderConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Parameter path -> shape of a model of ``cfg``, computed without allocating it."""
    tree = nn.meta.unbox(abstract_variables(cfg))["params"]
    return {tuple(k.key for k in p): tuple(leaf.shape)
            for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def hf_state_dict_to_params(cfg: DecoderConfig, state: Mapping[str, Any], *,
                            source: str = "state dict") -> Params:
    """HF tensors (name -> array, read on access) -> our params, cast to ``cfg.dtype.param``.

    Raises:
      CheckpointError: naming ``source``, for missing, unexpected or misshapen tensors.
    """
    wanted = list(tensor_map(cfg))
    names = {hf for hf, _, _ in wanted}
    missing = [hf for hf in names if hf not in state]
    if missing:
        raise CheckpointError(f"{source}: lacks {len(missing)} tensor(s) a {cfg.family} of this "
                              f"config.json needs: {names_shown(sorted(missing))}")
    extra = [k for k in state if k not in names and not k.endswith(_IGNORED_SUFFIXES)
             and not (cfg.tie_word_embeddings and k == "lm_head.weight")]
    if extra:
        raise CheckpointError(f"{source}: holds {len(extra)} tensor(s) this config.json does not "
                              f"describe: {names_shown(sorted(extra))}; is config.json the one "
                              "written with these weights?")
    expected = expected_shapes(cfg)
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


def params_to_hf_state_dict(cfg: DecoderConfig, params: Params) -> dict[str, np.ndarray]:
    """Our params -> HF tensors (C-contiguous NumPy, each in its own dtype).

    Raises:
      CheckpointError: a tensor the config needs is absent or misshapen.
    """
    expected = expected_shapes(cfg)
    out = {}
    for hf, path, transpose in tensor_map(cfg):
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


def read_hf_decoder_config(path: str | os.PathLike) -> DecoderConfig:
    """Reads ``config.json`` of a Llama / Qwen2 / Mistral checkpoint directory.

    Raises:
      CheckpointError: the file is missing, not JSON, or not a supported model.
    """
    d, config_path = read_config_json(path)
    try:
        return DecoderConfig.from_hf_dict(d, source=config_path)
    except ConfigError as e:
        raise CheckpointError(str(e)) from None


def load_hf_llama(path: str | os.PathLike, *, dtype: DTypePolicy | None = None
                  ) -> tuple[DecoderConfig, Params]:
    """Loads a local Hugging Face Llama, Qwen2 or Mistral checkpoint directory.

    Args:
      path: a directory with ``config.json`` and weights (``model.safetensors``, sharded
        safetensors with ``model.safetensors.index.json``, or ``pytorch_model.bin``), or a
        Hugging Face cache entry ``models--org--name``.
      dtype: dtype policy of the returned config; parameters are cast to ``dtype.param``.
        Default: float32 parameters and compute, whatever the file stores.

    Returns:
      (cfg, params): params is a nested dict of jax arrays, e.g. ``embed_tokens/embedding``
      (V, D), ``layers_0/self_attn/q/kernel`` (D, H*K), ``lm_head/kernel`` (D, V) when untied.

    Raises:
      CheckpointError: naming the file and the problem, for any bad input.
    """
    cfg = read_hf_decoder_config(path)
    if dtype is not None:
        cfg = cfg.replace(dtype=dtype)
    state, source = read_hf_state(path)
    if cfg.tie_word_embeddings and _HEAD in state and _EMBED in state and not bits_equal(
            np.asarray(state[_HEAD]), np.asarray(state[_EMBED])):
        # transformers keeps a stored head that differs from the embedding, whatever the config
        # says about tying: so do we.
        cfg = cfg.replace(tie_word_embeddings=False)
    return cfg, hf_state_dict_to_params(cfg, state, source=source)


def save_hf_llama(cfg: DecoderConfig, params: Params, path: str | os.PathLike, *,
                  overwrite: bool = False) -> list[str]:
    """Writes a Hugging Face checkpoint directory (``config.json`` + ``model.safetensors``) that
    transformers loads as ``{Llama,Qwen2,Mistral}ForCausalLM``, crash-safe
    (``models.hf_folder.write_model_folder``).

    Args:
      cfg: the model's config (``cfg.family`` picks the architecture written).
      params: our params pytree; tensors are written in their own dtype.
      path: output directory, created if needed.
      overwrite: replace a model the directory already holds.

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
    state = params_to_hf_state_dict(cfg, params)
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    return write_model_folder(path, SAFE_WEIGHTS_NAME, state, CONFIG_NAME, text,
                              superseded=(*WEIGHT_FILES, *SHARD_PATTERNS))
