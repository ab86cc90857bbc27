"""Zero-shot evaluation: the evaluator and its jitted scorers (rank classification, greedy
generation, routing telemetry).

Shapes follow the package legend (the ``goose_jax`` module docstring); T is a choice's (target's)
length. Also used here: M = B*C rows (every choice of every example), X the encoder's rows (B, or
M when the input is repeated per choice).

Protocol (PHATGOOSE.md section 7):
  - Rank classification: every choice ends with EOS and is scored by teacher forcing; the score
    is the mean token NLL over the choice's tokens (``length_normalize=False``: the sum); the
    prediction is the argmin; an example is correct if the prediction is any correct choice.
  - Generation: greedy decoding with a per-task maximum length; exact match, any-of-references
    exact match or ROUGE-L (``goose_jax.evaluation.metrics``).
  - Per dataset, the mean over all its (example, template) pairs; a benchmark is the unweighted
    mean over its datasets (``goose_jax.evaluation.report``). Scores are reported in percent.

The examples and tasks it reads are ``goose_jax.data.examples``'s types. The encoder runs once
per example: its output is repeated along the choice axis inside one jitted call, and the decoder
scores all B*C rows at once. Batch size, number of choices, encoder length and choice length are
rounded up to powers of two (capped by the configured maxima), so a benchmark compiles a handful
of shapes. Nothing here imports TensorFlow.

A decoder-only base (a family with ``decoder_only``) is evaluated the same way, with the same
tasks, batching and metrics: each prompt runs once and every choice is scored from its cached
keys and values (``goose_jax.models.causal.scoring``; ``encoder_once=False``: each prompt + choice
row whole), and generation continues the prompt (``decoder_generation``). Its prompts start as
decoder training starts them (BOS when both the model and the tokenizer have one,
``models.causal.loss.prompt_bos``), carry no EOS, and are truncated from the left, keeping the
text nearest the answer.
"""

from __future__ import annotations

import dataclasses
import time
from collections import Counter
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from goose_jax.core.distributed import fetch
from goose_jax.core.errors import DataError, EvalError, NonFiniteError
from goose_jax.core.sharding import batch_sharding, put_global
from goose_jax.core.trees import flatten_sites
from goose_jax.data.batching import bucket
from goose_jax.data.examples import EvalTask, Example
from goose_jax.evaluation.metrics import generation_score, rank_prediction
from goose_jax.experts.lora import EXPERTS
from goose_jax.models import families
from goose_jax.models.scan import stack_layers
from goose_jax.routing.methods import PER_EXAMPLE, ROUTER

Array = jax.Array


# --- shapes -------------------------------------------------------------------------------------


def _truncate(ids: list[int], max_len: int, eos: int) -> list[int]:
    # Keep EOS last, as the tokenizers do, so a truncated text still ends like a sentence.
    return ids if len(ids) <= max_len else ids[:max_len - 1] + [eos]


def _pad_rows(rows: Sequence[Sequence[int]], n_rows: int, length: int) -> tuple[np.ndarray, ...]:
    ids = np.zeros((n_rows, length), np.int32)
    mask = np.zeros((n_rows, length), np.int32)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = r
        mask[i, :len(r)] = 1
    return ids, mask


# --- the jitted scorers -------------------------------------------------------------------------


# --- the evaluator ------------------------------------------------------------------------------


@dataclasses.dataclass
class DatasetResult:
    """Everything measured for one dataset (all its templates pooled)."""

    dataset: str
    metric: str
    values: list[float] = dataclasses.field(default_factory=list)
    templates: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    skipped: Counter = dataclasses.field(default_factory=Counter)
    predictions: list[dict] = dataclasses.field(default_factory=list)
    telemetry: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    seconds: float = 0.0

    @property
    def score(self) -> float | None:
        return 100.0 * float(np.mean(self.values)) if self.values else None


class Evaluator:
    """Runs a T5 or a decoder-only model (with any routing method) over evaluation tasks.

    Args:
      cfg: the base model config (``T5Config`` or ``DecoderConfig``).
      params: base parameters.
      tokenizer: anything with ``encode(text, add_eos)``, ``decode(ids)``, ``eos_id``.
      routed: a ``goose_jax.routing.methods.Routed`` (None: the base model).
      batch_size: examples per batch; a batch holds at most ``4 * batch_size`` choice rows and
        ``256 * batch_size`` choice tokens (examples with long choices go in smaller batches).
      max_input_length: encoder tokens per example (truncated, EOS kept).
      max_target_length: tokens per answer choice (truncated, EOS kept).
      length_normalize: mean NLL over the choice's tokens (the paper); False: summed NLL.
      encoder_once: score choices with one encoder pass per example, or for a decoder-only
        model one pass of the prompt (False: the naive way, the input again for every choice).
      telemetry: count top-1 experts per site (per-token routing methods only), in rank
        classification and in generation.
      choose_experts: for method ``example``, maps a list of examples to one expert index each.
      mesh: optional device mesh (``core.sharding.make_mesh``); batches are split over its ``data``
        axis. ``params`` and ``routed`` are expected on it already: the base by the rules table
        (``core.sharding.shard_params``), the library over ``expert`` (``build_routed(mesh=...)``,
        whose adapter then routes without gathering the library), as ``pipeline.zeroshot.run_eval``
        lays them out.
      fixed_shapes: pad every batch to ``batch_size`` rows, at least 4 choices and the maximum
        lengths, so each method compiles one rank-classification and one generation shape (for
        short inputs and many methods, e.g. the miniature world, compiling dominates).
      fast_compile: compile with XLA's CPU optimisations off
      (``models.config.FAST_COMPILE_OPTIONS``):
        several times faster to compile, slower to run; for small models.
    """

    def __init__(self, cfg: families.ModelConfig, params, tokenizer, routed=None, *,
                 batch_size: int = 16,
                 max_input_length: int = 512, max_target_length: int = 512,
                 length_normalize: bool = True, encoder_once: bool = True,
                 telemetry: bool = False, choose_experts: Callable | None = None, mesh=None,
                 fixed_shapes: bool = False, fast_compile: bool = False):
        if batch_size < 1 or max_input_length < 2 or max_target_length < 1:
            raise EvalError(f"need batch_size >= 1, max_input_length >= 2, max_target_length "
                            f">= 1; got {batch_size}, {max_input_length}, {max_target_length}")
        self.cfg, self.params, self.tok, self.routed = cfg, params, tokenizer, routed
        self.batch_size, self.max_rows = batch_size, 4 * batch_size
        self.max_input_length, self.max_target_length = max_input_length, max_target_length
        self.length_normalize, self.encoder_once = length_normalize, encoder_once
        self.mesh, self.choose_experts = mesh, choose_experts
        self.fixed_shapes = fixed_shapes
        self.fast_compile = bool(fast_compile)
        self.family = families.of(cfg)
        self.scan = bool(getattr(cfg, "scan_layers", False))
        # Where generation stops, and how every prompt starts, are the family's
        # (``ModelFamily.eval_config``, ``eval_prefix``).
        self.gen_cfg = self.family.eval_config(cfg, tokenizer)
        self.prefix = self.family.eval_prefix(cfg, tokenizer)
        method = getattr(routed, "method", "base")
        if method in PER_EXAMPLE and choose_experts is None:
            raise EvalError(f"method {method!r} needs choose_experts (one expert per example)")
        adapter = getattr(routed, "adapter", None)
        per_token = getattr(adapter, "scoring", None) in ("standardized", "abs_dot")
        self.telemetry = bool(telemetry and per_token)
        # The routed adapter counts the top-1 choices of the routing it computes anyway, over
        # the tokens of its site's telemetry mask (supplied by the scorer and by generation).
        if per_token:
            adapter = dataclasses.replace(adapter, telemetry=self.telemetry)
        self.adapter = adapter
        self.collections = dict(getattr(routed, "collections", None) or {})
        self.sites = tuple(flatten_sites(self.collections[EXPERTS])) if self.telemetry else ()
        if self.scan:
            # The scanned model reads trees stacked along the layer axis: stacked once here
            # (already stacked trees pass through), not on every call.
            self.params = stack_layers(self.params, cfg)
            self.collections = stack_layers(self.collections, cfg)
        self.compiled_shapes: set[tuple] = set()
        self.last_counts: dict[str, np.ndarray] = {}

    # -- helpers --

    def _rows(self, n: int) -> int:
        div = self.mesh.shape["data"] if self.mesh is not None else 1
        b = self.batch_size if self.fixed_shapes else bucket(n, 1, self.batch_size)
        return -(-b // div) * div

    def _choices(self, n: int) -> int:
        return max(4, bucket(n)) if self.fixed_shapes else bucket(n)

    def _length(self, n: int, minimum: int, maximum: int) -> int:
        return maximum if self.fixed_shapes else bucket(n, minimum, maximum)

    def _put(self, x):
        # Every process builds the same host batch and places the rows its devices hold.
        if self.mesh is None:
            return jnp.asarray(x)

        return put_global(np.asarray(x), batch_sharding(self.mesh, np.ndim(x)))

    @staticmethod
    def _get(tree):
        # Outputs split over the devices of several processes are gathered on every process.
        return fetch(tree)

    def _variables(self, experts_B: np.ndarray | None, repeat: int = 1) -> dict:
        if experts_B is None:
            return {"params": self.params, **self.collections}
        routed = self.routed.with_example_index(np.repeat(experts_B, repeat))
        if not self.scan:
            return {"params": self.params, **routed.collections}
        router = stack_layers(routed.collections[ROUTER], self.cfg)
        return {"params": self.params, **self.collections, ROUTER: router}

    def _experts(self, batch: Sequence[Example], rows: int) -> np.ndarray | None:
        if self.choose_experts is None:
            return None
        idx = np.zeros((rows,), np.int32)
        idx[:len(batch)] = np.asarray(self.choose_experts(list(batch)), np.int32)
        return idx

    def _encode_input(self, text: str) -> list[int]:
        return self.family.encode_prompt(self.tok, text, self.max_input_length, self.prefix)

    # -- rank classification --

    def score_choices(self, examples: Sequence[Example], progress=None) -> list[np.ndarray]:
        """Per example, the (C,) choice scores (mean or summed token NLL); lower is better.

        Returns:
          One float64 array per example; its telemetry counts are added to ``self.last_counts``.
        """
        if any(not ex.choices for ex in examples):
            raise EvalError("score_choices: every example needs at least one choice")
        enc = [self._encode_input(ex.input) for ex in examples]
        chs = [[_truncate(self.tok.encode(c, add_eos=True), self.max_target_length,
                          self.tok.eos_id) for c in ex.choices] for ex in examples]
        # Group equal choice buckets, then sort by input length to keep padding small.
        order = sorted(range(len(examples)), key=lambda i: (self._choices(len(chs[i])),
                                                             len(enc[i])))
        out: list[np.ndarray | None] = [None] * len(examples)
        self.last_counts = {}
        pos = 0
        while pos < len(order):
            C = self._choices(len(chs[order[pos]]))
            per_batch = max(1, min(self.batch_size, self.max_rows // C))
            idx = [i for i in order[pos:pos + per_batch] if self._choices(len(chs[i])) == C]
            while True:  # long choices: fewer examples, so the (M, T, V) logits stay bounded
                T = self._length(max(len(c) for i in idx for c in chs[i]), 4,
                                 self.max_target_length)
                if len(idx) == 1 or len(idx) * C * T <= self.max_rows * 64:
                    break
                idx = idx[:len(idx) // 2]
            pos += len(idx)
            B = self._rows(len(idx))
            L = self._length(max(len(enc[i]) for i in idx), 8, self.max_input_length)
            ids, mask = _pad_rows([enc[i] for i in idx], B, L)
            tgt = np.zeros((B, C, T), np.int32)
            tmask = np.zeros((B, C, T), np.int32)
            for b, i in enumerate(idx):
                for c, ch in enumerate(chs[i]):
                    tgt[b, c, :len(ch)] = ch
                    tmask[b, c, :len(ch)] = 1
            naive = not self.encoder_once
            experts = self._experts([examples[i] for i in idx], B)
            enc_vars = self._variables(experts, C if naive else 1)
            dec_vars = self._variables(experts, C) if experts is not None else enc_vars
            self.compiled_shapes.add(("rank", B, C, L, T))
            score = self.family.choice_scorer(self.fast_compile)
            nll, counts = score(self.cfg, self.adapter, enc_vars, dec_vars, self._put(ids),
                                self._put(mask), self._put(tgt), self._put(tmask), naive=naive,
                                sites=self.sites)
            nll, counts = self._get((nll, counts))
            nll = np.asarray(nll, np.float64)
            ntok = tmask.sum(-1)
            for b, i in enumerate(idx):
                n_c = len(chs[i])
                s = nll[b, :n_c]
                out[i] = s / ntok[b, :n_c] if self.length_normalize else s
            self._add_counts(counts)
            if progress is not None:
                progress.update(len(idx))
        return out  # type: ignore[return-value]

    def _add_counts(self, counts) -> None:
        for site, c in counts.items():
            c = np.asarray(c, np.float64)
            self.last_counts[site] = self.last_counts.get(site, 0.0) + c

    # -- generation --

    def generate(self, examples: Sequence[Example], max_new_tokens: int,
                 progress=None) -> list[str]:
        """Greedy continuations, decoded to text (stopping at EOS)."""
        enc = [self._encode_input(ex.input) for ex in examples]
        order = sorted(range(len(examples)), key=lambda i: len(enc[i]))
        out: list[str] = [""] * len(examples)
        self.last_counts = {}
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            B = self._rows(len(idx))
            L = self._length(max(len(enc[i]) for i in idx), 8, self.max_input_length)
            ids, mask = _pad_rows([enc[i] for i in idx], B, L)
            variables = self._variables(self._experts([examples[i] for i in idx], B))
            self.compiled_shapes.add(("generate", B, L, max_new_tokens))
            coll = {k: v for k, v in variables.items() if k != "params"}
            # With telemetry, decoding counts the routing it computes (no second forward).
            out_gen = self.family.generate(
                self.gen_cfg, self.params, self._put(ids), max_new_tokens, self._put(mask),
                adapter=self.adapter, collections=coll or None, fast_compile=self.fast_compile,
                telemetry=self.telemetry, check_finite=True, mesh=self.mesh)
            toks, counts = self._get(out_gen if self.telemetry else (out_gen, {}))
            for b, i in enumerate(idx):
                out[i] = self.tok.decode(toks[b].tolist())
            self._add_counts(counts)
            if progress is not None:
                progress.update(len(idx))
        return out

    # -- tasks --

    def evaluate_task(self, task: EvalTask, examples: Sequence[Example] | None = None,
                      progress=None, result: DatasetResult | None = None) -> DatasetResult:
        """Scores one task; skipped examples are counted by reason, never fatal."""
        examples = list(task.load()) if examples is None else list(examples)
        res = result or DatasetResult(task.dataset, task.metric)
        usable = []
        for ex in examples:
            reason = skip_reason(task, ex)
            if reason:
                res.skipped[reason] += 1
                if progress is not None:
                    progress.update(1)
            else:
                usable.append(ex)
        if not usable:
            return res
        t0 = time.perf_counter()
        if task.kind == "rank":
            scores = self.score_choices(usable, progress)
            self._check_finite(task, scores)
            for ex, s in zip(usable, scores):
                pred = rank_prediction(s)
                self._record(res, ex, float(pred in ex.answers),
                             {"prediction": pred, "answers": list(ex.answers),
                              "scores": [round(float(v), 5) for v in s]})
        else:
            try:
                texts = self.generate(usable, task.max_new_tokens, progress)
            except NonFiniteError as e:
                raise EvalError(f"dataset {task.dataset} ({task.name}), method "
                                f"{getattr(self.routed, 'method', 'base')}: {e}; no score "
                                "reported") from None
            for ex, text in zip(usable, texts):
                self._record(res, ex, generation_score(task.metric, text, ex.references),
                             {"prediction": text, "references": list(ex.references)})
        res.seconds += time.perf_counter() - t0
        for site, c in self.last_counts.items():
            res.telemetry[site] = res.telemetry.get(site, 0.0) + c
        return res

    def _check_finite(self, task: EvalTask, scores: Sequence[np.ndarray]) -> None:
        # argmin over NaN picks the first choice: a plausible accuracy out of a broken model.
        flat = np.concatenate(scores)
        if not np.isfinite(flat).all():
            bad = int(flat.size - np.count_nonzero(np.isfinite(flat)))
            method = getattr(self.routed, "method", "base")
            raise EvalError(f"dataset {task.dataset} ({task.name}), method {method}: {bad} of "
                            f"{flat.size} choice scores are NaN or inf (non-finite or overflowing "
                            "weights in the base model or the library, or a dtype too narrow); "
                            "no accuracy reported")

    @staticmethod
    def _record(res: DatasetResult, ex: Example, value: float, extra: dict) -> None:
        res.values.append(value)
        res.templates.setdefault(ex.template, []).append(value)
        res.predictions.append({"dataset": ex.dataset, "template": ex.template,
                                "id": ex.example_id, "value": value, **extra})


def skip_reason(task: EvalTask, ex: Example) -> str | None:
    """Why ``ex`` cannot be scored under ``task`` (counted and reported), or None."""
    if not ex.input or not ex.input.strip():
        return "empty input"
    if task.kind == "rank":
        if not ex.choices:
            return "no answer choices"
        if not ex.answers:
            return "no correct choice"
        if any(not 0 <= a < len(ex.choices) for a in ex.answers):
            return "answer index out of range"
    elif not ex.references:
        return "no reference"
    return None


def load_all(tasks: Sequence[EvalTask]) -> dict[str, list[Example]]:
    """Loads every task before any model work, so a missing or empty one fails fast.

    Raises:
      DataError: a task yields no examples (naming the task and its source).
    """
    loaded = {}
    for task in tasks:
        examples = list(task.load())
        if not examples:
            raise DataError(f"task {task.name}: no examples found in {task.source or 'its source'}"
                            " (missing, empty or filtered out; list the other tasks with --tasks "
                            "to run without it)")
        loaded[task.name] = examples
    return loaded


def evaluate(evaluator: Evaluator, tasks: Sequence[EvalTask], *, progress: bool = True,
             examples: dict[str, list[Example]] | None = None) -> dict[str, DatasetResult]:
    """Runs every task, pooling tasks that share a dataset; returns results by dataset."""
    examples = load_all(tasks) if examples is None else examples
    total = sum(len(v) for v in examples.values())
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, unit="ex", desc="goose-eval", dynamic_ncols=True)
    results: dict[str, DatasetResult] = {}
    try:
        for task in tasks:
            if bar is not None:
                bar.set_postfix_str(task.name)
            prev = results.get(task.dataset)
            if prev is not None and prev.metric != task.metric:
                raise EvalError(f"dataset {task.dataset}: tasks disagree on the metric "
                                f"({prev.metric} and {task.metric})")
            results[task.dataset] = evaluator.evaluate_task(task, examples[task.name], bar, prev)
    finally:
        if bar is not None:
            bar.close()
    return results
