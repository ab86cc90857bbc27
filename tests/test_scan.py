"""A scanned model (``T5Config.scan_layers``) and rematerialised blocks against the unrolled."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_batch

import goose_jax as gj
from goose_jax.core import config_files
from goose_jax.core.errors import ConfigError, TrainConfigError
from goose_jax.experts import lora as ex
from goose_jax.models.config import FAST_COMPILE_OPTIONS
from goose_jax.models.scan import REMAT_POLICIES, STACKED, stack_layers, unstack_layers
from goose_jax.routing.methods import build_routed
from goose_jax.training.program import Program, TrainConfig

CFG = gj.T5Config.preset("tiny")            # 2 encoder and 3 decoder layers
SCAN = CFG.replace(scan_layers=True)
E, R = 5, 4


@pytest.fixture(scope="module")
def world():
    params = gj.init_params(CFG, 0)
    lib = ex.init_experts(CFG, ex.LoRAConfig(rank=R), E, 1, fast_compile=True)
    rng = np.random.default_rng(2)
    # Non-zero B (fresh experts have B = 0 and would all be the base model).
    lib = jax.tree.map(lambda x: jnp.asarray(x + 0.2 * rng.standard_normal(x.shape), x.dtype), lib)
    gates = jax.tree.map(lambda g: jnp.asarray(rng.standard_normal(g.shape), g.dtype),
                         ex.init_gates(lib))
    ids, mask, dec = random_batch(np.random.default_rng(0), 3, 11, 6, CFG.vocab_size)
    return params, lib, gates, (ids, dec, mask)


def _equal_trees(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_layouts_round_trip_and_keep_user_facing_names(world):
    params = world[0]
    stacked = stack_layers(params, SCAN)
    assert set(stacked["decoder"]) == {STACKED, "final_norm", "relpos_bias"}
    assert stacked["decoder"][STACKED]["ffn"]["wo"]["kernel"].shape == (3, CFG.d_ff, 24)
    np.testing.assert_array_equal(stacked["encoder"][STACKED]["self_attn"]["q"]["kernel"][1],
                                  params["encoder"]["block_1"]["self_attn"]["q"]["kernel"])
    _equal_trees(unstack_layers(stacked), params)
    _equal_trees(stack_layers(stacked, SCAN), stacked)              # idempotent
    _equal_trees(gj.init_params(SCAN, 0), stacked)                  # same draws as per layer
    abstract = jax.eval_shape(lambda: params)
    assert jax.tree.map(jnp.shape, stack_layers(abstract, SCAN)) == \
        jax.tree.map(jnp.shape, stacked)
    assert gj.site_shapes(SCAN) == gj.site_shapes(CFG)
    spec = gj.param_logical_axes(SCAN)["encoder"][STACKED]["ffn"]["wi_0"]["kernel"]
    assert tuple(spec) == ("layers", "embed", "mlp")


def test_stack_pads_missing_layers_and_rejects_mixed_layouts():
    one = {"encoder": {"block_1": {"ffn": {"wo": {"lora_a": np.ones((2, 3, 4))}}}}}
    out = stack_layers(one, SCAN)["encoder"][STACKED]["ffn"]["wo"]["lora_a"]
    assert out.shape == (2, 2, 3, 4)
    np.testing.assert_array_equal(np.asarray(out), np.stack([np.zeros((2, 3, 4)),
                                                             np.ones((2, 3, 4))]))
    with pytest.raises(ConfigError, match="beyond the model's 2 layers"):
        stack_layers({"encoder": {"block_2": {"x": np.ones(1)}}}, SCAN)
    with pytest.raises(ConfigError, match="both"):
        stack_layers({"encoder": {"block_0": {"x": np.ones(1)}, STACKED: {"x": np.ones((2, 1))}}})
    with pytest.raises(ConfigError, match="differs in shape"):
        stack_layers({"encoder": {"block_0": {"x": np.ones(1)}, "block_1": {"x": np.ones(2)}}})


def test_scanned_forward_equals_unrolled(world):
    params, _, _, (ids, dec, mask) = world
    ref = np.asarray(gj.t5_logits(CFG, params, ids, dec, mask))
    for p in (params, stack_layers(params, SCAN)):    # either layout at the API boundary
        np.testing.assert_allclose(np.asarray(gj.t5_logits(SCAN, p, ids, dec, mask)), ref,
                                   atol=1e-5)


@pytest.mark.parametrize("sites", [ex.DEFAULT_SITES,
                                   r"encoder/block_1/self_attn/[qv]|decoder/block_2/ffn/wo"])
def test_scanned_routed_logits_equal_unrolled(world, sites):
    params, lib, gates, (ids, dec, mask) = world
    keep = ex.select_sites(CFG, ex.LoRAConfig(rank=R, sites=sites))
    lib = ex.nest_sites({n: v for n, v in ex.flatten_sites(lib).items() if n in keep})
    routed = build_routed("phatgoose", CFG, lib, gates=gates, top_k=2, scale=1 / R)
    ref = np.asarray(gj.t5_logits(CFG, params, ids, dec, mask, routing=routed))
    assert np.abs(ref - np.asarray(gj.t5_logits(CFG, params, ids, dec, mask))).max() > 1e-3
    ours = gj.t5_logits(SCAN, params, ids, dec, mask, routing=routed)
    np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-5)


def test_scanned_generation_with_cache_equals_unrolled(world):
    params, lib, gates, (ids, _, mask) = world
    routed = build_routed("phatgoose", CFG, lib, gates=gates, top_k=2, scale=1 / R,
                          telemetry=True)
    ref_tokens, ref_counts = gj.generate_greedy(CFG, params, ids, 5, mask, routing=routed,
                                                fast_compile=True, telemetry=True)
    tokens, counts = gj.generate_greedy(SCAN, stack_layers(params, SCAN), ids, 5, mask,
                                        routing=routed, fast_compile=True, telemetry=True)
    np.testing.assert_array_equal(np.asarray(tokens), np.asarray(ref_tokens))
    assert set(counts) == set(ref_counts) == set(gj.site_shapes(CFG))
    for site, c in ref_counts.items():
        np.testing.assert_array_equal(np.asarray(counts[site]), np.asarray(c), err_msg=site)


def test_config_validates_scan_and_remat():
    assert set(REMAT_POLICIES) == {"none", "block", "dots"}
    with pytest.raises(ConfigError, match="remat"):
        CFG.replace(remat="all")
    with pytest.raises(ConfigError, match="scan_layers"):
        CFG.replace(scan_layers="yes")
    with pytest.raises(TrainConfigError, match="TrainConfig.remat"):
        TrainConfig(remat="everything")
    tcfg = config_files.apply_overrides(TrainConfig(), ["remat=dots"], error=TrainConfigError)
    assert tcfg.remat == "dots"


def test_remat_gradients_equal_plain_gradients(world):
    params, lib, _, (ids, _, mask) = world
    rng = np.random.default_rng(1)
    batch = {"inputs": jnp.asarray(ids), "input_mask": jnp.asarray(mask),
             "targets": jnp.asarray(rng.integers(2, CFG.vocab_size, (3, 6)), jnp.int32)}

    def grads(remat, scan):
        # Through the training program, so that TrainConfig.remat reaches the model.
        program = Program("expert", CFG.replace(scan_layers=scan),
                          TrainConfig(remat=remat, fast_compile=True), steps=1,
                          lora_scale=1 / R, many=False)
        base, experts = (stack_layers(t, SCAN) if scan else t for t in (params, lib))

        def loss(trainable):
            nll, n = program._nll(base, None, trainable, batch)
            return nll / n

        jaxpr = str(jax.make_jaxpr(jax.grad(loss))(experts))
        assert ("checkpoint" in jaxpr or "remat" in jaxpr) == (remat != "none")
        g = jax.jit(jax.grad(loss), compiler_options=FAST_COMPILE_OPTIONS)(experts)
        return unstack_layers(g) if scan else g

    plain = grads("none", False)
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(plain)) > 1e-4
    for remat, scan in (("block", False), ("dots", True)):
        got = grads(remat, scan)
        assert jax.tree.structure(got) == jax.tree.structure(plain)
        for g, h in zip(jax.tree.leaves(got), jax.tree.leaves(plain)):
            np.testing.assert_allclose(np.asarray(g), np.asarray(h), rtol=1e-5, atol=1e-7)


def test_evaluator_on_a_scanned_model_equals_the_unrolled(world):
    from goose_jax.data.examples import Example
    from goose_jax.data.tokenizers import ByteTokenizer
    from goose_jax.evaluation.evaluator import Evaluator

    params, lib, gates, _ = world
    cfg = CFG.replace(vocab_size=max(CFG.vocab_size, 259))
    params = gj.init_params(cfg, 0)
    tok = ByteTokenizer()
    examples = [Example("is a goose a bird?", ("yes", "no", "maybe"), (0,)),
                Example("route me", ("left", "right"), (1,))]
    out = {}
    for name, c in (("unrolled", cfg), ("scanned", cfg.replace(scan_layers=True))):
        routed = build_routed("phatgoose", c, lib, gates=gates, top_k=2, scale=1 / R)
        evaluator = Evaluator(c, params, tok, routed, batch_size=2, telemetry=True,
                              max_target_length=8)
        scores = evaluator.score_choices(examples)
        score_counts = dict(evaluator.last_counts)
        texts = evaluator.generate(examples, 4)
        example = build_routed("example", c, lib, scale=1 / R)
        per_example = Evaluator(c, params, tok, example, batch_size=2,
                                choose_experts=lambda b: [1] * len(b)).score_choices(examples)
        out[name] = (scores, score_counts, texts, dict(evaluator.last_counts), per_example)
    a, b = out["unrolled"], out["scanned"]
    for x, y in zip(a[0] + a[4], b[0] + b[4]):
        np.testing.assert_allclose(y, x, atol=1e-5)
    assert a[2] == b[2]
    for counts_a, counts_b in ((a[1], b[1]), (a[3], b[3])):
        assert counts_a and set(counts_a) == set(counts_b)
        for site in counts_a:
            np.testing.assert_array_equal(counts_b[site], counts_a[site])
