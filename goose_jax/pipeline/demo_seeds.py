"""The demo over several seeds: every table of ``goose_jax.pipeline.demo`` as the mean and 95%
interval
over the seeds (``evaluation.paper_table.cell``), in the layout of ``goose-eval report``
(``goose_jax.evaluation.paper_table``), and PHATGOOSE k=2 against every method, paired by seed.

    summary = report_seeds([run_demo(DemoSettings(seed=s, ...)) for s in (0, 1, 2)], out, "full")

(``run_demo(DemoSettings(seeds=(0, 1, 2)))`` does exactly that.) Writes ``results.md``,
``results.json`` and ``results.png`` to ``out``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import numpy as np

from goose_jax.core.tensorfile import write_atomic
from goose_jax.data import world
from goose_jax.evaluation import paper_table as pt

# The demo's method names -> the rows goose-eval report gives the same methods.
ROWS = {"phatgoose_k1": "phatgoose k=1", "phatgoose_k2": "phatgoose k=2", "arrow": "arrow k=2",
        "average_activation": "average_activation k=2"}
DERIVED = ("oracle", "best_individual")


def seed_runs(summary: dict) -> list[pt.Run]:
    """The ``evaluation.paper_table.Run`` records of one seed's demo summary (results.json): one per
    method and one per single expert, the seed as the repeat."""
    seed = str(summary["seed"])

    def scores(by_task):
        return {f"world/{t}": v for t, v in by_task.items()}

    runs = [pt.Run(path=f"seed {seed}", row=ROWS.get(m, m), scores=scores(s), repeat=seed)
            for m, s in summary["scores"].items() if m not in DERIVED]
    runs += [pt.Run(path=f"seed {seed}", row="single", scores=scores(s), repeat=seed,
                    expert=n) for n, s in summary["experts"].items()]
    return runs


def _per_seed(summary: dict, method: str) -> dict[str, float]:
    """One seed's held-in mean, held-out mean and composition score of ``method`` (percent)."""

    by_task = summary["scores"][method]
    out = {"held-in": float(np.mean([by_task[t.name] for t in world.HELDIN])),
           "held-out": float(np.mean([by_task[t.name] for t in world.HELDOUT]))}
    for t in world.HELDOUT:
        if t.kind_of_heldout == "composition":
            out["composition"] = float(by_task[t.name])
    return out


def paired(summaries: Sequence[dict], reference: str = "phatgoose_k2") -> dict:
    """``reference`` against every other zero-shot method, paired by seed.

    For each method and measure (held-in mean, held-out mean, composition task): the per-seed
    differences ``reference - method`` as a ``evaluation.paper_table.cell`` (mean, 95% interval,
    range) and
    the number of seeds where ``reference`` is ahead. A difference whose 95% interval excludes 0
    is what the seeds support; anything else they leave open. Also the reference's rank among the
    zero-shot methods on each measure, per seed (1 = best; ties share the better rank).
    """
    methods = [m for m in summaries[0]["scores"] if m not in DERIVED]
    per = {m: [_per_seed(s, m) for s in summaries] for m in methods}
    measures = list(per[reference][0])
    diffs = {}
    for m in methods:
        if m == reference:
            continue
        diffs[m] = {}
        for k in measures:
            d = [a[k] - b[k] for a, b in zip(per[reference], per[m])]
            diffs[m][k] = {**pt.cell(d), "ahead": int(sum(x > 0 for x in d)), "seeds": len(d)}
    ranks = {k: [1 + sum(per[m][i][k] > per[reference][i][k] for m in methods)
                 for i in range(len(summaries))] for k in measures}
    return {"reference": reference, "differences": diffs, "ranks": ranks}


def _verdict(c: dict) -> str:
    lo, hi = c["mean"] - c["ci95"], c["mean"] + c["ci95"]
    if c["n"] < 2:
        return "one seed"
    return "ahead" if lo > 0 else "behind" if hi < 0 else "open"


def report_seeds(summaries: Sequence[dict], out: str, preset: str) -> dict:
    """Writes the tables over the seeds of ``summaries`` (each a seed's results.json) to
    ``out``; returns the summary written as ``results.json``."""

    seeds = [s["seed"] for s in summaries]
    table = pt.build_table([r for s in summaries for r in seed_runs(s)])
    names = list(summaries[0]["own_task"])
    own = {n: {"own task": pt.cell(s["own_task"][n] for s in summaries),
               "base": pt.cell(s["scores"]["base"][n] for s in summaries)} for n in names}
    methods = list(dict.fromkeys(m for s in summaries for m in s["agreement"]))
    agree = {}
    for m in methods:
        per = [s["agreement"][m] for s in summaries if m in s["agreement"]]
        agree[m] = {"mean": pt.cell(a["mean"] for a in per),
                    "by_layer": {layer: pt.cell(a["by_layer"][layer] for a in per)
                                 for layer in per[0]["by_layer"]}}
    text = pt.markdown(table, title=f"goose-demo results (preset {preset}, seeds "
                                    f"{', '.join(map(str, seeds))})")
    kinds = {t.name: t.kind_of_heldout for t in world.HELDOUT}
    text = text.replace("## Per dataset", "## Per task (held-out kinds: " + "; ".join(
        f"{k}: {v}" for k, v in kinds.items()) + ")")
    lines = ["", "## Each expert on its own task vs the base model", "",
             "| expert | own task | base |", "|---|---:|---:|"]
    lines += [f"| {n} | {pt.fmt(c['own task'], 0)} | {pt.fmt(c['base'], 0)} |"
              for n, c in own.items()]
    lines += ["", "## Per-token top-1 agreement with the task's own expert (held-in tasks)", "",
              f"Chance is {1 / len(names):.3f}.", ""]
    if agree:
        layers = sorted(next(iter(agree.values()))["by_layer"],
                        key=lambda layer: (not layer.startswith("encoder"), layer))
        lines += ["| method | mean over sites | " + " | ".join(layers) + " |",
                  "|---|---:|" + "---:|" * len(layers)]
        for m, a in agree.items():
            lines.append(f"| {m} | {pt.fmt(a['mean'], 3)} | " + " | ".join(
                pt.fmt(a["by_layer"][layer], 2) for layer in layers) + " |")
    pairs = paired(summaries) if "phatgoose_k2" in summaries[0]["scores"] else None
    if pairs:
        measures = list(pairs["ranks"])
        lines += ["", "## PHATGOOSE k=2 against each zero-shot method, paired by seed", "",
                  "Each cell: the mean over seeds of (PHATGOOSE k=2 - method), ± the half-width "
                  "of its 95% interval, then the seeds where PHATGOOSE k=2 is ahead and the "
                  "verdict (ahead / behind: the interval excludes 0; open: it does not).", "",
                  "| method | " + " | ".join(measures) + " |", "|---|" + "---:|" * len(measures)]
        for m, by in pairs["differences"].items():
            lines.append(f"| {m} | " + " | ".join(
                f"{pt.fmt(by[k])} ({by[k]['ahead']}/{by[k]['seeds']}, {_verdict(by[k])})"
                for k in measures) + " |")
        lines += ["", "Rank of PHATGOOSE k=2 among the zero-shot methods, per seed: " + "; ".join(
            f"{k} {pairs['ranks'][k]}" for k in measures) + "."]
    seconds = [s.get("seconds", 0.0) for s in summaries]
    lines += ["", "Per-seed tables, heatmaps and summaries: " + ", ".join(
        f"seed{x}/" for x in seeds) + "."]
    write_atomic(os.path.join(out, "results.md"), text + "\n".join(lines) + "\n")
    write_atomic(os.path.join(out, "results.png"), pt.figure_png(
        table, title=f"goose-demo, seeds {', '.join(map(str, seeds))}: mean and 95% interval"))
    rows = table["rows"]
    pg = rows.get("phatgoose k=2", {})
    plain = ["", f"What happened over seeds {', '.join(map(str, seeds))} (mean ± 95% interval):",
             f"- Held-in mean: PHATGOOSE (k=2) {pt.fmt(pg.get('held-in'))}, merged experts "
             f"{pt.fmt(rows['merged']['held-in'])}, base {pt.fmt(rows['base']['held-in'])}.",
             f"- Held-out mean: PHATGOOSE (k=2) {pt.fmt(pg.get('held-out'))}; " + ", ".join(
                 f"{m} {pt.fmt(r['held-out'])}" for m, r in rows.items()
                 if m not in ("phatgoose k=2", pt.ORACLE, pt.BEST)) + ".",
             f"- Table: {os.path.join(out, 'results.md')}; figure: "
             f"{os.path.join(out, 'results.png')}"]
    summary = {"preset": preset, "seeds": seeds, "table": table, "own_task": own,
               "agreement": agree, "paired": pairs, "seconds": seconds,
               "plain_summary": "\n".join(plain)}
    write_atomic(os.path.join(out, "results.json"), json.dumps(summary, indent=2))
    return summary
