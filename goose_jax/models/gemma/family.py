"""The Gemma family (Gemma, Gemma 2) behind the ``ModelFamily`` contract
(``goose_jax.models.family``): the decoder-only methods of ``models.causal.family`` with the
Gemma model, config and tensor names."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from goose_jax.models.causal.family import CausalFamily
from goose_jax.models.gemma import hf
from goose_jax.models.gemma import model as gemma
from goose_jax.models.gemma.config import FAMILIES, GemmaConfig

# Every site: attention q/k/v/o and the gated MLP's gate/up/down.
SITES = r"layers_\d+/(self_attn/[qkvo]|mlp/(gate|up|down))"


class GemmaFamily(CausalFamily):
    """The decoder-only Gemma family (Gemma, Gemma 2) behind the model-family contract."""

    names = FAMILIES
    config_type = GemmaConfig
    hf_model_types = FAMILIES
    sites_pattern = SITES
    model = gemma.Gemma
    layout = hf.LAYOUT
    labels = {"gemma": "Gemma", "gemma2": "Gemma 2"}

    def preset(self, name: str) -> GemmaConfig:
        # ``gemma-tiny`` names the family's ``tiny`` where the T5's ``tiny`` would shadow it.
        return GemmaConfig.preset("tiny" if name == "gemma-tiny" else name)

    def config_from_hf_dict(self, d: Mapping[str, Any], *, source: str) -> GemmaConfig:
        return GemmaConfig.from_hf_dict(d, source=source)

    def site_shapes(self, cfg: GemmaConfig) -> dict[str, tuple[int, int]]:
        return gemma.site_shapes(cfg)

    def init_params(self, cfg: GemmaConfig, seed: int = 0) -> dict:
        return gemma.init_params(cfg, seed)

    def param_logical_axes(self, cfg: GemmaConfig) -> dict:
        return gemma.param_logical_axes(cfg)


FAMILY = GemmaFamily()
