"""The paper's table from evaluation runs: methods x benchmarks, held-in and held-out means, the
oracle and best-individual rows from single-expert runs, and repeats (seeds) as mean and 95%
interval.

    write_report(["runs/phatgoose", "runs/arrow", "runs/single_a", ...], "report/")

reads goose-eval results folders (``evaluation.report.write_results``) and writes ``report.md``,
``report.json`` and ``report.png``; ``build_table`` does the same from ``Run`` records that any
caller makes (the demo builds them from its own results).

Definitions (as the paper, ``oracle`` and ``best individual`` use the test labels: not zero-shot):
  * a **column** is a benchmark: the dataset name's prefix (``t0_heldout/rte`` -> ``t0_heldout``);
    the miniature world's tasks split into ``world held-in`` and ``world held-out``. A run's
    value in a column is the unweighted mean over the column's datasets.
  * the **held-in** columns are ``HELD_IN`` (tasks the experts were trained on); every other
    column is held out. A row's held-in (held-out) mean is the mean of its values in every
    held-in (held-out) column of the report; a row that lacks one of them has none.
  * a **repeat** is one expert pool and data draw: runs that share a library and a world seed.
    Several repeats of one row (the same method over libraries trained with different seeds)
    make a cell of their mean, 95% interval (Student's t) and range; every statistic (column
    value, held means, oracle, best individual) is first computed per repeat, then aggregated.
  * **oracle**: per repeat and dataset, the best score of any single expert (method ``single``
    runs of that repeat's library); **best individual**: per repeat and column (and per group of
    columns for the held means), the one expert whose mean is best.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from goose_jax.core.errors import DataError
from goose_jax.core.outputs import check_apart
from goose_jax.core.tensorfile import read_json, write_atomic
from goose_jax.data import world
from goose_jax.evaluation.report import RESULTS, check_out_dir, family, md_cell

HELD_IN = ("t0_heldin", "flan", "world held-in")
HELD_OUT = ("t0_heldout", "bbh", "bbl", "world held-out")   # column order; any other is held out
# Row order of the paper's tables; rows not named here come after them, then the two oracles.
ORDER = ("base", "multitask", "merged", "merged_factors", "uniform", "average_activation",
         "arrow", "retrieval", "example", "phatgoose")
ORACLE, BEST = "oracle", "best individual"
FILES = ("report.md", "report.json", "report.png")


@dataclasses.dataclass(frozen=True)
class Run:
    """One evaluation run, as the table needs it.

    Attributes:
      path: where it came from (for messages).
      row: the table row (``phatgoose k=2``, ``merged``, ...; ``single`` for one expert alone).
      scores: dataset name -> score in percent (datasets with no scored example left out).
      base: the base model (runs of one report share it, unless ``labeled``).
      repeat: the expert pool and data draw; runs sharing it belong to one repeat (seed).
      expert: the expert of a ``single`` run.
      labeled: the row was named by the user (``NAME=RUN_DIR``): exempt from the base check.
    """

    path: str
    row: str
    scores: Mapping[str, float]
    base: str | None = None
    repeat: str = ""
    expert: str | None = None
    labeled: bool = False


# --- reading goose-eval runs --------------------------------------------------------------------


def row_label(meta: Mapping) -> str:
    """The table row of a goose-eval run: its method, with ``k`` for per-token top-k methods and
    the temperature of an Arrow run that is not 1."""
    method = meta["method"]
    label = method
    if method in ("phatgoose", "arrow", "average_activation"):
        label += f" k={meta.get('top_k', 2)}"
    temperature = meta.get("arrow_temperature", 1.0)
    if method == "arrow" and temperature != 1.0:
        label += f" T={temperature}"
    return label


def read_run(spec: str) -> Run:
    """The ``Run`` of a goose-eval results folder; ``NAME=DIR`` names its row ``NAME``.

    Raises:
      DataError: not a folder, no ``results.json`` (not a run, or an interrupted one), a
        malformed one, or a single-expert run that does not record its expert.
    """

    label, folder = None, spec
    if "=" in spec and not os.path.exists(spec):
        label, folder = spec.split("=", 1)
    if not os.path.isdir(folder):
        raise DataError(f"{folder}: not a goose-eval results folder (no such directory); pass "
                        "the --out folder of a goose-eval run")
    path = os.path.join(folder, RESULTS)
    if not os.path.isfile(path):
        seen = [f for f in ("results.md", "predictions.jsonl") if os.path.exists(
            os.path.join(folder, f))]
        why = (f"it has {seen[0]} but no {RESULTS} (an interrupted run?); rerun goose-eval "
               "there with --overwrite" if seen else
               f"no {RESULTS}; pass the --out folder of a goose-eval run")
        raise DataError(f"{folder}: not a goose-eval run: {why}")
    summary = read_json(path, error=DataError, what="the run's results",
                        fix="; rerun goose-eval there with --overwrite")
    missing = [k for k in ("method", "datasets", "base") if not isinstance(summary, dict)
               or k not in summary]
    if missing or not isinstance(summary["datasets"], dict):
        raise DataError(f"{path}: field {(missing or ['datasets'])[0]!r} missing or malformed; "
                        "not a goose-eval results.json (rerun goose-eval there with --overwrite)")
    if summary["method"] == "single" and not summary.get("expert"):
        raise DataError(f"{path}: a single-expert run that does not record its expert (field "
                        "'expert'); rerun it with this goose-eval, --overwrite")
    try:
        scores = {name: float(d["score"]) for name, d in summary["datasets"].items()
                  if d.get("score") is not None}
        scores = {(name if "/" in name else f"{family(name, summary.get('benchmark', ''))}/"
                   f"{name}"): v for name, v in scores.items()}
    except (TypeError, ValueError, AttributeError):
        raise DataError(f"{path}: field 'datasets' holds a score that is not a number; not a "
                        "goose-eval results.json") from None
    repeat = f"{summary.get('library')}|{summary.get('world_seed', '')}"
    return Run(path=folder, row=label or row_label(summary), scores=scores,
               base=summary["base"], repeat=repeat, expert=summary.get("expert"),
               labeled=label is not None)


# --- the table ----------------------------------------------------------------------------------


def column(dataset: str) -> str:
    """The column (benchmark) of a dataset name."""

    fam = dataset.split("/")[0]
    if fam == "world":
        held_in = dataset.removeprefix("world/") in {t.name for t in world.HELDIN}
        return "world held-in" if held_in else "world held-out"
    return fam


# Student's t 0.975 quantiles for 1-30 degrees of freedom (the standard two-sided 95% table);
# beyond 30 the Cornish-Fisher expansion around the normal quantile is within 1e-4 of it.
_T975 = (12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281,
         2.2010, 2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860,
         2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423)
_Z975 = 1.959964


def t975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom (two-sided 95%)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = _Z975
    return (z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
            + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * df**3))


def cell(values: Iterable[float]) -> dict | None:
    """Mean, range, count and 95% interval of the repeats' values (None: no value).

    ``ci95`` is the half-width of the two-sided 95% interval of the mean, ``t * s / sqrt(n)``
    with the sample standard deviation ``s`` (Student's t, n - 1 degrees of freedom); 0 for
    one repeat, where no interval exists (``fmt`` then prints the value alone).
    """
    v = [float(x) for x in values]
    if not v:
        return None
    n = len(v)
    half = t975(n - 1) * float(np.std(v, ddof=1)) / np.sqrt(n) if n > 1 else 0.0
    return {"mean": float(np.mean(v)), "min": min(v), "max": max(v), "n": n,
            "ci95": float(half)}


def fmt(c: dict | None, digits: int = 1) -> str:
    """A cell as ``mean`` (one repeat) or ``mean ± h`` (``h``: the 95% interval's half-width)."""
    if c is None:
        return "n/a"
    if c["n"] == 1:
        return f"{c['mean']:.{digits}f}"
    return f"{c['mean']:.{digits}f} ± {c['ci95']:.{digits}f}"


def oracle(singles: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """Per dataset, the best score of any expert (``singles``: expert -> dataset -> score)."""
    datasets = next(iter(singles.values()))
    return {d: max(s[d] for s in singles.values()) for d in datasets}


def best_expert(singles: Mapping[str, Mapping[str, float]], datasets: Sequence[str]) -> str:
    """The expert whose unweighted mean over ``datasets`` is best (the first on a tie)."""
    return max(singles, key=lambda n: float(np.mean([singles[n][d] for d in datasets])))


def _by_column(scores: Mapping[str, float]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for d, v in scores.items():
        out.setdefault(column(d), {})[d] = v
    return out


def _check(runs: Sequence[Run]) -> list[str]:
    """The report's columns, after checking that the runs can share one table."""
    if not runs:
        raise DataError("no runs to report; pass goose-eval --out folders")
    based = [r for r in runs if not r.labeled]
    if len({r.base for r in based}) > 1:
        a = based[0]
        b = next(r for r in based if r.base != a.base)
        raise DataError(f"{b.path}: base {b.base} differs from {a.path}'s {a.base}; report runs "
                        "of one base (or name a run of another base as NAME=RUN_DIR)")
    seen: dict[str, tuple[str, frozenset]] = {}
    for r in runs:
        if not r.scores:
            raise DataError(f"{r.path}: no scored dataset; nothing to report")
        for col, ds in _by_column(r.scores).items():
            first = seen.setdefault(col, (r.path, frozenset(ds)))
            if first[1] != frozenset(ds):
                odd = sorted(first[1] ^ frozenset(ds))[0]
                raise DataError(f"{r.path}: benchmark {col} covers {len(ds)} datasets, "
                                f"{first[0]} covers {len(first[1])} ({odd} is in one only); "
                                "evaluate every run on the same tasks")
    cover: dict[str, tuple[str, set]] = {}
    pairs: dict[tuple, str] = {}
    for r in runs:
        cols = set(_by_column(r.scores))
        for col in cols:
            who = (r.row, r.expert, r.repeat, col)
            if who in pairs:
                raise DataError(f"{r.path}: the same {r.row} run as {pairs[who]} (benchmark "
                                f"{col}, same library and seed); pass one of them")
            pairs[who] = r.path
        first = cover.setdefault(f"{r.row}|{r.expert or ''}|{r.repeat}", (r.path, set()))
        first[1].update(cols)
    for who, (path, cols) in cover.items():   # a row's repeats, and every expert, alike
        row = who.split("|")[0]
        for other, (opath, ocols) in cover.items():
            if other.split("|")[0] == row and ocols != cols:
                odd = sorted(cols ^ ocols)[0]
                raise DataError(f"{opath}: {row} runs cover benchmarks {sorted(ocols)}, "
                                f"{path} covers {sorted(cols)} ({odd} differs); evaluate every "
                                f"{row} run on the same benchmarks")
    cols = list(dict.fromkeys(column(d) for r in runs for d in r.scores))
    known = HELD_IN + HELD_OUT
    return sorted(cols, key=lambda c: (c not in HELD_IN, known.index(c) if c in known
                                       else len(known), cols.index(c)))


def _row_order(row: str) -> tuple:
    name = row.split(" ")[0]
    return (ORDER.index(name) if name in ORDER else len(ORDER), row)


def build_table(runs: Sequence[Run]) -> dict:
    """The paper's table of ``runs`` as a JSON-ready dict.

    Returns:
      ``{"columns", "held_in", "held_out", "rows": {row: {"columns": {col: cell}, "held-in":
      cell, "held-out": cell, "datasets": {dataset: cell}, "runs": [paths]}}, "base",
      "best_experts"}``; a cell is ``cell``'s dict or None. ``best_experts`` names, per repeat,
      the best individual expert of each column and group.

    Raises:
      DataError: runs of different bases, of one row or benchmark over different datasets or
        benchmarks, or the same run twice.
    """
    cols = _check(runs)
    groups = {"held-in": [c for c in cols if c in HELD_IN],
              "held-out": [c for c in cols if c not in HELD_IN]}
    # Per row and repeat: dataset -> score (one repeat's runs may split its benchmarks).
    per: dict[str, dict[str, dict[str, float]]] = {}
    paths: dict[str, list[str]] = {}
    singles: dict[str, dict[str, dict[str, float]]] = {}
    for r in runs:
        if r.row == "single":
            singles.setdefault(r.repeat, {}).setdefault(r.expert, {}).update(r.scores)
        else:
            per.setdefault(r.row, {}).setdefault(r.repeat, {}).update(r.scores)
            paths.setdefault(r.row, []).append(r.path)
    oracles: dict[str, dict[str, float]] = {}
    bests: dict[str, dict] = {}
    best_experts: dict[str, dict[str, str]] = {}
    for repeat, by_expert in singles.items():
        oracles[repeat] = oracle(by_expert)
        picks = {}
        for col in cols:
            ds = [d for d in next(iter(by_expert.values())) if column(d) == col]
            if ds:
                picks[col] = best_expert(by_expert, ds)
        for g, gcols in groups.items():   # the group's mean: the mean of its benchmarks'
            if gcols and all(c in picks for c in gcols):
                means = {e: _col_means(v) for e, v in by_expert.items()}
                picks[g] = max(means, key=lambda e: float(np.mean([means[e][c] for c in gcols])))
        best_experts[repeat] = picks
        bests[repeat] = {"picks": picks, "experts": by_expert}
    rows = {}
    for row in sorted(per, key=_row_order):
        rows[row] = _row(per[row], cols, groups)
        rows[row]["runs"] = paths[row]
    if singles:
        rows[ORACLE] = _row(oracles, cols, groups)
        rows[BEST] = _best_row(bests, cols, groups)
        for name in (ORACLE, BEST):
            rows[name]["runs"] = [r.path for r in runs if r.row == "single"]
    return {"columns": cols, "held_in": groups["held-in"], "held_out": groups["held-out"],
            "rows": rows, "base": next((r.base for r in runs if not r.labeled), None),
            "best_experts": best_experts}


def _col_means(scores: Mapping[str, float]) -> dict[str, float]:
    return {c: float(np.mean(list(ds.values()))) for c, ds in _by_column(scores).items()}


def _row(repeats: Mapping[str, Mapping[str, float]], cols, groups) -> dict:
    values: dict[str, list[float]] = {}
    datasets: dict[str, list[float]] = {}
    for scores in repeats.values():
        means = _col_means(scores)
        for c, v in means.items():
            values.setdefault(c, []).append(v)
        for g, gcols in groups.items():
            if gcols and all(c in means for c in gcols):
                values.setdefault(g, []).append(float(np.mean([means[c] for c in gcols])))
        for d, v in scores.items():
            datasets.setdefault(d, []).append(v)
    return {"columns": {c: cell(values.get(c, [])) for c in cols},
            **{g: cell(values.get(g, [])) for g in groups},
            "datasets": {d: cell(v) for d, v in sorted(datasets.items())}}


def _best_row(repeats: Mapping[str, dict], cols, groups) -> dict:
    values: dict[str, list[float]] = {}
    datasets: dict[str, list[float]] = {}
    for rep in repeats.values():
        picks, experts = rep["picks"], rep["experts"]
        for c in cols:
            if c in picks:
                means = _col_means(experts[picks[c]])
                values.setdefault(c, []).append(means[c])
                for d, v in experts[picks[c]].items():
                    if column(d) == c:
                        datasets.setdefault(d, []).append(v)
        for g, gcols in groups.items():
            if g in picks:
                means = _col_means(experts[picks[g]])
                values.setdefault(g, []).append(float(np.mean([means[c] for c in gcols])))
    return {"columns": {c: cell(values.get(c, [])) for c in cols},
            **{g: cell(values.get(g, [])) for g in groups},
            "datasets": {d: cell(v) for d, v in sorted(datasets.items())}}


# --- rendering ----------------------------------------------------------------------------------


def _means_header(table: dict) -> list[str]:
    """The held means worth a column: those of groups of two benchmarks or more (a group of one
    benchmark has that benchmark's number as its mean)."""
    return [g for g, key in (("held-in", "held_in"), ("held-out", "held_out"))
            if len(table[key]) > 1]


def markdown(table: dict, *, title: str = "Results") -> str:
    """The table as markdown: methods x benchmarks with the held means, then per dataset."""
    cols, groups = table["columns"], _means_header(table)
    rows = table["rows"]
    repeats = max((c["n"] for r in rows.values() for c in r["columns"].values() if c), default=1)
    lines = [f"# {title}", "",
             "Scores in percent; a benchmark's number is the unweighted mean over its datasets."
             + (f" Cells over several repeats (seeds) read mean ± the half-width of its 95% "
                f"interval (Student's t over up to {repeats} repeats; range in the JSON)."
                if repeats > 1 else "")
             + " Oracle and best individual choose experts with the test labels (not "
             "zero-shot).", ""]
    if table.get("base"):
        lines += [f"Base: `{table['base']}`.", ""]
    head = cols + [f"{g} mean" for g in groups]
    lines += ["| method | " + " | ".join(map(md_cell, head)) + " |",
              "|---|" + "---:|" * len(head)]
    for name, r in rows.items():
        cells = [fmt(r["columns"][c]) for c in cols] + [fmt(r[g]) for g in groups]
        lines.append(f"| {md_cell(name)} | " + " | ".join(cells) + " |")
    datasets = list(dict.fromkeys(d for r in rows.values() for d in r["datasets"]))
    lines += ["", "## Per dataset", "", "| dataset | " + " | ".join(map(md_cell, rows)) + " |",
              "|---|" + "---:|" * len(rows)]
    for d in sorted(datasets, key=lambda d: (cols.index(column(d)), d)):
        lines.append(f"| {md_cell(d)} | " + " | ".join(fmt(r["datasets"].get(d), 0)
                                                       for r in rows.values()) + " |")
    return "\n".join(lines) + "\n"


def figure_png(table: dict, *, title: str = "") -> bytes:
    """One bar chart (methods x benchmarks and held means; whiskers: 95% intervals) as PNG
    bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = _means_header(table)
    heads = table["columns"] + [f"{g} mean" for g in groups]
    keys = table["columns"] + groups
    rows = table["rows"]
    width = 0.8 / max(len(rows), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(heads) * max(1, len(rows)) / 4 + 3), 4))
    x = np.arange(len(heads), dtype=np.float64)
    for i, (name, r) in enumerate(rows.items()):
        cells = [r["columns"].get(k) if k in r["columns"] else r.get(k) for k in keys]
        mean = np.array([c["mean"] if c else np.nan for c in cells])
        half = np.array([c["ci95"] if c else 0.0 for c in cells])
        ax.bar(x + (i - (len(rows) - 1) / 2) * width, mean, width, label=name,
               yerr=half, capsize=2)
    ax.set_xticks(x, heads, fontsize=8)
    ax.set_ylabel("score (%)")
    ax.set_title(title or "methods x benchmarks (whiskers: 95% interval over repeats)",
                 fontsize=9)
    ax.legend(fontsize=6, ncol=2, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def write_report(specs: Sequence[str], out: str, *, overwrite: bool = False) -> dict:
    """Reads goose-eval runs, writes ``report.md``, ``report.json`` and ``report.png`` to
    ``out``; returns the table.

    Every input is read and every file rendered before the first is written (each through a
    temporary file renamed into place), so a bad input leaves ``out`` as it was.

    Args:
      specs: results folders, each optionally ``NAME=DIR`` to name its row.
      out: the report folder (created if missing).
      overwrite: replace a report already there.

    Raises:
      DataError: see ``read_run`` and ``build_table``; ``out`` unusable or already a report.
    """

    check_apart({"--out": out}, {"RUN_DIR": [
        s.split("=", 1)[1] if "=" in s and not os.path.exists(s) else s for s in specs]})
    check_out_dir(out, overwrite=overwrite, holds=FILES)
    table = build_table([read_run(s) for s in specs])
    text = markdown(table, title="goose-eval report")
    png = figure_png(table)
    payload = json.dumps(table, indent=2)
    os.makedirs(out, exist_ok=True)
    for name, data in zip(FILES, (text, payload, png)):
        write_atomic(os.path.join(out, name), data)
    return table
