"""Greedy generation of every decoder-only family, with a key/value cache, jitted with static
shapes.

Shapes follow the package legend (the ``goose_jax`` module docstring); S = L + T the cache slots.

Every prompt is first left-aligned (its padding moved to the front, the order of its real tokens
kept), so that all rows end at slot L - 1 and every generated token of every row goes to the same
slot L + i: one ``dynamic_update_slice`` per step, no per-row scatter. Positions stay those of the
unpadded row (``models.causal.model.positions_from_mask``), so left and right padding generate
the same tokens. The prompt runs once through the model, filling slots 0 .. L - 1 of the cache;
then each step feeds one token per row inside a ``jax.lax.while_loop`` that ends when every row
has emitted EOS or T tokens exist.

With ``telemetry=True`` the routing that generation computes is also counted, as the T5's
``models.t5.generation.generate_greedy`` does: the adapter sows per-site top-1 counts
(``goose_jax.routing.methods.RoutedAdapter`` with ``telemetry``) over the tokens of each site's
``telemetry`` mask (``sites.sequence_telemetry_masks``), and the loop carries their sum. The
prompt pass counts the real prompt tokens; each step counts the token it feeds only for rows
still generating; rows whose prompt is all padding (batch padding) count nothing. So a row counts
its prompt and every generated token but the last (the one nothing is predicted from): the
tokens a whole-sequence forward that predicts the generated tokens routes, without running it.
With ``check_finite`` the loop also carries whether each real row's logits stayed finite until
it finished.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from goose_jax.core.errors import ConfigError
from goose_jax.models.causal.model import model_variables, positions_from_mask
from goose_jax.models.config import FAST_COMPILE_OPTIONS
from goose_jax.models.greedy import greedy_loop, greedy_result
from goose_jax.models.scan import per_layer_state, stack_layers
from goose_jax.models.sites import (
    TELEMETRY,
    Adapter,
    collect_counts,
    resolve_adapter,
    sequence_telemetry_masks,
)

Array = jax.Array


def left_align(ids_BL: Array, mask_BL: Array) -> tuple[Array, Array]:
    """Moves each row's padding to its front, keeping the order of its real tokens."""
    order_BL = jnp.argsort(mask_BL != 0, axis=-1, stable=True)
    return (jnp.take_along_axis(ids_BL, order_BL, axis=-1),
            jnp.take_along_axis(mask_BL, order_BL, axis=-1))


def _generate_impl(model_cls, cfg, variables, ids_BL, mask_BL, max_new_tokens, adapter=None,
                   sites=()):
    model = model_cls(cfg, adapter)
    telemetry = bool(sites)
    ids_BL, mask_BL = left_align(ids_BL, mask_BL)
    B, L = ids_BL.shape
    T = max_new_tokens
    S = L + T
    # Generated slots are real keys; those not yet written are hidden by the causal rule.
    cache_mask_BS = jnp.concatenate([mask_BL, jnp.ones((B, T), mask_BL.dtype)], axis=1)
    eos = -1 if cfg.eos_token_id is None else cfg.eos_token_id
    real_B = jnp.any(mask_BL != 0, axis=-1)   # batch padding rows hold no prompt token

    def apply(vs, count_BQ, *args):
        # (logits, cache, counts): with telemetry each site counts the tokens of ``count_BQ``.
        mutable = ["cache"]
        if telemetry:
            masks = sequence_telemetry_masks(sites, count_BQ)
            vs = {**vs, TELEMETRY: stack_layers(masks, cfg) if cfg.scan_layers else masks}
            mutable.append("intermediates")
        logits, state = model.apply(vs, *args, cache_mask_BS, decode=True, max_len=S,
                                    mutable=mutable)
        return logits, state["cache"], collect_counts(per_layer_state(cfg, state))

    logits_BLV, cache, counts = apply(variables, mask_BL, ids_BL, positions_from_mask(mask_BL))
    tok_B = jnp.argmax(logits_BLV[:, -1], axis=-1).astype(jnp.int32)
    finite_B = jnp.all(jnp.isfinite(logits_BLV[:, -1]), axis=-1)
    next_pos_B = jnp.sum(mask_BL != 0, axis=-1).astype(jnp.int32)

    def step(cache, tok_B, i, count_B):
        logits_B1V, cache, step_counts = apply(
            {**variables, "cache": cache}, count_B[:, None].astype(mask_BL.dtype),
            tok_B[:, None], (next_pos_B + i - 1)[:, None])
        new_B = jnp.argmax(logits_B1V[:, -1], axis=-1).astype(jnp.int32)
        return new_B, cache, step_counts, jnp.all(jnp.isfinite(logits_B1V[:, -1]), axis=-1)

    return greedy_loop(step, cache, tok_B, finite_B, counts, real_B, T, eos, cfg.pad_token_id)


_STATIC = ("model_cls", "cfg", "max_new_tokens", "adapter", "sites")
_generate = jax.jit(_generate_impl, static_argnames=_STATIC)
_generate_fast = jax.jit(_generate_impl, static_argnames=_STATIC,
                         compiler_options=FAST_COMPILE_OPTIONS)


def generate_greedy(model: type, sites: tuple[str, ...], cfg, params, input_ids_BL,
                    max_new_tokens: int, attention_mask_BL=None, *, routing=None,
                    adapter: Adapter | None = None, collections: dict | None = None,
                    fast_compile: bool = False, telemetry: bool = False,
                    check_finite: bool = False) -> Array | tuple[Array, dict[str, Array]]:
    """Greedy continuation of (padded) prompts, equal to HF ``generate(do_sample=False)``.

    Args:
      model: the family's model class.
      sites: every site of ``cfg``'s model (what telemetry counts).
      cfg: the model config.
      params: the base parameter tree.
      input_ids_BL: (B, L) int prompts, padded on either side (see module doc). A row that is
        all padding is batch padding (its routing is never counted).
      max_new_tokens: T, the most tokens generated per row.
      attention_mask_BL: (B, L) 1 for real tokens, 0 for padding; None means all real.
      routing: a ``goose_jax.routing.methods.Routed`` (any routing method over an expert library).
      adapter: optional site adapter (LoRA, gates, routing).
      collections: extra variable collections the adapter reads.
      fast_compile: compile with ``models.config.FAST_COMPILE_OPTIONS``.
      telemetry: also return the per-site top-1 expert counts of the routing generation
        computed (module doc); the adapter must sow them (``build_routed(..., telemetry=True)``).
      check_finite: raise ``NonFiniteError`` when the logits of a real row become NaN or inf
        before it finishes (argmax over NaN would quietly emit token 0); waits for the result.

    Returns:
      int32 (B, T): the new tokens only; a row stops at its ``cfg.eos_token_id`` and is padded
      with ``cfg.pad_token_id`` after it (as HF pads finished rows). With ``telemetry``, the
      pair (tokens, ``{site: (E,) float32 counts}``) over each real row's prompt tokens and its
      generated tokens but the last.
    """
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    adapter, collections = resolve_adapter(adapter, collections, routing)
    ids = jnp.asarray(input_ids_BL, jnp.int32)
    mask = (jnp.ones(ids.shape, jnp.int32) if attention_mask_BL is None
            else jnp.asarray(attention_mask_BL, jnp.int32))
    run = _generate_fast if fast_compile else _generate
    tokens_BT, counts, finite_B = run(model, cfg, model_variables(cfg, params, collections), ids,
                                      mask, max_new_tokens, adapter=adapter,
                                      sites=tuple(sites) if telemetry else ())
    return greedy_result(tokens_BT, counts, finite_B, telemetry=bool(telemetry),
                         check_finite=check_finite)
