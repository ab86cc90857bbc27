"""The whole miniature-world pipeline at smoke size: every stage, every method, the artefacts."""

import json
import os

import numpy as np
import pytest
from conftest import tool

from goose_jax import demo
from goose_jax.data import world

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

    from goose_jax.library import ExpertLibrary

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
