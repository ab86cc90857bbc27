"""Hugging Face datasets saved on disk: one split of a ``datasets.save_to_disk`` folder or of a
folder of parquet files, read without running anything from the folder (no loading scripts).

A dataset folder is one of:

    <folder>/dataset_dict.json + <split>/...      DatasetDict.save_to_disk
    <folder>/<split>/dataset_info.json ...         Dataset.save_to_disk, one folder per split
    <folder>/<split>-*.parquet, <split>.parquet    parquet files (also under <folder>/data/ or
    <folder>/<split>/*.parquet                     <folder>/<split>/, as the Hub lays them out)
"""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence

from goose_jax.core.errors import DataError


def _parquet_files(folder: str, split: str) -> list[str]:
    found: list[str] = []
    for pattern in (f"{split}.parquet", f"{split}-*.parquet", os.path.join(split, "*.parquet"),
                    os.path.join("data", f"{split}-*.parquet"),
                    os.path.join("data", f"{split}.parquet")):
        found += sorted(glob.glob(os.path.join(glob.escape(folder), pattern)))
    return found


def is_dataset(folder: str) -> bool:
    """Whether ``folder`` looks like a saved dataset (either layout)."""
    if not os.path.isdir(folder):
        return False
    if os.path.isfile(os.path.join(folder, "dataset_dict.json")):
        return True
    names = os.listdir(folder)
    return any(n.endswith(".parquet") for n in names) or any(
        os.path.isfile(os.path.join(folder, n, "dataset_info.json"))
        or glob.glob(os.path.join(glob.escape(os.path.join(folder, n)), "*.parquet"))
        for n in names if os.path.isdir(os.path.join(folder, n)))


def splits(folder: str) -> list[str]:
    """The split names a saved dataset holds."""
    if os.path.isfile(os.path.join(folder, "dataset_dict.json")):
        import json

        with open(os.path.join(folder, "dataset_dict.json"), encoding="utf-8") as f:
            return list(json.load(f).get("splits", []))
    names = set()
    for n in os.listdir(folder):
        path = os.path.join(folder, n)
        if os.path.isdir(path) and (os.path.isfile(os.path.join(path, "dataset_info.json"))
                                    or glob.glob(os.path.join(glob.escape(path), "*.parquet"))):
            names.add(n)
        elif n.endswith(".parquet"):
            names.add(n[:-len(".parquet")].split("-")[0])
    data = os.path.join(folder, "data")
    if os.path.isdir(data):
        names.discard("data")
        names |= {n[:-len(".parquet")].split("-")[0] for n in os.listdir(data)
                  if n.endswith(".parquet")}
    return sorted(names)


class SavedSplit:
    """One split of a saved dataset: its length and its rows by index (plain Python values)."""

    def __init__(self, folder: str, split: str):
        self.where = f"{folder} (split {split!r})"
        try:
            if os.path.isfile(os.path.join(folder, "dataset_dict.json")) or os.path.isfile(
                    os.path.join(folder, split, "dataset_info.json")):
                import datasets

                if os.path.isfile(os.path.join(folder, split, "dataset_info.json")):
                    ds = datasets.Dataset.load_from_disk(os.path.join(folder, split))
                else:
                    ds = datasets.load_from_disk(folder)
                    if split not in ds:
                        raise DataError(f"{folder}: no split {split!r} in the saved dataset "
                                        f"(found: {', '.join(ds) or 'none'})")
                    ds = ds[split]
                self._table, self._ds = None, ds
                return
            files = _parquet_files(folder, split)
            if not files:
                raise DataError(f"{folder}: no split {split!r} (neither save_to_disk files nor "
                                f"{split}-*.parquet; found splits: "
                                f"{', '.join(splits(folder)) or 'none'})")
            import pyarrow as pa
            import pyarrow.parquet as pq

            self._table = pa.concat_tables([pq.read_table(f) for f in files],
                                           promote_options="default")
            self._ds = None
        except DataError:
            raise
        except Exception as e:  # arrow / datasets errors on a damaged folder
            raise DataError(f"{folder}: cannot read the saved dataset's split {split!r} "
                            f"({type(e).__name__}: {' '.join(str(e).split())[:200]})") from None

    def __len__(self) -> int:
        return len(self._ds) if self._ds is not None else self._table.num_rows

    def rows(self, indices: Sequence[int]) -> list[dict]:
        """The rows at ``indices``, in that order."""
        indices = [int(i) for i in indices]
        if not indices:
            return []
        if self._ds is not None:
            return self._ds.select(indices).to_list()
        import pyarrow as pa

        return self._table.take(pa.array(indices, type=pa.int64())).to_pylist()
