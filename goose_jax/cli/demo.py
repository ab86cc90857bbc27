"""`make demo` / `goose-demo`: the whole PHATGOOSE pipeline on the built-in miniature world.

Stages (each cached under ``<out>/work``; a rerun reuses what is done):
  1. load the shipped miniature base (``goose_jax/assets/world_base``);
  2. one LoRA expert per held-in task, all trained at once;
  3. their PHATGOOSE gates, all at once (experts frozen);
  4. a multitask LoRA on the mixture of held-in tasks (the "multitask" baseline);
  5. router vectors of the other methods: average activation, Arrow, the retrieval index;
  6. every method on every held-in and held-out task;
  7. ``results.md``, ``results.json``, heatmaps, the library, and a plain-language summary.

The pipeline itself is ``goose_jax.demo.run_demo``; exit codes are those of ``goose_jax.errors``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from goose_jax.demo import PRESETS, DemoSettings, run_demo
from goose_jax.tool import run_tool

PROG = "goose-demo"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="full")
    ap.add_argument("--out", default="demo_out")
    ap.add_argument("--base", default=None, help="a different base model directory (HF format)")
    ap.add_argument("--no-retrieval", action="store_true",
                    help="skip the retrieval baseline (it loads a sentence encoder)")
    ap.set_defaults(run=_run)
    return ap


def _run(args: argparse.Namespace) -> None:
    run_demo(DemoSettings(preset=args.preset, out=args.out, seed=args.seed, base=args.base,
                          retrieval=not args.no_retrieval))


def main(argv: Sequence[str] | None = None) -> int:
    """Runs ``goose-demo``; returns the exit code (the table in ``goose_jax.errors``)."""
    return run_tool(PROG, build_parser(), argv,
                    interrupted_hint="rerun the same command to reuse the finished stages")


if __name__ == "__main__":
    raise SystemExit(main())
