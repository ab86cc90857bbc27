"""The one way every goose-jax command-line tool starts, fails and exits.

Each tool is an ``argparse`` parser whose (sub)commands set ``run`` (a function of the parsed
arguments that returns ``None`` or an exit code). ``run_tool`` parses, joins a process group if
the flags or the cluster ask for it, runs, and turns every failure a user can cause into one line
on stderr and an exit code of the table in ``goose_jax.core.errors``:

  0 done, 1 bad input (``GooseError``, an OS error on a user's path), 2 usage (argparse, or a
  ``UsageError``), 75 a peer of a multi-process run died, 130 interrupted (Ctrl-C).

Ctrl-C follows ``goose_jax.core.tool_process``: in a tool's own process the interrupted line is the
last thing it does (``os._exit`` after flushing, no interpreter teardown), and a Ctrl-C once the
run is over ends the process with the run's exit code; called in-process, ``run_tool`` returns
130.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import sys
from collections.abc import Sequence

from goose_jax.core import distributed, errors, tool_process
from goose_jax.core.tensorfile import os_error


def _quiet_libraries() -> None:
    # Orbax and absl log routine steps at INFO / WARNING, and on Ctrl-C absl's handler adds its
    # own report; Orbax logs a failed write at ERROR with a traceback (from its own thread, and
    # asyncio once per write still in flight) before the save raises. A tool's output is its own
    # summary and its one error line.
    for name in ("absl", "orbax", "asyncio"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    logging.getLogger("jax._src.distributed").setLevel(logging.ERROR)


def run_tool(prog: str, parser: argparse.ArgumentParser, argv: Sequence[str] | None = None, *,
             interrupted_hint: str = "") -> int:
    """Parses ``argv`` with ``parser``, runs ``args.run(args)``; returns the exit code.

    Args:
      prog: the tool's name, the first word of every message.
      parser: the tool's parser; each (sub)command sets ``run`` with ``set_defaults``.
      argv: the arguments (default: ``sys.argv[1:]``).
      interrupted_hint: what to tell the user after Ctrl-C (for example how to resume).
    """
    code = errors.USER_ERROR  # a bug's traceback: Python then exits with 1
    try:
        code = _run_tool(prog, parser, argv, interrupted_hint)
        return code
    finally:
        # Only the interpreter's exit is left: a Ctrl-C now ends the process with this code.
        tool_process.finish_run(code)


def _run_tool(prog: str, parser: argparse.ArgumentParser, argv: Sequence[str] | None,
              interrupted_hint: str) -> int:
    said = io.StringIO()
    try:
        with contextlib.redirect_stderr(said):
            args = parser.parse_args(argv)
    except SystemExit as e:
        if e.code in (0, None):  # --help: printed on stdout
            return errors.OK
        # argparse prints the whole usage and then "PROG: error: ..."; keep that last line.
        lines = said.getvalue().strip().splitlines() or [f"{prog}: error: bad arguments"]
        command = lines[-1].split(": error:")[0] if ": error:" in lines[-1] else prog
        print(f"{lines[-1]} (see {command} --help)", file=sys.stderr)
        return errors.USAGE
    sys.stderr.write(said.getvalue())
    _quiet_libraries()

    def fail(e: BaseException, code: int) -> int:
        see = f" (see {prog} --help)" if code == errors.USAGE else ""
        print(f"{prog}: error: {errors.one_line(e)}{see}", file=sys.stderr)
        return code


    tool_process.start_run(prog, interrupted_hint)
    tool_process.drop_closed_loop_reports()
    try:
        if hasattr(args, "coordinator"):
            distributed.maybe_initialize(args, prog=prog)
        code = args.run(args)
        return errors.OK if code is None else int(code)
    except KeyboardInterrupt:
        if tool_process.owns_process():
            tool_process.exit_now(errors.INTERRUPTED)  # does not return
        hint = f"; {interrupted_hint}" if interrupted_hint else ""
        print(f"{prog}: interrupted{hint}", file=sys.stderr)
        return errors.INTERRUPTED
    except errors.GooseError as e:
        return fail(e, e.exit_code)
    except OSError as e:
        return fail(e, errors.USER_ERROR)
    except Exception as e:
        refused = _refused_write(e)
        if refused:  # a native writer's (Orbax's, safetensors') I/O error, raised as another type
            if tool_process.owns_process():  # its threads may still be failing: no teardown
                tool_process.exit_now(errors.USER_ERROR, f"{prog}: error: {refused}")
            return fail(Exception(refused), errors.USER_ERROR)
        import jax

        if isinstance(e, jax.errors.JaxRuntimeError):
            distributed.exit_on_peer_failure(e)  # in a process group: one line, exit 75
        raise


def _refused_write(e: Exception) -> str | None:
    """The one line for an error that quotes a system error number (``os_error_code='28'``,
    ``os error 28``): the file it names (the first quoted path) and the system's reason."""
    import re


    found = os_error(e)
    if found is None:
        return None
    path = re.search(r'"(/[^"]+)"', str(e))
    where = f"{path.group(1)}: " if path else ""
    return f"{where}cannot write: {found[1]}"
