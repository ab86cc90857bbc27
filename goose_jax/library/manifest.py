"""The expert library's manifest (``manifest.json``): its format, reading it and checking it.

Format (strict JSON: no NaN or inf anywhere; a non-finite number is written as null)::

    {"format": "goose-jax-library", "format_version": 1 | 2,   2 exactly when "clusters" is
                                                     present; a reader takes both
     "base_model": {"family": "t5" | "llama" | "qwen2" | "mistral",   absent: "t5"
                    "t5_config" or "decoder_config": {...},   the HF config dict, without the
                                                     storage dtype, with tie_word_embeddings
                    "weights_fingerprint": "sha256:..."},
     "lora": {"rank": R (int > 0), "scale": number, "sites_pattern": ...},
     "sites": {"<site>": [I, O], ...},               every expert has exactly these sites
     "experts": [                                    in the order they were added
       {"name": "<name>",                            letters, digits, _.+- (at most 128)
        "file": "experts/<name>.safetensors",        relative, inside the library
        "has_gate": true | false,
        "bytes": int >= 0, "sha256": "sha256:<64 hex digits>",   of the file as written
        "data": string | null, "steps": int | null, "metrics": object | null,   optional
        ...any other JSON facts the writer gave}],
     "prototypes": {"file": "prototypes.safetensors", "bytes": int >= 0,   optional: written
                    "sha256": "sha256:<64 hex digits>"},             with the prototypes file
     "clusters": {"file": "clusters.safetensors", "bytes": int >= 0,       optional (version 2):
                  "sha256": "sha256:<64 hex digits>",                 the two-level routing
                  "num_clusters": int > 0, "experts": int > 0}}       clusters of the gates

Versions: a library is written with the lowest version that describes it, so one without
clusters stays version 1, readable by every goose-jax that reads libraries; adding clusters
makes it version 2, and dropping them (any expert added, replaced or removed: the clusters were
built from the old gates) makes it version 1 again.

Reading a manifest checks all of it before anything uses it: the format and its version, each
required top-level field and its type, the base model's family and config (it must build a
``T5Config`` or ``DecoderConfig`` of that family),
every entry's fields and their types, names unique, and every expert file resolving inside the
library (not absolute, no ``..``, no symlink out). Each problem is one ``LibraryError`` naming
``manifest.json``, the entry and the field, and the fix.

The writer (``goose_jax.library.store.ExpertLibrary``) keeps the manifest and the expert files in
step;
this module only says what a manifest is.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from collections.abc import Mapping
from typing import Any

from goose_jax.core.errors import DataError, GooseError, LibraryError, one_line
from goose_jax.core.tensorfile import check_folder_writable, read_json
from goose_jax.models import families

MANIFEST = "manifest.json"
EXPERT_DIR = "experts"
PROTOTYPES_FILE = "prototypes.safetensors"   # the average-activation router vectors
CLUSTERS_FILE = "clusters.safetensors"       # the two-level routing clusters of the gates
FORMAT = "goose-jax-library"
FORMAT_VERSION = 1            # a library without clusters
CLUSTERS_VERSION = 2          # a library with clusters
READABLE_VERSIONS = (FORMAT_VERSION, CLUSTERS_VERSION)
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}")
_SHA256 = re.compile(r"sha256:[0-9a-f]{64}")


def strict_json(value: Any) -> Any:
    """``value`` with every non-finite float as None (the manifest is strict JSON)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


# (field, test, what it must be); the first group is required.
_TOP = (("base_model", lambda v: isinstance(v, dict)
         and isinstance(v.get(config_key(v.get("family", families.T5))), dict)
         and isinstance(v.get("weights_fingerprint"), str),
         "an object with family (string; absent means t5), t5_config or decoder_config (object) "
         "and weights_fingerprint (string)"),
        ("lora", lambda v: isinstance(v, dict) and _is_int(v.get("rank")) and v["rank"] > 0
         and (_is_int(v.get("scale")) or isinstance(v.get("scale"), float)),
         "an object with rank (int > 0) and scale (number)"),
        ("sites", lambda v: isinstance(v, dict) and all(
            isinstance(s, list) and len(s) == 2 and all(_is_int(d) and d > 0 for d in s)
            for s in v.values()), "an object: site -> [d_in, d_out]"),
        ("experts", lambda v: isinstance(v, list), "a list"))
_ENTRY = (("name", lambda v: isinstance(v, str) and bool(_NAME.fullmatch(v)), "an expert name"),
          ("file", lambda v: isinstance(v, str) and bool(v), "a path inside the library"),
          ("has_gate", lambda v: isinstance(v, bool), "true or false"),
          ("bytes", lambda v: _is_int(v) and v >= 0, "an int >= 0"),
          ("sha256", lambda v: isinstance(v, str) and bool(_SHA256.fullmatch(v)),
           '"sha256:" and 64 hex digits'))
_ENTRY_OPTIONAL = (("data", lambda v: v is None or isinstance(v, str), "a string"),
                   ("steps", lambda v: v is None or _is_int(v), "an int"),
                   ("metrics", lambda v: v is None or isinstance(v, dict), "an object"))
_REQUIRED = {key for key, _, _ in _ENTRY}


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def read_manifest(path: str) -> dict[str, Any]:
    """The manifest of the library at ``path``, every field checked (see ``_check_manifest``)."""
    mpath = os.path.join(path, MANIFEST)
    if not os.path.isfile(mpath):
        raise LibraryError(f"{path}: not an expert library (no {MANIFEST})")
    manifest = read_json(mpath, error=LibraryError)
    _check_manifest(manifest, path)
    return manifest


def _check_manifest(manifest: Any, path: str) -> None:
    """Raises LibraryError (naming manifest.json, the entry and the field) unless every field of
    ``manifest`` has its type and every expert file resolves inside the library."""
    mpath = os.path.join(path, MANIFEST)
    if not isinstance(manifest, dict):
        raise LibraryError(f"{mpath}: expected a JSON object, found {_kind(manifest)} (not a "
                           "goose-jax library manifest)")
    if manifest.get("format") != FORMAT:
        raise LibraryError(f"{mpath}: format: expected {FORMAT!r}, found "
                           f"{manifest.get('format')!r}")
    version = manifest.get("format_version")
    if isinstance(version, bool) or version not in READABLE_VERSIONS:
        raise LibraryError(f"{mpath}: format_version: expected one of {list(READABLE_VERSIONS)}, "
                           f"found {version!r} (written by another goose-jax version?)")
    if ("clusters" in manifest) != (version == CLUSTERS_VERSION):
        raise LibraryError(f"{mpath}: format_version {version} "
                           f"{'without' if version == CLUSTERS_VERSION else 'with'} a clusters "
                           f"record: version {CLUSTERS_VERSION} is exactly a library with "
                           "clusters; restore the manifest or rebuild the clusters "
                           "(goose-train clusters)")
    for key, ok, what in _TOP:
        if key not in manifest:
            raise LibraryError(f"{mpath}: manifest lacks {key!r}")
        if not ok(manifest[key]):
            raise LibraryError(f"{mpath}: {key}: expected {what}; restore the manifest from a "
                               "backup or recreate the library")
    base_config(manifest, mpath)
    seen = set()
    for i, entry in enumerate(manifest["experts"]):
        where = f"{mpath}: experts[{i}]"
        if not isinstance(entry, dict):
            raise LibraryError(f"{where}: expected an object, found {_kind(entry)}")
        if isinstance(entry.get("name"), str):
            where += f" ({entry['name']!r})"
        problem = entry_problem(entry)
        if problem:
            raise LibraryError(f"{where}: {problem}; remove the entry or restore the manifest")
        if entry["name"] in seen:
            raise LibraryError(f"{where}: name: a second expert named {entry['name']!r}")
        seen.add(entry["name"])
        expert_file(path, entry, mpath)
    record = manifest.get("prototypes")
    if record is not None and not (
            isinstance(record, dict) and record.get("file") == PROTOTYPES_FILE
            and _is_int(record.get("bytes")) and record["bytes"] >= 0
            and isinstance(record.get("sha256"), str) and _SHA256.fullmatch(record["sha256"])):
        raise LibraryError(f"{mpath}: prototypes: expected an object with file "
                           f"{PROTOTYPES_FILE!r}, bytes (int >= 0) and sha256; remove the field "
                           "and recompute the prototypes (goose-train prototypes --overwrite)")
    record = manifest.get("clusters")
    if record is not None and not (
            isinstance(record, dict) and record.get("file") == CLUSTERS_FILE
            and _is_int(record.get("bytes")) and record["bytes"] >= 0
            and isinstance(record.get("sha256"), str) and _SHA256.fullmatch(record["sha256"])
            and _is_int(record.get("num_clusters")) and record["num_clusters"] > 0
            and _is_int(record.get("experts")) and record["experts"] > 0):
        raise LibraryError(f"{mpath}: clusters: expected an object with file {CLUSTERS_FILE!r}, "
                           "bytes (int >= 0), sha256, num_clusters and experts (ints > 0); "
                           "rebuild them (goose-train clusters --overwrite)")


def content_version(manifest: dict) -> int:
    """The format version a manifest is written with: 2 with clusters, else 1."""
    return CLUSTERS_VERSION if "clusters" in manifest else FORMAT_VERSION


def config_key(family: Any) -> str:
    """The base_model field that holds the config of a base of ``family``."""
    return "t5_config" if family == families.T5 else "decoder_config"


def base_family(manifest: dict) -> str:
    """The model family a library's experts belong to (``"t5"`` when the manifest predates
    decoder-only support and does not say)."""
    return manifest["base_model"].get("family", families.T5)


def base_config(manifest: dict, mpath: str) -> families.ModelConfig:
    """The base model's config recorded in a library manifest (read from ``mpath``); raises
    LibraryError when the record is bad."""
    name = base_family(manifest)
    where = f"{mpath}: base_model.{config_key(name)}"
    try:
        return families.config_from_record(manifest["base_model"][config_key(name)], name,
                                           source=where)
    except (GooseError, ValueError, TypeError) as e:
        raise LibraryError(f"{one_line(e)}; restore the manifest from a backup") from None


def entry_problem(entry: dict) -> str | None:
    """What is wrong with the fields of one manifest entry, or None."""
    for key, ok, what in _ENTRY + _ENTRY_OPTIONAL:
        if key not in entry:
            if key in _REQUIRED:
                return f"field {key!r} is missing (expected {what})"
        elif not ok(entry[key]):
            return f"field {key!r}: expected {what}, found {_kind(entry[key])} {entry[key]!r:.60}"
    return None


def expert_file(path: str, entry: dict, mpath: str) -> str:
    """The absolute path of ``entry``'s file; LibraryError unless it resolves inside ``path``."""
    rel = entry["file"]
    file = os.path.join(path, rel)
    parts = rel.replace("\\", "/").split("/")
    root = os.path.realpath(path)
    if os.path.isabs(rel) or ".." in parts or \
            os.path.commonpath([root, os.path.realpath(file)]) != root:
        raise LibraryError(f"{mpath}: expert {entry['name']!r}: field 'file': {rel!r} resolves "
                           f"outside the library (refused); expert files live in {EXPERT_DIR}/ "
                           "of the library itself")
    return file


def check_expert_name(name: Any, where: str = "expert library") -> str:
    """``name`` if it can name an expert (and its file ``experts/<name>.safetensors``).

    Raises:
      LibraryError: anything but letters, digits and ``_.+-`` (starting with a letter or digit,
        at most 128 characters), naming ``where``.
    """
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise LibraryError(f"{where}: invalid expert name {name!r} (use letters, digits and "
                           "_.+-, starting with a letter or digit, at most 128 characters)")
    return name


def check_library_writable(path: str | os.PathLike, *, error=DataError,
                           flag: str = "--library") -> None:
    """Probes (writes and removes a temporary file in) a library folder and its expert folder,
    before any work: a read-only library is refused in one line naming the folder, not found
    when the trained experts are written."""
    for folder in (path, os.path.join(path, EXPERT_DIR)):
        if folder == path or os.path.isdir(folder):
            check_folder_writable(folder, error=error, fix=f"; pass another {flag}")


def bytes_sha256(data: bytes) -> str:
    """The ``"sha256:<hex>"`` digest the manifest records for a file's bytes."""
    return "sha256:" + hashlib.sha256(data).hexdigest()
