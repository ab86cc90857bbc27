"""The paper's expert-and-gate stage: one LoRA expert per dataset, then the experts' gates.

    python train/experts_and_gates.py --config configs/t0_heldin.py --base T5_DIR \
        --data agnews.jsonl amazon_polarity.jsonl ... --library LIB --workdir W

Trains every expert at once (``goose-train experts``) into LIB, then their PHATGOOSE gates with
the base and the experts frozen (``goose-train gate``), by calling the same run bodies
(``goose_jax.pipeline.train_runs``). The two stages keep their checkpoints in ``W/experts`` and
``W/gates``; rerunning the same command after an interruption resumes where it stopped, and a
finished stage is not redone. On several hosts, run it on every host with the same arguments
(and ``--coordinator`` etc. where the cluster is not detected), as goose-train.
"""

from __future__ import annotations

import argparse
import os
import sys

GOOSE_TOOL = "train/experts_and_gates.py"  # goose_jax.core.tool_process: one line from the start

from goose_jax.core import distributed
from goose_jax.core.tool import run_tool
from goose_jax.pipeline.train_runs import RunArgs, run_experts, run_gate

PROG = "train/experts_and_gates.py"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    ap.add_argument("--config", help="python file with get_config() -> TrainConfig, e.g. "
                    "configs/t0_heldin.py (default: the paper's settings)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config field (repeatable), e.g. --set steps=200")
    ap.add_argument("--base", help="HF T5 directory, goose-jax model checkpoint, or "
                    "random:PRESET (default: the config's base_model)")
    ap.add_argument("--data", nargs="+", required=True, metavar="JSONL",
                    help="one JSON-lines file per expert, {\"input\": ..., \"target\": ...}")
    ap.add_argument("--eval-data", nargs="+", default=[], metavar="JSONL",
                    help="held-out data in --data order, evaluated every eval_every steps")
    ap.add_argument("--names", nargs="+", help="expert names in --data order (default: the "
                    "config's expert_names, else the files' stems)")
    ap.add_argument("--library", required=True, help="expert library directory")
    ap.add_argument("--workdir", required=True, help="checkpoints and metrics of both stages")
    ap.add_argument("--mesh", help="device mesh sizes, e.g. data=2,expert=4")
    ap.add_argument("--overwrite", action="store_true",
                    help="replace experts (and gates) that already exist in the library")
    distributed.add_arguments(ap)
    ap.set_defaults(run=_run)
    return run_tool(PROG, ap, argv, interrupted_hint="rerun the same command to resume")


def _run(args: argparse.Namespace) -> None:
    common = dict(data=args.data, config=args.config, overrides=args.set, base=args.base,
                  eval_data=args.eval_data, library=args.library, names=args.names,
                  mesh=args.mesh)
    run_experts(RunArgs("experts", workdir=os.path.join(args.workdir, "experts"),
                        overwrite=args.overwrite, **common))
    run_gate(RunArgs("gate", workdir=os.path.join(args.workdir, "gates"),
                     overwrite=args.overwrite, **common))

if __name__ == "__main__":
    sys.exit(main())
