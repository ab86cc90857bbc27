"""The T5 family behind the ``ModelFamily`` contract (``goose_jax.models.family``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from goose_jax.core.trees import nest_sites
from goose_jax.models.family import ModelFamily, Site
from goose_jax.models.t5 import generation, hf, loss, scoring
from goose_jax.models.t5 import model as t5
from goose_jax.models.t5.config import T5Config

# Every site: attention q/k/v/o (self and cross) and every FFN matrix.
SITES = r"(encoder|decoder)/block_\d+/(self_attn|cross_attn)/[qkvo]|" \
        r"(encoder|decoder)/block_\d+/ffn/(wi|wi_0|wi_1|wo)"


def reads_encoder_tokens(site: str) -> bool:
    """Whether a site's inputs are the encoder's tokens (encoder sites, and cross-attention's
    k and v, which read the encoder output), not the decoder's."""
    return site.startswith("encoder/") or site.endswith(("cross_attn/k", "cross_attn/v"))


class T5Family(ModelFamily):
    """The T5 family (t5, mt5, umt5 checkpoints) as the model-family contract describes it."""
    names = ("t5",)
    config_type = T5Config
    decoder_only = False
    hf_model_types = ("t5", "mt5", "umt5")
    sites_pattern = SITES
    scans = True
    remats = True
    peft_no_site = ("shared", "encoder.embed_tokens", "decoder.embed_tokens",
                    "encoder.block.0.layer.0.SelfAttention.relative_attention_bias",
                    "decoder.block.0.layer.0.SelfAttention.relative_attention_bias", "lm_head")
    peft_default_targets = ("q", "v")
    peft_task_type = "SEQ_2_SEQ_LM"

    def describe(self, name: str) -> str:
        return "T5"

    def label(self, name: str) -> str:
        return "T5"

    def preset(self, name: str) -> T5Config:
        return T5Config.preset(name)

    def config_from_hf_dict(self, d: Mapping[str, Any], *, source: str) -> T5Config:
        return T5Config.from_hf_dict(d, source=source)

    def site_shapes(self, cfg: T5Config) -> dict[str, tuple[int, int]]:
        return t5.site_shapes(cfg)

    def init_params(self, cfg: T5Config, seed: int = 0) -> dict:
        return t5.init_params(cfg, seed)

    def param_logical_axes(self, cfg: T5Config) -> dict:
        return t5.param_logical_axes(cfg)

    def param_shapes(self, cfg: T5Config) -> dict[tuple[str, ...], tuple[int, ...]]:
        return {s.path: s.param_shape for s in hf.tensor_specs(cfg)}

    def summary(self, cfg: T5Config) -> str:
        return f"{cfg.num_encoder_layers}+{cfg.num_decoder_layers} layers"

    def load_hf(self, path: str, *, dtype=None, mesh=None) -> tuple[T5Config, dict]:
        return hf.load_hf_t5(path, dtype=dtype, mesh=mesh)

    def save_hf(self, cfg: T5Config, params: dict, path: str, *,
                overwrite: bool = False) -> list[str]:
        return hf.save_hf_t5(cfg, params, path, overwrite=overwrite)

    def peft_sites(self, cfg: T5Config) -> dict[str, Site]:
        return hf.linear_sites(cfg)

    def token_nll(self, cfg: T5Config, variables: dict, batch: dict, adapter=None, *,
                  remat: str = "none"):
        model, variables = self.training_layout(cfg, variables, remat)
        return loss.token_nll(model, variables, batch, adapter)

    def choice_scorer(self, fast_compile: bool):
        return scoring.CHOICE_NLL[bool(fast_compile)]

    def generate(self, cfg: T5Config, params: dict, ids_BL, max_new_tokens: int, mask_BL, *,
                 adapter=None, collections=None, fast_compile: bool = False,
                 telemetry: bool = False, check_finite: bool = False, mesh=None):
        return generation.generate_greedy(
            cfg, params, ids_BL, max_new_tokens, mask_BL, adapter=adapter,
            collections=collections, fast_compile=fast_compile, telemetry=telemetry,
            check_finite=check_finite, mesh=mesh)

    def masked_forward(self, cfg: T5Config, adapter, sites, collection: str):
        model = t5.T5(cfg, adapter)
        sites = tuple(sites)

        def forward(variables, ids_BL, enc_mask_BL, dec_BT, dec_mask_BT):
            masks = nest_sites({name: {"mask": enc_mask_BL if reads_encoder_tokens(name)
                                       else dec_mask_BT} for name in sites})
            return model.apply({**variables, collection: masks}, ids_BL, dec_BT, enc_mask_BL,
                               mutable=["intermediates"])

        return forward, ("input_ids_BL", "enc_mask_BL", "decoder_input_ids_BT", "dec_mask_BT")

    def activation_batch(self, cfg: T5Config, batch: dict, tokenizer: Any) -> tuple:
        tgt_BT = np.asarray(batch["targets"])
        dec_BT = np.concatenate([np.full((tgt_BT.shape[0], 1), cfg.decoder_start_token_id,
                                         tgt_BT.dtype), tgt_BT[:, :-1]], axis=1)   # shifted
        return (batch["inputs"], batch["input_mask"], dec_BT,
                (tgt_BT != tokenizer.pad_id).astype(np.int32))


FAMILY = T5Family()
