"""The protocol that ``train/t0.py`` and ``train/flan.py`` share: one paper setting, from the
release files on disk to the paper's table. Not run by itself; each setting's script gives its
``Setting`` (data builder, config, benchmarks, synthetic files) and calls ``main``.

Stages, each under ``--workdir W`` and each skipped when a rerun finds it finished (an interrupted
run continues where it stopped; nothing finished is redone):

  1. data        ``goose-data``'s builder      -> W/data/{train,validation}/<expert>.jsonl
  2. experts     goose-train experts, validated at step 0 and every ``eval_every`` steps, the
                 best step kept                 -> W/library (checkpoints in W/train/experts)
  3. gates       goose-train gate               -> the library's experts (W/train/gates)
  4. prototypes  goose-train prototypes, up to 1,000 examples per expert, per-example pooling
                                                -> W/library/prototypes.safetensors
  5. retrieval   all-MiniLM-L6-v2 embeddings of up to 1,000 training examples per expert
                                                -> W/library/retrieval_index.npz
  6. multitask   ``--multitask-base DIR`` (T0-3B, FLAN-T5-XL: the paper's rows) is evaluated
                 as given; without it one LoRA expert is trained with goose-train multitask on
                 the mixture of every expert's data (same base, config and steps as an expert)
                                                -> W/multitask_library (W/train/multitask)
  7. evaluation  every method of ``eval/paper.py`` (base, PHATGOOSE k=2, merged, Arrow k=2,
                 average activation k=2, retrieval), the multitask model, and each expert alone
                 (``--method single``: the oracle and best-individual rows), in bfloat16 as
                 the release evaluated (``--dtype float32`` to compare)
                                                -> W/eval/<method>, W/eval/single/<expert>
  8. report      ``goose-eval report`` of every run -> W/report/report.{md,json,png}

``--small`` runs the same stages on synthetic release-format files written into W/release
(``goose_jax.data.synthetic``) and a random tiny T5 (``random:tiny`` with the byte tokenizer,
saved to W/base) with ``configs/tiny.py``: a few experts, a few examples each, a few minutes on
a CPU. The evaluation then covers the synthetic tasks only.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from collections.abc import Callable

from goose_jax.core.errors import DataError, UsageError
from goose_jax.core.outputs import check_apart, run_lock
from goose_jax.core.tensorfile import write_atomic
from goose_jax.core.tool import run_tool
from goose_jax.pipeline import zeroshot
from goose_jax.routing import formula as routing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_CONFIG = os.path.join(ROOT, "configs", "tiny.py")
RETRIEVAL_EXAMPLES = 1000   # per expert, as the paper
PROTOTYPE_EXAMPLES = 1000
# The release evaluated with everything in bf16 (colm/experiments/eval.gin
# Model.trainable_params="none", colm/models/t5xl/t5.gin Model.mix_precision="bf16").
EVAL_DTYPE = "bfloat16"
_SMALL_EVAL = dict(byte_tokenizer=True, batch_size=8, max_input_length=64, max_target_length=16,
                   fast_compile=True)


@dataclasses.dataclass(frozen=True)
class Setting:
    """One paper setting.

    Attributes:
      prog: the script (``train/t0.py``), for messages.
      config: the training config file of the real setting.
      source: the release flag (``p3_dir`` / ``flan_dir``) the builder reads.
      build: ``(args, source_dir, staging_dir, datasets or None) -> summary``: goose-data's
        builder of this setting's experts.
      benchmarks: what the real setting is evaluated on.
      write_small: ``(release_dir) -> (source_dir, datasets, eval tasks, EvalSettings roots)``:
        the synthetic release of ``--small``.
      roots: ``(args) -> dict``: the EvalSettings data roots beyond BIG-bench's (T0: P3).
    """

    prog: str
    config: str
    source: str
    build: Callable
    benchmarks: tuple[str, ...]
    write_small: Callable
    roots: Callable = lambda args: {}


def add_arguments(ap: argparse.ArgumentParser) -> None:
    """The flags every setting shares (each script adds its release's own)."""
    ap.add_argument("--workdir", required=True, help="every stage's output (data, library, "
                    "checkpoints, evaluation runs, report); rerun the same command to resume")
    ap.add_argument("--base", help="the base T5 (a Hugging Face directory: T5 v1.1 XL LM-adapt)")
    ap.add_argument("--bbh-root", help="BIG-bench Hard: one saved dataset per task")
    ap.add_argument("--bbl-root", help="BIG-bench Lite: one saved dataset per task")
    ap.add_argument("--multitask-base", help="the paper's multitask model (T0-3B / FLAN-T5-XL "
                    "directory), evaluated as its multitask row; default: train one LoRA "
                    "expert on the mixture of the experts' data (goose-train multitask)")
    ap.add_argument("--config", help="training config (default: the setting's own under "
                    "configs/; --small: configs/tiny.py)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a training config field (repeatable)")
    ap.add_argument("--embedder", help="retrieval: a sentence-transformers directory (default: "
                    "the packaged all-MiniLM-L6-v2)")
    ap.add_argument("--arrow-temperature", type=zeroshot.parse_temperature,
                    default=routing.RELEASE, help="Arrow's temperature (default: 'release', "
                    "10 * sqrt(d_in), as the paper's Arrow numbers were measured)")
    ap.add_argument("--mesh", help="device mesh sizes for training and evaluation")
    ap.add_argument("--dtype", choices=("bfloat16", "float32"), help="evaluation's parameter "
                    "and compute dtype (default: bfloat16, as the release evaluated under bf16 "
                    "autocast; --small: float32)")
    ap.add_argument("--batch-size", type=int, default=16, help="evaluation batch size")
    ap.add_argument("--max-examples", type=int, help="evaluate at most this many examples per "
                    "template (quick runs)")
    ap.add_argument("--small", action="store_true", help="the whole protocol on synthetic "
                    "release-format files and a random tiny T5 (minutes on a CPU)")


def main(setting: Setting, argv=None, add_own: Callable | None = None) -> int:
    ap = argparse.ArgumentParser(prog=setting.prog, description=setting.prog)
    add_arguments(ap)
    if add_own:
        add_own(ap)
    ap.set_defaults(run=lambda args: run(setting, args))
    return run_tool(setting.prog, ap, argv, interrupted_hint="rerun the same command to resume")


# --- the stages --------------------------------------------------------------------------------


def _small_inputs(setting: Setting, work: str) -> dict:
    """Writes (once) the synthetic release and the tiny base; returns what they stand for."""
    from goose_jax.data.tokenizers import ByteTokenizer
    from goose_jax.models.t5.hf import save_hf_t5
    from goose_jax.pipeline.train_runs import load_train_config

    release = os.path.join(work, "release")
    marker = os.path.join(release, "release.json")
    if not os.path.isfile(marker):
        source, datasets, tasks, roots = setting.write_small(release)
        # Written last: a release interrupted before it is written again.
        write_atomic(marker, json.dumps({"source": source, "datasets": datasets, "tasks": tasks,
                                         "roots": roots}))
    with open(marker) as f:
        small = json.load(f)
    base = os.path.join(work, "base")
    if not os.path.isfile(os.path.join(base, "model.safetensors")):
        from goose_jax.models.base import load_base

        tcfg = load_train_config(TINY_CONFIG)
        cfg, params = load_base("random:tiny", seed=tcfg.seed,
                                min_vocab_size=ByteTokenizer().vocab_size)
        save_hf_t5(cfg, params, base, overwrite=True)
    return {**small, "base": base}


def _build_data(setting: Setting, args, work: str, source: str, datasets) -> dict:
    from goose_jax.data import builds

    out = os.path.join(work, "data")
    summary = os.path.join(out, "summary.json")
    if not os.path.isfile(summary):   # a build appears whole or not at all (builds.staged)
        print("== data", flush=True)
        builds.run_build(out, False, lambda stage: setting.build(args, source, stage, datasets),
                         prog=setting.prog)
    with open(summary) as f:
        return json.load(f)


def _retrieval_index(library: str, train_files, names, embedder: str | None, seed: int) -> None:
    from goose_jax.routing import retrieval

    path = os.path.join(library, retrieval.INDEX_FILE)
    if os.path.isfile(path):
        return
    print("== retrieval index", flush=True)
    queries = {}
    for name, path_ in zip(names, train_files):
        with open(path_, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
        queries[name] = [retrieval.format_query(r["input"], r.get("choices")) for r in rows]
    index = retrieval.RetrievalIndex.build(queries, retrieval.SentenceEmbedder.load(embedder),
                                           max_per_expert=RETRIEVAL_EXAMPLES, seed=seed)
    index.save(library)


def run(setting: Setting, args: argparse.Namespace) -> None:
    work = os.path.abspath(args.workdir)
    source = getattr(args, setting.source)
    if not args.small:
        # Before any training: the evaluation's roots too (found missing at the end, they
        # would cost the whole run).
        missing = [f for f, v in ((f"--{setting.source.replace('_', '-')}", source),
                                  ("--base", args.base), ("--bbh-root", args.bbh_root),
                                  ("--bbl-root", args.bbl_root)) if not v]
        if missing:
            raise UsageError(f"needs {' and '.join(missing)} (or --small)")
        absent = [v for v in (source, args.bbh_root, args.bbl_root) if not os.path.isdir(v)]
        if absent:
            raise DataError(f"{absent[0]}: no such directory; pass the release's folder")
    read = {f"--{k.replace('_', '-')}": getattr(args, k) for k in _INPUT_FLAGS
            if getattr(args, k, None)}
    check_apart({"--workdir": work}, read)
    with run_lock(work, prog=setting.prog, flag="--workdir"):
        _run_stages(setting, args, work, source)


# Every flag of a setting script that names something it reads.
_INPUT_FLAGS = ("p3_dir", "flan_dir", "p3_heldout_root", "flan_grouping", "base", "bbh_root",
                "bbl_root", "multitask_base", "embedder", "config")


def _run_stages(setting: Setting, args: argparse.Namespace, work: str, source) -> None:
    from goose_jax.evaluation import paper_table
    from goose_jax.pipeline.prototypes import PrototypeArgs, prototypes_path, run_prototypes
    from goose_jax.pipeline.train_runs import (
        RunArgs,
        load_train_config,
        run_experts,
        run_gate,
        run_multitask,
    )

    os.makedirs(work, exist_ok=True)
    if args.small:
        small = _small_inputs(setting, work)
        source, datasets, base = small["source"], small["datasets"], small["base"]
        roots, tasks, benchmarks = small["roots"], tuple(small["tasks"]), ()
        config, eval_extra = args.config or TINY_CONFIG, {**_SMALL_EVAL, "dtype": "float32"}
    else:
        datasets, base, tasks, benchmarks = None, args.base, (), setting.benchmarks
        roots = {"bbh_root": args.bbh_root, "bbl_root": args.bbl_root,
                 **setting.roots(args)}
        config, eval_extra = args.config or setting.config, {"dtype": EVAL_DTYPE}
    summary = _build_data(setting, args, work, source, datasets)
    files = [e["file"] for e in summary["experts"].values()]
    names = [os.path.splitext(f)[0] for f in files]
    train = [os.path.join(work, "data", "train", f) for f in files]
    validation = [os.path.join(work, "data", "validation", f) for f in files]
    library = os.path.join(work, "library")
    common = dict(config=config, overrides=tuple(args.set), base=base, mesh=args.mesh)

    print("== experts", flush=True)
    run_experts(RunArgs("experts", data=train, validation=validation, names=names,
                        library=library, workdir=os.path.join(work, "train", "experts"), **common))
    print("== gates", flush=True)
    run_gate(RunArgs("gate", data=train, names=names, library=library,
                     workdir=os.path.join(work, "train", "gates"), **common))
    if not os.path.isfile(prototypes_path(library)):
        print("== prototypes", flush=True)
        run_prototypes(PrototypeArgs(library=library, data=train, names=names, base=base,
                                     config=config, overrides=tuple(args.set),
                                     examples=PROTOTYPE_EXAMPLES))
    tcfg = load_train_config(config, args.set)
    _retrieval_index(library, train, names, args.embedder, tcfg.seed)
    multitask_library = os.path.join(work, "multitask_library")
    if not args.multitask_base:
        print("== multitask", flush=True)
        run_multitask(RunArgs("multitask", data=train, name="multitask",
                              library=multitask_library,
                              workdir=os.path.join(work, "train", "multitask"), **common))

    evals = os.path.join(work, "eval")
    s = zeroshot.EvalSettings(base=base, library=library, out=evals, tasks=tasks,
                              benchmarks=benchmarks, arrow_temperature=args.arrow_temperature,
                              mesh=args.mesh, max_examples=args.max_examples,
                              progress=False, **{"batch_size": args.batch_size, **eval_extra,
                                                 **({"dtype": args.dtype} if args.dtype else {})},
                              **roots)
    runs = zeroshot.paper_methods(s)
    specs = [runs[m].out for m in runs]
    for name in names:
        runs[f"single {name}"] = dataclasses.replace(
            s, method="single", expert=name, out=os.path.join(evals, "single", name))
        specs.append(runs[f"single {name}"].out)
    if args.multitask_base:
        runs["multitask"] = dataclasses.replace(s, base=args.multitask_base, library=None,
                                                method="base", byte_tokenizer=False,
                                                out=os.path.join(evals, "multitask"))
    else:
        runs["multitask"] = dataclasses.replace(s, library=multitask_library, method="single",
                                                expert="multitask",
                                                out=os.path.join(evals, "multitask"))
    specs.append(f"multitask={runs['multitask'].out}")
    _evaluate(runs)
    table = paper_table.write_report(specs, os.path.join(work, "report"), overwrite=True)
    print(paper_table.markdown(table, title=f"{setting.prog}: the paper's table"), end="")
    print(f"report in {os.path.join(work, 'report')}")


def _evaluate(runs: dict) -> None:
    """Runs every evaluation that has no results yet; the base model and the tasks are read
    once for the runs that share them."""
    from goose_jax.evaluation.report import RESULTS

    todo = {k: s for k, s in runs.items() if not os.path.isfile(os.path.join(s.out, RESULTS))}
    if not todo:
        return
    for s in todo.values():   # every folder and flag, before the first is scored
        zeroshot.validate(s)
    first = next(iter(todo.values()))
    data = zeroshot.load_tasks(first)
    base = None
    for name, s in todo.items():
        print(f"== eval {name}", flush=True)
        if s.base == first.base:
            base = base or zeroshot.load_base_model(first)
            zeroshot.run_eval(s, base=base, data=data)
        else:
            zeroshot.run_eval(s, data=data)
