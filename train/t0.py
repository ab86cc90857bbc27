"""The paper's T0 setting end to end: 36 T0 held-in experts on T5 v1.1 XL LM-adapt, evaluated on
T0 held-out and BIG-bench Hard and Lite, from the release files on disk to the paper's table.

    python train/t0.py --p3-dir P3/ --base t5-xl-lm-adapt/ --bbh-root BBH/ --bbl-root BBL/ \\
        --workdir runs/t0 [--hf-dir HF/ --templates promptsource/] [--multitask-base T0_3B/]
    python train/t0.py --small --workdir /tmp/t0_small     # the same script, minutes on a CPU

Builds the experts' data (``goose-data p3-heldin``), trains the experts with validation (best
step kept) and their gates (``configs/t0_heldin.py``), computes the average-activation
prototypes and the retrieval index, a multitask baseline, evaluates every method and each expert
alone, and writes ``goose-eval report``'s table to ``WORKDIR/report``. The multitask row is
``--multitask-base`` (the paper's is T0-3B) when given, else one LoRA expert trained with
goose-train multitask on the same data. ``--p3-heldout-root`` reads T0 held-out from another P3
copy (default: ``--p3-dir``, which holds both). ``--hf-dir`` (the held-in datasets' Hugging
Face copies saved on disk) with ``--templates`` (a promptsource checkout; default: the installed
package) builds each dataset found there as the release did, and CommonsenseQA and HotpotQA
(which P3 lacks) only from there: ``goose-data p3-heldin``'s two sources. Rerun the same
command after an interruption: finished stages are not redone. The stages are
``train/paper_setting.py``'s.

One script does training and evaluation, rather than a pair under train/ and eval/: the
evaluation needs the library, prototypes and index the training stages write, and a researcher
reproducing the table runs both in one go; ``eval/paper.py`` stays the evaluation of a library
made elsewhere.
"""

from __future__ import annotations

import importlib.util
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
GOOSE_TOOL = "train/t0.py"  # goose_jax.core.tool_process: Ctrl-C is one line from the start


def _protocol():
    # Loaded by path: train/ is a folder of scripts, not a package.
    spec = importlib.util.spec_from_file_location("goose_paper_setting",
                                                  os.path.join(HERE, "paper_setting.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module   # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _build(args, source, stage, datasets):
    from goose_jax.data import build_p3

    return build_p3.build_p3_heldin(source, stage, datasets=datasets,
                                    hf_dir=getattr(args, "hf_dir", None),
                                    templates=getattr(args, "templates", None))


def _small(release):
    from goose_jax.data import synthetic

    p3 = os.path.join(release, "p3")
    datasets, heldout = synthetic.write_p3_release(p3)
    bigbench = synthetic.write_bigbench_release(os.path.join(release, "bbh"),
                                                os.path.join(release, "bbl"))
    roots = {"p3_root": p3, "bbh_root": os.path.join(release, "bbh"),
             "bbl_root": os.path.join(release, "bbl")}
    return p3, datasets, heldout + bigbench, roots


def _own(ap):
    ap.add_argument("--p3-dir", help="the P3 release (bigscience/P3: data/<task>/ folders)")
    ap.add_argument("--p3-heldout-root", help="T0 held-out's P3 copy (default: --p3-dir)")
    ap.add_argument("--hf-dir", help="the held-in datasets' Hugging Face copies saved on disk, "
                    "HF_DIR/<dataset>[/<subset>] (goose-data p3-heldin --hf-dir): the release's "
                    "source; needed for commonsense_qa and hotpot_qa, which P3 lacks")
    ap.add_argument("--templates", help="promptsource's templates for --hf-dir: a checkout of "
                    "bigscience-workshop/promptsource (default: the installed package)")


def main(argv=None) -> int:
    import goose_jax  # noqa: F401  (first: its first line installs the Ctrl-C handler)

    protocol = _protocol()
    setting = protocol.Setting(
        prog="train/t0.py", config=os.path.join(protocol.ROOT, "configs", "t0_heldin.py"),
        source="p3_dir", build=_build, benchmarks=("t0_heldout", "bbh", "bbl"),
        write_small=_small,
        roots=lambda args: {"p3_root": args.p3_heldout_root or args.p3_dir})
    return protocol.main(setting, argv, _own)


if __name__ == "__main__":
    sys.exit(main())
