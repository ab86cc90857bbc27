"""The ``ModelFamily`` methods every decoder-only family shares (``goose_jax.models.family``):
Hugging Face folders through the family's ``HFLayout``, the causal-LM loss, prompt-once choice
scoring, left-aligned greedy generation and the masked forward, each run with the family's
model class. A family subclasses ``CausalFamily`` and supplies its config, model and layout."""

from __future__ import annotations

import functools
from typing import Any

import jax.numpy as jnp
import numpy as np

from goose_jax.core.sharding import put_global
from goose_jax.core.trees import nest_sites
from goose_jax.models.causal import generation, loss, scoring
from goose_jax.models.causal import hf as causal_hf
from goose_jax.models.causal.model import positions_from_mask
from goose_jax.models.family import ModelFamily, Site


class CausalFamily(ModelFamily):
    """A decoder-only family. Subclasses set ``names``, ``config_type``, ``hf_model_types``,
    ``sites_pattern``, ``model`` (the Flax model class, ``models.causal``'s calling convention),
    ``layout`` (its ``causal.hf.HFLayout``) and ``labels``, and implement the architecture
    methods (``preset``, ``config_from_hf_dict``, ``site_shapes``, ``init_params``,
    ``param_logical_axes``)."""

    decoder_only = True
    scans = True
    remats = True
    peft_no_site = ("model.embed_tokens", "lm_head")
    peft_default_targets = ("q_proj", "v_proj")
    peft_task_type = "CAUSAL_LM"
    #: The family's model class and HF layout.
    model: type = object
    layout: causal_hf.HFLayout | None = None
    #: The family names as users write them (``{"llama": "Llama"}``).
    labels: dict[str, str] = {}

    def name_of(self, cfg) -> str:
        return cfg.family

    def describe(self, name: str) -> str:
        return f"decoder-only ({name})"

    def label(self, name: str) -> str:
        return self.labels[name]

    def param_shapes(self, cfg) -> dict[tuple[str, ...], tuple[int, ...]]:
        return causal_hf.expected_shapes(self.layout, cfg)

    def summary(self, cfg) -> str:
        return f"{cfg.family}, {cfg.num_layers} layers"

    def load_hf(self, path: str, *, dtype=None, mesh=None) -> tuple[Any, dict]:
        cfg, params = causal_hf.load_folder(self.layout, path, dtype=dtype)
        return cfg, params if mesh is None else put_global(params,
                                                           self.base_shardings(cfg, mesh))

    def save_hf(self, cfg, params: dict, path: str, *, overwrite: bool = False) -> list[str]:
        return causal_hf.save_folder(self.layout, cfg, params, path, overwrite=overwrite)

    def peft_sites(self, cfg) -> dict[str, Site]:
        shapes = self.site_shapes(cfg)
        sites = {}
        for name, path, transposed in self.layout.tensor_map(cfg):
            site = "/".join(path[:-1])
            if transposed and site in shapes:
                sites[name.removesuffix(".weight")] = Site(site, *shapes[site])
        return sites

    def with_tokenizer(self, cfg, tokenizer: Any):
        return loss.loss_config(cfg, tokenizer)

    def batch_encoding(self, cfg, tokenizer: Any) -> dict[str, Any]:
        return loss.prompt_tokens(cfg, tokenizer)

    def eval_prefix(self, cfg, tokenizer: Any) -> list[int]:
        # Prompts start as training starts them (``loss.prompt_bos``).
        bos = loss.prompt_bos(cfg, tokenizer)
        return [] if bos is None else [bos]

    def encode_prompt(self, tokenizer: Any, text: str, max_length: int,
                      prefix: list[int]) -> list[int]:
        # No EOS (the answer follows); truncated from the left, keeping the end.
        keep = max(1, max_length - len(prefix))
        return prefix + tokenizer.encode(text, add_eos=False)[-keep:]

    def eval_config(self, cfg, tokenizer: Any):
        # Generation stops at the EOS its choices and its training targets end with.
        return cfg.replace(eos_token_id=tokenizer.eos_id)

    def token_nll(self, cfg, variables: dict, batch: dict, adapter=None, *,
                  remat: str = "none"):
        model, variables = self.training_layout(cfg, variables, remat)
        return loss.causal_nll(self.model, model, variables, batch, adapter)

    def choice_scorer(self, fast_compile: bool):
        return functools.partial(scoring.choice_nll, self.model, fast_compile=bool(fast_compile))

    def generate(self, cfg, params: dict, ids_BL, max_new_tokens: int, mask_BL, *, adapter=None,
                 collections=None, fast_compile: bool = False, telemetry: bool = False,
                 check_finite: bool = False, mesh=None):
        return generation.generate_greedy(
            self.model, tuple(self.site_shapes(cfg)), cfg, params, ids_BL, max_new_tokens,
            mask_BL, adapter=adapter, collections=collections, fast_compile=fast_compile,
            telemetry=telemetry, check_finite=check_finite)

    def masked_forward(self, cfg, adapter, sites, collection: str):
        model = self.model(cfg, adapter)
        sites = tuple(sites)

        def forward(variables, ids_BT, mask_BT):
            masks = nest_sites({name: {"mask": mask_BT} for name in sites})
            mask_BT = mask_BT.astype(jnp.int32)
            return model.apply({**variables, collection: masks}, ids_BT,
                               positions_from_mask(mask_BT), mask_BT, mutable=["intermediates"])

        return forward, ("input_ids_BT", "mask_BT")

    def activation_batch(self, cfg, batch: dict, tokenizer: Any) -> tuple:
        ids_BS, mask_BS, _ = loss.pack(cfg, batch)
        return np.asarray(ids_BS), np.asarray(mask_BS)
