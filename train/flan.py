"""The paper's FLAN setting end to end: 166 FLAN experts on T5 v1.1 XL LM-adapt, evaluated on
BIG-bench Hard and Lite, from the release files on disk to the paper's table.

    python train/flan.py --flan-dir FLAN/ --flan-grouping niv2_categories.json \\
        --base t5-xl-lm-adapt/ --bbh-root BBH/ --bbl-root BBL/ --workdir runs/flan \\
        [--multitask-base flan-t5-xl/]
    python train/flan.py --small --workdir /tmp/flan_small   # the same script, minutes on a CPU

Builds the experts' data (``goose-data flan``: zero-shot templates, the release's shuffle and
validation split; ``--flan-grouping`` maps task names to the NIv2 category experts), trains the
experts with validation (best step kept) and their gates (``configs/flan.py``), computes the
average-activation prototypes and the retrieval index, a multitask baseline, evaluates every
method and each expert alone, and writes ``goose-eval report``'s table to ``WORKDIR/report``.
The multitask row is ``--multitask-base`` (the paper's is FLAN-T5-XL) when given, else one LoRA
expert trained with goose-train multitask on the same data. Rerun the same command after an
interruption: finished stages are not redone. The stages are ``train/paper_setting.py``'s; one
script per setting for the reason ``train/t0.py`` gives.
"""

from __future__ import annotations

import importlib.util
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
GOOSE_TOOL = "train/flan.py"  # goose_jax.tool_process: Ctrl-C is one line from the start


def _protocol():
    # Loaded by path: train/ is a folder of scripts, not a package.
    spec = importlib.util.spec_from_file_location("goose_paper_setting",
                                                  os.path.join(HERE, "paper_setting.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module   # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _build(args, source, stage, datasets):
    from goose_jax.data import build_flan

    grouping = build_flan.read_grouping(args.flan_grouping) if args.flan_grouping else None
    return build_flan.build_flan(source, stage, datasets=datasets, grouping=grouping)


def _small(release):
    from goose_jax.data import synthetic

    flan = os.path.join(release, "flan")
    datasets = synthetic.write_flan_release(flan)
    tasks = synthetic.write_bigbench_release(os.path.join(release, "bbh"),
                                             os.path.join(release, "bbl"))
    roots = {"bbh_root": os.path.join(release, "bbh"), "bbl_root": os.path.join(release, "bbl")}
    return flan, datasets, tasks, roots


def _own(ap):
    ap.add_argument("--flan-dir", help="the Open-Orca/FLAN release (parquet or jsonl files)")
    ap.add_argument("--flan-grouping", help="a JSON object {task name: expert name} (the NIv2 "
                    "task categories); default: one expert per task name")


def main(argv=None) -> int:
    import goose_jax  # noqa: F401  (first: its first line installs the Ctrl-C handler)

    protocol = _protocol()
    setting = protocol.Setting(
        prog="train/flan.py", config=os.path.join(protocol.ROOT, "configs", "flan.py"),
        source="flan_dir", build=_build, benchmarks=("bbh", "bbl"), write_small=_small)
    return protocol.main(setting, argv, _own)


if __name__ == "__main__":
    sys.exit(main())
