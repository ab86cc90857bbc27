"""Two import rules ``make lint`` holds the package to, beside the layer contract
(``lint-imports``, configured in ``pyproject.toml``):

1. No goose_jax module is imported inside a function, outside ``goose_jax/cli/`` (whose tools
   parse their arguments before loading the library). An import inside a function hides a
   dependency from the layer contract and is how import circles survive; third-party imports
   may stay lazy (TensorFlow, datasets, torch are loaded only where used).
2. No private name (``_x``) is imported from another goose_jax module: what crosses a module
   boundary is public, named without the underscore.

Usage: ``python tools/lint_imports.py [PACKAGE_DIR]`` (default ``goose_jax``); prints one line
per violation and exits 1 when there is any.
"""

from __future__ import annotations

import ast
import os
import sys


def _own(module: str | None) -> bool:
    return bool(module) and (module == "goose_jax" or module.startswith("goose_jax."))


def violations(path: str, exempt_inner: bool) -> list[str]:
    """The rule violations of one file, as ``path:line: message`` lines."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                      ast.Lambda))
            if isinstance(child, ast.ImportFrom) and child.level == 0 and _own(child.module):
                if in_function and not exempt_inner:
                    found.append(f"{path}:{child.lineno}: goose_jax import inside a function "
                                 f"(from {child.module} import ...): import it at the top")
                for alias in child.names:
                    if alias.name.startswith("_"):
                        found.append(f"{path}:{child.lineno}: private name {alias.name} "
                                     f"imported from {child.module}: make it public")
            elif isinstance(child, ast.Import) and in_function and not exempt_inner:
                for alias in child.names:
                    if _own(alias.name):
                        found.append(f"{path}:{child.lineno}: goose_jax import inside a "
                                     f"function (import {alias.name}): import it at the top")
            visit(child, inner)

    visit(tree, False)
    return found


def main(argv: list[str]) -> int:
    root = argv[0] if argv else "goose_jax"
    cli = os.path.join(root, "cli") + os.sep
    found = []
    for folder, _, names in sorted(os.walk(root)):
        for name in sorted(names):
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                found += violations(path, exempt_inner=path.startswith(cli))
    for line in found:
        print(line)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
