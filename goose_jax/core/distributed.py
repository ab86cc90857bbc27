"""Joining JAX's distributed runtime from the command-line tools, and living in it.

A goose-jax command is one of several processes when its flags or environment say so:
``--coordinator HOST:PORT --num-processes N --process-id I`` (or ``GOOSE_COORDINATOR``,
``GOOSE_NUM_PROCESSES``, ``GOOSE_PROCESS_ID``), or a cluster JAX detects by itself (a SLURM job
with several tasks, a multi-host TPU slice), in which case ``jax.distributed.initialize()`` is
called without coordinates and JAX reads the cluster's own variables. On one host none of this
applies and the tools run unchanged. It must run before anything touches a JAX device.

Every process runs the same program on its own devices; the mesh spans all of them
(``core.sharding.make_mesh``). What only one process must do (print, draw progress bars, write
metrics, results and libraries) is guarded by ``is_primary``; what every process must reach
together (collectives, barriers) is never guarded.

Failure is bounded. The runtime is joined with finite timeouts (``GOOSE_INIT_TIMEOUT``,
``GOOSE_HEARTBEAT_TIMEOUT``, ``GOOSE_SHUTDOWN_TIMEOUT``, in seconds; see ``timeouts``): a peer
that never starts ends the others after the first (JAX aborts them: DEADLINE_EXCEEDED, measured
with jax 0.10.2; errors it raises instead become a ``DistributedError``); a peer that dies
mid-run breaks the next collective at once (the CPU backend's gloo connections close), or, if
no collective is running, is declared dead by the coordination service after the heartbeat
timeout, which then ends every process. ``exit_on_peer_failure`` turns the first case into one
clear line and exit status ``errors.PEER_LOST`` (75) instead of a traceback and a wait on the
shutdown barrier.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import numpy as np

from goose_jax.core.errors import PEER_LOST, DistributedError, one_line

DEFAULT_TIMEOUTS = {"initialization_timeout": 300, "heartbeat_timeout_seconds": 60,
                    "shutdown_timeout_seconds": 60}
_TIMEOUT_ENV = {"initialization_timeout": "GOOSE_INIT_TIMEOUT",
                "heartbeat_timeout_seconds": "GOOSE_HEARTBEAT_TIMEOUT",
                "shutdown_timeout_seconds": "GOOSE_SHUTDOWN_TIMEOUT"}

_PROG = {"name": "goose-jax"}  # the tool's name in failure messages (set by maybe_initialize)



def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The three multi-process flags every command-line tool accepts."""
    group = parser.add_argument_group("multi-process (one program on several hosts)")
    group.add_argument("--coordinator", help="HOST:PORT of process 0 (env GOOSE_COORDINATOR)")
    group.add_argument("--num-processes", type=int, help="process count (env GOOSE_NUM_PROCESSES)")
    group.add_argument("--process-id", type=int,
                       help="this process, 0-based (env GOOSE_PROCESS_ID)")


def _cluster_detected(environ: Mapping[str, str]) -> bool:
    if int(environ.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_JOB_ID" in environ:
        return True
    hosts = environ.get("TPU_WORKER_HOSTNAMES", "")
    return "," in hosts


def _number(value: Any, name: str) -> int | None:
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise DistributedError(f"{name} must be an integer, got {value!r}") from None


def settings(coordinator: str | None = None, num_processes: int | None = None,
             process_id: int | None = None,
             environ: Mapping[str, str] | None = None) -> dict | None:
    """What to pass to ``jax.distributed.initialize``, or None when this is a single process.

    Each flag given here wins over its environment variable (``GOOSE_COORDINATOR``,
    ``GOOSE_NUM_PROCESSES``, ``GOOSE_PROCESS_ID``). With none of them, a cluster JAX detects by
    itself gives ``{}`` (initialise without coordinates).

    Raises:
      DistributedError: settings that cannot describe a process group (some of the three
        missing, a process id out of range, a number that is not an integer).
    """
    environ = os.environ if environ is None else environ
    coordinator = coordinator or environ.get("GOOSE_COORDINATOR") or None
    num = _number(num_processes if num_processes is not None
                  else environ.get("GOOSE_NUM_PROCESSES"), "--num-processes")
    pid = _number(process_id if process_id is not None
                  else environ.get("GOOSE_PROCESS_ID"), "--process-id")
    if coordinator is None and num is None and pid is None:
        return {} if _cluster_detected(environ) else None
    given = {"--coordinator": coordinator, "--num-processes": num, "--process-id": pid}
    missing = [flag for flag, value in given.items() if value is None]
    if missing:
        raise DistributedError(
            "multi-process runs need all of --coordinator, --num-processes and --process-id; "
            f"missing {' and '.join(missing)} (found coordinator={coordinator!r}, "
            f"num_processes={num!r}, process_id={pid!r})")
    if num < 1 or not 0 <= pid < num:
        raise DistributedError(f"--process-id must be in [0, {num}) for {num} processes; "
                               f"found {pid}")
    if num == 1:
        return None
    return {"coordinator_address": coordinator, "num_processes": num, "process_id": pid}


def timeouts(environ: Mapping[str, str] | None = None) -> dict[str, int]:
    """The runtime's timeouts in seconds: ``DEFAULT_TIMEOUTS`` unless the environment sets one.

    ``initialization_timeout``: how long to wait for every process to join. A process whose
    heartbeats stop for ``heartbeat_timeout_seconds`` is declared dead and the others end.
    ``shutdown_timeout_seconds``: how long a finished process waits for the others to finish.

    Raises:
      DistributedError: a value that is not a positive integer.
    """
    environ = os.environ if environ is None else environ
    out = {}
    for key, default in DEFAULT_TIMEOUTS.items():
        value = _number(environ.get(_TIMEOUT_ENV[key]), _TIMEOUT_ENV[key])
        if value is not None and value < 1:
            raise DistributedError(f"{_TIMEOUT_ENV[key]} must be a positive number of seconds, "
                                   f"got {value}")
        out[key] = default if value is None else value
    return out


def maybe_initialize(args: argparse.Namespace | None = None,
                     environ: Mapping[str, str] | None = None, *, prog: str | None = None) -> bool:
    """Calls ``jax.distributed.initialize`` when this is one of several processes.

    Cross-process collectives on the CPU backend use gloo (set explicitly: older JAX versions
    had none by default); ``JAX_CPU_COLLECTIVES_IMPLEMENTATION`` in the environment wins.

    Args:
      args: parsed flags (``add_arguments``); None reads the environment only.
      environ: the environment (default ``os.environ``).
      prog: the tool's name, used in failure messages.

    Returns:
      True if this call initialized the runtime (or it already was), False on a single host.

    Raises:
      DistributedError: bad settings, or the group could not be formed within the timeout.
    """
    if prog:
        _PROG["name"] = prog
    environ = os.environ if environ is None else environ
    kwargs = settings(getattr(args, "coordinator", None), getattr(args, "num_processes", None),
                      getattr(args, "process_id", None), environ)
    if kwargs is None:
        return False
    if jax.distributed.is_initialized():
        return True
    limits = timeouts(environ)
    if "JAX_CPU_COLLECTIVES_IMPLEMENTATION" not in environ:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(**kwargs, **limits)
    except (RuntimeError, ValueError) as e:  # JaxRuntimeError is a RuntimeError
        where = kwargs.get("coordinator_address", "the cluster's coordinator")
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DistributedError(
            f"could not join the process group at {where} (process "
            f"{kwargs.get('process_id', '?')} of {kwargs.get('num_processes', '?')}) within "
            f"{limits['initialization_timeout']} s: {first}; are all processes started with "
            "the same --coordinator and --num-processes?") from None
    return True


# --- living in a process group -------------------------------------------------------------------


def is_primary() -> bool:
    """Whether this process writes files, prints and draws progress bars (process 0)."""
    return jax.process_index() == 0


def is_multiprocess() -> bool:
    """Whether this run spans several processes."""
    return jax.process_count() > 1


def barrier(name: str) -> None:
    """Waits until every process reaches the barrier ``name`` (a no-op in a single process)."""
    if is_multiprocess():
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def fetch(tree: Any) -> Any:
    """NumPy copies of a pytree of arrays on every process, whichever devices hold them.

    Arrays spread over several processes are gathered (a collective: every process must call
    this at the same point); the others are copied from local devices.
    """
    leaves, treedef = jax.tree.flatten(tree)
    spread = [i for i, x in enumerate(leaves)
              if isinstance(x, jax.Array) and not x.is_fully_addressable
              and not x.is_fully_replicated]
    if spread:
        from jax.experimental import multihost_utils

        gathered = multihost_utils.process_allgather([leaves[i] for i in spread], tiled=True)
        for i, x in zip(spread, gathered):
            leaves[i] = x
    out = [np.asarray(x.addressable_data(0) if isinstance(x, jax.Array)
                      and not x.is_fully_addressable else x) for x in leaves]
    return jax.tree.unflatten(treedef, out)


def _is_runtime_failure(e: BaseException) -> bool:
    return isinstance(e, jax.errors.JaxRuntimeError)


def exit_on_peer_failure(e: BaseException, hint: str = "") -> None:
    """In a process group, ends this process at once with one clear line about ``e``.

    Returns (doing nothing) on a single host or for an exception that is not a runtime
    failure. Otherwise prints why to stderr and leaves with ``errors.PEER_LOST`` (75) through
    ``os._exit``: an orderly exit would wait on the runtime's shutdown barrier for the dead
    process, up to the shutdown timeout, and then abort.
    """
    if not _is_runtime_failure(e) or not jax.distributed.is_initialized():
        return
    detail = one_line(e)[:300]
    print(f"{_PROG['name']}: error: process {jax.process_index()} of {jax.process_count()}: "
          "a cross-process operation failed, most likely because another process of this run "
          f"died or was killed ({detail}). {hint or 'Rerun the same command on every host.'}",
          file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(PEER_LOST)


@contextlib.contextmanager
def peer_failure_guard(hint: str = "") -> Iterator[None]:
    """Runs the body; a runtime failure in a process group ends the process (see
    ``exit_on_peer_failure``) before any enclosing cleanup can block on the dead peer."""
    try:
        yield
    except Exception as e:
        exit_on_peer_failure(e, hint)
        raise
