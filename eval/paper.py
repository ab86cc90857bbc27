"""The paper's zero-shot comparison on a benchmark: PHATGOOSE (top-2) and every baseline the
library supports, each run exactly as ``goose-eval`` runs it, then one table.

    python eval/paper.py --base flan-t5-xl/ --library lib/ --benchmark t0_heldout \\
        --p3-root P3/ --out runs/t0_heldout

Methods: the base model alone, PHATGOOSE (top-2; when every expert has a trained gate), merged
experts, Arrow (top-2), average activation (when the library holds prototypes written by
``goose-train prototypes``, or ``--prototypes`` is given) and retrieval (when the library holds a
retrieval index or ``--retrieval-index`` is given). Each method's results folder
is ``<out>/<method>``; ``<out>/comparison.md`` holds the table and ``<out>/comparison.json`` every
summary. The base model and the benchmark's data are read once for all methods. Every method's
folder and flags are checked before the first is scored; results already there are replaced only
with ``--overwrite``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os

GOOSE_TOOL = "eval/paper.py"  # goose_jax.core.tool_process: Ctrl-C is one line from the start

from goose_jax.core import distributed
from goose_jax.core.errors import UsageError
from goose_jax.core.outputs import check_apart, run_lock
from goose_jax.core.tensorfile import write_atomic
from goose_jax.core.tool import run_tool
from goose_jax.evaluation import report
from goose_jax.pipeline import zeroshot


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="eval/paper.py", description=__doc__.splitlines()[0])
    zeroshot.add_arguments(ap)
    distributed.add_arguments(ap)
    ap.add_argument("--methods", help="comma-separated subset of the methods to run "
                    "(default: every one the library supports)")
    ap.set_defaults(run=_run)
    return run_tool("eval/paper.py", ap, argv)


def _run(args: argparse.Namespace) -> None:
    settings = zeroshot.settings_from_args(args)
    check_apart({"--out": settings.out}, settings.inputs())
    report.check_out_dir(settings.out, overwrite=True)  # a file, or below one: before any work
    runs = zeroshot.paper_methods(settings)
    wanted = [m.strip() for m in (args.methods or "").split(",") if m.strip()]
    if set(wanted) - set(runs):
        raise UsageError(f"--methods: {sorted(set(wanted) - set(runs))} not among the "
                         f"methods this library supports, {list(runs)}")
    runs = {m: s for m, s in runs.items() if not wanted or m in wanted}
    report.check_out_dir(settings.out, overwrite=settings.overwrite, holds=("comparison.json",))
    for s in runs.values():   # every method's folder and flags, before the first is scored
        zeroshot.validate(s)
    with contextlib.ExitStack() as held:
        if distributed.is_primary():   # one run at a time writes this --out
            held.enter_context(run_lock(settings.out, prog="eval/paper.py"))
        _run_methods(settings, runs)


def _run_methods(settings, runs) -> None:
    for name in ("comparison.json", "comparison.md"):   # another run's (with --overwrite)
        if os.path.exists(os.path.join(settings.out, name)):
            os.remove(os.path.join(settings.out, name))
    base = zeroshot.load_base_model(settings)
    data = zeroshot.load_tasks(settings)   # one benchmark: read and capped once for all methods
    summaries = {}
    for method, s in runs.items():
        print(f"== {method}", flush=True)
        summaries[method] = zeroshot.run_eval(s, base=base, data=data)
    table = report.comparison_table(summaries)
    if not distributed.is_primary():
        return
    write_atomic(os.path.join(settings.out, "comparison.md"), table)
    write_atomic(os.path.join(settings.out, "comparison.json"), json.dumps(summaries, indent=2))
    print(table, end="")


if __name__ == "__main__":
    raise SystemExit(main())
