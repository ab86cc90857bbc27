"""The whole miniature-world pipeline at smoke size: every stage, every method, the artefacts."""

import json
import os

import numpy as np
import pytest
from conftest import tool

from goose_jax.data import world
from goose_jax.pipeline import demo

main = tool("goose-demo")

METHODS = ("base", "multitask", "merged", "average_activation", "arrow", "retrieval",
           "phatgoose_k1", "phatgoose_k2", "oracle", "best_individual")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert main(["--preset", "small", "--out", str(out), "--seed", "1"]) == 0
    return out


@pytest.mark.slow
def test_smoke_pipeline_artefacts(smoke, capsys):
    with open(smoke / "results.json") as f:
        res = json.load(f)
    tasks = [t.name for t in world.HELDIN + world.HELDOUT]
    assert set(res["scores"]) == set(METHODS)
    for method in METHODS:
        assert sorted(res["scores"][method]) == sorted(tasks), method
        assert all(0 <= v <= 100 for v in res["scores"][method].values())
    singles = [json.load(open(smoke / "work" / "small_seed1" / "eval" / f"expert_{n}.json"))
               for n in res["own_task"]]
    for t in tasks:  # the oracle is the best single expert per task
        assert res["scores"]["oracle"][t] == max(s["scores"][t] for s in singles)
    text = (smoke / "results.md").read_text()
    for method in METHODS:
        assert f"| {method} |" in text
    pngs = sorted(os.listdir(smoke / "heatmaps"))
    cfg, params = demo.load_world_base()
    assert len(pngs) == cfg.num_encoder_layers + cfg.num_decoder_layers

    from goose_jax.library.store import ExpertLibrary

    lib = ExpertLibrary.open(res["library"], cfg, params)
    assert lib.names == [t.name for t in world.HELDIN]
    experts, gates = lib.load()
    assert gates is not None

    # Routing telemetry: per-token top-1 agreement with the task's own expert, above chance.
    chance = 1 / len(world.HELDIN)
    for method in ("phatgoose_k2", "average_activation"):
        per_site = res["agreement_per_site"][method]
        assert len(per_site) == len(lib.sites)
        assert np.mean(list(per_site.values())) > chance + 0.1, (method, per_site)

    # A rerun reuses every stage.
    capsys.readouterr()
    assert main(["--preset", "small", "--out", str(smoke), "--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert "reusing" in out
    with open(smoke / "results.json") as f:
        again = json.load(f)
    assert again["scores"] == res["scores"]


def test_agreement_counts():
    names = ["a", "b"]
    telemetry = {"encoder/block_0/self_attn/q": {"world/a": [3, 1], "world/b": [2, 2],
                                                 "world/heldout_x": [0, 9]}}
    assert demo.agreement(telemetry, names) == {"encoder/block_0/self_attn/q": 5 / 8}


def test_missing_base_is_a_clear_error(tmp_path, capsys):
    assert main(["--preset", "small", "--out", str(tmp_path / "o"),
                      "--base", str(tmp_path / "nowhere")]) == 1
    assert "the miniature base is missing" in capsys.readouterr().err


def _fake_seed(seed, rng):
    """A seed's demo summary (results.json) with random scores."""
    tasks = [t.name for t in world.HELDIN + world.HELDOUT]
    names = [t.name for t in world.HELDIN]

    def scores():
        return {t: float(rng.integers(0, 65)) * 100 / 64 for t in tasks}

    methods = ("base", "multitask", "merged", "average_activation", "arrow", "retrieval",
               "phatgoose_k1", "phatgoose_k2")
    experts = {n: scores() for n in names}
    agreement = {m: {"mean": float(rng.random()), "by_layer": {"encoder/block_0": float(
        rng.random()), "decoder/block_0": float(rng.random())}} for m in ("phatgoose_k2",)}
    return {"seed": seed, "scores": {m: scores() for m in methods}, "experts": experts,
            "own_task": {n: experts[n][n] for n in names}, "agreement": agreement,
            "seconds": 1.0}


def test_several_seeds_are_reported_as_mean_and_interval(tmp_path):
    from goose_jax.pipeline.demo_seeds import report_seeds

    rng = np.random.default_rng(0)
    seeds = [_fake_seed(s, rng) for s in (0, 4, 7)]
    out = report_seeds(seeds, str(tmp_path), "small")
    heldin = [t.name for t in world.HELDIN]
    heldout = [t.name for t in world.HELDOUT]

    def check(cell, values):
        np.testing.assert_allclose([cell["mean"], cell["min"], cell["max"]],
                                   [np.mean(values), np.min(values), np.max(values)])
        assert cell["n"] == len(values)

    rows = out["table"]["rows"]
    for method, row in (("phatgoose_k2", "phatgoose k=2"), ("merged", "merged"),
                        ("arrow", "arrow k=2")):
        for group, tasks in (("held-in", heldin), ("held-out", heldout)):
            check(rows[row][group], [np.mean([s["scores"][method][t] for t in tasks])
                                     for s in seeds])
        check(rows[row]["datasets"]["world/food_label"],
              [s["scores"][method]["food_label"] for s in seeds])
    for group, tasks in (("held-in", heldin), ("held-out", heldout)):
        check(rows["oracle"][group], [np.mean([max(e[t] for e in s["experts"].values())
                                               for t in tasks]) for s in seeds])
        check(rows["best individual"][group], [max(np.mean([e[t] for t in tasks])
                                                   for e in s["experts"].values())
                                               for s in seeds])
    check(out["own_task"]["animals_any"]["own task"],
          [s["experts"]["animals_any"]["animals_any"] for s in seeds])
    check(out["agreement"]["phatgoose_k2"]["by_layer"]["decoder/block_0"],
          [s["agreement"]["phatgoose_k2"]["by_layer"]["decoder/block_0"] for s in seeds])
    text = (tmp_path / "results.md").read_text()
    c = rows["phatgoose k=2"]["held-out"]
    assert f"{c['mean']:.1f} ± {c['ci95']:.1f}" in text
    assert json.loads((tmp_path / "results.json").read_text())["seeds"] == [0, 4, 7]
    # Paired by seed against a plain loop: PHATGOOSE k=2 minus Arrow on the held-out mean, and
    # on the composition task, with Student's t interval from scipy.
    from scipy import stats

    comp = next(t.name for t in world.HELDOUT if t.kind_of_heldout == "composition")
    for key, of in (("held-out", lambda sc: np.mean([sc[t] for t in heldout])),
                    ("composition", lambda sc: sc[comp])):
        d = [of(s["scores"]["phatgoose_k2"]) - of(s["scores"]["arrow"]) for s in seeds]
        got = out["paired"]["differences"]["arrow"][key]
        lo, hi = stats.t.interval(0.95, len(d) - 1, loc=np.mean(d), scale=stats.sem(d))
        np.testing.assert_allclose([got["mean"] - got["ci95"], got["mean"] + got["ci95"]],
                                   [lo, hi], rtol=1e-4)
        assert got["ahead"] == sum(x > 0 for x in d)
        zs = [m for m in seeds[0]["scores"] if m not in ("oracle", "best_individual")]
        assert out["paired"]["ranks"][key] == [
            1 + sum(of(s["scores"][m]) > of(s["scores"]["phatgoose_k2"]) for m in zs)
            for s in seeds]
    assert "## PHATGOOSE k=2 against each zero-shot method, paired by seed" in text
    assert (tmp_path / "results.png").read_bytes()[:4] == b"\x89PNG"


def test_seeds_flag(tmp_path, capsys):
    assert main(["--seeds", "0,x", "--out", str(tmp_path / "o")]) == 2
    assert "comma-separated seeds" in capsys.readouterr().err
    assert main(["--seeds", "1,1", "--out", str(tmp_path / "o")]) == 2
    assert "distinct" in capsys.readouterr().err
    assert main(["--seeds", "1,2", "--seed", "3", "--out", str(tmp_path / "o")]) == 2
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_goose_eval_world_on_the_demo_library(smoke, tmp_path):
    """goose-eval --benchmark world on the library the demo wrote scores every world task on
    the demo's test examples of that seed, as the demo's own evaluation path does."""
    from goose_jax.library.store import ExpertLibrary
    from goose_jax.pipeline.zeroshot import cap_examples
    from goose_jax.routing.methods import build_routed

    lib_path = smoke / "library_small_seed1"
    out = tmp_path / "pg"
    assert tool("goose-eval")(["--base", demo.ASSET, "--library", str(lib_path), "--method",
                               "phatgoose", "--top-k", "2", "--benchmark", "world",
                               "--world-seed", "1", "--max-examples", "1", "--no-progress",
                               "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["world_seed"] == 1
    tasks = world.eval_tasks(split="test", seed=1)
    assert sorted(res["datasets"]) == sorted(t.name for t in tasks)
    # The same examples: the first of each template among the seed's test examples.
    examples = {t.name: cap_examples([world.make_example(t.name.removeprefix("world/"), "test",
                                                         i, 1) for i in range(64)], 1)
                for t in tasks}
    preds = [json.loads(line) for line in open(out / "predictions.jsonl")]
    assert sorted((p["dataset"], p["id"]) for p in preds) == sorted(
        (e.dataset, e.example_id) for v in examples.values() for e in v)
    # The demo's evaluation path over those examples gives the same scores.
    cfg, params = demo.load_world_base()
    lib = ExpertLibrary.open(str(lib_path), cfg, params)
    experts, gates = lib.load()
    routed = build_routed("phatgoose", cfg, experts, gates=gates, top_k=2, scale=lib.scale)
    ref = demo._evaluate("pg", cfg, params, world.WorldTokenizer(), routed, tasks, examples,
                         str(tmp_path / "ref.json"))
    for name, d in res["datasets"].items():
        assert d["score"] == pytest.approx(ref["scores"][name.removeprefix("world/")]), name
