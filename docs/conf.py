"""Sphinx configuration of the goose-jax site (`make docs` builds it into docs/_build/html).

Sphinx with MyST markdown and myst-nb: the generator of the jax, flax, optax and orbax sites,
whose readers are this project's. Guides are markdown, tutorials are MyST notebooks executed at
every build (a failing cell fails the build), and the API reference comes from the docstrings.
"""

import os
import sys

sys.path.insert(0, os.path.abspath(".."))

project = "goose-jax"
author = "goose-jax authors"
copyright = "goose-jax authors"

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
]
templates_path = ["_templates"]

source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
exclude_patterns = ["_build", "**/.ipynb_checkpoints"]

# The README's headings become anchors, as GitHub makes them.
myst_heading_anchors = 4
myst_enable_extensions = ["colon_fence"]

# Tutorials run at every build, each in its own kernel; an error in a cell fails the build.
nb_execution_mode = "force"
nb_execution_raise_on_error = True
nb_execution_timeout = 300
nb_execution_show_tb = True
# What the libraries print to stderr while a tutorial runs (progress-bar notices, deprecations of
# transformers) is left out of the pages.
nb_output_stderr = "remove"

autosummary_generate = True
autodoc_default_options = {"members": True, "undoc-members": False, "show-inheritance": True}
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
# Defaults as the source writes them (``os.environ``, a path under the package), not the values
# they had on the machine that built the site.
autodoc_preserve_defaults = True
napoleon_google_docstring = True
napoleon_numpy_docstring = False
# A class's "Attributes:" become fields of its description, not a second description of each
# attribute beside autodoc's.
napoleon_use_ivar = True
# The same short names (``cfg``, ``source``) are attributes of many classes; a field naming one
# links to none rather than warning.
suppress_warnings = ["ref.python"]

html_theme = "sphinx_book_theme"
html_title = "goose-jax"
html_theme_options = {"show_toc_level": 2, "navigation_with_keys": False}


def _write_top_level_page(app):
    """api/goose_jax.md: ``goose_jax.__all__``, each name linked to where it is defined."""
    import goose_jax

    rows = [f"   ~{getattr(goose_jax, n).__module__}.{n}" for n in goose_jax.__all__]
    text = "\n".join([
        "# `import goose_jax`", "",
        "The names of `goose_jax.__all__`, the surface most users need; each links to its",
        "definition in the package that holds it.", "",
        "```{eval-rst}", ".. autosummary::", "", *rows, "```", ""])
    path = os.path.join(app.srcdir, "api", "goose_jax.md")
    old = open(path).read() if os.path.exists(path) else None
    if old != text:
        with open(path, "w") as f:
            f.write(text)


# Docstrings written as plain text rather than reStructuredText (indented continuation lines,
# ``*`` in formulas) are shown as written, in a preformatted block, instead of failing the build;
# a verbose build (-v) names them. The rest are rendered as reStructuredText, napoleon's sections
# included.
_RAW_DOCSTRINGS = {}


def _keep_raw(app, what, name, obj, options, lines):
    _RAW_DOCSTRINGS[name] = list(lines)


def _parses_cleanly(lines):
    import docutils.core
    import docutils.utils

    messages = []
    settings = {"report_level": 5, "halt_level": 5, "warning_stream": False}
    try:
        doctree = docutils.core.publish_doctree("\n".join(lines), settings_overrides=settings)
    except Exception:
        return False
    for node in doctree.traverse(docutils.nodes.system_message):
        text = node.astext()
        if node["level"] >= 2 and "Unknown interpreted text role" not in text \
                and "Unknown directive type" not in text and 'No role entry for' not in text \
                and 'No directive entry for' not in text:
            messages.append(text)
    return not messages


def _preformat_unparsable(app, what, name, obj, options, lines):
    if _parses_cleanly(lines):
        return
    raw = _RAW_DOCSTRINGS.get(name, list(lines))
    from sphinx.util import logging

    logging.getLogger(__name__).info(f"docstring shown preformatted: {name}")
    lines[:] = ["::", ""] + [f"   {line}" if line.strip() else "" for line in raw] + [""]


def _link_bench_results(app, relative_path, parent_docname, content):
    """The README's link to bench/README.md leads to the site's page of that file."""
    if relative_path.name == "README.md" and relative_path.parent.name != "bench":
        content[0] = content[0].replace("](bench/README.md)", "](bench_results.md)")


def setup(app):
    app.connect("include-read", _link_bench_results)
    app.connect("builder-inited", _write_top_level_page)
    app.connect("autodoc-process-docstring", _keep_raw, priority=100)
    app.connect("autodoc-process-docstring", _preformat_unparsable, priority=900)
