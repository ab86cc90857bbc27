"""Metrics of zero-shot evaluation and of expert validation: exact match, ROUGE-L, SQuAD,
BLEU, rank prediction.

Shapes follow the package legend (the ``goose_jax`` module docstring).

Every per-example metric returns a value in [0, 1]; the evaluator averages them per dataset and
reports percent (``goose_jax.evaluation.report``). ``corpus_bleu`` is a corpus score (BLEU does not
average over examples). The SQuAD and BLEU rules are those of the Hugging Face ``evaluate``
metrics the original release loaded (``src/data/metrics.py`` of r-three/phatgoose, lines 88-120):
``squad`` is the SQuAD v1.1 script (answers normalised, best over references), ``bleu`` is
corpus BLEU-4 over 13a-tokenised text without smoothing.
"""

from __future__ import annotations

import collections
import functools
import math
import re
import string
from collections.abc import Sequence

import numpy as np

from goose_jax.core.errors import EvalError
from goose_jax.data.examples import METRICS


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


def squad_normalize(text: str) -> str:
    """A SQuAD v1.1 answer normalised: lower case, punctuation and the articles a / an / the
    removed, whitespace collapsed."""
    text = "".join(c for c in text.lower() if c not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def squad_exact(prediction: str, references: Sequence[str]) -> float:
    """1.0 if the normalised prediction equals any normalised reference (SQuAD exact match)."""
    pred = squad_normalize(prediction)
    return float(any(pred == squad_normalize(r) for r in references))


def squad_f1(prediction: str, references: Sequence[str]) -> float:
    """SQuAD token F1 of the normalised strings, the best over the references."""
    pred = squad_normalize(prediction).split()
    best = 0.0
    for ref in references:
        gold = squad_normalize(ref).split()
        same = sum((collections.Counter(pred) & collections.Counter(gold)).values())
        if same:
            p, r = same / len(pred), same / len(gold)
            best = max(best, 2 * p * r / (p + r))
    return best


# mteval-v13a tokenisation (sacrebleu's "13a", as the evaluate BLEU metric applies it).
_13A = (
    (re.compile(r"([\{-\~\[-\` -\&\(-\+\:-\@\/])"), r" \1 "),   # symbols and punctuation
    (re.compile(r"([^0-9])([\.,])"), r"\1 \2 "),                    # . and , not after a digit
    (re.compile(r"([\.,])([^0-9])"), r" \1 \2"),                    # . and , not before a digit
    (re.compile(r"([0-9])(-)"), r"\1 \2 "),                          # - after a digit
)


def tokenize_13a(text: str) -> list[str]:
    """The words of ``text`` under mteval-v13a tokenisation."""
    text = text.replace("<skipped>", "").replace("-\n", "").replace("\n", " ")
    if "&" in text:
        for entity, char in (("&quot;", '"'), ("&amp;", "&"), ("&lt;", "<"), ("&gt;", ">")):
            text = text.replace(entity, char)
    text = f" {text} "
    for pattern, repl in _13A:
        text = pattern.sub(repl, text)
    return text.split()


def corpus_bleu(predictions: Sequence[str], references: Sequence[Sequence[str]],
                max_order: int = 4) -> float:
    """Corpus BLEU in [0, 1]: clipped n-gram precisions (n = 1..max_order) pooled over the
    corpus, their geometric mean (0 if any is 0: no smoothing), times the brevity penalty
    ``exp(1 - r / c)`` when the prediction length c is below the shortest-reference length r.

    Args:
      predictions: one text per example.
      references: per example, its reference texts (at least one).
    """
    if len(predictions) != len(references):
        raise EvalError(f"corpus_bleu: {len(predictions)} predictions, {len(references)} "
                        "reference lists")
    matches, possible = [0] * max_order, [0] * max_order
    pred_len = ref_len = 0
    for pred, refs in zip(predictions, references):
        if not refs:
            raise EvalError("corpus_bleu needs at least one reference per prediction")
        words = tokenize_13a(pred)
        ref_words = [tokenize_13a(r) for r in refs]
        pred_len += len(words)
        ref_len += min(len(r) for r in ref_words)
        for n in range(1, max_order + 1):
            grams = collections.Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
            ceiling: collections.Counter = collections.Counter()
            for r in ref_words:
                ceiling |= collections.Counter(tuple(r[i:i + n]) for i in range(len(r) - n + 1))
            matches[n - 1] += sum((grams & ceiling).values())
            possible[n - 1] += max(len(words) - n + 1, 0)
    if min(possible) == 0 or min(matches) == 0:
        return 0.0
    log_mean = sum(math.log(m / p) for m, p in zip(matches, possible)) / max_order
    penalty = 1.0 if pred_len > ref_len else math.exp(1 - ref_len / pred_len)
    return math.exp(log_mean) * penalty


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
