"""The exceptions a user of goose-jax can meet.

Every error caused by input the user controls (a path, a file, a config value) is a subclass of
``GooseError``, so command-line entry points can print its one-line message instead of a
traceback. Each also derives from the matching built-in type, so ``except ValueError`` keeps
working for callers that do not know about goose-jax.
"""


class GooseError(Exception):
    """Base class of the errors goose-jax raises about user input."""


class CheckpointError(GooseError, ValueError):
    """A checkpoint, tokenizer or config file is missing, unreadable or does not fit its config."""


class LibraryError(GooseError, ValueError):
    """An expert library on disk is missing, corrupt, or does not fit the base model given."""


class DataError(GooseError, ValueError):
    """Training data that cannot be used: a missing or malformed file, an empty dataset."""


class TrainConfigError(GooseError, ValueError):
    """A training config file, override or value that cannot be used."""


class AdapterError(GooseError, ValueError):
    """An adapter or expert checkpoint to import that does not fit: another architecture, other
    shapes, an adapter type other than LoRA, options goose-jax cannot represent."""


class UnsafeCheckpointError(AdapterError):
    """A pickled checkpoint that would need to execute code to load (not weights-only)."""
