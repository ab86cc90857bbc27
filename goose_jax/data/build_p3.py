"""The training sets of the 36 T0 held-in experts, built from the P3 release as the original
release built them (``src/data/p3.py`` and ``colm/datasets/p3_t5xl.gin`` of r-three/phatgoose).

Train split (one file per dataset):
  * every template folder of the dataset (``p3.T0_HELDIN``), less the templates the release
    ignores: paws ``paraphrase-task`` and wiki_qa's six generation templates;
  * all (example, template) pairs, example-major (pair ``e * T + t``); when there are more than
    ``max_examples`` (500,000), that many are drawn without replacement with
    ``numpy.random.default_rng(seed)`` (seed 42) and written in the order drawn;
  * an empty target becomes ``<NO LABEL>``.

Validation split (the release's model-selection EVAL set):
  * the dataset's evaluation split (``test`` where the release uses it), its templates with
    answer choices (the P3 stand-in for promptsource's "original task" templates; all templates
    when none has choices), less the release's ignored templates;
  * one template per example, round robin (example ``i`` gets template ``i % T``);
  * for seven large datasets, 10,000 examples drawn first (``default_rng(seed).choice``).

Two datasets are special, as in the release:
  * app_reviews has only a train split: its examples are shuffled with ``RandomState(1234)``;
    the first 10,000 are the validation split (without the three generation templates), the
    rest the train split;
  * trec replaces every P3 template with one 50-way template on the fine label (the P3 trec
    templates do not fit today's dataset). The question and its fine label are read back from
    the P3 folders ``trec_fine_grained_open`` (fine label) and ``trec_pick_the_best_descriptor``
    (coarse label, which tells apart the three "Other" and the two "Description" labels).

Template order is the sorted folder name (promptsource sorts template names; the folder names
replace punctuation with ``_``, which can order a few templates differently).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence

import numpy as np

from goose_jax.data import p3
from goose_jax.data.builds import ExpertData, Row, file_stems, pick, write_build
from goose_jax.data.examples import Example, example_target
from goose_jax.errors import DataError
from goose_jax.progress import progress_bar

MAX_EXAMPLES = 500_000
SEED = 42
NO_LABEL = "<NO LABEL>"


def folder_template(name: str) -> str:
    """A promptsource template name as P3 spells it in folder names (punctuation runs -> ``_``;
    ``"Topic Prediction - Answer Only"`` -> ``Topic_Prediction_Answer_Only``)."""
    return re.sub(r"[^\w\d._]+", "_", name)


# Templates the release ignores (gin ``ignore_templates``), in promptsource's spelling.
IGNORED = {
    "paws": ("paraphrase-task",),
    "wiki_qa": ("Direct Answer to Question", "Generate Question from Topic", "Jeopardy style",
                "Topic Prediction - Answer Only", "Topic Prediction - Question Only",
                "Topic Prediction - Question and Answer Pair"),
}
IGNORED_EVAL = {
    "social_i_qa": ("Check if a random answer is valid or not",),
    "app_reviews": ("generate_review", "convert_to_rating", "convert_to_star_rating"),
}
# Datasets whose validation split is first cut to this many examples.
EVAL_CAP = 10_000
EVAL_CAPPED = ("amazon_polarity", "wiki_bio", "commonsense_qa", "cos_e", "dbpedia_14",
               "gigaword", "qqp")
APP_REVIEWS_EVAL = 10_000
APP_REVIEWS_SEED = 1234

# The release's 50-way TREC template: its answer choices, in the fine-label order of today's
# Hugging Face ``trec`` dataset.
TREC_CHOICES = (
    "Abbreviation.", "Expression abbreviated.", "Animal.", "Organ of body.", "Color.",
    "Invention, book and other creative piece.", "Currency name.", "Disease and medicine.",
    "Event.", "Food.", "Musical instrument.", "Language.", "Letter like a-z.", "Other entity.",
    "Plant.", "Product.", "Religion.", "Sport.", "Element and substance.", "Symbols and sign.",
    "Techniques and method.", "Equivalent term.", "Vehicle.", "Word with a special property.",
    "Definition of something.", "Description of something.", "Manner of an action.", "Reason.",
    "Group or organization of persons", "Individual.", "Title of a person.",
    "Description of a person.", "City.", "Country.", "Mountain.", "Other location.", "State.",
    "Postcode or other code.", "Number of something.", "Date.", "Distance, linear measure.",
    "Price.", "Order, rank.", "Other number.", "Lasting time of something.",
    "Percent, fraction.", "Speed.", "Temperature.", "Size, area and volume.", "Weight.",
)
TREC_FINE_FOLDER = "trec_fine_grained_open"
TREC_COARSE_FOLDER = "trec_pick_the_best_descriptor"
TREC_TEMPLATE = "fine_label_50_way"
# P3's fine-label names (promptsource) -> index in TREC_CHOICES; the coarse label (P3's
# pick_the_best_descriptor answer) decides between the labels that share a name.
_TREC_FINE = {
    "Abbreviation": 0, "Expression abbreviated": 1, "Animal": 2, "Organ of the body": 3,
    "Color": 4, "Creative Piece": 5, "Currency": 6, "Disease or medicine": 7, "Event": 8,
    "Food": 9, "Instrument": 10, "Language": 11, "Letter": 12, "Plant": 14, "Product": 15,
    "Religion": 16, "Sport": 17, "Substance": 18, "Symbol": 19, "Technique": 20, "Term": 21,
    "Vehicle": 22, "Word": 23, "Defintion": 24, "Manner": 26, "Reason": 27, "Group": 28,
    "Individual": 29, "Title": 30, "City": 32, "Country": 33, "Mountain": 34, "State": 36,
    "Code": 37, "Count": 38, "Date": 39, "Distance": 40, "Price": 41, "Order": 42,
    "Period": 44, "Percentage": 45, "Speed": 46, "Temperature": 47, "Size": 48, "Weight": 49,
}
_TREC_SHARED = {("Other", "Entity"): 13, ("Other", "Location"): 35, ("Other", "Quantity"): 43,
                ("Description", "Description"): 25, ("Description", "Person"): 31}


def trec_input(question: str) -> str:
    """The release's 50-way TREC prompt (its choices list printed as a Python list)."""
    return f"Question: {question}\nAnswer choices: {list(TREC_CHOICES)}\nAnswer:"


# --- reading ------------------------------------------------------------------------------------


def _excluded(dataset: str, table: dict) -> set[str]:
    return {folder_template(t) for t in table.get(dataset, ())}


def dataset_folders(root: str, dataset: str) -> dict[str, str]:
    """``{template: folder}`` of a held-in dataset's training templates (release exclusions
    applied).

    Raises:
      DataError: the dataset has no folder under the P3 root.
    """
    spec = p3.T0_HELDIN[dataset]
    if dataset == "trec":
        names = (TREC_FINE_FOLDER, TREC_COARSE_FOLDER)
        missing = [n for n in names if not os.path.isdir(os.path.join(p3.data_dir(root), n))]
        if missing:
            raise DataError(f"{os.path.join(p3.data_dir(root), missing[0])}: P3 folder missing "
                            "(the 50-way TREC template is rebuilt from it); download the trec "
                            "folders of P3 or leave trec out with --datasets")
        return {n: n for n in names}
    folders = {t: f for t, f in p3.templates(root, spec, score_eval=False).items()
               if t not in _excluded(dataset, IGNORED)}
    if not folders:
        raise DataError(f"{os.path.join(p3.data_dir(root), spec.prefix)}*: no P3 folder of the "
                        f"T0 held-in dataset {dataset!r}; download its folders of P3 or leave "
                        "it out with --datasets")
    return folders


def _read(root: str, folder: str, split: str, dataset: str, template: str) -> list[Example]:
    return p3.examples(p3.task_dir(root, folder), split, dataset=dataset, template=template)


def _row(ex: Example, *, choices: bool) -> Row:
    target = example_target(ex) or NO_LABEL
    return Row(ex.input, target, ex.template, ex.choices if choices else None)


def _eval_split(root: str, dataset: str, folders: dict[str, str]) -> str:
    spec = p3.T0_HELDIN[dataset]
    return p3.pick_split(p3.task_dir(root, next(iter(folders.values()))), spec.splits + ("val",))


def _check_train(root: str, folders: dict[str, str]) -> None:
    for folder in folders.values():
        p3.pick_split(p3.task_dir(root, folder), ("train",))


# --- the release's item selection ---------------------------------------------------------------


def pairs(per_template: Sequence[Sequence], cap: int | None, seed: int) -> list[tuple[int, int]]:
    """The (template, example) pairs the release trains on, in its order.

    Pair ``k = e * T + t`` stands for example ``e`` under template ``t``; pairs whose template has
    fewer than ``e + 1`` records (P3 leaves out examples a template cannot render) are skipped.
    Over ``cap`` pairs, ``cap`` of them are drawn without replacement with
    ``default_rng(seed).choice`` and kept in the order drawn.
    """
    lengths = np.array([len(r) for r in per_template], dtype=np.int64)
    n_t, n_e = len(lengths), int(lengths.max(initial=0))
    keys = np.flatnonzero(np.arange(n_e)[:, None] < lengths[None, :])  # e * T + t, row-major
    if cap is not None and len(keys) > cap:
        keys = keys[np.random.default_rng(seed).choice(len(keys), cap, replace=False)]
    return [(int(k) % n_t, int(k) // n_t) for k in keys]


def round_robin(per_template: Sequence[Sequence], cap: int | None, seed: int
                ) -> list[tuple[int, int]]:
    """The release's validation items: example ``e`` under template ``e % T`` (examples first
    cut to ``cap`` with ``default_rng(seed).choice``, in the order drawn)."""
    n_t = len(per_template)
    n_e = max((len(r) for r in per_template), default=0)
    order = np.arange(n_e)
    if cap is not None and n_e > cap:
        order = np.random.default_rng(seed).choice(n_e, cap, replace=False)
    out = []
    for i, e in enumerate(order.tolist()):
        t = i % n_t
        if e < len(per_template[t]):
            out.append((t, e))
    return out


# --- datasets -----------------------------------------------------------------------------------


def _templated(root: str, dataset: str, folders: dict[str, str], split: str
               ) -> list[list[Example]]:
    return [_read(root, f, split, dataset, t) for t, f in folders.items()]


def _with_choices(per_template: list[list[Example]]) -> list[int]:
    ranked = [i for i, exs in enumerate(per_template) if exs and exs[0].choices]
    return ranked or list(range(len(per_template)))


def _build_generic(root: str, dataset: str, folders: dict[str, str], cap: int | None,
                   seed: int) -> ExpertData:
    train = _templated(root, dataset, folders, "train")
    rows = [_row(train[t][e], choices=False) for t, e in pairs(train, cap, seed)]
    split = _eval_split(root, dataset, folders)
    skip = _excluded(dataset, IGNORED_EVAL)
    evals = {t: f for t, f in folders.items() if t not in skip}
    per = _templated(root, dataset, evals, split)
    per = [per[i] for i in _with_choices(per)]
    eval_cap = EVAL_CAP if dataset in EVAL_CAPPED else None
    val = [_row(per[t][e], choices=True) for t, e in round_robin(per, eval_cap, seed)]
    return ExpertData(dataset, rows, val)


def _build_app_reviews(root: str, folders: dict[str, str], cap: int | None, seed: int
                       ) -> ExpertData:
    every = _templated(root, "app_reviews", folders, "train")
    sizes = {len(x) for x in every}
    if len(sizes) != 1:
        raise DataError(f"{p3.data_dir(root)}: the app_reviews folders hold different numbers "
                        f"of train records ({sorted(sizes)}); the release's split needs every "
                        "template on every example: download the folders again")
    order = np.random.RandomState(APP_REVIEWS_SEED).permutation(sizes.pop()).tolist()
    heldout, rest = order[:APP_REVIEWS_EVAL], order[APP_REVIEWS_EVAL:]
    train = [[exs[i] for i in rest] for exs in every]
    rows = [_row(train[t][e], choices=False) for t, e in pairs(train, cap, seed)]
    skip = _excluded("app_reviews", IGNORED_EVAL)
    keep = [i for i, t in enumerate(folders) if t not in skip]
    per = [[every[i][j] for j in heldout] for i in keep]
    val = [_row(per[t][e], choices=True) for t, e in round_robin(per, None, seed)]
    return ExpertData("app_reviews", rows, val)


def trec_examples(root: str, split: str) -> list[Example]:
    """The trec questions of a split under the release's 50-way template (the answer is the
    question's fine label)."""
    fine = _read(root, TREC_FINE_FOLDER, split, "trec", TREC_TEMPLATE)
    coarse = _read(root, TREC_COARSE_FOLDER, split, "trec", TREC_TEMPLATE)
    if len(fine) != len(coarse):
        raise DataError(f"{p3.data_dir(root)}: {TREC_FINE_FOLDER} and {TREC_COARSE_FOLDER} hold "
                        f"{len(fine)} and {len(coarse)} {split} records; the 50-way template "
                        "needs both labels of every question: download the folders again")
    out = []
    for i, (f, c) in enumerate(zip(fine, coarse)):
        question = f.input.split("\n", 1)[-1].strip()
        name, kind = example_target(f), example_target(c)
        label = _TREC_FINE.get(name, _TREC_SHARED.get((name, kind)))
        if label is None or question not in c.input:
            raise DataError(f"{p3.task_dir(root, TREC_FINE_FOLDER)}: {split} record {i}: "
                            f"cannot map the labels ({name!r}, {kind!r}) of {question!r} onto "
                            "the 50-way template; is this the P3 trec folder?")
        out.append(Example(trec_input(question), TREC_CHOICES, (label,), (), "trec",
                           TREC_TEMPLATE, str(i)))
    return out


def _build_trec(root: str, cap: int | None, seed: int) -> ExpertData:
    train = [trec_examples(root, "train")]
    rows = [_row(train[0][e], choices=False) for _, e in pairs(train, cap, seed)]
    split = p3.pick_split(p3.task_dir(root, TREC_FINE_FOLDER), p3.T0_HELDIN["trec"].splits)
    val = [_row(ex, choices=True) for ex in trec_examples(root, split)]
    return ExpertData("trec", rows, val)


def build_dataset(root: str, dataset: str, folders: dict[str, str], cap: int | None,
                  seed: int) -> ExpertData:
    """One held-in dataset's train and validation rows (see the module doc)."""
    if dataset == "trec":
        return _build_trec(root, cap, seed)
    if dataset == "app_reviews":
        return _build_app_reviews(root, folders, cap, seed)
    return _build_generic(root, dataset, folders, cap, seed)


def build_p3_heldin(root: str, out: str, *, datasets: Sequence[str] | None = None,
                    max_examples: int | None = MAX_EXAMPLES, seed: int = SEED,
                    progress: Callable | None = None) -> dict:
    """Builds the T0 held-in training sets from the P3 folder ``root`` into ``out`` (a staging
    folder: see ``goose_jax.data.builds``); returns the summary.

    Every dataset's folders and train splits are checked before the first is read.

    Raises:
      DataError: a missing P3 root, dataset folder or split; an unreadable (truncated) TFRecord.
      UsageError: an unknown name in ``datasets``.
    """
    names = pick(list(p3.T0_HELDIN), datasets, "T0 held-in dataset")
    folders = {d: dataset_folders(root, d) for d in names}
    for d in names:
        _check_train(root, folders[d])
    settings = {"source": "p3-heldin", "root": os.path.abspath(root), "seed": seed,
                "max_examples": max_examples}
    built = (build_dataset(root, d, folders[d], max_examples, seed)
             for d in (progress or progress_bar)(names, desc="goose-data p3-heldin",
                                                 unit="dataset"))
    return write_build(out, built, settings, stems=file_stems(names))
