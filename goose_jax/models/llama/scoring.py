"""Rank classification of the Llama family: prompt-once choice scoring
(``goose_jax.models.causal.scoring``) run with ``Llama``."""

from __future__ import annotations

from goose_jax.models.causal import scoring
from goose_jax.models.llama.model import Llama


def decoder_choice_nll(cfg, adapter, prompt_vars: dict, choice_vars: dict, ids_BL, mask_BL,
                       tgt_BCT, tmask_BCT, **kwargs):
    """Summed NLL (B, C) of every choice after its prompt, and the telemetry counts: the
    arguments and result of ``models.causal.scoring.choice_nll``."""
    return scoring.choice_nll(Llama, cfg, adapter, prompt_vars, choice_vars, ids_BL, mask_BL,
                              tgt_BCT, tmask_BCT, **kwargs)
