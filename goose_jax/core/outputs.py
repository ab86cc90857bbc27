"""Where a tool may write: the rules every tool applies to its output paths before any work.

- ``check_apart``: no output path overlaps an input path, after resolving symlinks: not the same
  path, not a folder that holds an input (replacing or cleaning it would delete the input), not a
  path inside an input (a build scanning its source would read its own output; a report written
  into an expert library mixes a run's files into the library). One line, before any write.
- ``run_lock``: one run at a time per output folder. The lock is a file beside the folder,
  ``.<name>.lock``, created with ``O_EXCL`` and holding the owner's host and pid; a second run is
  refused in one line naming them. A lock whose owner is gone (same host, no such pid) is taken
  over, so a killed run never blocks its rerun.
- ``check_free_space``: a clear line when the bytes a write needs are known and not there.

Each refusal is one ``DataError`` line (exit code 1, a bad path) unless the caller names another
class.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import time
from collections.abc import Iterable, Iterator, Mapping

from goose_jax.core.errors import DataError
from goose_jax.core.tensorfile import check_folder_writable

PathLike = str | os.PathLike
# A lock file without its owner's line for this long was left by a run killed as it wrote it.
_HALF_WRITTEN_S = 10.0


def _resolved(path: PathLike) -> str:
    return os.path.realpath(os.path.abspath(os.path.expanduser(os.fspath(path))))


def _inside(path: str, folder: str) -> bool:
    return path != folder and path.startswith(folder.rstrip(os.sep) + os.sep)


def _named(paths: Mapping[str, PathLike | Iterable[PathLike] | None]) -> list[tuple[str, str]]:
    out = []
    for flag, value in paths.items():
        if value is None or value == "":
            continue
        values = [value] if isinstance(value, str | os.PathLike) else list(value)
        out += [(flag, os.fspath(v)) for v in values if v not in (None, "")]
    return out


def check_apart(outputs: Mapping[str, PathLike | Iterable[PathLike] | None],
                inputs: Mapping[str, PathLike | Iterable[PathLike] | None], *,
                error=DataError) -> None:
    """Refuses any output path that is an input path, holds one, or lies inside one.

    Args:
      outputs: flag (as the user typed it, e.g. ``"--out"``) -> path(s) the tool writes.
      inputs: flag -> path(s) the tool reads; None values are skipped, and so are values of the
        form ``random:...`` that name no path.
      error: the error class (default ``DataError``: a bad path, exit code 1).

    Raises:
      error: one line naming both flags and paths.
    """
    ins = [(f, p, _resolved(p)) for f, p in _named(inputs) if not p.startswith("random:")]
    for out_flag, out in _named(outputs):
        real = _resolved(out)
        for in_flag, given, in_real in ins:
            if real == in_real:
                how = "is the same path as"
            elif _inside(in_real, real):
                how = "holds"
            elif _inside(real, in_real):
                how = "lies inside"
            else:
                continue
            raise error(f"{out_flag} {out}: {how} the input {in_flag} {given}; outputs are never "
                        f"written over, around or into inputs: pass another {out_flag}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def lock_path(folder: PathLike) -> str:
    """The lock file of ``folder``: ``.<name>.lock`` beside it."""
    parent, name = os.path.split(os.path.abspath(os.fspath(folder)).rstrip(os.sep))
    return os.path.join(parent, f".{name}.lock")


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, ValueError):
        return None


def _owner(text: str | None) -> tuple[str, int] | None:
    try:
        host, pid = (text or "").split()[:2]
        return host, int(pid)
    except ValueError:
        return None


def _check_stale(path: str, folder: PathLike, prog: str, flag: str) -> str | None:
    """The text of the lock ``path`` if it is stale (its owner, on this host, is gone); else
    raises."""
    text = _read(path)
    owner = _owner(text)
    if owner is None:   # being written by its owner this instant, or left half-written
        try:
            age = time.time() - os.path.getmtime(path)
        except OSError:
            return text
        if age > _HALF_WRITTEN_S:
            return text
        owner = ("?", -1)
    elif owner[0] == socket.gethostname():
        if owner[1] == os.getpid():
            raise DataError(f"{flag} {os.fspath(folder)}: already being written by this "
                            f"process; pass another {flag}")
        if not _alive(owner[1]):
            return text
    raise DataError(f"{flag} {os.fspath(folder)}: another run ({prog}, pid {owner[1]} on "
                    f"{owner[0]}) is writing it; wait for it, pass another {flag}, or remove "
                    f"{path} if that run is gone")


@contextlib.contextmanager
def run_lock(folder: PathLike, *, prog: str, flag: str = "--out") -> Iterator[str]:
    """Holds ``folder``'s lock for the block; yields the lock file's path.

    Raises:
      DataError: another live run holds it (one line: the folder, the owner's host and pid, and
        the lock file to remove if that run is known to be gone).
    """

    path = lock_path(folder)
    # Not a file where a folder goes, and writable: one line naming the path, not an errno.
    check_folder_writable(folder, error=DataError, fix=f"; pass another {flag}")
    me = f"{socket.gethostname()} {os.getpid()}\n"
    made = []   # the parents this lock created: removed again when they stay empty
    parent = os.path.dirname(path)
    while not os.path.isdir(parent):
        made.append(parent)
        parent = os.path.dirname(parent)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            judged = _check_stale(path, folder, prog, flag)
            # Its owner is gone (or the file is half-written): take it over. The rename is
            # atomic; a lock that another run took over meanwhile (not the text judged stale)
            # is put back.
            stale = f"{path}.stale-{os.getpid()}"
            try:
                os.rename(path, stale)
            except FileNotFoundError:
                continue
            if _read(stale) != judged:
                with contextlib.suppress(OSError):
                    os.link(stale, path)
            with contextlib.suppress(OSError):
                os.remove(stale)
            continue
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(me)
        break
    else:
        raise DataError(f"{path}: cannot take the lock of {flag} {os.fspath(folder)}; remove it "
                        "if no run is writing there")
    try:
        yield path
    finally:
        with contextlib.suppress(OSError):
            with open(path, encoding="utf-8") as f:
                ours = f.read() == me
            if ours:
                os.remove(path)
        for folder_made in made:
            with contextlib.suppress(OSError):
                os.rmdir(folder_made)


def check_free_space(folder: PathLike, needed: int, *, what: str, flag: str = "--out",
                     error=DataError) -> None:
    """Refuses when the file system of ``folder`` (or its nearest existing parent) has fewer
    than ``needed`` bytes free for ``what``."""
    probe = os.path.abspath(os.fspath(folder))
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    free = shutil.disk_usage(probe).free
    if free < needed:
        raise error(f"{flag} {os.fspath(folder)}: {what} needs {needed / 2**20:.1f} MiB and "
                    f"{probe} has {free / 2**20:.1f} MiB free; free some space or pass another "
                    f"{flag}")
