"""Trees keyed by site path: a nested dict that follows a model's scopes down to each site
(``{"encoder": {"block_0": {"ffn": {"wo": leaf}}}}``), and its flat form keyed by the site's
name (``{"encoder/block_0/ffn/wo": leaf}``). Expert, gate, router and telemetry trees all take
this shape, so every package reads and writes them with these two functions.
"""

from __future__ import annotations

from typing import Any

import jax

Array = jax.Array


def _nest(flat: dict[str, Any]) -> dict:
    tree: dict = {}
    for name, leaf in flat.items():
        node = tree
        parts = name.split("/")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = leaf
    return tree


def nest_sites(flat: dict[str, Any]) -> dict:
    """``{"encoder/block_0/ffn/wo": leaf}`` -> nested dict following the site path."""
    return _nest(flat)


def flatten_sites(tree: dict) -> dict[str, dict[str, Array]]:
    """Inverse of ``nest_sites`` for expert / gate trees: site name -> its leaf dict."""
    out: dict[str, dict[str, Array]] = {}

    def walk(node, prefix):
        if any(not isinstance(v, dict) for v in node.values()):
            out["/".join(prefix)] = node
            return
        for k, v in node.items():
            walk(v, prefix + (k,))

    walk(tree, ())
    return out
