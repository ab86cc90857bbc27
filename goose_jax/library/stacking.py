"""Many experts onto one stacked library: one rank, one scale, one set of sites.

Shared by the importers of PEFT adapters (``interop/peft.py``) and of the original release's
checkpoints (``interop/release.py``): each reads its format into ``SiteLoRA`` per expert and
site, then ``stack_experts`` stacks them (leading expert axis E) and ``write_library`` writes an
``ExpertLibrary``.

  - rank: R is the largest rank found; a smaller rank r is zero-padded exactly (A gets R - r zero
    columns, B gets R - r zero rows), so ``(x A) B`` is unchanged;
  - scale: S is the scale shared by the most (expert, site) pairs (or the one asked for); where
    an expert's scale s differs, ``s / S`` is folded into its B. That is exact in real
    arithmetic and costs one float32 rounding of B (none when ``s / S`` is a power of two); the
    pairs that already have scale S are stored bit for bit;
  - coverage: a site an expert lacks gets zero A and B (exactly no contribution);
    ``ImportedExperts.info[n]["covered_sites"]`` lists the sites expert n really has.

Shapes follow the package legend (the ``goose_jax`` module docstring); R is the common LoRA rank
of the stack. Also used here: r one expert's rank.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from goose_jax.core.errors import AdapterError
from goose_jax.core.progress import progress_bar
from goose_jax.core.trees import nest_sites
from goose_jax.experts.lora import DEFAULT_SITES, LoRAConfig
from goose_jax.library.store import MANIFEST, ExpertLibrary
from goose_jax.models import families

_SHOWN = 4


def show_names(items: Iterable[Any]) -> str:
    """The first few items, quoted, and how many more there are (for one-line messages)."""
    items = list(items)
    text = ", ".join(repr(x) for x in items[:_SHOWN])
    return text + (f" (and {len(items) - _SHOWN} more)" if len(items) > _SHOWN else "")


@dataclasses.dataclass(frozen=True)
class SiteLoRA:
    """One expert at one site, goose-jax orientation: ``y += (x @ lora_a) @ lora_b * scale``.

    Attributes:
      lora_a: (I, r) float32.
      lora_b: (r, O) float32.
      scale: the expert's own scale at this site.
    """

    lora_a: np.ndarray
    lora_b: np.ndarray
    scale: float


@dataclasses.dataclass
class ImportedExperts:
    """Experts stacked on a leading axis, ready for ``build_routed`` or an ``ExpertLibrary``.

    Attributes:
      experts: per site ``lora_a`` (E, I, R) and ``lora_b`` (E, R, O), float32 NumPy.
      gates: per site ``gate`` (E, I) float32, or None.
      names: the E expert names.
      scale: the one LoRA scale of every expert (see the module doc for how it is kept).
      rank: R.
      sites: the library's sites, ``{name: (I, O)}`` in model order.
      info: per expert, JSON facts: ``covered_sites`` (the sites it really has), ``source``, ...
      notes: remarks for a person (folded scales, ignored tensors).
    """

    experts: dict
    gates: dict | None
    names: list[str]
    scale: float
    rank: int
    sites: dict[str, tuple[int, int]]
    info: list[dict]
    notes: list[str] = dataclasses.field(default_factory=list)


def stack_experts(per_expert: Sequence[Mapping[str, SiteLoRA]],
                  shapes: Mapping[str, tuple[int, int]], *, rank: int | None = None,
                  scale: float | None = None) -> tuple[dict, int, float, list[int]]:
    """Stacks experts given per site onto one rank and one scale, exactly (module doc).

    Args:
      per_expert: for each expert, site -> ``SiteLoRA`` (sites it lacks get zeros).
      shapes: the stacked sites and their (I, O), in order.
      rank: R (default: the largest rank found); smaller ranks are zero-padded.
      scale: S (default: the scale shared by the most (expert, site) pairs).

    Returns:
      (experts tree, R, S, per expert the number of sites whose B absorbed ``s / S``).
    """
    found = [lora.lora_a.shape[1] for sites in per_expert for lora in sites.values()]
    if not found:
        raise AdapterError("nothing to import: no expert has a LoRA at any site")
    R = max(found) if rank is None else int(rank)
    if max(found) > R:
        raise AdapterError(f"an expert has rank {max(found)}, more than the library's rank {R}")
    if scale is None:
        counts = collections.Counter(lora.scale for sites in per_expert
                                     for lora in sites.values())
        scale = max(counts, key=counts.get)  # ties: the first scale seen
    S = float(scale)
    if S == 0 or not math.isfinite(S):
        raise AdapterError(f"library LoRA scale {scale!r}: expected a finite non-zero number "
                           "(B is stored divided by it)")
    E = len(per_expert)
    tree, folded = {}, [0] * E
    for site, (d_in, d_out) in shapes.items():
        a = np.zeros((E, d_in, R), np.float32)
        b = np.zeros((E, R, d_out), np.float32)
        for n, sites in enumerate(per_expert):
            lora = sites.get(site)
            if lora is None:
                continue
            r = lora.lora_a.shape[1]
            a[n, :, :r] = lora.lora_a
            if lora.scale == S:
                b[n, :r] = lora.lora_b
            else:
                b[n, :r] = lora.lora_b.astype(np.float64) * (lora.scale / S)
                folded[n] += 1
        tree[site] = {"lora_a": a, "lora_b": b}
    return nest_sites(tree), R, S, folded


def union_sites(cfg: families.ModelConfig, per_expert: Iterable[Mapping[str, Any]]
                ) -> dict[str, tuple[int, int]]:
    """The sites any expert has, with their shapes, in model order."""
    used = set().union(*(set(sites) for sites in per_expert))
    return {s: shape for s, shape in families.site_shapes(cfg).items() if s in used}


def library_sites(cfg: families.ModelConfig, sites: Mapping | None,
                  per_expert: Sequence[Mapping[str, Any]]) -> dict[str, tuple[int, int]]:
    """The sites of the library to import into: ``sites`` (checked to hold every expert's
    sites), or by default the union of the experts' sites."""
    if sites is None:
        return union_sites(cfg, per_expert)
    out = {k: tuple(v) for k, v in sites.items()}
    for n, expert in enumerate(per_expert):
        outside = [s for s in expert if s not in out]
        if outside:
            raise AdapterError(f"expert {n} has LoRA at sites the library lacks: "
                               f"{show_names(outside)}")
    return out


# --- writing an expert library ------------------------------------------------------------------


def sites_pattern(cfg: families.ModelConfig, sites: Iterable[str]) -> str:
    """A ``LoRAConfig.sites`` expression selecting exactly ``sites``."""
    sites = list(sites)
    every = list(families.site_shapes(cfg))
    if sites == every:
        return DEFAULT_SITES
    return "|".join(re.escape(s) for s in sites)


def write_library(imported: ImportedExperts, out: str | os.PathLike, cfg: families.ModelConfig,
                  params: Any, *, append: bool = False, overwrite: bool = False,
                  progress: bool | None = None):
    """Writes imported experts into an ``ExpertLibrary`` (created, or opened with ``append``).

    With ``append`` the library must already have the imported rank, scale and sites (import
    with ``rank=lib.rank, scale=lib.scale, sites=lib.sites``). Each expert's manifest entry
    gets ``imported.info`` (``covered_sites`` only where an expert lacks some library sites).

    Returns:
      The ``ExpertLibrary``.
    """

    if append and os.path.isfile(os.path.join(os.fspath(out), MANIFEST)):
        lib = ExpertLibrary.open(out, cfg, params)
        if lib.rank != imported.rank or lib.scale != imported.scale or \
                lib.sites != imported.sites:
            raise AdapterError(f"{lib.path}: rank / scale / sites of the library "
                               f"({lib.rank}, {lib.scale:g}, {len(lib.sites)} sites) differ from "
                               f"the import ({imported.rank}, {imported.scale:g}, "
                               f"{len(imported.sites)} sites)")
    else:
        lora = LoRAConfig(rank=imported.rank, sites=sites_pattern(cfg, imported.sites),
                          scale=imported.scale)
        lib = ExpertLibrary.create(out, cfg, params, lora)
    items = list(enumerate(imported.names))
    for n, name in progress_bar(items, "writing experts", "expert", progress):
        entry = dict(imported.info[n])
        if len(entry.get("covered_sites", ())) == len(imported.sites):
            entry.pop("covered_sites")
        lib.add(name, imported.experts, imported.gates, index=n, info=entry,
                overwrite=overwrite)
    return lib
