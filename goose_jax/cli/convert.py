"""``goose-convert``: move checkpoints between Hugging Face and goose-jax formats.

    goose-convert hf-to-orbax SRC_HF_DIR DST_DIR [--dtype float32|bfloat16] [--overwrite]
    goose-convert orbax-to-hf SRC DST

Each subcommand is one entry of ``SUBCOMMANDS`` (name -> how to add its arguments, how to run
it), so converters for other formats slot in without touching ``main``. A user error prints one
line on stderr and exits 1; nothing is ever downloaded.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from collections.abc import Callable, Sequence

import numpy as np

from goose_jax.errors import GooseError

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
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Convert T5 checkpoints between Hugging Face and goose-jax "
                               "(Orbax) formats. Reads local files only; never downloads.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, command in SUBCOMMANDS.items():
        command.add_arguments(sub.add_parser(name, help=command.help, description=command.help))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs ``goose-convert``; returns the process exit code (0 ok, 1 user error, 2 usage)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # argparse has printed usage or help already.
        return int(e.code or 0)
    # Orbax and absl log routine steps at INFO / WARNING; a converter's output is its summary.
    logging.getLogger("absl").setLevel(logging.ERROR)
    try:
        return SUBCOMMANDS[args.command].run(args)
    except (GooseError, OSError) as e:
        message = " ".join(str(e).split())
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
