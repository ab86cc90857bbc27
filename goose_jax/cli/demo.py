"""`make demo` / `goose-demo`: the whole PHATGOOSE pipeline on the built-in miniature world.

The stages and outputs are described in ``goose_jax.pipeline.demo`` (``run_demo``); this module
only parses
the flags. Exit codes are those of ``goose_jax.core.errors``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from goose_jax.core.tool import run_tool
from goose_jax.pipeline.demo import PRESETS, DemoSettings, run_demo

PROG = "goose-demo"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    seeds = ap.add_mutually_exclusive_group()
    seeds.add_argument("--seed", type=int, default=0)
    seeds.add_argument("--seeds", type=_seed_list, default=(), metavar="0,1,2",
                       help="run these seeds one after another and report every table as the "
                       "mean and range over them (each seed's own tables under OUT/seed<N>/)")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="full")
    ap.add_argument("--out", default="demo_out")
    ap.add_argument("--base", default=None, help="a different base model directory (HF format)")
    ap.add_argument("--no-retrieval", action="store_true",
                    help="skip the retrieval baseline (it loads a sentence encoder)")
    ap.set_defaults(run=_run)
    return ap


def _seed_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated seeds, e.g. "
                                         "0,1,2") from None


def _run(args: argparse.Namespace) -> None:
    run_demo(DemoSettings(preset=args.preset, out=args.out, seed=args.seed, base=args.base,
                          retrieval=not args.no_retrieval, seeds=args.seeds))


def main(argv: Sequence[str] | None = None) -> int:
    """Runs ``goose-demo``; returns the exit code (the table in ``goose_jax.core.errors``)."""
    return run_tool(PROG, build_parser(), argv,
                    interrupted_hint="rerun the same command to reuse the finished stages")


if __name__ == "__main__":
    raise SystemExit(main())
