"""The release's FLAN pool (goose_jax/assets/flan_pool.json, goose_jax.data.flan_pool): the table
itself, the NIv2 grouping read from natural-instructions task files, the refusals (a task with no
group, FLAN fields that are not strings), and a small build of every source kind checked against
plain-Python transcriptions of the release's rules."""

import json
import os

import numpy as np
import pytest
from conftest import script, tool, tree_hash

from goose_jax.core import errors
from goose_jax.data import flan_pool, p3
from goose_jax.data.synthetic import write_flan_release, write_niv2_tasks, write_p3

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _lines(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


# --- the table ----------------------------------------------------------------------------------


def test_the_table_is_the_release_list():
    from goose_jax.interop.release import RELEASE_EXPERT_SETS

    pool = flan_pool.release_pool()
    names = [e.name for e in pool]
    assert len(names) == len(set(names)) == 166
    # The same order as the checkpoint importer's own transcription of the release's lists.
    assert names == list(RELEASE_EXPERT_SETS["Full"])
    assert {e.kind for e in pool} == {"p3", "flan2021", "niv2", "dialog"}
    count = {k: sum(e.kind == k for e in pool) for k in flan_pool.KINDS}
    assert count == {"p3": 43, "flan2021": 44, "niv2": 75, "dialog": 4}
    for group in ("P3", "Flanv2", "Niv2", "Add1"):
        assert [e.name for e in pool if e.group == group] == list(RELEASE_EXPERT_SETS[group])
    # The 36 T0 held-in experts are goose-data p3-heldin's datasets, in its order; the other
    # seven P3 datasets are the ones the pool builds from P3 folders itself.
    heldin = [e.p3_heldin for e in pool if e.p3_heldin]
    assert heldin == list(p3.T0_HELDIN)
    assert {e.source for e in pool if e.kind == "p3" and not e.p3_heldin} == set(
        flan_pool.OTHER_P3)
    sources = {e.source for e in pool if e.kind == "niv2"}
    assert len(sources) == 75 and {"Translation", "Misc.", "Fill in The Blank"} <= sources
    with open(os.path.join(ROOT, "setup.py")) as f:
        assert "assets/flan_pool.json" in f.read()
    with open(flan_pool.POOL_FILE) as f:
        assert "scripts/concatenate.py" in json.load(f)["note"]


# --- NIv2 categories ----------------------------------------------------------------------------


def test_niv2_grouping_is_the_task_files_categories(tmp_path):
    cats = {"task001_a": ["Translation"], "task002_b": ["Fill in The Blank"],
            "task003_c": ["Translation"], "task1385_d": ["Misc."]}
    write_niv2_tasks(tmp_path / "tasks", cats)
    # Transcription: the expert of a category is "Niv2zs" + the category without spaces,
    # capitalised as the release spells its names, "Misc." without its dot.
    expected = {"task001_a": "Niv2zsTranslation", "task002_b": "Niv2zsFillintheblank",
                "task003_c": "Niv2zsTranslation", "task1385_d": "Niv2zsMisc"}
    got = flan_pool.niv2_grouping(cats, tmp_path / "tasks", flan_pool.release_pool())
    assert got == expected


@pytest.fixture
def small_release(tmp_path):
    """Open-Orca/FLAN rows (a Flan 2021 task, two NIv2 tasks, a CoT task) and their task files."""
    write_flan_release(tmp_path / "flan", examples=20)
    write_niv2_tasks(tmp_path / "tasks", {"task001_copy_word": ["Misc."],
                                          "task002_upper_case": ["Misc."]})
    return tmp_path


def _refused(argv, tmp_path, capsys, code, words):
    before = tree_hash(tmp_path)
    assert tool("goose-data")(argv) == code
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for w in words:
        assert w in err, (w, err)
    assert tree_hash(tmp_path) == before      # nothing written, no staging folder left
    return err


def test_a_task_without_a_group_is_refused(small_release, capsys):
    tmp = small_release
    # One NIv2 task loses its file, the other names a category no expert has.
    os.remove(tmp / "tasks" / "task001_copy_word.json")
    write_niv2_tasks(tmp / "tasks", {"task002_upper_case": ["Poetry Appreciation"]})
    out = str(tmp / "out")
    _refused(["flan", str(tmp / "flan"), out, "--pool", "release", "--niv2-tasks",
              str(tmp / "tasks"), "--datasets", "Niv2zsMisc"], tmp, capsys, errors.USER_ERROR,
             ["2 NIv2 task(s)", "task001_copy_word (no task file)",
              "task002_upper_case (category 'Poetry Appreciation')"])
    # The task-name pool: a grouping that lacks tasks names them all.
    grouping = tmp / "grouping.json"
    grouping.write_text(json.dumps({"task001_copy_word": "niv2_misc"}))
    _refused(["flan", str(tmp / "flan"), out, "--grouping", str(grouping)], tmp, capsys,
             errors.USER_ERROR, ["3 task(s)", "cot_reverse, glue/sst2:2.0.0, task002_upper_case"])
    # Without the NIv2 tasks folder the pool's NIv2 experts cannot be grouped.
    _refused(["flan", str(tmp / "flan"), out, "--pool", "release", "--datasets", "Niv2zsMisc"],
             tmp, capsys, errors.USAGE, ["--niv2-tasks"])


def test_train_flan_refuses_a_task_without_a_group(small_release, tmp_path, capsys):
    tmp = small_release
    os.remove(tmp / "tasks" / "task002_upper_case.json")
    # Rows of every Flan 2021 and Dialog task of the pool, so that only the group is missing.
    with open(tmp / "flan" / "pool_tasks.jsonl", "w") as f:
        for e in flan_pool.release_pool():
            if e.kind in ("flan2021", "dialog"):
                f.write(json.dumps({"inputs": "i", "targets": "t", "_task_name": e.source,
                                    "_template_type": "zs_opt"}) + "\n")
    for name in ("base", "bbh", "bbl"):
        (tmp / name).mkdir()
    main = script("train/flan.py")
    work = tmp / "work"
    code = main(["--flan-dir", str(tmp / "flan"), "--niv2-tasks", str(tmp / "tasks"),
                 "--p3-dir", str(tmp / "p3"), "--base", str(tmp / "base"),
                 "--bbh-root", str(tmp / "bbh"), "--bbl-root", str(tmp / "bbl"),
                 "--workdir", str(work)])
    err = capsys.readouterr().err.strip()
    assert code == errors.USER_ERROR
    assert len(err.splitlines()) == 1 and "task002_upper_case (no task file)" in err, err
    assert tree_hash(work) == {}              # no data, no checkpoint


def test_non_string_flan_fields_are_one_line(tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    good = {"inputs": "x", "targets": "y", "_task_name": "t", "_template_type": "zs_opt"}
    cases = {"list_task": {**good, "_task_name": ["t"]}, "dict_input": {**good, "inputs": {"a": 1}},
             "int_target": {**good, "targets": 3}, "null_type": {**good, "_template_type": None}}
    for name, row in cases.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "rows.jsonl").write_text(json.dumps(good) + "\n" + json.dumps(row)
                                                    + "\n")
    (tmp_path / "int_column").mkdir()
    pq.write_table(pa.table({"inputs": ["x"], "targets": ["y"], "_task_name": [3],
                             "_template_type": ["zs_opt"]}),
                   tmp_path / "int_column" / "part.0.parquet")
    words = {"list_task": "'_task_name' is list", "dict_input": "'inputs' is dict",
             "int_target": "'targets' is int", "null_type": "'_template_type' is NoneType",
             "int_column": "'_task_name' holds int64"}
    for name, word in words.items():
        err = _refused(["flan", str(tmp_path / name), str(tmp_path / "out")], tmp_path, capsys,
                       errors.USER_ERROR, [word, "expected"])
        assert name in err


# --- a build of every source kind ---------------------------------------------------------------


def _ag(template, split, n):
    choices = ["World", "Sports", "Business", "Science"]
    return [{"inputs_pretokenized": f"{template} {split} {i}?",
             "targets_pretokenized": choices[i % 4], "answer_choices": choices}
            for i in range(n)]


def _copa(template, split, n):
    return [{"inputs_pretokenized": f"{template} {split} {i}: cause or effect?",
             "targets_pretokenized": f"b{i}", "answer_choices": [f"a{i}", f"b{i}"]}
            for i in range(n)]


def test_release_pool_build_follows_each_source(small_release, capsys):
    tmp = small_release
    p3_root = str(tmp / "p3")
    for t in ("classify", "which_section"):
        write_p3(p3_root, f"ag_news_{t}", "train", _ag(t, "train", 5))
        write_p3(p3_root, f"ag_news_{t}", "test", _ag(t, "test", 2))
    # COPA: one kept template and one the release ignores in validation.
    for t in ("best_option", "_As_a_result_C1_or_C2_"):
        write_p3(p3_root, f"super_glue_copa_{t}", "train", _copa(t, "train", 3))
        write_p3(p3_root, f"super_glue_copa_{t}", "validation", _copa(t, "val", 2))
    flan_rows = _lines(tmp / "flan" / "flan_zs.jsonl")
    # Dialog: a qrecc task beside the release's rows.
    with open(tmp / "flan" / "dialog.jsonl", "w") as f:
        for i in range(12):
            f.write(json.dumps({"inputs": f"turn {i}", "targets": f"reply {i}",
                                "_task_name": "qrecc", "_template_type": "zs_opt"}) + "\n")
    experts = ["P3Agnews", "Flanv2zsGluesst2", "Niv2zsMisc", "P3Copa", "Flanv2zsQrecc"]
    out = tmp / "out"
    assert tool("goose-data")(["flan", str(tmp / "flan"), str(out), "--pool", "release",
                               "--p3-dir", p3_root, "--niv2-tasks", str(tmp / "tasks"),
                               "--datasets", ",".join(experts), "--max-examples", "5"]) == 0
    capsys.readouterr()
    summary = json.loads((out / "summary.json").read_text())
    # The release's order, whatever order --datasets gives.
    assert list(summary["experts"]) == ["P3Agnews", "Flanv2zsGluesst2", "Niv2zsMisc", "P3Copa",
                                        "Flanv2zsQrecc"]
    assert sorted(os.listdir(out)) == ["summary.json", "train", "validation"]

    # FLAN: zero-shot rows of the expert's tasks (NIv2: both tasks of the category, CoT
    # nowhere), in file order; RandomState(1234) shuffle; first 10% validation, then at most 5.
    def flan_split(rows):
        order = np.random.RandomState(1234).permutation(len(rows))
        n_val = min(int(0.1 * len(rows)), 10_000)
        return [rows[i] for i in order[n_val:n_val + 5]], [rows[i] for i in order[:n_val]]

    def zs(tasks, rows):
        return [(r["inputs"], r["targets"], r["_template_type"]) for r in rows
                if r["_task_name"] in tasks and r["_template_type"] in ("zs_opt", "zs_noopt")]

    dialog = _lines(tmp / "flan" / "dialog.jsonl")
    for name, tasks, rows in (("Flanv2zsGluesst2", {"glue/sst2:2.0.0"}, flan_rows),
                              ("Niv2zsMisc", {"task001_copy_word", "task002_upper_case"},
                               flan_rows),
                              ("Flanv2zsQrecc", {"qrecc"}, dialog)):
        train, val = flan_split(zs(tasks, rows))
        for split, want in (("train", train), ("validation", val)):
            got = [(r["input"], r["target"], r["template"])
                   for r in _lines(out / split / f"{name}.jsonl")]
            assert got == want, (name, split)

    # P3 held-in: the very files goose-data p3-heldin writes for ag_news.
    ref = tmp / "ref"
    assert tool("goose-data")(["p3-heldin", p3_root, str(ref), "--datasets", "ag_news",
                               "--max-examples", "5"]) == 0
    capsys.readouterr()
    for split in ("train", "validation"):
        assert _lines(out / split / "P3Agnews.jsonl") == _lines(ref / split / "ag_news.jsonl")

    # COPA from P3's folders: every (example, template) pair example-major, 5 of the 6 drawn
    # with default_rng(42); validation every pair of the kept template (no round robin).
    tmpl = ["_As_a_result_C1_or_C2_", "best_option"]          # folder-name order
    pairs = [(e, t) for e in range(3) for t in range(2)]
    picked = [pairs[k] for k in np.random.default_rng(42).choice(6, 5, replace=False)]
    want = [(f"{tmpl[t]} train {e}: cause or effect?", f"b{e}", tmpl[t]) for e, t in picked]
    got = [(r["input"], r["target"], r["template"]) for r in _lines(out / "train" / "P3Copa.jsonl")]
    assert got == want
    val = _lines(out / "validation" / "P3Copa.jsonl")
    assert [(r["input"], r["choices"]) for r in val] == [
        (f"best_option val {e}: cause or effect?", [f"a{e}", f"b{e}"]) for e in range(2)]
