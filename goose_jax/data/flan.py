"""FLAN in the Open-Orca/FLAN layout, read from local disk, grouped into experts by task name.

The release is a tree of ``.parquet`` (or ``.jsonl``) files with the columns ``inputs``,
``targets``, ``_task_name``, ``_template_type`` (and ``_task_source``, ``_template_kwargs``).
As the original processing: only zero-shot templates (``zs_opt``, ``zs_noopt``) are kept, rows
with an empty input or target are dropped, each expert's rows are shuffled with
``RandomState(1234)``, the first min(10%, 10k) form the validation split and the rest (at most
500k) the training split. An expert is one ``_task_name`` unless a grouping maps several task
names onto one expert (NIv2 task categories); a grouping that lacks a task of the release is
refused, never applied by leaving the task out. Every field read must be a string.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Mapping, Sequence

import numpy as np

from goose_jax.core.errors import DataError, one_line
from goose_jax.data.examples import Example

ZERO_SHOT = ("zs_opt", "zs_noopt")
COLUMNS = ("inputs", "targets", "_task_name", "_template_type")
SEED = 1234
MAX_VALIDATION = 10_000
MAX_TRAIN = 500_000


def data_files(root: str | os.PathLike) -> list[str]:
    """Every ``.parquet`` / ``.jsonl`` file under ``root``, sorted."""
    root = os.path.abspath(os.path.expanduser(os.fspath(root)))
    if not os.path.isdir(root):
        raise DataError(f"{root}: FLAN directory does not exist (expected the Open-Orca/FLAN "
                        "release: parquet or jsonl files with inputs, targets, _task_name, "
                        "_template_type)")
    files = sorted(glob.glob(os.path.join(root, "**", "*.parquet"), recursive=True)
                   + glob.glob(os.path.join(root, "**", "*.jsonl"), recursive=True))
    if not files:
        raise DataError(f"{root}: no .parquet or .jsonl files found")
    return files


def _check_columns(where: str, have, columns: Sequence[str]) -> None:
    missing = [c for c in columns if c not in have]
    if missing:
        raise DataError(f"{where}: FLAN data without the column(s) {', '.join(missing)} (the "
                        f"Open-Orca/FLAN layout has {', '.join(COLUMNS)}); is this a FLAN file?")


def _check_types(where: str, schema, columns: Sequence[str]) -> None:
    """Every column a parquet file is read for holds strings (nulls allowed)."""
    import pyarrow as pa

    for c in columns:
        kind = schema.field(c).type
        if pa.types.is_dictionary(kind):
            kind = kind.value_type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)
                or pa.types.is_null(kind)):
            raise DataError(f"{where}: FLAN column {c!r} holds {kind}, expected strings (the "
                            "Open-Orca/FLAN layout); is this a FLAN file?")


def _check_row(where: str, row: dict, columns: Sequence[str]) -> None:
    """Every field a jsonl row is read for is a string (``inputs`` / ``targets`` may be null:
    such a row is dropped as empty)."""
    for c in columns:
        value = row.get(c)
        if isinstance(value, str) or (value is None and c in ("inputs", "targets")):
            continue
        shown = repr(value)
        shown = shown if len(shown) <= 40 else shown[:37] + "..."
        raise DataError(f"{where}: FLAN field {c!r} is {type(value).__name__} {shown}, "
                        "expected a string (the Open-Orca/FLAN layout)")


def _read_file(path: str, columns: Sequence[str], tasks: set[str] | None,
               template_types: Sequence[str]) -> dict[str, list]:
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        filters = [("_template_type", "in", list(template_types))]
        if tasks is not None:
            filters.append(("_task_name", "in", sorted(tasks)))
        try:
            schema = pq.read_schema(path)
            _check_columns(path, schema.names, columns)
            _check_types(path, schema, columns)
            return pq.read_table(path, columns=list(columns), filters=filters).to_pydict()
        except DataError:
            raise
        except (OSError, ValueError, KeyError) as e:
            raise DataError(f"{path}: cannot read FLAN rows ({type(e).__name__}: "
                            f"{one_line(e)})") from None
    out: dict[str, list] = {c: [] for c in columns}
    lineno = 0
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                lineno += 1
                if not line.strip():
                    continue
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise ValueError("not a JSON object")
                _check_columns(f"{path}: line {lineno}", row, columns)
                _check_row(f"{path}: line {lineno}", row, columns)
                if row.get("_template_type") not in template_types:
                    continue
                if tasks is not None and row.get("_task_name") not in tasks:
                    continue
                for c in columns:
                    out[c].append(row.get(c))
    except DataError:
        raise
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: line {lineno}: unreadable FLAN data ({e})") from None
    return out


def _expert_of(task: str, grouping: Mapping[str, str] | None) -> str:
    return task if grouping is None else grouping[task]


def listed(names: Sequence[str], most: int = 20) -> str:
    """``names`` joined for a one-line message (the first ``most``, then how many more)."""
    shown = ", ".join(names[:most])
    return shown + (f" and {len(names) - most} more" if len(names) > most else "")


def check_grouped(root: str | os.PathLike, tasks, grouping: Mapping[str, str] | None) -> None:
    """Refuses task names of the release that ``grouping`` does not map to an expert (a task
    is never left out silently).

    Raises:
      DataError: naming every task without an expert.
    """
    if grouping is None:
        return
    missing = sorted(t for t in tasks if t not in grouping)
    if missing:
        raise DataError(f"{os.path.abspath(root)}: the FLAN grouping has no expert for "
                        f"{len(missing)} task(s) found there: {listed(missing)}; add them to "
                        "the grouping")


def task_names(root: str | os.PathLike,
               template_types: Sequence[str] = ZERO_SHOT) -> dict[str, int]:
    """``{task name: zero-shot rows}`` over the whole release (reads two columns only)."""
    counts: dict[str, int] = {}
    for f in data_files(root):
        cols = _read_file(f, ("_task_name", "_template_type"), None, template_types)
        for name in cols["_task_name"]:
            if name is None:
                raise DataError(f"{f}: a FLAN row without a _task_name (the Open-Orca/FLAN "
                                "layout names every row's task)")
            counts[name] = counts.get(name, 0) + 1
    return dict(sorted(counts.items()))


def experts(root: str | os.PathLike, grouping: Mapping[str, str] | None = None,
            template_types: Sequence[str] = ZERO_SHOT) -> list[str]:
    """The expert names: the task names, or the values of ``grouping`` that have data.

    Raises:
      DataError: a task of the release that ``grouping`` lacks (``check_grouped``).
    """
    tasks = task_names(root, template_types)
    check_grouped(root, tasks, grouping)
    return sorted({_expert_of(t, grouping) for t in tasks})


def rows(root: str | os.PathLike, expert: str, *, grouping: Mapping[str, str] | None = None,
         template_types: Sequence[str] = ZERO_SHOT) -> list[tuple[str, str, str]]:
    """``(inputs, targets, template_type)`` of one expert, in file order, empty rows dropped."""
    tasks = {expert} if grouping is None else {t for t, e in grouping.items() if e == expert}
    if not tasks:
        raise DataError(f"FLAN expert {expert!r} has no task in the grouping")
    return rows_by_expert(root, [expert], grouping=grouping,
                          template_types=template_types).get(expert, [])


def rows_by_expert(root: str | os.PathLike, wanted: Sequence[str] | None = None, *,
                   grouping: Mapping[str, str] | None = None,
                   template_types: Sequence[str] = ZERO_SHOT
                   ) -> dict[str, list[tuple[str, str, str]]]:
    """``{expert: [(inputs, targets, template_type), ...]}`` in file order, empty rows dropped,
    reading each file once (``wanted``: only these experts; None: all).

    Raises:
      DataError: a file that cannot be read, lacks one of ``COLUMNS`` or holds other values
        than strings there; with ``wanted`` None, a task that ``grouping`` lacks.
    """
    if wanted is None:
        check_grouped(root, task_names(root, template_types), grouping)
    tasks = None
    if wanted is not None:
        tasks = (set(wanted) if grouping is None
                 else {t for t, e in grouping.items() if e in set(wanted)})
    out: dict[str, list[tuple[str, str, str]]] = {}
    for f in data_files(root):
        cols = _read_file(f, COLUMNS, tasks, template_types)
        for inp, tgt, task, tt in zip(*(cols[c] for c in COLUMNS)):
            expert = _expert_of(task, grouping)
            if inp is None or tgt is None:
                continue
            if str(inp).strip() and str(tgt).strip():
                out.setdefault(expert, []).append((str(inp), str(tgt), str(tt)))
    return out


def split_rows(items: list, split: str, seed: int = SEED, max_train: int | None = MAX_TRAIN
               ) -> list:
    """The original split: shuffle, first min(10%, 10k) validation, rest train (at most
    ``max_train``, None: all)."""
    if split not in ("train", "validation"):
        raise DataError(f"FLAN split must be 'train' or 'validation', got {split!r}")
    order = np.random.RandomState(seed).permutation(len(items))
    n_val = min(int(0.1 * len(items)), MAX_VALIDATION)
    end = None if max_train is None else n_val + max_train
    picked = order[:n_val] if split == "validation" else order[n_val:end]
    return [items[i] for i in picked]


def examples(root: str | os.PathLike, expert: str, split: str = "validation", *,
             grouping: Mapping[str, str] | None = None, dataset: str | None = None
             ) -> list[Example]:
    """One expert's examples as generation ``Example`` s (the target is the reference)."""
    picked = split_rows(rows(root, expert, grouping=grouping), split)
    return [Example(inp, None, (), (tgt,), dataset or expert, tt, str(i))
            for i, (inp, tgt, tt) in enumerate(picked)]
