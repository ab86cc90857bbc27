"""Greedy generation's own routing telemetry against a teacher-forced recount."""

import dataclasses
from typing import Any

import numpy as np
import pytest

import goose_jax as gj
from goose_jax.core.trees import flatten_sites, nest_sites
from goose_jax.experts.lora import EXPERTS
from goose_jax.models.t5.model import T5
from goose_jax.routing import formula as routing
from goose_jax.routing.methods import ROUTER, build_routed

E, T = 5, 7


@pytest.fixture(scope="module")
def model():
    """A one-encoder-block, two-decoder-block T5 with PHATGOOSE over E random experts at every
    site (random gates), float32."""
    cfg = gj.T5Config(vocab_size=97, d_model=24, d_kv=8, num_heads=3, d_ff=40,
                      num_encoder_layers=1, num_decoder_layers=2,
                      relative_attention_num_buckets=8, relative_attention_max_distance=20,
                      feed_forward_proj="gated-gelu", tie_word_embeddings=False)
    rng = np.random.default_rng(11)
    experts, gates = {}, {}
    for site, (d_in, d_out) in gj.site_shapes(cfg).items():
        experts[site] = {"lora_a": 0.3 * rng.standard_normal((E, d_in, 4), np.float32),
                         "lora_b": 0.3 * rng.standard_normal((E, 4, d_out), np.float32)}
        gates[site] = {"gate": rng.standard_normal((E, d_in), np.float32)}
    routed = build_routed("phatgoose", cfg, nest_sites(experts), gates=nest_sites(gates),
                          top_k=2, scale=0.25, telemetry=True)
    # Three real rows of different lengths and one row of batch padding (no input token).
    ids = rng.integers(2, cfg.vocab_size, (4, 9)).astype(np.int32)
    mask = np.zeros((4, 9), np.int32)
    for b, n in enumerate((9, 5, 3)):
        mask[b, :n] = 1
    ids *= mask
    return cfg, gj.init_params(cfg, 4), routed, ids, mask


@dataclasses.dataclass(frozen=True)
class _Capture:
    """Runs ``inner`` and sows every routed site's input."""

    inner: Any

    def __call__(self, module, x, y):
        if module.has_variable(EXPERTS, "lora_a"):
            module.sow("intermediates", "x", x)
        return self.inner(module, x, y)


def _recount(cfg, params, routed, ids, mask, toks):
    """Per site, the top-1 counts of a teacher-forced forward over the generated answers: the
    argmax of the PHATGOOSE scores over real input tokens (encoder sites, cross-attention k and
    v) and generated tokens up to and including EOS of real rows (other decoder sites)."""
    B = ids.shape[0]
    real_B = mask.any(axis=1)
    dec_mask = np.zeros_like(toks)
    for b, row in enumerate(toks.tolist()):
        n = row.index(cfg.eos_token_id) + 1 if cfg.eos_token_id in row else len(row)
        dec_mask[b, :n] = real_B[b]
    dec = np.concatenate([np.full((B, 1), cfg.decoder_start_token_id, np.int32), toks[:, :-1]],
                         axis=1)
    _, state = T5(cfg, _Capture(routed.adapter)).apply(
        {"params": params, **routed.collections}, ids, dec, mask, mutable=["intermediates"])
    vectors = flatten_sites(routed.collections[ROUTER])
    out = {}
    for site, leaf in flatten_sites(state["intermediates"]).items():
        (x,) = leaf["x"]
        scores = routing.phatgoose_scores(x, vectors[site]["vectors"], gates_normed=True)
        top1 = np.argmax(np.asarray(scores), axis=-1)
        reads_encoder = site.startswith("encoder/") or site.endswith(("cross_attn/k",
                                                                      "cross_attn/v"))
        keep = (mask if reads_encoder else dec_mask) == 1
        out[site] = np.bincount(top1[keep], minlength=E)
    return out


@pytest.mark.parametrize("fast_compile", [False, True])
def test_generation_counts_the_routing_it_computes(model, fast_compile):
    cfg, params, routed, ids, mask = model
    # As EOS, a token that row 0 generates mid-way: rows then stop at different steps.
    free = np.asarray(gj.generate_greedy(cfg, params, ids, T, mask, routing=routed))
    cfg = cfg.replace(eos_token_id=int(free[0, 2]))
    toks, counts = gj.generate_greedy(cfg, params, ids, T, mask, routing=routed,
                                      fast_compile=fast_compile, telemetry=True)
    toks = np.asarray(toks)
    np.testing.assert_array_equal(toks, np.asarray(
        gj.generate_greedy(cfg, params, ids, T, mask, routing=routed)))
    assert (toks[:3] == cfg.eos_token_id).any(axis=1).sum() >= 1   # an early stop is counted
    ref = _recount(cfg, params, routed, ids, mask, toks)
    assert sorted(counts) == sorted(ref) == sorted(gj.site_shapes(cfg))
    for site in ref:
        np.testing.assert_array_equal(np.asarray(counts[site]), ref[site], err_msg=site)



def test_check_finite_refuses_nan_logits_of_a_real_row(model):
    from goose_jax.core.errors import NonFiniteError

    cfg, params, routed, ids, mask = model
    assert gj.generate_greedy(cfg, params, ids, T, mask, check_finite=True).shape == (4, T)
    # One vocabulary column of the head NaN: every real row's logits are then non-finite.
    head = np.asarray(params["lm_head"]["kernel"]).copy()
    head[:, 5] = np.nan
    bad = {**params, "lm_head": {"kernel": head}}
    with pytest.raises(NonFiniteError, match="3 of 4 rows"):
        gj.generate_greedy(cfg, bad, ids, T, mask, check_finite=True)
    gj.generate_greedy(cfg, bad, ids, T, mask)  # unchecked: no error, as before
    # Batch padding rows are not checked: with only the padding row left, nothing is refused.
    pad_only = np.zeros_like(mask)
    pad_only[0] = mask[0]
    with pytest.raises(NonFiniteError, match="1 of 4 rows"):
        gj.generate_greedy(cfg, bad, ids, T, pad_only, check_finite=True)


def test_evaluator_refuses_a_generation_task_with_nan_logits(model):
    from goose_jax.core.errors import EvalError
    from goose_jax.data.examples import EvalTask, Example
    from goose_jax.data.tokenizers import ByteTokenizer
    from goose_jax.evaluation import evaluator as ev

    cfg, params, _, _, _ = model
    cfg = cfg.replace(vocab_size=ByteTokenizer().vocab_size)
    params = gj.init_params(cfg, 5)
    examples = [Example(f"say {w}", references=(w,), dataset="echo") for w in ("a", "bc")]
    task = EvalTask("toy/echo", "echo", "generate", "exact_match", lambda: examples,
                    max_new_tokens=3)
    evaluator = ev.Evaluator(cfg, params, ByteTokenizer(), batch_size=2, max_input_length=8)
    assert evaluator.evaluate_task(task).score is not None
    head = np.asarray(params["lm_head"]["kernel"]).copy()
    head[0, 7] = np.inf  # inf * 0-free activations: inf or NaN logits
    evaluator = ev.Evaluator(cfg, {**params, "lm_head": {"kernel": head}}, ByteTokenizer(),
                             batch_size=2, max_input_length=8)
    with pytest.raises(EvalError, match=r"dataset echo \(toy/echo\), method base: .*NaN or inf"):
        evaluator.evaluate_task(task)
