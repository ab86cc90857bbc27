"""What a goose-jax tool process sets up before its heavy imports: Ctrl-C and TensorFlow's logs.

Every tool (goose-train, goose-eval, goose-convert, goose-demo, goose-data and the scripts that
set ``GOOSE_TOOL``) speaks one line on stderr. ``goose_jax/__init__.py`` calls
``install_if_tool`` before it imports NumPy or JAX, so both rules hold from a tool's first moment.

**Ctrl-C**, one policy for every tool: one line, exit code 130, never a traceback or a crash.

* During start-up (imports, argument parsing) nothing has been written: the handler prints
  ``PROG: interrupted`` and ends the process at once.
* While the tool runs, it raises ``KeyboardInterrupt`` so that every ``with`` / ``finally``
  removes its temporary files (the tool wrapper then prints the one line), except where Python
  cannot deliver it safely: inside an import (a native module whose initialisation is
  interrupted is freed half-built, and jaxlib's then crashes the process with SIGSEGV), inside
  a garbage-collector callback or a ``__del__`` (where the exception is printed and dropped, and
  the run goes on). There the interrupt is held and delivered a moment later, at a safe point;
  held for over ``MAX_HOLD_S`` (a long import, such as TensorFlow's), the process ends at once
  with the one line, as during start-up. An interrupt raised where Python drops exceptions
  that no frame gives away (a weak reference's callback, an object freed by native code)
  reaches ``sys.unraisablehook``: it is not printed but delivered again, a moment later.
* Once the work is over (done or failed, its line printed: ``finish_run``), only the
  interpreter's own exit is left (atexit functions, thread joins): Ctrl-C then ends the
  process at once, without a word, with the exit code the run had. After the last atexit
  function Python gives SIGINT back its default action (the process killed by the signal,
  without a word) while it frees the modules; a tool ignores it instead, from there to the end.
* Once the wrapper has printed its line, the process ends with ``os._exit`` after flushing its
  streams: nothing is left for the interpreter's own teardown to do but run native libraries'
  destructors while their threads may still be busy.
* A second Ctrl-C while the first one unwinds ends the process at once.

A process whose SIGINT was ignored when it started (a shell's background job), or that installed
its own handler (a host program importing goose-jax), is left alone; in-process callers of a
tool's ``main`` get the exit code back as before.

**TensorFlow** (read by the P3 and BIG-bench loaders) logs from C++ as it loads, on the process's
stderr and before any Python logging is set up. In a tool process its import is silenced:
``TF_CPP_MIN_LOG_LEVEL`` is 3 (errors come back as Python exceptions), stderr is muted while
``import tensorflow`` runs, and its Python logger keeps only errors. TensorFlow's libraries read
the level as they load, and an inherited value counts: JAX sets 1 in every process that imports
it, which the processes it starts inherit, and at 1 the first TensorFlow operation prints CUDA's
probing error (``cuda_platform.cc ... failed call to cuInit``) on a machine without a GPU. Only
0 (a user asking for TensorFlow's logs) is kept; any other value becomes 3.

Standard library only.
"""

from __future__ import annotations

# Only modules the interpreter has loaded before the tool's first line (so importing this one
# is instant): the handler must be in place before anything slow. threading, logging: lazily.
import gc
import os
import signal
import sys
import time
from types import FrameType

# goose_jax.core.errors.INTERRUPTED (not imported: errors must stay optional here)
INTERRUPTED = 130
TOOLS = ("goose-convert", "goose-data", "goose-demo", "goose-eval", "goose-train")
RETRY_S = 0.02  # how soon a held interrupt is tried again

MAX_HOLD_S = 2.0  # an interrupt held this long (a long import) ends the process at once
_state = {"prog": None, "hint": "", "running": False, "raised": False, "held": False,
          "held_since": None, "stderr_fd": 2, "done": None}


def tool_name() -> str | None:
    """The goose-jax tool this process runs, or ``None`` (a library user, a test runner).

    A console script is known by its name, ``python -m goose_jax.cli.X`` by its module, a
    script by the ``GOOSE_TOOL`` name it sets before importing goose-jax.
    """
    marker = getattr(sys.modules.get("__main__"), "GOOSE_TOOL", None)
    if isinstance(marker, str):
        return marker
    name = os.path.basename(sys.argv[0]) if sys.argv else ""
    if name in TOOLS:
        return name
    argv = list(getattr(sys, "orig_argv", ()))
    if "-m" in argv[:-1]:
        module = argv[argv.index("-m") + 1]
        if module.startswith("goose_jax.cli."):
            return "goose-" + module.rsplit(".", 1)[1]
    return None


def install_if_tool() -> None:
    """In a goose-jax tool process: quiets TensorFlow, and installs the Ctrl-C handler where
    SIGINT is Python's (not where it is ignored, as under nohup)."""
    if _state["prog"] is not None:
        return
    prog = tool_name()
    if prog is None:
        return
    if not any(isinstance(f, _QuietTensorFlow) for f in sys.meta_path):
        # TensorFlow stays quiet in every tool process, whatever SIGINT's disposition (a tool
        # started with SIGINT ignored, under nohup or a test runner's worker, too).
        quiet_tensorflow_level()
        if "tensorflow" not in sys.modules:
            sys.meta_path.insert(0, _QuietTensorFlow())
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        return
    try:
        signal.signal(signal.SIGINT, on_sigint)
    except ValueError:  # not the main thread: not a tool's start-up
        return
    _state["prog"] = prog
    _on_unraisable.previous = sys.unraisablehook
    sys.unraisablehook = _on_unraisable
    import atexit

    atexit.register(_ignore_sigint_at_exit)  # the first registered: runs last


def _ignore_sigint_at_exit() -> None:
    # Python restores the default action of a signal whose handler is a Python function (not
    # of one ignored) once the atexit functions have run, before it frees the modules.
    if owns_process():
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def quiet_tensorflow_level(environ=os.environ) -> None:
    """Sets ``TF_CPP_MIN_LOG_LEVEL`` to 3 unless it is 0 (see the module docstring)."""
    if environ.get("TF_CPP_MIN_LOG_LEVEL") != "0":
        environ["TF_CPP_MIN_LOG_LEVEL"] = "3"


def owns_process() -> bool:
    """Whether this process is a tool that installed the handler (and may end itself)."""
    return _state["prog"] is not None and signal.getsignal(signal.SIGINT) is on_sigint


def start_run(prog: str, hint: str) -> None:
    """Called by the tool wrapper when the work begins: from now on Ctrl-C unwinds."""
    if _state["prog"] is not None:
        _state.update(prog=prog, hint=hint, running=True)


def finish_run(code: int) -> None:
    """Called by the tool wrapper once the work is over: from now on Ctrl-C ends the process
    at once with ``code`` (the interpreter's exit is all that is left)."""
    if _state["prog"] is not None:
        _state["done"] = code


def exit_now(code: int = INTERRUPTED, line: str | None = None) -> None:
    """Prints ``line`` (default: the interrupted line), flushes stdout and stderr, and ends the
    process with ``code`` without the interpreter's teardown."""
    if line is None:
        hint = f"; {_state['hint']}" if _state["hint"] else ""
        line = f"{_state['prog']}: interrupted{hint}"
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except Exception:  # a closed or broken stream must not hide the line
        pass
    if line:
        try:  # to the real stderr, even while an import has it muted
            os.write(_state["stderr_fd"], (line + "\n").encode(errors="replace"))
        except OSError:
            pass
    os._exit(code)


def _unsafe(frame: FrameType | None) -> bool:
    """Whether a ``KeyboardInterrupt`` raised in ``frame`` could crash the process or be lost."""
    callbacks = {getattr(cb, "__code__", None) for cb in gc.callbacks}
    while frame is not None:
        code = frame.f_code
        if (code.co_filename.startswith("<frozen importlib") or code in callbacks
                or code.co_name == "__del__"):
            return True
        frame = frame.f_back
    return False


def _retry() -> None:
    _state["held"] = False
    os.kill(os.getpid(), signal.SIGINT)


def _hold() -> None:
    """Delivers the interrupt again in ``RETRY_S`` (once, however often it is held meanwhile)."""
    if not _state["held"]:
        import threading

        _state["held"] = True
        timer = threading.Timer(RETRY_S, _retry)
        timer.daemon = True
        timer.start()


def on_sigint(signum: int, frame: FrameType | None) -> None:
    """The SIGINT handler of a tool process (see the module docstring)."""
    if _state["done"] is not None:
        exit_now(_state["done"], line="")
    if not _state["running"] or _state["raised"]:
        exit_now()
    if _unsafe(frame):
        now = time.monotonic()
        if _state["held_since"] is None:
            _state["held_since"] = now
        elif now - _state["held_since"] > MAX_HOLD_S:
            exit_now()  # a long import (TensorFlow's): better than making the user wait
        _hold()
        return
    _state.update(raised=True, held_since=None)
    if owns_process():
        _mute_native_stderr()
    raise KeyboardInterrupt


def _on_unraisable(report) -> None:
    """``sys.unraisablehook`` of a tool process: the interrupt this module raised, dropped where
    Python cannot raise (printed with a traceback, and the run went on), is delivered again;
    every other report goes to the previous hook."""
    if (report.exc_type is KeyboardInterrupt and _state["raised"]
            and _state["prog"] is not None):
        if _state["done"] is not None:
            exit_now(_state["done"], line="")
        _state["raised"] = False
        _hold()
        return
    _on_unraisable.previous(report)


_on_unraisable.previous = sys.unraisablehook


def _mute_native_stderr() -> None:
    """From now on, native code's writes to file descriptor 2 go to the null device, Python's
    (``sys.stderr``, the tool's line) to the real stderr: unwinding an interrupted TensorFlow
    pipeline logs from C++ (XLA's CUDA probing) after the logging level was read."""
    if _state["stderr_fd"] != 2:
        return
    try:
        sys.stderr.flush()
        saved = os.dup(2)
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 2)
        os.close(null)
        _state["stderr_fd"] = saved
        sys.stderr = open(saved, "w", buffering=1, closefd=False, errors="backslashreplace")
    except OSError:
        pass


class stderr_muted:
    """``with stderr_muted():`` sends the process's stderr (file descriptor 2, C++ code's too)
    to the null device for the block."""

    def __enter__(self) -> None:
        sys.stderr.flush()
        self._saved = os.dup(2)
        self._null = os.open(os.devnull, os.O_WRONLY)
        self._outer = _state["stderr_fd"]
        os.dup2(self._null, 2)
        _state["stderr_fd"] = self._saved  # where exit_now still reaches the user

    def __exit__(self, *exc) -> None:
        _state["stderr_fd"] = self._outer
        os.dup2(self._saved, 2)
        os.close(self._saved)
        os.close(self._null)


class _QuietLoader:
    """TensorFlow's own loader, run with stderr muted; everything else is the wrapped one's."""

    def __init__(self, loader):
        self._loader = loader

    def __getattr__(self, name):
        return getattr(self._loader, name)

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        import logging

        with stderr_muted():
            self._loader.exec_module(module)
        logging.getLogger(module.__name__).setLevel(logging.ERROR)


class _QuietTensorFlow:
    """A meta-path finder that hands ``import tensorflow`` (or ``module``) a ``_QuietLoader``
    (once)."""

    def __init__(self, module: str = "tensorflow"):
        self.module = module

    def find_spec(self, name, path=None, target=None):
        if name != self.module:
            return None
        sys.meta_path.remove(self)
        import importlib.util

        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            spec.loader = _QuietLoader(spec.loader)
        return spec


def _drop_closed_loop_report(report) -> None:
    if not (isinstance(report.exc_value, RuntimeError)
            and str(report.exc_value) == "Event loop is closed"):
        _drop_closed_loop_report.previous(report)


def drop_closed_loop_reports() -> None:
    """From now on, drops the "Event loop is closed" reports of failed asynchronous writes.

    When a write fails (a full disk), Orbax closes its event loop while TensorStore's other
    writes are in flight: each later reports ``RuntimeError: Event loop is closed`` as an
    unraisable exception, with a traceback, from another thread and at any time (after the
    tool has returned, too). The failure itself is raised and reported once; those reports
    alone are dropped, for the rest of the process."""
    if sys.unraisablehook is not _drop_closed_loop_report:
        _drop_closed_loop_report.previous = sys.unraisablehook
        sys.unraisablehook = _drop_closed_loop_report
