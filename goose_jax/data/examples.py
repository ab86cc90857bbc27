"""The types every data source produces and the evaluator consumes: ``Example`` and ``EvalTask``.

An ``Example`` is one prompted input with its answer choices (rank classification) or reference
strings (generation); an ``EvalTask`` names a source of examples and how to score them. Nothing
here imports JAX or TensorFlow.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable

from goose_jax.core.errors import EvalError

KINDS = ("rank", "generate")
METRICS = ("accuracy", "exact_match", "exact_match_any", "rouge_l")


@dataclasses.dataclass(frozen=True)
class Example:
    """One prompted example.

    Attributes:
      input: the prompt fed to the encoder.
      choices: answer choices for rank classification; None for generation.
      answers: indices of the correct choices (several allowed).
      references: reference strings for generation (any-of for exact match, max for ROUGE-L).
      dataset: the dataset the example's score is pooled into (``rte``, ``bbh_navigate``).
      template: the prompt template (P3) or ``""``.
      example_id: an identifier unique within (dataset, template).
    """

    input: str
    choices: tuple[str, ...] | None = None
    answers: tuple[int, ...] = ()
    references: tuple[str, ...] = ()
    dataset: str = ""
    template: str = ""
    example_id: str = ""


def example_target(ex: Example) -> str:
    """The text an example trains towards: its first correct choice, else its first reference
    (``""`` when it has neither)."""
    if ex.choices and ex.answers:
        return ex.choices[ex.answers[0]]
    return ex.references[0] if ex.references else ""


@dataclasses.dataclass(frozen=True)
class EvalTask:
    """A named source of examples and how to score them.

    Attributes:
      name: the task name (``t0_heldout/rte``, ``bbh/navigate``).
      dataset: the dataset its examples are pooled into.
      kind: ``"rank"`` or ``"generate"``.
      metric: one of ``METRICS``.
      load: returns the task's examples (called once, before the model runs).
      max_new_tokens: generation length for ``kind="generate"``.
      source: where the data lives, for messages.
    """

    name: str
    dataset: str
    kind: str
    metric: str
    load: Callable[[], Iterable[Example]]
    max_new_tokens: int = 64
    source: str = ""

    def __post_init__(self):
        if self.kind not in KINDS:
            raise EvalError(f"task {self.name}: kind must be one of {KINDS}, got {self.kind!r}")
        if self.metric not in METRICS:
            raise EvalError(f"task {self.name}: metric must be one of {METRICS}, "
                            f"got {self.metric!r}")
        if (self.kind == "rank") != (self.metric == "accuracy"):
            raise EvalError(f"task {self.name}: metric {self.metric!r} does not fit kind "
                            f"{self.kind!r}")
