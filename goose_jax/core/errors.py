"""The exceptions a user of goose-jax can meet, and the exit codes the tools map them to.

Every error caused by input the user controls (a path, a file, a config value, a flag) is a
subclass of ``GooseError``, defined here and nowhere else, so a command-line tool can print its
one-line message instead of a traceback. Each also derives from the matching built-in type, so
``except ValueError`` keeps working for callers that do not know about goose-jax.

Exit codes of every goose-jax tool (goose-train, goose-eval, goose-convert, goose-demo, goose-data):

=====  ===========  =========================================================================
code   name         meaning
=====  ===========  =========================================================================
0      OK           the work is done (or was already done: a rerun changes nothing)
1      USER_ERROR   a bad input: a path, a file, a config value; one line on stderr
2      USAGE        the command line itself: an unknown flag, a missing or conflicting option
75     PEER_LOST    a process of a multi-process run died; rerun the same command to resume
130    INTERRUPTED  Ctrl-C; rerun the same command to resume where resumable
=====  ===========  =========================================================================
"""

OK = 0
USER_ERROR = 1
USAGE = 2
# EX_TEMPFAIL: the run did not fail by itself; rerunning the same command resumes it.
PEER_LOST = 75
INTERRUPTED = 130


def one_line(e: BaseException) -> str:
    """The message of ``e`` on one line, whatever wrote it (paths and values kept as they are);
    an OS error names its file."""
    text = " ".join(str(e).split())
    filename = getattr(e, "filename", None)
    if isinstance(e, OSError) and filename is not None and str(filename) not in text:
        text = f"{filename}: {text}"
    return text or type(e).__name__


class GooseError(Exception):
    """Base class of the errors goose-jax raises about user input (exit code 1)."""

    exit_code = USER_ERROR


class UsageError(GooseError, ValueError):
    """Command-line options that cannot work together or are missing (exit code 2)."""

    exit_code = USAGE


class ConfigError(GooseError, ValueError):
    """A config value that cannot be used (a model, LoRA, routing or dtype setting)."""


class TrainConfigError(ConfigError):
    """A training config file, override or value that cannot be used."""


class CheckpointError(GooseError, ValueError):
    """A checkpoint, tokenizer or config file is missing, unreadable or does not fit its config."""


class LibraryError(GooseError, ValueError):
    """An expert library on disk is missing, corrupt, or does not fit the base model given."""


class LibraryMismatchError(GooseError, ValueError):
    """An expert library that does not fit the base model or the routing request."""


class TrainingDivergedError(GooseError, FloatingPointError):
    """Training whose loss or parameters became non-finite (NaN or infinite); nothing of the
    diverged state is written."""


class DataError(GooseError, ValueError):
    """Training or evaluation data that cannot be used: a missing or malformed file, an empty
    dataset."""


class EvalError(GooseError, ValueError):
    """An evaluation request that cannot run (bad settings, an unknown metric)."""


class RoutingError(GooseError, ValueError):
    """Routing inputs that cannot work together (sizes, k, non-finite gates)."""


class NonFiniteError(GooseError, ValueError):
    """NaN or inf where a result needs finite numbers (logits, scores, losses, weights)."""


class DistributedError(GooseError, ValueError):
    """Inconsistent multi-process settings, or a process group that could not be joined."""


class AdapterError(GooseError, ValueError):
    """An adapter or expert checkpoint to import that does not fit: another architecture, other
    shapes, an adapter type other than LoRA, options goose-jax cannot represent."""


class UnsafeCheckpointError(AdapterError, CheckpointError):
    """A pickled checkpoint (a model's or an adapter's) that would need to execute code to load
    (not weights-only)."""


class DiskWriteError(GooseError, OSError):
    """A write the disk refused (full, over a file-size limit, read-only), from Python or from a
    native writer (safetensors, Orbax): names the file and the system's reason; what the write
    had started is removed, so rerunning the same command after freeing space works."""
