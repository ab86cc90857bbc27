"""Small synthetic copies of the public releases, written in their own on-disk formats.

The paper's settings (``train/t0.py``, ``train/flan.py``) run end to end on these with
``--small``, and the tests build their fixtures with the same writers:

    write_p3(root, folder, split, records)   one P3 task folder (TFRecords, seqio info files)
    write_p3_release(root)                   a few T0 held-in datasets and T0 held-out tasks
    write_flan_release(root)                 a few FLAN tasks, Open-Orca/FLAN jsonl columns
    write_niv2_tasks(root, categories)       natural-instructions task files (their Categories)
    write_bigbench_release(bbh, bbl)         one BIG-bench Hard task (lukaemon/bbh layout) and
                                             one BIG-bench Lite task (tasksource/bigbench layout)

Each release writer returns the names it wrote (expert datasets, evaluation task names). The
examples are tiny made-up classification and generation items; only the layout is real.
TensorFlow is imported by ``write_p3`` only.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence

# seqio's info file: each P3 feature's dtype and shape.
_P3_INFO = {
    "inputs": ("int32", [None]), "inputs_pretokenized": ("string", []),
    "targets": ("int32", [None]), "targets_pretokenized": ("string", []),
    "answer_choices": ("string", [None]), "idx": ("int32", [2]),
    "is_correct": ("bool", []), "weight": ("float32", []),
}


def _feature(value):
    import tensorflow as tf

    values = value if isinstance(value, list) else [value]
    if values and isinstance(values[0], str):
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[v.encode() for v in values]))
    if values and isinstance(values[0], float):
        return tf.train.Feature(float_list=tf.train.FloatList(value=values))
    return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(v) for v in values]))


def write_p3(root: str | os.PathLike, folder: str, split: str, records: Sequence[Mapping],
             info: bool = True) -> None:
    """One P3 task folder ``<root>/data/<folder>/``: ``<split>.tfrecord-00000-of-00001`` with
    the P3 feature names, plus ``info.<split>.json`` / ``stats.<split>.json`` (with ``info``).

    Records give ``inputs_pretokenized``, ``targets_pretokenized`` and optionally
    ``answer_choices``, ``idx``, ``is_correct``, ``weight``; ``inputs`` / ``targets`` token ids
    are filled in when absent."""
    import tensorflow as tf

    path = os.path.join(os.fspath(root), "data", folder)
    os.makedirs(path, exist_ok=True)
    with tf.io.TFRecordWriter(os.path.join(path, f"{split}.tfrecord-00000-of-00001")) as w:
        for rec in records:
            rec = {"inputs": [5, 6, 1], "targets": [7, 1], **rec}
            ex = tf.train.Example(features=tf.train.Features(
                feature={k: _feature(v) for k, v in rec.items()}))
            w.write(ex.SerializeToString())
    if info:
        names = records[0].keys() | {"inputs", "targets"}
        feats = {k: {"dtype": _P3_INFO[k][0], "shape": _P3_INFO[k][1]} for k in sorted(names)}
        with open(os.path.join(path, f"info.{split}.json"), "w") as f:
            json.dump({"features": feats, "num_shards": 1, "seqio_version": "0.0.20"}, f)
        with open(os.path.join(path, f"stats.{split}.json"), "w") as f:
            json.dump({"examples": len(records)}, f)


def p3_score_eval(inputs: Sequence[str], choices: Sequence[Sequence[str]],
                  correct: Sequence[set[int]]) -> list[dict]:
    """The records of a ``<task>_score_eval`` folder: one per (example, choice)."""
    return [{"inputs_pretokenized": inp, "targets_pretokenized": ch, "answer_choices": list(chs),
             "idx": [e, c], "is_correct": c in cor, "weight": 1.0}
            for e, (inp, chs, cor) in enumerate(zip(inputs, choices, correct))
            for c, ch in enumerate(chs)]


_WORDS = ("goose", "river", "stone", "cloud", "maple", "tiger", "lemon", "piano", "comet",
          "honey", "ember", "frost")
_TOPICS = ("World", "Sports", "Business", "Science")


def _ranked(prompt: str, n: int, offset: int, choices: Sequence[str]) -> list[dict]:
    return [{"inputs_pretokenized": prompt.format(w=_WORDS[(i + offset) % len(_WORDS)], i=i),
             "targets_pretokenized": choices[i % len(choices)], "answer_choices": list(choices)}
            for i in range(n)]


def write_p3_release(root: str | os.PathLike, examples: int = 12) -> tuple[list[str], list[str]]:
    """A miniature P3 under ``root``: three T0 held-in datasets (ag_news with two templates and
    a test split, rotten_tomatoes, samsum: a generation dataset) with ``examples`` train records
    per template, and two T0 held-out tasks (rte, copa) with score-eval folders.

    Returns:
      (held-in dataset names, held-out task names such as ``t0_heldout/rte``).
    """
    for template, prompt in (("classify", "Classify: {w} news {i}."),
                             ("which_section", "Which section fits {w} story {i}?")):
        write_p3(root, f"ag_news_{template}", "train", _ranked(prompt, examples, 0, _TOPICS))
        write_p3(root, f"ag_news_{template}", "test", _ranked(prompt, 4, 5, _TOPICS))
    review = "Review: the {w} film {i}. Is it good or bad?"
    write_p3(root, "rotten_tomatoes_Reviewer_Opinion_bad_good_choices", "train",
             _ranked(review, examples, 2, ("bad", "good")))
    write_p3(root, "rotten_tomatoes_Reviewer_Opinion_bad_good_choices", "validation",
             _ranked(review, 4, 7, ("bad", "good")))
    for split, n, offset in (("train", examples, 1), ("validation", 3, 9)):
        write_p3(root, "samsum_Summarize_this_dialogue_", split, [
            {"inputs_pretokenized": f"A: the {_WORDS[(i + offset) % 12]}? B: yes. Summarize:",
             "targets_pretokenized": f"about {_WORDS[(i + offset) % 12]}"} for i in range(n)])
    premises = [f"The {w} is here. Question: is the {w} here? True or False?" for w in _WORDS[:4]]
    write_p3(root, "super_glue_rte_GPT_3_style_score_eval", "validation", p3_score_eval(
        premises, [["True", "False"]] * 4, [{i % 2} for i in range(4)]))
    write_p3(root, "super_glue_copa_best_option_score_eval", "validation", p3_score_eval(
        [f"The {w} fell. What happened as a result?" for w in _WORDS[4:8]],
        [[f"it broke {i}", f"it sang {i}"] for i in range(4)], [{i % 2} for i in range(4)]))
    return ["ag_news", "rotten_tomatoes", "samsum"], ["t0_heldout/rte", "t0_heldout/copa"]


def write_flan_release(root: str | os.PathLike, examples: int = 20) -> list[str]:
    """A miniature Open-Orca/FLAN release under ``root`` (one jsonl file with the release's
    columns): a Flan 2021 task and two NIv2 tasks under their FLAN names, and a CoT task outside
    the release's expert pool, with ``examples`` zero-shot rows each, plus few-shot rows the
    builder leaves out. Returns the task names."""
    tasks = {"glue/sst2:2.0.0": ("Flan2021", lambda w, i: (f"Is '{w} {i}' positive?",
                                                           "yes" if i % 2 else "no")),
             "task001_copy_word": ("NIv2", lambda w, i: (f"Copy the word: {w}", w)),
             "task002_upper_case": ("NIv2", lambda w, i: (f"Upper-case: {w}", w.upper())),
             "cot_reverse": ("CoT", lambda w, i: (f"Reverse: {w}", w[::-1]))}
    os.makedirs(root, exist_ok=True)
    rows = []
    for name, (source, make) in tasks.items():
        for i in range(examples + 2):
            inp, tgt = make(_WORDS[i % len(_WORDS)], i)
            rows.append({"inputs": inp, "targets": tgt, "_task_name": name,
                         "_template_type": ("zs_opt", "zs_noopt")[i % 2] if i < examples
                         else "fs_opt", "_task_source": source, "_template_kwargs": "{}"})
    with open(os.path.join(root, "flan_zs.jsonl"), "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return list(tasks)


def write_niv2_tasks(root: str | os.PathLike, categories: Mapping[str, Sequence[str]]) -> None:
    """natural-instructions' ``tasks/`` folder under ``root``: one ``<task>.json`` per task with
    the dataset's keys, its ``Categories`` as given and two tiny instances."""
    os.makedirs(root, exist_ok=True)
    for task, cats in categories.items():
        data = {"Contributors": ["synthetic"], "Source": ["synthetic"], "URL": [],
                "Categories": list(cats), "Reasoning": [], "Definition": [f"Solve {task}."],
                "Positive Examples": [], "Negative Examples": [], "Input_language": ["English"],
                "Output_language": ["English"], "Instruction_language": ["English"],
                "Domains": ["Miscellaneous"],
                "Instances": [{"id": f"{task}-{i}", "input": w, "output": [w]}
                              for i, w in enumerate(_WORDS[:2])]}
        with open(os.path.join(root, f"{task}.json"), "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1)


def write_bigbench_release(bbh_root: str | os.PathLike, bbl_root: str | os.PathLike
                           ) -> list[str]:
    """One BIG-bench Hard task (``boolean_expressions``, lukaemon/bbh columns) and one BIG-bench
    Lite task (``strategyqa``, tasksource/bigbench columns), as jsonl files named by split.
    Returns the task names (``bbh/boolean_expressions``, ``bbl/strategyqa``)."""
    bbh = os.path.join(bbh_root, "boolean_expressions")
    os.makedirs(bbh, exist_ok=True)
    with open(os.path.join(bbh, "test-00000-of-00001.jsonl"), "w", encoding="utf-8") as f:
        for a in (True, False):
            for b in (True, False):
                f.write(json.dumps({"input": f"{a} and not {b}", "target": str(a and not b)})
                        + "\n")
    bbl = os.path.join(bbl_root, "strategyqa")
    os.makedirs(bbl, exist_ok=True)
    with open(os.path.join(bbl, "validation-00000-of-00001.jsonl"), "w", encoding="utf-8") as f:
        for i, w in enumerate(_WORDS[:4]):
            yes = i % 2 == 0
            f.write(json.dumps({"idx": i, "inputs": f"Q: can a {w} swim?",
                                "targets": ["Yes." if yes else "No."],
                                "multiple_choice_targets": ["Yes", "No"],
                                "multiple_choice_scores": [int(yes), int(not yes)]}) + "\n")
    return ["bbh/boolean_expressions", "bbl/strategyqa"]
