"""The average-activation baseline's router vectors on disk: one safetensors file of
``<site>/gate`` (E, I) tensors, whose header may name the E experts of its rows.

A library's own file is ``<library>/prototypes.safetensors`` (``PROTOTYPES_FILE``), recorded in
the manifest with its size and sha256 (``check_prototypes_file``); the library keeps it in step
when experts are replaced or removed (``drop_rows``). ``library.store.save_prototypes`` writes
one; ``load_prototypes`` reads one back, by expert name.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from goose_jax.core.errors import DataError, GooseError, LibraryError
from goose_jax.core.tensorfile import (
    SafetensorsFile,
    read_safetensors,
    safetensors_bytes,
    write_atomic,
)
from goose_jax.core.trees import nest_sites
from goose_jax.library.manifest import MANIFEST, PROTOTYPES_FILE, bytes_sha256, read_manifest

__all__ = ["PROTOTYPES_FILE", "check_prototypes_file", "drop_rows", "load_prototypes",
           "prototype_names"]



def prototype_names(path: str) -> list[str] | None:
    """The expert names a prototypes file stores in its header (None: a file without them,
    whose rows are in library order). Reads the header only.

    Raises:
      DataError: the file is not safetensors, or its expert list is malformed.
    """
    raw = SafetensorsFile(path, error=DataError).metadata.get("experts")
    if raw is None:
        return None
    try:
        names = json.loads(raw)
    except ValueError:
        names = None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise DataError(f"{path}: header field 'experts' is not a JSON list of names; "
                        "recompute the file with goose-train prototypes")
    return names


def check_prototypes_file(path: str | os.PathLike) -> None:
    """Checks a library's ``prototypes.safetensors`` against the size and sha256 its manifest
    records (a file elsewhere, or one the manifest does not record, is not checked).

    Raises:
      LibraryError: the file differs from the record, naming it and the fix.
    """
    path = os.path.abspath(os.fspath(path))
    folder = os.path.dirname(path)
    if (os.path.basename(path) != PROTOTYPES_FILE
            or not os.path.isfile(os.path.join(folder, MANIFEST)) or not os.path.isfile(path)):
        return
    record = read_manifest(folder).get("prototypes")
    if record is None:
        return
    with open(path, "rb") as f:
        data = f.read()
    if len(data) != record["bytes"]:
        found = f"{len(data)} bytes"
    elif bytes_sha256(data) != record["sha256"]:
        found = bytes_sha256(data)
    else:
        return
    raise LibraryError(f"{path}: expected {record['sha256']} ({record['bytes']} bytes, "
                           f"the library manifest), found {found}: the file changed after it "
                           "was written; recompute it with goose-train prototypes --overwrite")


def load_prototypes(path: str, names: list[str] | None = None) -> dict:
    """The per-site ``{"gate": (E, I)}`` tree of a file ``save_prototypes`` wrote.

    Args:
      path: the file.
      names: the experts wanted, in this order; a file that stores its expert names gives
        exactly these rows. None, or a file without names: every row, as stored.

    Raises:
      DataError: the file is missing, is not safetensors, holds no ``<site>/gate`` tensor, or
        lacks a wanted expert.
      LibraryError: a library's own file differs from the size and sha256 its manifest
        records.
    """
    if not os.path.isfile(path):
        raise DataError(f"{path}: prototypes file does not exist")
    check_prototypes_file(path)
    stored = prototype_names(path)
    flat = read_safetensors(path, error=DataError)
    sites = {k.rsplit("/", 1)[0]: {"gate": v} for k, v in flat.items() if k.endswith("/gate")}
    if not sites:
        raise DataError(f"{path}: no '<site>/gate' tensors")
    if names is not None and stored is not None:
        missing = [n for n in names if n not in stored]
        if missing:
            raise DataError(f"{path}: no prototypes for experts {missing[:3]} (it has "
                            f"{stored[:8]}); recompute them with goose-train prototypes")
        rows = [stored.index(n) for n in names]
        sites = {k: {"gate": v["gate"][rows]} for k, v in sites.items()}
    return nest_sites(sites)


def drop_rows(file: str, names: Sequence[str], record: dict[str, Any] | None
              ) -> dict[str, Any] | None:
    """Removes the rows of experts ``names`` from a library's prototypes ``file``, or the whole
    file where it does not name its rows or keeps none. A file that differs from its manifest
    ``record`` (or cannot be read) is left as it is, for readers to refuse.

    Returns:
      The manifest record to keep: the new one, ``record`` unchanged, or None (no file).
    """
    if not os.path.isfile(file):
        return None
    with open(file, "rb") as fh:
        data = fh.read()
    if record is not None and (len(data) != record["bytes"]
                               or bytes_sha256(data) != record["sha256"]):
        return record
    try:
        stored = prototype_names(file)
        header = dict(SafetensorsFile(file, error=LibraryError).metadata)
        flat = read_safetensors(file, error=LibraryError)
    except GooseError:
        return record   # not ours to repair; readers refuse it
    if stored is not None and not any(n in stored for n in names):
        return record
    keep = [i for i, n in enumerate(stored or []) if n not in names]
    if not keep:
        os.remove(file)
        return None
    header["experts"] = json.dumps([stored[i] for i in keep])
    data = safetensors_bytes({k: np.ascontiguousarray(v[keep]) for k, v in flat.items()},
                             metadata=header)
    write_atomic(file, data)
    return {"file": PROTOTYPES_FILE, "bytes": len(data), "sha256": bytes_sha256(data)}
