"""Reading a stacked library's rows: each expert's file read on demand, once, and each leaf
stacked on the host or straight into its sharded layout (``ExpertLibrary.load``).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

LEAVES = ("lora_a", "lora_b")
GATE = "gate"


class ExpertRows:
    """Rows of the stacked library, read on demand: each expert's file is read (and checked)
    the first time one of its tensors is asked for, cast to the load's dtype, and kept only
    until every leaf has taken its tensor (``release``). Rows past the real experts are zero.

    ``read`` records the names of the experts whose files were read, in order.
    """

    def __init__(self, lib: Any, entries: list[dict], want_gate: bool, verify: bool,
                 dtype):
        self.lib, self.entries, self.want_gate, self.verify = lib, entries, want_gate, verify
        self.dtype = None if dtype is None else jnp.dtype(dtype)  # None: as stored
        self._cache: dict[int, dict[str, np.ndarray]] = {}
        self.read: list[str] = []

    def expert(self, row: int) -> dict[str, np.ndarray]:
        if row not in self._cache:
            entry = self.entries[row]
            tensors = self.lib._read(entry, self.want_gate, self.verify)
            leaves = LEAVES + ((GATE,) if self.want_gate else ())
            self._cache[row] = {key: tensors[key] if self.dtype is None else
                                tensors[key].astype(self.dtype, copy=False)
                                for key in (f"{s}/{leaf}" for s in self.lib.sites
                                            for leaf in leaves)}
            self.read.append(entry["name"])
        return self._cache[row]

    def block(self, key: str, shape: tuple[int, ...], index: tuple[slice, ...],
              count: int) -> np.ndarray:
        """The ``index`` block of leaf ``key`` stacked to (count, *shape)."""
        rows = range(*index[0].indices(count))
        real = {i: self.expert(row)[key] for i, row in enumerate(rows) if row < len(self.entries)}
        out = np.zeros((len(rows), *shape), self.dtype or np.result_type(*real.values()))
        for i, x in real.items():
            out[i] = x
        return out[(slice(None), *index[1:])]

    def release(self, key: str) -> None:
        for tensors in self._cache.values():
            tensors.pop(key, None)


def stack_on_host(rows: ExpertRows, count: int, key: str,
                  shape: tuple[int, ...]) -> jax.Array:
    """The first ``count`` experts' rows of tensor ``key`` (each of ``shape``) as one array, then
    frees them."""
    value = rows.block(key, shape, (slice(0, count),), count)
    rows.release(key)
    return jnp.asarray(value)


def stack_into(rows: ExpertRows, count: int, sharding: jax.sharding.Sharding, key: str,
                shape: tuple[int, ...]) -> jax.Array:
    """The first ``count`` experts' rows of tensor ``key`` (each of ``shape``) as an array laid out
    by ``sharding``, each device reading only its block; then frees them."""
    # Called once per local device; devices that hold the same rows (replicas over `data`)
    # share the rows read for the first.
    value = jax.make_array_from_callback((count, *shape), sharding,
                                         lambda index: rows.block(key, shape, index, count))
    rows.release(key)
    return value
