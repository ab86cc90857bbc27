"""The decoder-only Llama family (Llama, Qwen2, Mistral) behind the ``ModelFamily`` contract
(``goose_jax.models.family``)."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from goose_jax.core.sharding import put_global
from goose_jax.core.trees import nest_sites
from goose_jax.models.family import ModelFamily, Site
from goose_jax.models.llama import generation, hf, loss, scoring
from goose_jax.models.llama import model as llama
from goose_jax.models.llama.config import FAMILIES, DecoderConfig

# Every site: attention q/k/v/o and the gated MLP's gate/up/down.
SITES = r"layers_\d+/(self_attn/[qkvo]|mlp/(gate|up|down))"
_LABELS = {"llama": "Llama", "qwen2": "Qwen2", "mistral": "Mistral"}


class LlamaFamily(ModelFamily):
    """The decoder-only family (Llama, Qwen2, Mistral) as the model-family contract describes it."""
    names = FAMILIES
    config_type = DecoderConfig
    decoder_only = True
    hf_model_types = FAMILIES
    sites_pattern = SITES
    scans = True
    remats = True
    peft_no_site = ("model.embed_tokens", "lm_head")
    peft_default_targets = ("q_proj", "v_proj")
    peft_task_type = "CAUSAL_LM"

    def name_of(self, cfg: DecoderConfig) -> str:
        return cfg.family

    def describe(self, name: str) -> str:
        return f"decoder-only ({name})"

    def label(self, name: str) -> str:
        return _LABELS[name]

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

    def param_shapes(self, cfg: DecoderConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
        return hf.expected_shapes(cfg)

    def summary(self, cfg: DecoderConfig) -> str:
        return f"{cfg.family}, {cfg.num_layers} layers"

    def load_hf(self, path: str, *, dtype=None, mesh=None) -> tuple[DecoderConfig, dict]:
        cfg, params = hf.load_hf_llama(path, dtype=dtype)
        return cfg, params if mesh is None else put_global(params,
                                                           self.base_shardings(cfg, mesh))

    def save_hf(self, cfg: DecoderConfig, params: dict, path: str, *,
                overwrite: bool = False) -> list[str]:
        return hf.save_hf_llama(cfg, params, path, overwrite=overwrite)

    def peft_sites(self, cfg: DecoderConfig) -> dict[str, Site]:
        shapes = llama.site_shapes(cfg)
        sites = {}
        for name, path, transposed in hf.tensor_map(cfg):
            site = "/".join(path[:-1])
            if transposed and site in shapes:
                sites[name.removesuffix(".weight")] = Site(site, *shapes[site])
        return sites

    def with_tokenizer(self, cfg: DecoderConfig, tokenizer: Any) -> DecoderConfig:
        return loss.loss_config(cfg, tokenizer)

    def batch_encoding(self, cfg: DecoderConfig, tokenizer: Any) -> dict[str, Any]:
        return loss.prompt_tokens(cfg, tokenizer)

    def eval_prefix(self, cfg: DecoderConfig, tokenizer: Any) -> list[int]:
        # Prompts start as training starts them (``loss.prompt_bos``).
        bos = loss.prompt_bos(cfg, tokenizer)
        return [] if bos is None else [bos]

    def encode_prompt(self, tokenizer: Any, text: str, max_length: int,
                      prefix: list[int]) -> list[int]:
        # No EOS (the answer follows); truncated from the left, keeping the end.
        keep = max(1, max_length - len(prefix))
        return prefix + tokenizer.encode(text, add_eos=False)[-keep:]

    def eval_config(self, cfg: DecoderConfig, tokenizer: Any) -> DecoderConfig:
        # Generation stops at the EOS its choices and its training targets end with.
        return cfg.replace(eos_token_id=tokenizer.eos_id)

    def token_nll(self, cfg: DecoderConfig, variables: dict, batch: dict, adapter=None, *,
                  remat: str = "none"):
        model, variables = self.training_layout(cfg, variables, remat)
        return loss.causal_nll(model, variables, batch, adapter)

    def choice_scorer(self, fast_compile: bool):
        return functools.partial(scoring.decoder_choice_nll, fast_compile=bool(fast_compile))

    def generate(self, cfg: DecoderConfig, params: dict, ids_BL, max_new_tokens: int, mask_BL,
                 *, adapter=None, collections=None, fast_compile: bool = False,
                 telemetry: bool = False, check_finite: bool = False, mesh=None):
        return generation.generate_decoder_greedy(
            cfg, params, ids_BL, max_new_tokens, mask_BL, adapter=adapter,
            collections=collections, fast_compile=fast_compile, telemetry=telemetry,
            check_finite=check_finite)

    def masked_forward(self, cfg: DecoderConfig, adapter, sites, collection: str):
        model = llama.Llama(cfg, adapter)
        sites = tuple(sites)

        def forward(variables, ids_BT, mask_BT):
            masks = nest_sites({name: {"mask": mask_BT} for name in sites})
            mask_BT = mask_BT.astype(jnp.int32)
            return model.apply({**variables, collection: masks}, ids_BT,
                               llama.positions_from_mask(mask_BT), mask_BT,
                               mutable=["intermediates"])

        return forward, ("input_ids_BT", "mask_BT")

    def activation_batch(self, cfg: DecoderConfig, batch: dict, tokenizer: Any) -> tuple:
        ids_BS, mask_BS, _ = loss.pack(cfg, batch)
        return np.asarray(ids_BS), np.asarray(mask_BS)


FAMILY = LlamaFamily()
