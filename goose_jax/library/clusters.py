"""Two-level routing clusters on disk: ``<library>/clusters.safetensors``.

One file per library, recorded in the manifest (format version 2, ``library.manifest``) with
its size, sha256, C and the number of experts it covers. Tensors, per site: ``<site>/centroids``
(C, I) float32 unit rows and ``<site>/members`` (C, M) int32 expert rows (indices into the
header's expert list), ascending within a cluster, padded with -1. The header holds ``experts``
(the JSON list of names, in row order) and ``info`` (how they were built: seed, Lloyd steps,
balance, the vectors clustered, seconds).

The clusters belong to the gates they were built from: the library forgets them whenever an
expert is added, replaced or removed (``ExpertLibrary._drop_clusters``), and they are built
again with ``goose_jax.routing.two_level.cluster_library`` (``goose-train clusters``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from goose_jax.core.errors import LibraryError
from goose_jax.core.tensorfile import SafetensorsFile
from goose_jax.core.trees import flatten_sites, nest_sites
from goose_jax.library.manifest import CLUSTERS_FILE, bytes_sha256
from goose_jax.library.store import ExpertLibrary

__all__ = ["CLUSTERS_FILE", "clusters_info", "load_clusters", "save_clusters"]


def save_clusters(lib: ExpertLibrary, clusters: dict, names: Sequence[str],
                  info: dict[str, Any]) -> str:
    """Writes per-site ``{"centroids": (C, I), "members": (C, M)}`` clusters of the experts
    ``names`` (every expert of the library, in its order) into ``lib``. Returns the path.

    Raises:
      LibraryError: the names are not the library's experts in order, or the sites, shapes or
        cluster counts disagree.
    """
    if list(names) != lib.names:
        raise LibraryError(f"{lib.path}: clusters must cover the library's {len(lib)} experts in "
                           f"its order; found {len(names)} names")
    flat = flatten_sites(clusters)
    if set(flat) != set(lib.sites):
        raise LibraryError(f"{lib.path}: clusters must cover every site of the library; they "
                           f"differ at {sorted(set(flat) ^ set(lib.sites))[:3]}")
    tensors, counts = {}, set()
    for site, (d_in, _) in lib.sites.items():
        cents = np.ascontiguousarray(flat[site]["centroids"], np.float32)
        members = np.ascontiguousarray(flat[site]["members"], np.int32)
        if cents.ndim != 2 or cents.shape[1] != d_in or members.ndim != 2 or \
                members.shape[0] != cents.shape[0]:
            raise LibraryError(f"{lib.path}: site {site}: clusters must be centroids (C, {d_in}) "
                               f"and members (C, M); found {cents.shape} and {members.shape}")
        counts.add(cents.shape[0])
        tensors[f"{site}/centroids"] = cents
        tensors[f"{site}/members"] = members
    meta = {"experts": json.dumps(list(names)), "info": json.dumps(info)}
    return lib.write_clusters(tensors, meta, max(counts))


def _read(lib: ExpertLibrary) -> tuple[SafetensorsFile, dict]:
    record = lib.manifest.get("clusters")
    if record is None:
        raise LibraryError(f"{lib.path}: the library has no two-level routing clusters; build "
                           "them with goose-train clusters --library " + lib.path)
    file = os.path.join(lib.path, CLUSTERS_FILE)
    if not os.path.isfile(file):
        raise LibraryError(f"{file}: clusters file is missing (listed in the manifest); rebuild "
                           "it with goose-train clusters --overwrite")
    with open(file, "rb") as f:
        data = f.read()
    if len(data) != record["bytes"] or bytes_sha256(data) != record["sha256"]:
        raise LibraryError(f"{file}: expected {record['sha256']} ({record['bytes']} bytes, the "
                           f"manifest), found {bytes_sha256(data)} ({len(data)} bytes): the file "
                           "changed after it was written; rebuild it with goose-train clusters "
                           "--overwrite")
    return SafetensorsFile(file, error=LibraryError, data=data), record


def clusters_info(lib: ExpertLibrary) -> dict[str, Any]:
    """How the library's clusters were built (the header's ``info``), plus the manifest
    record."""
    tensors, record = _read(lib)
    return {**json.loads(tensors.metadata.get("info", "{}")), **record}


def load_clusters(lib: ExpertLibrary, names: Sequence[str] | None = None) -> dict:
    """The library's clusters as per-site ``{"centroids", "members"}``, for
    ``routing.two_level.TwoLevel(clusters=...)`` with the experts ``names`` loaded in this order.

    Args:
      lib: an open library.
      names: the experts of the stack to route (default: all, in library order). Clusters are
        stored for all of the library's experts; a different set needs its own clusters.

    Raises:
      LibraryError: no clusters, a changed file, or ``names`` not the experts they cover.
    """
    tensors, _ = _read(lib)
    stored = json.loads(tensors.metadata.get("experts", "[]"))
    want = lib.names if names is None else list(names)
    if stored != want:
        raise LibraryError(f"{lib.path}: the stored clusters cover {len(stored)} experts "
                           f"({stored[:3]}...), not the {len(want)} asked for ({want[:3]}...); "
                           "route all of the library's experts in its order, or rebuild the "
                           "clusters (goose-train clusters --overwrite)")
    flat = tensors.read_all()
    sites = {}
    for key, value in flat.items():
        site, leaf = key.rsplit("/", 1)
        sites.setdefault(site, {})[leaf] = value
    return nest_sites(sites)
