"""``goose-convert``: move checkpoints between Hugging Face and goose-jax formats.

    goose-convert hf-to-orbax SRC_HF_DIR DST_DIR [--dtype float32|bfloat16] [--overwrite]
    goose-convert orbax-to-hf SRC DST [--overwrite]
    goose-convert peft ADAPTER_DIR [ADAPTER_DIR ...] --base HF_DIR --out LIBRARY_DIR
        [--append [--overwrite]]
    goose-convert phatgoose-release CKPT --base HF_DIR --out LIBRARY_DIR [--names ...]
        [--append [--overwrite]]
    goose-convert to-peft LIBRARY_DIR EXPERT_NAME OUT_DIR [--overwrite]

No subcommand replaces what its output already holds (a checkpoint, a model, an adapter, a
library or experts in it) without ``--overwrite`` (libraries: ``--append``); every output is
checked before any input is read, and written so that a crash leaves the old or the new.

Each subcommand is one entry of ``SUBCOMMANDS`` (name -> how to add its arguments, how to run
it), so converters for other formats slot in without touching ``main``. Errors and exit codes
follow the one table of every goose-jax tool (``goose_jax.core.errors``); nothing is ever
downloaded.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from collections.abc import Callable, Sequence

from goose_jax.core.tool import run_tool
from goose_jax.interop import conversions

PROG = "goose-convert"


def _args_hf_to_orbax(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", metavar="SRC_HF_DIR",
                   help="local Hugging Face directory of a T5, Llama, Qwen2 or Mistral model (or a "
                        "models--org--name cache entry)")
    p.add_argument("dst", metavar="DST_DIR", help="goose-jax (Orbax) checkpoint to write")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="parameter dtype of the written checkpoint (default: float32)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace DST_DIR if it already holds a goose-jax checkpoint")


def _args_orbax_to_hf(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", metavar="SRC", help="goose-jax (Orbax) checkpoint directory")
    p.add_argument("dst", metavar="DST",
                   help="directory to write config.json and model.safetensors into (as "
                        "transformers writes a model of the checkpoint's family)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the Hugging Face model DST already holds (other files, such "
                        "as a tokenizer, are kept)")


def _say(lines) -> None:
    for line in lines:
        print(line)


def _hf_to_orbax(args):
    _say(conversions.hf_to_orbax(args.src, args.dst, dtype=args.dtype, overwrite=args.overwrite))


def _orbax_to_hf(args):
    _say(conversions.orbax_to_hf(args.src, args.dst, overwrite=args.overwrite))


def _peft(args):
    _say(conversions.peft_to_library(args.adapters, args.base, args.out, names=args.names,
                                     scale=args.scale, append=args.append,
                                     overwrite=args.overwrite))


def _phatgoose_release(args):
    _say(conversions.release_to_library(args.ckpt, args.base, args.out, names=args.names,
                                        append=args.append, overwrite=args.overwrite))


def _to_peft(args):
    _say(conversions.library_to_peft(args.library, args.expert, args.out,
                                     overwrite=args.overwrite))


def _library_out_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", required=True, metavar="HF_DIR",
                   help="local Hugging Face directory of the base model the experts belong to "
                        "(a T5; for peft also a Llama, Qwen2 or Mistral)")
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
    p.add_argument("--scale", type=_scale, default=None,
                   help="library LoRA scale (default: the scale most adapter sites have; the "
                        "others fold theirs into B)")


def _scale(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value == 0:
        raise argparse.ArgumentTypeError(f"expected a finite non-zero number, got {text!r} (the "
                                         "library's B is stored divided by it)")
    return value


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
    """One ``goose-convert`` subcommand: help line, arguments, and action."""

    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], None]


SUBCOMMANDS: dict[str, Subcommand] = {
    "hf-to-orbax": Subcommand("Hugging Face T5 / Llama / Qwen2 / Mistral directory -> goose-jax "
                              "Orbax checkpoint",
                              _args_hf_to_orbax, _hf_to_orbax),
    "orbax-to-hf": Subcommand("goose-jax Orbax checkpoint -> Hugging Face directory (T5, Llama, "
                              "Qwen2 or Mistral, as the checkpoint records)",
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
        prog=PROG, description="Convert T5 and Llama-family (Llama, Qwen2, Mistral) "
                               "checkpoints between Hugging Face and goose-jax (Orbax) formats. "
                               "Reads local files only; never downloads.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, command in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=command.help, description=command.help)
        command.add_arguments(p)
        p.set_defaults(run=command.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs ``goose-convert``; returns the exit code (the table in ``goose_jax.core.errors``)."""
    return run_tool(PROG, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
