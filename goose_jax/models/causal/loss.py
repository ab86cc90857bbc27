"""The causal-LM loss of expert and gate training on a decoder-only base (Llama, Qwen2, Mistral,
Gemma).

Shapes follow the package legend (the ``goose_jax`` module docstring): L is the prompt length and
T the target length of a batch, as ``goose_jax.data.batching`` builds it for both families. Also
used here: S = L + T, the length of one packed sequence.

One example is one sequence: its prompt tokens followed directly by its target tokens, padded on
the right,

    [BOS] prompt target EOS pad ...

and the model predicts token t + 1 from tokens <= t. Only predictions of target tokens count
(the target's EOS included; never the prompt, never padding), summed and counted exactly as the
T5's ``models.t5.loss.token_nll``, so ``Program`` divides the same way for both families and
gradient
accumulation stays exact.

Special tokens (``prompt_tokens``, which the batches of a decoder-only run are built with):

- the target ends with the tokenizer's EOS, as on the T5 path (``encode_batch(add_eos=True)``):
  the model learns where an answer stops;
- the prompt gets no EOS: it runs straight into its answer, as a decoder-only model reads text;
- the prompt starts with BOS only if the model's config has a ``bos_token_id`` and the tokenizer
  has a BOS token (the tokenizer's id is used: it is the one its own encoding would insert). The
  byte-level tokenizer has none, so a ``random:`` base trained on bytes sees no BOS.

Pre-tokenised prompts and targets (lists of ints) are used as they are, with no BOS or EOS
added, as on the T5 path. A target token counts unless it is padding (``pad_token_id``, as for
the T5); where the pad id is also the EOS id the tokenizer ends targets with (Qwen2;
``loss_config`` puts that id in the config), a row's first such token is its EOS and counts,
and only the ones after it are padding. An example with an empty prompt and no
BOS loses its first target token (nothing precedes it to predict it from).

Evaluation of a trained decoder-only expert must build its prompts the same way (BOS as here,
no EOS after the prompt) to see what the expert was trained on.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from goose_jax.models.causal.model import positions_from_mask

Array = jax.Array


def prompt_bos(cfg, tokenizer: Any) -> int | None:
    """The BOS id that starts every prompt, or None (see the module doc): the tokenizer's BOS
    when both the config and the tokenizer have one."""
    if cfg.bos_token_id is None:
        return None
    bos = getattr(tokenizer, "bos_id", None)
    if bos is None:  # a Hugging Face tokenizer behind ``HFTokenizer``
        bos = getattr(getattr(tokenizer, "hf", None), "bos_token_id", None)
    return None if bos is None else int(bos)


def prompt_tokens(cfg, tokenizer: Any) -> dict[str, Any]:
    """How a decoder-only run's batches encode prompts: the ``Batcher`` options ``input_bos``
    (``prompt_bos``) and ``input_eos`` (False)."""
    return {"input_bos": prompt_bos(cfg, tokenizer), "input_eos": False}


def loss_config(cfg, tokenizer: Any) -> Any:
    """``cfg`` with the EOS id the tokenizer ends targets with, for ``pack`` / ``causal_nll``.

    A ``config.json`` listing several EOS ids keeps the first (Llama 3.1 Instruct: 128001),
    while the tokenizer ends text with another (128009); where the pad id is the config's EOS,
    the pad-is-EOS rule would then count the first padding token after each target.
    """
    eos = getattr(tokenizer, "eos_id", None)
    return cfg if eos is None else cfg.replace(eos_token_id=int(eos))


def target_weights(cfg, targets_BT: Array) -> Array:
    """1.0 at target tokens, 0.0 at padding (see the module doc): (B, T) float32."""
    pad_BT = targets_BT == cfg.pad_token_id
    if cfg.eos_token_id is None or cfg.eos_token_id != cfg.pad_token_id:
        return (~pad_BT).astype(jnp.float32)
    # Pad id == EOS id: a row's first one is its EOS; padding starts after it.
    seen_BT = jnp.cumsum(pad_BT.astype(jnp.int32), axis=-1)
    return ((seen_BT == 0) | (pad_BT & (seen_BT == 1))).astype(jnp.float32)


def pack(cfg, batch: dict) -> tuple[Array, Array, Array]:
    """One right-padded sequence per example: its prompt, then its target.

    Args:
      cfg: the model config (pad id).
      batch: ``inputs`` (B, L) right-padded prompts, ``input_mask`` (B, L), ``targets`` (B, T)
        right-padded targets.

    Returns:
      (ids_BS, mask_BS, target_BS): int32 tokens (``pad_token_id`` after the target), int32 1 at
      real tokens, float32 1.0 at target tokens; S = L + T.
    """
    inputs_BL, targets_BT = batch["inputs"], batch["targets"]
    L, T = inputs_BL.shape[-1], targets_BT.shape[-1]
    n_B1 = jnp.sum(batch["input_mask"], axis=-1, keepdims=True)  # prompt lengths
    w_BT = target_weights(cfg, targets_BT)
    j_1S = jnp.arange(L + T)[None, :]
    prompt_BS = j_1S < n_B1
    t_BS = j_1S - n_B1  # index into the target
    t_safe_BS = jnp.clip(t_BS, 0, T - 1)
    from_prompt_BS = jnp.take_along_axis(
        inputs_BL, jnp.broadcast_to(jnp.minimum(j_1S, L - 1), prompt_BS.shape), axis=-1)
    from_target_BS = jnp.take_along_axis(targets_BT, t_safe_BS, axis=-1)
    target_BS = jnp.where(prompt_BS | (t_BS >= T), 0.0,
                          jnp.take_along_axis(w_BT, t_safe_BS, axis=-1))
    ids_BS = jnp.where(prompt_BS, from_prompt_BS,
                       jnp.where(target_BS > 0, from_target_BS, cfg.pad_token_id))
    mask_BS = (prompt_BS | (target_BS > 0)).astype(jnp.int32)
    return ids_BS.astype(jnp.int32), mask_BS, target_BS


def causal_nll(model: type, cfg, variables: dict, batch: dict,
               adapter=None) -> tuple[Array, Array]:
    """Summed cross-entropy of the target tokens, each predicted from the tokens before it, and
    their number: ``models.t5.loss.token_nll`` for a decoder-only model (see the module doc).

    Args:
      model: the family's model class.
      cfg: the model config.
      variables: ``{"params": ..., "experts": ..., "gates": ...}`` as the adapter needs.
      batch: ``inputs`` (B, L), ``input_mask`` (B, L), ``targets`` (B, T) int arrays.
      adapter: the site adapter.

    Returns:
      (nll_sum, tokens): float32 scalars.
    """
    ids_BS, mask_BS, target_BS = pack(cfg, batch)
    logits_BSV = model(cfg, adapter).apply(variables, ids_BS, positions_from_mask(mask_BS),
                                           mask_BS)
    # Position s predicts token s + 1: the last position predicts nothing.
    nll_BS = optax.softmax_cross_entropy_with_integer_labels(
        logits_BSV[:, :-1].astype(jnp.float32), ids_BS[:, 1:])
    w_BS = target_BS[:, 1:]
    return jnp.sum(nll_BS * w_BS), jnp.sum(w_BS)
