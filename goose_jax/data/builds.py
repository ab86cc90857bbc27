"""What every training-set builder shares: the output folder, its files and its summary.

A build writes, under ``OUT_DIR``:

    train/<expert>.jsonl        one {"input", "target", "template"} object per line
    validation/<expert>.jsonl   the same, plus "choices" where the example is rank-classified
    summary.json                the settings and the counts per expert and template

The lines are what ``goose-train`` reads (``--data OUT/train/*.jsonl --eval-data
OUT/validation/*.jsonl``: both globs sort alike); keys other than ``input`` and ``target`` are
ignored there. Everything is written into a staging folder beside ``OUT_DIR`` that is renamed
into place only when the build is complete, so a failed or interrupted build leaves nothing
(and an ``--overwrite`` build keeps the old ``OUT_DIR`` until the new one is whole).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
from collections.abc import Iterable, Iterator, Mapping, Sequence

from goose_jax.core.errors import DataError, UsageError
from goose_jax.core.outputs import check_apart, run_lock
from goose_jax.core.tensorfile import check_folder_writable, write_atomic

_UNSAFE = re.compile(r"[^A-Za-z0-9_.+-]+")


@dataclasses.dataclass(frozen=True)
class Row:
    """One line of a built file.

    Attributes:
      input: the prompt.
      target: the text to train towards.
      template: the template (P3) or template type (FLAN) it came from.
      choices: the answer choices: of a rank-classified validation example; of a training
        example's template (empty when it has none: the retrieval index embeds them); else None
        (written only when not None).
    """

    input: str
    target: str
    template: str
    choices: tuple[str, ...] | None = None

    def to_json(self) -> str:
        row = {"input": self.input, "target": self.target, "template": self.template}
        if self.choices is not None:
            row["choices"] = list(self.choices)
        return json.dumps(row, ensure_ascii=False)


@dataclasses.dataclass
class ExpertData:
    """One expert's two splits, in the order they are written, and where they came from (recorded
    in the summary when given)."""

    name: str
    train: list[Row]
    validation: list[Row]
    source: str = ""


def file_stem(name: str) -> str:
    """The file name (without ``.jsonl``) of an expert: its name with every run of characters
    outside ``A-Za-z0-9_.+-`` replaced by ``_`` (``glue/cola`` -> ``glue_cola``), which is also
    a valid goose-train expert name."""
    stem = _UNSAFE.sub("_", name).strip("_.") or "expert"
    return stem[:128]


def file_stems(names: Sequence[str]) -> dict[str, str]:
    """``{expert: stem}``; two experts that would share a file are refused."""
    stems: dict[str, str] = {}
    seen: dict[str, str] = {}
    for name in names:
        stem = file_stem(name)
        if stem in seen:
            raise DataError(f"experts {seen[stem]!r} and {name!r} would both be written to "
                            f"{stem}.jsonl; rename one in the grouping")
        seen[stem] = name
        stems[name] = stem
    return stems


def pick(names: Sequence[str], wanted: Sequence[str] | None, what: str) -> list[str]:
    """``wanted`` (in ``names`` order), or all ``names``; an unknown name is a usage error."""
    if not wanted:
        return list(names)
    unknown = [w for w in wanted if w not in names]
    if unknown:
        import difflib

        close = difflib.get_close_matches(unknown[0], list(names), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else f"; known: {', '.join(names)}"
        raise UsageError(f"--datasets: unknown {what} {unknown[0]!r}{hint}")
    return [n for n in names if n in set(wanted)]


def check_out_dir(out: str | os.PathLike, overwrite: bool) -> str:
    """The absolute ``OUT_DIR``, after refusing one that is a file, or that holds files and
    ``overwrite`` is off. Writes nothing."""
    out = os.path.abspath(os.path.expanduser(os.fspath(out)))
    if os.path.exists(out) and not os.path.isdir(out):
        raise DataError(f"{out}: OUT_DIR is a file; pass a folder path")
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise DataError(f"{out}: OUT_DIR is not empty; pass --overwrite to replace it, or "
                        "another OUT_DIR")
    check_folder_writable(os.path.dirname(out), error=DataError, fix="; pass another OUT_DIR")
    return out


@contextlib.contextmanager
def staged(out: str) -> Iterator[str]:
    """A staging folder beside ``out`` that becomes ``out`` when the block ends without an
    error; on any error (or Ctrl-C) it is removed and ``out`` is left as it was."""
    parent, base = os.path.split(out)
    stage = os.path.join(parent, f".{base}.partial-{os.getpid()}")
    shutil.rmtree(stage, ignore_errors=True)
    os.makedirs(stage)
    try:
        yield stage
        old = None
        if os.path.isdir(out):
            old = os.path.join(parent, f".{base}.old-{os.getpid()}")
            os.rename(out, old)
        os.rename(stage, out)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def _write_lines(path: str, rows: Iterable[Row]) -> None:
    write_atomic(path, "".join(r.to_json() + "\n" for r in rows))


def _counts(rows: Sequence[Row]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in rows:
        out[r.template] = out.get(r.template, 0) + 1
    return dict(sorted(out.items()))


def write_build(out: str, experts: Iterable[ExpertData], settings: Mapping, *,
                stems: Mapping[str, str]) -> dict:
    """Writes every expert's files and ``summary.json`` into ``out`` (a staging folder);
    returns the summary. An expert with no training rows is refused."""
    for split in ("train", "validation"):
        os.makedirs(os.path.join(out, split))
    summary = {**settings, "experts": {}}
    for data in experts:
        if not data.train:
            raise DataError(f"{settings.get('source', 'data')}: expert {data.name!r} has no "
                            "training examples (empty dataset); leave it out with --datasets")
        stem = stems[data.name]
        for split, rows in (("train", data.train), ("validation", data.validation)):
            _write_lines(os.path.join(out, split, f"{stem}.jsonl"), rows)
        train, val = _counts(data.train), _counts(data.validation)
        summary["experts"][data.name] = {
            **({"source": data.source} if data.source else {}),
            "file": f"{stem}.jsonl", "train": len(data.train), "validation": len(data.validation),
            "templates": {t: {"train": train.get(t, 0), "validation": val.get(t, 0)}
                          for t in sorted(train.keys() | val.keys())}}
    write_atomic(os.path.join(out, "summary.json"), json.dumps(summary, indent=1) + "\n")
    return summary


def summary_table(summary: Mapping) -> str:
    """The counts of a summary as a plain-text table: one row per (expert, template), then one
    total row per expert."""
    rows = [("expert", "template", "train", "validation")]
    for name, e in summary["experts"].items():
        for template, c in e["templates"].items():
            rows.append((name, template, str(c["train"]), str(c["validation"])))
        rows.append((name, "(all)", str(e["train"]), str(e["validation"])))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in
                       enumerate(zip(r, widths))).rstrip() for r in rows]
    return "\n".join(lines[:1] + ["-" * len(lines[0])] + lines[1:])


def run_build(out: str | os.PathLike, overwrite: bool, build, *, prog: str = "goose-data",
              inputs: Mapping[str, str | None] | None = None) -> dict:
    """Checks ``out`` (apart from ``inputs``, flag -> path read: ``core.outputs.check_apart``), runs
    ``build(staging_folder) -> summary`` in a staging folder under ``out``'s lock
    (``core.outputs.run_lock``), moves it to ``out`` once complete, and prints the summary table and
    one closing line."""
    check_apart({"OUT_DIR": out}, inputs or {})
    out = check_out_dir(out, overwrite)
    with run_lock(out, prog=prog, flag="OUT_DIR"):
        if not overwrite:   # another build may have finished here since the check
            check_out_dir(out, overwrite)
        with staged(out) as stage:
            summary = build(stage)
    experts = summary["experts"].values()
    print(summary_table(summary))
    print(f"{prog}: wrote {len(experts)} experts ({sum(e['train'] for e in experts)} train, "
          f"{sum(e['validation'] for e in experts)} validation examples) to {out}")
    return summary
