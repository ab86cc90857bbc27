"""Rank classification against transformers' PyTorch T5, generation, metrics, aggregation."""

import numpy as np
import pytest
from conftest import build_hf_t5

import goose_jax as gj
from goose_jax.core.errors import DataError
from goose_jax.data.examples import EvalTask, Example
from goose_jax.data.tokenizers import ByteTokenizer
from goose_jax.evaluation import evaluator as ev
from goose_jax.evaluation import metrics, report

TOK = ByteTokenizer()
# One shape bucket for all (B 4, C 4, L 64, T 32): each scorer compiles once.
EXAMPLES = [
    Example("premise: a goose routes tokens. yes or no?", ("yes", "no", "maybe", "never"), (0,),
               dataset="d1", template="t1", example_id="0"),
    Example("short", ("a longer answer choice", "b", "c"), (1, 2), dataset="d1",
               template="t2", example_id="1"),
    Example("which of the two is right? " * 2, ("left", "right", "up", "down"), (1,),
               dataset="d2", example_id="2"),
]
@pytest.fixture(scope="module")
def hf_and_ours():
    from goose_jax.models.t5.hf import hf_state_dict_to_params

    model = build_hf_t5("v1_1", vocab_size=300)
    cfg = gj.T5Config.from_hf_dict(model.config.to_dict()).replace(tie_word_embeddings=False)
    params = hf_state_dict_to_params(cfg, {k: v.numpy() for k, v in model.state_dict().items()})
    return model, cfg, params


def _torch_mean_nll(model, text, choice):
    import torch

    ids = torch.tensor([TOK.encode(text)])
    labels = torch.tensor([TOK.encode(choice)])
    with torch.no_grad():
        return float(model(input_ids=ids, labels=labels).loss)


def test_rank_scores_match_pytorch(hf_and_ours):
    model, cfg, params = hf_and_ours
    evaluator = ev.Evaluator(cfg, params, TOK, batch_size=4)
    ours = evaluator.score_choices(EXAMPLES)
    for ex, scores in zip(EXAMPLES, ours):
        ref = np.array([_torch_mean_nll(model, ex.input, c) for c in ex.choices])
        np.testing.assert_allclose(scores, ref, atol=1e-4, rtol=1e-4)
        assert metrics.rank_prediction(scores) == int(np.argmin(ref))
    summed = ev.Evaluator(cfg, params, TOK, batch_size=4, length_normalize=False)
    for ex, s_mean, s_sum in zip(EXAMPLES, ours, summed.score_choices(EXAMPLES)):
        lengths = np.array([len(TOK.encode(c)) for c in ex.choices])
        np.testing.assert_allclose(s_sum, s_mean * lengths, rtol=1e-5)


def test_encoder_once_equals_naive(hf_and_ours):
    _, cfg, params = hf_and_ours
    once = ev.Evaluator(cfg, params, TOK, batch_size=4).score_choices(EXAMPLES)
    naive = ev.Evaluator(cfg, params, TOK, batch_size=4, encoder_once=False).score_choices(EXAMPLES)
    for a, b in zip(once, naive):
        np.testing.assert_allclose(a, b, atol=1e-5)


ROUTED_SITES = ("encoder/block_0/self_attn/q", "encoder/block_0/ffn/wi_0",
                "decoder/block_0/self_attn/v", "decoder/block_0/cross_attn/k",
                "decoder/block_0/ffn/wo")


@pytest.fixture(scope="module")
def small():
    """A one-block T5 (random weights) for the routed tests: cheap to compile."""
    cfg = gj.T5Config(vocab_size=300, d_model=24, d_kv=8, num_heads=3, d_ff=40,
                      num_encoder_layers=1, num_decoder_layers=1,
                      relative_attention_num_buckets=8, relative_attention_max_distance=20,
                      feed_forward_proj="gated-gelu", tie_word_embeddings=False)
    return cfg, gj.init_params(cfg, 3)


def _routed(cfg, telemetry=False):
    """PHATGOOSE over 5 random experts (non-zero B) with random gates, at a few sites of each
    kind (encoder, decoder, cross-attention k reading encoder tokens) to keep compiles short."""
    from goose_jax.core.trees import nest_sites
    from goose_jax.routing.methods import build_routed

    rng = np.random.default_rng(1)
    experts, gates = {}, {}
    for site, (d_in, d_out) in gj.site_shapes(cfg).items():
        if site not in ROUTED_SITES:
            continue
        experts[site] = {"lora_a": 0.3 * rng.standard_normal((5, d_in, 4), np.float32),
                         "lora_b": 0.3 * rng.standard_normal((5, 4, d_out), np.float32)}
        gates[site] = {"gate": rng.standard_normal((5, d_in), np.float32)}
    return build_routed("phatgoose", cfg, nest_sites(experts), gates=nest_sites(gates), top_k=2,
                        scale=0.25, telemetry=telemetry)


def test_routed_scoring_independent_and_telemetry(small):
    cfg, params = small
    routed = _routed(cfg)
    evaluator = ev.Evaluator(cfg, params, TOK, routed, batch_size=4, telemetry=True)
    ours = evaluator.score_choices(EXAMPLES)
    # Independent path: the full teacher-forced model on every (input, choice) row, padded to
    # one shape (padding after the choice cannot change earlier positions).
    pairs = [(ex.input, c) for ex in EXAMPLES for c in ex.choices]
    ids, mask = TOK.encode_batch([p[0] for p in pairs], 64)
    tgt, tmask = TOK.encode_batch([p[1] for p in pairs], 32)
    dec = np.concatenate([np.zeros_like(tgt[:, :1]), tgt[:, :-1]], axis=1)
    logits = np.asarray(gj.t5_logits(cfg, params, ids, dec, mask, routing=routed), np.float64)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, tgt[..., None], -1)[..., 0]
    ref = (nll * tmask).sum(1) / tmask.sum(1)
    np.testing.assert_allclose(np.concatenate(ours), ref, atol=1e-4)
    # Telemetry counts real tokens only: padding rows, positions and choices are masked out.
    counts = evaluator.last_counts
    n_enc = sum(len(TOK.encode(ex.input)) for ex in EXAMPLES)
    n_cross = sum(len(TOK.encode(ex.input)) * len(ex.choices) for ex in EXAMPLES)
    assert counts["encoder/block_0/self_attn/q"].sum() == n_enc
    assert counts["decoder/block_0/ffn/wo"].sum() == tmask.sum()
    assert counts["decoder/block_0/cross_attn/k"].sum() == n_cross
    assert counts["encoder/block_0/ffn/wi_0"].shape == (5,)


def test_shapes_are_bucketed(small):
    cfg, params = small
    rng = np.random.default_rng(0)
    exs = [Example("x" * int(rng.integers(20, 60)),
                      tuple("c" * int(rng.integers(1, 6)) for _ in range(int(rng.integers(3, 5)))),
                      (0,)) for _ in range(11)]
    evaluator = ev.Evaluator(cfg, params, TOK, batch_size=8)
    evaluator.score_choices(exs)
    assert len(evaluator.compiled_shapes) <= 4, evaluator.compiled_shapes
    assert {s[1] for s in evaluator.compiled_shapes} <= {1, 2, 4, 8}


@pytest.mark.skipif(len(__import__("jax").devices()) < 2, reason="needs several devices "
                    "(XLA_FLAGS=--xla_force_host_platform_device_count=8, as make test sets)")
def test_sharded_batches_match_single_device(small):
    import jax

    from goose_jax.core.sharding import make_mesh

    cfg, params = small
    mesh = make_mesh(data=-1)
    one = ev.Evaluator(cfg, params, TOK, batch_size=4).score_choices(EXAMPLES)
    many = ev.Evaluator(cfg, params, TOK, batch_size=4, mesh=mesh).score_choices(EXAMPLES)
    np.testing.assert_allclose(np.concatenate(one), np.concatenate(many), atol=1e-5)
    assert jax.device_count() > 1


def test_generation_and_telemetry(small):
    cfg, params = small
    routed = _routed(cfg)
    evaluator = ev.Evaluator(cfg, params, TOK, routed, batch_size=4, telemetry=True)
    exs = [Example(t, references=("abc",)) for t in ("copy: abc", "hello there", "third",
                                                          "a fourth one")]
    texts = evaluator.generate(exs, max_new_tokens=6)
    ids, mask = TOK.encode_batch([ex.input for ex in exs], 16)
    toks = np.asarray(gj.generate_greedy(cfg, params, ids, 6, mask, routing=routed))
    assert texts == [TOK.decode(row.tolist()) for row in toks]
    # Decoder sites see one token per generation step, up to and including EOS.
    steps = sum(row.tolist().index(1) + 1 if 1 in row else 6 for row in toks)
    assert evaluator.last_counts["decoder/block_0/self_attn/v"].sum() == steps


def test_metrics_hand_computed():
    assert metrics.exact_match("Paris ", "Paris") == 1.0
    assert metrics.exact_match("paris", "Paris") == 0.0
    assert metrics.exact_match_any("3", ["three", "3"]) == 1.0
    assert metrics.exact_match_any("4", ["three", "3"]) == 0.0
    # LCS("the cat sat on the mat", "the cat was on the mat") = 5 of 6 tokens each side.
    assert metrics.rouge_l("the cat sat on the mat", "the cat was on the mat") == \
        pytest.approx(5 / 6)
    # P = 2/2, R = 2/4: F = 2PR / (P + R) = 2/3; the better of two references counts.
    assert metrics.rouge_l("a b", ["a x b y", "q"]) == pytest.approx(2 / 3)
    assert metrics.rank_prediction(np.array([0.5, 0.2, 0.2])) == 1   # ties: the lowest index
    # first reference only
    assert metrics.generation_score("exact_match", "3", ["three", "3"]) == 0.0
    assert metrics.generation_score("exact_match_any", "3", ["three", "3"]) == 1.0


def _task(name, examples, kind="rank", metric="accuracy", dataset=None):
    return EvalTask(name, dataset or name, kind, metric, lambda: examples, 4, "fixture")


class _FixedScores(ev.Evaluator):
    """Predicts choice 0 always, so aggregation is checked without a model."""

    def __init__(self):
        self.last_counts = {}

    def score_choices(self, examples, progress=None):
        self.last_counts = {}
        return [np.arange(len(ex.choices), dtype=float) for ex in examples]


def test_aggregation_pools_templates_and_counts_skips():
    exs = [Example("q", ("a", "b"), (0,), dataset="rte", template="A", example_id=str(i))
           for i in range(2)]
    exs += [Example("q", ("a", "b"), (0 if i == 0 else 1,), dataset="rte", template="B",
                       example_id=str(i)) for i in range(4)]
    exs += [Example("q", None, (), dataset="rte", template="B"),       # no choices
            Example("q", ("a",), (3,), dataset="rte", template="B"),   # bad label
            Example("  ", ("a",), (0,), dataset="rte", template="B")]  # empty input
    other = [Example("q", ("a", "b"), (1,), dataset="cb"),
             Example("q", ("a", "b", "c"), (2, 0), dataset="cb")]   # several correct
    tasks = [_task("rte", exs), _task("cb", other)]
    results = ev.evaluate(_FixedScores(), tasks, progress=False)
    summary = report.summarize(results, benchmark="t0_heldout")
    rte = summary["datasets"]["rte"]
    assert rte["score"] == pytest.approx(50.0)   # 3 of 6 pooled, not the mean of 100 and 25
    assert rte["templates"]["A"]["score"] == 100.0 and rte["templates"]["B"]["score"] == 25.0
    assert rte["skipped"] == 3 and rte["skip_reasons"] == {
        "no answer choices": 1, "answer index out of range": 1, "empty input": 1}
    assert summary["datasets"]["cb"]["score"] == pytest.approx(50.0)
    assert summary["score"] == pytest.approx(50.0)   # unweighted mean over the two datasets
    table = report.markdown_table(summary)
    assert "| rte | accuracy | 50.0 | 6 | 3 |" in table
    assert "**t0_heldout (mean of 2)** | | **50.0**" in table


def test_empty_task_and_bad_settings():
    with pytest.raises(DataError, match="task empty: no examples found in fixture"):
        ev.load_all([_task("empty", [])])
    with pytest.raises(ev.EvalError, match="metric 'rouge_l' does not fit kind 'rank'"):
        _task("x", [], metric="rouge_l")
    with pytest.raises(ev.EvalError, match="every example needs at least one choice"):
        _FixedScores.__mro__[1].score_choices(_FixedScores(), [Example("q")])
    # A task whose every example is unusable scores nothing and reports why.
    results = ev.evaluate(_FixedScores(), [_task("none", [Example("q")])], progress=False)
    summary = report.summarize(results)
    assert summary["datasets"]["none"]["score"] is None and summary["score"] is None
    assert summary["datasets"]["none"]["skip_reasons"] == {"no answer choices": 1}
    assert "| none | accuracy | n/a | 0 | 1 |" in report.markdown_table(summary)


def test_bucket():
    assert [ev.bucket(n) for n in (1, 2, 3, 5, 8, 9)] == [1, 2, 4, 8, 8, 16]
    assert ev.bucket(3, 8) == 8 and ev.bucket(300, 8, 256) == 300 and ev.bucket(200, 8, 256) == 256
    assert ev.bucket(100, 8, 120) == 120


def test_fixed_shapes_and_fast_compile_change_nothing(small):
    """One compiled shape per method (padding rows, choices and lengths) and XLA's CPU
    optimisations off give the same scores, generations and routing counts."""
    cfg, params = small
    routed = _routed(cfg)
    exs = [Example(t, references=("abc",)) for t in ("copy: abc", "hello there", "third")]
    runs = []
    for fixed in (False, True):
        e = ev.Evaluator(cfg, params, TOK, routed, batch_size=4, telemetry=True,
                         max_input_length=64, max_target_length=32, fixed_shapes=fixed,
                         fast_compile=fixed)
        scores = e.score_choices(EXAMPLES)
        rank_counts = dict(e.last_counts)
        texts = e.generate(exs, max_new_tokens=6)
        runs.append((scores, rank_counts, texts, dict(e.last_counts), set(e.compiled_shapes)))
    (s0, r0, t0, g0, _), (s1, r1, t1, g1, shapes1) = runs
    np.testing.assert_allclose(np.concatenate(s0), np.concatenate(s1), atol=1e-5)
    assert t0 == t1
    for a, b in ((r0, r1), (g0, g1)):
        assert a.keys() == b.keys()
        for site in a:
            np.testing.assert_array_equal(a[site], b[site])
    # One rank and one generation shape, each at the maximum sizes.
    assert shapes1 == {("rank", 4, 4, 64, 32), ("generate", 4, 64, 6)}, shapes1
