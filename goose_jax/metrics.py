"""Per-example metrics of zero-shot evaluation: exact match, ROUGE-L, rank prediction.

Shapes follow the package legend (the ``goose_jax`` module docstring).

Every metric returns a value in [0, 1] for one example; the evaluator averages them per dataset
and reports percent (``goose_jax.report``).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np

from goose_jax.data.examples import METRICS
from goose_jax.errors import EvalError


def exact_match(prediction: str, reference: str) -> float:
    """1.0 if the strings are equal after stripping surrounding whitespace, else 0.0."""
    return float(prediction.strip() == reference.strip())


def exact_match_any(prediction: str, references: Sequence[str]) -> float:
    """1.0 if the prediction exactly matches any reference (``exact_match``)."""
    return float(any(exact_match(prediction, r) for r in references))


@functools.lru_cache(maxsize=2)
def _rouge_scorer(use_stemmer: bool):
    try:
        from rouge_score import rouge_scorer
    except ImportError:
        raise EvalError("ROUGE-L needs the rouge-score package (pip install rouge-score)") from None
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=use_stemmer)


def rouge_l(prediction: str, references: Sequence[str] | str, use_stemmer: bool = False) -> float:
    """ROUGE-L F-measure in [0, 1] from ``rouge-score``; the best over several references."""
    refs = [references] if isinstance(references, str) else list(references)
    if not refs:
        raise EvalError("rouge_l needs at least one reference")
    return float(_rouge_scorer(use_stemmer).score_multi(refs, prediction)["rougeL"].fmeasure)


def rank_prediction(scores_C: np.ndarray) -> int:
    """The argmin of the choice scores (ties: the lowest index)."""
    return int(np.argmin(np.asarray(scores_C)))


def generation_score(metric: str, prediction: str, references: Sequence[str]) -> float:
    """The per-example value of a generation metric, in [0, 1]."""
    if metric == "exact_match":
        return exact_match(prediction, references[0])
    if metric == "exact_match_any":
        return exact_match_any(prediction, references)
    if metric == "rouge_l":
        return rouge_l(prediction, references)
    raise EvalError(f"unknown generation metric {metric!r}; expected one of {METRICS[1:]}")
