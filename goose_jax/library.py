"""The expert library on disk: a manifest and one safetensors file per expert.

Layout::

    library/
      manifest.json             format, base model identity, sites, rank, scale, experts
      experts/<name>.safetensors  one expert: "<site>/lora_a" (I, R), "<site>/lora_b" (R, O),
                                  and "<site>/gate" (I,) once its gate is trained

Every expert of a library has the library's site list (the sites, their shapes and the rank are
fixed when the library is created); what differs between experts is only whether a gate is
present. Adding or removing an expert writes that expert's file and rewrites the manifest
(atomically, by rename); the other experts' files are never touched. One writer at a time.

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

import functools
import hashlib
import json
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from goose_jax.config import T5Config
from goose_jax.errors import LibraryError
from goose_jax.experts import LoRAConfig, flatten_sites, nest_sites, select_sites
from goose_jax.t5 import site_shapes
from goose_jax.tensorfile import read_safetensors, write_atomic, write_safetensors

MANIFEST = "manifest.json"
EXPERT_DIR = "experts"
FORMAT = "goose-jax-library"
FORMAT_VERSION = 1
FINGERPRINT_SAMPLES = 4096
LEAVES = ("lora_a", "lora_b")
GATE = "gate"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}")


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


def _base_config_dict(cfg: T5Config) -> dict[str, Any]:
    d = cfg.to_hf_dict()
    d.pop("dtype", None)  # storage dtype is not identity: a bf16 copy is the same base
    d["tie_word_embeddings"] = cfg.tie_word_embeddings
    return d


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


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
    def create(cls, path: str | os.PathLike, cfg: T5Config, params: Any,
               lora: LoRAConfig, *, exist_ok: bool = False) -> ExpertLibrary:
        """Creates an empty library for the base model ``(cfg, params)`` and ``lora``'s sites.

        With ``exist_ok``, an existing library is opened instead if it matches this base model
        and these sites (and refused with ``LibraryError`` if it does not).
        """
        path = os.path.abspath(os.fspath(path))
        if os.path.exists(os.path.join(path, MANIFEST)):
            if not exist_ok:
                raise LibraryError(f"{path}: a library already exists here")
            lib = cls.open(path, cfg, params)
            lib._check_sites({k: list(v) for k, v in select_sites(cfg, lora).items()},
                             "the requested LoRA sites")
            if lib.rank != lora.rank or abs(lib.scale - lora.lora_scale) > 1e-12:
                raise LibraryError(f"{lib._manifest_path}: rank / scale: expected {lora.rank} / "
                                   f"{lora.lora_scale}, found {lib.rank} / {lib.scale}")
            return lib
        if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
            raise LibraryError(f"{path}: exists and is not an empty directory or a library")
        sites = select_sites(cfg, lora)
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "base_model": {"t5_config": _base_config_dict(cfg),
                           "weights_fingerprint": weights_fingerprint(params)},
            "lora": {"rank": lora.rank, "scale": lora.lora_scale, "sites_pattern": lora.sites},
            "sites": {name: [d_in, d_out] for name, (d_in, d_out) in sites.items()},
            "experts": [],
        }
        os.makedirs(os.path.join(path, EXPERT_DIR), exist_ok=True)
        lib = cls(path, manifest)
        lib._write_manifest()
        return lib

    @classmethod
    def open(cls, path: str | os.PathLike, cfg: T5Config | None = None,
             params: Any = None) -> ExpertLibrary:
        """Opens a library, checking it against a base model when one is given.

        Args:
          path: the library directory.
          cfg: the base model's config: its architecture must equal the library's, and every
            library site must exist in it with the same shape.
          params: the base model's weights: their fingerprint must equal the library's.

        Raises:
          LibraryError: naming the file, the expected and the found value, for a missing or
            unreadable manifest, an unknown format version, a different base model, or a
            missing expert file.
        """
        path = os.path.abspath(os.fspath(path))
        mpath = os.path.join(path, MANIFEST)
        if not os.path.isfile(mpath):
            raise LibraryError(f"{path}: not an expert library (no {MANIFEST})")
        try:
            with open(mpath, encoding="utf-8") as f:
                manifest = json.load(f)
        except (OSError, ValueError) as e:
            raise LibraryError(f"{mpath}: cannot read as JSON: {' '.join(str(e).split())}"
                               ) from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            found = manifest.get("format") if isinstance(manifest, dict) else type(manifest)
            raise LibraryError(f"{mpath}: format: expected {FORMAT!r}, found {found!r}")
        if manifest.get("format_version") != FORMAT_VERSION:
            raise LibraryError(f"{mpath}: format_version: expected {FORMAT_VERSION}, found "
                               f"{manifest.get('format_version')!r} (written by another "
                               "goose-jax version?)")
        for key in ("base_model", "lora", "sites", "experts"):
            if key not in manifest:
                raise LibraryError(f"{mpath}: manifest lacks {key!r}")
        lib = cls(path, manifest)
        if cfg is not None or params is not None:
            lib.check_base(cfg, params)
        for entry in manifest["experts"]:
            file = os.path.join(path, entry["file"])
            if not os.path.isfile(file):
                raise LibraryError(f"{file}: expert file of {entry['name']!r} is missing "
                                   f"(listed in {mpath})")
        return lib

    def check_base(self, cfg: T5Config | None, params: Any = None) -> None:
        """Raises ``LibraryError`` unless ``(cfg, params)`` is this library's base model
        (either may be None: not checked)."""
        mpath = self._manifest_path
        if cfg is not None:
            want = self.manifest["base_model"]["t5_config"]
            have = _base_config_dict(cfg)
            diff = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))
            if diff:
                k = diff[0]
                raise LibraryError(f"{mpath}: base model config differs ({len(diff)} fields): "
                                   f"{k}: expected {want.get(k)!r} (library), found "
                                   f"{have.get(k)!r} (given model)")
            shapes = {k: list(v) for k, v in site_shapes(cfg).items()}
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
    def sites(self) -> dict[str, tuple[int, int]]:
        return {k: tuple(v) for k, v in self.manifest["sites"].items()}

    @property
    def base_config(self) -> T5Config:
        d = dict(self.manifest["base_model"]["t5_config"])
        tie = d.pop("tie_word_embeddings")
        return T5Config.from_hf_dict(d, source=self._manifest_path).replace(
            tie_word_embeddings=tie)

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
        text = json.dumps(self.manifest, indent=1, sort_keys=False) + "\n"
        write_atomic(self._manifest_path, text)

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
                x = np.asarray(jax.device_get(flat[site][leaf]))
                if index is not None:
                    x = x[index]
                elif x.ndim == len(want[leaf]) + 1:
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
        """
        check_expert_name(name, self.path)
        if name in self and not overwrite:
            raise LibraryError(f"{self.path}: expert {name!r} already exists (overwrite=True, "
                               "or --overwrite on the command line, replaces it)")
        tensors = self._one_expert(experts, LEAVES, index, "experts")
        if gates is not None:
            tensors.update(self._one_expert(gates, (GATE,), index, "gates"))
        rel = f"{EXPERT_DIR}/{name}.safetensors"
        file = os.path.join(self.path, rel)
        os.makedirs(os.path.dirname(file), exist_ok=True)
        meta = {"format": FORMAT, "name": name,
                "base_fingerprint": self.manifest["base_model"]["weights_fingerprint"]}
        write_safetensors(file, tensors, metadata=meta)
        extra = dict(info or {})
        entry = {"name": name, "file": rel, "has_gate": gates is not None,
                 "data": extra.pop("data", ""), "steps": extra.pop("steps", None),
                 "metrics": extra.pop("metrics", {})}
        entry.update({k: v for k, v in extra.items() if k not in entry})
        entry.update({"bytes": os.path.getsize(file), "sha256": _sha256_file(file)})
        try:
            json.dumps(entry)
        except (TypeError, ValueError) as e:
            raise LibraryError(f"{self.path}: info for {name!r} is not JSON: {e}") from None
        experts_list = [e for e in self.manifest["experts"] if e["name"] != name]
        position = self.names.index(name) if name in self else len(experts_list)
        experts_list.insert(position, entry)
        self.manifest["experts"] = experts_list
        self._write_manifest()
        return file

    def remove(self, name: str) -> None:
        """Removes expert ``name`` from the manifest, then deletes its file."""
        entry = self.info(name)
        self.manifest["experts"] = [e for e in self.manifest["experts"] if e["name"] != name]
        self._write_manifest()
        try:
            os.remove(os.path.join(self.path, entry["file"]))
        except FileNotFoundError:
            pass

    # --- reading -------------------------------------------------------------------------------

    def _read(self, entry: dict, want_gate: bool, verify: bool) -> dict[str, np.ndarray]:
        file = os.path.join(self.path, entry["file"])
        if not os.path.isfile(file):
            raise LibraryError(f"{file}: expert file of {entry['name']!r} is missing")
        size = os.path.getsize(file)
        if entry.get("bytes") is not None and size != entry["bytes"]:
            raise LibraryError(f"{file}: size: expected {entry['bytes']} bytes (manifest), "
                               f"found {size} (truncated or replaced?)")
        if verify and entry.get("sha256") and _sha256_file(file) != entry["sha256"]:
            raise LibraryError(f"{file}: sha256: expected {entry['sha256']} (manifest), found "
                               f"{_sha256_file(file)} (corrupt file)")
        out = read_safetensors(file, error=LibraryError)
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
        return out

    def load(self, names: Sequence[str] | None = None, *, dtype=jnp.float32,
             gates: bool | None = None, verify: bool = False) -> tuple[dict, dict | None]:
        """Loads experts stacked on a leading axis, in the order of ``names``.

        Args:
          names: which experts (default: all, in manifest order).
          dtype: dtype of the returned arrays.
          gates: True requires every chosen expert to have a gate; False never loads gates;
            None (default) loads them when every chosen expert has one.
          verify: also check each file's sha256 against the manifest (reads every byte twice).

        Returns:
          (experts, gates): ``experts`` per site ``lora_a`` (E, I, R), ``lora_b`` (E, R, O);
          ``gates`` per site ``gate`` (E, I), or None.
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
        files = [self._read(e, want_gate, verify) for e in entries]
        experts, gate_tree = {}, {}
        for site in self.sites:
            experts[site] = {leaf: jnp.asarray(np.stack([f[f"{site}/{leaf}"] for f in files]),
                                               dtype) for leaf in LEAVES}
            if want_gate:
                gate_tree[site] = {GATE: jnp.asarray(np.stack([f[f"{site}/{GATE}"]
                                                               for f in files]), dtype)}
        return nest_sites(experts), (nest_sites(gate_tree) if want_gate else None)
