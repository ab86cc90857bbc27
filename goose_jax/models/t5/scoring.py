"""Rank classification for the T5: every answer choice scored under teacher forcing, the encoder
run once per example (or once per choice, ``naive``), jitted.

Shapes follow the package legend (the ``goose_jax`` module docstring); T is a choice's (target's)
length. Also used here: M = B*C rows (every choice of every example), X the encoder's rows (B, or
M when the input is repeated per choice).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from goose_jax.models.config import FAST_COMPILE_OPTIONS
from goose_jax.models.scan import stack_layers, unstack_layers
from goose_jax.models.scoring import target_nll
from goose_jax.models.sites import TELEMETRY, collect_counts, telemetry_masks
from goose_jax.models.t5.config import T5Config
from goose_jax.models.t5.model import T5


def _choice_nll_impl(cfg: T5Config, adapter, enc_vars, dec_vars, ids_BL, mask_BL, tgt_BCT,
                     tmask_BCT, naive: bool = False, sites: tuple[str, ...] = ()):
    """Summed NLL (B, C) of every choice, plus per-site top-1 counts when ``sites`` is given.

    ``naive`` repeats the input per choice and runs the whole model on every (input, choice) row;
    otherwise the encoder runs once per example and its output is repeated along C.
    """
    model = T5(cfg, adapter)
    B, C, T = tgt_BCT.shape
    tgt_MT = tgt_BCT.reshape(B * C, T)
    tmask_MT = tmask_BCT.reshape(B * C, T)
    mask_ML = jnp.repeat(mask_BL, C, axis=0)
    enc_rows = mask_ML if naive else mask_BL
    mutable = ["intermediates"] if sites else False
    if sites:
        # Padded choice rows (C rounded up) hold real encoder tokens but are no real input.
        real_M = (jnp.sum(tmask_MT, axis=-1, keepdims=True) > 0).astype(mask_ML.dtype)
        enc_real = mask_ML * real_M if naive else mask_BL
        masks = {TELEMETRY: telemetry_masks(sites, enc_real, tmask_MT, mask_ML * real_M)}
        if cfg.scan_layers:
            masks = stack_layers(masks, cfg)
        enc_vars, dec_vars = {**enc_vars, **masks}, {**dec_vars, **masks}
    enc_ids = jnp.repeat(ids_BL, C, axis=0) if naive else ids_BL
    res = model.apply(enc_vars, enc_ids, enc_rows, method=T5.encode, mutable=mutable)
    enc_XLD, enc_state = res if sites else (res, None)
    enc_MLD = enc_XLD if naive else jnp.repeat(enc_XLD, C, axis=0)
    start_M1 = jnp.full_like(tgt_MT[:, :1], cfg.decoder_start_token_id)
    dec_MT = jnp.concatenate([start_M1, tgt_MT[:, :-1]], axis=1)   # teacher forcing
    res = model.apply(dec_vars, dec_MT, enc_MLD, mask_ML, method=T5.decode, mutable=mutable)
    logits_MTV, dec_state = res if sites else (res, None)
    nll_BC = target_nll(logits_MTV, tgt_MT, tmask_MT).reshape(B, C)
    if cfg.scan_layers and sites:
        enc_state, dec_state = (
            {**st, "intermediates": unstack_layers(st["intermediates"])}
            for st in (enc_state, dec_state))
    counts = {**collect_counts(enc_state), **collect_counts(dec_state)}
    return nll_BC, counts


_NLL_STATIC = ("cfg", "adapter", "naive", "sites")
CHOICE_NLL = {False: jax.jit(_choice_nll_impl, static_argnames=_NLL_STATIC),
               True: jax.jit(_choice_nll_impl, static_argnames=_NLL_STATIC,
                             compiler_options=FAST_COMPILE_OPTIONS)}
