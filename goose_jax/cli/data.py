"""``goose-data``: the experts' training sets, built from the public releases on disk.

    goose-data p3-heldin [P3_DIR] OUT_DIR [--hf-dir HF_DIR] [--templates DIR]
                                          the 36 T0 held-in experts, from the saved Hugging Face
                                          datasets with promptsource's templates and / or P3
    goose-data flan FLAN_DIR OUT_DIR      the FLAN experts, from the Open-Orca/FLAN files
        [--pool release --p3-dir P3 --niv2-tasks TASKS]   the release's 166 (flan_pool)
    goose-data bigbench TASKSOURCE_DIR LUKAEMON_DIR OUT_DIR
                                          the BBH and BBL roots goose-eval reads

Each writes ``OUT_DIR/train/<expert>.jsonl``, ``OUT_DIR/validation/<expert>.jsonl`` and
``OUT_DIR/summary.json`` (counts per expert and template, also printed as a table), as the
original release built them: the rules are in ``goose_jax.data.build_p3`` and
``goose_jax.data.build_flan``, the output in ``goose_jax.data.builds``; ``bigbench`` writes
``OUT_DIR/bbh`` and ``OUT_DIR/bbl`` (``goose_jax.data.build_bigbench``). Argument parsing and
dispatch only; exit codes are those of ``goose_jax.core.errors``.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

from goose_jax.core.errors import UsageError
from goose_jax.core.outputs import check_apart, run_lock
from goose_jax.core.tool import run_tool
from goose_jax.data import build_bigbench, build_flan, build_p3, builds, flan_pool

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


_OUT_HELP = ("the folder to create (train/, validation/, summary.json); it appears only when "
             "complete")


def _common(p: argparse.ArgumentParser, source: str | None, cap: int, seed: int, what: str
            ) -> None:
    if source:
        p.add_argument("source_dir", metavar=source, help=f"the {what} release on disk")
        p.add_argument("out_dir", metavar="OUT_DIR", help=_OUT_HELP)
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
    help_p3 = ("the 36 T0 held-in experts, from the saved Hugging Face datasets with "
               "promptsource's templates (--hf-dir) and / or the P3 TFRecords (P3_DIR)")
    p = sub.add_parser("p3-heldin", help=help_p3, description=help_p3,
                       usage="%(prog)s [P3_DIR] OUT_DIR [--hf-dir HF_DIR] [--templates DIR] ...")
    p.add_argument("dirs", nargs="+", metavar="DIR", help="[P3_DIR] OUT_DIR: the P3 release "
                   "(bigscience/P3: data/<task>/ folders; may be left out with --hf-dir), then "
                   f"{_OUT_HELP}")
    p.add_argument("--hf-dir", metavar="HF_DIR", help="the held-in datasets' Hugging Face copies "
                   "saved on disk (save_to_disk or parquet), as HF_DIR/<dataset>[/<subset>] "
                   "(ag_news, paws/labeled_final, glue/mrpc, ...); a dataset found there is "
                   "built from it (the release's way), the others from P3_DIR")
    p.add_argument("--templates", metavar="DIR", help="promptsource's templates: a checkout of "
                   "bigscience-workshop/promptsource (default: the installed promptsource "
                   "package)")
    _common(p, None, build_p3.MAX_EXAMPLES, build_p3.SEED, "P3")
    p.set_defaults(run=_run_p3)
    help_flan = "the FLAN experts from the Open-Orca/FLAN parquet or jsonl files"
    p = sub.add_parser("flan", help=help_flan, description=help_flan)
    _common(p, "FLAN_DIR", build_flan.MAX_EXAMPLES, build_flan.SEED, "Open-Orca/FLAN")
    p.add_argument("--pool", choices=("tasks", "release"), default="tasks",
                   help="tasks (default): one expert per task name or --grouping value; "
                        "release: the release's 166 experts (goose_jax/assets/flan_pool.json), "
                        "with --p3-dir and --niv2-tasks")
    p.add_argument("--grouping", metavar="JSON", help="--pool tasks: a JSON object {task name: "
                   "expert name} covering every task; default: one expert per task name")
    p.add_argument("--p3-dir", help="--pool release: the P3 release (its 43 P3 experts)")
    p.add_argument("--niv2-tasks", metavar="DIR", help="--pool release: natural-instructions' "
                   "tasks/ folder (each NIv2 task's category, from its own task file)")
    p.add_argument("--hf-dir", metavar="HF_DIR", help="--pool release: the T0 held-in datasets' "
                   "saved Hugging Face copies, as for p3-heldin (commonsense_qa and hotpot_qa "
                   "need them)")
    p.add_argument("--templates", metavar="DIR", help="--pool release: promptsource's "
                   "templates for --hf-dir, as for p3-heldin")
    p.set_defaults(run=_run_flan)
    help_bb = ("the BBH and BBL roots of goose-eval, from saved tasksource/bigbench and "
               "lukaemon/bbh datasets")
    p = sub.add_parser("bigbench", help=help_bb, description=help_bb)
    p.add_argument("tasksource_dir", metavar="TASKSOURCE_DIR", help="tasksource/bigbench: one "
                   "folder per task (save_to_disk, or the Hub snapshot's parquet files)")
    p.add_argument("lukaemon_dir", metavar="LUKAEMON_DIR", help="lukaemon/bbh: one folder per "
                   "task (boolean_expressions, multistep_arithmetic_two, web_of_lies are read)")
    p.add_argument("out_dir", metavar="OUT_DIR", help="the folder to create (bbh/, bbl/, "
                   "summary.json); it appears only when complete")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an OUT_DIR that is not empty (kept until the new one is whole)")
    p.set_defaults(run=_run_bigbench)
    return ap


def _run_bigbench(args: argparse.Namespace) -> None:
    check_apart({"OUT_DIR": args.out_dir}, {"TASKSOURCE_DIR": args.tasksource_dir,
                                            "LUKAEMON_DIR": args.lukaemon_dir})
    out = builds.check_out_dir(args.out_dir, args.overwrite)
    with run_lock(out, prog=PROG, flag="OUT_DIR"):
        if not args.overwrite:   # another build may have finished here since the check
            builds.check_out_dir(out, args.overwrite)
        with builds.staged(out) as stage:
            summary = build_bigbench.build_bigbench(args.tasksource_dir, args.lukaemon_dir,
                                                    stage)
    print(f"{PROG}: wrote {len(summary['tasks'])} BIG-bench tasks to {out} (--bbh-root "
          f"{os.path.join(out, 'bbh')} --bbl-root {os.path.join(out, 'bbl')})")


def _run_p3(args: argparse.Namespace) -> None:
    if len(args.dirs) > 2 or (len(args.dirs) == 1 and not args.hf_dir):
        raise UsageError(f"p3-heldin: expected P3_DIR OUT_DIR (or OUT_DIR alone with --hf-dir), "
                         f"got {len(args.dirs)} folder{'s' * (len(args.dirs) != 1)}")
    p3_dir, out_dir = (None, args.dirs[0]) if len(args.dirs) == 1 else args.dirs
    builds.run_build(out_dir, args.overwrite, lambda stage: build_p3.build_p3_heldin(
        p3_dir, stage, datasets=args.datasets, max_examples=args.max_examples or None,
        seed=args.seed, hf_dir=args.hf_dir, templates=args.templates),
        inputs={"P3_DIR": p3_dir, "--hf-dir": args.hf_dir, "--templates": args.templates})


def _run_flan(args: argparse.Namespace) -> None:
    if args.pool == "release":
        if args.grouping:
            raise UsageError("--grouping is for --pool tasks; the release's pool groups NIv2 "
                             "tasks by their task files (--niv2-tasks)")
        builds.run_build(args.out_dir, args.overwrite, lambda stage: flan_pool.build_release_pool(
            args.source_dir, stage, p3_root=args.p3_dir, niv2_tasks=args.niv2_tasks,
            datasets=args.datasets, max_examples=args.max_examples or None, seed=args.seed,
            hf_dir=args.hf_dir, templates=args.templates),
            inputs={"FLAN_DIR": args.source_dir, "--p3-dir": args.p3_dir,
                    "--niv2-tasks": args.niv2_tasks, "--hf-dir": args.hf_dir,
                    "--templates": args.templates})
        return
    if args.p3_dir or args.niv2_tasks or args.hf_dir or args.templates:
        raise UsageError("--p3-dir, --niv2-tasks, --hf-dir and --templates are for --pool release")
    grouping = build_flan.read_grouping(args.grouping) if args.grouping else None
    builds.run_build(args.out_dir, args.overwrite, lambda stage: build_flan.build_flan(
        args.source_dir, stage, datasets=args.datasets, grouping=grouping,
        max_examples=args.max_examples or None, seed=args.seed),
        inputs={"FLAN_DIR": args.source_dir, "--grouping": args.grouping})


def main(argv: Sequence[str] | None = None) -> int:
    """Runs ``goose-data``; returns the exit code (the table in ``goose_jax.core.errors``)."""
    return run_tool(PROG, build_parser(), argv,
                    interrupted_hint="nothing was written; rerun the same command")


if __name__ == "__main__":
    raise SystemExit(main())
