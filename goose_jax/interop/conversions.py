"""The conversions behind ``goose-convert``, callable from Python.

Each function reads local files only, writes its output, and returns the lines a user should
see (what was written, notes about the import), so the command line only prints them.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from goose_jax.core.checkpoint import check_destination, check_folder_writable
from goose_jax.core.errors import LibraryError
from goose_jax.core.outputs import check_apart, check_free_space
from goose_jax.interop.peft import (
    check_adapter_folder,
    default_expert_name,
    export_peft,
    import_peft,
)
from goose_jax.interop.release import RELEASE_EXPERT_SETS, import_release
from goose_jax.library.manifest import check_library_writable
from goose_jax.library.stacking import write_library
from goose_jax.library.store import MANIFEST, ExpertLibrary, check_expert_name
from goose_jax.models import families
from goose_jax.models.base import load_base, load_hf_model
from goose_jax.models.checkpoint import load_model, read_model_config, save_model
from goose_jax.models.config import DTypePolicy
from goose_jax.models.families import ModelConfig
from goose_jax.models.hf_folder import WEIGHT_FILES, check_model_folder


def describe_model(cfg: ModelConfig, params) -> str:
    """One line: tensor and parameter counts, dtype, depth and head of a model."""
    import jax

    leaves = jax.tree.leaves(params)
    n = sum(int(np.prod(x.shape)) for x in leaves)
    head = "tied head" if cfg.tie_word_embeddings else "untied head"
    depth = families.of(cfg).summary(cfg)
    return f"{len(leaves)} tensors, {n:,} parameters, {cfg.dtype.param_dtype}, {depth}, {head}"


def tree_bytes(params) -> int:
    """The bytes of a params tree's arrays (what writing it needs on disk, headers aside)."""
    import jax

    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
               for x in jax.tree.leaves(params))


def hf_to_orbax(src: str, dst: str, *, dtype: str = "float32",
                overwrite: bool = False) -> list[str]:
    """A Hugging Face T5, Llama, Qwen2 or Mistral directory -> a goose-jax (Orbax) model
    checkpoint in ``dtype``."""

    check_apart({"DST_DIR": dst}, {"SRC_HF_DIR": src})
    check_destination(dst, overwrite=overwrite)   # before the model is read
    cfg, params = load_hf_model(src, dtype=DTypePolicy(param_dtype=dtype))
    check_free_space(dst, tree_bytes(params), what="the checkpoint", flag="DST_DIR")
    written = save_model(dst, cfg, params, overwrite=overwrite)
    return [f"wrote goose-jax checkpoint {written} ({describe_model(cfg, params)})"]


def orbax_to_hf(src: str, dst: str, *, overwrite: bool = False) -> list[str]:
    """A goose-jax model checkpoint -> a Hugging Face directory of its family (refused when
    ``dst`` already holds a model, unless ``overwrite``)."""
    check_model_folder(dst, WEIGHT_FILES, overwrite=overwrite)   # before the model is read
    check_apart({"DST": dst}, {"SRC": src})
    read_model_config(src)
    cfg, params = load_model(src)
    check_free_space(dst, tree_bytes(params), what="the model's weights", flag="DST")
    written = families.of(cfg).save_hf(cfg, params, dst, overwrite=overwrite)
    return [f"wrote {p}" for p in written] + [
        f"({describe_model(cfg, params)})"]


def check_library_out(out: str, *, append: bool = False, overwrite: bool = False,
                      names: Sequence[str] | None = None) -> None:
    """Fails before any work unless experts may be imported into the library ``out``.

    Raises:
      LibraryError: ``out`` is a file or lies below one; holds a library and ``append`` is not
        set; is a non-empty folder that is no library; or (``append``) already holds one of
        ``names`` and ``overwrite`` is not set; or a name that cannot be an expert's.
    """

    check_folder_writable(out, error=LibraryError, fix="; pass another --out")
    check_library_writable(out, error=LibraryError, flag="--out")
    for name in names or ():
        check_expert_name(name, out)
    if os.path.isfile(os.path.join(out, MANIFEST)):
        if not append:
            raise LibraryError(f"{out}: already holds an expert library; pass --append to add to "
                               "it, or another --out")
        taken = [n for n in names or () if n in ExpertLibrary.open(out).names]
        if taken and not overwrite:
            raise LibraryError(f"{out}: already holds experts {taken[:5]}; pass --overwrite to "
                               "replace them, or other --names")
    elif os.path.isdir(out) and os.listdir(out):
        raise LibraryError(f"{out}: exists, is not empty and is not an expert library; pass "
                           "another --out")


def import_into_library(base: str, out: str, do_import: Callable, *, append: bool = False,
                        overwrite: bool = False, names: Sequence[str] | None = None,
                        inputs: Mapping[str, str | Sequence[str]] | None = None) -> list[str]:
    """Imports experts with ``do_import(cfg, target)`` and writes them to the library ``out``.

    ``target`` holds the rank, scale and sites of the library being appended to (empty for a new
    library), so that imported experts are padded to fit it. ``out`` and the expert ``names``
    (when known before the import) are checked first (``check_library_out``; ``out`` apart from
    ``base`` and ``inputs``, flag -> the paths imported, ``core.outputs.check_apart``); a new
    library is
    written under a temporary name and renamed into place, so a crash never leaves half of one.
    """
    import shutil


    check_apart({"--out": out}, {"--base": base, **inputs})
    check_library_out(out, append=append, overwrite=overwrite, names=names)
    cfg, params = load_base(base)
    target = {}
    existing = append and os.path.isfile(os.path.join(out, MANIFEST))
    if existing:
        lib = ExpertLibrary.open(out, cfg, params)
        target = {"rank": lib.rank, "scale": lib.scale, "sites": lib.sites}
    imported = do_import(cfg, target)
    check_library_out(out, append=append, overwrite=overwrite, names=imported.names)
    lines = [f"note: {note}" for note in imported.notes]
    if existing:
        lib = write_library(imported, out, cfg, params, append=True, overwrite=overwrite)
    else:
        tmp = f"{os.path.abspath(out).rstrip(os.sep)}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            write_library(imported, tmp, cfg, params)
            try:
                os.rename(tmp, out)   # onto nothing, or onto an empty folder
            except OSError:
                raise LibraryError(f"{out}: another command wrote here meanwhile; rerun with "
                                   "--append") from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        lib = ExpertLibrary.open(out)
    gates = "with gates" if imported.gates is not None else "without gates"
    lines.append(f"wrote {len(imported.names)} expert(s) {gates} to {lib.path} (rank "
                 f"{imported.rank}, scale {imported.scale:g}, {len(imported.sites)} sites; the "
                 f"library now has {len(lib)} expert(s))")
    return lines


def peft_to_library(adapters: Sequence[str], base: str, out: str, *,
                    names: Sequence[str] | None = None, scale: float | None = None,
                    append: bool = False, overwrite: bool = False) -> list[str]:
    """PEFT LoRA adapter directories -> experts of a goose-jax library (one each, in order)."""

    def do_import(cfg, target):
        return import_peft(adapters, cfg, names=names, scale=target.get("scale", scale),
                           rank=target.get("rank"), sites=target.get("sites"))

    known = list(names) if names is not None else [default_expert_name(a) for a in adapters]
    return import_into_library(base, out, do_import, append=append, overwrite=overwrite,
                               names=known, inputs={"ADAPTER_DIR": adapters})


def release_to_library(ckpt: str, base: str, out: str, *, names: Sequence[str] | None = None,
                       append: bool = False, overwrite: bool = False) -> list[str]:
    """The original release's checkpoint -> experts with gates in a goose-jax library.

    ``names`` is a list of expert names in checkpoint order, or one element naming one of the
    release's lists (``P3``, ``Full``, ...).
    """

    known = list(names) if names is not None else None
    if names is not None and len(names) == 1 and names[0] in RELEASE_EXPERT_SETS:
        names = names[0]
        known = list(RELEASE_EXPERT_SETS[names])

    def do_import(cfg, target):
        return import_release(ckpt, cfg, names=names, **target)

    return import_into_library(base, out, do_import, append=append, overwrite=overwrite,
                               names=known, inputs={"CKPT": ckpt})


def library_to_peft(library: str, expert: str, out: str, *, overwrite: bool = False) -> list[str]:
    """One expert of a goose-jax library -> a PEFT LoRA adapter directory."""

    check_apart({"OUT_DIR": out}, {"LIBRARY_DIR": library})
    check_adapter_folder(out, overwrite=overwrite)
    return [f"wrote {p}" for p in export_peft(library, expert, out, overwrite=overwrite)]
