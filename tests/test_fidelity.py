"""The README's Fidelity table, row by row: every row marked "same" is checked here against a
plain-Python or NumPy transcription of the original release's rule (r-three/phatgoose at
4fd5790; the file and line each transcription follows are named in it). One test per row, named
after the row; the transcriptions are written from the release's description, not from
goose-jax's code, so either one being wrong fails the test."""

import collections
import importlib.util
import math
import pathlib
import re
import string
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from goose_jax.data import bigbench
from goose_jax.evaluation import release_validation
from goose_jax.routing import formula as routing
from goose_jax.routing import retrieval
from goose_jax.routing.methods import _pool
from goose_jax.training import program as training

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _module(path, name):
    spec = importlib.util.spec_from_file_location(name, ROOT / path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module   # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _configs():
    return [_module("configs/t0_heldin.py", "fid_t0").get_config(),
            _module("configs/flan.py", "fid_flan").get_config()]


# --- transcriptions of the release's metrics ------------------------------------------------------


def _rouge_tokens(text):
    # rouge-score's default tokenizer: lower case, runs of non [a-z0-9] are separators.
    return [t for t in re.split(r"[^a-z0-9]+", text.lower()) if t]


def _lcs(a, b):
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            table[i][j] = (table[i - 1][j - 1] + 1 if a[i - 1] == b[j - 1]
                           else max(table[i - 1][j], table[i][j - 1]))
    return table[-1][-1]


def _rouge_l(pred, ref):
    p, r = _rouge_tokens(pred), _rouge_tokens(ref)
    hit = _lcs(p, r)
    if not hit:
        return 0.0
    prec, rec = hit / len(p), hit / len(r)
    return 2 * prec * rec / (prec + rec)


def _squad_norm(text):
    # SQuAD v1.1's normalize_answer: lower, drop punctuation, drop articles, fix whitespace.
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    return " ".join(w for w in text.split() if w not in ("a", "an", "the"))


def _squad(preds, refs):
    em = f1 = 0.0
    for p, rs in zip(preds, refs):
        em += max(float(_squad_norm(p) == _squad_norm(r)) for r in rs)
        best = 0.0
        for r in rs:
            pt, rt = _squad_norm(p).split(), _squad_norm(r).split()
            common = sum((collections.Counter(pt) & collections.Counter(rt)).values())
            if common:
                best = max(best, 2 * common / (len(pt) + len(rt)))
        f1 += best
    return em / len(preds), f1 / len(preds)


_SYMBOLS = set("{|}~[\\]^_` !\"#$%&()*+:;<=>?@/")


def _words_13a(text):
    # sacrebleu's 13a, as evaluate's bleu runs it (tokenizer_13a.py): symbols split off; . and ,
    # split off except between digits; - split off after a digit.
    text = " " + text.replace("<skipped>", "").replace("-\n", "").replace("\n", " ") + " "
    for a, b in (("&quot;", '"'), ("&amp;", "&"), ("&lt;", "<"), ("&gt;", ">")):
        text = text.replace(a, b)
    text = "".join(f" {c} " if c in _SYMBOLS else c for c in text)
    text = re.sub(r"([^0-9])([.,])", r"\1 \2 ", text)
    text = re.sub(r"([.,])([^0-9])", r" \1 \2", text)
    text = re.sub(r"([0-9])(-)", r"\1 \2 ", text)
    return text.split()


def _bleu(preds, refs, order=4):
    # tensorflow/nmt compute_bleu (evaluate's bleu): clipped counts pooled over the corpus,
    # no smoothing, brevity penalty against the shortest reference.
    hits, totals, c, r = [0] * order, [0] * order, 0, 0
    for p, rs in zip(preds, refs):
        pw, rws = _words_13a(p), [_words_13a(x) for x in rs]
        c += len(pw)
        r += min(len(x) for x in rws)
        for n in range(1, order + 1):
            pc = collections.Counter(tuple(pw[i:i + n]) for i in range(len(pw) - n + 1))
            best = {}
            for rw in rws:
                for g, k in collections.Counter(tuple(rw[i:i + n])
                                                for i in range(len(rw) - n + 1)).items():
                    best[g] = max(best.get(g, 0), k)
            hits[n - 1] += sum(min(k, best.get(g, 0)) for g, k in pc.items())
            totals[n - 1] += max(0, len(pw) - n + 1)
    precisions = [h / t if t else 0.0 for h, t in zip(hits, totals)]
    if min(precisions) <= 0:
        return 0.0
    bp = 1.0 if c > r else math.exp(1 - 1 / (c / r))
    return bp * math.exp(sum(math.log(p) for p in precisions) / order)


def release_score(metric, predictions, references):
    """One dataset's score as the release's Scorer.get_score and Evaluator.run compute it
    (src/data/metrics.py:235-295, src/procedures/evaluator.py:90-95): each metric value
    rounded with "%.3f", then their mean."""
    def r3(v):
        return float("%.3f" % v)   # noqa: UP031  (the release's own expression)

    if metric == "accuracy":
        values = [sum(predictions) / len(predictions)]
    elif metric == "squad":
        values = list(_squad(predictions, references))
    elif metric == "bleu_rouge":
        values = [_bleu(predictions, references),
                  np.mean([max(_rouge_l(p, x) for x in rs)
                           for p, rs in zip(predictions, references)])]
    elif metric == "rouge_l":
        values = [np.mean([max(_rouge_l(p, x) for x in rs)
                           for p, rs in zip(predictions, references)])]
    else:
        raise ValueError(metric)
    values = [r3(v) for v in values]
    return sum(values) / len(values)


# --- the rows -------------------------------------------------------------------------------------


def test_base_model():
    # colm/models/t5xl/t5.gin: hf_torch_model.model_name_or_path = "google/t5-xl-lm-adapt".
    assert {c.base_model for c in _configs()} == {"google/t5-xl-lm-adapt"}


def test_lora_sites_rank_scale():
    # colm/models/moe_lora_rank16.gin: modules ".*SelfAttention|.*EncDecAttention|
    # .*DenseReluDense", layers "q|k|v|o|w.*" (wi_0, wi_1, wo), d_bottleneck 16, scale 1/16,
    # init_scale 0.01 (lora_linear.py).
    from goose_jax.experts.lora import select_sites
    from goose_jax.models.t5.config import T5Config

    cfg = T5Config(vocab_size=101, d_model=24, d_kv=4, d_ff=32, num_heads=2,
                   num_encoder_layers=2, num_decoder_layers=3, feed_forward_proj="gated-gelu")
    for tcfg in _configs():
        sites = select_sites(cfg, tcfg.lora)
        assert len([s for s in sites if s.startswith("encoder/")]) == 7 * 2
        assert len([s for s in sites if s.startswith("decoder/")]) == 11 * 3
        assert (tcfg.lora.rank, tcfg.lora.lora_scale, tcfg.lora_init_std) == (16, 1 / 16, 0.01)


def test_expert_optimiser():
    # colm/experiments/train.gin: AdamW lr 5e-3, weight decay 0, eps 1e-8, constant_with_warmup
    # warmup_ratio 0.06, gradient clipping 1.0; train_single_task_loralinear.gin: 1000 steps;
    # README: effective batch 1024.
    for c in _configs():
        assert (c.lr, c.weight_decay, c.eps, c.b1, c.b2, c.warmup_ratio, c.clip, c.steps) == (
            5e-3, 0.0, 1e-8, 0.9, 0.999, 0.06, 1.0, 1000)
        assert c.effective_batch == 1024
    # HF constant_with_warmup: lambda(s) = s / W below W, else 1, with W = int(0.06 * 1000);
    # goose-jax's update c uses lambda(c + 1) (the first-step row).
    warmup = int(0.06 * 1000)
    sched = training.warmup_constant(5e-3, warmup)
    for count in range(0, 120, 7):
        s = count + 1
        want = 5e-3 * (s / max(1, warmup) if s < warmup else 1.0)
        assert float(sched(count)) == pytest.approx(want, rel=1e-6)


def test_validation_steps_and_ties():
    # train.gin: validation every 100 steps and at step 0 (procedure_exec_order starts with
    # P/EVALUATE); evaluator.py:122-136 keeps a step whose average_score >= the best (later ties
    # win), the scores rounded to 3 decimals first (metrics.py:292-293).
    from goose_jax.evaluation.validation import BestKeeper

    for c in _configs():
        assert c.eval_every == 100 and c.validation_rules == "release"
    # Rounded, the first three tie at 0.412 and the third step wins; unrounded, the second.
    raw = [0.4124, 0.41249, 0.4121, 0.40]
    seq = iter(raw)
    # One value per step through the validation score's own rounding.
    keeper = BestKeeper(lambda t: np.array([100 * release_validation.dataset_score(
        "accuracy", [next(seq)], [])]))
    tree = {"w": jnp.zeros((1, 2))}
    best, best_step = None, None
    for step, v in zip((0, 100, 200, 300), raw):
        keeper.update(step, jax.tree.map(lambda x, s=step: x + s, tree))
        rounded = float("%.3f" % v)   # noqa: UP031  (the release's own expression)
        if best is None or rounded >= best:
            best, best_step = rounded, step
    assert keeper.step == [best_step] == [200]
    assert float(keeper.trainable["w"][0, 0]) == 200


SAMPLES = {
    "preds": ["The cat sat on the mat.", "a dog, barking loudly", "", "42 is the answer",
              "Paris, France"],
    "refs": [["the cat is on the mat"], ["A dog barked loudly.", "dog barking"], ["nothing"],
             ["The answer: 42"], ["Paris"]],
}


@pytest.mark.parametrize("metric", ["squad", "bleu_rouge", "rouge_l", "accuracy"])
def test_validation_metric(metric):
    # p3_t5xl.gin: squad (ropes, adversarialqa, duorc, quoref), bleu + rouge (wiki_bio, cnn,
    # common_gen, gigaword, multi_news, xsum), rouge (samsum, hotpotqa's "blue" typo, FLAN).
    preds, refs = SAMPLES["preds"], SAMPLES["refs"]
    if metric == "accuracy":
        preds, refs = [1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 0.0], []
    got = release_validation.dataset_score(metric, preds, refs)
    assert got == pytest.approx(release_score(metric, preds, refs), abs=1e-12)
    if metric != "accuracy":
        assert 0 < got < 1
    # Unrounded, the metric alone (BLEU over a longer corpus, where every n-gram order hits).
    long_p = ["the quick brown fox jumps over the lazy dog today", "one two three four five"]
    long_r = [["the quick brown fox jumped over the lazy dog"], ["one two three four five six"]]
    from goose_jax.evaluation.metrics import corpus_bleu
    assert corpus_bleu(long_p, long_r) == pytest.approx(_bleu(long_p, long_r), abs=1e-12)
    assert 0 < _bleu(long_p, long_r) < 1


def test_validation_generation_length():
    # interface_mixin.py:254-259: generate(max_length=max_gen_length) on an encoder-decoder
    # counts the decoder start token: at most max_gen_length - 1 new tokens.
    for scope, length in (("P3ROPES", 16), ("P3XSUM", 256), ("P3SAMSUM", 128),
                          ("NIV2PAPERREVIEW", 2), ("FLAN2021DROP", 512)):
        rule = release_validation.RULES[scope]
        assert (rule.max_gen_length, rule.max_new_tokens) == (length, length - 1)


def test_gate_training():
    # train_gate.sh: 100 steps; moe.py FFNExperts: expert_input_gate = zeros(d_in); warmup
    # int(0.06 * 100) = 6.
    from goose_jax.experts.lora import init_gates

    for c in _configs():
        assert c.gate_steps == 100 and int(c.warmup_ratio * c.gate_steps) == 6
    experts = {"s": {"lora_a": jnp.ones((2, 5, 3)), "lora_b": jnp.ones((2, 3, 4))}}
    gates = init_gates(experts)
    assert all(not np.any(np.asarray(g)) for g in jax.tree.leaves(gates))


def test_routing_formula():
    # moe.py Router._forward (score_type "original", layer_norm, scaling_scores) and
    # FFNExperts._forward (topk 2, normalize_topk with + 1e-6).
    rng = np.random.default_rng(0)
    d, E = 24, 5
    x = rng.normal(size=(7, d)).astype(np.float32)
    g = (rng.normal(size=(E, d)) * 0.01).astype(np.float32)

    def ln(v):
        mu = v.mean(-1, keepdims=True)
        return (v - mu) / np.sqrt(((v - mu) ** 2).mean(-1, keepdims=True) + 1e-5)

    s = ln(x.astype(np.float64)) @ ln(g.astype(np.float64)).T * math.sqrt(1 / d)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    top = np.argsort(-p, axis=-1, kind="stable")[:, :2]
    w = np.take_along_axis(p, top, -1)
    w /= w.sum(-1, keepdims=True) + 1e-6
    weights, index = routing.phatgoose_route(jnp.asarray(x), jnp.asarray(g), 2)
    np.testing.assert_array_equal(np.asarray(index), top)
    np.testing.assert_allclose(np.asarray(weights), w, atol=2e-6)


def test_average_activation_pooling():
    # PrepareMask (mask / its sum), ExposeHidden's masked mean per example, then
    # SaveAveragedHiddens: the sum of the examples' vectors over the example count.
    rng = np.random.default_rng(1)
    x = rng.normal(size=(3, 6, 4))
    mask = np.array([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1], [1, 0, 0, 0, 0, 0]], float)
    per_example = [(x[b] * mask[b][:, None]).sum(0) / mask[b].sum() for b in range(3)]
    num, den = _pool(jnp.asarray(np.einsum("bs,bsi->bi", mask, x), jnp.float32),
                     jnp.asarray(mask.sum(1), jnp.float32), "example")
    np.testing.assert_allclose(np.asarray(num) / float(den), np.mean(per_example, 0), atol=1e-6)


def test_arrow_temperature():
    # moe.py Router "arrow": |x . u| / temperature (10), times sqrt(1 / d_in) (scaling_scores).
    rng = np.random.default_rng(2)
    x, u = rng.normal(size=(4, 24)), rng.normal(size=(3, 24))
    want = np.abs(x @ u.T) / 10 * math.sqrt(1 / 24)
    got = routing.arrow_scores(jnp.asarray(x, jnp.float32), jnp.asarray(u, jnp.float32),
                               temperature="release")
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)


def test_retrieval():
    # addons/retriever.py:36-43: "Answer Choices: {', '.join(choices)}, Instance: {input}",
    # "None" without choices; moe.py Router (is_retriever): L2-normalise, cosine, max over each
    # expert's rows, argmax over experts.
    assert retrieval.format_query("Q?", ["yes", "no"]) == "Answer Choices: yes, no, Instance: Q?"
    assert retrieval.format_query("Q?", None) == "Answer Choices: None, Instance: Q?"
    rng = np.random.default_rng(3)
    rows = rng.normal(size=(9, 8)).astype(np.float32)
    owner = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2], np.int32)
    unit = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    index = retrieval.RetrievalIndex(("a", "b", "c"), unit, owner)
    q = rng.normal(size=(6, 8)).astype(np.float32)
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    best = [[max(float(qn[i] @ unit[j]) for j in range(9) if owner[j] == e) for e in range(3)]
            for i in range(6)]
    np.testing.assert_array_equal(index.route(q), np.argmax(best, axis=1))


def test_t0_heldout_score():
    # Pooled over (example, template) pairs (no round robin; eval.gin HELDOUT datasets), which
    # is the mean of every pair's 0/1, whatever the templates' sizes.
    from goose_jax.evaluation.evaluator import DatasetResult

    pairs = {"t1": [1, 0, 1], "t2": [0, 0], "t3": [1]}
    res = DatasetResult("rte", "accuracy", values=[v for vs in pairs.values() for v in vs])
    assert res.score == pytest.approx(100 * 3 / 6)


# colm/experiments/eval.gin: P/EVALUATE/BBH and P/EVALUATE/BBLITE dataset lists.
RELEASE_BBH = ("boolean_expressions causal_judgment date_understanding disambiguation_qa "
               "formal_fallacies geometric_shapes hyperbaton logical_deduction "
               "movie_recommendation multistep_arithmetic_two navigate object_counting "
               "penguins_in_a_table reasoning_about_colored_objects ruin_names "
               "salient_translation_error_detection snarks sports_understanding "
               "temporal_sequences tracking_shuffled_objects web_of_lies word_sorting").split()
RELEASE_BBL = ("bbq_lite_json conceptual_combinations conlang_translation "
               "formal_fallacies_syllogisms_negation hindu_knowledge known_unknowns "
               "linguistics_puzzles logic_grid_puzzle logical_deduction novel_concepts operators "
               "play_dialog_same_or_different repeat_copy_logic strange_stories strategyqa "
               "vitaminc_fact_verification winowhy").split()


def test_big_bench_tasks_and_prompt(tmp_path):
    # src/data/bigbench.py:38-40: input = inputs + "\nAnswer:".
    import json

    assert list(bigbench.BBH_TASKS) == RELEASE_BBH and list(bigbench.BBL_TASKS) == RELEASE_BBL
    (tmp_path / "winowhy").mkdir()
    row = {"inputs": "Why?", "targets": ["a"], "multiple_choice_targets": ["a", "b"],
           "multiple_choice_scores": [1, 0]}
    (tmp_path / "winowhy" / "train.jsonl").write_text(json.dumps(row) + "\n")
    (ex,) = bigbench.examples(str(tmp_path), "winowhy")
    assert ex.input == "Why?" + "\nAnswer:"


def test_big_bench_references(tmp_path):
    # src/data/bigbench.py:30-37: exact_match / rouge score against targets[0];
    # exact_match_multiple_ans against every target.
    import json

    for task, targets in (("operators", ["4", "four"]), ("conlang_translation", ["ab c", "ab"]),
                          ("object_counting", ["3", "three"])):
        (tmp_path / task).mkdir()
        (tmp_path / task / "train.jsonl").write_text(json.dumps(
            {"inputs": "q", "targets": targets, "multiple_choice_targets": [],
             "multiple_choice_scores": []}) + "\n")
        (ex,) = bigbench.examples(str(tmp_path), task)
        want = targets if bigbench.task_kind(task)[1] == "exact_match_any" else targets[:1]
        assert list(ex.references) == want


def test_evaluation_generation_length():
    # colm/datasets/bigbench.gin max_gen_length, less the start token HF generate counts.
    gin = {"multistep_arithmetic_two": 8, "word_sorting": 128, "object_counting": 8,
           "linguistics_puzzles": 128, "operators": 4, "repeat_copy_logic": 64,
           "conlang_translation": 64}
    for task, length in gin.items():
        assert bigbench.task_kind(task)[2] == length - 1


def test_rank_classification():
    # interface_mixin.py multiple_choice_by_perplexity: each choice (EOS appended) teacher
    # forced, NLL summed over its tokens / its token count; the lowest wins.
    import goose_jax as gj
    from goose_jax.data.examples import Example
    from goose_jax.evaluation.evaluator import Evaluator
    from goose_jax.pipeline.train_runs import load_train_base, load_train_config

    tcfg = load_train_config(str(ROOT / "configs" / "tiny.py"))
    cfg, params, tok = load_train_base("random:tiny", tcfg)
    ex = Example("pick one", ("yes", "no way", "x"), (0,))
    (scores,) = Evaluator(cfg, params, tok, None, batch_size=2, max_input_length=24,
                          max_target_length=8, fast_compile=True).score_choices([ex])
    from goose_jax.models.config import FAST_COMPILE_OPTIONS

    fwd = jax.jit(lambda p, i, d, m: gj.t5_logits(cfg, p, i, d, m),
                  compiler_options=FAST_COMPILE_OPTIONS)
    ids = tok.encode(ex.input, add_eos=True)
    want = []
    for c in ex.choices:   # one padded decoder shape (the decoder is causal): one compile
        tgt = tok.encode(c, add_eos=True)
        dec = np.zeros((1, 8), np.int32)
        dec[0, :len(tgt)] = [cfg.decoder_start_token_id] + tgt[:-1]
        logits = np.asarray(fwd(params, np.array([ids], np.int32), dec,
                                np.ones((1, len(ids)), np.int32)), np.float64)[0]
        logits -= logits.max(-1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        want.append(-sum(logp[t, k] for t, k in enumerate(tgt)) / len(tgt))
    np.testing.assert_allclose(scores, want, rtol=1e-4)


def test_evaluation_precision():
    # colm/experiments/eval.gin Model.trainable_params = "none" with t5.gin mix_precision "bf16":
    # every weight and activation in bf16 at evaluation.
    setting = _module("train/paper_setting.py", "fid_paper_setting")
    assert setting.EVAL_DTYPE == "bfloat16"


def test_every_same_row_has_its_test():
    """The README's table and this file agree: each row marked "same" names a test here."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    table = text[text.index("## Fidelity"):text.index("## Benchmarks")]
    rows = [line.split(" | ") for line in table.splitlines() if line.startswith("| ")][1:]
    same = [r[0].strip("| ") for r in rows if r[-1].strip("| ").startswith("same")]
    assert len(same) >= 15
    tests = {n for n in globals() if n.startswith("test_")}
    for row in same:
        name = "test_" + re.sub(r"[^a-z0-9]+", "_", row.lower()).strip("_")
        assert name in tests, f"Fidelity row {row!r} is marked same but has no {name}"
