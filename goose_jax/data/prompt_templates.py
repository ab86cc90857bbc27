"""promptsource templates read from their YAML files and rendered as promptsource renders them.

The T0 held-in datasets were prompted with promptsource (bigscience-workshop/promptsource): one
``templates.yaml`` per dataset, at ``<templates>/<dataset>[/<subset>]/templates.yaml``, holding
``!Template`` objects (``name``, ``jinja``, ``answer_choices``, ``metadata.original_task``).
This module reads those files without importing promptsource (and without running anything from
them: YAML's safe loader, a sandboxed Jinja environment) and renders a template on a dataset
example with promptsource's ``Template.apply`` rules:

  * every ``}}`` of the template becomes ``| string | truncate(2048) }}`` (each variable is cut
    to 2,048 characters, Jinja's ``truncate`` with its default leeway and ``...`` end);
  * ``|||`` inside the example's string fields is protected while rendering, then restored;
  * the answer choices are the ``answer_choices`` expression rendered on the example, split on
    ``|||``, each stripped (no truncation), and passed to the template as ``answer_choices``;
  * the rendered text is split on ``|||`` and each part stripped (prompt, target);
  * the environment has promptsource's extras: the ``zip`` global and the ``choice`` and
    ``most_frequent`` filters. promptsource's ``choice`` draws with Python's global ``random``;
    here it draws from a generator seeded by (seed, template name, example index), so a build
    is repeatable.

Templates are listed sorted by name (promptsource's ``all_template_names``).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
import random
from collections import Counter
from collections.abc import Mapping, Sequence

from goose_jax.core.errors import DataError

TEMPLATE_FILE = "templates.yaml"
TEXT_VAR_LENGTH = 2048
PIPE_PROTECTOR = "3ed2dface8203c4c9dfb1a5dc58e41e0"
_RNG_KEY = "__goose_choice_rng"


@dataclasses.dataclass(frozen=True)
class Template:
    """One promptsource template.

    Attributes:
      name: the template's name (unique within its dataset).
      jinja: the Jinja source; prompt and target are separated by ``|||``.
      answer_choices: the Jinja expression of the choices (``a ||| b``), or None.
      original_task: ``metadata.original_task``.
    """

    name: str
    jinja: str
    answer_choices: str | None = None
    original_task: bool = False


# --- finding and reading the files ----------------------------------------------------------


def package_templates() -> str | None:
    """The templates folder of an installed promptsource package (found, not imported)."""
    try:
        spec = importlib.util.find_spec("promptsource")
    except (ImportError, ValueError):
        return None
    for where in (spec.submodule_search_locations or []) if spec else []:
        folder = os.path.join(where, "templates")
        if os.path.isdir(folder):
            return folder
    return None


def templates_root(folder: str | os.PathLike | None) -> str:
    """The folder holding ``<dataset>/templates.yaml``: ``folder`` (a promptsource checkout, its
    ``promptsource/templates`` folder or anything in between), else the installed package's.

    Raises:
      DataError: no such folder, or neither a folder nor the package.
    """
    if folder is None:
        found = package_templates()
        if found is None:
            raise DataError("promptsource templates: the promptsource package is not installed; "
                            "pass --templates DIR (a checkout of bigscience-workshop/promptsource)")
        return found
    folder = os.path.abspath(os.path.expanduser(os.fspath(folder)))
    if not os.path.isdir(folder):
        raise DataError(f"{folder}: templates folder does not exist (expected a promptsource "
                        "checkout, with promptsource/templates/<dataset>/templates.yaml)")
    for sub in (os.path.join("promptsource", "templates"), "templates"):
        if os.path.isdir(os.path.join(folder, sub)):
            return os.path.join(folder, sub)
    return folder


def template_file(root: str, dataset: str, subset: str | None = None) -> str:
    """The path of the templates file of ``dataset`` (and ``subset``) under ``root``."""
    return os.path.join(root, dataset, *([subset] if subset else []), TEMPLATE_FILE)


def _loader():
    import yaml

    class Loader(yaml.SafeLoader):
        """The safe loader, with promptsource's two tags read as plain mappings."""

    def mapping(loader, node):
        return loader.construct_mapping(node, deep=True)

    Loader.add_constructor("!Template", mapping)
    Loader.add_constructor("!TemplateMetadata", mapping)
    return Loader


def read_templates(root: str, dataset: str, subset: str | None = None) -> list[Template]:
    """Every template of one dataset, sorted by name.

    Raises:
      DataError: a missing or unreadable ``templates.yaml``, or one without templates.
    """
    import yaml

    path = template_file(root, dataset, subset)
    if not os.path.isfile(path):
        raise DataError(f"{path}: promptsource template file missing (the templates of "
                        f"{'/'.join(filter(None, (dataset, subset)))}); pass --templates with a "
                        "complete promptsource checkout")
    try:
        with open(path, encoding="utf-8") as f:
            doc = yaml.load(f, Loader=_loader())  # noqa: S506 (a safe loader subclass)
        entries = list((doc or {}).get("templates", {}).values())
        out = [Template(str(e["name"]), str(e["jinja"]),
                        None if e.get("answer_choices") is None else str(e["answer_choices"]),
                        bool((e.get("metadata") or {}).get("original_task")))
               for e in entries]
    except (OSError, yaml.YAMLError, AttributeError, KeyError, TypeError) as e:
        raise DataError(f"{path}: unreadable promptsource template file "
                        f"({type(e).__name__}: {' '.join(str(e).split())[:200]})") from None
    if not out:
        raise DataError(f"{path}: no templates in the file")
    return sorted(out, key=lambda t: t.name)


# --- rendering ----------------------------------------------------------------------------------


def _choice(context, items):
    return context[_RNG_KEY].choice(items)


def _most_frequent(items):
    if not items:
        return None
    counts = Counter(items).most_common()
    return [item for item, n in counts if n == counts[0][1]]


_ENV = None


def environment():
    """The sandboxed Jinja environment with promptsource's global and filters."""
    global _ENV
    if _ENV is None:
        import jinja2
        from jinja2.sandbox import SandboxedEnvironment

        env = SandboxedEnvironment(loader=jinja2.BaseLoader())
        env.globals["zip"] = zip
        env.filters["choice"] = jinja2.pass_context(_choice)
        env.filters["most_frequent"] = _most_frequent
        _ENV = env
    return _ENV


@functools.lru_cache(maxsize=1024)
def _compiled(source: str):
    """A template source compiled once (rendering 500,000 rows must not recompile it)."""
    return environment().from_string(source)


def _protect(example: Mapping) -> dict:
    return {k: v.replace("|||", PIPE_PROTECTOR) if isinstance(v, str) else v
            for k, v in example.items()}


def _unprotect(text: str) -> str:
    return text.replace(PIPE_PROTECTOR, "|||")


def answer_choices(template: Template, example: Mapping, rng: random.Random) -> list[str] | None:
    """The template's answer choices for one example (None: the template has none)."""
    if template.answer_choices is None:
        return None
    text = _compiled(template.answer_choices).render(
        **_protect(example), **{_RNG_KEY: rng})
    return [_unprotect(c.strip()) for c in text.split("|||")]


def apply(template: Template, example: Mapping, rng: random.Random) -> list[str]:
    """The rendered template split on ``|||`` (prompt and target when it renders as two parts).

    Raises whatever Jinja raises on a template that does not fit the example.
    """
    jinja = template.jinja.replace("}}", f" | string | truncate({TEXT_VAR_LENGTH}) }}}}")
    if "answer_choices" in example:
        raise ValueError("the example has a field named 'answer_choices'")
    context = {**_protect(example), "answer_choices": answer_choices(template, example, rng),
               _RNG_KEY: rng}
    text = _compiled(jinja).render(**context)
    return [_unprotect(part).strip() for part in text.split("|||")]


def example_rng(seed: int, template: str, index: int) -> random.Random:
    """The generator of the ``choice`` filter for one (template, example)."""
    return random.Random(f"{seed}:{template}:{index}")


def render(template: Template, example: Mapping, seed: int, index: int
           ) -> tuple[str, str, list[str] | None]:
    """``(prompt, target, choices)`` as the original release builds them from one template and
    example: a template that fails or does not give two parts gives ``<NO INPUT>`` for both; an
    empty target becomes ``<NO LABEL>``; ``choices`` is None when the template has none."""
    try:
        parts = apply(template, example, example_rng(seed, template.name, index))
    except Exception:  # the release catches every failure of a template on an example
        parts = []
    if len(parts) == 2:
        prompt, target = parts
        target = target or NO_LABEL
    else:
        prompt, target = NO_INPUT, NO_INPUT
    try:
        choices = answer_choices(template, example, example_rng(seed, template.name, index))
    except Exception as e:
        raise DataError(f"template {template.name!r}: its answer_choices expression fails on "
                        f"example {index} ({type(e).__name__}: {e})") from None
    return prompt, target, choices


NO_LABEL = "<NO LABEL>"
NO_INPUT = "<NO INPUT>"


def pick_choice(target: str, choices: Sequence[str]) -> int:
    """The index of ``target`` among ``choices``; else the release's ``find_label`` rule on
    characters: the most matching leading positions, then the shorter choice, then the later."""
    if target in choices:
        return list(choices).index(target)
    scored = [(sum(a == b for a, b in zip(target, c)), -len(c), i) for i, c in enumerate(choices)]
    return max(scored)[2]
