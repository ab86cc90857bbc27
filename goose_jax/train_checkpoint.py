"""Training checkpoints: the trainable trees, optimiser state, step, RNG and data positions of a
run, saved every ``checkpoint_every`` steps by ``trainer.train_loop`` (Orbax
``CheckpointManager``, asynchronous saves, the last ``keep`` steps kept).

A corrupt latest step is set aside (``<step>.unreadable``) once an older kept step has restored,
and Ctrl-C during a save is held until the save is consistent. Model checkpoints (the one-shot
``save_model`` / ``load_model`` format) are ``goose_jax.checkpoint``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

import jax

from goose_jax import tool_process
from goose_jax.checkpoint import _abs, _abstract
from goose_jax.errors import CheckpointError, one_line

STATE_ITEM = "state"
META_ITEM = "meta"
UNREADABLE = ".unreadable"  # suffix of a step directory set aside because it could not be read


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Holds a Ctrl-C (SIGINT) that arrives inside the block until the block ends.

    Orbax's checkpoint manager is not safe to interrupt: a ``KeyboardInterrupt`` raised inside
    ``save`` or ``wait_until_finished`` leaves its finaliser thread half-joined (an error
    report, a traceback, sometimes a hang at exit). Inside the block the first Ctrl-C is noted
    and raised as ``KeyboardInterrupt`` once the block is done; a second one interrupts at once.
    Only the main thread can do this, and only while Python's own handler or a tool's
    (``goose_jax.tool_process``) is installed (a process started with SIGINT ignored keeps
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
    (Orbax finalises a step directory atomically).

    Usage::

        with TrainCheckpointer(workdir / "checkpoints", keep=2) as ckpt:
            if ckpt.latest_step() is not None:
                tree, meta = ckpt.restore(target_tree)
            ckpt.save(step, tree, {"positions": [...]})
    """

    def __init__(self, directory: str | os.PathLike, *, keep: int = 2, async_save: bool = True):
        import orbax.checkpoint as ocp

        self.directory = _abs(directory)
        if os.path.exists(self.directory) and not os.path.isdir(self.directory):
            raise CheckpointError(f"{self.directory}: exists and is not a directory")
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=async_save)
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
            self._manager.save(int(step), args=args, force=True)

    def restore(self, target: Any, step: int | None = None) -> tuple[Any, dict[str, Any]]:
        """Restores ``(tree, meta)`` of ``step`` (default: the latest).

        Args:
          target: a pytree of arrays or ``jax.ShapeDtypeStruct`` shaped like the saved tree;
            each leaf's dtype and sharding are those of the restored leaf. Its mesh may differ
            from the one the checkpoint was written from (other device or process counts,
            other axis sizes; see ``saved_shapes``).
          step: which step; default the latest.

        Raises:
          CheckpointError: no checkpoint, or one that does not match ``target``.
        """
        import orbax.checkpoint as ocp

        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"{self.directory}: no training checkpoint to restore")
        default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        abstract = jax.tree.map(
            lambda x: _abstract(x, getattr(x, "sharding", None) or default), target)
        args = ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardRestore(abstract),
                                     META_ITEM: ocp.args.JsonRestore()})
        try:
            with _quiet_restore():
                restored = self._manager.restore(int(step), args=args)
        except (ValueError, TypeError, KeyError, OSError) as e:
            raise CheckpointError(f"{self.directory}/{step}: cannot restore the training state "
                                  f"(was it written by a different config?): "
                                  f"{one_line(e)}") from None
        return restored[STATE_ITEM], dict(restored[META_ITEM] or {})

    def restore_usable(self, target: Any, warn: Callable[[str], None] = print
                       ) -> tuple[Any, dict[str, Any], int]:
        """Restores the newest step that can be read: ``(tree, meta, step)``.

        Steps that cannot be read (truncated, flipped or missing files: Orbax's OCDBT store
        checksums its data) are tried newest first. Once an older step restores, each newer
        one is set aside as ``<step>.unreadable`` beside the others (so that training can write
        that step again) and ``warn`` is called with one line per step. When no step restores
        (a corrupt work directory, or one another version wrote), nothing is moved.

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
                reason = one_line(e.__context__ or e)
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
        from goose_jax import distributed

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
        return jax.tree.map(lambda m: _abstract(m, sharding), metadata)

    def saved_leaf_paths(self, step: int | None = None) -> list[str]:
        """Slash-joined paths of every array saved in ``step``'s state (for audits and tests)."""
        step = self.latest_step() if step is None else step
        metadata = self._manager.item_metadata(int(step))[STATE_ITEM]
        paths = jax.tree_util.tree_flatten_with_path(metadata)[0]
        return ["/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
                for path, _ in paths]

    def wait(self) -> None:
        """Blocks until the last asynchronous save is on disk."""
        with interrupts_deferred():
            self._manager.wait_until_finished()

    def close(self) -> None:
        """Finishes pending saves and releases the manager (also on leaving a ``with``)."""
        with interrupts_deferred():
            self._manager.close()

    def __enter__(self) -> TrainCheckpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
