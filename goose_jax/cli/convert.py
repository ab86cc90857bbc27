"""``goose-convert``: move checkpoints between Hugging Face and goose-jax formats.

    goose-convert hf-to-orbax SRC_HF_DIR DST_DIR [--dtype float32|bfloat16] [--overwrite]
    goose-convert orbax-to-hf SRC DST
    goose-convert peft ADAPTER_DIR [ADAPTER_DIR ...] --base HF_DIR --out LIBRARY_DIR
    goose-convert phatgoose-release CKPT --base HF_DIR --out LIBRARY_DIR [--names ...]
    goose-convert to-peft LIBRARY_DIR EXPERT_NAME OUT_DIR

Each subcommand is one entry of ``SUBCOMMANDS`` (name -> how to add its arguments, how to run
it), so converters for other formats slot in without touching ``main``. Errors and exit codes
follow the one table of every goose-jax tool (``goose_jax.errors``); nothing is ever downloaded.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable, Sequence

import numpy as np

from goose_jax.tool import run_tool

PROG = "goose-convert"


def _describe(cfg, params) -> str:
    import jax

    leaves = jax.tree.leaves(params)
    n = sum(int(np.prod(x.shape)) for x in leaves)
    head = "tied head" if cfg.tie_word_embeddings else "untied head"
    return (f"{len(leaves)} tensors, {n:,} parameters, {cfg.dtype.param_dtype}, "
            f"{cfg.num_encoder_layers}+{cfg.num_decoder_layers} layers, {head}")


def _hf_to_orbax(args: argparse.Namespace) -> int:
    from goose_jax.checkpoint import save_model
    from goose_jax.config import DTypePolicy
    from goose_jax.interop.hf import load_hf_t5

    cfg, params = load_hf_t5(args.src, dtype=DTypePolicy(param_dtype=args.dtype))
    written = save_model(args.dst, cfg, params, overwrite=args.overwrite)
    print(f"wrote goose-jax checkpoint {written} ({_describe(cfg, params)})")
    return 0


def _orbax_to_hf(args: argparse.Namespace) -> int:
    from goose_jax.checkpoint import load_model
    from goose_jax.interop.hf import save_hf_t5

    cfg, params = load_model(args.src)
    for path in save_hf_t5(cfg, params, args.dst):
        print(f"wrote {path}")
    print(f"({_describe(cfg, params)})")
    return 0


def _args_hf_to_orbax(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", metavar="SRC_HF_DIR",
                   help="local Hugging Face T5 directory (or a models--org--name cache entry)")
    p.add_argument("dst", metavar="DST_DIR", help="goose-jax (Orbax) checkpoint to write")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="parameter dtype of the written checkpoint (default: float32)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace DST_DIR if it already holds a goose-jax checkpoint")


def _args_orbax_to_hf(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", metavar="SRC", help="goose-jax (Orbax) checkpoint directory")
    p.add_argument("dst", metavar="DST",
                   help="directory to write config.json and model.safetensors into")


def _load_base(path: str):
    from goose_jax.base_model import load_base

    return load_base(path)


def _import_into_library(args: argparse.Namespace, do_import) -> int:
    """Shared by ``peft`` and ``phatgoose-release``: import, then write the library."""
    import os

    from goose_jax.interop.stacking import write_library
    from goose_jax.library import MANIFEST, ExpertLibrary

    cfg, params = _load_base(args.base)
    target = {}
    if args.append and os.path.isfile(os.path.join(args.out, MANIFEST)):
        lib = ExpertLibrary.open(args.out, cfg, params)
        target = {"rank": lib.rank, "scale": lib.scale, "sites": lib.sites}
    imported = do_import(cfg, target)
    for note in imported.notes:
        print(f"note: {note}")
    lib = write_library(imported, args.out, cfg, params, append=args.append,
                        overwrite=args.overwrite)
    gates = "with gates" if imported.gates is not None else "without gates"
    print(f"wrote {len(imported.names)} expert(s) {gates} to {lib.path} (rank {imported.rank}, "
          f"scale {imported.scale:g}, {len(imported.sites)} sites; the library now has "
          f"{len(lib)} expert(s))")
    return 0


def _release_names_arg(values):
    from goose_jax.interop.release import RELEASE_EXPERT_SETS

    if values is not None and len(values) == 1 and values[0] in RELEASE_EXPERT_SETS:
        return values[0]  # the name of one of the release's lists
    return values


def _peft(args: argparse.Namespace) -> int:
    from goose_jax.interop.peft import import_peft

    def do_import(cfg, target):
        return import_peft(args.adapters, cfg, names=args.names,
                           scale=target.get("scale", args.scale), rank=target.get("rank"),
                           sites=target.get("sites"))

    return _import_into_library(args, do_import)


def _phatgoose_release(args: argparse.Namespace) -> int:
    from goose_jax.interop.release import import_release

    def do_import(cfg, target):
        return import_release(args.ckpt, cfg, names=_release_names_arg(args.names), **target)

    return _import_into_library(args, do_import)


def _to_peft(args: argparse.Namespace) -> int:
    from goose_jax.interop.peft import export_peft

    for path in export_peft(args.library, args.expert, args.out, overwrite=args.overwrite):
        print(f"wrote {path}")
    return 0


def _library_out_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", required=True, metavar="HF_DIR",
                   help="local Hugging Face T5 directory of the base model the experts belong to")
    p.add_argument("--out", required=True, metavar="LIBRARY_DIR",
                   help="expert library to create (or to add to, with --append)")
    p.add_argument("--append", action="store_true",
                   help="add to an existing library (experts are padded to its rank and take "
                        "its scale and sites)")
    p.add_argument("--overwrite", action="store_true",
                   help="with --append, replace experts of the same name")


def _args_peft(p: argparse.ArgumentParser) -> None:
    p.add_argument("adapters", nargs="+", metavar="ADAPTER_DIR",
                   help="PEFT LoRA adapter directories (adapter_config.json + "
                        "adapter_model.safetensors or .bin), one expert each, in order")
    _library_out_args(p)
    p.add_argument("--names", nargs="+", metavar="NAME",
                   help="expert names, one per adapter (default: the directory names)")
    p.add_argument("--scale", type=float, default=None,
                   help="library LoRA scale (default: the scale most adapter sites have; the "
                        "others fold theirs into B)")


def _args_phatgoose_release(p: argparse.ArgumentParser) -> None:
    p.add_argument("ckpt", metavar="CKPT",
                   help="the release's checkpoint (a torch state dict such as best.pt, read "
                        "weights-only, or safetensors)")
    _library_out_args(p)
    p.add_argument("--names", nargs="+", metavar="NAME",
                   help="expert names in checkpoint order, or one of the release's lists: "
                        "P3, Flanv2, Niv2, Add1, P3flanv2, All, Full (default: the list with "
                        "as many experts: 36 -> P3, 166 -> Full)")


def _args_to_peft(p: argparse.ArgumentParser) -> None:
    p.add_argument("library", metavar="LIBRARY_DIR", help="goose-jax expert library")
    p.add_argument("expert", metavar="EXPERT_NAME", help="the expert to export")
    p.add_argument("out", metavar="OUT_DIR", help="PEFT adapter directory to write")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an adapter already in OUT_DIR")


@dataclasses.dataclass(frozen=True)
class Subcommand:
    """One ``goose-convert`` subcommand: help line, arguments, and action (returns exit code)."""

    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


SUBCOMMANDS: dict[str, Subcommand] = {
    "hf-to-orbax": Subcommand("Hugging Face T5 directory -> goose-jax Orbax checkpoint",
                              _args_hf_to_orbax, _hf_to_orbax),
    "orbax-to-hf": Subcommand("goose-jax Orbax checkpoint -> Hugging Face T5 directory",
                              _args_orbax_to_hf, _orbax_to_hf),
    "peft": Subcommand("PEFT LoRA adapter directories -> goose-jax expert library",
                       _args_peft, _peft),
    "phatgoose-release": Subcommand("the original PHATGOOSE release's checkpoint -> goose-jax "
                                    "expert library (with gates)",
                                    _args_phatgoose_release, _phatgoose_release),
    "to-peft": Subcommand("one expert of a goose-jax library -> PEFT LoRA adapter directory",
                          _args_to_peft, _to_peft),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Convert T5 checkpoints between Hugging Face and goose-jax "
                               "(Orbax) formats. Reads local files only; never downloads.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, command in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=command.help, description=command.help)
        command.add_arguments(p)
        p.set_defaults(run=command.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs ``goose-convert``; returns the exit code (the table in ``goose_jax.errors``)."""
    return run_tool(PROG, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
