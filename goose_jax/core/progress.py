"""Progress bars for long loops: drawn on a terminal only, and never with ``GOOSE_QUIET=1``."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable


def progress_enabled() -> bool:
    """Whether long loops draw a tqdm bar: only on a terminal, and never with GOOSE_QUIET=1."""
    if os.environ.get("GOOSE_QUIET", "") == "1":
        return False
    return bool(getattr(sys.stderr, "isatty", lambda: False)())


def progress_bar(items: Iterable, desc: str, unit: str, enabled: bool | None = None) -> Iterable:
    """``items`` wrapped in a tqdm bar when drawing one makes sense (default:
    ``progress_enabled()``), else ``items`` itself."""
    if enabled is None:
        enabled = progress_enabled()
    if not enabled:
        return items
    from tqdm.auto import tqdm  # Imported late: most calls run with the bar off.

    return tqdm(items, desc=desc, unit=unit, leave=False)
