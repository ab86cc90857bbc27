"""`goose-eval report`: the paper's table from goose-eval results folders.

Fake runs are written with the real writer (``evaluation.report.summarize`` /
``evaluation.report.write_results``);
every cell is compared with a NumPy reference computed here from the raw per-example values:
the mean and range over seeds, the held-in and held-out means, the oracle (best single expert
per dataset) and the best individual (the one expert whose mean is best). Hostile inputs end in
exit 1 (or 2), one line on stderr, and no file written.
"""

import json
import os

import numpy as np
import pytest
from conftest import one_line, tool, tree_hash

from goose_jax.evaluation import paper_table, report
from goose_jax.evaluation.evaluator import DatasetResult

REPORT = "goose-eval report"
BENCH = {"t0_heldin": ["a", "b"], "t0_heldout": ["rte", "cb", "copa"], "bbh": ["nav", "dates"]}
DATASETS = [f"{b}/{d}" for b, ds in BENCH.items() for d in ds]
EXPERTS = ["e0", "e1", "e2"]
SEEDS = [0, 1, 2]
N = 20   # examples per dataset


def _main(argv):
    return tool("goose-eval")(["report", *map(str, argv)])


def _write_run(folder, values, *, method, library, top_k=2, expert=None, base="/models/b",
               benchmark="t0_heldin,t0_heldout,bbh"):
    """A goose-eval results folder of per-example 0/1 values by dataset."""
    results = {d: DatasetResult(d, "accuracy", values=list(map(float, v)),
                                templates={"t0": list(map(float, v))})
               for d, v in values.items()}
    meta = {"method": method, "top_k": top_k, "base": base, "library": library,
            "experts": EXPERTS}
    if expert is not None:
        meta["expert"] = expert
    summary = report.summarize(results, benchmark=benchmark, meta=meta)
    report.write_results(str(folder), summary, results, [])
    return str(folder)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Per seed: phatgoose (one run), arrow (split in two runs), three single experts; a base
    run. Returns (run folders, raw values[method][seed][dataset])."""
    root = tmp_path_factory.mktemp("runs")
    rng = np.random.default_rng(0)
    raw, dirs = {}, []
    for seed in SEEDS:
        lib = f"/libs/seed{seed}"
        for m in ["phatgoose", "arrow"] + [f"single:{e}" for e in EXPERTS]:
            vals = {d: rng.integers(0, 2, N) for d in DATASETS}
            raw.setdefault(m, {})[seed] = vals
            kw = {"method": m.split(":")[0], "library": lib,
                  "expert": m.split(":")[1] if ":" in m else None}
            if m == "arrow":   # one repeat's benchmarks in two runs
                dirs.append(_write_run(root / f"arrow{seed}a", {d: vals[d] for d in DATASETS[:2]},
                                       benchmark="t0_heldin", **kw))
                dirs.append(_write_run(root / f"arrow{seed}b", {d: vals[d] for d in DATASETS[2:]},
                                       benchmark="t0_heldout,bbh", **kw))
            else:
                dirs.append(_write_run(root / f"{m.replace(':', '_')}{seed}", vals, **kw))
    raw["base"] = {0: {d: rng.integers(0, 2, N) for d in DATASETS}}
    dirs.append(_write_run(root / "base", raw["base"][0], method="base", library=None))
    return dirs, raw


def _score(v):
    return 100.0 * np.mean(v)


def _col(vals, bench):
    return np.mean([_score(vals[f"{bench}/{d}"]) for d in BENCH[bench]])


def _expect(cells, values):
    values = np.asarray(values, np.float64)
    assert cells["n"] == len(values)
    np.testing.assert_allclose([cells["mean"], cells["min"], cells["max"]],
                               [values.mean(), values.min(), values.max()], rtol=1e-12)
    if len(values) > 1:   # the 95% interval as scipy's Student's t gives it
        from scipy import stats

        lo, _ = stats.t.interval(0.95, len(values) - 1, loc=values.mean(),
                                 scale=stats.sem(values))
        np.testing.assert_allclose(cells["ci95"], values.mean() - lo, rtol=1e-4, atol=1e-9)


def test_t_quantile_matches_scipy():
    from scipy import stats

    for df in (*range(1, 80), 120, 500, 10_000):
        assert abs(paper_table.t975(df) - stats.t.ppf(0.975, df)) < 2e-4, df


def test_table_matches_a_numpy_reference(runs, tmp_path, capsys):
    dirs, raw = runs
    out = tmp_path / "rep"
    assert _main([*dirs, "--out", out]) == 0, capsys.readouterr().err
    table = json.loads((out / "report.json").read_text())
    assert table["columns"] == ["t0_heldin", "t0_heldout", "bbh"]
    rows = table["rows"]
    assert list(rows) == ["base", "arrow k=2", "phatgoose k=2", "oracle", "best individual"]
    held_out = ("t0_heldout", "bbh")
    for name, m in (("phatgoose k=2", "phatgoose"), ("arrow k=2", "arrow"), ("base", "base")):
        for b in BENCH:
            _expect(rows[name]["columns"][b], [_col(raw[m][s], b) for s in raw[m]])
        _expect(rows[name]["held-in"], [_col(raw[m][s], "t0_heldin") for s in raw[m]])
        _expect(rows[name]["held-out"], [np.mean([_col(raw[m][s], b) for b in held_out])
                                         for s in raw[m]])
        for d in DATASETS:
            _expect(rows[name]["datasets"][d], [_score(raw[m][s][d]) for s in raw[m]])
    # Oracle: per seed and dataset the best single expert; best individual: the one expert
    # whose mean (per benchmark; per group of benchmarks for the held means) is best.
    singles = {s: {e: raw[f"single:{e}"][s] for e in EXPERTS} for s in SEEDS}
    for b in BENCH:
        _expect(rows["oracle"]["columns"][b], [
            np.mean([max(_score(singles[s][e][f"{b}/{d}"]) for e in EXPERTS) for d in BENCH[b]])
            for s in SEEDS])
        _expect(rows["best individual"]["columns"][b],
                [max(_col(singles[s][e], b) for e in EXPERTS) for s in SEEDS])
    _expect(rows["best individual"]["held-out"],
            [max(np.mean([_col(singles[s][e], b) for b in held_out]) for e in EXPERTS)
             for s in SEEDS])
    oracle_ho = [np.mean([np.mean([max(_score(singles[s][e][f"{b}/{d}"]) for e in EXPERTS)
                                   for d in BENCH[b]]) for b in held_out]) for s in SEEDS]
    _expect(rows["oracle"]["held-out"], oracle_ho)
    # The markdown carries the same cells as mean ± 95% half-width; the figure is a PNG.
    text = (out / "report.md").read_text()
    c = rows["phatgoose k=2"]["columns"]["bbh"]
    assert f"{c['mean']:.1f} ± {c['ci95']:.1f}" in text
    assert f"| oracle | {paper_table.fmt(rows['oracle']['columns']['t0_heldin'])} |" in text
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # A named row of another base is allowed (the paper's multitask model is another base).
    other = _write_run(tmp_path / "t0_3b", raw["base"][0], method="base", library=None,
                       base="/models/t0_3b")
    assert _main([*dirs, f"multitask={other}", "--out", tmp_path / "rep2"]) == 0
    rows2 = json.loads((tmp_path / "rep2" / "report.json").read_text())["rows"]
    assert list(rows2)[:2] == ["base", "multitask"]


def _refused(capsys, argv, code, words, watch):
    before = tree_hash(*watch)
    assert _main(argv) == code
    line = one_line(capsys.readouterr().err, REPORT)
    for w in words:
        assert w in line, line
    assert tree_hash(*watch) == before
    return line


def test_hostile_inputs_are_one_line_and_write_nothing(runs, tmp_path, capsys):
    dirs, raw = runs
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    watch = (out, *dirs)
    vals = raw["phatgoose"][0]

    def run(name, values, **kw):
        return _write_run(tmp_path / name, values, **{"method": "phatgoose", "library": "/l",
                                                      **kw})

    # Runs of different bases.
    odd = run("odd_base", vals, base="/models/other")
    _refused(capsys, [*dirs, odd, "--out", out], 1, ["base", "/models/other", "NAME=RUN_DIR"],
             watch)
    # One benchmark over different datasets (a run on fewer tasks).
    fewer = run("fewer", {d: v for d, v in vals.items() if d != "bbh/dates"})
    _refused(capsys, [*dirs, fewer, "--out", out], 1, ["benchmark bbh", "bbh/dates"], watch)
    # One row's repeats over different benchmarks.
    part = run("part", {d: v for d, v in vals.items() if not d.startswith("bbh/")},
               library="/libs/seed9")
    _refused(capsys, [*dirs, part, "--out", out], 1, ["phatgoose k=2", "benchmarks"], watch)
    # Single experts of one library over different benchmarks.
    lone = _write_run(tmp_path / "lone", {d: v for d, v in vals.items()
                                          if not d.startswith("bbh/")},
                      method="single", library="/libs/seed0", expert="e9")
    _refused(capsys, [*dirs, lone, "--out", out], 1, ["single", "benchmarks"], watch)
    # The same run twice.
    _refused(capsys, [*dirs, dirs[0], "--out", out], 1, ["same phatgoose k=2 run"], watch)
    # A folder that is not a run, a missing folder, a file.
    (tmp_path / "empty").mkdir()
    _refused(capsys, [dirs[0], tmp_path / "empty", "--out", out], 1, ["not a goose-eval run"],
             watch)
    _refused(capsys, [dirs[0], tmp_path / "nowhere", "--out", out], 1, ["no such directory"],
             watch)
    # A run whose results.json is missing (interrupted), or malformed, or lacks its expert.
    broken = run("broken", vals)
    os.remove(os.path.join(broken, "results.json"))
    _refused(capsys, [dirs[0], broken, "--out", out], 1, ["results.md but no results.json"],
             watch)
    bad = run("bad", vals)
    with open(os.path.join(bad, "results.json"), "w") as f:
        f.write('{"method": "phat')
    _refused(capsys, [dirs[0], bad, "--out", out], 1, ["cannot read"], watch)
    anon = _write_run(tmp_path / "anon", vals, method="single", library="/l")
    _refused(capsys, [dirs[0], anon, "--out", out], 1, ["does not record its expert"], watch)
    # An --out that already holds a report, or is a file; no run at all.
    assert _main([*dirs, "--out", tmp_path / "done"]) == 0
    capsys.readouterr()
    _refused(capsys, [*dirs, "--out", tmp_path / "done"], 1, ["--overwrite"],
             (tmp_path / "done",))
    _refused(capsys, [*dirs, "--out", out / "keep.txt"], 1, ["existing file"], watch)
    _refused(capsys, ["--out", out], 2, ["RUN_DIR"], watch)
    assert sorted(os.listdir(out)) == ["keep.txt"]
