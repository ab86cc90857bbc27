"""``goose-data``: the experts' training sets, built from the public releases on disk.

    goose-data p3-heldin P3_DIR OUT_DIR   the 36 T0 held-in experts, from the P3 TFRecords
    goose-data flan FLAN_DIR OUT_DIR      the FLAN experts, from the Open-Orca/FLAN files

Each writes ``OUT_DIR/train/<expert>.jsonl``, ``OUT_DIR/validation/<expert>.jsonl`` and
``OUT_DIR/summary.json`` (counts per expert and template, also printed as a table), as the
original release built them: the rules are in ``goose_jax.data.build_p3`` and
``goose_jax.data.build_flan``, the output in ``goose_jax.data.builds``. Argument parsing and
dispatch only; exit codes are those of ``goose_jax.errors``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from goose_jax.data import build_flan, build_p3, builds
from goose_jax.tool import run_tool

PROG = "goose-data"


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0 (0: no cap), got {text!r}")
    return value


def _names(text: str) -> list[str]:
    return [n.strip() for n in text.split(",") if n.strip()]


def _common(p: argparse.ArgumentParser, source: str, cap: int, seed: int, what: str) -> None:
    p.add_argument("source_dir", metavar=source, help=f"the {what} release on disk")
    p.add_argument("out_dir", metavar="OUT_DIR", help="the folder to create (train/, "
                   "validation/, summary.json); it appears only when complete")
    p.add_argument("--max-examples", type=_count, default=cap, metavar="N",
                   help=f"training examples per expert at most (default: the release's {cap:,}; "
                        "0: no cap)")
    p.add_argument("--seed", type=int, default=seed,
                   help=f"the sampling seed (default: the release's {seed})")
    p.add_argument("--datasets", type=_names, metavar="A,B,...",
                   help="build only these experts (comma-separated; default: all)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an OUT_DIR that is not empty (kept until the new one is whole)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", metavar="COMMAND", required=True)
    help_p3 = "the 36 T0 held-in experts from the P3 TFRecords (bigscience/P3 layout)"
    p = sub.add_parser("p3-heldin", help=help_p3, description=help_p3)
    _common(p, "P3_DIR", build_p3.MAX_EXAMPLES, build_p3.SEED, "P3")
    p.set_defaults(run=_run_p3)
    help_flan = "the FLAN experts from the Open-Orca/FLAN parquet or jsonl files"
    p = sub.add_parser("flan", help=help_flan, description=help_flan)
    _common(p, "FLAN_DIR", build_flan.MAX_EXAMPLES, build_flan.SEED, "Open-Orca/FLAN")
    p.add_argument("--grouping", metavar="JSON", help="a JSON object {task name: expert name} "
                   "(the NIv2 task categories); default: one expert per task name")
    p.set_defaults(run=_run_flan)
    return ap


def _run_p3(args: argparse.Namespace) -> None:
    builds.run_build(args.out_dir, args.overwrite, lambda stage: build_p3.build_p3_heldin(
        args.source_dir, stage, datasets=args.datasets, max_examples=args.max_examples or None,
        seed=args.seed), inputs={"P3_DIR": args.source_dir})


def _run_flan(args: argparse.Namespace) -> None:
    grouping = build_flan.read_grouping(args.grouping) if args.grouping else None
    builds.run_build(args.out_dir, args.overwrite, lambda stage: build_flan.build_flan(
        args.source_dir, stage, datasets=args.datasets, grouping=grouping,
        max_examples=args.max_examples or None, seed=args.seed),
        inputs={"FLAN_DIR": args.source_dir, "--grouping": args.grouping})


def main(argv: Sequence[str] | None = None) -> int:
    """Runs ``goose-data``; returns the exit code (the table in ``goose_jax.errors``)."""
    return run_tool(PROG, build_parser(), argv,
                    interrupted_hint="nothing was written; rerun the same command")


if __name__ == "__main__":
    raise SystemExit(main())
