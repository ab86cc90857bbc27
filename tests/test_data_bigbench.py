"""``goose-data bigbench``: the BBH and BBL roots from tiny tasksource/bigbench and lukaemon/bbh
datasets built here (``save_to_disk`` and Hub-snapshot parquet), under the release's task names
(colm/datasets/bigbench.gin), read back by goose-eval's reader; a malformed row is refused in
one line and nothing is written."""

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import one_line, tool, tree_hash

from goose_jax.data import bigbench

main = tool("goose-data")
LUKAEMON_TASKS = ("boolean_expressions", "multistep_arithmetic_two", "web_of_lies")


def _tasksource_names():
    names = {bigbench.RELEASE_NAMES.get(t, t) for t in bigbench.BBH_TASKS
             if t not in LUKAEMON_TASKS}
    return sorted(names | set(bigbench.BBL_TASKS))


def _row(task, i):
    if bigbench.task_kind(task)[0] == "generate":
        return {"idx": i, "inputs": f"{task} {i}?", "targets": [f"t{i}", "other"],
                "multiple_choice_targets": [], "multiple_choice_scores": []}
    return {"idx": i, "inputs": f"{task} {i}?", "targets": ["yes"],
            "multiple_choice_targets": ["yes", "no"], "multiple_choice_scores": [1, 0]}


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    from datasets import Dataset, DatasetDict

    root = tmp_path_factory.mktemp("bbsrc")
    ts, lk = root / "tasksource", root / "lukaemon"
    for k, name in enumerate(_tasksource_names()):
        folder = ts / name
        task = "formal_fallacies" if name == "formal_fallacies_syllogisms_negation" else name
        train, val = [_row(task, 0), _row(task, 1)], [_row(task, 2)]
        if k < 2:   # a couple saved with save_to_disk, the rest as the Hub's parquet files
            DatasetDict({"train": Dataset.from_list(train),
                         "validation": Dataset.from_list(val)}).save_to_disk(str(folder))
            continue
        folder.mkdir(parents=True)
        for split, rows in (("train", train), ("validation", val)):
            pq.write_table(pa.Table.from_pylist(rows), folder / f"{split}-00000-of-00001.parquet")
    for task in LUKAEMON_TASKS:
        rows = [{"input": f"{task} {i}", "target": t} for i, t in
                enumerate(["True", "False"] if task == "boolean_expressions" else
                          ["Yes", "No"] if task == "web_of_lies" else ["12", "-3"])]
        DatasetDict({"test": Dataset.from_list(rows)}).save_to_disk(str(lk / task))
    return str(ts), str(lk)


def test_writes_both_roots_under_the_release_names(sources, tmp_path, capsys):
    out = tmp_path / "bb"
    assert main(["bigbench", *sources, str(out)]) == 0
    printed = capsys.readouterr().out
    assert "bbh/formal_fallacies: 3 rows from tasksource/bigbench " \
           "formal_fallacies_syllogisms_negation (train+validation)" in printed
    assert sorted(os.listdir(out / "bbh")) == sorted(
        bigbench.RELEASE_NAMES.get(t, t) for t in bigbench.BBH_TASKS)
    assert sorted(os.listdir(out / "bbl")) == sorted(bigbench.BBL_TASKS)
    # goose-eval's reader: tasksource rows, train then validation; lukaemon's test split.
    ff = bigbench.examples(str(out / "bbh"), "formal_fallacies")
    assert [e.input for e in ff] == [f"formal_fallacies {i}?\nAnswer:" for i in range(3)]
    assert [e.answers for e in ff] == [(0,)] * 3
    ops = bigbench.examples(str(out / "bbl"), "operators")
    assert [e.references for e in ops] == [("t0",), ("t1",), ("t2",)]   # targets[0]
    boolean = bigbench.examples(str(out / "bbh"), "boolean_expressions")
    assert [e.answers for e in boolean] == [(0,), (1,)]
    arithmetic = bigbench.examples(str(out / "bbh"), "multistep_arithmetic_two")
    assert [e.references for e in arithmetic] == [("12",), ("-3",)]


@pytest.mark.parametrize("bad,why", [
    ({"inputs": "q", "targets": [], "multiple_choice_targets": ["a"],
      "multiple_choice_scores": [1]}, "target"),
    ({"inputs": "", "targets": ["a"], "multiple_choice_targets": ["a"],
      "multiple_choice_scores": [1]}, "input"),
    ({"inputs": "q", "targets": ["z"], "multiple_choice_targets": ["a", "b"],
      "multiple_choice_scores": [0, 0]}, "no answer choice matches"),
])
def test_a_malformed_row_is_refused_and_nothing_is_written(sources, tmp_path, capsys, bad, why):
    import shutil

    ts = tmp_path / "ts"
    shutil.copytree(sources[0], ts)
    folder = ts / "winowhy"
    rows = [_row("winowhy", 0), {"idx": 1, **bad}]
    for f in folder.iterdir():
        f.unlink()
    pq.write_table(pa.Table.from_pylist(rows), folder / "train-00000-of-00001.parquet")
    pq.write_table(pa.Table.from_pylist(rows[:1]), folder / "validation-00000-of-00001.parquet")
    before = tree_hash(tmp_path)
    out = tmp_path / "bb"
    assert main(["bigbench", str(ts), sources[1], str(out)]) == 1
    line = one_line(capsys.readouterr().err, "goose-data")
    assert "winowhy" in line and "row 1" in line and why in line, line
    assert not out.exists() and tree_hash(tmp_path) == before


def test_goose_eval_refuses_a_malformed_row_too(tmp_path, capsys):
    """The same check where goose-eval reads a BIG-bench root (it used to drop such a row from
    the score and exit 0)."""
    folder = tmp_path / "bbl" / "winowhy"
    folder.mkdir(parents=True)
    rows = [_row("winowhy", 0), {**_row("winowhy", 1), "multiple_choice_scores": [0, 0],
                                 "targets": ["maybe"]}]
    pq.write_table(pa.Table.from_pylist(rows), folder / "train_validation-00000-of-00001.parquet")
    out = tmp_path / "out"
    code = tool("goose-eval")(["--base", "random:tiny", "--byte-tokenizer", "--tasks",
                               "bbl/winowhy", "--bbl-root", str(tmp_path / "bbl"),
                               "--out", str(out), "--no-progress"])
    line = one_line(capsys.readouterr().err, "goose-eval")
    assert code == 1 and "winowhy" in line and "row 1" in line, line
    assert not out.exists() or not any(out.iterdir())


def test_an_out_dir_inside_a_source_is_refused_before_anything_is_written(sources, tmp_path,
                                                                           capsys):
    import shutil

    ts = tmp_path / "ts"
    shutil.copytree(sources[0], ts)
    before = tree_hash(tmp_path)
    assert main(["bigbench", str(ts), sources[1], str(ts / "bb"), "--overwrite"]) == 1
    line = one_line(capsys.readouterr().err, "goose-data")
    assert "TASKSOURCE_DIR" in line and "OUT_DIR" in line, line
    assert tree_hash(tmp_path) == before
