"""The card's eval/ scripts run from a checkout on the tiny goose-eval fixtures."""

import json

from conftest import script
from test_eval_cli import _args


def test_paper_runs_every_method_the_library_supports(world, tmp_path, capsys, monkeypatch):
    from goose_jax.pipeline import zeroshot

    reads = []
    load_tasks = zeroshot.load_tasks
    monkeypatch.setattr(zeroshot, "load_tasks", lambda s: reads.append(s) or load_tasks(s))
    main = script("eval/paper.py")
    out = tmp_path / "paper"
    args = _args(world, out, "--library", str(world / "lib"), "--tasks", "bbh/boolean_expressions")
    assert main(args) == 0
    # The fixture library has gates, no prototypes and no retrieval index.
    methods = ["base", "phatgoose", "merged", "arrow"]
    summaries = json.loads((out / "comparison.json").read_text())
    assert list(summaries) == methods
    assert len(reads) == 1   # the benchmark's data is read once, not once per method
    for m in methods:
        run = json.loads((out / m / "results.json").read_text())
        assert run["method"] == m and run["datasets"]["bbh/boolean_expressions"]["examples"] == 4
        assert run == summaries[m]
    assert summaries["phatgoose"]["top_k"] == 2
    table = (out / "comparison.md").read_text()
    assert table.startswith("| dataset | base | phatgoose | merged | arrow |")
    assert "| bbh/boolean_expressions |" in table
    assert "| **bbh (mean)** |" in table
    capsys.readouterr()
    assert main([*args, "--methods", "retrieval"]) == 2   # not supported by this library
    assert "not among the methods" in capsys.readouterr().err
