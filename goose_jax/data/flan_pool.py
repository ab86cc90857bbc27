"""The expert pool of the paper's FLAN setting as the original release built it: 166 experts.

The pool is a packaged table, ``goose_jax/assets/flan_pool.json`` (its ``note`` says which lines
of the release it was read from). Each expert has a kind, and its data comes from where the
release took it:

  * ``p3`` (43): a P3 dataset. The 36 T0 held-in experts are ``goose-data p3-heldin``'s build
    (``goose_jax.data.build_p3``); the other seven (the release's ``add1`` list: wsc.fixed,
    copa, hellaswag, wic, race high / middle, web_questions) are read from the same P3 folders
    by the same rules: every template folder for training, all (example, template) pairs, at
    most ``max_examples`` drawn with seed 42; for validation the templates with answer choices
    on the dataset's evaluation split (web_questions: ``test``; COPA less the release's four
    ignored templates), one template per example in turn for race and web_questions (the
    release's ``round_robin_template``), every pair for the other four;
  * ``flan2021`` (44) and ``dialog`` (4): the Open-Orca/FLAN rows whose ``_task_name`` is the
    expert's task (``ai2_arc/ARC-Easy:1.0.0``, ``qrecc``), as the release's ``scripts/flan.py``
    selected them;
  * ``niv2`` (75): the Open-Orca/FLAN rows of every NIv2 task (a ``_task_name`` spelt
    ``task<number>_<name>``, the natural-instructions file names) whose category is the
    expert's. A task's category is the ``Categories`` field of its own task file
    (``tasks/<task>.json`` of natural-instructions). An NIv2 task of the FLAN rows without a
    task file, without exactly one category, or with a category that is not one of the 75
    experts is refused (one line naming every such task), never left out.

FLAN rows are read, filtered and split as ``goose_jax.data.flan`` does (zero-shot templates,
shuffle with seed 1234, the first min(10%, 10,000) rows the validation split). Every source the
chosen experts need is checked (the folders, every FLAN task and NIv2 category has rows) before
the first P3 folder is read.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

from goose_jax.core.errors import DataError, UsageError
from goose_jax.core.progress import progress_bar
from goose_jax.core.tensorfile import read_json
from goose_jax.data import build_flan, build_p3, flan, p3
from goose_jax.data.builds import ExpertData, Row, file_stems, pick, write_build
from goose_jax.data.examples import example_target

POOL_FILE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                         "assets", "flan_pool.json")
KINDS = ("p3", "flan2021", "niv2", "dialog")
FLAN_KINDS = ("flan2021", "dialog", "niv2")
NIV2_TASK = re.compile(r"task\d+_.+")

# The seven P3 experts outside the T0 held-in list (the release's add1; colm/datasets/p3_t5xl.gin):
# {source: (evaluation splits in order of preference, one template per example in turn)}.
OTHER_P3 = {
    "super_glue/wsc.fixed": (("validation",), False),
    "super_glue/copa": (("validation",), False),
    "hellaswag": (("validation",), False),
    "super_glue/wic": (("validation",), False),
    "race/high": (("validation",), True),
    "race/middle": (("validation",), True),
    "web_questions": (("test",), True),
}
# COPA's validation leaves out the templates the release ignores (the T0 held-out table's).
OTHER_P3_EXCLUDE = {"super_glue/copa": p3.T0_HELDOUT["copa"].exclude}


@dataclasses.dataclass(frozen=True)
class PoolExpert:
    """One expert of the release's pool (the fields of ``flan_pool.json``).

    Attributes:
      name: the release's expert name (``P3Agnews``, ``Niv2zsTranslation``).
      group: the release list it belongs to (``P3``, ``Flanv2``, ``Niv2``, ``Add1``).
      kind: ``p3``, ``flan2021``, ``niv2`` or ``dialog``.
      source: the P3 dataset, the FLAN ``_task_name`` or the NIv2 category.
      p3_heldin: the ``goose-data p3-heldin`` dataset of a T0 held-in expert, else None.
    """

    name: str
    group: str
    kind: str
    source: str
    p3_heldin: str | None = None


def release_pool(path: str = POOL_FILE) -> list[PoolExpert]:
    """The release's 166 experts, in its order.

    Raises:
      DataError: a damaged table (not 166 unique names, an unknown kind).
    """
    table = read_json(path, error=DataError, what="the FLAN pool table")
    rows = table.get("experts") if isinstance(table, dict) else None
    try:
        pool = [PoolExpert(r["name"], r["group"], r["kind"], r["source"], r.get("p3_heldin"))
                for r in rows]
    except (KeyError, TypeError):
        raise DataError(f"{path}: the FLAN pool table is damaged (expected experts with "
                        "name, group, kind and source); reinstall goose-jax") from None
    names = {e.name for e in pool}
    if len(pool) != 166 or len(names) != 166 or any(e.kind not in KINDS for e in pool):
        raise DataError(f"{path}: the FLAN pool table is damaged ({len(names)} unique names of "
                        f"{len(pool)}, expected 166); reinstall goose-jax")
    return pool


# --- NIv2 categories ----------------------------------------------------------------------------


def niv2_categories(tasks_dir: str | os.PathLike, tasks: Iterable[str]) -> dict[str, list]:
    """``{task: Categories}`` read from ``<tasks_dir>/<task>.json`` (natural-instructions'
    task files); a task without a file maps to None.

    Raises:
      DataError: a missing folder, a task file that is not JSON or has no ``Categories`` list.
    """
    folder = os.path.abspath(os.path.expanduser(os.fspath(tasks_dir)))
    if not os.path.isdir(folder):
        raise DataError(f"{folder}: NIv2 tasks folder does not exist (expected "
                        "natural-instructions' tasks/ folder of task<N>_<name>.json files)")
    out: dict[str, list | None] = {}
    for task in tasks:
        path = os.path.join(folder, f"{task}.json")
        if not os.path.isfile(path):
            out[task] = None
            continue
        data = read_json(path, error=DataError, what="an NIv2 task file")
        cats = data.get("Categories") if isinstance(data, dict) else None
        if not isinstance(cats, list) or not all(isinstance(c, str) for c in cats):
            raise DataError(f"{path}: an NIv2 task file without a Categories list of strings "
                            f"(found {type(cats).__name__}); is this natural-instructions' "
                            "tasks/ folder?")
        out[task] = cats
    return out


def niv2_grouping(tasks: Iterable[str], tasks_dir: str | os.PathLike,
                  pool: Sequence[PoolExpert]) -> dict[str, str]:
    """``{NIv2 task: expert name}``: each task joins the expert of its one category.

    Raises:
      DataError: one line naming every task with no file, not exactly one category, or a
        category that is none of the pool's NIv2 experts.
    """
    experts = {e.source: e.name for e in pool if e.kind == "niv2"}
    found = niv2_categories(tasks_dir, sorted(tasks))
    grouping, missing = {}, []
    for task, cats in found.items():
        if cats is None:
            missing.append(f"{task} (no task file)")
        elif len(cats) != 1:
            missing.append(f"{task} ({len(cats)} categories)")
        elif cats[0] not in experts:
            missing.append(f"{task} (category {cats[0]!r})")
        else:
            grouping[task] = experts[cats[0]]
    if missing:
        raise DataError(f"{os.path.abspath(tasks_dir)}: {len(missing)} NIv2 task(s) of the FLAN "
                        f"rows have no category expert of the release's pool: "
                        f"{flan.listed(missing)}")
    return grouping


# --- P3 -----------------------------------------------------------------------------------------


def other_p3_folders(root: str, source: str) -> dict[str, str]:
    """``{template: folder}`` of one of the seven P3 datasets outside the held-in list (P3
    names its folders ``<dataset>_<config>_<template>``)."""
    spec = p3.DatasetPrefix(source.replace("/", "_") + "_")
    folders = p3.templates(root, spec, score_eval=False)
    if not folders:
        raise DataError(f"{os.path.join(p3.data_dir(root), spec.prefix)}*: no P3 folder of the "
                        f"dataset {source!r}; download its folders of P3 or leave its expert "
                        "out with --datasets")
    return folders


def build_other_p3(root: str, expert: PoolExpert, folders: Mapping[str, str],
                   cap: int | None, seed: int = build_p3.SEED) -> ExpertData:
    """One of the seven other P3 experts' rows (see the module doc)."""
    def read(folder: str, split: str, template: str):
        return p3.examples(p3.task_dir(root, folder), split, dataset=expert.source,
                           template=template)

    def row(ex, choices: bool) -> Row:
        return Row(ex.input, example_target(ex) or build_p3.NO_LABEL, ex.template,
                   ex.choices if choices else None)

    train = [read(f, "train", t) for t, f in folders.items()]
    rows = [row(train[t][e], False) for t, e in build_p3.pairs(train, cap, seed)]
    splits, turn = OTHER_P3[expert.source]
    split = p3.pick_split(p3.task_dir(root, next(iter(folders.values()))), splits)
    skip = OTHER_P3_EXCLUDE.get(expert.source, ())
    per = [read(f, split, t) for t, f in folders.items() if t not in skip]
    ranked = [x for x in per if x and x[0].choices]
    per = ranked or per
    items = build_p3.round_robin(per, None, seed) if turn else build_p3.pairs(per, None, seed)
    return ExpertData(expert.name, rows, [row(per[t][e], True) for t, e in items])


def _read_rows(path: str) -> list[Row]:
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [Row(r["input"], r["target"], r["template"],
                tuple(r["choices"]) if r.get("choices") else None) for r in rows]


# --- the build ----------------------------------------------------------------------------------


def _need(value: str | None, flag: str, kinds: str) -> str:
    if not value:
        raise UsageError(f"the release's FLAN pool needs {flag} (for its {kinds} experts); "
                         "pass it, or leave those experts out with --datasets")
    return value


def flan_grouping(flan_root: str, experts: Sequence[PoolExpert], niv2_tasks: str | None,
                  pool: Sequence[PoolExpert]) -> dict[str, str]:
    """``{FLAN task name: expert}`` for the chosen FLAN-sourced experts, after checking that
    every one of them has zero-shot rows in the release.

    Raises:
      DataError: a task of the pool missing from the FLAN rows, an NIv2 task without a category
        expert, an NIv2 category with no task in the FLAN rows.
    """
    counts = flan.task_names(flan_root)
    grouping = {e.source: e.name for e in experts if e.kind != "niv2"}
    absent = [t for t in grouping if t not in counts]
    if absent:
        raise DataError(f"{os.path.abspath(flan_root)}: no zero-shot rows of {len(absent)} "
                        f"FLAN task(s) of the release's pool: {flan.listed(absent)}; is this "
                        "the Open-Orca/FLAN release?")
    niv2 = [e for e in experts if e.kind == "niv2"]
    if niv2:
        tasks = [t for t in counts if NIV2_TASK.fullmatch(t)]
        by_task = niv2_grouping(tasks, _need(niv2_tasks, "--niv2-tasks", "NIv2"), pool)
        chosen = {e.name for e in niv2}
        grouping.update({t: e for t, e in by_task.items() if e in chosen})
        empty = sorted(chosen - set(by_task.values()))
        if empty:
            raise DataError(f"{os.path.abspath(flan_root)}: no zero-shot rows of any NIv2 task "
                            f"of {len(empty)} category expert(s): {flan.listed(empty)}; is this "
                            "the Open-Orca/FLAN release?")
    return grouping


def build_release_pool(flan_root: str, out: str, *, p3_root: str | None = None,
                       niv2_tasks: str | None = None, datasets: Sequence[str] | None = None,
                       max_examples: int | None = build_flan.MAX_EXAMPLES,
                       seed: int = build_flan.SEED, hf_dir: str | None = None,
                       templates: str | None = None, progress: Callable | None = None) -> dict:
    """Builds the release's FLAN pool (or the ``datasets`` among its names) into ``out`` (a
    staging folder: see ``goose_jax.data.builds``); returns the summary, experts in the
    release's order. ``seed`` is FLAN's shuffle; P3 keeps the release's seed 42.

    Raises:
      UsageError: an unknown expert name; a source flag the chosen experts need.
      DataError: a missing or malformed source, a task of the pool without rows, an NIv2 task
        without a category expert (see ``flan_grouping``).
    """
    pool = release_pool()
    names = pick([e.name for e in pool], datasets, "expert of the release's FLAN pool")
    experts = [e for e in pool if e.name in set(names)]
    from_flan = [e for e in experts if e.kind in FLAN_KINDS]
    from_p3 = [e for e in experts if e.kind == "p3"]
    # The flags first, then every source, before the long P3 reads.
    if from_p3:
        p3_root = _need(p3_root, "--p3-dir", "P3")
    if any(e.kind == "niv2" for e in from_flan):
        niv2_tasks = _need(niv2_tasks, "--niv2-tasks", "NIv2")
    grouping = flan_grouping(flan_root, from_flan, niv2_tasks, pool) if from_flan else {}
    heldin = [e for e in from_p3 if e.p3_heldin]
    others = {e.name: other_p3_folders(p3_root, e.source) for e in from_p3 if not e.p3_heldin}
    stems = file_stems([e.name for e in experts])
    settings = {"source": "flan-release-pool", "root": os.path.abspath(flan_root),
                "p3_root": os.path.abspath(p3_root) if from_p3 else None,
                "niv2_tasks": os.path.abspath(niv2_tasks) if niv2_tasks else None,
                "seed": seed, "p3_seed": build_p3.SEED, "max_examples": max_examples,
                "kinds": {e.name: e.kind for e in experts}}
    p3_stage = os.path.join(out, ".p3-heldin")
    p3_files = {}
    if heldin:
        summary = build_p3.build_p3_heldin(p3_root, p3_stage,
                                           datasets=[e.p3_heldin for e in heldin],
                                           max_examples=max_examples, seed=build_p3.SEED,
                                           hf_dir=hf_dir, templates=templates,
                                           progress=progress)
        p3_files = {e.name: summary["experts"][e.p3_heldin]["file"] for e in heldin}
    rows = flan.rows_by_expert(flan_root, [e.name for e in from_flan], grouping=grouping) \
        if from_flan else {}

    def built() -> Iterator[ExpertData]:
        for e in (progress or progress_bar)(experts, desc="goose-data flan --pool release",
                                            unit="expert"):
            if e.name in p3_files:
                yield ExpertData(e.name, *(_read_rows(os.path.join(p3_stage, s, p3_files[e.name]))
                                           for s in ("train", "validation")))
            elif e.kind == "p3":
                yield build_other_p3(p3_root, e, others[e.name], max_examples)
            else:
                yield build_flan.expert_data(e.name, rows.get(e.name, []), max_examples, seed)

    try:
        return write_build(out, built(), settings, stems=stems)
    finally:
        shutil.rmtree(p3_stage, ignore_errors=True)
