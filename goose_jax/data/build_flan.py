"""The training sets of the FLAN experts, built from the Open-Orca/FLAN release as the original
release built them (``src/data/flat.py::FlanDataset`` of r-three/phatgoose; the reading and the
split are ``goose_jax.data.flan``'s, shared with evaluation):

  * only zero-shot templates (``_template_type`` in ``zs_opt``, ``zs_noopt``); rows with an empty
    input or target are dropped;
  * one expert per ``_task_name``, or per value of a grouping (a JSON object ``{task name:
    expert name}``, the same file as goose-eval's ``--flan-grouping``) that must name every
    task of the release (a task it lacks is refused, never left out); the release's own pool
    of 166 experts, with its NIv2 category experts, is ``goose_jax.data.flan_pool``;
  * each expert's rows are shuffled with ``RandomState(1234)``; the first min(10%, 10,000) are
    the validation split, the rest (at most 500,000) the train split.

An expert's file is its name with characters other than ``A-Za-z0-9_.+-`` replaced by ``_``
(``glue/cola`` -> ``glue_cola.jsonl``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence

from goose_jax.core.errors import DataError
from goose_jax.core.progress import progress_bar
from goose_jax.core.tensorfile import read_json
from goose_jax.data import flan
from goose_jax.data.builds import ExpertData, Row, file_stems, pick, write_build

MAX_EXAMPLES = flan.MAX_TRAIN
SEED = flan.SEED


def read_grouping(path: str) -> dict[str, str]:
    """The ``--grouping`` file: a JSON object mapping FLAN task names to expert names.

    Raises:
      DataError: a missing or malformed file, or values that are not strings.
    """
    table = read_json(path, error=DataError, what="the FLAN grouping (--grouping)",
                      fix="; pass a JSON object {task name: expert name}")
    if not isinstance(table, dict) or not all(isinstance(v, str) for v in table.values()):
        raise DataError(f"{path}: the FLAN grouping (--grouping) must be a JSON object of "
                        "strings {task name: expert name}")
    return table


def expert_data(name: str, items: Sequence[tuple[str, str, str]], max_examples: int | None,
                seed: int) -> ExpertData:
    """One expert's rows split as the release split them."""
    def rows(split: str, cap: int | None) -> list[Row]:
        return [Row(inp, tgt, tt) for inp, tgt, tt in
                flan.split_rows(list(items), split, seed, max_train=cap)]

    return ExpertData(name, rows("train", max_examples), rows("validation", None))


def build_flan(root: str, out: str, *, datasets: Sequence[str] | None = None,
               grouping: Mapping[str, str] | None = None,
               max_examples: int | None = MAX_EXAMPLES, seed: int = SEED,
               progress: Callable | None = None) -> dict:
    """Builds the FLAN experts' training sets from ``root`` into ``out`` (a staging folder: see
    ``goose_jax.data.builds``); returns the summary.

    Raises:
      DataError: a missing FLAN root, a file that cannot be read or lacks a column, no
        zero-shot rows, two experts that would share a file.
      UsageError: an unknown name in ``datasets``.
    """
    names = flan.experts(root, grouping)
    if not names:
        raise DataError(f"{os.path.abspath(root)}: no zero-shot FLAN rows "
                        f"(_template_type in {list(flan.ZERO_SHOT)}) of any expert")
    names = pick(names, datasets, "FLAN expert")
    stems = file_stems(names)
    grouped = flan.rows_by_expert(root, names, grouping=grouping)
    settings = {"source": "flan", "root": os.path.abspath(root), "seed": seed,
                "max_examples": max_examples, "grouping": dict(grouping) if grouping else None}
    built = (expert_data(n, grouped.get(n, []), max_examples, seed)
             for n in (progress or progress_bar)(names, desc="goose-data flan", unit="expert"))
    return write_build(out, built, settings, stems=stems)
