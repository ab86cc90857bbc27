"""`goose-eval`: zero-shot evaluation of a T5 with any routing method over an expert library.

    goose-eval --base flan-t5-xl/ --library lib/ --method phatgoose --top-k 2 \\
        --benchmark t0_heldout --p3-root P3/ --out runs/phatgoose_t0ho

Writes to ``--out``: ``results.json`` (per-dataset and benchmark scores, settings, speed),
``results.md`` (the table), ``predictions.jsonl`` (every scored example), and for per-token
routing methods ``telemetry.json`` (per site and dataset, how often each expert was the top-1
choice over real tokens) with one heatmap per layer (dataset x expert) under ``telemetry/``.
Errors a user can cause print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax

from goose_jax import distributed
from goose_jax.errors import DataError, GooseError

_METHODS = ("phatgoose", "average_activation", "arrow", "merged", "merged_factors", "uniform",
            "single", "example", "retrieval", "base")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="goose-eval", description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True, help="base model: a Hugging Face T5 directory or a "
                    "goose-jax (Orbax) model checkpoint")
    ap.add_argument("--library", help="expert library directory (goose_jax.library)")
    ap.add_argument("--method", choices=_METHODS, help="routing method (default: phatgoose with "
                    "--library, base without)")
    ap.add_argument("--top-k", type=int, default=2, help="experts per token (per-token methods)")
    ap.add_argument("--expert", help="the expert for --method single (name or index)")
    ap.add_argument("--experts", help="comma-separated expert names to load (default: all)")
    ap.add_argument("--expert-map", help="for --method example: a JSON file mapping a dataset "
                    "name, or '<dataset>/<template>/<example id>', to an expert name")
    ap.add_argument("--retrieval-index", help="for --method retrieval: the .npz written by "
                    "goose_jax.retrieval.RetrievalIndex.save (default: <library>/"
                    "retrieval_index.npz)")
    ap.add_argument("--embedder", help="for --method retrieval: a local sentence-transformers "
                    "model directory (default: the packaged all-MiniLM-L6-v2)")
    ap.add_argument("--prototypes", help="average_activation router vectors: a safetensors file "
                    "with '<site>/gate' tensors (E, d_in), experts in library order")
    ap.add_argument("--benchmark", help="comma-separated: t0_heldout, t0_heldin, bbh, bbl, flan")
    ap.add_argument("--tasks", help="comma-separated task names (e.g. t0_heldout/rte,bbh/navigate)")
    ap.add_argument("--p3-root", help="P3 release directory (with data/<task>/ folders)")
    ap.add_argument("--bbh-root", help="BIG-bench Hard: one saved HF dataset per task")
    ap.add_argument("--bbl-root", help="BIG-bench Lite: one saved HF dataset per task")
    ap.add_argument("--flan-root", help="Open-Orca/FLAN release directory")
    ap.add_argument("--flan-grouping", help="JSON file mapping FLAN task names to expert names")
    ap.add_argument("--tfds-dir", help="tfds data directory")
    ap.add_argument("--tokenizer", help="tokenizer directory (default: --base)")
    ap.add_argument("--byte-tokenizer", action="store_true", help="use the byte-level tokenizer")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                    help="parameter and compute dtype for a Hugging Face base model")
    ap.add_argument("--batch-size", type=int, default=16, help="examples per batch")
    ap.add_argument("--max-input-length", type=int, default=512)
    ap.add_argument("--max-target-length", type=int, default=512)
    ap.add_argument("--max-examples", type=int, help="at most this many examples per template "
                    "(quick runs)")
    ap.add_argument("--summed", action="store_true", help="summed choice NLL instead of the mean")
    ap.add_argument("--naive", action="store_true", help="score choices with one encoder pass "
                    "per choice (for comparison)")
    ap.add_argument("--no-telemetry", action="store_true", help="skip routing telemetry")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    ap.add_argument("--out", required=True, help="output directory")
    distributed.add_arguments(ap)
    return ap


def _csv(s: str | None) -> list[str]:
    return [x.strip() for x in (s or "").split(",") if x.strip()]


def _load_base(args):
    from goose_jax.base_model import load_base

    return load_base(args.base, dtype=args.dtype)


def _tokenizer(args, cfg):
    from goose_jax.base_model import load_tokenizer

    return load_tokenizer(args.tokenizer or args.base, None if args.tokenizer else cfg,
                          byte=args.byte_tokenizer)


def _load_library(path: str, cfg, params, names: list[str] | None):
    """(experts, gates or None, expert names, LoRA scale) of a library on disk."""
    from goose_jax.library import ExpertLibrary

    lib = ExpertLibrary.open(path, cfg, params)
    experts, gates = lib.load(names or None)
    return experts, gates, list(names or lib.names), lib.scale


def _load_prototypes(path: str) -> dict:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    from goose_jax.experts import nest_sites

    if not os.path.isfile(path):
        raise DataError(f"{path}: prototypes file does not exist")
    try:
        flat = load_file(path)
    except (OSError, SafetensorError) as e:
        raise DataError(f"{path}: unreadable safetensors file: {e}") from None
    sites = {k.rsplit("/", 1)[0]: {"gate": v} for k, v in flat.items() if k.endswith("/gate")}
    if not sites:
        raise DataError(f"{path}: no '<site>/gate' tensors")
    return nest_sites(sites)


def _routing(args, cfg, params):
    from goose_jax.routers import build_routed

    method = args.method or ("phatgoose" if args.library else "base")
    if method == "base":
        return build_routed("base", cfg), []
    if not args.library:
        raise GooseError(f"--method {method} needs --library")
    experts, gates, names, scale = _load_library(args.library, cfg, params, _csv(args.experts))
    expert = None
    if method == "single":
        if args.expert is None:
            raise GooseError("--method single needs --expert (a name or an index)")
        expert = names.index(args.expert) if args.expert in names else (
            int(args.expert) if args.expert.isdigit() else args.expert)
    prototypes = _load_prototypes(args.prototypes) if method == "average_activation" and \
        args.prototypes else None
    if method == "average_activation" and prototypes is None:
        raise GooseError("--method average_activation needs --prototypes (the mean site "
                         "activations per expert, see routers.compute_average_activations)")
    if method == "phatgoose" and gates is None:
        raise GooseError(f"{args.library}: --method phatgoose needs every expert's trained gate; "
                         "some experts have none")
    return build_routed(method, cfg, experts, gates=gates, prototypes=prototypes,
                        top_k=args.top_k, scale=scale, expert=expert), names


def _expert_chooser(path: str | None, names: list[str]):
    """For method ``example``: examples -> expert indices, from a JSON map (see --expert-map)."""
    if not path:
        raise GooseError("--method example needs --expert-map (or use --method retrieval)")
    try:
        with open(path, encoding="utf-8") as f:
            table = json.load(f)
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot read the expert map: {e}") from None
    unknown = sorted({v for v in table.values() if v not in names})
    if unknown:
        raise DataError(f"{path}: experts {unknown[:3]} are not in the library {names[:5]}")

    def choose(examples):
        out = []
        for ex in examples:
            key = f"{ex.dataset}/{ex.template}/{ex.example_id}"
            name = table.get(key, table.get(ex.dataset))
            if name is None:
                raise DataError(f"{path}: no expert for {key!r} nor for {ex.dataset!r}")
            out.append(names.index(name))
        return out

    return choose


def _retrieval_chooser(args, names: list[str], examples: dict):
    """For method ``retrieval``: embeds every example once and picks its nearest expert."""
    from goose_jax import retrieval

    index = retrieval.RetrievalIndex.load(args.retrieval_index or args.library).select(names)
    embedder = retrieval.SentenceEmbedder.load(args.embedder)
    return retrieval.expert_chooser(index, embedder, [ex for v in examples.values() for ex in v])


def _cap(examples: list, n: int | None) -> list:
    if n is None:
        return examples
    seen: dict[str, int] = {}
    out = []
    for ex in examples:
        if seen.get(ex.template, 0) < n:
            seen[ex.template] = seen.get(ex.template, 0) + 1
            out.append(ex)
    return out


def _layer(site: str) -> str:
    return "/".join(site.split("/")[:2])


def write_heatmaps(table: dict, expert_names: list[str], folder: str) -> list[str]:
    """One PNG per layer: the share of real tokens whose top-1 expert is e, per dataset."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    layers: dict[str, dict[str, np.ndarray]] = {}
    for site, by_dataset in table.items():
        for dataset, counts in by_dataset.items():
            acc = layers.setdefault(_layer(site), {})
            acc[dataset] = acc.get(dataset, 0) + np.asarray(counts, np.float64)
    os.makedirs(folder, exist_ok=True)
    written = []
    for layer, by_dataset in layers.items():
        datasets = sorted(by_dataset)
        m = np.stack([by_dataset[d] for d in datasets])
        m = m / np.maximum(m.sum(axis=1, keepdims=True), 1.0)
        size = (max(6.0, 0.3 * m.shape[1] + 3), max(2.5, 0.3 * len(datasets) + 1.5))
        fig, ax = plt.subplots(figsize=size)
        im = ax.imshow(m, aspect="auto", cmap="viridis", vmin=0.0)
        ax.set_yticks(range(len(datasets)), datasets, fontsize=7)
        names = expert_names if len(expert_names) == m.shape[1] else [str(i) for i in
                                                                      range(m.shape[1])]
        if m.shape[1] <= 60:
            ax.set_xticks(range(m.shape[1]), names, rotation=90, fontsize=6)
        ax.set_xlabel("expert")
        ax.set_title(f"{layer}: share of tokens routed first to each expert", fontsize=9)
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        path = os.path.join(folder, layer.replace("/", "_") + ".png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def run(args) -> dict:
    """Runs one evaluation from parsed arguments; returns the summary written to results.json."""
    import jax

    from goose_jax import evaluation as ev
    from goose_jax.data import tasks as T
    from goose_jax.interop.hf import progress_enabled

    grouping = None
    if args.flan_grouping:
        try:
            with open(args.flan_grouping, encoding="utf-8") as f:
                grouping = json.load(f)
        except (OSError, ValueError) as e:
            raise DataError(f"{args.flan_grouping}: cannot read the FLAN grouping: {e}") from None
    roots = T.DataRoots(p3=args.p3_root, bbh=args.bbh_root, bbl=args.bbl_root,
                        flan=args.flan_root, tfds=args.tfds_dir, flan_grouping=grouping)
    benchmarks = _csv(args.benchmark)
    # Data first: a wrong path fails in seconds, before a large model is read.
    tasks = T.get_tasks(_csv(args.tasks), benchmarks, roots)
    examples = {k: _cap(v, args.max_examples) for k, v in ev.load_all(tasks).items()}
    cfg, params = _load_base(args)
    tok = _tokenizer(args, cfg)
    routed, names = _routing(args, cfg, params)
    mesh = None
    if jax.device_count() > 1:
        # All global devices, batches split over them; in a process group every process scores
        # the same batches in step and process 0 alone writes the results.
        from goose_jax.sharding import make_mesh, replicate

        mesh = make_mesh(data=-1)
        params = replicate(params, mesh)
        routed = type(routed)(routed.method, routed.adapter,
                              replicate(routed.collections, mesh))
        args.batch_size = -(-args.batch_size // jax.device_count()) * jax.device_count()
    chooser = _expert_chooser(args.expert_map, names) if routed.method == "example" else None
    if routed.method == "retrieval":
        chooser = _retrieval_chooser(args, names, examples)
    evaluator = ev.Evaluator(cfg, params, tok, routed, batch_size=args.batch_size,
                             max_input_length=args.max_input_length,
                             max_target_length=args.max_target_length,
                             length_normalize=not args.summed, encoder_once=not args.naive,
                             telemetry=not args.no_telemetry, choose_experts=chooser,
                             mesh=mesh)
    t0 = time.perf_counter()
    primary = jax.process_index() == 0
    results = ev.evaluate(evaluator, tasks, examples=examples,
                          progress=progress_enabled() and not args.no_progress and primary)
    seconds = time.perf_counter() - t0
    n = sum(len(r.values) for r in results.values())
    meta = {"method": routed.method, "top_k": args.top_k, "base": os.path.abspath(args.base),
            "library": args.library and os.path.abspath(args.library), "experts": names,
            "tasks": [t.name for t in tasks], "batch_size": args.batch_size,
            "length_normalize": not args.summed, "encoder_once": not args.naive,
            "devices": jax.device_count(), "seconds": round(seconds, 2),
            "examples_per_second": round(n / max(seconds, 1e-9), 2),
            "compiled_shapes": len(evaluator.compiled_shapes)}
    summary = ev.summarize(results, benchmark=",".join(benchmarks), meta=meta)
    if primary:
        _write(args.out, summary, results, names)
    distributed.barrier("goose-eval: results written")
    return summary


def _write(out: str, summary: dict, results: dict, names: list[str]) -> None:
    from goose_jax import evaluation as ev

    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "results.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
    table = ev.markdown_table(summary)
    with open(os.path.join(out, "results.md"), "w", encoding="utf-8") as f:
        f.write(table)
    with open(os.path.join(out, "predictions.jsonl"), "w", encoding="utf-8") as f:
        for r in results.values():
            for p in r.predictions:
                f.write(json.dumps(p) + "\n")
    telemetry = ev.telemetry_table(results)
    if telemetry:
        with open(os.path.join(out, "telemetry.json"), "w", encoding="utf-8") as f:
            json.dump({"experts": names, "top1_counts": telemetry}, f)
        write_heatmaps(telemetry, names, os.path.join(out, "telemetry"))
    print(table, end="")
    print(f"{summary['examples_per_second']} examples/s; results in {out}")


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if not args.benchmark and not args.tasks:
        print("goose-eval: error: give --benchmark or --tasks", file=sys.stderr)
        return 2
    try:
        distributed.maybe_initialize(args, prog="goose-eval")
        run(args)
    except jax.errors.JaxRuntimeError as e:
        distributed.exit_on_peer_failure(e)  # in a process group: one line, exit 75
        raise
    except GooseError as e:
        print(f"goose-eval: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
