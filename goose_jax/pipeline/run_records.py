"""What a goose-train run owns: its record in the work directory (``run.json``), the experts it
wrote into a library, and the folders it made.

A run is known by its identity (command, base, data, config): a work directory holds one run,
and a rerun with the same identity resumes it while one with another is refused (fields that
change only layout or memory, ``_LAYOUT_FIELDS``, may differ). Experts already in the library
are kept unless this run wrote them (its own, from an earlier attempt) or ``--overwrite`` says
otherwise; a folder a refused or failed run made and left empty is removed.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
from collections.abc import Callable, Sequence
from typing import Any

from goose_jax.core import distributed
from goose_jax.core.errors import TrainConfigError
from goose_jax.core.outputs import run_lock
from goose_jax.core.tensorfile import read_json, write_atomic
from goose_jax.library.manifest import EXPERT_DIR, MANIFEST
from goose_jax.library.store import LOCK, ExpertLibrary
from goose_jax.training.program import TrainConfig

# Config fields that change how a run is laid out or how much memory it takes, never its numbers:
# a run may resume under other values.
_LAYOUT_FIELDS = ("mesh", "remat")


def _run_key(identity: dict) -> dict:
    identity = json.loads(json.dumps(identity))
    # A field at its default counts as absent, so a run recorded before the field existed
    # resumes under the default.
    defaults = json.loads(json.dumps(TrainConfig().to_dict()))
    identity["config"] = {k: v for k, v in identity.get("config", {}).items()
                          if k not in _LAYOUT_FIELDS and not (k in defaults and v == defaults[k])}
    identity.pop("finished", None)
    return identity


def read_run(workdir: str, identity: dict) -> dict | None:
    """The ``run.json`` this work directory holds for this run, or None for a new run. Reads
    only: a run refused later leaves no record.

    Raises ``TrainConfigError`` if the work directory holds a different run (or checkpoints
    without a ``run.json``)."""
    path = os.path.join(workdir, "run.json")
    if not os.path.exists(path):
        if os.path.isdir(os.path.join(workdir, "checkpoints")):
            raise TrainConfigError(f"{workdir}: has checkpoints but no run.json; use a new "
                                   "--workdir")
        return None
    old = read_json(path, error=TrainConfigError, what="the run record",
                    fix="; use a new --workdir")
    if not isinstance(old, dict):
        raise TrainConfigError(f"{path}: not a run record; use a new --workdir")
    a_run, b_run = _run_key(old), _run_key(identity)
    for key in sorted(set(a_run) | set(b_run)):
        if a_run.get(key) != b_run.get(key):
            a, b = a_run.get(key), b_run.get(key)
            if isinstance(a, dict) and isinstance(b, dict):
                sub = next(k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k))
                key, a, b = f"{key}.{sub}", a.get(sub), b.get(sub)
            raise TrainConfigError(f"{path}: this work directory holds a different run "
                                   f"({key}: was {a!r}, now {b!r}); use a new --workdir")
    return old


def record_run(workdir: str, identity: dict, finished: bool = False) -> None:
    """Writes ``run.json`` (process 0, atomically), once every process has read the old one;
    ``finished`` marks a run whose outputs are written."""
    distributed.barrier("goose-train: run.json read")
    if distributed.is_primary():
        os.makedirs(workdir, exist_ok=True)
        record = {**json.loads(json.dumps(identity)), **({"finished": True} if finished else {})}
        write_atomic(os.path.join(workdir, "run.json"), json.dumps(record, indent=1))


def already_written(done: bool, lib: ExpertLibrary | None, names: Sequence[str], workdir: str,
                    gates: bool = False) -> bool:
    """Whether a rerun of a finished run (``done``: its run.json says so, or its training had
    nothing left to do) found all its outputs in ``lib``; then it writes nothing."""
    # Rerunning a finished command must not rewrite its outputs: gates trained since then
    # (or other later edits) would be lost. Outputs missing from the library are written.
    done = done and lib is not None and all(
        n in lib and (not gates or lib.info(n)["has_gate"]) for n in names)
    if done and distributed.is_primary():
        print(f"{workdir}: this run had already finished; {lib.path} is unchanged")
    return done


def not_written_here(lib: ExpertLibrary | None, names: Sequence[str], workdir: str,
                     gates: bool = False) -> list[str]:
    """The experts (or, with ``gates``, the gates) among ``names`` that ``lib`` holds and that
    the run of ``workdir`` did not write itself: a rerun replaces only its own outputs, never
    what another run added meanwhile (each entry records its run's ``workdir``)."""
    mine = os.path.realpath(workdir)
    found = []
    for name in names:
        if lib is None or name not in lib:
            continue
        entry = lib.info(name)
        if gates and not entry.get("has_gate"):
            continue
        owner = (entry.get("gate") or {}) if gates else entry
        if not isinstance(owner, dict) or owner.get("workdir") != mine:
            found.append(name)
    return found


@contextlib.contextmanager
def dropped_if_left_empty(path: str, existed: bool):
    """Removes the library this run created at ``path`` when the run fails before an expert is
    in it (a manifest without experts, an empty expert folder): a failed run leaves no empty
    library behind. Anything else there is kept, and so is the library of a run interrupted
    with Ctrl-C, which its rerun resumes into."""
    try:
        yield
    except Exception:
        if not existed and distributed.is_primary():
            remove_if_empty(path)
        raise


def remove_if_empty(path: str) -> None:
    """Removes the library at ``path`` if it holds no expert and nothing else."""
    manifest = os.path.join(path, MANIFEST)
    try:
        with open(manifest, encoding="utf-8") as f:
            if json.load(f).get("experts"):
                return
        names = set(os.listdir(path))
        experts = os.path.join(path, EXPERT_DIR)
        if not names <= {MANIFEST, LOCK, EXPERT_DIR} or (
                EXPERT_DIR in names and os.listdir(experts)):
            return
        if EXPERT_DIR in names:
            os.rmdir(experts)
        for name in names & {MANIFEST, LOCK}:
            os.remove(os.path.join(path, name))
        os.rmdir(path)
    except (OSError, ValueError, AttributeError):
        return


def one_run_per_workdir(body: Callable[[Any], int]) -> Callable[[Any], int]:
    """``body`` under its work directory's lock (``core.outputs.run_lock``, process 0): a second run
    into the same ``--workdir`` is refused in one line while the first lives."""
    @functools.wraps(body)
    def run(args: Any) -> int:
        with contextlib.ExitStack() as held:
            if distributed.is_primary():
                held.enter_context(run_lock(args.workdir, prog="goose-train", flag="--workdir"))
            return body(args)
    return run
