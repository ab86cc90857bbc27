"""Experiment config files and ``--set key=value`` overrides, for any config dataclass.

A config file is a python file whose ``get_config()`` returns an instance of the tool's config
dataclass (``configs/*.py``; see ``training.program.TrainConfig``). Overrides are typed by the
field's
declared type: ``int``, ``float``, ``str``, ``bool`` (true/false, yes/no, on/off, 1/0), an
optional field (``none`` or ``null`` for None), a tuple of strings (comma-separated).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import types
import typing
from collections.abc import Sequence
from typing import Any, TypeVar

from goose_jax.core.errors import ConfigError

C = TypeVar("C")


def load_config(path: str | None, config_type: type[C], *,
                error: type[ConfigError] = ConfigError) -> C:
    """The ``config_type`` instance a config file's ``get_config()`` returns.

    Args:
      path: the python file, or None for ``config_type()`` (its defaults).
      config_type: the dataclass the file must return.
      error: the exception class to raise (a ``ConfigError`` subclass naming the tool's config).

    Raises:
      ``error``: a missing file, a file that fails to load (any exception in it, on one line),
        no ``get_config()``, or one that returns another type.
    """
    if path is None:
        return config_type()
    if not os.path.isfile(path):
        raise error(f"{path}: config file does not exist")
    spec = importlib.util.spec_from_file_location(f"_goose_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # a config file is user code: report any failure as one line
        raise error(f"{path}: cannot load the config: {type(e).__name__}: {e}") from None
    if not callable(getattr(module, "get_config", None)):
        raise error(f"{path}: defines no get_config()")
    cfg = module.get_config()
    if not isinstance(cfg, config_type):
        raise error(f"{path}: get_config() returned {type(cfg).__name__}, expected "
                    f"{config_type.__module__}.{config_type.__qualname__}")
    return cfg


def _parse_value(text: str, typ: Any) -> Any:
    if typing.get_origin(typ) in (typing.Union, types.UnionType):
        if text.lower() in ("none", "null"):
            return None
        typ = next(a for a in typing.get_args(typ) if a is not type(None))
    if typing.get_origin(typ) is tuple:
        return tuple(s.strip() for s in text.split(",") if s.strip())
    if typ is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError("expected true or false")
    return typ(text)


def apply_overrides(cfg: C, overrides: Sequence[str], *,
                    error: type[ConfigError] = ConfigError) -> C:
    """``cfg`` with ``key=value`` overrides, each value parsed by its field's declared type.

    The new config is validated as any config is (its ``__post_init__``).

    Raises:
      ``error``: an item that is not ``KEY=VALUE`` with KEY a field, or a value that does not
        parse as the field's type.
    """
    hints = typing.get_type_hints(type(cfg))
    fields = [f.name for f in dataclasses.fields(cfg)]
    changes = {}
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or key not in fields:
            raise error(f"--set {item!r}: expected KEY=VALUE with KEY one of: "
                        f"{', '.join(fields)}")
        try:
            changes[key] = _parse_value(text.strip(), hints[key])
        except (ValueError, StopIteration) as e:
            raise error(f"--set {item!r}: cannot parse as {hints[key]}: {e}") from None
    return dataclasses.replace(cfg, **changes)
