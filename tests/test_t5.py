"""The Flax T5 against transformers' PyTorch T5, and the model's own invariants."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import build_hf_t5, needs_8_devices, random_batch

import goose_jax as gj
from goose_jax.core import sharding
from goose_jax.models.t5.model import relative_position_buckets


def _hf_logits(model, ids, mask, dec):
    import torch

    with torch.no_grad():
        return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                     decoder_input_ids=torch.tensor(dec)).logits.numpy()


def test_logits_match_transformers(hf_t5_dir):
    model, path = hf_t5_dir
    cfg, params = gj.load_hf_t5(path)
    ids, mask, dec = random_batch(np.random.default_rng(1), 4, 31, 17, cfg.vocab_size)
    ours = np.asarray(gj.t5_logits(cfg, params, ids, dec, mask))
    ref = _hf_logits(model, ids, mask, dec)
    assert ours.dtype == np.float32 and ours.shape == ref.shape
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)


def test_logits_long_sequences_use_far_buckets():
    # Lengths beyond max_distance exercise the logarithmic buckets and the clamp.
    model = build_hf_t5("v1_1", seed=3)
    from goose_jax.models.t5.hf import hf_state_dict_to_params

    cfg = gj.T5Config.from_hf_dict(model.config.to_dict()).replace(tie_word_embeddings=False)
    params = hf_state_dict_to_params(cfg, {k: v.numpy() for k, v in model.state_dict().items()})
    ids, mask, dec = random_batch(np.random.default_rng(2), 2, 70, 45, cfg.vocab_size)
    np.testing.assert_allclose(np.asarray(gj.t5_logits(cfg, params, ids, dec, mask)),
                               _hf_logits(model, ids, mask, dec), atol=1e-4, rtol=0)


def test_missing_mask_means_all_tokens():
    cfg = gj.T5Config.preset("tiny")
    params = gj.init_params(cfg, 0)
    ids, _, dec = random_batch(np.random.default_rng(0), 2, 9, 5, cfg.vocab_size)
    a = gj.t5_logits(cfg, params, ids, dec)
    b = gj.t5_logits(cfg, params, ids, dec, np.ones_like(ids))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("variant,use_cache", [("v1_1", False), ("v1_0", False),
                                               ("v1_1_equal_depth", True)])
def test_greedy_generation_matches_transformers(variant, use_cache):
    import torch

    # transformers' own cache breaks when decoder and encoder depths differ, so unequal depths
    # are compared against its uncached loop; the equal-depth model against its cached one.
    extra = {"num_decoder_layers": 2} if variant.endswith("equal_depth") else {}
    model = build_hf_t5(variant.replace("_equal_depth", ""), seed=5, **extra)
    from goose_jax.models.t5.hf import hf_state_dict_to_params

    untied = variant != "v1_0"
    cfg = gj.T5Config.from_hf_dict(model.config.to_dict()).replace(tie_word_embeddings=not untied)
    params = hf_state_dict_to_params(cfg, {k: v.numpy() for k, v in model.state_dict().items()})
    ids, mask, _ = random_batch(np.random.default_rng(7), 4, 23, 2, cfg.vocab_size)
    n = 20
    # Pick as EOS a token that greedy decoding produces mid-way in some rows but not others,
    # so that stopping and padding after EOS are exercised.
    free = np.asarray(gj.generate_greedy(cfg, params, ids, n, mask))
    eos = int(free[0, 6])
    cfg = cfg.replace(eos_token_id=eos)
    ours = np.asarray(gj.generate_greedy(cfg, params, ids, n, mask))
    with torch.no_grad():
        ref = model.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                             max_new_tokens=n, do_sample=False, num_beams=1, eos_token_id=eos,
                             pad_token_id=0, use_cache=use_cache).numpy()[:, 1:]
    ref = np.pad(ref, ((0, 0), (0, n - ref.shape[1])))
    np.testing.assert_array_equal(ours, ref)
    assert (ours == eos).any(), "the chosen EOS never ended a row; the test lost its point"
    for row in ours:
        hits = np.flatnonzero(row == eos)
        if hits.size:
            assert (row[hits[0] + 1:] == 0).all()


def test_relative_position_buckets_match_transformers():
    import torch
    from transformers.models.t5.modeling_t5 import T5Attention

    for q_len, k_len in [(1, 1), (7, 300), (300, 5), (130, 130)]:
        rel = torch.arange(k_len)[None, :] - torch.arange(q_len)[:, None]
        for bidirectional in (True, False):
            for nb, md in [(32, 128), (8, 20), (12, 50)]:
                ref = T5Attention._relative_position_bucket(
                    rel, bidirectional=bidirectional, num_buckets=nb, max_distance=md).numpy()
                ours = relative_position_buckets(q_len, k_len, bidirectional, nb, md)
                np.testing.assert_array_equal(ours, ref)


def test_sites_are_named_and_counted():
    sites = gj.site_shapes(gj.T5Config.preset("t5-xl-lm-adapt"))
    assert len(sites) == 24 * 7 + 24 * 11 == 432  # the paper's count
    assert sites["encoder/block_3/self_attn/q"] == (2048, 2048)
    assert sites["decoder/block_0/cross_attn/k"] == (2048, 2048)
    assert sites["decoder/block_23/ffn/wo"] == (5120, 2048)
    v10 = gj.site_shapes(gj.T5Config.preset("t5-small"))
    assert "encoder/block_0/ffn/wi" in v10 and "encoder/block_0/ffn/wi_0" not in v10


class _DeltaAdapter:
    """Adds ``x @ delta`` at sites that have a ``delta`` variable: the seam experts will use."""

    def __hash__(self):
        return 0

    def __eq__(self, other):
        return isinstance(other, _DeltaAdapter)

    def __call__(self, module, x, y):
        if module.has_variable("delta", "w"):
            return y + x @ module.get_variable("delta", "w")
        return y


def test_adapter_seam_equals_editing_the_weight():
    cfg = gj.T5Config.preset("tiny")
    params = gj.init_params(cfg, 0)
    rng = np.random.default_rng(0)
    edits = {"encoder/block_1/ffn/wo": (40, 24), "decoder/block_2/cross_attn/v": (24, 24),
             "decoder/block_0/self_attn/q": (24, 24)}
    delta, edited = {}, jax.tree_util.tree_map(np.array, params)
    for site, shape in edits.items():
        w = rng.normal(size=shape).astype(np.float32) * 0.3
        node, target = delta, edited
        for part in site.split("/"):
            node = node.setdefault(part, {})
            target = target[part]
        node["w"] = w
        target["kernel"] += w
    ids, mask, dec = random_batch(rng, 3, 11, 6, cfg.vocab_size)
    via_adapter = gj.t5_logits(cfg, params, ids, dec, mask, adapter=_DeltaAdapter(),
                               collections={"delta": delta})
    via_weights = gj.t5_logits(cfg, edited, ids, dec, mask)
    base = gj.t5_logits(cfg, params, ids, dec, mask)
    np.testing.assert_allclose(np.asarray(via_adapter), np.asarray(via_weights), atol=2e-5)
    assert np.abs(np.asarray(via_adapter) - np.asarray(base)).max() > 1e-2
    gen_a = gj.generate_greedy(cfg, params, ids, 8, mask, adapter=_DeltaAdapter(),
                               collections={"delta": delta})
    np.testing.assert_array_equal(np.asarray(gen_a),
                                  np.asarray(gj.generate_greedy(cfg, edited, ids, 8, mask)))


@needs_8_devices
def test_sharded_forward_equals_single_device():
    cfg = gj.T5Config.preset("tiny").replace(d_model=32, num_heads=4, d_kv=8, d_ff=48,
                                             vocab_size=128)
    params = gj.init_params(cfg, 1)
    ids, mask, dec = random_batch(np.random.default_rng(3), 8, 13, 9, cfg.vocab_size)
    single = np.asarray(gj.t5_logits(cfg, params, ids, dec, mask))
    mesh = sharding.make_mesh(data=2, model=4)
    sharded = sharding.shard_params(params, gj.param_logical_axes(cfg), mesh)
    kernel = sharded["decoder"]["block_0"]["ffn"]["wi_0"]["kernel"]
    assert len({str(s.index) for s in kernel.addressable_shards}) == 4  # really split over 'model'
    put = lambda a: jax.device_put(jnp.asarray(a), sharding.batch_sharding(mesh))  # noqa: E731
    out = gj.t5_logits(cfg, sharded, put(ids), put(dec), put(mask))
    np.testing.assert_allclose(np.asarray(out), single, atol=1e-5, rtol=0)
    gen = gj.generate_greedy(cfg, sharded, put(ids), 6, put(mask))
    np.testing.assert_array_equal(np.asarray(gen),
                                  np.asarray(gj.generate_greedy(cfg, params, ids, 6, mask)))


def test_bfloat16_policy_runs_and_stays_close():
    cfg = gj.T5Config.preset("tiny")
    params = gj.init_params(cfg, 0)
    bf_cfg = cfg.with_dtypes("bfloat16", "bfloat16")
    bf_params = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), params)
    ids, mask, dec = random_batch(np.random.default_rng(0), 2, 9, 5, cfg.vocab_size)
    out = gj.t5_logits(bf_cfg, bf_params, ids, dec, mask)
    assert out.dtype == jnp.float32  # logits are float32 whatever the compute dtype
    ref = np.asarray(gj.t5_logits(cfg, params, ids, dec, mask))
    assert np.abs(np.asarray(out) - ref).max() < 0.05 * np.abs(ref).max()


def test_init_params_has_t5_scales():
    # transformers' T5 initialises q with std (d_model * d_kv) ** -0.5 and every other kernel
    # with fan_in ** -0.5; Flax's own init (T5(cfg).init) draws from the same rule.
    cfg = gj.T5Config.preset("tiny").replace(d_model=64, d_kv=32, num_heads=2, d_ff=96)
    params = gj.init_params(cfg, 0)
    attn = params["encoder"]["block_0"]["self_attn"]
    ffn = params["encoder"]["block_0"]["ffn"]
    want = {"q": (64 * 32) ** -0.5, "k": 64**-0.5, "v": 64**-0.5, "o": 64**-0.5}
    for name, std in want.items():
        np.testing.assert_allclose(np.std(np.asarray(attn[name]["kernel"])), std, rtol=0.1)
    np.testing.assert_allclose(np.std(np.asarray(ffn["wo"]["kernel"])), 96**-0.5, rtol=0.1)
    assert np.all(np.asarray(params["encoder"]["final_norm"]["scale"]) == 1)
    flax_init = jax.jit(gj.T5(cfg).init)(jax.random.key(0), *(jnp.ones((1, 4), jnp.int32),) * 3)
    flax_q = np.asarray(flax_init["params"]["encoder"]["block_0"]["self_attn"]["q"]["kernel"].value)
    np.testing.assert_allclose(np.std(flax_q), want["q"], rtol=0.1)
    same = jax.tree.map(lambda a, b: np.array_equal(a, b), params, gj.init_params(cfg, 0))
    assert all(jax.tree.leaves(same))  # a seed gives the same base every time


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="feed_forward_proj"):
        gj.T5Config(feed_forward_proj="gated-gelu-x")
    with pytest.raises(ValueError, match="d_model"):
        gj.T5Config(d_model=0)
    with pytest.raises(ValueError, match="compute_dtype"):
        gj.DTypePolicy(compute_dtype="float16")
    with pytest.raises(ValueError, match="not a T5"):
        gj.T5Config.from_hf_dict({"model_type": "bert", "vocab_size": 3})


def test_import_is_light():
    modules = ("goose_jax", "goose_jax.models.t5.hf", "goose_jax.interop.peft",
               "goose_jax.interop.release", "goose_jax.data.tokenizers", "goose_jax.data.tasks",
               "goose_jax.experts.lora", "goose_jax.routing.formula", "goose_jax.routing.methods",
               "goose_jax.library.store", "goose_jax.training.program",
               "goose_jax.evaluation.evaluator", "goose_jax.models.checkpoint")
    code = (f"import sys, {', '.join(modules)}; "
            "bad = [m for m in ('tensorflow', 'torch') if m in sys.modules]; "
            "print(','.join(bad)); sys.exit(1 if bad else 0)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, f"import goose_jax pulled in: {res.stdout} {res.stderr[-500:]}"


@pytest.mark.parametrize("steps", [1, 2])
@pytest.mark.parametrize("Q,bias_shape", [(5, (4, 3, 5, 7)), (5, (1, 3, 5, 7)),
                                          (5, (4, 1, 1, 7)), (1, (1, 3, 1, 7))])
def test_attention_core_equals_a_loop_over_batch_and_heads(Q, bias_shape, steps, monkeypatch):
    # `attend` (heads-first layout; on CPU a few batch rows a step, here forced to 2 steps)
    # against softmax(q k^T + bias) v, one (b, h) at a time.
    from goose_jax.models import attention

    rng = np.random.default_rng(0)
    B, S, H, K = 4, 7, 3, 4
    if steps == 2:
        monkeypatch.setattr(attention, "CPU_SCORES_PER_HEAD", 2 * Q * S)
        assert attention.attention_rows(B, Q, S) == 2
    q, k, v = (rng.standard_normal(s, np.float32) for s in ((B, Q, H, K), (B, S, H, K),
                                                             (B, S, H, K)))
    bias = rng.standard_normal(bias_shape, np.float32)
    ours = np.asarray(attention.attend(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v),
                              jnp.asarray(bias), jnp.float32))
    ref = np.zeros((B, Q, H, K), np.float64)
    for b in range(B):
        for h in range(H):
            s = q[b, :, h].astype(np.float64) @ k[b, :, h].T + bias[
                b % bias.shape[0], h % bias.shape[1]]
            p = np.exp(s - s.max(-1, keepdims=True))
            ref[b, :, h] = (p / p.sum(-1, keepdims=True)) @ v[b, :, h]
    np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)


def test_forward_in_row_steps_equals_whole_batch(monkeypatch):
    # The whole model with every attention layer forced to one batch row a step (the CPU path
    # of long sequences) against the whole batch at once: padding, causal and cross biases.
    from goose_jax.models import attention
    from goose_jax.models.t5 import model as t5

    cfg = gj.T5Config.preset("tiny")
    params = gj.init_params(cfg, 0)
    ids, mask, dec = random_batch(np.random.default_rng(4), 3, 12, 9, cfg.vocab_size)
    model = t5.T5(cfg)
    whole = np.asarray(model.apply({"params": params}, ids, dec, mask))
    monkeypatch.setattr(attention, "CPU_SCORES_PER_HEAD", 1)
    assert attention.attention_rows(3, 12, 12) == 1
    steps = np.asarray(model.apply({"params": params}, ids, dec, mask))
    np.testing.assert_allclose(steps, whole, atol=1e-5, rtol=0)
