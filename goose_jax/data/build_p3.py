"""The training sets of the 36 T0 held-in experts, built as the original release built them
(``src/data/p3.py`` and ``colm/datasets/p3_t5xl.gin`` of r-three/phatgoose), from either of two
sources, chosen per dataset:

  * the faithful one, as the release read them: each dataset's Hugging Face copy saved on disk
    (``HF_DIR/<dataset>[/<subset>]``, ``HF_PATHS``) with promptsource's templates rendered on
    its examples (``goose_jax.data.prompt_templates``);
  * P3's folders as published (already rendered): the three adversarial QA subsets read as one
    dataset, the release's ``adversarialQA`` (per template, dbidaf then dbert then droberta).
    CommonsenseQA (no P3 folders) and HotpotQA (P3 has only KILT's closed-book copy, the release
    used ``hotpot_qa/fullwiki`` with its context paragraphs) come from the first source only.

A dataset whose saved copy is under ``HF_DIR`` is built from it; otherwise from P3. The rules
below hold for both (P3 reads "templates" as its folders).

Train split (one file per dataset):
  * every template folder of the dataset (``p3.T0_HELDIN``), less the templates the release
    ignores: paws ``paraphrase-task`` and wiki_qa's six generation templates;
  * all (example, template) pairs, example-major (pair ``e * T + t``); when there are more than
    ``max_examples`` (500,000), that many are drawn without replacement with
    ``numpy.random.default_rng(seed)`` (seed 42) and written in the order drawn;
  * an empty target becomes ``<NO LABEL>``; from the Hugging Face source, a template that
    fails on an example (or does not give prompt ||| target) gives ``<NO INPUT>`` for both, as
    in the release (P3 leaves such pairs out);
  * each row carries its template's answer choices (an empty list for a template without),
    which the retrieval index embeds as the release does.

Validation split (the release's model-selection EVAL set):
  * the dataset's evaluation split (``test`` where the release uses it), promptsource's
    "original task" templates (all templates for quarel and app_reviews, as the release) less
    the release's ignored templates; from P3, which does not record "original task", its
    templates with answer choices; of those, the templates with choices when some have them
    (one metric per validation file);
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

  * duorc (Hugging Face source): an example without an answer takes as its answer what the
    "original task" template ``i % T`` renders for ``no_answer`` (the release's
    ``P3DuorcDataset``).

Template order is the sorted template name (promptsource's), or the sorted folder name for P3
(folder names replace punctuation with ``_``, which can order a few templates differently);
rows name templates as P3's folders spell them.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Sequence

import numpy as np

from goose_jax.core.errors import DataError
from goose_jax.core.progress import progress_bar
from goose_jax.data import p3, saved_datasets
from goose_jax.data import prompt_templates as pt
from goose_jax.data.builds import ExpertData, Row, file_stems, pick, write_build
from goose_jax.data.examples import Example, example_target

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


# P3 folders of the adversarial QA subsets, in the order their examples are joined.
ADVERSARIAL_SUBSETS = ("dbidaf", "dbert", "droberta")
# Datasets P3 lacks, or holds in another form than the release trained on.
P3_LACKS = {
    "commonsense_qa": "P3 has no commonsense_qa folders",
    "hotpot_qa": "P3 holds only KILT's closed-book copy (kilt_tasks_hotpotqa_*), not "
                 "hotpot_qa/fullwiki with its context paragraphs",
}


def dataset_folders(root: str, dataset: str) -> dict[str, tuple[str, ...]]:
    """``{template: folders}`` of a held-in dataset's training templates in P3 (release
    exclusions applied); adversarial QA's templates join the folders of its three subsets.

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
        return {n: (n,) for n in names}
    if dataset == "adversarial_qa":
        joined: dict[str, list[str]] = {}
        for subset in ADVERSARIAL_SUBSETS:
            prefix = f"{spec.prefix}{subset}_"
            found = p3.templates(root, p3.DatasetPrefix(prefix), score_eval=False)
            if not found:
                raise DataError(f"{os.path.join(p3.data_dir(root), prefix)}*: no P3 folder of "
                                f"adversarial QA's {subset} subset (the release's adversarialQA "
                                f"joins {', '.join(ADVERSARIAL_SUBSETS)}); download its folders")
            for t, f in found.items():
                joined.setdefault(t, []).append(f)
        folders = {t: tuple(f) for t, f in sorted(joined.items())}
    else:
        folders = {t: (f,) for t, f in p3.templates(root, spec, score_eval=False).items()}
    folders = {t: f for t, f in folders.items() if t not in _excluded(dataset, IGNORED)}
    if not folders:
        raise DataError(f"{os.path.join(p3.data_dir(root), spec.prefix)}*: no P3 folder of the "
                        f"T0 held-in dataset {dataset!r}; download its folders of P3 or leave "
                        "it out with --datasets")
    return folders


def _read(root: str, folders: tuple[str, ...], split: str, dataset: str, template: str
          ) -> list[Example]:
    return [ex for f in folders
            for ex in p3.examples(p3.task_dir(root, f), split, dataset=dataset,
                                  template=template)]


def _row(ex: Example, *, train: bool) -> Row:
    """A P3 example as a row: training rows carry the template's choices (empty when it has
    none), validation rows only a rank-classified example's."""
    target = example_target(ex) or NO_LABEL
    return Row(ex.input, target, ex.template, (ex.choices or ()) if train else ex.choices)


def _eval_split(root: str, dataset: str, folders: dict[str, tuple[str, ...]]) -> str:
    spec = p3.T0_HELDIN[dataset]
    first = next(iter(folders.values()))[0]
    return p3.pick_split(p3.task_dir(root, first), spec.splits + ("val",))


def _check_train(root: str, folders: dict[str, tuple[str, ...]]) -> None:
    for names in folders.values():
        for folder in names:
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


def _templated(root: str, dataset: str, folders: dict[str, tuple[str, ...]], split: str
               ) -> list[list[Example]]:
    return [_read(root, f, split, dataset, t) for t, f in folders.items()]


def _with_choices(per_template: list[list[Example]]) -> list[int]:
    ranked = [i for i, exs in enumerate(per_template) if exs and exs[0].choices]
    return ranked or list(range(len(per_template)))


def _build_generic(root: str, dataset: str, folders: dict[str, tuple[str, ...]],
                   cap: int | None,
                   seed: int) -> ExpertData:
    train = _templated(root, dataset, folders, "train")
    rows = [_row(train[t][e], train=True) for t, e in pairs(train, cap, seed)]
    split = _eval_split(root, dataset, folders)
    skip = _excluded(dataset, IGNORED_EVAL)
    evals = {t: f for t, f in folders.items() if t not in skip}
    per = _templated(root, dataset, evals, split)
    per = [per[i] for i in _with_choices(per)]
    eval_cap = EVAL_CAP if dataset in EVAL_CAPPED else None
    val = [_row(per[t][e], train=False) for t, e in round_robin(per, eval_cap, seed)]
    return ExpertData(dataset, rows, val)


def _build_app_reviews(root: str, folders: dict[str, tuple[str, ...]], cap: int | None,
                       seed: int) -> ExpertData:
    every = _templated(root, "app_reviews", folders, "train")
    sizes = {len(x) for x in every}
    if len(sizes) != 1:
        raise DataError(f"{p3.data_dir(root)}: the app_reviews folders hold different numbers "
                        f"of train records ({sorted(sizes)}); the release's split needs every "
                        "template on every example: download the folders again")
    order = np.random.RandomState(APP_REVIEWS_SEED).permutation(sizes.pop()).tolist()
    heldout, rest = order[:APP_REVIEWS_EVAL], order[APP_REVIEWS_EVAL:]
    train = [[exs[i] for i in rest] for exs in every]
    rows = [_row(train[t][e], train=True) for t, e in pairs(train, cap, seed)]
    skip = _excluded("app_reviews", IGNORED_EVAL)
    keep = [i for i, t in enumerate(folders) if t not in skip]
    per = [[every[i][j] for j in heldout] for i in keep]
    val = [_row(per[t][e], train=False) for t, e in round_robin(per, None, seed)]
    return ExpertData("app_reviews", rows, val)


def trec_examples(root: str, split: str) -> list[Example]:
    """The trec questions of a split under the release's 50-way template (the answer is the
    question's fine label)."""
    fine = _read(root, (TREC_FINE_FOLDER,), split, "trec", TREC_TEMPLATE)
    coarse = _read(root, (TREC_COARSE_FOLDER,), split, "trec", TREC_TEMPLATE)
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
    rows = [_row(train[0][e], train=True) for _, e in pairs(train, cap, seed)]
    split = p3.pick_split(p3.task_dir(root, TREC_FINE_FOLDER), p3.T0_HELDIN["trec"].splits)
    val = [_row(ex, train=False) for ex in trec_examples(root, split)]
    return ExpertData("trec", rows, val)


def build_dataset(root: str, dataset: str, folders: dict[str, tuple[str, ...]],
                  cap: int | None, seed: int) -> ExpertData:
    """One held-in dataset's train and validation rows from P3 (see the module doc)."""
    if dataset == "trec":
        data = _build_trec(root, cap, seed)
    elif dataset == "app_reviews":
        data = _build_app_reviews(root, folders, cap, seed)
    else:
        data = _build_generic(root, dataset, folders, cap, seed)
    data.source = "p3"
    return data


# --- the Hugging Face source --------------------------------------------------------------------

# Each held-in dataset's Hugging Face path (and promptsource's), as the release names it
# (``dataset_path`` in colm/datasets/p3_t5xl.gin).
HF_PATHS: dict[str, tuple[str, ...]] = {
    **{d: (d,) for d in p3.T0_HELDIN},
    "paws": ("paws", "labeled_final"),
    "duorc": ("duorc", "ParaphraseRC"),
    "mrpc": ("glue", "mrpc"),
    "qqp": ("glue", "qqp"),
    "cos_e": ("cos_e", "v1.11"),
    "wiki_hop": ("wiki_hop", "original"),
    "hotpot_qa": ("hotpot_qa", "fullwiki"),
    "adversarial_qa": ("adversarial_qa", "adversarialQA"),
    "cnn_dailymail": ("cnn_dailymail", "3.0.0"),
}
# The release's EVAL split where it is not "validation".
HF_EVAL_SPLIT = {"ag_news": "test", "amazon_polarity": "test", "dbpedia_14": "test",
                 "imdb": "test", "yelp_review_full": "test", "trec": "test", "wiki_bio": "val",
                 "app_reviews": "train"}
# Validation on every template, not only the "original task" ones (gin include_templates="all").
EVAL_ALL_TEMPLATES = ("quarel", "app_reviews")


@dataclasses.dataclass
class HFSource:
    """A held-in dataset's saved Hugging Face copy and its promptsource templates."""

    folder: str
    templates: list[pt.Template]
    template_file: str


def hf_folder(hf_dir: str, dataset: str) -> str:
    """The folder of ``dataset``'s saved Hugging Face copy under ``hf_dir``."""
    return os.path.join(os.path.abspath(os.path.expanduser(hf_dir)), *HF_PATHS[dataset])


def hf_source(hf_dir: str, templates_root: str | None, dataset: str) -> HFSource:
    """The saved copy's folder and templates, after checking both and the splits the build
    reads.

    Raises:
      DataError: a missing template file or split.
    """
    folder = hf_folder(hf_dir, dataset)
    have = saved_datasets.splits(folder)
    for split in dict.fromkeys(("train", HF_EVAL_SPLIT.get(dataset, "validation"))):
        if split not in have:
            raise DataError(f"{folder}: the saved {'/'.join(HF_PATHS[dataset])} has no "
                            f"{split!r} split (found: {', '.join(have) or 'none'})")
    if dataset == "trec":   # the release's own 50-way template replaces promptsource's
        return HFSource(folder, [], "")
    root = pt.templates_root(templates_root)
    return HFSource(folder, pt.read_templates(root, *HF_PATHS[dataset]),
                    pt.template_file(root, *HF_PATHS[dataset]))


def _ignored(dataset: str, table: dict) -> set[str]:
    return set(table.get(dataset, ()))


def _duorc_answers(templates: list[pt.Template]) -> list[list[str] | None]:
    """Per template: the answer an unanswerable duorc example takes when the release's
    ``P3DuorcDataset`` picks that template (its ``no_answer`` rendering; None: not an "original
    task" template, the example keeps its empty answers)."""
    from jinja2.sandbox import SandboxedEnvironment

    env = SandboxedEnvironment()
    out: list[list[str] | None] = []
    for t in templates:
        if not t.original_task:
            out.append(None)
            continue
        try:
            parts = env.from_string(t.jinja).render(no_answer=True).split("|||", 1)
        except Exception as e:
            raise DataError(f"duorc template {t.name!r}: cannot render it for an unanswerable "
                            f"question ({type(e).__name__}: {e})") from None
        out.append([parts[1].strip() if len(parts) == 2 else ""])
    return out


def _examples(split: saved_datasets.SavedSplit, indices, dataset: str,
              templates: list[pt.Template], order: list[int] | None = None) -> dict[int, dict]:
    """``{i: example}`` for the positions ``i`` wanted (positions in ``order``, the release's
    example list, when given), with duorc's unanswerable examples filled in."""
    wanted = sorted({int(i) for i in indices})
    rows = split.rows([order[i] for i in wanted] if order is not None else wanted)
    out = dict(zip(wanted, rows))
    if dataset == "duorc":
        fills = _duorc_answers(templates)
        for i, ex in out.items():
            fill = fills[i % len(templates)]
            if ex.get("no_answer") and fill is not None:
                ex["answers"] = fill
    return out


def _hf_row(template: pt.Template, example: dict, seed: int, index: int, *, train: bool
            ) -> Row:
    prompt, target, choices = pt.render(template, example, seed, index)
    name = folder_template(template.name)
    if train:
        return Row(prompt, target, name, tuple(choices or ()))
    if choices:
        return Row(prompt, choices[pt.pick_choice(target, choices)], name, tuple(choices))
    return Row(prompt, target, name, None)


def _trec_hf_row(example: dict, where: str) -> Row:
    label = example.get("fine_label", example.get("label-fine"))
    if not isinstance(label, int) or not 0 <= label < len(TREC_CHOICES):
        raise DataError(f"{where}: a trec example without a fine label in 0..49 "
                        f"(fine_label = {label!r}); is this the Hugging Face trec dataset?")
    return Row(trec_input(example["text"]), TREC_CHOICES[label], TREC_TEMPLATE, TREC_CHOICES)


def build_hf_dataset(source: HFSource, dataset: str, cap: int | None, seed: int
                     ) -> ExpertData:
    """One held-in dataset's train and validation rows from its Hugging Face copy and
    promptsource templates (see the module doc)."""
    train_split = saved_datasets.SavedSplit(source.folder, "train")
    eval_name = HF_EVAL_SPLIT.get(dataset, "validation")
    eval_split = (train_split if eval_name == "train"
                  else saved_datasets.SavedSplit(source.folder, eval_name))
    if dataset == "trec":
        keys = pairs([range(len(train_split))], cap, seed)
        got = _examples(train_split, [e for _, e in keys], dataset, [])
        rows = [_trec_hf_row(got[e], train_split.where) for _, e in keys]
        val = [_trec_hf_row(ex, eval_split.where)
               for ex in eval_split.rows(range(len(eval_split)))]
        return ExpertData(dataset, rows, val, "huggingface")
    train_order = eval_order = None
    n_train, n_eval = len(train_split), len(eval_split)
    if dataset == "app_reviews":
        order = np.random.RandomState(APP_REVIEWS_SEED).permutation(n_train).tolist()
        eval_order, train_order = order[:APP_REVIEWS_EVAL], order[APP_REVIEWS_EVAL:]
        n_train, n_eval = len(train_order), len(eval_order)
    templates = [t for t in source.templates if t.name not in _ignored(dataset, IGNORED)]
    if not templates:
        raise DataError(f"{source.template_file}: every template of {dataset} is one the release "
                        "ignores")
    keys = pairs([range(n_train)] * len(templates), cap, seed)
    got = _examples(train_split, [e for _, e in keys], dataset, templates, train_order)
    rows = [_hf_row(templates[t], got[e], seed, e, train=True) for t, e in keys]

    skip = _ignored(dataset, IGNORED) | _ignored(dataset, IGNORED_EVAL)
    evals = [t for t in source.templates if t.name not in skip
             and (dataset in EVAL_ALL_TEMPLATES or t.original_task)]
    ranked = [t for t in evals if t.answer_choices is not None]
    evals = ranked or evals
    if not evals:
        raise DataError(f"{source.template_file}: no \"original task\" template for {dataset}'s "
                        "validation split")
    cap_eval = EVAL_CAP if dataset in EVAL_CAPPED else None
    picked = round_robin([range(n_eval)] * len(evals), cap_eval, seed)
    got = _examples(eval_split, [e for _, e in picked], dataset, evals, eval_order)
    val = [_hf_row(evals[t], got[e], seed, e, train=False) for t, e in picked]
    return ExpertData(dataset, rows, val, "huggingface")


# --- both sources -------------------------------------------------------------------------------


def _plan(dataset: str, root: str | None, hf_dir: str | None, templates: str | None):
    """``("huggingface", HFSource)`` or ``("p3", folders)`` for one dataset.

    Raises:
      DataError: in neither source (one line saying what to put where).
    """
    hf_path = "/".join(HF_PATHS[dataset])
    if hf_dir and saved_datasets.is_dataset(hf_folder(hf_dir, dataset)):
        return "huggingface", hf_source(hf_dir, templates, dataset)
    put = (f"save the Hugging Face dataset {hf_path} (datasets.save_to_disk or parquet) as "
           f"{os.path.join(hf_dir or 'HF_DIR', *HF_PATHS[dataset])} and pass --hf-dir"
           f"{'' if hf_dir else ' HF_DIR'}, or leave {dataset} out with --datasets")
    if dataset in P3_LACKS:
        raise DataError(f"{dataset}: {P3_LACKS[dataset]}; {put}")
    if root is None:
        raise DataError(f"{hf_folder(hf_dir, dataset)}: no saved dataset {hf_path} and no "
                        f"P3_DIR given; {put}")
    try:
        return "p3", dataset_folders(root, dataset)
    except DataError as e:
        if not hf_dir:
            raise
        raise DataError(f"{e}; or {put}") from None


def describe(dataset: str, kind: str, plan, root: str | None) -> str:
    """The line saying where a dataset's rows come from."""
    if kind == "huggingface":
        if dataset == "trec":
            return (f"{dataset}: Hugging Face copy {plan.folder}, the release's 50-way "
                    "fine-label template")
        n = len(plan.templates)
        return (f"{dataset}: Hugging Face copy {plan.folder}, {n} promptsource "
                f"template{'s' * (n != 1)} from {plan.template_file}")
    folders = sorted({f for names in plan.values() for f in names})
    return (f"{dataset}: P3 folders under {p3.data_dir(root)} ({len(folders)} folders, "
            f"{len(plan)} templates)")


def build_p3_heldin(root: str | None, out: str, *, datasets: Sequence[str] | None = None,
                    max_examples: int | None = MAX_EXAMPLES, seed: int = SEED,
                    hf_dir: str | None = None, templates: str | None = None,
                    progress: Callable | None = None, report: Callable | None = print) -> dict:
    """Builds the T0 held-in training sets into ``out`` (a staging folder: see
    ``goose_jax.data.builds``); returns the summary.

    Args:
      root: the P3 folder (None: the Hugging Face source only).
      out: the staging folder.
      datasets: a subset of the 36 (default: all).
      max_examples: training rows per expert at most (None: no cap).
      seed: the sampling seed.
      hf_dir: the folder of the saved Hugging Face copies (``HF_DIR/<dataset>[/<subset>]``).
      templates: a promptsource checkout (default: the installed promptsource package's).
      progress: wraps the dataset loop (default: a progress bar).
      report: called with one line per dataset saying where its rows come from, before any
        is read.

    Every dataset's source, templates and splits are checked before the first is read.

    Raises:
      DataError: a dataset in neither source, a missing template file or split, an unreadable
        (truncated) TFRecord or saved dataset.
      UsageError: an unknown name in ``datasets``.
    """
    names = pick(list(p3.T0_HELDIN), datasets, "T0 held-in dataset")
    plans = {d: _plan(d, root, hf_dir, templates) for d in names}
    for kind, plan in plans.values():
        if kind == "p3":
            _check_train(root, plan)
    if report:
        for d, (kind, plan) in plans.items():
            report(f"goose-data: {describe(d, kind, plan, root)}")
    settings = {"source": "p3-heldin", "root": os.path.abspath(root) if root else None,
                "hf_dir": os.path.abspath(hf_dir) if hf_dir else None,
                "seed": seed, "max_examples": max_examples}

    def one(d):
        kind, plan = plans[d]
        if kind == "huggingface":
            return build_hf_dataset(plan, d, max_examples, seed)
        return build_dataset(root, d, plan, max_examples, seed)

    built = (one(d) for d in (progress or progress_bar)(names, desc="goose-data p3-heldin",
                                                         unit="dataset"))
    return write_build(out, built, settings, stems=file_stems(names))
