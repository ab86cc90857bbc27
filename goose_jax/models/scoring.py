"""What scoring a target under teacher forcing shares across model families.

Shapes follow the package legend (the ``goose_jax`` module docstring); M is a number of rows.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def target_nll(logits_MTV: Array, tgt_MT: Array, tmask_MT: Array) -> Array:
    """float32 (M,): the summed NLL of each row's target tokens under its logits (tokens where
    ``tmask_MT`` is 0 add nothing)."""
    gold_MT = jnp.take_along_axis(logits_MTV, tgt_MT[..., None], axis=-1)[..., 0]
    nll_MT = (jax.nn.logsumexp(logits_MTV, axis=-1) - gold_MT) * tmask_MT
    return jnp.sum(nll_MT, axis=-1)
