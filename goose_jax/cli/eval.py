"""`goose-eval`: zero-shot evaluation of a T5 with any routing method over an expert library.

    goose-eval --base flan-t5-xl/ --library lib/ --method phatgoose --top-k 2 \\
        --benchmark t0_heldout --p3-root P3/ --out runs/phatgoose_t0ho

Writes to ``--out``: ``results.json`` (per-dataset and benchmark scores, settings, speed),
``results.md`` (the table), ``predictions.jsonl`` (every scored example), and for per-token
routing methods ``telemetry.json`` (per site and dataset, how often each expert was the top-1
choice over real tokens) with one heatmap per layer (dataset x expert) under ``telemetry/``.
The run itself is ``goose_jax.pipeline.zeroshot.run_eval``; exit codes are those of
``goose_jax.core.errors``.

    goose-eval report runs/* --out report/

lays any set of runs out as the paper's table (``goose_jax.evaluation.paper_table.write_report``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from goose_jax.core import distributed
from goose_jax.core.tool import run_tool
from goose_jax.pipeline import zeroshot
from goose_jax.routing.methods import METHODS

PROG = "goose-eval"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    ap.add_argument("--method", choices=METHODS, help="routing method (default: phatgoose with "
                    "--library, base without)")
    ap.add_argument("--top-k", type=int, default=2, help="experts per token (per-token methods)")
    ap.add_argument("--expert", help="the expert for --method single (name or index)")
    ap.add_argument("--experts", help="comma-separated expert names to load (default: all)")
    ap.add_argument("--expert-map", help="for --method example: a JSON file mapping a dataset "
                    "name, or '<dataset>/<template>/<example id>', to an expert name")
    zeroshot.add_arguments(ap)
    distributed.add_arguments(ap)
    ap.set_defaults(run=_run)
    return ap


def _run(args: argparse.Namespace) -> None:
    zeroshot.run_eval(zeroshot.settings_from_args(args))


def build_report_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog=f"{PROG} report", description="The paper's table (methods x benchmarks, held-in "
        "and held-out means, oracle and best individual from single-expert runs; several seeds "
        "as mean and range) of goose-eval runs, as report.md, report.json and report.png.")
    ap.add_argument("runs", nargs="+", metavar="RUN_DIR", help="goose-eval --out folders; "
                    "NAME=RUN_DIR names the run's row (and exempts it from the one-base check, "
                    "e.g. multitask=runs/t0_3b)")
    ap.add_argument("--out", required=True, help="the report folder")
    ap.add_argument("--overwrite", action="store_true", help="replace a report already there")
    ap.set_defaults(run=_report)
    return ap


def _report(args: argparse.Namespace) -> None:
    from goose_jax.evaluation.paper_table import write_report

    write_report(args.runs, args.out, overwrite=args.overwrite)
    print(f"report of {len(args.runs)} runs in {args.out}")


def main(argv: Sequence[str] | None = None) -> int:
    """Runs ``goose-eval`` (or ``goose-eval report``); returns the exit code (the table in
    ``goose_jax.core.errors``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["report"]:
        return run_tool(f"{PROG} report", build_report_parser(), argv[1:])
    return run_tool(PROG, build_parser(), argv)


if __name__ == "__main__":
    raise SystemExit(main())
