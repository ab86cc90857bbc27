"""The paper's FLAN setting end to end: the release's 166 experts on T5 v1.1 XL LM-adapt,
evaluated on BIG-bench Hard and Lite, from the release files on disk to the paper's table.

    python train/flan.py --flan-dir FLAN/ --p3-dir P3/ --niv2-tasks natural-instructions/tasks/ \\
        --base t5-xl-lm-adapt/ --bbh-root BBH/ --bbl-root BBL/ --workdir runs/flan \\
        [--multitask-base flan-t5-xl/]
    python train/flan.py --small --workdir /tmp/flan_small   # the same script, minutes on a CPU

Builds the experts' data (``goose-data flan --pool release``, ``goose_jax.data.flan_pool``: the
release's pool as it lists it, 43 P3 experts from the P3 release, 44 Flan 2021 and 4 Dialog
tasks and 75 NIv2 categories from the Open-Orca/FLAN release, each NIv2 task in the category its
own natural-instructions task file gives; zero-shot templates, the release's shuffle and
validation split), trains the experts with validation (best step kept) and their gates
(``configs/flan.py``), computes the average-activation prototypes and the retrieval index, a
multitask baseline, evaluates every method and each expert alone, and writes ``goose-eval
report``'s table to ``WORKDIR/report``. ``--pool tasks`` builds one expert per FLAN task name (or
per ``--flan-grouping`` value) instead. The multitask row is ``--multitask-base`` (the paper's is
FLAN-T5-XL) when given, else one LoRA expert trained with goose-train multitask on the same
data. Rerun the same command after an interruption: finished stages are not redone. The stages
are ``train/paper_setting.py``'s; one script per setting for the reason ``train/t0.py`` gives.

``--small`` writes a miniature of each release (a P3 folder, an Open-Orca/FLAN file, NIv2 task
files) and builds three experts of the release's pool from them by the same rules: a T0 held-in
P3 expert, a Flan 2021 task and an NIv2 category of two tasks.
"""

from __future__ import annotations

import importlib.util
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
GOOSE_TOOL = "train/flan.py"  # goose_jax.core.tool_process: Ctrl-C is one line from the start


def _protocol():
    # Loaded by path: train/ is a folder of scripts, not a package.
    spec = importlib.util.spec_from_file_location("goose_paper_setting",
                                                  os.path.join(HERE, "paper_setting.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module   # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


# --small: three experts of the release's pool, one of each main source kind.
SMALL_POOL = ("P3Agnews", "Flanv2zsGluesst2", "Niv2zsMisc")
SMALL_CATEGORIES = {"task001_copy_word": ["Misc."], "task002_upper_case": ["Misc."]}


def _sources(args, source):
    """(FLAN folder, P3 folder, NIv2 tasks folder); ``--small``'s lie in its release folder."""
    if args.small:
        return (os.path.join(source, "flan"), os.path.join(source, "p3"),
                os.path.join(source, "niv2_tasks"))
    return source, args.p3_dir, args.niv2_tasks


def _build(args, source, stage, datasets):
    from goose_jax.data import build_flan, flan_pool

    flan_dir, p3_dir, niv2_tasks = _sources(args, source)
    if args.pool == "tasks":
        grouping = build_flan.read_grouping(args.flan_grouping) if args.flan_grouping else None
        return build_flan.build_flan(flan_dir, stage, datasets=None if args.small else datasets,
                                     grouping=grouping)
    if args.flan_grouping:
        from goose_jax.core.errors import UsageError

        raise UsageError("--flan-grouping is for --pool tasks; the release's pool groups NIv2 "
                         "tasks by their own task files (--niv2-tasks)")
    return flan_pool.build_release_pool(flan_dir, stage, p3_root=p3_dir, niv2_tasks=niv2_tasks,
                                        datasets=datasets, hf_dir=args.hf_dir,
                                        templates=args.templates)


def _small(release):
    from goose_jax.data import synthetic

    synthetic.write_flan_release(os.path.join(release, "flan"))
    synthetic.write_p3_release(os.path.join(release, "p3"))
    synthetic.write_niv2_tasks(os.path.join(release, "niv2_tasks"), SMALL_CATEGORIES)
    tasks = synthetic.write_bigbench_release(os.path.join(release, "bbh"),
                                             os.path.join(release, "bbl"))
    roots = {"bbh_root": os.path.join(release, "bbh"), "bbl_root": os.path.join(release, "bbl")}
    return release, list(SMALL_POOL), tasks, roots


def _own(ap):
    ap.add_argument("--flan-dir", help="the Open-Orca/FLAN release (parquet or jsonl files)")
    ap.add_argument("--p3-dir", help="the P3 release (the pool's 43 P3 experts)")
    ap.add_argument("--niv2-tasks", help="natural-instructions' tasks/ folder: each NIv2 task's "
                    "category, read from its own task file")
    ap.add_argument("--hf-dir", help="the T0 held-in datasets' Hugging Face copies saved on disk "
                    "(as train/t0.py --hf-dir): the release's source of the pool's 36 T0 "
                    "held-in experts; needed for commonsense_qa and hotpot_qa, which P3 lacks")
    ap.add_argument("--templates", help="promptsource's templates for --hf-dir: a checkout of "
                    "bigscience-workshop/promptsource (default: the installed package)")
    ap.add_argument("--pool", choices=("release", "tasks"), default="release",
                    help="release (default): the release's 166 experts; tasks: one expert per "
                    "FLAN task name or --flan-grouping value")
    ap.add_argument("--flan-grouping", help="--pool tasks: a JSON object {task name: expert "
                    "name} covering every task")


def main(argv=None) -> int:
    import goose_jax  # noqa: F401  (first: its first line installs the Ctrl-C handler)

    protocol = _protocol()
    setting = protocol.Setting(
        prog="train/flan.py", config=os.path.join(protocol.ROOT, "configs", "flan.py"),
        source="flan_dir", build=_build, benchmarks=("bbh", "bbl"), write_small=_small)
    return protocol.main(setting, argv, _own)


if __name__ == "__main__":
    sys.exit(main())
