"""The decoder-only Llama family (Llama, Qwen2, Mistral) behind the ``ModelFamily`` contract
(``goose_jax.models.family``): the decoder-only methods of ``models.causal.family`` with the
Llama model, config and tensor names."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from goose_jax.models.causal.family import CausalFamily
from goose_jax.models.llama import hf
from goose_jax.models.llama import model as llama
from goose_jax.models.llama.config import FAMILIES, DecoderConfig

# Every site: attention q/k/v/o and the gated MLP's gate/up/down.
SITES = r"layers_\d+/(self_attn/[qkvo]|mlp/(gate|up|down))"


class LlamaFamily(CausalFamily):
    """The decoder-only Llama family (Llama, Qwen2, Mistral) behind the model-family contract."""

    names = FAMILIES
    config_type = DecoderConfig
    hf_model_types = FAMILIES
    sites_pattern = SITES
    model = llama.Llama
    layout = hf.LAYOUT
    labels = {"llama": "Llama", "qwen2": "Qwen2", "mistral": "Mistral"}

    def preset(self, name: str) -> DecoderConfig:
        # ``llama-tiny`` names the family's ``tiny`` where the T5's ``tiny`` would shadow it.
        return DecoderConfig.preset("tiny" if name == "llama-tiny" else name)

    def config_from_hf_dict(self, d: Mapping[str, Any], *, source: str) -> DecoderConfig:
        return DecoderConfig.from_hf_dict(d, source=source)

    def site_shapes(self, cfg: DecoderConfig) -> dict[str, tuple[int, int]]:
        return llama.site_shapes(cfg)

    def init_params(self, cfg: DecoderConfig, seed: int = 0) -> dict:
        return llama.init_params(cfg, seed)

    def param_logical_axes(self, cfg: DecoderConfig) -> dict:
        return llama.param_logical_axes(cfg)


FAMILY = LlamaFamily()
