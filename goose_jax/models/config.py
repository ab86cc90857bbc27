"""What every model family's config shares: the dtype policy, compile options, remat names.

Every config is a frozen dataclass validated in ``__post_init__``, so a bad value fails where it
is written, not deep inside a jitted function. Configs are hashable: they are passed to
``jax.jit`` as static arguments.

The dtype policy lives here and nowhere else (``DTypePolicy``): parameters in float32 or bfloat16,
compute in bfloat16 or float32, and logits, softmaxes and routing scores always in float32.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from goose_jax.core.errors import ConfigError

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

# XLA's CPU backend spends most of a small model's compile time in LLVM optimisation and its
# fusion emitters; without them small models compile several times faster and run up to 2x
# slower (tests, smoke runs, the miniature world).
FAST_COMPILE_OPTIONS = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}

# Activation rematerialisation policies per block (``goose_jax.models.scan.REMAT_POLICIES``).
REMAT_NAMES = ("none", "block", "dots")



@dataclasses.dataclass(frozen=True)
class DTypePolicy:
    """Where each kind of number lives.

    Attributes:
      param_dtype: storage dtype of the base model's parameters ("float32" or "bfloat16").
      compute_dtype: dtype of matmul inputs and activations ("float32" or "bfloat16").
    Logits, attention softmax, layer-norm statistics and routing scores are float32 always.
    """

    param_dtype: str = "float32"
    compute_dtype: str = "float32"

    def __post_init__(self):
        for name in ("param_dtype", "compute_dtype"):
            value = getattr(self, name)
            if value not in _DTYPES:
                raise ConfigError(
                    f"DTypePolicy.{name} must be one of {sorted(_DTYPES)}, got {value!r}")

    @property
    def param(self) -> Any:
        return _DTYPES[self.param_dtype]

    @property
    def compute(self) -> Any:
        return _DTYPES[self.compute_dtype]

    # Fixed by policy, named so that call sites say what they mean.
    accum = jnp.float32
