"""`goose-eval` end to end on a tiny random T5, a tiny expert library and BBH fixture files."""

import json
import os

import numpy as np
import pytest
from conftest import tool

main = tool("goose-eval")


def _args(world, out, *extra):
    return ["--base", str(world / "base"), "--byte-tokenizer", "--bbh-root", str(world / "bbh"),
            "--out", str(out), "--no-progress", "--batch-size", "4", *extra]


def test_goose_eval_phatgoose_run(world, tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(_args(world, out, "--library", str(world / "lib"), "--method", "phatgoose",
                        "--top-k", "2", "--tasks",
                        "bbh/boolean_expressions,bbh/object_counting"))
    assert rc == 0
    summary = json.loads((out / "results.json").read_text())
    ds = summary["datasets"]
    assert set(ds) == {"bbh/boolean_expressions", "bbh/object_counting"}
    assert ds["bbh/boolean_expressions"]["examples"] == 4
    assert ds["bbh/object_counting"]["metric"] == "exact_match_any"
    assert summary["method"] == "phatgoose" and summary["experts"] == ["alpha", "beta", "gamma"]
    assert summary["score"] == pytest.approx(np.mean([d["score"] for d in ds.values()]))
    assert summary["examples_per_second"] > 0
    assert summary["devices"] == __import__("jax").device_count()   # batches split over all
    assert "| **bbh (mean of 2)** |" in (out / "results.md").read_text()
    assert "examples/s" in capsys.readouterr().out
    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 7 and {p["dataset"] for p in preds} == set(ds)
    tele = json.loads((out / "telemetry.json").read_text())
    assert tele["experts"] == ["alpha", "beta", "gamma"]
    counts = tele["top1_counts"]["encoder/block_0/self_attn/q"]
    assert set(counts) == set(ds) and all(len(c) == 3 for c in counts.values())
    assert sorted(os.listdir(out / "telemetry")) == ["decoder_block_0.png", "encoder_block_0.png"]


@pytest.mark.parametrize("extra, message, code", [
    (["--tasks", "bbh/navigat"], "unknown task 'bbh/navigat'.*did you mean bbh/navigate", 1),
    (["--tasks", "bbh/navigate"], "navigate: BIG-bench task directory does not exist", 1),
    (["--tasks", "t0_heldout/rte"], "t0_heldout/rte needs its data directory \\(--p3-root\\)",
     1),
    (["--benchmark", "bbx"], "unknown benchmark 'bbx'.*did you mean.*bbh", 1),
    (["--tasks", "bbh/boolean_expressions", "--method", "arrow"], "--method arrow needs --library",
     2),
    (["--tasks", "bbh/boolean_expressions", "--library", "nowhere"], "not an expert library", 1),
    ([], "give --benchmark or --tasks", 2),
])
def test_goose_eval_errors(world, tmp_path, capsys, extra, message, code):
    import re

    assert main(_args(world, tmp_path / "out", *extra)) == code
    err = capsys.readouterr().err.strip()
    assert err.startswith("goose-eval: error:") and "\n" not in err
    assert re.search(message, err), err


def test_out_that_is_a_file_fails_before_any_work(world, tmp_path, capsys):
    """The output check comes first: a missing base and task data are never reached."""
    (tmp_path / "taken").write_text("a file")
    args = ["--base", str(tmp_path / "no_base"), "--tasks", "bbh/nothing", "--out",
            str(tmp_path / "taken")]
    assert main(args) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("goose-eval: error:") and "\n" not in err
    assert "taken: the output path is an existing file" in err, err


def test_example_routing_equals_single_expert(world, tmp_path):
    """--method example with every example mapped to one expert is --method single."""
    (tmp_path / "map.json").write_text(json.dumps({"bbh/boolean_expressions": "beta"}))
    scores = {}
    for method, extra in (("single", ["--expert", "beta"]),
                          ("example", ["--expert-map", str(tmp_path / "map.json")])):
        out = tmp_path / method
        assert main(_args(world, out, "--library", str(world / "lib"), "--method", method,
                              "--tasks", "bbh/boolean_expressions", *extra)) == 0
        lines = (out / "predictions.jsonl").read_text().splitlines()
        scores[method] = [json.loads(line)["scores"] for line in lines]
        assert not (out / "telemetry.json").exists()   # no per-token routing to count
    np.testing.assert_allclose(scores["single"], scores["example"], atol=1e-4)


def test_prototype_file_round_trip_and_bad_file(tmp_path):
    """The ``--prototypes`` file: ``<site>/gate`` tensors back as a nested tree; a file that is
    not safetensors is one clear error."""
    from safetensors.numpy import save_file

    from goose_jax.core.errors import DataError
    from goose_jax.core.trees import flatten_sites
    from goose_jax.library.prototypes import load_prototypes

    gate = np.arange(6, dtype=np.float32).reshape(2, 3)
    save_file({"encoder/block_0/self_attn/q/gate": gate}, str(tmp_path / "p.safetensors"))
    flat = flatten_sites(load_prototypes(str(tmp_path / "p.safetensors")))
    np.testing.assert_array_equal(flat["encoder/block_0/self_attn/q"]["gate"], gate)
    (tmp_path / "bad.safetensors").write_text("not a tensor file")
    with pytest.raises(DataError, match="not a readable safetensors file"):
        load_prototypes(str(tmp_path / "bad.safetensors"))


def test_prototype_file_writer_and_reader_agree(tmp_path):
    from goose_jax.core.trees import flatten_sites, nest_sites
    from goose_jax.library.prototypes import load_prototypes
    from goose_jax.library.store import save_prototypes

    rng = np.random.default_rng(0)
    tree = nest_sites({"encoder/block_0/ffn/wo": {"gate": rng.standard_normal((3, 5))},
                       "decoder/block_1/cross_attn/k": {"gate": rng.standard_normal((3, 4))}})
    save_prototypes(tree, str(tmp_path / "p.safetensors"))
    back = flatten_sites(load_prototypes(str(tmp_path / "p.safetensors")))
    assert set(back) == set(flatten_sites(tree))
    for site, leaf in flatten_sites(tree).items():
        np.testing.assert_array_equal(back[site]["gate"], leaf["gate"])


def test_rerun_into_results_needs_overwrite_and_replaces_them_whole(world, tmp_path, capsys):
    """A second run into a results folder is refused without --overwrite (nothing touched);
    with it, every file is the new run's: a method without telemetry leaves none of the old."""
    out = tmp_path / "run"
    lib = ["--library", str(world / "lib"), "--tasks", "bbh/boolean_expressions"]
    assert main(_args(world, out, *lib, "--method", "arrow")) == 0
    assert (out / "telemetry.json").is_file()
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    capsys.readouterr()
    single = [*lib, "--method", "single", "--expert", "beta"]
    assert main(_args(world, out, *single)) == 1
    assert "already holds results" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert main(_args(world, out, *single, "--overwrite")) == 0
    assert json.loads((out / "results.json").read_text())["method"] == "single"
    assert sorted(p.name for p in out.iterdir()) == ["predictions.jsonl", "results.json",
                                                     "results.md"]


def test_arrow_temperature_flag(world, tmp_path, capsys):
    """--arrow-temperature reaches the routers (the choice scores change) and the results;
    1 is the default; anything but a number > 0 or 'release' is a usage error."""
    scores = {}
    for name, extra in (("default", []), ("release", ["--arrow-temperature", "release"]),
                        ("one", ["--arrow-temperature", "1"])):
        out = tmp_path / name
        assert main(_args(world, out, "--library", str(world / "lib"), "--method", "arrow",
                          "--tasks", "bbh/boolean_expressions", *extra)) == 0
        summary = json.loads((out / "results.json").read_text())
        scores[name] = [json.loads(x)["scores"] for x in
                        (out / "predictions.jsonl").read_text().splitlines()]
        assert summary["arrow_temperature"] == ("release" if name == "release" else 1.0)
    np.testing.assert_array_equal(scores["default"], scores["one"])
    assert not np.allclose(scores["release"], scores["one"], atol=1e-4)
    capsys.readouterr()
    for bad in ("0", "-2", "nan", "hot"):
        assert main(_args(world, tmp_path / "bad", "--library", str(world / "lib"), "--method",
                          "arrow", "--tasks", "bbh/boolean_expressions",
                          "--arrow-temperature", bad)) == 2
        err = capsys.readouterr().err.strip()
        assert "--arrow-temperature" in err and "'release'" in err and "\n" not in err, err
    assert not (tmp_path / "bad").exists()
