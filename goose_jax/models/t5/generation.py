"""Greedy generation with a key/value cache, jitted with static shapes.

Shapes follow the package legend (the ``goose_jax`` module docstring).

The encoder runs once; then each step feeds one token per row through the decoder (``T5.decode``
with ``decode=True``), inside a ``jax.lax.while_loop`` that ends when every row has emitted EOS or
``max_new_tokens`` tokens exist. Every step is one token through every site, so a routing
adapter routes each generated token on its own.

With ``telemetry=True`` the routing that decoding computes is also counted: the adapter sows
per-site top-1 counts (``goose_jax.routing.methods.RoutedAdapter`` with ``telemetry``) over the
tokens
of each site's ``telemetry`` mask, and the loop carries their sum. The encoder pass counts the
real input tokens, each step counts the rows still decoding (up to and including their EOS), and
rows whose input is all padding (batch padding) count nothing: the same tokens a teacher-forced
forward over the generated answers would count, without running it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from goose_jax.core.errors import ConfigError
from goose_jax.core.sharding import batch_sharding, put_global
from goose_jax.models.config import FAST_COMPILE_OPTIONS
from goose_jax.models.greedy import greedy_loop, greedy_result
from goose_jax.models.scan import stack_layers, unstack_layers
from goose_jax.models.sites import (
    TELEMETRY,
    Adapter,
    collect_counts,
    resolve_adapter,
    telemetry_masks,
)
from goose_jax.models.t5.config import T5Config
from goose_jax.models.t5.model import T5, model_variables, ones_mask, site_shapes

Array = jax.Array


def _generate_impl(cfg, variables, input_ids_BL, mask_BL, max_new_tokens, adapter=None,
                   telemetry=False):
    model = T5(cfg, adapter)
    B = input_ids_BL.shape[0]
    T = max_new_tokens
    sites = tuple(site_shapes(cfg)) if telemetry else ()

    def apply(vs, masks, *args, mutable, **kwargs):
        # Returns (output, mutated collections); with telemetry the sown counts among them,
        # per layer (a scanned model reads stacked masks and sows stacked counts).
        if telemetry:
            masks = stack_layers(masks, cfg) if cfg.scan_layers else masks
            vs, mutable = {**vs, TELEMETRY: masks}, [*mutable, "intermediates"]
        if not mutable:
            return model.apply(vs, *args, **kwargs), {}
        out, state = model.apply(vs, *args, mutable=mutable, **kwargs)
        if telemetry and cfg.scan_layers:
            state = {**state, "intermediates": unstack_layers(state["intermediates"])}
        return out, state

    enc_sites = [s for s in sites if s.startswith("encoder/")]
    enc_BLD, enc_state = apply(variables, telemetry_masks(enc_sites, mask_BL, mask_BL, mask_BL),
                               input_ids_BL, mask_BL, method=T5.encode, mutable=[])
    enc_counts = collect_counts(enc_state)
    dec_sites = [s for s in sites if s.startswith("decoder/")]
    real_B = jnp.any(mask_BL != 0, axis=-1)   # batch padding rows hold no input token

    def step(cache, tok_B, count_B):
        vs = dict(variables) if cache is None else {**variables, "cache": cache}
        # Cross-attention k and v project the encoder output at the first step only.
        masks = telemetry_masks(dec_sites, mask_BL, count_B[:, None], mask_BL)
        logits, mutated = apply(vs, masks, tok_B[:, None], enc_BLD, mask_BL, decode=True,
                                max_len=T, method=T5.decode, mutable=["cache"])
        new_B = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
        finite_B = jnp.all(jnp.isfinite(logits[:, -1]), axis=-1)
        return new_B, mutated["cache"], collect_counts(mutated), finite_B

    start_B = jnp.full((B,), cfg.decoder_start_token_id, jnp.int32)
    tok_B, cache, step_counts, finite_B = step(None, start_B, real_B)
    return greedy_loop(lambda cache, tok_B, i, count_B: step(cache, tok_B, count_B), cache,
                       tok_B, finite_B, {**enc_counts, **step_counts}, real_B, T,
                       cfg.eos_token_id, cfg.pad_token_id)


_GENERATE_STATIC = ("cfg", "max_new_tokens", "adapter", "telemetry")
_generate = jax.jit(_generate_impl, static_argnames=_GENERATE_STATIC)
_generate_fast = jax.jit(_generate_impl, static_argnames=_GENERATE_STATIC,
                         compiler_options=FAST_COMPILE_OPTIONS)
# The jitted decoder generate_greedy calls, public for ahead-of-time compiles (pipeline.plan).
GREEDY = _generate


def generate_greedy(cfg: T5Config, params, input_ids_BL, max_new_tokens: int,
                    attention_mask_BL=None, *, routing=None, adapter: Adapter | None = None,
                    collections: dict | None = None, fast_compile: bool = False,
                    telemetry: bool = False, check_finite: bool = False,
                    mesh=None) -> Array | tuple[Array, dict[str, Array]]:
    """Greedy decoding with a key/value cache, jitted with static shapes.

    Args:
      cfg: the model config.
      params: the base parameter tree.
      input_ids_BL: (B, L) int encoder tokens.
      max_new_tokens: T, the most tokens generated per row.
      attention_mask_BL: (B, L) 1 for real encoder tokens, 0 for padding; None means all real.
        A row that is all padding is batch padding (its routing is never counted).
      routing: a ``goose_jax.routing.methods.Routed`` (any routing method over an expert library).
      adapter: optional site adapter (LoRA, gates, routing).
      collections: extra variable collections the adapter reads (e.g. ``{"lora": ...}``).
      fast_compile: compile with ``models.config.FAST_COMPILE_OPTIONS`` (quicker to compile, slower
        to run).
      telemetry: also return the per-site top-1 expert counts of the routing decoding computed;
        the adapter must sow them (``build_routed(..., telemetry=True)``).
      check_finite: raise ``NonFiniteError`` when the logits of a real row become NaN or inf
        before it finishes (argmax over NaN would quietly emit token 0); waits for the result.
      mesh: the device mesh ``params`` and the routing collections are laid out on
        (``core.sharding.make_mesh``): the rows are placed over its ``data`` axis (when it divides
        B);
        a routing built with this mesh (``build_routed(mesh=...)``) decodes with its library
        split over ``expert``, never gathered.

    Returns:
      int32 (B, T): the new tokens without the decoder start token; a row stops at its EOS and is
      padded with ``cfg.pad_token_id`` (0) after it. With ``telemetry``, the pair (tokens,
      ``{site: (E,) float32 counts}``) over the real input tokens (encoder sites, cross-attention
      k and v) and the generated tokens up to and including each row's EOS (other decoder sites).
    """
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    adapter, collections = resolve_adapter(adapter, collections, routing)
    input_ids_BL = jnp.asarray(input_ids_BL, jnp.int32)
    mask = ones_mask(input_ids_BL) if attention_mask_BL is None else jnp.asarray(attention_mask_BL)
    if mesh is not None and input_ids_BL.shape[0] % mesh.shape["data"] == 0:

        input_ids_BL, mask = put_global((input_ids_BL, mask), batch_sharding(mesh))
    fn = _generate_fast if fast_compile else _generate
    variables = model_variables(cfg, params, collections)
    tokens_BT, counts, finite_B = fn(cfg, variables, input_ids_BL, mask,
                                     int(max_new_tokens), adapter=adapter,
                                     telemetry=bool(telemetry))
    return greedy_result(tokens_BT, counts, finite_B, telemetry=bool(telemetry),
                         check_finite=check_finite)
