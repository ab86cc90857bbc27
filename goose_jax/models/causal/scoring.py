"""Rank classification for every decoder-only family: every answer choice scored after its prompt,
the prompt run once per example (the decoder-only counterpart of the T5's encoder-once scoring).

Shapes follow the package legend (the ``goose_jax`` module docstring); T is a choice's length,
M = B*C rows (every choice of every example), S the cache slots.

Prompt once. The prompts are left-aligned (``models.causal.generation.left_align``), so that every
row's last prompt token sits at slot L - 1 and every row's choice tokens at the same slots after
it. All prompt tokens but the last go through the model once (``decode=True``), filling cache
slots 0 .. L - 2; the cache is then repeated along C, and one batched call feeds each (example,
choice) row the T tokens ``[last prompt token, c_0, ..., c_{T-2}]`` at slots L - 1 .. L + T - 2,
attending to the cached prompt keys and values. Its logit at step t predicts choice token t,
so the first choice token is scored from the prompt's last logits, and the prompt's own logits
(the (L, V) head products, the largest part of a long prompt's work outside the layers) are
never computed. Choice padding lies after every real token of its row, where the causal rule
hides it.

Per choice (``naive=True``): each (example, choice) row is its whole prompt followed by the
choice, run through the model without a cache; for reference and for ``bench/decoder_forward``.

Both return the summed NLL of each choice's tokens; the caller normalises by length exactly as
for the T5 (``evaluation.evaluator.Evaluator.score_choices``). Choices end with EOS, as on the T5
path, so
that a choice is also scored for ending where it does.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from goose_jax.core.errors import EvalError
from goose_jax.core.trees import nest_sites
from goose_jax.models.causal.generation import left_align
from goose_jax.models.causal.model import positions_from_mask
from goose_jax.models.config import FAST_COMPILE_OPTIONS
from goose_jax.models.scan import per_layer_state, repeat_rows, stack_layers
from goose_jax.models.scoring import target_nll
from goose_jax.models.sites import TELEMETRY, collect_counts

Array = jax.Array


def _telemetry(cfg, variables: dict, sites: tuple[str, ...], mask_BQ: Array) -> dict:
    # Every site of one forward sees the same tokens: its count mask is the call's token mask.
    if not sites:
        return variables
    masks = nest_sites({s: {"mask": mask_BQ} for s in sites})
    return {**variables, TELEMETRY: stack_layers(masks, cfg) if cfg.scan_layers else masks}


def _apply(model, variables: dict, sites, *args, mutable: list[str], **kwargs):
    """(logits, counts): the model's output, and the top-1 counts its sites sowed."""
    mutable = [*mutable, "intermediates"] if sites else mutable
    if not mutable:
        return model.apply(variables, *args, **kwargs), {}, {}
    out, state = model.apply(variables, *args, mutable=mutable, **kwargs)
    return out, state, collect_counts(per_layer_state(model.cfg, state))


def _prompt_once(model_cls, cfg, adapter, prompt_vars, choice_vars, ids_BL, mask_BL, tgt_BCT,
                 tmask_BCT, sites):
    model = model_cls(cfg, adapter)
    B, C, T = tgt_BCT.shape
    L = ids_BL.shape[1]
    S = L - 1 + T
    ids_BL, mask_BL = left_align(ids_BL, mask_BL)
    tgt_MT, tmask_MT = tgt_BCT.reshape(B * C, T), tmask_BCT.reshape(B * C, T)
    # Choice slots are real keys: the causal rule hides every slot after a query, padding included.
    cache_mask_BS = jnp.concatenate([mask_BL, jnp.ones((B, T - 1), mask_BL.dtype)], axis=1)
    prefix_mask_BP = mask_BL[:, :L - 1]
    _, state, counts = _apply(model, _telemetry(cfg, prompt_vars, sites, prefix_mask_BP), sites,
                              ids_BL[:, :L - 1], positions_from_mask(prefix_mask_BP),
                              cache_mask_BS, decode=True, max_len=S, mutable=["cache"])
    cache = repeat_rows(cfg, state["cache"], C)
    last_M1 = jnp.repeat(ids_BL[:, L - 1:], C, axis=0)
    step_MT = jnp.concatenate([last_M1, tgt_MT[:, :T - 1]], axis=1)
    first_M = jnp.repeat(jnp.maximum(jnp.sum(mask_BL, axis=-1) - 1, 0), C, axis=0)
    pos_MT = first_M[:, None] + jnp.arange(T, dtype=first_M.dtype)[None, :]
    # The step's tokens that count for telemetry: the last prompt token and the fed choice
    # tokens of each real choice (as the T5 counts its decoder's start token per choice).
    step_vars = _telemetry(cfg, {**choice_vars, "cache": cache}, sites, tmask_MT)
    logits_MTV, _, step_counts = _apply(model, step_vars, sites, step_MT, pos_MT,
                                        jnp.repeat(cache_mask_BS, C, axis=0), decode=True,
                                        max_len=S, mutable=["cache"])
    return target_nll(logits_MTV, tgt_MT, tmask_MT).reshape(B, C), _add(counts, step_counts)


def _per_choice(model_cls, cfg, adapter, prompt_vars, ids_BL, mask_BL, tgt_BCT, tmask_BCT, sites):
    model = model_cls(cfg, adapter)
    B, C, T = tgt_BCT.shape
    L = ids_BL.shape[1]
    ids_BL, mask_BL = left_align(ids_BL, mask_BL)
    tgt_MT, tmask_MT = tgt_BCT.reshape(B * C, T), tmask_BCT.reshape(B * C, T)
    real_M1 = (jnp.sum(tmask_MT, axis=-1, keepdims=True) > 0).astype(mask_BL.dtype)
    ids_MQ = jnp.concatenate([jnp.repeat(ids_BL, C, axis=0), tgt_MT[:, :T - 1]], axis=1)
    mask_MQ = jnp.concatenate([jnp.repeat(mask_BL, C, axis=0),
                               tmask_MT[:, :T - 1].astype(mask_BL.dtype)], axis=1)
    # Padded choice rows (C rounded up) hold a real prompt but are no real input.
    tele_MQ = mask_MQ * real_M1
    logits_MQV, _, counts = _apply(model, _telemetry(cfg, prompt_vars, sites, tele_MQ), sites,
                                   ids_MQ, positions_from_mask(mask_MQ), mask_MQ, mutable=[])
    nll_M = target_nll(logits_MQV[:, L - 1:], tgt_MT, tmask_MT)
    return nll_M.reshape(B, C), counts


def _add(a: dict, b: dict) -> dict:
    return {k: a.get(k, 0.0) + b.get(k, 0.0) for k in {**a, **b}}


def _choice_nll_impl(model_cls, cfg, adapter, prompt_vars, choice_vars, ids_BL, mask_BL,
                     tgt_BCT, tmask_BCT, naive: bool = False, sites: tuple[str, ...] = ()):
    if naive:
        return _per_choice(model_cls, cfg, adapter, choice_vars, ids_BL, mask_BL, tgt_BCT,
                           tmask_BCT, sites)
    return _prompt_once(model_cls, cfg, adapter, prompt_vars, choice_vars, ids_BL, mask_BL, tgt_BCT,
                        tmask_BCT, sites)


_STATIC = ("model_cls", "cfg", "adapter", "naive", "sites")
_CHOICE_NLL = {False: jax.jit(_choice_nll_impl, static_argnames=_STATIC),
               True: jax.jit(_choice_nll_impl, static_argnames=_STATIC,
                             compiler_options=FAST_COMPILE_OPTIONS)}


def choice_nll(model: type, cfg, adapter, prompt_vars: dict, choice_vars: dict, ids_BL,
               mask_BL, tgt_BCT, tmask_BCT, *, naive: bool = False,
               sites: tuple[str, ...] = (), fast_compile: bool = False
               ) -> tuple[Array, dict[str, Array]]:
    """Summed NLL (B, C) of every choice after its prompt, jitted (static shapes).

    Args:
      model: the family's model class.
      cfg: the model config.
      adapter: the site adapter (None: the base model); static under jit.
      prompt_vars: the variables of the prompt's pass (``params`` and the adapter's
        collections), whose per-example entries (``router/<site>/example_index``) have B rows.
      choice_vars: the same for the choice rows: per-example entries repeated to M = B*C rows.
        With ``naive`` only these are read (every row holds its prompt and its choice).
      ids_BL, mask_BL: (B, L) int prompts and their masks, padded on either side; L >= 2.
      tgt_BCT, tmask_BCT: (B, C, T) int choice tokens and masks (padded choices: all zero);
        T >= 1.
      naive: run each (prompt, choice) row whole instead of the prompt once (module doc).
      sites: with a telemetry adapter (``routing.methods.RoutedAdapter``), the sites
        whose top-1 experts are counted over real tokens.
      fast_compile: compile with ``models.config.FAST_COMPILE_OPTIONS``.

    Returns:
      (nll_BC float32, per-site (E,) top-1 counts, empty without ``sites``).
    """
    if ids_BL.shape[1] < 2 or tgt_BCT.shape[2] < 1:
        raise EvalError(f"choice_nll: need prompts of L >= 2 and choices of T >= 1 "
                        f"slots; got {ids_BL.shape} and {tgt_BCT.shape}")
    return _CHOICE_NLL[bool(fast_compile)](model, cfg, adapter, prompt_vars, choice_vars,
                                           ids_BL, mask_BL, tgt_BCT, tmask_BCT, naive=naive,
                                           sites=tuple(sites))
