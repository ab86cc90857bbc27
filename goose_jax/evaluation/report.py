"""What an evaluation leaves on disk: the results folder, tables, heatmaps and prototype files.

Shapes follow the package legend (the ``goose_jax`` module docstring).

A goose-eval results folder holds ``results.json`` (``summarize``: per-dataset and benchmark
scores, settings, speed), ``results.md`` (``markdown_table``), ``predictions.jsonl`` (every scored
example) and, for per-token routing methods, ``telemetry.json`` (``telemetry_table``: per site and
dataset, how often each expert was the top-1 choice over real tokens) with one heatmap per layer
under ``telemetry/`` (``write_heatmaps``). The average-activation router vectors travel as a
safetensors file of ``<site>/gate`` tensors (``save_prototypes`` / ``load_prototypes``).
"""

from __future__ import annotations

import json
import os
import re
from collections import defaultdict
from typing import TYPE_CHECKING

import numpy as np

from goose_jax.core.checkpoint import check_folder_writable
from goose_jax.core.errors import DataError
from goose_jax.core.tensorfile import write_atomic

if TYPE_CHECKING:
    from goose_jax.evaluation.evaluator import DatasetResult


# --- aggregation --------------------------------------------------------------------------------


def family(name: str, benchmark: str) -> str:
    """The benchmark of a dataset name: its prefix before ``/``, else ``benchmark``."""
    return name.split("/")[0] if "/" in name else (benchmark or "all")


def summarize(results: dict[str, DatasetResult], *, benchmark: str = "",
              meta: dict | None = None) -> dict:
    """The run's JSON: per-dataset scores (percent) and unweighted means over datasets.

    ``benchmarks`` holds one mean per benchmark (the dataset name's prefix before ``/``, else
    ``benchmark``); ``score`` is the mean over all datasets. Datasets with no scored example are
    listed with ``score: null`` and left out of the means.
    """
    datasets = {}
    for name, r in results.items():
        datasets[name] = {
            "metric": r.metric, "score": r.score, "examples": len(r.values),
            "skipped": sum(r.skipped.values()), "skip_reasons": dict(r.skipped),
            "templates": {t: {"score": 100.0 * float(np.mean(v)), "examples": len(v)}
                          for t, v in sorted(r.templates.items())},
            "seconds": round(r.seconds, 3),
        }
    groups: dict[str, list[float]] = {}
    for name, d in datasets.items():
        if d["score"] is not None:
            groups.setdefault(family(name, benchmark), []).append(d["score"])
    scored = [v for g in groups.values() for v in g]
    return {"benchmark": benchmark, "score": float(np.mean(scored)) if scored else None,
            "num_datasets": len(scored),
            "benchmarks": {k: {"score": float(np.mean(v)), "num_datasets": len(v)}
                           for k, v in groups.items()},
            "datasets": datasets, **(meta or {})}


def md_cell(text) -> str:
    """``text`` as one markdown table cell: ``|`` escaped (it would start a new column) and line
    breaks as spaces (they would end the row)."""
    return " ".join(str(text).split()).replace("|", "\\|")


def markdown_table(summary: dict) -> str:
    """A markdown table of a ``summarize`` result: one row per dataset, then the means."""
    lines = ["| dataset | metric | score | examples | skipped |", "|---|---|---:|---:|---:|"]

    def fmt(v):
        return "n/a" if v is None else f"{v:.1f}"

    for name, d in summary["datasets"].items():
        lines.append(f"| {md_cell(name)} | {md_cell(d['metric'])} | {fmt(d['score'])} | "
                     f"{d['examples']} | {d['skipped']} |")
    means = [(k, v["score"], v["num_datasets"]) for k, v in summary["benchmarks"].items()]
    if len(means) != 1:
        means.append(("all", summary["score"], summary["num_datasets"]))
    for label, score, n in means:
        lines.append(f"| **{md_cell(label)} (mean of {n})** | | **{fmt(score)}** | | |")
    return "\n".join(lines) + "\n"


def comparison_table(summaries: dict[str, dict]) -> str:
    """A markdown table of several runs on the same tasks: one row per dataset, one column per
    run (``summarize`` results by run name), then each benchmark's mean and the overall mean."""
    runs = list(summaries)

    def fmt(v):
        return "n/a" if v is None else f"{v:.1f}"

    datasets = list(dict.fromkeys(d for s in summaries.values() for d in s["datasets"]))
    families = list(dict.fromkeys(b for s in summaries.values() for b in s["benchmarks"]))
    lines = ["| dataset | " + " | ".join(map(md_cell, runs)) + " |",
             "|---|" + "---:|" * len(runs)]
    for d in datasets:
        cells = [fmt(s["datasets"].get(d, {}).get("score")) for s in summaries.values()]
        lines.append(f"| {md_cell(d)} | " + " | ".join(cells) + " |")
    for b in families:
        cells = [fmt(s["benchmarks"].get(b, {}).get("score")) for s in summaries.values()]
        lines.append(f"| **{md_cell(b)} (mean)** | " + " | ".join(f"**{c}**" for c in cells)
                     + " |")
    if len(families) != 1:
        cells = [fmt(s["score"]) for s in summaries.values()]
        lines.append("| **all (mean)** | " + " | ".join(f"**{c}**" for c in cells) + " |")
    return "\n".join(lines) + "\n"


def telemetry_table(results: dict[str, DatasetResult]) -> dict[str, dict[str, list[float]]]:
    """``{site: {dataset: top-1 counts per expert}}`` over all datasets with telemetry."""
    table: dict[str, dict[str, list[float]]] = defaultdict(dict)
    for name, r in results.items():
        for site, counts in r.telemetry.items():
            table[site][name] = np.asarray(counts).tolist()
    return dict(table)


# --- the results folder -------------------------------------------------------------------------


RESULTS = "results.json"


def check_out_dir(out: str, *, overwrite: bool = False, holds: tuple[str, ...] = (RESULTS,),
                  flag: str = "--out") -> None:
    """Fails at once (before any model work) when ``out`` cannot become a results folder.

    Args:
      out: the folder to write.
      overwrite: replace results already there (``--overwrite``).
      holds: the files whose presence means ``out`` already holds results.
      flag: the flag that named ``out`` (for the message).

    Raises:
      DataError: ``out`` is an existing file, lies below a file, or already holds results
        (without ``overwrite``).
    """

    out = os.fspath(out)
    if os.path.exists(out) and not os.path.isdir(out):
        raise DataError(f"{out}: the output path is an existing file, not a directory; pass "
                        f"another {flag}")
    check_folder_writable(out, error=DataError, fix=f"; pass another {flag}")
    found = [name for name in holds if os.path.exists(os.path.join(out, name))]
    if found and not overwrite:
        raise DataError(f"{out}: already holds results ({found[0]}); pass --overwrite to "
                        f"replace them, or another {flag}")


def write_results(out: str, summary: dict, results: dict[str, DatasetResult],
                  expert_names: list[str]) -> str:
    """Writes the results folder (see the module doc) to ``out``; returns the markdown table.

    Every file is written through a temporary file renamed into place, ``results.json`` last
    (an older one is removed first), so an interrupted write never leaves a ``results.json``
    beside files of another run.

    Args:
      out: the folder (created if missing).
      summary: ``summarize``'s result.
      results: the evaluator's results by dataset (predictions and telemetry).
      expert_names: the library's experts, in routing order (telemetry columns).
    """
    import shutil


    os.makedirs(out, exist_ok=True)
    if os.path.exists(os.path.join(out, RESULTS)):
        os.remove(os.path.join(out, RESULTS))
    table = markdown_table(summary)
    write_atomic(os.path.join(out, "results.md"), table)
    write_atomic(os.path.join(out, "predictions.jsonl"),
                 "".join(json.dumps(p) + "\n" for r in results.values() for p in r.predictions))
    telemetry = telemetry_table(results)
    if os.path.exists(os.path.join(out, "telemetry.json")):  # another run's
        os.remove(os.path.join(out, "telemetry.json"))
    shutil.rmtree(os.path.join(out, "telemetry"), ignore_errors=True)
    if telemetry:
        write_atomic(os.path.join(out, "telemetry.json"),
                     json.dumps({"experts": expert_names, "top1_counts": telemetry}))
        write_heatmaps(telemetry, expert_names, os.path.join(out, "telemetry"))
    write_atomic(os.path.join(out, RESULTS), json.dumps(summary, indent=2))
    return table


# A site's layer: a T5 stack's block (``encoder/block_0``) or a decoder-only model's layer
# (``layers_3``), the site's name up to and including it.
_LAYER = re.compile(r"^((?:[^/]+/)*?(?:block|layers)_\d+)/")


def layer_of(site: str) -> str:
    """The layer a site belongs to, as the heatmaps group them: ``encoder/block_0`` for
    ``encoder/block_0/self_attn/q``, ``layers_3`` for ``layers_3/mlp/up``; a name without a
    numbered block or layer: its first two parts."""
    m = _LAYER.match(site)
    return m.group(1) if m else "/".join(site.split("/")[:2])


def _layer_key(layer: str) -> tuple:
    # Numbers compared as numbers: layers_2 before layers_10.
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", layer))


def write_heatmaps(table: dict, expert_names: list[str], folder: str) -> list[str]:
    """One PNG per layer: the share of real tokens whose top-1 expert is e, per dataset.

    Args:
      table: ``telemetry_table``'s ``{site: {dataset: (E,) counts}}``.
      expert_names: the E experts' names (column labels; indices when the lengths differ).
      folder: where the PNGs go (created if missing).

    Returns:
      The paths written, one per layer (``layer_of``), in layer order: ``encoder_block_0.png``,
      ... for a T5; ``layers_0.png``, ... for a decoder-only model.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers: dict[str, dict[str, np.ndarray]] = {}
    for site, by_dataset in table.items():
        for dataset, counts in by_dataset.items():
            acc = layers.setdefault(layer_of(site), {})
            acc[dataset] = acc.get(dataset, 0) + np.asarray(counts, np.float64)
    os.makedirs(folder, exist_ok=True)
    written = []
    for layer, by_dataset in sorted(layers.items(), key=lambda kv: _layer_key(kv[0])):
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
