"""Whole-model routing: every method against an independent computation or an invariant."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import needs_8_devices, random_batch

import goose_jax as gj
from goose_jax.core import sharding
from goose_jax.experts import lora as ex
from goose_jax.routing import methods as routers
from goose_jax.routing.methods import LibraryMismatchError, build_routed

CFG = gj.T5Config.preset("tiny")
E, R = 5, 4
SCALE = 1 / R


@pytest.fixture(scope="module")
def world():
    params = gj.init_params(CFG, 0)
    lib = ex.init_experts(CFG, ex.LoRAConfig(rank=R), E, 1)
    # Non-zero B (fresh experts have B = 0 and would all look like the base model).
    keys = iter(jax.random.split(jax.random.key(2), 1000))
    lib = jax.tree_util.tree_map(lambda x: x + 0.2 * jax.random.normal(next(keys), x.shape), lib)
    gates = jax.tree_util.tree_map(lambda g: jax.random.normal(next(keys), g.shape),
                                   ex.init_gates(lib))
    ids, mask, dec = random_batch(np.random.default_rng(0), 3, 13, 7, CFG.vocab_size)
    return params, lib, gates, (ids, dec, mask)


def _logits(params, batch, routed):
    ids, dec, mask = batch
    return np.asarray(gj.t5_logits(CFG, params, ids, dec, mask, routing=routed))


def _dense_model(params, lib, weights_E):
    """Base kernels plus sum_e w_e A_e B_e * scale, computed in NumPy."""
    edited = jax.tree_util.tree_map(np.array, params)
    for name, leaf in ex.flatten_sites(lib).items():
        node = edited
        for part in name.split("/"):
            node = node[part]
        a, b = np.asarray(leaf["lora_a"], np.float64), np.asarray(leaf["lora_b"], np.float64)
        node["kernel"] += np.einsum("e,edr,ero->do", weights_E, a, b).astype(np.float32) * SCALE
    return edited


def test_base_method_is_the_base_model(world):
    params, _, _, batch = world
    np.testing.assert_array_equal(_logits(params, batch, build_routed("base", CFG)),
                                  np.asarray(gj.t5_logits(CFG, params, batch[0], batch[1],
                                                          batch[2])))


@pytest.mark.parametrize("method", ["merged", "uniform"])
def test_merged_and_uniform_equal_the_dense_average(world, method):
    params, lib, _, batch = world
    ours = _logits(params, batch, build_routed(method, CFG, lib, scale=SCALE))
    ref = _logits(_dense_model(params, lib, np.full(E, 1 / E)), batch, None)
    np.testing.assert_allclose(ours, ref, atol=5e-5)


def test_merge_products_is_exact():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(E, 6, R)), rng.normal(size=(E, R, 9))
    tree = ex.nest_sites({"encoder/block_0/ffn/wo": {"lora_a": a, "lora_b": b}})
    m = ex.flatten_sites(routers.merge_products(tree))["encoder/block_0/ffn/wo"]
    assert m["lora_a"].shape == (1, 6, E * R)
    np.testing.assert_allclose(np.asarray(m["lora_a"][0] @ m["lora_b"][0]),
                               np.mean(a @ b, axis=0), atol=1e-5)


def test_merged_factors_is_the_weaker_variant(world):
    params, lib, _, batch = world
    ours = _logits(params, batch, build_routed("merged_factors", CFG, lib, scale=SCALE))
    flat = ex.flatten_sites(lib)
    mean_lib = ex.nest_sites({n: {k: np.mean(np.asarray(v), 0, keepdims=True)
                                  for k, v in leaf.items()} for n, leaf in flat.items()})
    np.testing.assert_allclose(ours, _logits(_dense_model(params, mean_lib, np.ones(1)), batch,
                                             None), atol=5e-5)
    assert np.abs(ours - _logits(params, batch, build_routed("merged", CFG, lib,
                                                             scale=SCALE))).max() > 1e-3


@pytest.mark.parametrize("n", [0, 3])
def test_single_and_example_equal_one_dense_expert(world, n):
    params, lib, _, batch = world
    w = np.eye(E)[n]
    ref = _logits(_dense_model(params, lib, w), batch, None)
    np.testing.assert_allclose(_logits(params, batch, build_routed("single", CFG, lib,
                                                                   expert=n, scale=SCALE)),
                               ref, atol=5e-5)
    routed = build_routed("example", CFG, lib, scale=SCALE).with_example_index([n] * 3)
    np.testing.assert_allclose(_logits(params, batch, routed), ref, atol=5e-5)


def test_example_routing_is_per_example(world):
    params, lib, _, batch = world
    routed = build_routed("example", CFG, lib, scale=SCALE).with_example_index([2, 0, 4])
    ours = _logits(params, batch, routed)
    for row, n in enumerate([2, 0, 4]):
        ref = _logits(_dense_model(params, lib, np.eye(E)[n]), batch, None)
        np.testing.assert_allclose(ours[row], ref[row], atol=5e-5)


def test_phatgoose_with_tied_gates_follows_the_tie_rule(world):
    # Identical gate rows tie every score: top-1 is expert 0 with weight 1, top-2 is experts
    # 0 and 1 with weight 1/2 each, on every token of every site.
    params, lib, gates, batch = world
    tied = jax.tree_util.tree_map(lambda g: jnp.broadcast_to(g[:1], g.shape), gates)
    one = _logits(params, batch, build_routed("phatgoose", CFG, lib, gates=tied, top_k=1,
                                              scale=SCALE))
    np.testing.assert_allclose(one, _logits(_dense_model(params, lib, np.eye(E)[0]), batch,
                                            None), atol=5e-5)
    two = _logits(params, batch, build_routed("phatgoose", CFG, lib, gates=tied, top_k=2,
                                              scale=SCALE))
    np.testing.assert_allclose(two, _logits(_dense_model(params, lib, np.array(
        [0.5, 0.5, 0, 0, 0])), batch, None), atol=5e-5)


def test_phatgoose_permuting_experts_changes_nothing(world):
    params, lib, gates, batch = world
    perm = np.array([3, 0, 4, 1, 2])
    take = lambda t: jax.tree_util.tree_map(lambda x: x[perm], t)  # noqa: E731
    a = _logits(params, batch, build_routed("phatgoose", CFG, lib, gates=gates, scale=SCALE))
    b = _logits(params, batch, build_routed("phatgoose", CFG, take(lib), gates=take(gates),
                                            scale=SCALE))
    np.testing.assert_allclose(a, b, atol=2e-5)
    base = _logits(params, batch, build_routed("base", CFG))
    assert np.abs(a - base).max() > 1e-2  # routing really added something


def test_routed_generation_routes_each_new_token(world):
    # Cached decoding (one token per step) must route exactly as teacher forcing does.
    params, lib, gates, (ids, _, mask) = world
    routed = build_routed("phatgoose", CFG, lib, gates=gates, scale=SCALE)
    toks = np.asarray(gj.generate_greedy(CFG, params, ids, 8, mask, routing=routed))
    dec = np.concatenate([np.zeros((3, 1), np.int32), toks[:, :-1]], axis=1)
    logits = np.asarray(gj.t5_logits(CFG, params, ids, dec, mask, routing=routed))
    np.testing.assert_array_equal(np.argmax(logits, -1), toks)


def test_arrow_vectors_match_numpy_svd(world):
    _, lib, _, _ = world
    routed = build_routed("arrow", CFG, lib, scale=SCALE)
    flat_v = ex.flatten_sites(routed.collections[routers.ROUTER])
    for name, leaf in list(ex.flatten_sites(lib).items())[:6]:
        v = np.asarray(flat_v[name]["vectors"])
        for e in range(E):
            dw = np.asarray(leaf["lora_a"][e], np.float64) @ np.asarray(leaf["lora_b"][e])
            u = np.linalg.svd(dw)[0][:, 0]
            np.testing.assert_allclose(np.abs(v[e] @ u), 1.0, atol=1e-4)


def test_arrow_ignores_experts_absent_at_a_site(world):
    _, lib, _, _ = world
    site = "encoder/block_1/ffn/wo"
    flat = ex.flatten_sites(lib)
    flat[site] = {k: v.at[2].set(0.0) for k, v in flat[site].items()}
    routed = build_routed("arrow", CFG, ex.nest_sites(flat), scale=SCALE)
    v = np.asarray(ex.flatten_sites(routed.collections[routers.ROUTER])[site]["vectors"])
    assert np.all(v[2] == 0) and np.all(np.abs(np.linalg.norm(v[[0, 1, 3, 4]], axis=1) - 1) < 1e-4)


def test_average_activation_first_site_matches_numpy(world):
    params, lib, _, _ = world
    rng = np.random.default_rng(5)
    batches = []
    for _ in range(E):
        ids, mask, dec = random_batch(rng, 2, 9, 4, CFG.vocab_size)
        batches.append([(ids, mask, dec, np.ones_like(dec))])
    protos = routers.compute_average_activations(CFG, params, lib, batches, scale=SCALE,
                                                 pooling="token")
    got = np.asarray(ex.flatten_sites(protos)["encoder/block_0/self_attn/q"]["gate"])
    emb = np.asarray(params["shared"]["embedding"], np.float64)
    scale = np.asarray(params["encoder"]["block_0"]["self_attn_norm"]["scale"], np.float64)
    for n, [(ids, mask, _, _)] in enumerate(batches):
        h = emb[ids]
        h = h / np.sqrt(np.mean(h**2, -1, keepdims=True) + CFG.layer_norm_epsilon) * scale
        ref = (h * mask[..., None]).sum((0, 1)) / mask.sum()
        np.testing.assert_allclose(got[n], ref, atol=1e-5)
    routed = build_routed("average_activation", CFG, lib, prototypes=protos, scale=SCALE)
    assert np.isfinite(_logits(params, world[3], routed)).all()


def _rms(h, scale):
    return h / np.sqrt(np.mean(h**2, -1, keepdims=True) + CFG.layer_norm_epsilon) * scale


@pytest.mark.parametrize("pooling", ["example", "token"])
def test_average_activation_pooling_matches_numpy_loops(world, pooling):
    """Both poolings at an encoder and a decoder site, against loops over examples and tokens;
    ragged masks, and an example with no target token (left out of the example mean)."""
    params, lib, _, _ = world
    rng = np.random.default_rng(11)
    batches = []
    for _ in range(E):
        rows = []
        for _ in range(2):
            ids, mask, dec = random_batch(rng, 3, 12, 5, CFG.vocab_size)
            dec_mask = np.ones_like(dec)
            dec_mask[1, 2:] = 0
            dec_mask[2, :] = 0
            rows.append((ids, mask, dec, dec_mask))
        batches.append(rows)
    protos = ex.flatten_sites(routers.compute_average_activations(
        CFG, params, lib, batches, scale=SCALE, pooling=pooling))
    emb = np.asarray(params["shared"]["embedding"], np.float64)
    for site, side, ids_at, mask_at in (("encoder/block_0/self_attn/q", "encoder", 0, 1),
                                        ("decoder/block_0/self_attn/q", "decoder", 2, 3)):
        norm = np.asarray(params[side]["block_0"]["self_attn_norm"]["scale"], np.float64)
        got = np.asarray(protos[site]["gate"])
        for n in range(E):
            example_means, tokens = [], []
            for batch in batches[n]:
                ids, mask = batch[ids_at], batch[mask_at]
                for b in range(ids.shape[0]):
                    mine = [_rms(emb[ids[b, s]], norm) for s in range(ids.shape[1])
                            if mask[b, s]]
                    tokens += mine
                    if mine:
                        example_means.append(np.mean(mine, axis=0))
            ref = np.mean(example_means if pooling == "example" else tokens, axis=0)
            np.testing.assert_allclose(got[n], ref, atol=1e-5, err_msg=f"{site} expert {n}")
    with pytest.raises(LibraryMismatchError, match="unknown pooling 'mean'"):
        routers.compute_average_activations(CFG, params, lib, batches, pooling="mean")


def _release_arrow(x_NI, u_EI, k):
    """The original release's Arrow router (moe.py, score_type="arrow"), in NumPy: |x . u| over
    Router.temperature 10, times sqrt(1 / d) (scaling_scores), softmax over all experts, top-k,
    renormalised."""
    scores = np.abs(x_NI @ u_EI.T) / 10.0 * np.sqrt(1.0 / x_NI.shape[-1])
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    index = np.argsort(-probs, axis=-1, kind="stable")[:, :k]
    kept = np.take_along_axis(probs, index, -1)
    return kept / kept.sum(-1, keepdims=True), index


def test_arrow_release_temperature_is_the_release_formula():
    """A constructed case: |x . u| = 12, 4, 1, 0 for experts 0-3. The release's temperature
    gives near-even top-2 weights; 1 gives near one-hot ones; the kept experts are the same."""
    from goose_jax.routing import formula as routing

    d = 64
    u_EI = np.eye(4, d)
    x_NI = np.zeros((2, d))
    x_NI[0, :3] = [12.0, -4.0, 1.0]
    x_NI[1, :4] = [0.5, 3.0, -9.0, 0.0]
    ref_w, ref_i = _release_arrow(x_NI, u_EI, 2)
    w, i = routing.arrow_route(jnp.asarray(x_NI, jnp.float32), jnp.asarray(u_EI, jnp.float32),
                               top_k=2, temperature="release")
    np.testing.assert_array_equal(np.asarray(i), ref_i)
    np.testing.assert_allclose(np.asarray(w), ref_w, atol=1e-6)
    assert np.all(np.abs(np.asarray(w) - 0.5) < 0.15)           # near even
    w1, i1 = routing.arrow_route(jnp.asarray(x_NI, jnp.float32), jnp.asarray(u_EI, jnp.float32),
                                 top_k=2, temperature=1.0)
    np.testing.assert_array_equal(np.asarray(i1), ref_i)
    assert np.all(np.asarray(w1)[:, 0] > 0.997)                 # near one-hot


def _top1_weights(params, lib, batch, **kw):
    from goose_jax.models.t5.model import T5

    ids, dec, mask = batch
    routed = build_routed("arrow", CFG, lib, scale=SCALE, telemetry=True, **kw)
    _, state = T5(CFG, routed.adapter).apply({"params": params, **routed.collections}, ids, dec,
                                             mask, mutable=["intermediates"])
    return {name: float(leaf["mean_top1_weight"][0])
            for name, leaf in ex.flatten_sites(state["intermediates"]).items()}


def test_arrow_temperature_reaches_every_site(world):
    """``build_routed(temperature="release")`` divides every site's scores by 10 sqrt(d_in):
    top-2 weights near even; with 1 they are further from even at every site."""
    params, lib, _, batch = world
    release = _top1_weights(params, lib, batch, temperature="release")
    one = _top1_weights(params, lib, batch, temperature=1.0)
    assert set(release) == set(one) and len(one) > 10
    for site in one:
        assert 0.5 <= release[site] < 0.55, site
        assert one[site] > release[site] + 0.02, site
    assert _top1_weights(params, lib, batch) == one   # 1 is the default
    for bad in (0.0, -1.0, float("nan"), "hot", True):
        with pytest.raises(ValueError, match="temperature must be > 0"):
            build_routed("arrow", CFG, lib, scale=SCALE, temperature=bad)


def test_telemetry_counts_every_token(world):
    params, lib, gates, (ids, dec, mask) = world
    from goose_jax.models.t5.model import T5

    routed = build_routed("phatgoose", CFG, lib, gates=gates, scale=SCALE, telemetry=True)
    _, state = T5(CFG, routed.adapter).apply({"params": params, **routed.collections}, ids, dec,
                                             mask, mutable=["intermediates"])
    flat = ex.flatten_sites(state["intermediates"])
    enc = flat["encoder/block_0/ffn/wo"]
    assert float(enc["top1_counts"][0].sum()) == ids.size
    assert float(flat["decoder/block_1/self_attn/q"]["top1_counts"][0].sum()) == dec.size
    assert 0.5 <= float(enc["mean_top1_weight"][0]) <= 1.0


@pytest.mark.parametrize("scoring", ["standardized", "abs_dot"])
def test_telemetry_counts_the_masked_argmax_of_the_scores(scoring):
    """The routed adapter's own top-1 counts are the argmax of the router scores, counted over
    the tokens of its site's telemetry mask only."""
    import flax.linen as nn

    from goose_jax.routing import formula as routing

    rng = np.random.default_rng(3)
    D, O = 12, 7
    x = rng.standard_normal((3, 11, D)).astype(np.float32)
    mask = (rng.random((3, 11)) < 0.6).astype(np.int32)
    vectors = rng.standard_normal((E, D)).astype(np.float32)
    if scoring == "standardized":
        vectors = np.asarray(routing.prepare_router(vectors))
        scores = routing.phatgoose_scores(x, vectors, gates_normed=True)
    else:
        scores = routing.arrow_scores(x, vectors)
    adapter = routers.RoutedAdapter(SCALE, 2, scoring, telemetry=True)

    class Site(nn.Module):
        @nn.compact
        def __call__(self, x):
            return adapter(self, x, jnp.zeros(x.shape[:-1] + (O,)))

    variables = {ex.EXPERTS: {"lora_a": rng.standard_normal((E, D, R), np.float32),
                              "lora_b": rng.standard_normal((E, R, O), np.float32)},
                 routers.ROUTER: {"vectors": vectors}}
    top1 = np.argmax(np.asarray(scores), axis=-1)
    for telemetry, keep in (({routers.TELEMETRY: {"mask": mask}}, mask == 1), ({}, ...)):
        _, state = Site().apply({**variables, **telemetry}, x, mutable=["intermediates"])
        counts = np.asarray(state["intermediates"]["top1_counts"][0])
        np.testing.assert_array_equal(counts, np.bincount(top1[keep].ravel(), minlength=E))


@needs_8_devices
def test_sharded_expert_axis_equals_single_device(world):
    params = world[0]
    ids, mask, dec = random_batch(np.random.default_rng(9), 4, 11, 5, CFG.vocab_size)
    batch = (ids, dec, mask)
    lib = ex.init_experts(CFG, ex.LoRAConfig(rank=R), 8, 3)
    keys = iter(jax.random.split(jax.random.key(4), 1000))
    lib = jax.tree_util.tree_map(lambda x: x + 0.2 * jax.random.normal(next(keys), x.shape), lib)
    gates = jax.tree_util.tree_map(lambda g: jax.random.normal(next(keys), g.shape),
                                   ex.init_gates(lib))
    single = _logits(params, batch, build_routed("phatgoose", CFG, lib, gates=gates,
                                                 scale=SCALE))
    mesh = sharding.make_mesh(data=2, expert=4)
    on_expert = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("expert"))
    put = lambda t: jax.device_put(t, on_expert)  # noqa: E731
    ids, dec, mask = (jax.device_put(jnp.asarray(a), sharding.batch_sharding(mesh))
                      for a in batch)
    # auto picks dense for 8 experts; grouped (sort, scan, scatter-add) is forced as well.
    for backend in ("auto", "grouped"):
        routed = build_routed("phatgoose", CFG, put(lib), gates=put(gates), scale=SCALE,
                              backend=backend)
        leaf = ex.flatten_sites(routed.collections["experts"])["encoder/block_0/ffn/wo"]["lora_a"]
        assert len({str(s.index) for s in leaf.addressable_shards}) == 4
        out = np.asarray(gj.t5_logits(CFG, params, ids, dec, mask, routing=routed))
        np.testing.assert_allclose(out, single, atol=1e-5)


def test_bad_inputs_fail_before_compiling(world):
    params, lib, gates, _ = world
    with pytest.raises(LibraryMismatchError, match="top_k"):
        build_routed("phatgoose", CFG, lib, gates=gates, top_k=E + 1)
    with pytest.raises(LibraryMismatchError, match="empty"):
        build_routed("phatgoose", CFG, {}, gates={})
    nan_gates = jax.tree_util.tree_map(lambda g: g.at[2, 0].set(jnp.nan), gates)
    with pytest.raises(LibraryMismatchError, match="NaN"):
        build_routed("phatgoose", CFG, lib, gates=nan_gates)
    other = CFG.replace(d_model=32)
    with pytest.raises(LibraryMismatchError, match="different base model"):
        build_routed("phatgoose", other, lib, gates=gates)
    with pytest.raises(LibraryMismatchError, match="unknown routing method"):
        build_routed("phatgooose", CFG, lib)
    with pytest.raises(LibraryMismatchError, match="gate vectors"):
        build_routed("phatgoose", CFG, lib)
