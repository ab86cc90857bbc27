"""BIG-bench Hard and BIG-bench Lite from local Hugging Face datasets (never downloads).

``<root>/<task>/`` is a dataset saved with ``save_to_disk`` (a ``DatasetDict`` or a ``Dataset``),
or a folder of ``.parquet`` / ``.jsonl`` / ``.json`` files named by split
(``train-00000-of-00001.parquet``, as a Hub snapshot has them). Two layouts are understood:

  - BIG-bench (``tasksource/bigbench``): ``inputs``, ``targets`` (list), ``multiple_choice_targets``
    and ``multiple_choice_scores`` (1 marks a correct choice; several allowed), ``idx``.
  - BBH (``lukaemon/bbh``): ``input`` and ``target`` only; the choices are the task's distinct
    targets. A BBH task split into object counts (``logical_deduction_three_objects``, ...) is
    read from all its variants, each variant with its own choices.

The prompt is ``input + "\\nAnswer:"`` (zero-shot, no chain of thought). Tasks without choices
are generation tasks, scored as the release scored them (``src/data/bigbench.py:30-37`` of
r-three/phatgoose): exact match and ROUGE-L against ``targets[0]`` alone, exact match of
``object_counting`` against any target. Their generation length is the release's
``max_gen_length`` (``colm/datasets/bigbench.gin``) less one: it is HF ``generate``'s
``max_length``, which counts the decoder start token.
"""

from __future__ import annotations

import glob
import json
import os

from goose_jax.core.errors import DataError, one_line
from goose_jax.data.examples import Example

PROMPT_SUFFIX = "\nAnswer:"

# 22 of BBH's 23 tasks (dyck_languages dropped, as the paper).
BBH_TASKS = (
    "boolean_expressions", "causal_judgment", "date_understanding", "disambiguation_qa",
    "formal_fallacies", "geometric_shapes", "hyperbaton", "logical_deduction",
    "movie_recommendation", "multistep_arithmetic_two", "navigate", "object_counting",
    "penguins_in_a_table", "reasoning_about_colored_objects", "ruin_names",
    "salient_translation_error_detection", "snarks", "sports_understanding",
    "temporal_sequences", "tracking_shuffled_objects", "web_of_lies", "word_sorting",
)
# 17 of BIG-bench Lite's 24 tasks (the paper's selection).
BBL_TASKS = (
    "bbq_lite_json", "conceptual_combinations", "conlang_translation",
    "formal_fallacies_syllogisms_negation", "hindu_knowledge", "known_unknowns",
    "linguistics_puzzles", "logic_grid_puzzle", "logical_deduction", "novel_concepts",
    "operators", "play_dialog_same_or_different", "repeat_copy_logic", "strange_stories",
    "strategyqa", "vitaminc_fact_verification", "winowhy",
)
# BBH tasks the release read from a tasksource/bigbench task of another name (bigbench.gin).
RELEASE_NAMES = {"formal_fallacies": "formal_fallacies_syllogisms_negation"}
# Generation tasks: (metric, the release's max_gen_length), colm/datasets/bigbench.gin.
GENERATION = {
    "multistep_arithmetic_two": ("exact_match", 8),
    "word_sorting": ("exact_match", 128),
    "object_counting": ("exact_match_any", 8),
    "linguistics_puzzles": ("exact_match", 128),
    "operators": ("exact_match", 4),
    "repeat_copy_logic": ("exact_match", 64),
    "conlang_translation": ("rouge_l", 64),
}
# Rank tasks where any choice marked correct counts.
MULTI_ANSWER = frozenset({"geometric_shapes", "reasoning_about_colored_objects", "novel_concepts"})
# Fixed choices for BBH-layout tasks whose targets are a closed set.
FIXED_CHOICES = {"boolean_expressions": ("True", "False"), "web_of_lies": ("Yes", "No")}
SPLIT_PREFERENCE = (("train_validation",), ("train", "validation"), ("test",), ("validation",),
                    ("train",))
_FILE_EXTS = (".parquet", ".jsonl", ".json")


def task_kind(task: str) -> tuple[str, str, int]:
    """(kind, metric, max_new_tokens) of a BIG-bench task (new tokens: ``max_gen_length - 1``,
    see the module doc)."""
    if task in GENERATION:
        metric, n = GENERATION[task]
        return "generate", metric, n - 1
    return "rank", "accuracy", 0


# --- reading ------------------------------------------------------------------------------------


def _read_saved(path: str) -> dict[str, list[dict]]:
    from datasets import Dataset, DatasetDict, load_from_disk

    try:
        ds = load_from_disk(path)
    except Exception as e:  # datasets raises FileNotFoundError, ValueError and others.
        raise DataError(f"{path}: cannot load the saved dataset: {type(e).__name__}: "
                        f"{one_line(e)}") from None
    if isinstance(ds, DatasetDict):
        return {name: split.to_list() for name, split in ds.items()}
    assert isinstance(ds, Dataset)
    return {str(ds.split) if ds.split else "train": ds.to_list()}


def _read_files(path: str) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    files = sorted(f for ext in _FILE_EXTS for f in glob.glob(os.path.join(path, f"*{ext}")))
    for f in files:
        split = os.path.basename(f).split("-")[0].split(".")[0]
        try:
            if f.endswith(".parquet"):
                import pyarrow.parquet as pq

                rows = pq.read_table(f).to_pylist()
            else:
                with open(f, encoding="utf-8") as fh:
                    text = fh.read()
                rows = ([json.loads(line) for line in text.splitlines() if line.strip()]
                        if f.endswith(".jsonl") else json.loads(text))
                if isinstance(rows, dict):
                    rows = rows.get("examples", [rows])
        except (OSError, ValueError) as e:
            raise DataError(f"{f}: unreadable data file ({type(e).__name__}: {e})") from None
        out.setdefault(split, []).extend(rows)
    return out


def read_task_dir(path: str) -> dict[str, list[dict]]:
    """``{split: rows}`` of one task folder (saved dataset or data files)."""
    if not os.path.isdir(path):
        raise DataError(f"{path}: BIG-bench task directory does not exist")
    names = set(os.listdir(path))
    if names & {"dataset_dict.json", "dataset_info.json", "state.json"}:
        return _read_saved(path)
    rows = _read_files(path)
    if not rows:
        raise DataError(f"{path}: neither a saved Hugging Face dataset (dataset_dict.json / "
                        f"state.json) nor data files ({', '.join(_FILE_EXTS)})")
    return rows


def select_rows(by_split: dict[str, list[dict]], path: str,
                split: str | None = None) -> tuple[list[dict], str]:
    """The rows of ``split``, or of the first available of ``SPLIT_PREFERENCE`` (joined)."""
    if split is not None:
        parts = split.split("+")
        missing = [p for p in parts if p not in by_split]
        if missing:
            raise DataError(f"{path}: no split {missing[0]!r} (found: {sorted(by_split)})")
        return [r for p in parts for r in by_split[p]], split
    for parts in SPLIT_PREFERENCE:
        if all(p in by_split for p in parts):
            return [r for p in parts for r in by_split[p]], "+".join(parts)
    name = sorted(by_split)[0]
    return by_split[name], name


def task_dirs(root: str, task: str) -> list[str]:
    """The folders of ``task`` under ``root``: ``<task>``, else the release's source name
    (``RELEASE_NAMES``), else BBH's per-object-count variants."""
    for name in (task, RELEASE_NAMES.get(task)):
        if name and os.path.isdir(os.path.join(root, name)):
            return [os.path.join(root, name)]
    return sorted(d for d in glob.glob(os.path.join(root, f"{task}_*_objects")) if os.path.isdir(d))


def _label(row: dict, choices: list[str], targets: list[str], multi: bool) -> tuple[int, ...]:
    scores = row.get("multiple_choice_scores")
    if scores is not None and len(scores) == len(choices):
        correct = tuple(i for i, s in enumerate(scores) if s)
    else:
        wanted = {t.strip() for t in targets}
        correct = tuple(i for i, c in enumerate(choices) if c.strip() in wanted)
    if multi or len(correct) <= 1:
        return correct
    # One label, as the original: the correct choice equal to the longest target if any.
    for t in sorted(targets, key=len, reverse=True):
        for i in correct:
            if choices[i].strip() == t.strip():
                return (i,)
    return correct[:1]


def _check_row(row: dict, i: int, path: str, kind: str) -> None:
    """Refuses a row that cannot be scored (it would otherwise drop out of the task's score)."""
    text = row.get("inputs", row.get("input"))
    raw = row.get("targets", row.get("target"))
    targets = [raw] if isinstance(raw, str) else raw
    problem = None
    if not isinstance(text, str) or not text.strip():
        problem = f"its input is {text!r}, expected non-empty text"
    elif not (isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets)):
        problem = f"its target(s) are {raw!r}, expected text or a non-empty list of text"
    elif kind == "rank" and "multiple_choice_targets" in row and not (
            isinstance(row["multiple_choice_targets"], list) and row["multiple_choice_targets"]
            and all(isinstance(c, str) for c in row["multiple_choice_targets"])):
        problem = (f"its multiple_choice_targets are {row['multiple_choice_targets']!r}, "
                   "expected a non-empty list of text")
    if problem:
        raise DataError(f"{path}: row {i}: {problem}; a malformed row is refused rather than "
                        "skipped (fix or remove it)")


def _rows_to_examples(rows: list[dict], task: str, dataset: str, path: str) -> list[Example]:
    kind, metric, _ = task_kind(task)
    multi = task in MULTI_ANSWER
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or ("inputs" not in row and "input" not in row):
            found = sorted(row) if isinstance(row, dict) else type(row).__name__
            raise DataError(f"{path}: row {i} has neither 'inputs' (BIG-bench layout) nor 'input' "
                            f"(BBH layout); found: {found}")
        _check_row(row, i, path, kind)
    bbh_layout = rows and "input" in rows[0] and "inputs" not in rows[0]
    if bbh_layout:
        bbh_choices = FIXED_CHOICES.get(task) or tuple(sorted({str(r["target"]).strip()
                                                               for r in rows}))
    out = []
    for i, row in enumerate(rows):
        text = row.get("inputs", row.get("input")) + PROMPT_SUFFIX
        raw_targets = row.get("targets", row.get("target", []))
        given = [raw_targets] if isinstance(raw_targets, str) else list(raw_targets or [])
        targets = sorted((str(t) for t in given), key=len, reverse=True)
        ex_id = str(row.get("idx", i))
        if kind == "generate":
            # The release's references: targets[0], or every target for exact_match_any.
            refs = [str(t) for t in given] if metric == "exact_match_any" else [str(given[0])]
            out.append(Example(text, None, (), tuple(t.strip() for t in refs), dataset, "",
                               ex_id))
            continue
        choices = list(row.get("multiple_choice_targets") or (bbh_choices if bbh_layout else []))
        answers = _label(row, choices, targets, multi) if choices else ()
        if not answers:
            raise DataError(f"{path}: row {i}: no answer choice matches its target(s) "
                            f"{targets[:3]} (choices: {choices[:5]}); a malformed row is "
                            "refused rather than skipped (fix or remove it)")
        out.append(Example(text, tuple(c.strip() for c in choices) or None, answers, (), dataset,
                           "", ex_id))
    return out


def check_rows(rows: list[dict], task: str, path: str) -> None:
    """Refuses rows of ``task`` that goose-eval could not score (``DataError`` naming ``path``
    and the row)."""
    _rows_to_examples(rows, task, task, path)


def examples(root: str | os.PathLike, task: str, *, dataset: str | None = None,
             split: str | None = None) -> list[Example]:
    """The examples of one BIG-bench task under ``root``.

    Args:
      root: folder holding one sub-folder per task.
      task: the task name (``navigate``); BBH per-object-count variants are merged.
      dataset: the dataset name examples are pooled into (default: ``task``).
      split: a split, or several joined with ``+``; default: ``SPLIT_PREFERENCE``.

    Raises:
      DataError: the root or task folder is missing or unreadable.
    """
    root = os.path.abspath(os.path.expanduser(os.fspath(root)))
    if not os.path.isdir(root):
        raise DataError(f"{root}: BIG-bench data directory does not exist")
    dirs = task_dirs(root, task)
    if not dirs:
        raise DataError(f"{os.path.join(root, task)}: BIG-bench task directory does not exist")
    out = []
    for d in dirs:
        rows, _ = select_rows(read_task_dir(d), d, split)
        out.extend(_rows_to_examples(rows, task, dataset or task, d))
    if len(dirs) > 1:  # ids must stay unique across variants
        out = [Example(e.input, e.choices, e.answers, e.references, e.dataset, e.template,
                       f"{n}") for n, e in enumerate(out)]
    return out
