"""Joining JAX's distributed runtime from the command-line tools.

A goose-jax command is one of several processes when its flags or environment say so:
``--coordinator HOST:PORT --num-processes N --process-id I`` (or ``GOOSE_COORDINATOR``,
``GOOSE_NUM_PROCESSES``, ``GOOSE_PROCESS_ID``), or a cluster JAX detects by itself (a SLURM job
with several tasks, a multi-host TPU slice), in which case ``jax.distributed.initialize()`` is
called without arguments and JAX reads the cluster's own variables. On one host none of this
applies and the tools run unchanged. It must run before anything touches a JAX device.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping

import jax

from goose_jax.errors import GooseError


class DistributedError(GooseError, ValueError):
    """Inconsistent multi-process settings."""


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


def settings(coordinator: str | None = None, num_processes: int | None = None,
             process_id: int | None = None,
             environ: Mapping[str, str] | None = None) -> dict | None:
    """What to pass to ``jax.distributed.initialize``, or None when this is a single process.

    Raises:
      DistributedError: settings that cannot describe a process group.
    """
    environ = os.environ if environ is None else environ
    coordinator = coordinator or environ.get("GOOSE_COORDINATOR") or None

    def number(value, name):
        if value is None or value == "":
            return None
        try:
            return int(value)
        except ValueError:
            raise DistributedError(f"{name} must be an integer, got {value!r}") from None

    num = number(num_processes if num_processes is not None
                 else environ.get("GOOSE_NUM_PROCESSES"), "--num-processes")
    pid = number(process_id if process_id is not None
                 else environ.get("GOOSE_PROCESS_ID"), "--process-id")
    if coordinator is None and num is None and pid is None:
        return {} if _cluster_detected(environ) else None
    if coordinator is None or num is None or pid is None:
        raise DistributedError(
            "multi-process runs need all of --coordinator, --num-processes and --process-id "
            f"(found coordinator={coordinator!r}, num_processes={num!r}, process_id={pid!r})")
    if num < 1 or not 0 <= pid < num:
        raise DistributedError(f"--process-id must be in [0, {num}) for {num} processes; "
                               f"found {pid}")
    if num == 1:
        return None
    return {"coordinator_address": coordinator, "num_processes": num, "process_id": pid}


def maybe_initialize(args: argparse.Namespace | None = None,
                     environ: Mapping[str, str] | None = None) -> bool:
    """Calls ``jax.distributed.initialize`` when this is one of several processes.

    Returns:
      True if this call initialized the runtime (or it already was), False on a single host.
    """
    kwargs = settings(getattr(args, "coordinator", None), getattr(args, "num_processes", None),
                      getattr(args, "process_id", None), environ)
    if kwargs is None:
        return False
    if jax.distributed.is_initialized():
        return True
    jax.distributed.initialize(**kwargs)
    return True
