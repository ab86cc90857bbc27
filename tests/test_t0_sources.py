"""goose-data p3-heldin from its two sources: the release's (saved Hugging Face datasets with
promptsource's templates) and P3's folders under their real names; promptsource's rendering
rules against plain transcriptions; the retrieval text of the rows."""

import json
import os
import random

import pytest
from conftest import one_line, tool, tree_hash
from t0_fixture import real_folders, write_all

from goose_jax.core.errors import DataError
from goose_jax.data import build_p3, p3
from goose_jax.data import prompt_templates as pt
from goose_jax.data.synthetic import write_p3
from goose_jax.routing import retrieval


@pytest.fixture(scope="session")
def release(tmp_path_factory):
    """(p3_root, hf_dir, templates): every real P3 folder name of the 36 held-in datasets, and
    the Hugging Face copies of the two P3 lacks."""
    return write_all(str(tmp_path_factory.mktemp("t0_release")), eval_splits=False)


def _lines(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def _run(argv, capsys):
    code = tool("goose-data")(argv)
    out, err = capsys.readouterr()
    return code, out, err


# --- P3 as published ----------------------------------------------------------------------------


def test_real_p3_names_hold_every_dataset_p3_has(release):
    p3_root, hf_dir, templates = release
    names = real_folders()
    # Independently of the code: a dataset's folders are the listed names under its prefix.
    prefixes = {"paws": "paws_labeled_final_", "duorc": "duorc_ParaphraseRC_",
                "mrpc": "glue_mrpc_", "qqp": "glue_qqp_", "cos_e": "cos_e_v1.11_",
                "wiki_hop": "wiki_hop_original_", "cnn_dailymail": "cnn_dailymail_3.0.0_"}
    ignored = {"paws": 1, "wiki_qa": 6}
    for d in p3.T0_HELDIN:
        if d in build_p3.P3_LACKS:
            with pytest.raises(DataError, match="--hf-dir"):
                build_p3._plan(d, p3_root, None, None)
            continue
        kind, folders = build_p3._plan(d, p3_root, None, None)
        assert kind == "p3"
        got = sorted(f for fs in folders.values() for f in fs)
        if d == "trec":
            assert got == ["trec_fine_grained_open", "trec_pick_the_best_descriptor"]
            continue
        if d == "adversarial_qa":
            want = [n for n in names if n.startswith("adversarial_qa_")]
            assert len(want) == 15 and len(folders) == 5
            assert all(len(fs) == 3 and [f.split("_")[2] for f in fs] == ["dbidaf", "dbert",
                                                                          "droberta"]
                       for fs in folders.values())
        else:
            want = [n for n in names if n.startswith(prefixes.get(d, f"{d}_"))]
            assert len(got) == len(want) - ignored.get(d, 0)
        assert set(got) <= set(want) and "duorc_SelfRC_answer_question" not in got
    # With the Hugging Face copies, the two P3 lacks come from them: 36 in all.
    plans = {d: build_p3._plan(d, p3_root, hf_dir, templates)[0] for d in p3.T0_HELDIN}
    assert len(plans) == 36
    assert {d for d, k in plans.items() if k == "huggingface"} == {"commonsense_qa", "hotpot_qa"}


def test_build_from_both_sources_says_where_rows_came_from(release, tmp_path, capsys):
    p3_root, hf_dir, templates = release
    out = tmp_path / "out"
    code, printed, _ = _run(["p3-heldin", p3_root, str(out), "--hf-dir", hf_dir, "--templates",
                             templates, "--datasets",
                             "adversarial_qa,trec,commonsense_qa,hotpot_qa"], capsys)
    assert code == 0
    lines = [ln for ln in printed.splitlines() if ln.startswith("goose-data: ")
             and not ln.startswith("goose-data: wrote")]
    assert [ln.split(":")[1].strip() for ln in lines] == ["commonsense_qa", "hotpot_qa", "trec",
                                                         "adversarial_qa"]
    assert "Hugging Face copy" in lines[0] and "commonsense_qa/templates.yaml" in lines[0]
    assert "hotpot_qa/fullwiki" in lines[1] and "P3 folders" in lines[3]
    summary = json.loads((out / "summary.json").read_text())
    assert {d: e["source"] for d, e in summary["experts"].items()} == {
        "commonsense_qa": "huggingface", "hotpot_qa": "huggingface", "trec": "p3",
        "adversarial_qa": "p3"}
    # adversarialQA = the three subsets joined, per template dbidaf, dbert, droberta.
    train = _lines(out / "train" / "adversarial_qa.jsonl")
    subsets = ["dbidaf", "dbert", "droberta"]
    # Example e of template t is pair e * T + t: the dbidaf records of every template, then
    # dbert's, then droberta's.
    want = [f"adversarial_qa_{s}_{t} train 0" for s in subsets for t in
            sorted(["answer_the_following_q", "based_on", "generate_question",
                    "question_context_answer", "tell_what_it_is"])]
    assert [r["input"] for r in train] == want
    # HotpotQA full-wiki: the context paragraphs are in the prompt.
    hot = _lines(out / "train" / "hotpot_qa.jsonl")
    assert hot[0] == {"input": "A: One. Two.\nB: Three 0.\nQuestion: Which river t 0?",
                      "target": "Nile 0", "template": "generate_answer_interrogative",
                      "choices": []}


@pytest.mark.parametrize("case", ["missing_dataset", "missing_hotpot", "missing_template"])
def test_hostile_sources_one_line_nothing_written(release, tmp_path, capsys, case):
    p3_root, hf_dir, templates = release
    work = tmp_path / "w"
    work.mkdir()
    argv = {"missing_dataset": ["p3-heldin", p3_root, str(work / "out"), "--datasets",
                                "ag_news,commonsense_qa"],
            "missing_hotpot": ["p3-heldin", p3_root, str(work / "out"), "--datasets",
                               "hotpot_qa"],
            "missing_template": ["p3-heldin", p3_root, str(work / "out"), "--hf-dir", hf_dir,
                                 "--templates", str(work / "t"), "--datasets", "hotpot_qa"]}[case]
    if case == "missing_template":   # a checkout with CommonsenseQA's file but not HotpotQA's
        from t0_fixture import TEMPLATES, write_templates

        write_templates(str(work / "t"), {k: v for k, v in TEMPLATES.items()
                                          if k == ("commonsense_qa",)})
    before = tree_hash(work, p3_root, hf_dir)
    code, _, err = _run(argv, capsys)
    line = one_line(err, "goose-data")
    assert code == DataError.exit_code == 1
    assert tree_hash(work, p3_root, hf_dir) == before
    assert not (work / "out").exists()
    want = {"missing_dataset": "commonsense_qa: P3 has no commonsense_qa folders; save the "
                               "Hugging Face dataset commonsense_qa",
            "missing_hotpot": "KILT's closed-book copy",
            "missing_template": "hotpot_qa/fullwiki/templates.yaml: promptsource template file "
                                "missing"}[case]
    assert want in line


# --- both sources give the same rows ------------------------------------------------------------

RT_TEMPLATES = """dataset: rotten_tomatoes
templates:
  a1: !Template
    answer_choices: bad ||| good
    id: a1
    jinja: '{{text}} Did the reviewer find this movie {{"good or bad"}}? ||| {{ answer_choices
      [label] }}'
    metadata: !TemplateMetadata
      original_task: true
    name: Reviewer Opinion bad good choices
    reference: ''
  b2: !Template
    answer_choices: null
    id: b2
    jinja: 'Write a {{ ["bad", "good"][label] }} review. ||| {{ text }}'
    metadata: !TemplateMetadata
      original_task: false
    name: Write review
    reference: ''
"""
RT_TRAIN = [("a fine goose", 1), ("a dull river", 0), ("a bright | stone", 1)]
RT_VAL = [("a calm lake", 1), ("a grey cloud", 0)]


def test_both_sources_give_the_same_rows(tmp_path, capsys):
    import datasets

    hf_dir, tdir, p3_root = tmp_path / "HF", tmp_path / "T", str(tmp_path / "P3")
    datasets.DatasetDict({s: datasets.Dataset.from_dict({"text": [t for t, _ in rows],
                                                         "label": [lab for _, lab in rows]})
                          for s, rows in (("train", RT_TRAIN), ("validation", RT_VAL))}
                         ).save_to_disk(str(hf_dir / "rotten_tomatoes"))
    (tdir / "rotten_tomatoes").mkdir(parents=True)
    (tdir / "rotten_tomatoes" / "templates.yaml").write_text(RT_TEMPLATES)
    # What P3 holds for the same templates (written out by hand).
    for split, rows in (("train", RT_TRAIN), ("validation", RT_VAL)):
        write_p3(p3_root, "rotten_tomatoes_Reviewer_Opinion_bad_good_choices", split, [
            {"inputs_pretokenized": f"{t} Did the reviewer find this movie good or bad?",
             "targets_pretokenized": ["bad", "good"][lab], "answer_choices": ["bad", "good"]}
            for t, lab in rows])
        write_p3(p3_root, "rotten_tomatoes_Write_review", split, [
            {"inputs_pretokenized": f"Write a {['bad', 'good'][lab]} review.",
             "targets_pretokenized": t} for t, lab in rows])
    outs = {}
    for name, argv in (("hf", [str(tmp_path / "hf"), "--hf-dir", str(hf_dir), "--templates",
                               str(tdir)]),
                       ("p3", [p3_root, str(tmp_path / "p3")])):
        assert _run(["p3-heldin", *argv, "--datasets", "rotten_tomatoes"], capsys)[0] == 0
        outs[name] = tmp_path / name
    for split in ("train", "validation"):
        hf = (outs["hf"] / split / "rotten_tomatoes.jsonl").read_text()
        assert hf == (outs["p3"] / split / "rotten_tomatoes.jsonl").read_text()
    train = _lines(outs["hf"] / "train" / "rotten_tomatoes.jsonl")
    assert len(train) == 6 and train[1] == {"input": "Write a good review.",
                                            "target": "a fine goose", "template": "Write_review",
                                            "choices": []}
    assert train[0]["choices"] == ["bad", "good"]
    val = _lines(outs["hf"] / "validation" / "rotten_tomatoes.jsonl")
    assert [r["target"] for r in val] == ["good", "bad"]


# --- promptsource's rendering -------------------------------------------------------------------


def _t(jinja, choices=None, name="t"):
    return pt.Template(name, jinja, choices, True)


def _jinja_truncate(s, length=2048, end="...", leeway=5):
    """Jinja's ``truncate`` filter (killwords False), transcribed."""
    if len(s) <= length + leeway:
        return s
    return s[:length - len(end)].rsplit(" ", 1)[0] + end


def test_render_rules_match_promptsource():
    long = " ".join(f"w{i:03d}" for i in range(600))   # 2,999 characters
    ex = {"text": long, "q": "a ||| b", "label": 1, "empty": ""}
    prompt, target, choices = pt.render(
        _t("{{text}} Q: {{q}} ||| {{answer_choices[label]}}", "no ||| {{ text }}"), ex, 0, 0)
    assert prompt == f"{_jinja_truncate(long)} Q: a ||| b"
    assert len(prompt.split(" Q:")[0]) < len(long)
    # Every {{ }} of the template is truncated (the target too); the choices list is not.
    assert target == _jinja_truncate(long) and choices == ["no", long]
    assert pt.render(_t("{{text[:3]}} ||| {{empty}}"), ex, 0, 0)[:2] == ("w00", "<NO LABEL>")
    assert pt.render(_t("no separator"), ex, 0, 0)[:2] == ("<NO INPUT>", "<NO INPUT>")
    assert pt.render(_t("{{ missing.x }} ||| y"), ex, 0, 0)[:2] == ("<NO INPUT>", "<NO INPUT>")
    # The sandbox: a template cannot reach Python internals.
    assert pt.render(_t("{{ ''.__class__.__mro__[1].__subclasses__() }} ||| y"), ex, 0, 0)[:2] \
        == ("<NO INPUT>", "<NO INPUT>")
    # choice draws from the generator of (seed, template, example).
    items = [f"a{i}" for i in range(20)]
    got = pt.render(_t("{{ items | choice }} ||| x", name="pick"), {"items": items}, 7, 3)[0]
    assert got == random.Random("7:pick:3").choice(items)
    # release validation target: the choice the target matches, else find_label's rule.
    assert pt.pick_choice("yes", ["no", "yes"]) == 1
    assert pt.pick_choice("<NO INPUT>", ["<NO", "<NX LABEL!"]) == 0   # tie: the shorter
    assert pt.pick_choice("<NO INPUT>", ["<NO", "<NO LABEL>"]) == 1   # more positions


def test_template_files_read_safely(tmp_path):
    root = tmp_path / "t"
    (root / "d").mkdir(parents=True)
    (root / "d" / "templates.yaml").write_text(RT_TEMPLATES)
    got = pt.read_templates(str(root), "d")
    assert [(t.name, t.answer_choices, t.original_task) for t in got] == [
        ("Reviewer Opinion bad good choices", "bad ||| good", True),
        ("Write review", None, False)]
    (root / "d" / "templates.yaml").write_text(
        "templates:\n  x: !!python/object/apply:os.system ['echo hacked']\n")
    with pytest.raises(DataError, match="unreadable promptsource template file"):
        pt.read_templates(str(root), "d")


# --- the retrieval text -------------------------------------------------------------------------


def _release_library_text(example: dict) -> str:
    """src/procedures/retriever.py (library side), transcribed: the example's answer_choices
    list joined with ", " whenever the key is there (P3 rows always carry it), else "None"."""
    if "answer_choices" in example:
        listed = ", ".join(example["answer_choices"])
    else:
        listed = "None"
    return f"Answer Choices: {listed}, Instance: {example['input_str']}"


def test_retrieval_rows_embed_their_templates_choices(release, tmp_path, capsys):
    p3_root, hf_dir, templates = release
    out = tmp_path / "out"
    assert _run(["p3-heldin", p3_root, str(out), "--hf-dir", hf_dir, "--templates", templates,
                 "--datasets", "commonsense_qa,trec"], capsys)[0] == 0
    for name in ("commonsense_qa", "trec"):
        for r in _lines(out / "train" / f"{name}.jsonl"):
            release_example = {"input_str": r["input"], "answer_choices": r["choices"]}
            assert retrieval.format_query(r["input"], r["choices"]) == \
                _release_library_text(release_example)
    rows = _lines(out / "train" / "commonsense_qa.jsonl")
    assert {tuple(r["choices"]) for r in rows} == {("river", "sky", "desk"), ()}
    assert retrieval.format_query("x", []) == "Answer Choices: , Instance: x"
    assert retrieval.format_query("x", None) == _release_library_text({"input_str": "x"})


def _hf(tmp_path, dataset, splits, templates):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / dataset
    folder.mkdir()
    for split, rows in splits.items():
        pq.write_table(pa.Table.from_pylist(rows), str(folder / f"{split}.parquet"))
    return build_p3.HFSource(str(folder), templates, "templates.yaml")


def test_validation_on_original_task_templates(tmp_path):
    yes_no = [pt.Template("a orig", "{{t}} ? ||| {{answer_choices[label]}}", "no ||| yes", True),
              pt.Template("b other", "{{t}} !? ||| {{answer_choices[label]}}", "no ||| yes")]
    rows = [{"t": f"r{i}", "label": i % 2} for i in range(4)]
    src = _hf(tmp_path, "imdb", {"train": rows, "test": rows}, yes_no)
    val = build_p3.build_hf_dataset(src, "imdb", None, 42).validation
    assert [(r.input, r.target, r.choices) for r in val] == [
        (f"r{i} ?", ["no", "yes"][i % 2], ("no", "yes")) for i in range(4)]
    # quarel: every template, in turn (include_templates="all" in the release's gin).
    src = _hf(tmp_path, "quarel", {"train": rows, "validation": rows}, yes_no)
    val = build_p3.build_hf_dataset(src, "quarel", None, 42).validation
    assert [r.input for r in val] == ["r0 ?", "r1 !?", "r2 ?", "r3 !?"]


def test_duorc_unanswerable_examples_take_the_no_answer_text(tmp_path):
    jinja = ("Q: {{question}} ||| {% if no_answer %}No I can't{% else %}{{answers|choice}}"
             "{% endif %}")
    ts = [pt.Template("a", jinja, None, True), pt.Template("b", "Ask: {{answers|choice}} ||| "
                                                           "{{question}}", None, False)]
    rows = [{"question": f"q{i}", "answers": [] if i < 2 else [f"x{i}"], "no_answer": i < 2}
            for i in range(3)]
    src = _hf(tmp_path, "duorc", {"train": rows, "validation": rows}, ts)
    train = build_p3.build_hf_dataset(src, "duorc", None, 42).train
    # Example i takes template i % 2's no-answer text when that template is an original one:
    # example 0 gets "No I can't" as its answer, example 1 (template b, not original) keeps [].
    assert [(r.input, r.target) for r in train] == [
        ("Q: q0", "No I can't"), ("Ask: No I can't", "q0"),
        ("Q: q1", "No I can't"), ("<NO INPUT>", "<NO INPUT>"),
        ("Q: q2", "x2"), ("Ask: x2", "q2")]


def test_t0_script_passes_the_hugging_face_source(release, tmp_path):
    import argparse
    import runpy

    p3_root, hf_dir, templates = release
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    t0 = runpy.run_path(os.path.join(here, "train", "t0.py"), run_name="goose_script")
    ap = argparse.ArgumentParser()
    t0["_own"](ap)
    args = ap.parse_args(["--p3-dir", p3_root, "--hf-dir", hf_dir, "--templates", templates])
    stage = tmp_path / "stage"
    summary = t0["_build"](args, args.p3_dir, str(stage), ["commonsense_qa", "trec"])
    assert {d: e["source"] for d, e in summary["experts"].items()} == {
        "commonsense_qa": "huggingface", "trec": "p3"}


def test_hugging_face_source_alone(release, tmp_path, capsys):
    _, hf_dir, templates = release
    out = tmp_path / "out"
    assert _run(["p3-heldin", str(out), "--hf-dir", hf_dir, "--templates", templates,
                 "--datasets", "commonsense_qa"], capsys)[0] == 0
    val = _lines(out / "validation" / "commonsense_qa.jsonl")
    assert val[0] == {"input": "Where is goose v 0?\n- river\n- sky\n- desk",
                      "target": "river", "template": "answer_given_question_without_options",
                      "choices": ["river", "sky", "desk"]}
    # Without --hf-dir one folder is not enough; without P3_DIR a dataset P3 holds is refused.
    code, _, err = _run(["p3-heldin", str(tmp_path / "o2")], capsys)
    assert code == 2 and "P3_DIR OUT_DIR" in one_line(err, "goose-data")
    code, _, err = _run(["p3-heldin", str(tmp_path / "o3"), "--hf-dir", hf_dir, "--datasets",
                         "ag_news"], capsys)
    assert code == 1 and "no P3_DIR given" in one_line(err, "goose-data")
