"""Evaluation of decoder-only models: prompt-once rank classification against each choice scored
as its own whole sequence, the Evaluator's generation against per-prompt greedy decoding, and
goose-eval end to end on ``random:llama-tiny``. On the first decoder family only (the Llama
family's tiny preset): every check compiles the model several times; the families' differences
are tested against transformers in tests/test_decoder.py."""

import json

import numpy as np
import pytest
from conftest import tool
from family_cases import FIRST, FIRST_RANDOM_BASE, family_of, logits_of

from goose_jax.core.trees import nest_sites
from goose_jax.data.examples import Example
from goose_jax.data.tokenizers import ByteTokenizer
from goose_jax.evaluation import evaluator as ev
from goose_jax.evaluation.metrics import rank_prediction
from goose_jax.experts.lora import EXPERTS, LoRAAdapter
from goose_jax.routing.methods import ROUTER, RoutedAdapter

TOK = ByteTokenizer()
FAM = family_of(FIRST)
TINY = FAM.preset(FIRST_RANDOM_BASE.removeprefix("random:"))
decoder_logits = logits_of(FIRST)
ROUTED_SITES = ("layers_0/self_attn/q", "layers_0/self_attn/v", "layers_1/mlp/down")


@pytest.fixture(scope="module")
def tiny():
    cfg = TINY.replace(vocab_size=TOK.vocab_size)
    return cfg, FAM.init_params(cfg, 3)


def _adapter(cfg, kind, telemetry=False):
    """(adapter, collections): none, one plain LoRA at every site, or 3 experts routed top-2
    per token at a few sites (router vectors random, B non-zero)."""
    if kind is None:
        return None, {}
    rng = np.random.default_rng(7)
    E, R = (1, 2) if kind == "lora" else (3, 2)
    experts, router = {}, {}
    for site, (d_in, d_out) in FAM.site_shapes(cfg).items():
        if kind == "routed" and site not in ROUTED_SITES:
            continue
        experts[site] = {"lora_a": 0.3 * rng.standard_normal((E, d_in, R), np.float32),
                         "lora_b": 0.3 * rng.standard_normal((E, R, d_out), np.float32)}
        router[site] = {"vectors": rng.standard_normal((E, d_in), np.float32)}
    if kind == "lora":
        return LoRAAdapter(0.5, "sum"), {EXPERTS: nest_sites(experts)}
    return (RoutedAdapter(0.5, top_k=2, telemetry=telemetry),
            {EXPERTS: nest_sites(experts), ROUTER: nest_sites(router)})


WIDTH = 80   # every reference row's length: one compilation per adapter


def _rows(seqs):
    """Each sequence its own row from position 0, right-padded to ``WIDTH`` (causal attention:
    padding after a row's tokens cannot change their logits)."""
    ids, mask = np.zeros((len(seqs), WIDTH), np.int32), np.zeros((len(seqs), WIDTH), np.int32)
    for i, seq in enumerate(seqs):
        ids[i, :len(seq)], mask[i, :len(seq)] = seq, 1
    return ids, mask


def _ref_nlls(cfg, params, pairs, adapter=None, collections=None) -> np.ndarray:
    """Summed NLL of each ``(prompt, choice)``'s choice after its prompt: every pair one whole
    sequence through ``decoder_logits``, no cache, log-softmax in float64."""
    ids, mask = _rows([list(p) + list(c) for p, c in pairs])
    lg = np.asarray(decoder_logits(cfg, params, ids, mask, adapter=adapter,
                                           collections=collections or None), np.float64)
    m = lg.max(-1, keepdims=True)
    logp = lg - m - np.log(np.exp(lg - m).sum(-1, keepdims=True))
    return np.array([-sum(logp[i, len(p) - 1 + t, tok] for t, tok in enumerate(c))
                     for i, (p, c) in enumerate(pairs)])


@pytest.mark.parametrize("kind", [None, "lora", "routed"])
def test_prompt_once_equals_per_choice(tiny, kind):
    """Prompts of different lengths padded on either side, choices of different lengths and
    counts (padded choice rows): prompt-once and per-choice scoring both equal each choice run
    as its own sequence, and choose the same answers."""
    cfg, params = tiny
    adapter, coll = _adapter(cfg, kind, telemetry=kind == "routed")
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 259, n).tolist() for n in (3, 9, 12)]
    choices = [[rng.integers(3, 259, n).tolist() for n in ns]
               for ns in ((1, 4), (2, 5, 3), (4,))]
    B, C, L, T = 3, 4, 16, 8
    ids, mask = np.zeros((B, L), np.int32), np.zeros((B, L), np.int32)
    for b, p in enumerate(prompts):
        start = L - len(p) if b == 1 else 0     # row 1 padded on the left, the others right
        ids[b, start:start + len(p)], mask[b, start:start + len(p)] = p, 1
    tgt, tmask = np.zeros((B, C, T), np.int32), np.zeros((B, C, T), np.int32)
    for b, cs in enumerate(choices):
        for c, ch in enumerate(cs):
            tgt[b, c, :len(ch)], tmask[b, c, :len(ch)] = ch, 1
    variables = {"params": params, **coll}
    sites = ROUTED_SITES if kind == "routed" else ()
    ref_adapter = RoutedAdapter(0.5, top_k=2) if kind == "routed" else adapter
    flat = _ref_nlls(cfg, params, [(p, ch) for p, cs in zip(prompts, choices) for ch in cs],
                     ref_adapter, coll)
    refs = np.split(flat, np.cumsum([len(cs) for cs in choices])[:-1])
    for naive in (False, True):
        nll, counts = FAM.choice_scorer(True)(cfg, adapter, variables, variables, ids, mask,
                                              tgt, tmask, naive=naive, sites=sites)
        nll = np.asarray(nll)
        for b, ref in enumerate(refs):
            np.testing.assert_allclose(nll[b, :len(ref)], ref, atol=1e-5, rtol=0)
            assert not nll[b, len(ref):].any()   # padded choices score nothing
            lengths = np.array([len(ch) for ch in choices[b]])
            assert rank_prediction(nll[b, :len(ref)] / lengths) == rank_prediction(
                np.array(ref) / lengths)
        if kind == "routed" and not naive:
            # Each prompt token once (the last with each of its choices), each fed choice token.
            expected = sum(len(p) - 1 for p in prompts) + tmask.sum()
            assert {s: float(np.sum(counts[s])) for s in sites} == dict.fromkeys(sites, expected)


EXAMPLES = [
    Example("the cat sat on", ("the mat", "a hat", "xyz"), (0,), "d", "t", "0"),
    Example("one two three", ("four", "five six seven"), (1,), "d", "t", "1"),
    Example("q" * 50 + " tail of a long prompt", ("a", "bb", "ccc", "dddd", "e"), (2,), "d",
            "t", "2"),
    Example("x", ("yes", "no"), (0,), "d", "t", "3"),
    Example("hello world, say", ("hi", "bye", "hello again"), (0,), "d", "t", "4"),
]


def test_evaluator_scores_like_each_choice_alone(tiny):
    """Length-normalised scores (EOS scored, prompts truncated from the left) and answers
    equal the whole-sequence reference, prompt-once and naive alike; batches mix examples of
    2, 3 and 5 choices."""
    cfg, params = tiny
    max_in = 32
    ref = [_ref_nlls(cfg, params, [(TOK.encode(ex.input, add_eos=False)[-max_in:],
                                    TOK.encode(c)) for c in ex.choices])
           / [len(TOK.encode(c)) for c in ex.choices] for ex in EXAMPLES]
    for once in (True, False):
        evaluator = ev.Evaluator(cfg, params, TOK, batch_size=2, max_input_length=max_in,
                                 encoder_once=once, fast_compile=True)
        ours = evaluator.score_choices(EXAMPLES)
        for a, r in zip(ours, ref):
            np.testing.assert_allclose(a, r, atol=1e-5, rtol=0)
            assert rank_prediction(a) == rank_prediction(r)


@pytest.mark.parametrize("method", ["phatgoose", "example"])
def test_evaluator_routed(tiny, method):
    """Routed prompt-once scoring through the Evaluator: per token (with telemetry over real
    tokens only), and one expert per example (the prompt's pass reads B example indices, the
    choices' pass B*C), against each choice alone under the same routing."""
    from goose_jax.routing.methods import Routed

    cfg, params = tiny
    examples = EXAMPLES[:4]
    _, coll = _adapter(cfg, "routed")
    chosen = [2, 0, 1, 2]
    if method == "example":
        adapter = RoutedAdapter(0.5, scoring="example")
        routed = Routed("example", adapter, {EXPERTS: coll[EXPERTS]})
        choose = lambda exs: [chosen[EXAMPLES.index(ex)] for ex in exs]  # noqa: E731
    else:
        adapter, choose = RoutedAdapter(0.5, top_k=2), None
        routed = Routed("phatgoose", adapter, coll)
    evaluator = ev.Evaluator(cfg, params, TOK, routed, batch_size=2, telemetry=True,
                             choose_experts=choose, fast_compile=True)
    ours = evaluator.score_choices(examples)
    for i, ex in enumerate(examples):
        pairs = [(TOK.encode(ex.input, add_eos=False), TOK.encode(c)) for c in ex.choices]
        ref_coll = coll
        if method == "example":
            index = np.full((len(pairs),), chosen[i], np.int32)
            ref_coll = {EXPERTS: coll[EXPERTS], ROUTER: nest_sites(
                {s: {"example_index": index} for s in ROUTED_SITES})}
        ref = _ref_nlls(cfg, params, pairs, adapter, ref_coll) / [len(c) for _, c in pairs]
        np.testing.assert_allclose(ours[i], ref, atol=1e-5, rtol=0)
    if method == "phatgoose":
        expected = sum(len(TOK.encode(ex.input, add_eos=False)) - 1 +
                       sum(len(TOK.encode(c)) for c in ex.choices) for ex in examples)
        assert {s: float(np.sum(evaluator.last_counts[s])) for s in ROUTED_SITES} == \
            dict.fromkeys(ROUTED_SITES, expected)


def _greedy(cfg, params, prompts, steps):
    """Greedy decoding without a cache: the whole sequence through ``decoder_logits`` at every
    step, each prompt its own row; tokens up to the tokenizer's EOS."""
    seqs, done = [list(p) for p in prompts], [False] * len(prompts)
    for _ in range(steps):
        ids, mask = _rows(seqs)
        logits = np.asarray(decoder_logits(cfg, params, ids, mask))
        for i, seq in enumerate(seqs):
            if not done[i]:
                seq.append(int(np.argmax(logits[i, len(seq) - 1])))
                done[i] = seq[-1] == TOK.eos_id
    return [seq[len(p):] for seq, p in zip(seqs, prompts)]


def test_evaluator_generation_equals_greedy_decoding(tiny):
    """Batched, padded, cached generation through the Evaluator equals greedy decoding of each
    prompt alone without a cache, and ``generate_decoder_greedy``, stopping at the
    tokenizer's EOS."""
    cfg, params = tiny
    prompts = [TOK.encode(ex.input, add_eos=False) for ex in EXAMPLES]
    ref = _greedy(cfg, params, prompts, 6)
    # A config whose own EOS is a byte the model emits: the text still ends at the tokenizer's.
    model_eos = cfg.replace(eos_token_id=ref[0][0])
    texts = ev.Evaluator(model_eos, params, TOK, batch_size=4, fast_compile=True).generate(
        EXAMPLES, 6)
    assert texts == [TOK.decode(t) for t in ref] and texts[0]
    ids, mask = _rows(prompts)
    toks = FAM.generate(cfg.replace(eos_token_id=TOK.eos_id), params, ids, 6, mask)
    assert texts == [TOK.decode(t) for t in np.asarray(toks).tolist()]


def test_goose_eval_decoder_base(world, tmp_path):
    """goose-eval on random:llama-tiny: the rank task's scores are the whole-sequence reference
    and the generation task's predictions greedy decoding of each prompt alone."""
    from goose_jax.data import tasks as T
    from goose_jax.models.base import load_base

    out = tmp_path / "run"
    names = ["bbh/boolean_expressions", "bbh/object_counting"]
    rc = tool("goose-eval")(["--base", FIRST_RANDOM_BASE, "--byte-tokenizer", "--bbh-root",
                             str(world / "bbh"), "--tasks", ",".join(names), "--out", str(out),
                             "--no-progress", "--batch-size", "4"])
    assert rc == 0
    summary = json.loads((out / "results.json").read_text())
    assert summary["method"] == "base" and set(summary["datasets"]) == set(names)
    preds = {(p["dataset"], p["id"]): p for p in map(
        json.loads, (out / "predictions.jsonl").read_text().splitlines())}
    cfg, params = load_base(FIRST_RANDOM_BASE, min_vocab_size=TOK.vocab_size)
    rank, gen = T.get_tasks(names, [], T.DataRoots(bbh=str(world / "bbh")))
    assert rank.kind == "rank" and gen.kind == "generate"
    for ex in rank.load():
        pred = preds[(rank.dataset, ex.example_id)]
        ref = _ref_nlls(cfg, params, [(TOK.encode(ex.input, add_eos=False), TOK.encode(c))
                                      for c in ex.choices])
        ref = ref / [len(TOK.encode(c)) for c in ex.choices]
        np.testing.assert_allclose(pred["scores"], ref, atol=2e-5, rtol=0)
        assert pred["prediction"] == rank_prediction(ref)
    examples = gen.load()
    texts = [TOK.decode(t) for t in _greedy(cfg, params, [
        TOK.encode(ex.input, add_eos=False) for ex in examples], gen.max_new_tokens)]
    assert [preds[(gen.dataset, ex.example_id)]["prediction"] for ex in examples] == texts


def test_goose_eval_scan_layers_on_a_decoder_base_scores_as_the_unrolled(world, tmp_path):
    """``--scan-layers`` on a Llama base: the layers run as one scanned body, and every
    prediction and score equals the unrolled run's."""
    runs = {}
    for name, flags in (("plain", []), ("scan", ["--scan-layers"])):
        rc = tool("goose-eval")(["--base", FIRST_RANDOM_BASE, "--byte-tokenizer", "--bbh-root",
                                 str(world / "bbh"), "--tasks", "bbh/boolean_expressions",
                                 *flags, "--out", str(tmp_path / name), "--no-progress"])
        assert rc == 0
        with open(tmp_path / name / "predictions.jsonl") as f:
            runs[name] = [json.loads(line) for line in f]
    assert runs["scan"] and len(runs["scan"]) == len(runs["plain"])
    for a, b in zip(runs["scan"], runs["plain"]):
        assert a["prediction"] == b["prediction"] and "scores" in a
        np.testing.assert_allclose(a["scores"], b["scores"], rtol=1e-5, atol=1e-5)


def test_evaluation_starts_prompts_as_training_does(tmp_path):
    """A Llama-style tokenizer whose encoding inserts no BOS by itself: training starts each
    prompt with the BOS (model and tokenizer both have one), and so must evaluation."""
    from test_decoder_checkpoint import _tokenizer_dir

    from goose_jax.data.batching import Batcher
    from goose_jax.evaluation.evaluator import Evaluator
    from goose_jax.models.base import load_tokenizer

    cfg = TINY
    tok = load_tokenizer(_tokenizer_dir(tmp_path / "tok"), cfg)
    assert tok.encode("the goose", add_eos=False)[0] != cfg.bos_token_id
    class Source(list):
        pass

    batch = Batcher(Source([("the goose", "jax")]), tok, micro_batch=1, grad_accum=1,
                    max_input_length=8, max_target_length=4, seed=0, stream=0,
                    vocab_size=cfg.vocab_size, **FAM.batch_encoding(cfg, tok)).batch(0)
    trained = [int(t) for t in batch["inputs"][0, 0][batch["input_mask"][0, 0] == 1]]
    evaluator = Evaluator(cfg, FAM.init_params(cfg, 0), tok, max_input_length=8)
    assert evaluator._encode_input("the goose") == trained
    assert trained[0] == cfg.bos_token_id
