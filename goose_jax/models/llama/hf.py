"""Hugging Face Llama / Qwen2 / Mistral checkpoints <-> goose-jax decoder parameter pytrees: the
family's tensor names (``tensor_map``) over the decoder-only conversion of
``goose_jax.models.causal.hf``.

HF's q and k weights are already permuted for the ``rotate_half`` rotary layout, which
``goose_jax.models.llama.model`` uses too: no permutation here.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from goose_jax.models.causal import hf as causal_hf
from goose_jax.models.config import DTypePolicy
from goose_jax.models.llama.config import DecoderConfig
from goose_jax.models.llama.model import abstract_variables

Params = dict[str, Any]
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


LAYOUT = causal_hf.HFLayout(tensor_map, abstract_variables, DecoderConfig.from_hf_dict)


def expected_shapes(cfg: DecoderConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Parameter path -> shape of a model of ``cfg``, computed without allocating it."""
    return causal_hf.expected_shapes(LAYOUT, cfg)


def hf_state_dict_to_params(cfg: DecoderConfig, state: Mapping[str, Any], *,
                            source: str = "state dict") -> Params:
    """HF tensors (name -> array, read on access) -> our params (``causal.hf.state_to_params``)."""
    return causal_hf.state_to_params(LAYOUT, cfg, state, source=source)


def params_to_hf_state_dict(cfg: DecoderConfig, params: Params) -> dict[str, np.ndarray]:
    """Our params -> HF tensors (``causal.hf.params_to_state``)."""
    return causal_hf.params_to_state(LAYOUT, cfg, params)


def load_hf_llama(path: str | os.PathLike, *, dtype: DTypePolicy | None = None
                  ) -> tuple[DecoderConfig, Params]:
    """Loads a local Hugging Face Llama, Qwen2 or Mistral checkpoint directory
    (``causal.hf.load_folder``).

    Returns:
      (cfg, params): params is a nested dict of jax arrays, e.g. ``embed_tokens/embedding``
      (V, D), ``layers_0/self_attn/q/kernel`` (D, H*K), ``lm_head/kernel`` (D, V) when untied.

    Raises:
      CheckpointError: naming the file and the problem, for any bad input.
    """
    return causal_hf.load_folder(LAYOUT, path, dtype=dtype)


def save_hf_llama(cfg: DecoderConfig, params: Params, path: str | os.PathLike, *,
                  overwrite: bool = False) -> list[str]:
    """Writes a Hugging Face checkpoint directory that transformers loads as
    ``{Llama,Qwen2,Mistral}ForCausalLM`` (``cfg.family`` picks the architecture;
    ``causal.hf.save_folder``)."""
    return causal_hf.save_folder(LAYOUT, cfg, params, path, overwrite=overwrite)
