"""Greedy generation of the Llama family: the decoder-only loop
(``goose_jax.models.causal.generation``) run with ``Llama``."""

from __future__ import annotations

from goose_jax.models.causal import generation
from goose_jax.models.llama.config import DecoderConfig
from goose_jax.models.llama.model import Llama, site_shapes


def generate_decoder_greedy(cfg: DecoderConfig, params, input_ids_BL, max_new_tokens: int,
                            attention_mask_BL=None, **kwargs):
    """Greedy continuation of (padded) prompts, equal to HF ``generate(do_sample=False)``: the
    arguments and result of ``models.causal.generation.generate_greedy``."""
    return generation.generate_greedy(Llama, tuple(site_shapes(cfg)), cfg, params, input_ids_BL,
                                      max_new_tokens, attention_mask_BL, **kwargs)
