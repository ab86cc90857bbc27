"""goose-data on fixture files in the releases' own formats: one test per rule of the original
release's training sets (P3 TFRecords with the P3 feature names; FLAN parquet and jsonl)."""

import json
import os

import numpy as np
import pytest
from conftest import tool

from goose_jax.data import build_p3
from goose_jax.data.synthetic import write_p3

AG_CHOICES = ["World", "Sports", "Business", "Science"]


def _ag(template, n, split):
    return [{"inputs_pretokenized": f"{template} {split} news {i}?",
             "targets_pretokenized": AG_CHOICES[i % 4], "answer_choices": AG_CHOICES}
            for i in range(n)]


def _trec(root, split, rows):
    """The two P3 trec folders the 50-way template is rebuilt from: (question, fine name as
    promptsource spells it, coarse name)."""
    coarse = ["Description", "Entity", "Abbreviation", "Person", "Quantity", "Location"]
    write_p3(root, "trec_fine_grained_open", split, [
        {"inputs_pretokenized": f"What is this question asking for?\n\n{q}",
         "targets_pretokenized": fine} for q, fine, _ in rows])
    write_p3(root, "trec_pick_the_best_descriptor", split, [
        {"inputs_pretokenized": f"Question: {q}\n\nDescriptors: {', '.join(coarse)}\n\n"
                                "Best Descriptor?",
         "targets_pretokenized": c, "answer_choices": coarse} for q, _, c in rows])


TREC_TRAIN = [("Who was Lincoln ?", "Individual", "Person"),
              ("What is the other name for a cat ?", "Other", "Entity"),
              ("Where is the other side ?", "Other", "Location"),
              ("What is a nanometre ?", "Defintion", "Description"),
              ("Who are the Beatles ?", "Description", "Person")]
TREC_TEST = [("How far is the moon ?", "Distance", "Quantity")]
APP_TEMPLATES = ("categorize_rating_using_review", "convert_to_rating", "convert_to_star_rating",
                 "generate_review")


@pytest.fixture(scope="module")
def p3_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("p3_heldin"))
    # ag_news: two ranked templates (5 / 4 train records: P3 leaves out what a template cannot
    # render) and one generation template; test split for validation.
    write_p3(root, "ag_news_classify", "train", _ag("classify", 5, "train"))
    write_p3(root, "ag_news_classify", "test", _ag("classify", 3, "test"))
    write_p3(root, "ag_news_which_section", "train", _ag("which_section", 4, "train"))
    write_p3(root, "ag_news_which_section", "test", _ag("which_section", 3, "test"))
    write_p3(root, "ag_news_recommend_title", "train", [
        {"inputs_pretokenized": f"title for {i}", "targets_pretokenized": ""} for i in range(2)])
    write_p3(root, "ag_news_recommend_title", "test", [
        {"inputs_pretokenized": "title for t", "targets_pretokenized": "T"}])
    # paws and wiki_qa: a template the release ignores beside one it keeps.
    for folder in ("paws_labeled_final_Meaning", "paws_labeled_final_paraphrase_task",
                   "wiki_qa_Is_This_True_", "wiki_qa_Topic_Prediction_Answer_Only",
                   "wiki_qa_Jeopardy_style"):
        for split in ("train", "validation"):
            write_p3(root, folder, split, [{"inputs_pretokenized": f"{folder} {split} {i}",
                                            "targets_pretokenized": "Yes",
                                            "answer_choices": ["No", "Yes"]} for i in range(2)])
    _trec(root, "train", TREC_TRAIN)
    _trec(root, "test", TREC_TEST)
    # app_reviews: a train split only, every template on every review.
    for t in APP_TEMPLATES:
        write_p3(root, f"app_reviews_{t}", "train", [
            {"inputs_pretokenized": f"{t} review {i}", "targets_pretokenized": str(i % 5 + 1),
             **({"answer_choices": ["1", "2", "3", "4", "5"]} if t.startswith("cat") else {})}
            for i in range(7)])
    return root


def _build(argv, tmp_path, name="out"):
    out = tmp_path / name
    assert tool("goose-data")([*argv[:2], str(out), *argv[2:]]) == 0
    return out


def _lines(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def test_every_template_and_round_robin_validation(p3_root, tmp_path, capsys):
    out = _build(["p3-heldin", p3_root, "--datasets", "ag_news"], tmp_path)
    train = _lines(out / "train" / "ag_news.jsonl")
    # Every (example, template) pair, example-major, templates in folder order; the empty
    # target becomes <NO LABEL>.
    want = []
    for e in range(5):
        for t, n in (("classify", 5), ("recommend_title", 2), ("which_section", 4)):
            if e < n:
                want.append((t, e))
    got = [(r["template"], r["input"]) for r in train]
    assert got == [(t, (f"{t} train news {e}?" if t != "recommend_title" else f"title for {e}"))
                   for t, e in want]
    assert [r["target"] for r in train if r["template"] == "recommend_title"] == ["<NO LABEL>"] * 2
    # Validation: the test split, templates with choices only, template e % 2 for example e.
    val = _lines(out / "validation" / "ag_news.jsonl")
    assert [(r["template"], r["input"]) for r in val] == [
        ("classify", "classify test news 0?"), ("which_section", "which_section test news 1?"),
        ("classify", "classify test news 2?")]
    assert all(r["choices"] == AG_CHOICES and r["target"] in AG_CHOICES for r in val)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["experts"]["ag_news"]["templates"]["classify"] == {"train": 5,
                                                                       "validation": 2}
    assert summary["experts"]["ag_news"]["train"] == 11
    printed = capsys.readouterr().out
    assert "which_section" in printed and "11" in printed


def test_cap_draws_the_release_sample(p3_root, tmp_path):
    out = _build(["p3-heldin", p3_root, "--datasets", "ag_news", "--max-examples", "4",
                  "--seed", "7"], tmp_path)
    train = _lines(out / "train" / "ag_news.jsonl")
    full = [(e, t) for e in range(5) for t, n in enumerate((5, 2, 4)) if e < n]
    picked = np.random.default_rng(7).choice(len(full), 4, replace=False)
    names = ("classify", "recommend_title", "which_section")
    assert [(r["template"], r["input"].split()[-1].rstrip("?")) for r in train] == [
        (names[full[k][1]], str(full[k][0])) for k in picked]
    assert build_p3.MAX_EXAMPLES == 500_000


def test_paws_and_wiki_qa_exclusions(p3_root, tmp_path):
    out = _build(["p3-heldin", p3_root, "--datasets", "paws,wiki_qa"], tmp_path)
    for name, kept in (("paws", "Meaning"), ("wiki_qa", "Is_This_True_")):
        for split in ("train", "validation"):
            assert {r["template"] for r in _lines(out / split / f"{name}.jsonl")} == {kept}
    assert build_p3.folder_template("Topic Prediction - Answer Only") == \
        "Topic_Prediction_Answer_Only"


def test_trec_fifty_way_template(p3_root, tmp_path):
    out = _build(["p3-heldin", p3_root, "--datasets", "trec"], tmp_path)
    train = _lines(out / "train" / "trec.jsonl")
    assert len(build_p3.TREC_CHOICES) == 50
    assert [r["target"] for r in train] == ["Individual.", "Other entity.", "Other location.",
                                           "Definition of something.",
                                           "Description of a person."]
    choices = ", ".join(repr(c) for c in build_p3.TREC_CHOICES)
    assert train[0]["input"] == (f"Question: Who was Lincoln ?\nAnswer choices: [{choices}]\n"
                                 "Answer:")
    (val,) = _lines(out / "validation" / "trec.jsonl")
    assert val["target"] == "Distance, linear measure." and len(val["choices"]) == 50


def test_app_reviews_split(p3_root, tmp_path, monkeypatch):
    assert build_p3.APP_REVIEWS_EVAL == 10_000
    monkeypatch.setattr(build_p3, "APP_REVIEWS_EVAL", 3)  # the fixture has 7 reviews
    out = _build(["p3-heldin", p3_root, "--datasets", "app_reviews"], tmp_path)
    order = list(range(7))
    np.random.RandomState(1234).shuffle(order)
    val = _lines(out / "validation" / "app_reviews.jsonl")
    assert [r["input"] for r in val] == [f"categorize_rating_using_review review {i}"
                                         for i in order[:3]]
    train = _lines(out / "train" / "app_reviews.jsonl")
    assert [r["input"] for r in train] == [f"{t} review {i}" for i in order[3:]
                                           for t in APP_TEMPLATES]


# --- FLAN ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def flan_dir(tmp_path_factory):
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path_factory.mktemp("flan_release")
    n = 40
    pq.write_table(pa.table({
        "inputs": [f"q{i}" for i in range(n)] + ["few-shot", "", "empty target"],
        "targets": [f"a{i}" for i in range(n)] + ["x", "y", "  "],
        "_template_type": ["zs_opt", "zs_noopt"] * (n // 2) + ["fs_opt", "zs_opt", "zs_opt"],
        "_task_name": ["glue/cola"] * (n + 3),
        "_task_source": ["Flan2021"] * (n + 3),
        "_template_kwargs": ["{}"] * (n + 3),
    }), root / "part.0.parquet")
    with open(root / "niv2.jsonl", "w") as f:
        for i, task in enumerate(["task1_a", "task2_b", "task2_b", "task1_a"]):
            f.write(json.dumps({"inputs": f"in{i}", "targets": f"out{i}", "_task_name": task,
                                "_template_type": "zs_noopt", "_task_source": "NIv2",
                                "_template_kwargs": "{}"}) + "\n")
    return str(root)


def test_flan_zero_shot_shuffle_and_validation_split(flan_dir, tmp_path):
    out = _build(["flan", flan_dir, "--max-examples", "30"], tmp_path)
    rows = [(f"q{i}", f"a{i}", ["zs_opt", "zs_noopt"][i % 2]) for i in range(40)]
    order = np.random.RandomState(1234).permutation(40)
    val = _lines(out / "validation" / "glue_cola.jsonl")
    train = _lines(out / "train" / "glue_cola.jsonl")
    assert [(r["input"], r["target"], r["template"]) for r in val] == [rows[i]
                                                                       for i in order[:4]]
    assert [(r["input"], r["target"], r["template"]) for r in train] == [rows[i]
                                                                         for i in order[4:34]]
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["experts"]) == {"glue/cola", "task1_a", "task2_b"}
    assert summary["experts"]["glue/cola"]["templates"] == {
        "zs_noopt": {"train": sum(rows[i][2] == "zs_noopt" for i in order[4:34]),
                     "validation": sum(rows[i][2] == "zs_noopt" for i in order[:4])},
        "zs_opt": {"train": sum(rows[i][2] == "zs_opt" for i in order[4:34]),
                   "validation": sum(rows[i][2] == "zs_opt" for i in order[:4])}}


def test_flan_grouping_and_subset(flan_dir, tmp_path):
    grouping = tmp_path / "grouping.json"
    grouping.write_text(json.dumps({"task1_a": "niv2_misc", "task2_b": "niv2_misc",
                                    "glue/cola": "glue/cola"}))
    out = _build(["flan", flan_dir, "--grouping", str(grouping), "--datasets", "niv2_misc"],
                 tmp_path)
    assert sorted(os.listdir(out / "train")) == ["niv2_misc.jsonl"]
    assert sorted(r["input"] for r in _lines(out / "train" / "niv2_misc.jsonl")) == \
        [f"in{i}" for i in range(4)]


def test_overwrite_replaces_a_whole_folder(flan_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    assert tool("goose-data")(["flan", flan_dir, str(out), "--overwrite"]) == 0
    assert sorted(os.listdir(out)) == ["summary.json", "train", "validation"]
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no staging folder left beside it
