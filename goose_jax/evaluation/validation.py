"""Validation during expert training: each expert's task metric on its validation split, and the
best step kept per expert (the paper's model selection).

Shapes follow the package legend (the ``goose_jax`` module docstring); E counts the experts
trained side by side.

Validation files. Each expert's validation split is a JSON-lines file of
``{"input": str, "target": str}`` lines, with an optional ``"choices": [str, ...]`` holding the
target among them. By convention it lies beside the expert's training file and is named after
it: ``OUT/train/<name>.jsonl`` trains and ``OUT/validation/<name>.jsonl`` validates (what
``goose-data`` builders write), or ``<name>.jsonl`` and ``<name>.validation.jsonl`` beside it.
A line may also carry ``"references": [str, ...]``, the texts a generation is scored against
(default: its target). A file whose lines have choices is scored by rank-classification
accuracy (the choice with the lowest mean token NLL, ``goose_jax.evaluation.evaluator``); one
without, by
the greedy generation of at most ``max_target_length`` tokens against the target
(``TrainConfig.validation_metric``: exact match or ROUGE-L). A file holds one kind of line.

With ``TrainConfig.validation_rules = "release"`` (the paper settings' configs) each expert is
scored as the original release scored its dataset (``goose_jax.evaluation.release_validation``,
found by
the expert's name): accuracy, SQuAD, BLEU + ROUGE-L or ROUGE-L, the release's generation length
per dataset, each metric value rounded to 3 decimals, so that near-equal steps tie and the
later one wins.

Either family: on a decoder-only base the experts are scored as goose-eval scores one (the
prompt run once and every choice scored from its cached keys and values; generation continues
the prompt), with the prompt encoded as in training (no EOS after it; the tokenizer's leading
special tokens, none for the byte-level one). One difference: a prompt longer than
``max_input_length`` keeps its end here, as goose-eval does, and its start in training.

Model selection (the original release's): validate at step 0 (the untrained expert, whose zero
``B`` is the base model), every ``eval_every`` steps and at the last step; keep, per expert, the
trainable slice of the step with the best score, a later step winning a tie. ``BestKeeper``
holds that slice on the devices, next to the training state, and is part of each checkpoint, so
a resumed run keeps its best-so-far.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from goose_jax.core.errors import DataError, UsageError
from goose_jax.data.batching import check_text
from goose_jax.data.examples import EvalTask, Example
from goose_jax.evaluation import release_validation
from goose_jax.evaluation.evaluator import Evaluator
from goose_jax.evaluation.release_validation import dataset_score
from goose_jax.routing.methods import build_routed

SUFFIX = ".validation.jsonl"
NONE = "none"  # --validation none: no validation even where the files exist


def sibling(path: str) -> str:
    """The validation file named after the training file ``path`` beside it (``a.jsonl`` ->
    ``a.validation.jsonl``)."""
    stem, _ = os.path.splitext(path)
    return stem + SUFFIX


def candidates(path: str) -> list[str]:
    """Where the validation file of the training file ``path`` may be, in the order looked:
    goose-data's layout (``OUT/train/<name>.jsonl`` -> ``OUT/validation/<name>.jsonl``), then
    ``<name>.validation.jsonl`` beside it."""
    folder, name = os.path.split(os.path.abspath(path))
    out = []
    if os.path.basename(folder) == "train":
        out.append(os.path.join(os.path.dirname(folder), "validation", name))
    return out + [os.path.abspath(sibling(path))]


def find_validation(path: str) -> str | None:
    """The validation file of the training file ``path`` (see ``candidates``), or None."""
    return next((c for c in candidates(path) if os.path.isfile(c)), None)


def validation_files(data: Sequence[str], given: Sequence[str] = ()) -> list[str] | None:
    """Each training file's validation file, in ``data`` order, or None (no validation).

    Args:
      data: the training files.
      given: ``--validation``: one file per training file, or ``["none"]``; empty: each
        training file's own (``find_validation``) when every one has one, None when none does.

    Raises:
      UsageError: a count that does not match ``data``.
      DataError: only some training files have a validation file, or a training file is
        another's validation file (a glob such as ``OUT/*.jsonl`` picks up both).
    """
    given = list(given or ())
    if given == [NONE]:
        return None
    for path in data:
        if path.endswith(SUFFIX) and any(sibling(p) == path for p in data):
            raise DataError(f"{os.path.abspath(path)}: is the validation split of another "
                            "--data file; pass only training files to --data (each one's "
                            f"<name>{SUFFIX} beside it is found by itself)")
    if given:
        if len(given) != len(data):
            raise UsageError(f"--validation: {len(given)} files for {len(data)} --data files "
                             "(one per --data file, in the same order, or 'none')")
        return [os.path.abspath(p) for p in given]
    found = [find_validation(p) for p in data]
    if not any(found):
        return None
    if not all(found):
        missing = [p for p, f in zip(data, found) if f is None]
        raise DataError(f"{os.path.abspath(missing[0])}: has no validation file (looked for "
                        f"{' and '.join(candidates(missing[0]))}), while other --data files "
                        f"have theirs ({len(missing)} missing in all); add them, pass "
                        "--validation FILE ... explicitly, or --validation none")
    return found


def no_validation_note(data: Sequence[str]) -> str:
    """The one line goose-train prints when no --data file has a validation file."""
    first = data[0]
    return (f"note: no validation file for {len(data)} --data file(s) (for {first}: looked for "
            f"{' and '.join(candidates(first))}); the last step is kept, without best-step "
            "selection (--validation FILE ... to give them, --validation none to say so)")


def read_validation(path: str, name: str) -> list[Example]:
    """The examples of one validation file (see the module doc), tagged ``dataset=name``.

    Raises:
      DataError: naming the file and line: unreadable, not UTF-8, not a JSON object with string
        ``input`` and ``target``, ``choices`` not a list of strings holding the target, lines
        with and without choices mixed, or no lines at all.
    """
    try:
        with open(path, "rb") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise DataError(f"{path}: cannot read the validation file: {e.strerror}") from None
    out, kinds = [], set()
    for i, raw in enumerate(lines, 1):
        where = f"{path}:{i}"
        try:
            line = raw.decode("utf-8-sig" if i == 1 else "utf-8")  # a leading BOM is no text
        except UnicodeDecodeError as e:
            raise DataError(f"{where}: not UTF-8 text (byte {raw[e.start]:#04x}); save the file "
                            "as UTF-8") from None
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (ValueError, RecursionError):
            row = None
        if not (isinstance(row, dict) and isinstance(row.get("input"), str)
                and isinstance(row.get("target"), str) and row["input"].strip()):
            raise DataError(f"{where}: expected a JSON object with string 'input' (not empty) "
                            "and 'target' (and optionally 'choices', a list of strings)")
        choices = row.get("choices")
        refs = row.get("references", [row["target"]])
        if not (isinstance(refs, list) and refs and all(isinstance(r, str) for r in refs)):
            raise DataError(f"{where}: 'references' must be a non-empty list of strings")
        if choices is not None:
            if not (isinstance(choices, list) and choices
                    and all(isinstance(c, str) for c in choices)):
                raise DataError(f"{where}: 'choices' must be a non-empty list of strings")
        for key, value in (("input", row["input"]), ("target", row["target"]),
                           *(("choices", c) for c in choices or ())):
            check_text(value, where, key)
        if choices is not None:
            if row["target"] not in choices:
                raise DataError(f"{where}: the target {row['target']!r} is not one of its "
                                f"choices {choices}")
            ex = Example(row["input"], tuple(choices), (choices.index(row["target"]),),
                         dataset=name, example_id=str(i))
        else:
            ex = Example(row["input"], references=tuple(refs), dataset=name,
                         example_id=str(i))
        kinds.add(choices is not None)
        if len(kinds) > 1:
            raise DataError(f"{where}: lines with and without 'choices' are mixed; a validation "
                            "file is scored by one metric (split it, or give every line choices)")
        out.append(ex)
    if not out:
        raise DataError(f"{path}: no validation examples (empty file)")
    return out


class Validator:
    """Scores E experts of one stacked trainable tree, each on its own validation examples.

    The goose-eval ``Evaluator`` does the work, with per-example routing (method ``example``):
    every example uses its own expert, so the examples of all experts share batches, and one
    call scores them all. ``cfg`` may configure a T5 or a decoder-only model.

    Args:
      cfg: the model config (with the training's dtype policy).
      params: the frozen base parameters.
      tokenizer: the training's tokenizer.
      examples: per expert, its ``read_validation`` examples.
      lora_scale: the experts' LoRA scale.
      tcfg: the ``TrainConfig`` (lengths, batch size, generation metric, fast compile).
      mesh: the training's mesh, or None.
    """

    def __init__(self, cfg, params, tokenizer, examples: Sequence[Sequence[Example]], *,
                 lora_scale: float, tcfg, mesh=None):
        self.cfg, self.params, self.tokenizer = cfg, params, tokenizer
        self.lora_scale = lora_scale
        self.names = [ex[0].dataset for ex in examples]
        self.index = {n: i for i, n in enumerate(self.names)}
        self.release = tcfg.validation_rules == release_validation.RELEASE
        if self.release:
            rules = release_validation.rules_for(self.names)
            for ex, rule in zip(examples, rules):
                if rule.metric == "accuracy" and not ex[0].choices:
                    raise DataError(f"expert {ex[0].dataset}: the release scores its dataset "
                                    "by rank accuracy, but its validation lines have no "
                                    "'choices'")
            self.metrics = [r.metric for r in rules]
            lengths = [r.max_new_tokens for r in rules]
        else:
            self.metrics = ["accuracy" if ex[0].choices else tcfg.validation_metric
                            for ex in examples]
            lengths = [tcfg.max_target_length] * len(examples)
        self.sizes = [len(ex) for ex in examples]
        self.tasks = []
        groups: dict[tuple[str, int], list[Example]] = {}
        for ex, metric, n in zip(examples, self.metrics, lengths):
            # One task per (kind, length); in release mode generations are scored afterwards.
            carrier = metric if metric == "accuracy" or not self.release else "exact_match"
            groups.setdefault((carrier, 0 if metric == "accuracy" else n), []).extend(ex)
        for (metric, n), group in groups.items():
            self.tasks.append((EvalTask(
                f"validation/{metric}/{n}", "validation", "rank" if metric == "accuracy" else
                "generate", metric, lambda g=group: g, max_new_tokens=max(n, 1)), group))
        self.evaluator_args = dict(
            batch_size=tcfg.micro_batch, max_input_length=tcfg.max_input_length,
            max_target_length=tcfg.max_target_length, mesh=mesh,
            fast_compile=tcfg.fast_compile,
            choose_experts=lambda exs: [self.index[e.dataset] for e in exs])
        self._evaluator = Evaluator

    def scores(self, trainable) -> np.ndarray:
        """(E,) float64: each expert's metric on its validation split, in percent.

        Args:
          trainable: the stacked experts (per site ``lora_a`` (E, I, R), ``lora_b`` (E, R, O)).
        """

        routed = build_routed("example", self.cfg, trainable, scale=self.lora_scale)
        evaluator = self._evaluator(self.cfg, self.params, self.tokenizer, routed,
                                    **self.evaluator_args)
        E = len(self.names)
        values: list[list[float]] = [[] for _ in range(E)]
        texts: list[list[str]] = [[] for _ in range(E)]
        refs: list[list[list[str]]] = [[] for _ in range(E)]
        for task, group in self.tasks:
            result = evaluator.evaluate_task(task, group)
            for pred in result.predictions:
                i = self.index[pred["dataset"]]
                values[i].append(pred["value"])
                if "prediction" in pred and isinstance(pred["prediction"], str):
                    texts[i].append(pred["prediction"])
                    refs[i].append(pred["references"])
        if not self.release:
            return np.array([100.0 * float(np.mean(v)) if v else 0.0 for v in values])
        return np.array([100.0 * dataset_score(m, values[i] if m == "accuracy" else texts[i],
                                               refs[i])
                         for i, m in enumerate(self.metrics)])


@jax.jit
def _keep_better(better_E, trainable, best):
    def pick(x, b):
        return jnp.where(better_E.reshape(better_E.shape + (1,) * (x.ndim - 1)), x, b)

    return jax.tree.map(pick, trainable, best)


class BestKeeper:
    """Per expert, the trainable slice of its best validated step so far (see the module doc).

    ``training.loop.train_loop`` calls ``update`` at each validated step and saves ``trainable`` and
    ``meta()`` in every checkpoint; after the loop, ``trainable`` is the stacked tree of every
    expert's best slice (on the devices, laid out as the training state), ``step`` and ``score``
    say where each came from.

    Args:
      score: maps the stacked trainable tree (leading axis E) to (E,) scores, higher better
        (``Validator.scores``).
      metrics: each expert's metric name, for the record.
    """

    def __init__(self, score, metrics: Sequence[str] = ()):
        self._score = score
        self.metrics = list(metrics)
        self.trainable: Any = None
        self.step: list[int] = []
        self.score: list[float] = []
        self.history: list[list] = []  # [step, [score per expert]] of every validated step

    def update(self, step: int, trainable) -> dict:
        """Scores ``trainable`` (the state after ``step`` steps) and keeps, per expert, the
        better of it and the best so far (ties: the later step). Returns the metrics line."""
        scores = np.asarray(self._score(trainable), np.float64)
        if not np.isfinite(scores).all():
            raise DataError(f"validation at step {step}: non-finite scores {scores.tolist()}")
        if self.trainable is None:
            better = np.ones(scores.shape, bool)
            self.trainable = jax.tree.map(jnp.copy, trainable)
        else:
            better = scores >= np.asarray(self.score)
            self.trainable = _keep_better(better, trainable, self.trainable)
        self.step = [step if b else s for b, s in zip(better, self.step or [step] * len(better))]
        self.score = [float(x) if b else s for b, x, s in zip(
            better, scores, self.score or scores.tolist())]
        self.history.append([step, scores.tolist()])
        return {"step": step, "validation": scores.tolist(), "best_step": list(self.step)}

    def meta(self) -> dict:
        """The JSON half of the checkpointed state (the arrays are ``trainable``)."""
        return {"best_step": self.step, "best_score": self.score, "history": self.history}

    def restore(self, trainable, meta: dict) -> None:
        """Takes back what a checkpoint holds (``trainable`` and ``meta()``)."""
        self.trainable = trainable
        self.step = list(meta["best_step"])
        self.score = list(meta["best_score"])
        self.history = [list(h) for h in meta["history"]]

    def expert(self, i: int) -> dict:
        """Expert ``i`` 's record for the library manifest."""
        return {"best_step": self.step[i], "score": self.score[i],
                "metric": self.metrics[i] if self.metrics else "score",
                "scores": {str(s): v[i] for s, v in self.history}}
