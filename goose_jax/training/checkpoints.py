"""Training checkpoints: the trainable trees, optimiser state, step, RNG and data positions of a
run, saved every ``checkpoint_every`` steps by ``training.loop.train_loop`` (Orbax
``CheckpointManager``, asynchronous saves, the last ``keep`` steps kept).

Each complete step carries an integrity record, ``<step>/integrity.json``: the size and sha256
of every file of the step, written (atomically) once the save is on disk, and checked before the
step is restored, so a flipped, truncated or deleted file of any item is found before Orbax reads
it. A step that cannot be read (a file differs from its record, or Orbax fails on it) is set
aside (``<step>.unreadable``) once an older kept step has restored, and Ctrl-C during a save is
held until the save is consistent. A save that fails (a full disk) removes its temporary
folder (``<step>.orbax-checkpoint-tmp``) before the error is raised, and opening a directory
removes any such folder a killed run left. Model checkpoints (the one-shot
``save_model`` / ``load_model`` format) are ``goose_jax.models.checkpoint``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

import jax

from goose_jax.core import distributed, tool_process
from goose_jax.core.checkpoint import absolute, abstract_leaf, file_mismatch, file_sha256
from goose_jax.core.errors import CheckpointError, one_line

STATE_ITEM = "state"
META_ITEM = "meta"
UNREADABLE = ".unreadable"  # suffix of a step directory set aside because it could not be read
RECORD = "integrity.json"   # in each step directory: {"files": {rel: {"bytes", "sha256"}}}
TMP_MARK = ".orbax-checkpoint-tmp"  # in the name of a step folder Orbax has not finished


def _step_files(step_dir: str) -> list[str]:
    """Slash-separated paths of every file under ``step_dir`` but the record, sorted."""
    out = []
    for folder, _, names in os.walk(step_dir):
        for name in names:
            rel = os.path.relpath(os.path.join(folder, name), step_dir).replace(os.sep, "/")
            if rel != RECORD and not rel.startswith(RECORD + "."):
                out.append(rel)
    return sorted(out)


def write_record(step_dir: str) -> None:
    """Writes ``step_dir``'s integrity record (size and sha256 of every file), atomically."""
    files = {}
    for rel in _step_files(step_dir):
        file = os.path.join(step_dir, rel)
        files[rel] = {"bytes": os.path.getsize(file), "sha256": file_sha256(file)}
    tmp = os.path.join(step_dir, f"{RECORD}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump({"format": "goose-jax-train-checkpoint", "files": files}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(step_dir, RECORD))


def check_record(step_dir: str) -> None:
    """Checks every file of ``step_dir`` against its integrity record.

    A step without a record (written before records were, or cut off between the end of its
    save and its record) is left to Orbax's own checks.

    Raises:
      CheckpointError: one line naming the first file that is missing, of another size, or
        whose sha256 differs (or a record that cannot be read).
    """
    path = os.path.join(step_dir, RECORD)
    if not os.path.exists(path):
        return
    try:
        with open(path, "rb") as f:
            files = json.loads(f.read().decode("utf-8"))["files"]
        if not isinstance(files, dict):
            raise TypeError(f"'files' is a {type(files).__name__}")
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise CheckpointError(f"{RECORD}: cannot be read ({one_line(e)})") from None
    for rel, want in files.items():
        problem = file_mismatch(os.path.join(step_dir, rel), want)
        if problem is None:
            continue
        kind, found = problem
        if kind == "missing":
            raise CheckpointError(f"{rel}: missing")
        if kind == "size":
            raise CheckpointError(f"{rel}: {found} bytes, recorded "
                                  f"{want.get('bytes') if isinstance(want, dict) else want}")
        if kind == "unreadable":
            raise CheckpointError(f"{rel}: cannot be read ({one_line(found)})")
        raise CheckpointError(f"{rel}: sha256 differs from the record")


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Holds a Ctrl-C (SIGINT) that arrives inside the block until the block ends.

    Orbax's checkpoint manager is not safe to interrupt: a ``KeyboardInterrupt`` raised inside
    ``save`` or ``wait_until_finished`` leaves its finaliser thread half-joined (an error
    report, a traceback, sometimes a hang at exit). Inside the block the first Ctrl-C is noted
    and raised as ``KeyboardInterrupt`` once the block is done; a second one interrupts at once.
    Only the main thread can do this, and only while Python's own handler or a tool's
    (``goose_jax.core.tool_process``) is installed (a process started with SIGINT ignored keeps
    ignoring it); elsewhere the block runs as is.
    """
    previous = signal.getsignal(signal.SIGINT)
    if (threading.current_thread() is not threading.main_thread()
            or previous not in (signal.default_int_handler, tool_process.on_sigint)):
        yield
        return
    pending = []

    def note(signum, frame):
        if pending:
            raise KeyboardInterrupt
        pending.append(signum)

    signal.signal(signal.SIGINT, note)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if pending:
        raise KeyboardInterrupt


def _drop_closed_loop_reports(report) -> None:
    if not (isinstance(report.exc_value, RuntimeError)
            and str(report.exc_value) == "Event loop is closed"):
        _drop_closed_loop_reports.previous(report)


@contextlib.contextmanager
def _quiet_restore() -> Iterator[None]:
    # A corrupt step makes Orbax and asyncio log errors and tracebacks of their own before the
    # exception reaches us; the caller reports it in one line instead. Orbax also closes its
    # event loop at the first failed read while TensorStore's other reads are still in flight:
    # each of those later reports "Event loop is closed" as an unraisable exception, from
    # another thread, at any time afterwards. Those reports alone are dropped from then on.
    loggers = [logging.getLogger(n) for n in ("absl", "orbax", "asyncio")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL + 1)
    installed = sys.unraisablehook is not _drop_closed_loop_reports
    if installed:
        _drop_closed_loop_reports.previous = sys.unraisablehook
        sys.unraisablehook = _drop_closed_loop_reports
    try:
        yield
    except BaseException:
        installed = False  # stays: the reports come later
        raise
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
        if installed:
            sys.unraisablehook = _drop_closed_loop_reports.previous


class TrainCheckpointer:
    """Training-state checkpoints of one work directory, through Orbax's ``CheckpointManager``.

    Each step is a directory ``<directory>/<step>/`` with two items: ``state``, a pytree of
    arrays saved with ``ocp.args.StandardSave`` (the caller passes only what changes during
    training: trainable trees, optimiser state, step, RNG; never a frozen base), and ``meta``,
    JSON (data positions, config). The last ``keep`` steps are kept. Saves are asynchronous:
    ``wait``/``close`` block until they are on disk; an interrupted save is never restored
    (Orbax finalises a step directory atomically). Once a save is on disk (at the next
    ``save``, ``wait`` or ``close``) its integrity record is written; ``restore`` checks it.

    Usage::

        with TrainCheckpointer(workdir / "checkpoints", keep=2) as ckpt:
            if ckpt.latest_step() is not None:
                tree, meta = ckpt.restore(target_tree)
            ckpt.save(step, tree, {"positions": [...]})
    """

    def __init__(self, directory: str | os.PathLike, *, keep: int = 2, async_save: bool = True):
        import orbax.checkpoint as ocp

        self.directory = absolute(directory)
        if os.path.exists(self.directory) and not os.path.isdir(self.directory):
            raise CheckpointError(f"{self.directory}: exists and is not a directory")
        # cleanup_tmp_directories: the unfinished step folders of a killed run are removed
        # (by the primary process, before the first save) rather than left beside the steps.
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=async_save,
                                               cleanup_tmp_directories=True)
        handlers = {STATE_ITEM: ocp.StandardCheckpointHandler(),
                    META_ITEM: ocp.JsonCheckpointHandler()}
        self._manager = ocp.CheckpointManager(self.directory, options=options,
                                              item_handlers=handlers)

    def latest_step(self) -> int | None:
        """The newest complete step on disk, or None."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """Every complete step on disk, oldest first."""
        return sorted(self._manager.all_steps())

    def save(self, step: int, tree: Any, meta: dict[str, Any] | None = None) -> None:
        """Starts saving ``tree`` (arrays) and ``meta`` (JSON) as ``step``; returns at once."""
        import orbax.checkpoint as ocp

        try:
            json.dumps(meta or {})
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{self.directory}: training metadata is not "
                                  f"JSON-serializable: {one_line(e)}") from None
        args = ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardSave(tree),
                                     META_ITEM: ocp.args.JsonSave(meta or {})})
        with interrupts_deferred():
            # Orbax waits for the previous save here anyway; its record is written first.
            self._wait_saved()
            self._record_finished()
            try:
                self._manager.save(int(step), args=args, force=True)
            except Exception:  # a synchronous save's failure, or its folder refused
                with contextlib.suppress(Exception):
                    self._manager.wait_until_finished()
                self._remove_unfinished()
                raise

    def _wait_saved(self) -> None:
        """Waits for the asynchronous save in flight; if it failed (a full disk, a read-only
        folder), removes its unfinished folder and raises the failure."""
        try:
            self._manager.wait_until_finished()
        except Exception:
            self._remove_unfinished()
            raise

    def _remove_unfinished(self) -> None:
        """Removes every unfinished step folder (``*.orbax-checkpoint-tmp*``) of the directory
        (primary only: it is the one that finalises steps). Called once no save is in flight."""
        if not distributed.is_primary():
            return
        try:
            names = os.listdir(self.directory)
        except OSError:
            return
        for name in names:
            if TMP_MARK in name:
                # A failed write's sibling writes may still be closing their files: try again.
                for _ in range(3):
                    shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)
                    if not os.path.lexists(os.path.join(self.directory, name)):
                        break

    def _record_finished(self) -> None:
        """Writes the integrity record of every finished step that lacks one (primary only:
        Orbax has synchronised the processes when a save is finished)."""

        if not distributed.is_primary():
            return
        for step in self._manager.all_steps():
            step_dir = os.path.join(self.directory, str(step))
            if os.path.isdir(step_dir) and not os.path.exists(os.path.join(step_dir, RECORD)):
                write_record(step_dir)

    def restore(self, target: Any, step: int | None = None) -> tuple[Any, dict[str, Any]]:
        """Restores ``(tree, meta)`` of ``step`` (default: the latest).

        Args:
          target: a pytree of arrays or ``jax.ShapeDtypeStruct`` shaped like the saved tree;
            each leaf's dtype and sharding are those of the restored leaf. Its mesh may differ
            from the one the checkpoint was written from (other device or process counts,
            other axis sizes; see ``saved_shapes``).
          step: which step; default the latest.

        Raises:
          CheckpointError: no checkpoint, a file that differs from the step's integrity record
            (naming it), or a step that Orbax cannot read or that does not match ``target``.
        """
        import orbax.checkpoint as ocp

        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"{self.directory}: no training checkpoint to restore")
        default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        abstract = jax.tree.map(
            lambda x: abstract_leaf(x, getattr(x, "sharding", None) or default), target)
        args = ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardRestore(abstract),
                                     META_ITEM: ocp.args.JsonRestore()})
        try:
            check_record(os.path.join(self.directory, str(step)))
        except CheckpointError as e:
            err = CheckpointError(f"{self.directory}/{step}/{e}")
            err.reason = str(e)
            raise err from None
        try:
            with _quiet_restore():
                restored = self._manager.restore(int(step), args=args)
        except Exception as e:  # noqa: BLE001  (TensorStore raises bare Exception on bad data)
            err = CheckpointError(f"{self.directory}/{step}: cannot restore the training state "
                                  f"(was it written by a different config?): {one_line(e)}")
            err.reason = one_line(e)
            raise err from None
        return restored[STATE_ITEM], dict(restored[META_ITEM] or {})

    def restore_usable(self, target: Any, warn: Callable[[str], None] = print
                       ) -> tuple[Any, dict[str, Any], int]:
        """Restores the newest step that can be read: ``(tree, meta, step)``.

        Steps are tried newest first; one that cannot be read (a file that differs from the
        step's integrity record, or any error from Orbax) is skipped. Once an older step
        restores, each newer one is set aside as ``<step>.unreadable`` beside the others (so
        that training can write that step again) and ``warn`` is called with one line per step,
        naming the file at fault. When no step restores (a corrupt work directory, or one
        another version wrote), nothing is moved.

        Args:
          target: see ``restore``.
          warn: called with a one-line message for each step set aside.

        Raises:
          CheckpointError: no step could be read (the message suggests a new work directory).
        """
        failed = []
        for step in reversed(self.all_steps()):
            try:
                tree, meta = self.restore(target, step)
            except CheckpointError as e:
                reason = getattr(e, "reason", None) or one_line(e)
                failed.append((step, reason if len(reason) <= 100 else reason[:97] + "..."))
                continue
            for bad, reason in failed:
                aside = self._set_aside(bad)
                warn(f"{self.directory}/{bad}: unreadable checkpoint ({reason}); moved to "
                     f"{aside}; resuming from step {step}")
            return tree, meta, step
        step, reason = failed[0]
        raise CheckpointError(f"{self.directory}: no training checkpoint can be read (steps "
                              f"{[s for s, _ in failed]}; step {step}: {reason}); use a new "
                              "--workdir to start again")

    def _set_aside(self, step: int) -> str:
        src = os.path.join(self.directory, str(step))
        dst, n = src + UNREADABLE, 1
        while os.path.exists(dst):
            n += 1
            dst = f"{src}{UNREADABLE}-{n}"
        distributed.barrier("goose-train: checkpoint read")
        if distributed.is_primary():
            os.replace(src, dst)
        distributed.barrier("goose-train: checkpoint set aside")
        self._manager.reload()
        return dst

    def saved_shapes(self, step: int | None = None, sharding: Any = None) -> Any:
        """The saved state's structure as ``jax.ShapeDtypeStruct`` leaves, a restore target.

        A checkpoint does not depend on the mesh it was written from (several processes write
        one checkpoint together): give each leaf the ``sharding`` it should be restored onto,
        e.g. one device, or a ``NamedSharding`` of any mesh; or map over the result to choose
        per leaf.

        Args:
          step: which step; default the latest.
          sharding: a ``jax.sharding.Sharding`` for every leaf (default: the first local
            device).

        Raises:
          CheckpointError: there is no such step.
        """
        step = self.latest_step() if step is None else step
        if step is None or int(step) not in self.all_steps():
            raise CheckpointError(f"{self.directory}: no training checkpoint for step {step} "
                                  f"(found {self.all_steps()})")
        sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        metadata = self._manager.item_metadata(int(step))[STATE_ITEM]
        return jax.tree.map(lambda m: abstract_leaf(m, sharding), metadata)

    def saved_leaf_paths(self, step: int | None = None) -> list[str]:
        """Slash-joined paths of every array saved in ``step``'s state (for audits and tests)."""
        step = self.latest_step() if step is None else step
        metadata = self._manager.item_metadata(int(step))[STATE_ITEM]
        paths = jax.tree_util.tree_flatten_with_path(metadata)[0]
        return ["/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
                for path, _ in paths]

    def wait(self) -> None:
        """Blocks until the last asynchronous save is on disk, with its integrity record."""
        with interrupts_deferred():
            self._wait_saved()
            self._record_finished()

    def close(self) -> None:
        """Finishes pending saves and releases the manager (also on leaving a ``with``)."""
        with interrupts_deferred():
            self._wait_saved()
            self._record_finished()
            self._manager.close()

    def __enter__(self) -> TrainCheckpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
