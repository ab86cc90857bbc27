"""The conversions behind ``goose-convert``, callable from Python.

Each function reads local files only, writes its output, and returns the lines a user should
see (what was written, notes about the import), so the command line only prints them.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import numpy as np

from goose_jax.config import DTypePolicy, T5Config


def describe_model(cfg: T5Config, params) -> str:
    """One line: tensor and parameter counts, dtype, depth and head of a T5."""
    import jax

    leaves = jax.tree.leaves(params)
    n = sum(int(np.prod(x.shape)) for x in leaves)
    head = "tied head" if cfg.tie_word_embeddings else "untied head"
    return (f"{len(leaves)} tensors, {n:,} parameters, {cfg.dtype.param_dtype}, "
            f"{cfg.num_encoder_layers}+{cfg.num_decoder_layers} layers, {head}")


def hf_to_orbax(src: str, dst: str, *, dtype: str = "float32",
                overwrite: bool = False) -> list[str]:
    """A Hugging Face T5 directory -> a goose-jax (Orbax) model checkpoint in ``dtype``."""
    from goose_jax.checkpoint import save_model
    from goose_jax.interop.hf import load_hf_t5

    cfg, params = load_hf_t5(src, dtype=DTypePolicy(param_dtype=dtype))
    written = save_model(dst, cfg, params, overwrite=overwrite)
    return [f"wrote goose-jax checkpoint {written} ({describe_model(cfg, params)})"]


def orbax_to_hf(src: str, dst: str) -> list[str]:
    """A goose-jax model checkpoint -> a Hugging Face T5 directory."""
    from goose_jax.checkpoint import load_model
    from goose_jax.interop.hf import save_hf_t5

    cfg, params = load_model(src)
    return [f"wrote {p}" for p in save_hf_t5(cfg, params, dst)] + [
        f"({describe_model(cfg, params)})"]


def import_into_library(base: str, out: str, do_import: Callable, *, append: bool = False,
                        overwrite: bool = False) -> list[str]:
    """Imports experts with ``do_import(cfg, target)`` and writes them to the library ``out``.

    ``target`` holds the rank, scale and sites of the library being appended to (empty for a new
    library), so that imported experts are padded to fit it.
    """
    from goose_jax.base_model import load_base
    from goose_jax.interop.stacking import write_library
    from goose_jax.library import MANIFEST, ExpertLibrary

    cfg, params = load_base(base)
    target = {}
    if append and os.path.isfile(os.path.join(out, MANIFEST)):
        lib = ExpertLibrary.open(out, cfg, params)
        target = {"rank": lib.rank, "scale": lib.scale, "sites": lib.sites}
    imported = do_import(cfg, target)
    lines = [f"note: {note}" for note in imported.notes]
    lib = write_library(imported, out, cfg, params, append=append, overwrite=overwrite)
    gates = "with gates" if imported.gates is not None else "without gates"
    lines.append(f"wrote {len(imported.names)} expert(s) {gates} to {lib.path} (rank "
                 f"{imported.rank}, scale {imported.scale:g}, {len(imported.sites)} sites; the "
                 f"library now has {len(lib)} expert(s))")
    return lines


def peft_to_library(adapters: Sequence[str], base: str, out: str, *,
                    names: Sequence[str] | None = None, scale: float | None = None,
                    append: bool = False, overwrite: bool = False) -> list[str]:
    """PEFT LoRA adapter directories -> experts of a goose-jax library (one each, in order)."""
    from goose_jax.interop.peft import import_peft

    def do_import(cfg, target):
        return import_peft(adapters, cfg, names=names, scale=target.get("scale", scale),
                           rank=target.get("rank"), sites=target.get("sites"))

    return import_into_library(base, out, do_import, append=append, overwrite=overwrite)


def release_to_library(ckpt: str, base: str, out: str, *, names: Sequence[str] | None = None,
                       append: bool = False, overwrite: bool = False) -> list[str]:
    """The original release's checkpoint -> experts with gates in a goose-jax library.

    ``names`` is a list of expert names in checkpoint order, or one element naming one of the
    release's lists (``P3``, ``Full``, ...).
    """
    from goose_jax.interop.release import RELEASE_EXPERT_SETS, import_release

    if names is not None and len(names) == 1 and names[0] in RELEASE_EXPERT_SETS:
        names = names[0]

    def do_import(cfg, target):
        return import_release(ckpt, cfg, names=names, **target)

    return import_into_library(base, out, do_import, append=append, overwrite=overwrite)


def library_to_peft(library: str, expert: str, out: str, *, overwrite: bool = False) -> list[str]:
    """One expert of a goose-jax library -> a PEFT LoRA adapter directory."""
    from goose_jax.interop.peft import export_peft

    return [f"wrote {p}" for p in export_peft(library, expert, out, overwrite=overwrite)]
