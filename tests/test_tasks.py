"""Data sources on fixture files written in the real on-disk formats (no network)."""

import json

import pytest

from goose_jax.core.errors import DataError
from goose_jax.data import bigbench, flan, p3, tasks
from goose_jax.data.synthetic import p3_score_eval as _score_eval
from goose_jax.data.synthetic import write_p3
from goose_jax.evaluation.evaluator import load_all

# --- P3 fixtures: TFRecords with the release's feature names and seqio info files ---------------

@pytest.fixture(scope="module")
def p3_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("p3"))
    rte_in = ["A cat sat. Question: a cat sat? True or False?", "Dogs fly. Question: dogs? T/F"]
    write_p3(root, "super_glue_rte_GPT_3_style_score_eval", "validation",
             _score_eval(rte_in, [["True", "False"], ["True", "False"]], [{0}, {1}]))
    write_p3(root, "super_glue_rte_GPT_3_style", "validation", [
        {"inputs_pretokenized": t, "targets_pretokenized": a, "answer_choices": ["True", "False"]}
        for t, a in zip(rte_in, ["True", "False"])])
    # A template with only its plain folder and no info file (features read from the records).
    write_p3(root, "super_glue_rte_does_it_follow_that", "validation", [
        {"inputs_pretokenized": "Does it follow?", "targets_pretokenized": " No ",
         "answer_choices": ["Yes", "No"]}], info=False)
    write_p3(root, "anli_GPT_3_style_r1_score_eval", "validation",
             _score_eval(["premise r1"], [["Yes", "Maybe", "No"]], [{2}]))
    write_p3(root, "anli_GPT_3_style_r2_score_eval", "validation",
             _score_eval(["premise r2 a", "premise r2 b"], [["Yes", "No"]] * 2, [{0}, {1}]))
    write_p3(root, "super_glue_copa__As_a_result_C1_or_C2__score_eval", "validation",
             _score_eval(["excluded"], [["a", "b"]], [{0}]))
    write_p3(root, "super_glue_copa_best_option_score_eval", "validation",
             _score_eval(["kept"], [["a", "b"]], [{1}]))
    write_p3(root, "samsum_Summarize_this_dialogue_", "train", [
        {"inputs_pretokenized": "A: hi B: bye", "targets_pretokenized": "greetings"}])
    write_p3(root, "samsum_Summarize_this_dialogue_", "validation", [
        {"inputs_pretokenized": "A: yes B: no", "targets_pretokenized": "disagreement"}])
    write_p3(root, "ag_news_classify", "test", [
        {"inputs_pretokenized": "Stocks rose.", "targets_pretokenized": "Business",
         "answer_choices": ["World", "Sports", "Business", "Science"]}])
    return root


def test_p3_template_discovery(p3_root):
    found = p3.templates(p3_root, p3.T0_HELDOUT["rte"])
    assert found == {"GPT_3_style": "super_glue_rte_GPT_3_style_score_eval",
                     "does_it_follow_that": "super_glue_rte_does_it_follow_that"}
    assert p3.templates(p3_root, p3.T0_HELDOUT["rte"], score_eval=False)["GPT_3_style"] == \
        "super_glue_rte_GPT_3_style"
    assert list(p3.templates(p3_root, p3.T0_HELDOUT["anli_r1"])) == ["GPT_3_style"]
    assert p3.templates(p3_root, p3.T0_HELDOUT["anli_r2"])["GPT_3_style"].endswith("_r2_score_eval")
    assert list(p3.templates(p3_root, p3.T0_HELDOUT["copa"])) == ["best_option"]


def test_p3_score_eval_and_plain_records(p3_root):
    path = p3.task_dir(p3_root, "super_glue_rte_GPT_3_style_score_eval")
    exs = p3.examples(path, "validation", dataset="rte", template="GPT_3_style")
    assert [e.choices for e in exs] == [("True", "False")] * 2
    assert [e.answers for e in exs] == [(0,), (1,)]
    assert exs[0].input.startswith("A cat sat.") and exs[1].example_id == "1"
    plain = p3.examples(p3.task_dir(p3_root, "super_glue_rte_GPT_3_style"), "validation",
                        dataset="rte", template="GPT_3_style")
    assert [(e.choices, e.answers) for e in plain] == [(e.choices, e.answers) for e in exs]
    # No info file: the feature spec comes from the record; the target is stripped.
    (one,) = p3.examples(p3.task_dir(p3_root, "super_glue_rte_does_it_follow_that"),
                         "validation", dataset="rte", template="t")
    assert one.choices == ("Yes", "No") and one.answers == (1,)


def test_t0_tasks_pool_templates(p3_root):
    roots = tasks.DataRoots(p3=p3_root)
    rte = tasks.get_task("t0_heldout/rte", roots)
    exs = list(rte.load())
    assert rte.kind == "rank" and rte.metric == "accuracy"
    assert sorted({e.template for e in exs}) == ["GPT_3_style", "does_it_follow_that"]
    assert len(exs) == 3 and {e.dataset for e in exs} == {"t0_heldout/rte"}
    anli = list(tasks.iter_examples("t0_heldout/anli_r1", roots))
    assert [(e.input, e.choices, e.answers) for e in anli] == \
        [("premise r1", ("Yes", "Maybe", "No"), (2,))]
    samsum = tasks.get_task("t0_heldin/samsum", roots)
    assert (samsum.kind, samsum.metric) == ("generate", "rouge_l")
    assert [e.references for e in samsum.load()] == [("disagreement",)]
    ag = tasks.get_task("t0_heldin/ag_news", roots)   # test split preferred
    assert ag.kind == "rank" and [e.answers for e in ag.load()] == [(2,)]


def test_p3_bad_input(p3_root, tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        list(tasks.iter_examples("t0_heldout/rte", tasks.DataRoots(p3=str(tmp_path / "nope"))))
    with pytest.raises(DataError, match="--p3-root"):
        tasks.get_task("t0_heldout/rte")
    with pytest.raises(DataError, match="did you mean t0_heldout/rte"):
        tasks.get_task("t0_heldout/rtee", tasks.DataRoots(p3=p3_root))
    with pytest.raises(DataError, match="no test.tfrecord"):
        p3.feature_spec(p3.task_dir(p3_root, "samsum_Summarize_this_dialogue_"), "test")
    # A dataset with no folders on disk is an empty task: one clear error naming the pattern.
    with pytest.raises(DataError, match=r"t0_heldout/wic: no examples.*super_glue_wic_\*"):
        load_all([tasks.get_task("t0_heldout/wic", tasks.DataRoots(p3=p3_root))])


# --- BIG-bench: Hugging Face datasets saved with save_to_disk ----------------------------------


@pytest.fixture(scope="module")
def bb_root(tmp_path_factory):
    from datasets import Dataset, DatasetDict

    root = tmp_path_factory.mktemp("bbh")

    def bigbench_row(i, inputs, targets, mc, scores):
        return {"idx": i, "inputs": inputs, "targets": targets,
                "multiple_choice_targets": mc, "multiple_choice_scores": scores}

    shapes = [bigbench_row(0, "Which shape?", ["circle", "ellipse"],
                           ["circle", "square", "ellipse"], [1, 0, 1])]
    DatasetDict({"train": Dataset.from_list(shapes),
                 "validation": Dataset.from_list([bigbench_row(
                     1, "Which one?", ["square"], ["circle", "square", "ellipse"], [0, 1, 0])])
                 }).save_to_disk(str(root / "geometric_shapes"))
    # Several correct scores on a single-answer task: the one equal to the longest target wins.
    DatasetDict({"train": Dataset.from_list([bigbench_row(
        0, "Go left?", ["Yes", "yes"], ["No", "yes", "Yes"], [0, 1, 1])])}).save_to_disk(
        str(root / "navigate"))
    DatasetDict({"train": Dataset.from_list([bigbench_row(0, "How many?", ["3", "three"], [], [])])
                 }).save_to_disk(str(root / "object_counting"))
    DatasetDict({"test": Dataset.from_list([{"input": "not True", "target": "False"},
                                            {"input": "True and True", "target": "True"}])
                 }).save_to_disk(str(root / "boolean_expressions"))
    for variant, target in [("three", "(C)"), ("five", "(E)")]:
        rows = [{"input": f"{variant} objects {i}", "target": t}
                for i, t in enumerate(["(A)", target])]
        DatasetDict({"test": Dataset.from_list(rows)}).save_to_disk(
            str(root / f"logical_deduction_{variant}_objects"))
    return str(root)


def test_bigbench_layout(bb_root):
    exs = bigbench.examples(bb_root, "geometric_shapes")
    assert len(exs) == 2   # train and validation joined
    assert exs[0].input == "Which shape?\nAnswer:"
    assert exs[0].choices == ("circle", "square", "ellipse") and exs[0].answers == (0, 2)
    assert exs[1].answers == (1,)
    (nav,) = bigbench.examples(bb_root, "navigate")
    assert nav.answers == (2,)
    (cnt,) = bigbench.examples(bb_root, "object_counting")
    # exact_match_any: every target, in the dataset's order; the release's max_gen_length 8
    # counts the decoder start token: 7 new tokens.
    assert cnt.choices is None and cnt.references == ("3", "three")
    task = tasks.get_task("bbh/object_counting", tasks.DataRoots(bbh=bb_root))
    assert (task.kind, task.metric, task.max_new_tokens) == ("generate", "exact_match_any", 7)


def test_bbh_layout_and_variants(bb_root):
    exs = bigbench.examples(bb_root, "boolean_expressions", dataset="bbh/boolean_expressions")
    assert [e.choices for e in exs] == [("True", "False")] * 2
    assert [e.answers for e in exs] == [(1,), (0,)]
    assert exs[0].dataset == "bbh/boolean_expressions"
    ld = bigbench.examples(bb_root, "logical_deduction")
    # Each variant keeps its own distinct targets as choices; ids stay unique.
    assert [e.choices for e in ld] == [("(A)", "(E)")] * 2 + [("(A)", "(C)")] * 2   # five, three
    assert [e.answers for e in ld] == [(0,), (1,), (0,), (1,)]
    assert len({e.example_id for e in ld}) == 4


def test_bigbench_missing(bb_root, tmp_path):
    roots = tasks.DataRoots(bbh=bb_root)
    with pytest.raises(DataError, match="snarks: BIG-bench task directory does not exist"):
        list(tasks.iter_examples("bbh/snarks", roots))
    with pytest.raises(DataError, match="--bbh-root"):
        tasks.get_task("bbh/snarks")
    (tmp_path / "navigate").mkdir()
    with pytest.raises(DataError, match="neither a saved Hugging Face dataset"):
        bigbench.examples(str(tmp_path), "navigate")


def test_bigbench_parquet_snapshot(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "winowhy").mkdir()
    table = pa.table({"inputs": ["Why?"], "targets": [["correct"]],
                      "multiple_choice_targets": [["correct", "incorrect"]],
                      "multiple_choice_scores": [[1, 0]], "idx": [7]})
    pq.write_table(table, tmp_path / "winowhy" / "validation-00000-of-00001.parquet")
    (ex,) = bigbench.examples(str(tmp_path), "winowhy")
    assert ex.choices == ("correct", "incorrect") and ex.answers == (0,) and ex.example_id == "7"


# --- FLAN: Open-Orca layout ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def flan_root(tmp_path_factory):
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path_factory.mktemp("flan")
    (root / "flan_zsopt_data").mkdir()
    n = 30
    pq.write_table(pa.table({
        "inputs": [f"q{i}" for i in range(n)] + ["few-shot", ""],
        "targets": [f"a{i}" for i in range(n)] + ["x", "y"],
        "_template_type": (["zs_opt"] * (n // 2) + ["zs_noopt"] * (n - n // 2)
                           + ["fs_opt", "zs_opt"]),
        "_task_name": ["glue/cola"] * n + ["glue/cola", "glue/cola"],
        "_task_source": ["Flan2021"] * (n + 2),
    }), root / "flan_zsopt_data" / "part.0.parquet")
    with open(root / "niv2.jsonl", "w") as f:
        for i, task in enumerate(["task1_a", "task2_b", "task2_b"]):
            f.write(json.dumps({"inputs": f"in{i}", "targets": f"out{i}", "_task_name": task,
                                "_template_type": "zs_noopt", "_task_source": "NIv2"}) + "\n")
    return str(root)


def test_flan(flan_root):
    assert flan.task_names(flan_root) == {"glue/cola": 31, "task1_a": 1, "task2_b": 2}
    rows = flan.rows(flan_root, "glue/cola")
    assert len(rows) == 30 and {r[2] for r in rows} == {"zs_opt", "zs_noopt"}  # fs and empty out
    val = flan.examples(flan_root, "glue/cola", "validation")
    train = flan.examples(flan_root, "glue/cola", "train")
    assert len(val) == 3 and len(train) == 27
    assert not {e.input for e in val} & {e.input for e in train}
    assert all(e.references == ("a" + e.input[1:],) for e in val)
    grouping = {"task1_a": "niv2_misc", "task2_b": "niv2_misc", "glue/cola": "glue/cola"}
    assert flan.experts(flan_root, grouping) == ["glue/cola", "niv2_misc"]
    assert len(flan.rows(flan_root, "niv2_misc", grouping=grouping)) == 3
    with pytest.raises(DataError, match=r"no expert for 1 task\(s\) found there: glue/cola;"):
        flan.experts(flan_root, {"task1_a": "niv2_misc", "task2_b": "niv2_misc"})
    names = tasks.benchmark_task_names("flan", tasks.DataRoots(flan=flan_root))
    assert names == ["flan/glue/cola", "flan/task1_a", "flan/task2_b"]


# --- tfds ---------------------------------------------------------------------------------------


def test_tfds_mock(tmp_path):
    import tensorflow as tf
    import tensorflow_datasets as tfds

    def as_dataset(self, *args, **kwargs):
        return tf.data.Dataset.from_tensor_slices({
            "premise": ["It rains.", "The sun is up."],
            "hypothesis": ["It is wet.", "It is night."], "idx": [0, 1], "label": [0, 1]})

    with tfds.testing.mock_data(num_examples=2, as_dataset_fn=as_dataset):
        exs = list(tasks.iter_examples("tfds/super_glue/rte",
                                       tasks.DataRoots(tfds=str(tmp_path))))
    assert exs[0].input == "It rains.\nQuestion: It is wet. True or False?"
    assert [e.choices for e in exs] == [("True", "False")] * 2
    assert [e.answers for e in exs] == [(0,), (1,)]
    with pytest.raises(DataError, match="never downloads"):
        tasks.tfds_examples("super_glue/rte", data_dir=str(tmp_path))


# --- seqio --------------------------------------------------------------------------------------


def test_seqio_registry(p3_root, bb_root, flan_root):
    import seqio

    mixtures = tasks.register_tasks(p3_root=p3_root, bbh_root=bb_root, flan_root=flan_root)
    assert set(mixtures) == {"t0_heldin", "t0_heldout", "bbh", "flan"}
    assert mixtures["flan"] == ["flan_glue_cola", "flan_task1_a", "flan_task2_b"]
    assert "p3_super_glue_rte_GPT_3_style_score_eval" in mixtures["t0_heldout"]
    assert "p3_samsum_Summarize_this_dialogue_" in mixtures["t0_heldin"]
    assert set(mixtures["bbh"]) == {"bbh_geometric_shapes", "bbh_navigate", "bbh_object_counting",
                                    "bbh_boolean_expressions", "bbh_logical_deduction"}
    vocab = seqio.ByteVocabulary()
    ds = seqio.get_mixture_or_task("p3_super_glue_rte_GPT_3_style_score_eval").get_dataset(
        {"inputs": 64, "targets": 8}, split="validation", shuffle=False, use_cached=False)
    rows = list(ds.as_numpy_iterator())
    assert len(rows) == 4 and rows[0]["is_correct"] and not rows[1]["is_correct"]
    assert vocab.decode(rows[0]["targets"].tolist()) == "True"
    assert rows[0]["inputs"][-1] == 1   # EOS
    ds = seqio.get_mixture_or_task("bbh_boolean_expressions").get_dataset(
        {"inputs": 64, "targets": 8}, split="validation", shuffle=False, use_cached=False)
    (first, _) = list(ds.as_numpy_iterator())
    assert vocab.decode(first["inputs"].tolist()) == "not True\nAnswer:"
    assert vocab.decode(first["targets"].tolist()) == "False"
    assert seqio.get_mixture_or_task("bbh").get_dataset(
        {"inputs": 64, "targets": 8}, split="validation", shuffle=False, use_cached=False)
    ds = seqio.get_mixture_or_task("flan_glue_cola").get_dataset(
        {"inputs": 16, "targets": 8}, split="validation", shuffle=False, use_cached=False)
    rows = list(ds.as_numpy_iterator())
    assert len(rows) == 3 and all(
        vocab.decode(r["targets"].tolist()) == "a" + vocab.decode(r["inputs"].tolist())[1:]
        for r in rows)
