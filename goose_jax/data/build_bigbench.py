"""The BIG-bench Hard and BIG-bench Lite roots goose-eval reads, written from the two Hugging Face
datasets the original release read (``colm/datasets/bigbench.gin`` of r-three/phatgoose):

  * ``tasksource/bigbench``: every BBL task and 19 of the 22 BBH tasks, split
    ``train_validation`` (its train and validation splits joined, in that order:
    ``src/data/dataset.py:117-123``);
  * ``lukaemon/bbh``: boolean_expressions, multistep_arithmetic_two and web_of_lies, split
    ``test``.

Each source is a folder with one sub-folder per task (a dataset saved with ``save_to_disk``, or
a Hub snapshot of parquet / jsonl files; ``lukaemon/bbh`` may keep them under ``data/``).
Nothing is downloaded. The output, built in a staging folder that becomes ``OUT_DIR`` only when
complete:

    OUT_DIR/bbh/<task>/<split>-00000-of-00001.parquet    --bbh-root OUT_DIR/bbh
    OUT_DIR/bbl/<task>/<split>-00000-of-00001.parquet    --bbl-root OUT_DIR/bbl
    OUT_DIR/summary.json                                 rows and source of every task

Task folders carry the release's source names (its ``dataset_path``), e.g. BBH's
formal_fallacies is ``formal_fallacies_syllogisms_negation`` as the release read it; goose-eval
finds it under either name. Every row is checked as goose-eval will read it before anything is
written (a malformed row is refused, naming the source file and row).
"""

from __future__ import annotations

import json
import os

from goose_jax.core.errors import DataError
from goose_jax.data import bigbench

TASKSOURCE, LUKAEMON = "tasksource/bigbench", "lukaemon/bbh"
# The three BBH tasks the release read from lukaemon/bbh (bigbench.gin), with its split.
FROM_LUKAEMON = ("boolean_expressions", "multistep_arithmetic_two", "web_of_lies")


def source_of(bench: str, task: str) -> tuple[str, str]:
    """(source dataset, task folder name) of a goose-eval BIG-bench task, as the release read
    it."""
    if bench == "bbh" and task in FROM_LUKAEMON:
        return LUKAEMON, task
    return TASKSOURCE, bigbench.RELEASE_NAMES.get(task, task) if bench == "bbh" else task


def _task_folder(root: str, name: str, source: str) -> str:
    for path in (os.path.join(root, name), os.path.join(root, "data", name)):
        if os.path.isdir(path):
            return path
    raise DataError(f"{os.path.join(root, name)}: no {source} task folder (expected a dataset "
                    f"saved with save_to_disk, or the Hub snapshot's files, named {name})")


def _rows(root: str, name: str, source: str) -> tuple[list[dict], str, str]:
    path = _task_folder(root, name, source)
    by_split = bigbench.read_task_dir(path)
    # The release's "train_validation": train then validation (src/data/dataset.py:117-123).
    parts = ("test",) if source == LUKAEMON else ("train", "validation")
    missing = [p for p in parts if p not in by_split]
    if missing:
        raise DataError(f"{path}: no {missing[0]} split (found: {sorted(by_split)}); the "
                        f"release read {' and '.join(parts)}")
    return [r for p in parts for r in by_split[p]], "+".join(parts), path


def build_bigbench(tasksource_dir: str, lukaemon_dir: str, out: str) -> dict:
    """Writes the BBH and BBL roots into ``out`` (a staging folder); returns the summary.

    Raises:
      DataError: a missing source folder, task folder or split, an unreadable file, or a
        malformed row (checked for every task before the first is written).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    for root, source in ((tasksource_dir, TASKSOURCE), (lukaemon_dir, LUKAEMON)):
        if not os.path.isdir(root):
            raise DataError(f"{os.path.abspath(root)}: the {source} folder does not exist")
    plan = []
    for bench, tasks in (("bbh", bigbench.BBH_TASKS), ("bbl", bigbench.BBL_TASKS)):
        for task in tasks:
            source, name = source_of(bench, task)
            rows, split, path = _rows(lukaemon_dir if source == LUKAEMON else tasksource_dir,
                                      name, source)
            if not rows:
                raise DataError(f"{path}: no rows in split {split}")
            bigbench.check_rows(rows, task, path)
            plan.append((bench, task, source, name, split, rows))
    summary: dict = {"tasksource": os.path.abspath(tasksource_dir),
                     "lukaemon": os.path.abspath(lukaemon_dir), "tasks": {}}
    for bench, task, source, name, split, rows in plan:
        folder = os.path.join(out, bench, name)
        os.makedirs(folder, exist_ok=True)
        saved = "test" if source == LUKAEMON else "train_validation"
        pq.write_table(pa.Table.from_pylist(rows),
                       os.path.join(folder, f"{saved}-00000-of-00001.parquet"))
        summary["tasks"][f"{bench}/{task}"] = {"folder": f"{bench}/{name}", "source": source,
                                               "split": split, "rows": len(rows)}
        print(f"{bench}/{task}: {len(rows)} rows from {source} {name} ({split})", flush=True)
    with open(os.path.join(out, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)
    return summary
