"""The T5's training loss: teacher-forced target-token cross-entropy.

Shapes follow the package legend (the ``goose_jax`` module docstring).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from goose_jax.models.t5.config import T5Config
from goose_jax.models.t5.model import T5

Array = jax.Array


def shift_right(targets_BT: Array, start_id: int) -> Array:
    """Decoder inputs for teacher forcing: the targets shifted right after the start token."""
    start = jnp.full(targets_BT.shape[:-1] + (1,), start_id, targets_BT.dtype)
    return jnp.concatenate([start, targets_BT[..., :-1]], axis=-1)


def token_nll(cfg: T5Config, variables: dict, batch: dict, adapter=None) -> tuple[Array, Array]:
    """Summed target-token cross-entropy and the number of target tokens (pad 0 is masked).

    Args:
      cfg: the model config.
      variables: ``{"params": ..., "experts": ..., "gates": ...}`` as the adapter needs.
      batch: ``inputs`` (B, L), ``input_mask`` (B, L), ``targets`` (B, T) int arrays.
      adapter: the site adapter.

    Returns:
      (nll_sum, tokens): float32 scalars.
    """
    targets_BT = batch["targets"]
    dec_BT = shift_right(targets_BT, cfg.decoder_start_token_id)
    logits_BTV = T5(cfg, adapter).apply(variables, batch["inputs"], dec_BT, batch["input_mask"])
    nll_BT = optax.softmax_cross_entropy_with_integer_labels(logits_BTV.astype(jnp.float32),
                                                             targets_BT)
    w_BT = (targets_BT != cfg.pad_token_id).astype(jnp.float32)
    return jnp.sum(nll_BT * w_BT), jnp.sum(w_BT)
