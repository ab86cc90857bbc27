"""Evaluation and training tasks: names, benchmarks, a seqio registry and a plain-Python path.

Task names (``--tasks`` of goose-eval):

    t0_heldout/<dataset>   P3 ``_score_eval`` folders of a T0 held-out dataset, all templates
    t0_heldin/<dataset>    P3 folders of a T0 held-in dataset (templates with answer choices)
    p3/<folder>            any one P3 task folder
    bbh/<task>, bbl/<task> BIG-bench Hard / Lite from local Hugging Face datasets
    flan/<expert>          one FLAN expert group (validation split)
    tfds/<name>            a tfds dataset with a built-in prompt (``TFDS_PROMPTS``)

Benchmarks expand to task lists: ``t0_heldout`` (11), ``t0_heldin`` (36), ``bbh`` (22), ``bbl``
(17), ``flan`` (the expert groups found on disk). Data roots are user paths, so nothing is
registered at import time: ``get_tasks`` builds ``EvalTask`` s, ``register_tasks`` fills the
seqio ``TaskRegistry`` / ``MixtureRegistry``. Importing this module imports neither TensorFlow
nor seqio.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence

from goose_jax.core.errors import DataError, one_line
from goose_jax.data import bigbench, flan, p3
from goose_jax.data.examples import EvalTask, Example, example_target

BENCHMARKS = ("t0_heldout", "t0_heldin", "bbh", "bbl", "flan")
FLAN_MAX_NEW_TOKENS = 64


@dataclasses.dataclass(frozen=True)
class DataRoots:
    """Where the researcher keeps each data source (None: not available)."""

    p3: str | None = None
    bbh: str | None = None
    bbl: str | None = None
    flan: str | None = None
    tfds: str | None = None
    flan_grouping: Mapping[str, str] | None = dataclasses.field(default=None, hash=False)


def _need(root: str | None, flag: str, name: str) -> str:
    if not root:
        raise DataError(f"task {name} needs its data directory ({flag})")
    return root


# --- tfds ---------------------------------------------------------------------------------------


def _rte(ex: dict) -> tuple[str, tuple[str, ...]]:
    return (f"{ex['premise']}\nQuestion: {ex['hypothesis']} True or False?", ("True", "False"))


def _cb(ex: dict) -> tuple[str, tuple[str, ...]]:
    return (f"{ex['premise']}\nQuestion: {ex['hypothesis']} True, False, or Neither?",
            ("True", "False", "Neither"))


def _copa(ex: dict) -> tuple[str, tuple[str, ...]]:
    link = "This happened because" if ex["question"] == "cause" else "As a consequence,"
    return f"{ex['premise']} {link}", (ex["choice1"], ex["choice2"])


# name -> (prompt function (input, choices); the integer ``label`` indexes the choices).
TFDS_PROMPTS: dict[str, Callable[[dict], tuple[str, tuple[str, ...]]]] = {
    "super_glue/rte": _rte, "super_glue/cb": _cb, "super_glue/copa": _copa,
}


def _text(v):
    return v.decode("utf-8") if isinstance(v, bytes) else v


def tfds_examples(name: str, split: str = "validation", *, data_dir: str | None = None,
                  prompt: Callable[[dict], tuple[str, tuple[str, ...]]] | None = None,
                  dataset: str | None = None) -> list[Example]:
    """Rank examples from a prepared tfds dataset (never downloads).

    Args:
      name: tfds name, e.g. ``super_glue/rte``.
      split: tfds split.
      data_dir: the tfds data directory.
      prompt: maps a decoded example to (input, choices); default ``TFDS_PROMPTS[name]``.
      dataset: the dataset name examples are pooled into (default ``tfds/<name>``).
    """
    prompt = prompt or TFDS_PROMPTS.get(name)
    if prompt is None:
        raise DataError(f"tfds dataset {name!r} has no built-in prompt; known: "
                        f"{sorted(TFDS_PROMPTS)} (or pass prompt=)")
    import tensorflow_datasets as tfds

    try:
        ds = tfds.load(name, split=split, data_dir=data_dir, download=False)
    except Exception as e:  # tfds raises AssertionError / DatasetNotFoundError for missing data.
        raise DataError(f"tfds dataset {name} split {split} not found under "
                        f"{data_dir or 'the default tfds data dir'} (goose-eval never downloads): "
                        f"{one_line(e)[:200]}") from None
    out = []
    for i, ex in enumerate(tfds.as_numpy(ds)):
        ex = {k: _text(v) for k, v in ex.items()}
        text, choices = prompt(ex)
        label = int(ex.get("label", -1))
        answers = (label,) if 0 <= label < len(choices) else ()
        out.append(Example(text, tuple(choices), answers, (), dataset or f"tfds/{name}",
                           "tfds_default", str(ex.get("idx", i))))
    return out


# --- P3 -----------------------------------------------------------------------------------------


def _p3_examples(root: str, spec: p3.DatasetPrefix, dataset: str, folders: dict[str, str]
                 ) -> list[Example]:
    out = []
    for template, folder in folders.items():
        path = p3.task_dir(root, folder)
        out.extend(p3.examples(path, p3.pick_split(path, spec.splits), dataset=dataset,
                               template=template))
    return out


def _t0_task(benchmark: str, name: str, roots: DataRoots) -> EvalTask:
    table = p3.T0_HELDOUT if benchmark == "t0_heldout" else p3.T0_HELDIN
    spec = table[name]
    task = f"{benchmark}/{name}"
    root = _need(roots.p3, "--p3-root", task)
    score_eval = None if benchmark == "t0_heldout" else False
    folders = p3.templates(root, spec, score_eval=score_eval)
    where = os.path.join(p3.data_dir(root), spec.prefix + "*" + spec.suffix)
    kind, metric = "rank", "accuracy"
    if benchmark == "t0_heldin":
        split_of = {t: p3.pick_split(p3.task_dir(root, f), spec.splits) for t, f in folders.items()}
        ranked = {t: f for t, f in folders.items()
                  if p3.has_choices(p3.task_dir(root, f), split_of[t])}
        if ranked:
            folders = ranked
        else:
            kind, metric = "generate", "rouge_l"
    return EvalTask(task, task, kind, metric,
                    lambda: _p3_examples(root, spec, task, folders), FLAN_MAX_NEW_TOKENS, where)


def _p3_folder_task(folder: str, roots: DataRoots) -> EvalTask:
    task = f"p3/{folder}"
    root = _need(roots.p3, "--p3-root", task)
    path = p3.task_dir(root, folder)
    split = p3.pick_split(path, ("validation", "test", "train"))
    rank = p3.has_choices(path, split)
    return EvalTask(task, task, "rank" if rank else "generate", "accuracy" if rank else "rouge_l",
                    lambda: p3.examples(path, split, dataset=task, template=folder),
                    FLAN_MAX_NEW_TOKENS, path)


# --- names --------------------------------------------------------------------------------------


def benchmark_task_names(benchmark: str, roots: DataRoots = DataRoots()) -> list[str]:
    """The task names a benchmark expands to."""
    if benchmark == "t0_heldout":
        return [f"t0_heldout/{d}" for d in p3.T0_HELDOUT]
    if benchmark == "t0_heldin":
        return [f"t0_heldin/{d}" for d in p3.T0_HELDIN]
    if benchmark == "bbh":
        return [f"bbh/{t}" for t in bigbench.BBH_TASKS]
    if benchmark == "bbl":
        return [f"bbl/{t}" for t in bigbench.BBL_TASKS]
    if benchmark == "flan":
        root = _need(roots.flan, "--flan-root", "flan")
        return [f"flan/{e}" for e in flan.experts(root, roots.flan_grouping)]
    raise DataError(f"unknown benchmark {benchmark!r}; expected one of {list(BENCHMARKS)}"
                    + _suggest(benchmark, BENCHMARKS))


def _suggest(name: str, known: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, list(known), n=3)
    return f"; did you mean {', '.join(close)}?" if close else ""


def _known_names() -> list[str]:
    return [n for b in ("t0_heldout", "t0_heldin", "bbh", "bbl") for n in benchmark_task_names(b)]


def get_task(name: str, roots: DataRoots = DataRoots()) -> EvalTask:
    """The ``EvalTask`` for one task name (see the module doc).

    Raises:
      DataError: an unknown name (with close matches), or a data root that is not given.
    """
    family, _, rest = name.partition("/")
    if family in ("t0_heldout", "t0_heldin"):
        table = p3.T0_HELDOUT if family == "t0_heldout" else p3.T0_HELDIN
        if rest in table:
            return _t0_task(family, rest, roots)
    elif family in ("bbh", "bbl") and rest in (bigbench.BBH_TASKS if family == "bbh"
                                              else bigbench.BBL_TASKS):
        root = _need(roots.bbh if family == "bbh" else roots.bbl, f"--{family}-root", name)
        kind, metric, max_new = bigbench.task_kind(rest)
        return EvalTask(name, name, kind, metric,
                        lambda: bigbench.examples(root, rest, dataset=name), max_new or 64,
                        os.path.join(root, rest))
    elif family == "p3" and rest:
        return _p3_folder_task(rest, roots)
    elif family == "flan" and rest:
        root = _need(roots.flan, "--flan-root", name)
        return EvalTask(name, name, "generate", "rouge_l",
                        lambda: flan.examples(root, rest, "validation",
                                              grouping=roots.flan_grouping, dataset=name),
                        FLAN_MAX_NEW_TOKENS, root)
    elif family == "tfds" and rest in TFDS_PROMPTS:
        return EvalTask(name, name, "rank", "accuracy",
                        lambda: tfds_examples(rest, data_dir=roots.tfds, dataset=name), 0,
                        roots.tfds or "tfds")
    raise DataError(f"unknown task {name!r}; names look like t0_heldout/rte, bbh/navigate, "
                    f"bbl/strategyqa, p3/<folder>, flan/<expert>, tfds/super_glue/rte"
                    + _suggest(name, _known_names() + [f"tfds/{t}" for t in TFDS_PROMPTS]))


def get_tasks(names: Sequence[str] | None = None, benchmarks: Sequence[str] | None = None,
              roots: DataRoots = DataRoots()) -> list[EvalTask]:
    """Tasks for explicit names and / or whole benchmarks, in order, without duplicates."""
    wanted = [n for b in (benchmarks or ()) for n in benchmark_task_names(b, roots)]
    wanted += list(names or ())
    if not wanted:
        raise DataError("no tasks requested: give a benchmark or task names")
    return [get_task(n, roots) for n in dict.fromkeys(wanted)]


def iter_examples(name: str, roots: DataRoots = DataRoots()) -> Iterator[Example]:
    """The plain-Python path: a task's examples, without seqio."""
    yield from get_task(name, roots).load()


# --- seqio --------------------------------------------------------------------------------------


def _seqio_name(s: str) -> str:
    return re.sub(r"[^\w.:#]", "_", s)


def seqio_vocabulary(vocabulary):
    """A seqio vocabulary: bytes for None, SentencePiece for a model file's path, else
    ``vocabulary`` as given."""
    import seqio

    if vocabulary is None:
        return seqio.ByteVocabulary()
    if isinstance(vocabulary, str | os.PathLike):
        return seqio.SentencePieceVocabulary(os.fspath(vocabulary))
    return vocabulary


def example_source(load: Callable[[], list[Example]], splits: Sequence[str]):
    """A seqio source over ``Example`` s: text inputs and targets, choices, answers."""
    import seqio
    import tensorflow as tf

    def dataset_fn(split, shuffle_files, seed=None):
        del shuffle_files, seed

        def gen():
            for ex in load(split):
                yield {"inputs": ex.input, "targets": example_target(ex),
                       "choices": list(ex.choices or ()), "answers": list(ex.answers)}

        sig = {"inputs": tf.TensorSpec([], tf.string), "targets": tf.TensorSpec([], tf.string),
               "choices": tf.TensorSpec([None], tf.string),
               "answers": tf.TensorSpec([None], tf.int64)}
        return tf.data.Dataset.from_generator(gen, output_signature=sig)

    return seqio.FunctionDataSource(dataset_fn, splits=list(splits))


def _p3_source(path: str):
    import seqio

    def dataset_fn(split, shuffle_files, seed=None):
        del shuffle_files, seed
        ds = p3.tf_dataset(path, split)
        return ds.map(lambda ex: {**ex, "inputs": ex["inputs_pretokenized"],
                                  "targets": ex["targets_pretokenized"]})

    return seqio.FunctionDataSource(dataset_fn, splits=p3.splits(path))


def register_tasks(*, p3_root: str | None = None, bbh_root: str | None = None,
                   bbl_root: str | None = None, flan_root: str | None = None,
                   flan_grouping: Mapping[str, str] | None = None, vocabulary=None,
                   overwrite: bool = True) -> dict[str, list[str]]:
    """Registers seqio tasks and the mixtures ``t0_heldin``, ``t0_heldout``, ``bbh``, ``bbl``,
    ``flan`` for the data found under the given roots.

    Every task has text ``inputs`` / ``targets`` tokenized with ``vocabulary`` (a seqio
    ``Vocabulary``, a path to a SentencePiece model, or None for ``seqio.ByteVocabulary``), EOS
    appended. P3 tasks keep their other features (``answer_choices``, ``idx``, ``is_correct``);
    BIG-bench and FLAN tasks carry ``choices`` and ``answers``. Task names: ``p3_<folder>``,
    ``bbh_<task>``, ``bbl_<task>``, ``flan_<expert>``.

    Returns:
      ``{mixture: [task names]}`` for every mixture registered (empty ones are skipped).
    """
    import seqio

    vocab = seqio_vocabulary(vocabulary)
    features = {"inputs": seqio.Feature(vocab, add_eos=True),
                "targets": seqio.Feature(vocab, add_eos=True)}
    pre = [seqio.preprocessors.tokenize, seqio.preprocessors.append_eos_after_trim]

    def add(name, source):
        if overwrite and name in seqio.TaskRegistry.names():
            seqio.TaskRegistry.remove(name)
        seqio.TaskRegistry.add(name, source=source, preprocessors=pre, output_features=features)
        return name

    mixtures: dict[str, list[str]] = {}
    if p3_root:
        for bench, table, score in (("t0_heldin", p3.T0_HELDIN, False),
                                    ("t0_heldout", p3.T0_HELDOUT, None)):
            names = []
            for spec in table.values():
                for folder in p3.templates(p3_root, spec, score_eval=score).values():
                    names.append(add(_seqio_name(f"p3_{folder}"),
                                     _p3_source(p3.task_dir(p3_root, folder))))
            mixtures[bench] = names
    for bench, root, tasks in (("bbh", bbh_root, bigbench.BBH_TASKS),
                               ("bbl", bbl_root, bigbench.BBL_TASKS)):
        if root:
            mixtures[bench] = [
                add(_seqio_name(f"{bench}_{t}"), example_source(
                    lambda split, t=t, r=root: bigbench.examples(r, t), ["validation"]))
                for t in tasks if bigbench.task_dirs(os.path.abspath(root), t)]
    if flan_root:
        mixtures["flan"] = [
            add(_seqio_name(f"flan_{e}"), example_source(
                lambda split, e=e: flan.examples(flan_root, e, split, grouping=flan_grouping),
                ["train", "validation"]))
            for e in flan.experts(flan_root, flan_grouping)]
    for mix, names in list(mixtures.items()):
        if not names:
            del mixtures[mix]
            continue
        if overwrite and mix in seqio.MixtureRegistry.names():
            seqio.MixtureRegistry.remove(mix)
        seqio.MixtureRegistry.add(mix, names, default_rate=1.0)
    return mixtures
