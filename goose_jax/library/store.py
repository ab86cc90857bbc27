"""The expert library on disk: a manifest and one safetensors file per expert.

Layout::

    library/
      manifest.json             format, base model identity, sites, rank, scale, experts
                                  (its format: ``goose_jax.library.manifest``)
      experts/<name>.safetensors  one expert: "<site>/lora_a" (I, R), "<site>/lora_b" (R, O),
                                  and "<site>/gate" (I,) once its gate is trained

Every expert of a library has the library's site list (the sites, their shapes and the rank are
fixed when the library is created); what differs between experts is only whether a gate is
present. Adding or removing an expert writes that expert's file and rewrites the manifest
(atomically, by rename); the other experts' files are never touched.

Safe to share: every manifest change (create, add, remove) holds an advisory lock (``flock`` on
``manifest.lock`` in the library; POSIX), re-reads the manifest inside it, applies its one change
and writes it atomically, so concurrent writers serialise and none loses another's entry.
Readers take no lock: they see the old manifest or the new one, never half of one.

Checked on load: ``open`` checks every manifest field and refuses an expert file that resolves
outside the library (absolute, ``..``, a symlink out); ``load`` checks each file's size, its
sha256 (by default; the bytes are hashed as they are read) and that its weights are finite.
Never stored: ``add`` refuses non-finite weights; the manifest is strict JSON, a non-finite
number in ``info`` (a diverged run's metric) written as null, which keeps the finite expert.

The base model identity is its T5 config (as the HF dict, without the storage dtype) and a
fingerprint of its weights (``weights_fingerprint``): the sorted parameter names, their shapes,
and a strided sample of at most ``FINGERPRINT_SAMPLES`` values per tensor rounded to bfloat16.
The rounding makes a float32 checkpoint and its bfloat16 cast the same base (experts are trained
against a bf16 copy of the base anyway); the sample makes it cheap for an XL model. It is a
guard against using a library with the wrong base model, not a cryptographic identity of every
weight: two models differing only outside the sampled positions hash alike.

Shapes follow the package legend (the ``goose_jax`` module docstring).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from goose_jax.core.errors import ConfigError, LibraryError
from goose_jax.core.sharding import expert_sharding, expert_shards, padded_count
from goose_jax.core.tensorfile import SafetensorsFile, safetensors_bytes, write_atomic
from goose_jax.core.trees import flatten_sites, nest_sites
from goose_jax.experts.lora import LoRAConfig, select_sites, site_pattern
from goose_jax.library import prototypes
from goose_jax.library.manifest import (
    CLUSTERS_FILE,
    EXPERT_DIR,
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    PROTOTYPES_FILE,
    base_config,
    base_family,
    bytes_sha256,
    check_expert_name,
    config_key,
    content_version,
    entry_problem,
    expert_file,
    read_manifest,
    strict_json,
)
from goose_jax.library.rows import GATE, LEAVES, ExpertRows, stack_into, stack_on_host
from goose_jax.models import families

LOCK = "manifest.lock"
FINGERPRINT_SAMPLES = 4096


def _flat_params(tree: Any) -> dict[str, Any]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(str(getattr(k, "key", k)) for k in path): leaf for path, leaf in flat}


def weights_fingerprint(params: Any) -> str:
    """A stable fingerprint of a parameter tree (see the module doc for what it covers).

    Reads at most ``FINGERPRINT_SAMPLES`` evenly strided values of each tensor, on device, so
    it costs milliseconds even for XL.
    """
    h = hashlib.sha256(b"goose-jax weights fingerprint v1\0")
    for name, leaf in sorted(_flat_params(params).items()):
        shape = tuple(int(s) for s in np.shape(leaf))
        stride = max(1, -(-int(np.prod(shape)) // FINGERPRINT_SAMPLES))
        values = np.asarray(jax.device_get(_sample(leaf, stride)), np.float32)
        h.update(f"{name}\0{shape}\0".encode())
        h.update(values.astype(ml_dtypes.bfloat16).view(np.uint16).astype("<u2").tobytes())
    return "sha256:" + h.hexdigest()


def _sample(leaf: Any, stride: int):
    on_host = isinstance(leaf, np.ndarray) or (
        isinstance(leaf, jax.Array) and leaf.is_fully_addressable
        and all(d.platform == "cpu" for d in leaf.devices()))
    if on_host:  # a view, no copy: sampling is free
        return np.asarray(leaf).reshape(-1)[::stride]
    return _sample_on_device(leaf, stride)  # an accelerator copies the sample, not the tensor


@functools.partial(jax.jit, static_argnums=1)
def _sample_on_device(leaf, stride: int):
    return jnp.ravel(leaf)[::stride].astype(jnp.float32)



@contextlib.contextmanager
def _locked(path: str) -> Iterator[None]:
    """Holds the library's advisory write lock (blocking until it is free)."""
    lock = os.path.join(path, LOCK)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as e:
            raise LibraryError(f"{lock}: cannot lock the library for writing ({e.strerror}): "
                               "keep libraries that are written to on a local or POSIX-locking "
                               "filesystem") from None
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _check_finite(x: np.ndarray, where: str) -> None:
    if x.dtype.kind not in "biu" and not np.isfinite(x).all():  # bfloat16's kind is "V"
        bad = int(np.size(x) - np.count_nonzero(np.isfinite(x)))
        raise LibraryError(f"{where} holds {bad} non-finite values (NaN or inf): a diverged "
                           "run? retrain it (with a lower learning rate)")


def _empty_or_library(path: str) -> bool:
    """Whether ``path`` is missing, an empty directory, or a library (perhaps one that a
    concurrent writer is creating right now)."""
    if not os.path.exists(path):
        return True
    if not os.path.isdir(path):
        return False
    names = set(os.listdir(path))
    experts = os.path.join(path, EXPERT_DIR)
    return MANIFEST in names or names <= {LOCK, EXPERT_DIR} and (
        EXPERT_DIR not in names or os.path.isdir(experts) and not os.listdir(experts))


class ExpertLibrary:
    """A directory of LoRA experts (and their gates) for one base model.

    Create with ``ExpertLibrary.create``, open with ``ExpertLibrary.open``; ``add``, ``remove``
    and ``load`` experts. Attributes: ``path``, ``manifest`` (the parsed ``manifest.json``).
    """

    def __init__(self, path: str, manifest: dict[str, Any]):
        self.path = path
        self.manifest = manifest

    # --- creating and opening ------------------------------------------------------------------

    @classmethod
    def create(cls, path: str | os.PathLike, cfg: families.ModelConfig, params: Any,
               lora: LoRAConfig, *, exist_ok: bool = False) -> ExpertLibrary:
        """Creates an empty library for the base model ``(cfg, params)`` and ``lora``'s sites.

        With ``exist_ok``, an existing library is opened instead if it matches this base model
        and these sites (and refused with ``LibraryError`` if it does not).
        """
        path = os.path.abspath(os.fspath(path))
        if not os.path.exists(os.path.join(path, MANIFEST)):
            if not _empty_or_library(path):
                raise LibraryError(f"{path}: exists and is not an empty directory or a library")
            os.makedirs(os.path.join(path, EXPERT_DIR), exist_ok=True)
            with _locked(path):  # a concurrent creator may have won: then it is opened below
                if not os.path.exists(os.path.join(path, MANIFEST)):
                    sites = select_sites(cfg, lora)
                    manifest = {
                        "format": FORMAT,
                        "format_version": FORMAT_VERSION,
                        "base_model": {"family": families.family(cfg),
                                       config_key(families.family(cfg)):
                                           families.config_record(cfg),
                                       "weights_fingerprint": weights_fingerprint(params)},
                        "lora": {"rank": lora.rank, "scale": lora.lora_scale,
                                 "sites_pattern": site_pattern(cfg, lora)},
                        "sites": {name: [d_in, d_out] for name, (d_in, d_out) in sites.items()},
                        "experts": [],
                    }
                    lib = cls(path, manifest)
                    lib._write_manifest()
                    return lib
        if not exist_ok:
            raise LibraryError(f"{path}: a library already exists here")
        lib = cls.open(path, cfg, params)
        lib._check_sites({k: list(v) for k, v in select_sites(cfg, lora).items()},
                         "the requested LoRA sites")
        if lib.rank != lora.rank or abs(lib.scale - lora.lora_scale) > 1e-12:
            raise LibraryError(f"{lib._manifest_path}: rank / scale: expected {lora.rank} / "
                               f"{lora.lora_scale}, found {lib.rank} / {lib.scale}")
        return lib

    @classmethod
    def open(cls, path: str | os.PathLike, cfg: families.ModelConfig | None = None,
             params: Any = None) -> ExpertLibrary:
        """Opens a library, checking it against a base model when one is given.

        Args:
          path: the library directory.
          cfg: the base model's config: its architecture must equal the library's, and every
            library site must exist in it with the same shape.
          params: the base model's weights: their fingerprint must equal the library's.

        Raises:
          LibraryError: naming the file, the expected and the found value, for a missing or
            unreadable manifest, an unknown format version, a missing or mistyped field, an
            expert file outside the library, a different base model, or a missing expert file.
        """
        path = os.path.abspath(os.fspath(path))
        manifest = read_manifest(path)
        lib = cls(path, manifest)
        if cfg is not None or params is not None:
            lib.check_base(cfg, params)
        for entry in manifest["experts"]:
            file = os.path.join(path, entry["file"])
            if not os.path.isfile(file):
                raise LibraryError(f"{file}: expert file of {entry['name']!r} is missing "
                                   f"(listed in {lib._manifest_path})")
        return lib

    def check_base(self, cfg: families.ModelConfig | None, params: Any = None) -> None:
        """Raises ``LibraryError`` unless ``(cfg, params)`` is this library's base model
        (either may be None: not checked)."""
        mpath = self._manifest_path
        if cfg is not None:
            mine, given = base_family(self.manifest), families.family(cfg)
            if mine != given:
                raise LibraryError(f"{mpath}: the library's experts are for a "
                                   f"{families.describe(mine)} base model, the given model is "
                                   f"{families.describe(given)}: adapters do not move between "
                                   "families")
            want = self.manifest["base_model"][config_key(mine)]
            have = families.config_record(cfg)
            diff = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))
            if diff:
                k = diff[0]
                raise LibraryError(f"{mpath}: base model config differs ({len(diff)} fields): "
                                   f"{k}: expected {want.get(k)!r} (library), found "
                                   f"{have.get(k)!r} (given model)")
            shapes = {k: list(v) for k, v in families.site_shapes(cfg).items()}
            self._check_sites(shapes, "the given model", subset=True)
        if params is not None:
            want_fp = self.manifest["base_model"]["weights_fingerprint"]
            have_fp = weights_fingerprint(params)
            if want_fp != have_fp:
                raise LibraryError(f"{mpath}: base model weights differ: expected fingerprint "
                                   f"{want_fp} (library), found {have_fp} (given model)")

    def _check_sites(self, shapes: Mapping[str, list], what: str, subset: bool = False) -> None:
        mine = self.manifest["sites"]
        if not subset and set(shapes) != set(mine):
            extra = sorted(set(shapes) ^ set(mine))
            raise LibraryError(f"{self._manifest_path}: sites: the library has {len(mine)}, "
                               f"{what} has {len(shapes)}; they differ at {extra[0]!r}")
        for name, shape in mine.items():
            if list(shapes.get(name, [])) != list(shape):
                raise LibraryError(f"{self._manifest_path}: site {name}: expected shape "
                                   f"{tuple(shape)} (library), found "
                                   f"{tuple(shapes[name]) if name in shapes else 'no such site'}"
                                   f" ({what})")

    # --- properties ----------------------------------------------------------------------------

    @property
    def _manifest_path(self) -> str:
        return os.path.join(self.path, MANIFEST)

    @property
    def names(self) -> list[str]:
        """Expert names in the order they were added."""
        return [e["name"] for e in self.manifest["experts"]]

    @property
    def rank(self) -> int:
        return int(self.manifest["lora"]["rank"])

    @property
    def scale(self) -> float:
        return float(self.manifest["lora"]["scale"])

    @property
    def family(self) -> str:
        """The model family of the base (``goose_jax.models.families``): ``"t5"``, ``"llama"``,
        ..."""
        return base_family(self.manifest)

    @property
    def sites(self) -> dict[str, tuple[int, int]]:
        return {k: tuple(v) for k, v in self.manifest["sites"].items()}

    @property
    def base_config(self) -> families.ModelConfig:
        return base_config(self.manifest, self._manifest_path)

    def info(self, name: str) -> dict[str, Any]:
        """The manifest entry of expert ``name``: name, file, data, steps, metrics, has_gate."""
        for entry in self.manifest["experts"]:
            if entry["name"] == name:
                return dict(entry)
        raise LibraryError(f"{self._manifest_path}: no expert named {name!r}; the library has "
                           f"{self.names[:8]}{' ...' if len(self.names) > 8 else ''}")

    def __len__(self) -> int:
        return len(self.manifest["experts"])

    def __contains__(self, name: str) -> bool:
        return name in self.names

    # --- writing -------------------------------------------------------------------------------

    def _write_manifest(self) -> None:
        # Strict JSON: a bare NaN is not JSON, and other readers of the manifest would choke.
        self.manifest = strict_json(self.manifest)
        self.manifest["format_version"] = content_version(self.manifest)
        text = json.dumps(self.manifest, indent=1, sort_keys=False, allow_nan=False) + "\n"
        write_atomic(self._manifest_path, text)
        if "clusters" not in self.manifest:
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(self.path, CLUSTERS_FILE))

    @contextlib.contextmanager
    def _fresh(self) -> Iterator[list[dict]]:
        """Holds the write lock with the manifest freshly re-read from disk and yields its expert
        list; the caller changes it and calls ``_write_manifest`` inside."""
        with _locked(self.path):
            self.manifest = read_manifest(self.path)
            yield self.manifest["experts"]

    def _one_expert(self, tree: Any, leaves: Sequence[str], index: int | None,
                    what: str) -> dict[str, np.ndarray]:
        flat = flatten_sites(tree) if tree else {}
        if set(flat) != set(self.manifest["sites"]):
            missing = sorted(set(self.manifest["sites"]) - set(flat))
            extra = sorted(set(flat) - set(self.manifest["sites"]))
            raise LibraryError(f"{self.path}: {what} sites do not match the library: missing "
                               f"{missing[:3]}, unexpected {extra[:3]}")
        out = {}
        rank = self.rank
        for site, (d_in, d_out) in self.sites.items():
            want = {"lora_a": (d_in, rank), "lora_b": (rank, d_out), GATE: (d_in,)}
            for leaf in leaves:
                if leaf not in flat[site]:
                    raise LibraryError(f"{self.path}: {what} lacks {site}/{leaf}")
                x = flat[site][leaf]
                if index is not None:
                    if not 0 <= index < np.shape(x)[0]:
                        raise LibraryError(f"{self.path}: {what} {site}/{leaf} holds "
                                           f"{np.shape(x)[0]} experts; index {index} is out of "
                                           "range")
                    x = x[index]  # one expert to the host, not the whole stack
                x = np.asarray(jax.device_get(x))
                if index is None and x.ndim == len(want[leaf]) + 1:
                    if x.shape[0] != 1:
                        raise LibraryError(f"{self.path}: {what} {site}/{leaf} holds "
                                           f"{x.shape[0]} experts; pass index= to pick one")
                    x = x[0]
                if x.shape != want[leaf]:
                    raise LibraryError(f"{self.path}: {what} {site}/{leaf}: expected shape "
                                       f"{want[leaf]}, found {x.shape}")
                out[f"{site}/{leaf}"] = np.ascontiguousarray(x)
        return out

    def add(self, name: str, experts: Any, gates: Any = None, *, info: Mapping | None = None,
            index: int | None = None, overwrite: bool = False) -> str:
        """Writes one expert (and its gate vectors, if given) and records it in the manifest.

        Args:
          name: the expert's name (letters, digits, ``_.+-``); its file is
            ``experts/<name>.safetensors``.
          experts: an experts tree with this library's sites: leaves (1, D, R) / (1, R, O), or
            (I, R) / (R, O), or a stacked (E, ...) tree with ``index``.
          gates: optional gates tree: leaves (1, I), (I,), or stacked with ``index``.
          info: JSON facts stored in the manifest entry: ``data`` (what it was trained on),
            ``steps``, ``metrics``, and anything else. The bookkeeping keys (``name``,
            ``file``, ``has_gate``, ``bytes``, ``sha256``) are always recomputed, so an entry
            from ``info(name)`` can be passed back as it is.
          index: which expert of stacked trees to write.
          overwrite: replace an existing expert of this name.

        Returns:
          The path of the written file.

        Raises:
          LibraryError: a bad name, shape or site, non-finite weights (naming the expert and the
            site), info that is not JSON, or a name taken (unless ``overwrite``). Non-finite
            numbers in ``info`` are stored as null (the manifest is strict JSON).
        """
        check_expert_name(name, self.path)
        tensors = self._one_expert(experts, LEAVES, index, "experts")
        if gates is not None:
            tensors.update(self._one_expert(gates, (GATE,), index, "gates"))
        for key, x in tensors.items():
            _check_finite(x, f"{self.path}: expert {name!r}: {key}")
        rel = f"{EXPERT_DIR}/{name}.safetensors"
        file = os.path.join(self.path, rel)
        meta = {"format": FORMAT, "name": name,
                "base_fingerprint": self.manifest["base_model"]["weights_fingerprint"]}
        data = safetensors_bytes(tensors, metadata=meta)
        extra = dict(info or {})
        entry = {"name": name, "file": rel, "has_gate": gates is not None,
                 "data": extra.pop("data", ""), "steps": extra.pop("steps", None),
                 "metrics": extra.pop("metrics", {})}
        entry.update({k: v for k, v in extra.items() if k not in entry})
        entry.update({"bytes": len(data), "sha256": bytes_sha256(data)})
        try:
            entry = strict_json(entry)
            json.dumps(entry, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise LibraryError(f"{self.path}: info for {name!r} is not JSON: {e}") from None
        problem = entry_problem(entry)
        if problem:
            raise LibraryError(f"{self.path}: info for {name!r}: {problem}")
        with self._fresh() as entries:
            names = [e["name"] for e in entries]
            if name in names and not overwrite:  # as it is on disk: perhaps added meanwhile
                raise LibraryError(f"{self.path}: expert {name!r} already exists (overwrite="
                                   "True, or --overwrite on the command line, replaces it)")
            os.makedirs(os.path.dirname(file), exist_ok=True)
            write_atomic(file, data)
            if name in names:
                entries[names.index(name)] = entry
                self._drop_prototypes([name])   # computed with the expert just replaced
            else:
                entries.append(entry)
            self._drop_clusters()   # built from the gates before this one
            self._write_manifest()
        return file

    def remove(self, name: str) -> None:
        """Removes expert ``name`` from the manifest, then deletes its file."""
        with self._fresh() as entries:
            names = [e["name"] for e in entries]
            if name not in names:
                self.info(name)  # raises, naming the experts there are
            entry = entries.pop(names.index(name))
            self._drop_prototypes([name])
            self._drop_clusters()
            self._write_manifest()
            try:  # inside the lock: a concurrent add of this name keeps its new file
                os.remove(os.path.join(self.path, entry["file"]))
            except FileNotFoundError:
                pass

    # --- prototypes (the average-activation baseline's router vectors) -------------------------

    def write_prototypes(self, tensors: Mapping[str, np.ndarray],
                         metadata: Mapping[str, str] | None = None) -> str:
        """Writes ``<library>/prototypes.safetensors`` and records its size and sha256 in the
        manifest (``save_prototypes`` calls this for a library's own file). Returns the
        path."""
        data = safetensors_bytes(dict(tensors), metadata=metadata)
        file = os.path.join(self.path, PROTOTYPES_FILE)
        with self._fresh():
            write_atomic(file, data)
            self.manifest["prototypes"] = {"file": PROTOTYPES_FILE, "bytes": len(data),
                                           "sha256": bytes_sha256(data)}
            self._write_manifest()
        return file

    def _drop_prototypes(self, names: Sequence[str]) -> None:
        """Inside the write lock, before ``_write_manifest``: removes the prototype rows of
        ``names`` (experts replaced or removed), or the whole file where it does not name its
        rows or keeps none (``library.prototypes.drop_rows``)."""
        file = os.path.join(self.path, PROTOTYPES_FILE)
        record = prototypes.drop_rows(file, names, self.manifest.get("prototypes"))
        if record is None:
            self.manifest.pop("prototypes", None)
        else:
            self.manifest["prototypes"] = record

    # --- clusters (two-level routing; goose_jax.library.clusters) -----------------------------

    def write_clusters(self, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str],
                       num_clusters: int) -> str:
        """Writes ``<library>/clusters.safetensors`` and records it (size, sha256, C and the
        number of experts) in the manifest, which becomes format version 2. Returns the path."""
        data = safetensors_bytes(dict(tensors), metadata=dict(metadata))
        file = os.path.join(self.path, CLUSTERS_FILE)
        with self._fresh() as entries:
            write_atomic(file, data)
            self.manifest["clusters"] = {"file": CLUSTERS_FILE, "bytes": len(data),
                                         "sha256": bytes_sha256(data),
                                         "num_clusters": int(num_clusters),
                                         "experts": len(entries)}
            self._write_manifest()
        return file

    def _drop_clusters(self) -> None:
        """Inside the write lock, before ``_write_manifest``: forgets the clusters (their
        experts' gates changed); ``_write_manifest`` deletes their file once the manifest no
        longer names it."""
        self.manifest.pop("clusters", None)

    # --- reading -------------------------------------------------------------------------------

    def _read(self, entry: dict, want_gate: bool, verify: bool) -> dict[str, np.ndarray]:
        name = entry["name"]
        file = expert_file(self.path, entry, self._manifest_path)  # checked again: files change
        if not os.path.isfile(file):
            raise LibraryError(f"{file}: expert file of {name!r} is missing")
        size = os.path.getsize(file)
        if size != entry["bytes"]:
            raise LibraryError(f"{file}: expert {name!r}: size: expected {entry['bytes']} bytes "
                               f"(manifest), found {size} (truncated or replaced?); restore the "
                               "file or add the expert again (--overwrite)")
        data = None
        if verify:  # each file is read once: parsed and hashed from memory
            with open(file, "rb") as f:
                data = f.read()
        tensors = SafetensorsFile(file, error=LibraryError, data=data)
        if verify and bytes_sha256(data) != entry["sha256"]:
            raise LibraryError(f"{file}: expert {name!r}: sha256: expected {entry['sha256']} "
                               f"(manifest), found {bytes_sha256(data)}: the file changed after it "
                               "was written (corrupt copy or disk); restore the file or add the "
                               "expert again (--overwrite)")
        out = tensors.read_all()
        rank = self.rank
        for site, (d_in, d_out) in self.sites.items():
            want = {"lora_a": (d_in, rank), "lora_b": (rank, d_out)}
            if want_gate:
                want[GATE] = (d_in,)
            for leaf, shape in want.items():
                key = f"{site}/{leaf}"
                if key not in out:
                    raise LibraryError(f"{file}: tensor {key}: expected shape {shape}, found "
                                       "no such tensor")
                if tuple(out[key].shape) != shape:
                    raise LibraryError(f"{file}: tensor {key}: expected shape {shape}, found "
                                       f"{tuple(out[key].shape)}")
                _check_finite(out[key], f"{file}: expert {name!r}: tensor {key}")
        return out

    def load(self, names: Sequence[str] | None = None, *, dtype=jnp.float32,
             gates: bool | None = None, verify: bool = True,
             mesh: jax.sharding.Mesh | None = None) -> tuple[dict, dict | None]:
        """Loads experts stacked on a leading axis, in the order of ``names``.

        Each file is read once, checked, and cast to ``dtype`` as it is read (no float32 copy
        of the library). With ``mesh`` the stacks are built straight into their layout
        (``core.sharding.expert_sharding``) by ``jax.make_array_from_callback``: each process reads
        only the files of the experts its own devices hold. The expert axis is padded to E_pad
        = ``core.sharding.padded_count`` to split evenly; rows E ..
        E_pad - 1 are inert (all-zero ``lora_a``, ``lora_b``, ``gate``) and a router must never
        choose them (a zero gate still scores 0).

        Args:
          names: which experts (default: all, in manifest order); E = their number.
          dtype: dtype of the returned arrays (bfloat16 for the large settings); None keeps
            the stored dtype (without a mesh only).
          gates: True requires every chosen expert to have a gate; False never loads gates;
            None (default) loads them when every chosen expert has one.
          verify: check each file's sha256 against the manifest (the default: the bytes are
            hashed as they are read, each file read once; ``bench/library_load.py`` measures
            the cost). Without it only the size and the safetensors header are checked.
          mesh: lay the stacks out on this (data, model, expert) mesh; it may span processes.

        Returns:
          (experts, gates): ``experts`` per site ``lora_a`` (E, I, R), ``lora_b`` (E, R, O);
          ``gates`` per site ``gate`` (E, I), or None. With ``mesh``: (E_pad, ...) global
          arrays, the first E rows the experts of ``names`` in order, the rest zero.

        Raises:
          LibraryError: naming the expert and its file, for a missing, truncated or corrupt
            file, a file outside the library, a wrong shape, or non-finite weights. With a mesh
            spanning processes, only the process that reads a bad file raises it.
        """
        names = self.names if names is None else list(names)
        if not names:
            raise LibraryError(f"{self.path}: no experts to load (the library is empty)")
        entries = [self.info(n) for n in names]
        have_gates = all(e.get("has_gate") for e in entries)
        if gates and not have_gates:
            lacking = [e["name"] for e in entries if not e.get("has_gate")]
            raise LibraryError(f"{self.path}: experts without a trained gate: {lacking[:5]}")
        want_gate = have_gates if gates is None else bool(gates)
        rows = ExpertRows(self, entries, want_gate, verify, dtype)
        if mesh is None:
            stack = functools.partial(stack_on_host, rows, len(entries))
        elif dtype is None:
            raise ConfigError(f"{self.path}: loading onto a mesh needs a dtype (float32 or "
                              "bfloat16), not None")
        else:
            sharding = expert_sharding(mesh)
            count = padded_count(len(entries), expert_shards(mesh))
            stack = functools.partial(stack_into, rows, count, sharding)
        experts, gate_tree = {}, {}
        for site, (d_in, d_out) in self.sites.items():
            shapes = {"lora_a": (d_in, self.rank), "lora_b": (self.rank, d_out)}
            experts[site] = {leaf: stack(f"{site}/{leaf}", shape)
                             for leaf, shape in shapes.items()}
            if want_gate:
                gate_tree[site] = {GATE: stack(f"{site}/{GATE}", (d_in,))}
        return nest_sites(experts), (nest_sites(gate_tree) if want_gate else None)


def save_prototypes(prototypes: dict, path: str, *, names: list[str] | None = None,
                    info: dict | None = None) -> None:
    """Writes average-activation router vectors as ``<site>/gate`` (E, I) safetensors tensors,
    atomically (a temporary file renamed into place).

    Args:
      prototypes: per-site ``{"gate": (E, I)}`` tree
      (``routing.methods.compute_average_activations``).
      path: the file to write (what ``goose-eval --prototypes`` reads).
      names: the E experts' names, in row order (stored in the header, so a reader can pick
        rows by name); None: rows are in the library's order.
      info: how they were computed (pooling, examples per expert), stored in the header.
    """
    flat = {f"{site}/gate": np.ascontiguousarray(v["gate"])
            for site, v in flatten_sites(prototypes).items()}
    meta = {} if names is None else {"experts": json.dumps(list(names))}
    if info:
        meta["info"] = json.dumps(info)
    folder = os.path.dirname(os.path.abspath(path))
    if (os.path.basename(path) == PROTOTYPES_FILE
            and os.path.isfile(os.path.join(folder, MANIFEST))):
        # A library's own file: its size and sha256 go into the manifest.
        ExpertLibrary.open(folder).write_prototypes(flat, meta or None)
    else:
        write_atomic(path, safetensors_bytes(flat, metadata=meta or None))
