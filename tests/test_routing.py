"""Routing and the routed LoRA sum against plain NumPy loops.

The references below are written independently of goose_jax.routing.formula: one token at a time, in
float64, with NumPy's stable argsort for the tie rule (equal scores: lower expert index first).

Legend: T tokens, D d_in, O d_out, E experts, R LoRA rank, k top-k.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from goose_jax.routing import backends as routing_backends
from goose_jax.routing import formula as routing

BACKENDS = ("dense", "gather", "grouped", "ragged", "auto")


# ----------------------------------------------------------------------------------------------
# NumPy references.


def np_standardize(v, eps=1e-5):
    v = np.asarray(v, np.float64)
    mean = v.mean()
    var = ((v - mean) ** 2).mean()
    return (v - mean) / np.sqrt(var + eps)


def np_softmax(s):
    e = np.exp(s - s.max())
    return e / e.sum()


def np_topk_softmax(scores_E, k):
    order = np.argsort(-scores_E, kind="stable")[:k]
    return np_softmax(scores_E[order]), order


def np_phatgoose_route(x_TD, gates_ED, k):
    """Per-token loop: standardize, score, stable top-k, softmax over the kept scores."""
    x_TD = np.asarray(x_TD, np.float64)
    d_in = x_TD.shape[-1]
    gn = [np_standardize(g) for g in np.asarray(gates_ED, np.float64)]
    weights, index = [], []
    for x in x_TD.reshape(-1, d_in):
        xn = np_standardize(x)
        scores = np.array([xn @ g / np.sqrt(d_in) for g in gn])
        w, i = np_topk_softmax(scores, k)
        weights.append(w)
        index.append(i)
    lead = x_TD.shape[:-1]
    return np.array(weights).reshape(lead + (k,)), np.array(index).reshape(lead + (k,))


def np_arrow_route(x_TD, vectors_ED, k, temperature):
    weights, index = [], []
    for x in np.asarray(x_TD, np.float64):
        scores = np.array([abs(x @ u) for u in np.asarray(vectors_ED, np.float64)]) / temperature
        w, i = np_topk_softmax(scores, k)
        weights.append(w)
        index.append(i)
    return np.array(weights), np.array(index)


def np_combine(x, lora_a, lora_b, weights, index, scale):
    """Loop over tokens and their chosen experts: sum_j w_j (x A_e) B_e scale."""
    x = np.asarray(x, np.float64)
    d_in, d_out = x.shape[-1], lora_b.shape[-1]
    k = index.shape[-1]
    x_TD = x.reshape(-1, d_in)
    w_Tk, i_Tk = np.asarray(weights, np.float64).reshape(-1, k), np.asarray(index).reshape(-1, k)
    y = np.zeros((x_TD.shape[0], d_out))
    for t in range(x_TD.shape[0]):
        for j in range(k):
            e = i_Tk[t, j]
            a = np.asarray(lora_a[e], np.float64)
            b = np.asarray(lora_b[e], np.float64)
            y[t] += w_Tk[t, j] * ((x_TD[t] @ a) @ b) * scale
    return y.reshape(x.shape[:-1] + (d_out,))


# ----------------------------------------------------------------------------------------------
# Fixtures.


def make_site(seed, lead, d_in, d_out, num_experts, rank, gate_scale=0.01):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(lead + (d_in,)).astype(np.float32)
    # Gate vectors are small (a few Adam steps from zero), so the 1e-5 eps matters.
    gates = (gate_scale * rng.standard_normal((num_experts, d_in))).astype(np.float32)
    lora_a = (rng.standard_normal((num_experts, d_in, rank)) / np.sqrt(d_in)).astype(np.float32)
    lora_b = rng.standard_normal((num_experts, rank, d_out)).astype(np.float32)
    return x, gates, lora_a, lora_b


ROUTE_CASES = [  # (E, k, D)
    (5, 2, 24),
    (7, 1, 13),
    (3, 3, 9),
    (11, 4, 40),
    (1, 1, 5),
]


# ----------------------------------------------------------------------------------------------
# Routing.


@pytest.mark.parametrize("num_experts,top_k,d_in", ROUTE_CASES)
def test_phatgoose_route_matches_numpy(num_experts, top_k, d_in):
    x, gates, _, _ = make_site(num_experts * 100 + d_in, (23,), d_in, 3, num_experts, 2)
    weights, index = routing.phatgoose_route(x, gates, top_k=top_k)
    ref_w, ref_i = np_phatgoose_route(x, gates, top_k)
    assert weights.dtype == jnp.float32
    assert weights.shape == index.shape == (23, top_k)
    np.testing.assert_array_equal(np.asarray(index), ref_i)
    np.testing.assert_allclose(np.asarray(weights), ref_w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(weights).sum(-1), 1.0, rtol=1e-6)


def test_phatgoose_scores_match_numpy():
    x, gates, _, _ = make_site(3, (9,), 17, 3, 6, 2)
    scores = np.asarray(routing.phatgoose_scores(x, gates))
    ref = np.array([[np_standardize(t) @ np_standardize(g) / np.sqrt(17) for g in gates]
                    for t in x])
    np.testing.assert_allclose(scores, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("offset,spread", [(0.0, 1.0), (3.0, 0.5), (1e3, 1e-3), (-40.0, 1e-4)])
def test_scores_centre_before_the_product(offset, spread):
    # The scores centre x, take the product and scale the (N, E) result (no standardized copy
    # of x). That must equal standardizing first, including near-constant inputs (|mean| far
    # above the spread, variance near or below eps), where subtracting mean(x) * sum(g) after
    # the product would cancel digits and pick other experts.
    x, gates, _, _ = make_site(31, (64,), 768, 3, 40, 2)
    x = (offset + spread * x).astype(np.float32)
    gn = routing.prepare_router(gates)
    scores = np.asarray(routing.phatgoose_scores(x, gn, gates_normed=True))
    explicit = np.asarray(jnp.einsum("ni,ei->ne", routing.standardize(x), gn,
                                     precision=jax.lax.Precision.HIGHEST)) / np.sqrt(768)
    ref = np.stack([[np_standardize(t) @ np_standardize(g) / np.sqrt(768) for g in gates]
                    for t in x])
    size = np.abs(ref).max()
    # float32 x at 1e3 with a 1e-3 spread keeps about 4 digits of its deviations: both forms
    # are off by the same 3e-4 of the scores' size there; subtracting mean(x) * sum(g) is off
    # by 0.27 and picks another top-2 for half of the tokens.
    np.testing.assert_allclose(scores, ref, rtol=0, atol=1e-3 * size)
    np.testing.assert_allclose(scores, explicit, rtol=0, atol=1e-4 * size)
    _, index = routing.phatgoose_route(x, gn, top_k=2, gates_normed=True)
    np.testing.assert_array_equal(np.asarray(index), np_phatgoose_route(x, gates, 2)[1])


def test_route_leading_axes_and_jit():
    x, gates, _, _ = make_site(4, (2, 3, 5), 24, 3, 5, 2)
    route = jax.jit(functools.partial(routing.phatgoose_route, top_k=2))
    weights, index = route(x, gates)
    assert weights.shape == index.shape == (2, 3, 5, 2)
    ref_w, ref_i = np_phatgoose_route(x, gates, 2)
    np.testing.assert_array_equal(np.asarray(index), ref_i)
    np.testing.assert_allclose(np.asarray(weights), ref_w, rtol=1e-5, atol=1e-6)


def test_prepared_gates_give_the_same_route():
    x, gates, _, _ = make_site(5, (19,), 24, 3, 7, 2)
    gn = routing.prepare_router(gates)
    np.testing.assert_allclose(
        np.asarray(gn), np.stack([np_standardize(g) for g in gates]), rtol=1e-5, atol=1e-5)
    w1, i1 = routing.phatgoose_route(x, gates, top_k=3)
    w2, i2 = routing.phatgoose_route(x, gn, top_k=3, gates_normed=True)
    np.testing.assert_array_equal(np.asarray(i1), np.asarray(i2))
    np.testing.assert_allclose(np.asarray(w1), np.asarray(w2), rtol=1e-6)


def test_standardize_uses_eps_inside_the_sqrt():
    v = np.array([[1e-3, -1e-3, 2e-3, 0.0]], np.float32)  # variance far below eps
    np.testing.assert_allclose(np.asarray(routing.standardize(v))[0], np_standardize(v[0]),
                               rtol=1e-5)


def test_permuting_experts_permutes_indices():
    x, gates, _, _ = make_site(6, (31,), 24, 3, 9, 2)
    perm = np.random.default_rng(0).permutation(9)
    w, i = routing.phatgoose_route(x, gates, top_k=3)
    w_p, i_p = routing.phatgoose_route(x, gates[perm], top_k=3)
    # Expert perm[j] of the original library sits at position j of the permuted one.
    np.testing.assert_array_equal(perm[np.asarray(i_p)], np.asarray(i))
    np.testing.assert_allclose(np.asarray(w_p), np.asarray(w), rtol=1e-6)


def test_exact_ties_go_to_the_lower_index():
    scores = np.array([[1.0, 2.0, 2.0, 0.0, 2.0], [3.0, 3.0, 3.0, 3.0, 3.0]], np.float32)
    route = routing.topk_softmax(scores, 3)
    np.testing.assert_array_equal(np.asarray(route.index), [[1, 2, 4], [0, 1, 2]])
    np.testing.assert_allclose(np.asarray(route.weights), 1.0 / 3.0, rtol=1e-6)


def test_duplicate_gate_rows_route_consistently():
    x, gates, _, _ = make_site(7, (40,), 24, 3, 6, 2)
    gates[4] = gates[1]  # experts 1 and 4 are indistinguishable
    weights, index = routing.phatgoose_route(x, gates, top_k=6)
    weights, index = np.asarray(weights), np.asarray(index)
    pos1 = np.argmax(index == 1, axis=-1)
    pos4 = np.argmax(index == 4, axis=-1)
    assert np.all(pos1 < pos4)
    np.testing.assert_array_equal(weights[np.arange(40), pos1], weights[np.arange(40), pos4])
    # With k = 2, expert 4 can only be kept right after expert 1.
    _, index2 = routing.phatgoose_route(x, gates, top_k=2)
    index2 = np.asarray(index2)
    assert not np.any(index2[:, 0] == 4)
    assert np.all(index2[index2[:, 1] == 4, 0] == 1)
    ref_w, ref_i = np_phatgoose_route(x, gates, 2)
    np.testing.assert_array_equal(index2, ref_i)


def test_bf16_inputs_route_in_float32():
    x, gates, _, _ = make_site(8, (4, 7), 24, 3, 5, 2)
    x16, g16 = jnp.asarray(x, jnp.bfloat16), jnp.asarray(gates, jnp.bfloat16)
    weights, index = routing.phatgoose_route(x16, g16, top_k=2)
    assert weights.dtype == jnp.float32
    ref_w, ref_i = np_phatgoose_route(np.asarray(x16, np.float32), np.asarray(g16, np.float32), 2)
    np.testing.assert_array_equal(np.asarray(index), ref_i)
    np.testing.assert_allclose(np.asarray(weights), ref_w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 0.5, "release"])
def test_arrow_route_matches_numpy(temperature):
    x, _, lora_a, lora_b = make_site(9, (17,), 20, 6, 7, 3)
    vectors = np.asarray(routing.arrow_vectors(lora_a, lora_b))
    weights, index = routing.arrow_route(x, vectors, top_k=2, temperature=temperature)
    temp = 10.0 * np.sqrt(20) if temperature == "release" else temperature
    ref_w, ref_i = np_arrow_route(x, vectors, 2, temp)
    np.testing.assert_array_equal(np.asarray(index), ref_i)
    np.testing.assert_allclose(np.asarray(weights), ref_w, rtol=1e-5, atol=1e-6)


def test_arrow_vectors_match_numpy_svd():
    _, _, lora_a, lora_b = make_site(10, (1,), 20, 6, 4, 3)
    vectors = np.asarray(routing.arrow_vectors(lora_a, lora_b))
    for e in range(4):
        u, _, _ = np.linalg.svd(lora_a[e].astype(np.float64) @ lora_b[e], full_matrices=False)
        assert abs(abs(vectors[e] @ u[:, 0]) - 1.0) < 1e-5  # same direction up to sign
        assert abs(np.linalg.norm(vectors[e]) - 1.0) < 1e-5


# ----------------------------------------------------------------------------------------------
# The routed LoRA sum.

COMBINE_CASES = [  # (lead axes, D, O, E, R, k)
    ((13,), 24, 19, 5, 3, 2),
    ((2, 7), 11, 6, 4, 2, 1),
    ((3, 1, 5), 9, 10, 3, 4, 3),
    ((21,), 16, 7, 9, 5, 4),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", COMBINE_CASES)
def test_combine_matches_numpy(backend, case):
    lead, d_in, d_out, num_experts, rank, top_k = case
    x, gates, lora_a, lora_b = make_site(sum(lead) + d_in, lead, d_in, d_out, num_experts, rank)
    weights, index = routing.phatgoose_route(x, gates, top_k=top_k)
    y = routing.combine_lora(x, lora_a, lora_b, weights, index, 1.0 / rank, backend=backend)
    ref = np_combine(x, lora_a, lora_b, np.asarray(weights), np.asarray(index), 1.0 / rank)
    assert y.shape == lead + (d_out,) and y.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_combine_arbitrary_assignments(backend):
    # Skewed and repeated assignments (every token on expert 2, some twice) and unnormalised
    # weights: the worst case for the grouped layout's padding and for scatter bookkeeping.
    rng = np.random.default_rng(11)
    x, _, lora_a, lora_b = make_site(11, (29,), 12, 8, 6, 3)
    index = np.stack([np.full(29, 2), rng.integers(0, 6, 29), np.full(29, 2)], -1).astype(np.int32)
    weights = rng.standard_normal((29, 3)).astype(np.float32)
    y = routing.combine_lora(x, lora_a, lora_b, weights, index, 0.7, backend=backend)
    ref = np_combine(x, lora_a, lora_b, weights, index, 0.7)
    np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("block_size", [1, 3, 64])
def test_grouped_block_sizes(block_size):
    x, gates, lora_a, lora_b = make_site(12, (37,), 10, 7, 5, 2)
    weights, index = routing.phatgoose_route(x, gates, top_k=2)
    y = routing.combine_lora(
        x, lora_a, lora_b, weights, index, 0.5, backend="grouped", block_size=block_size)
    ref = np_combine(x, lora_a, lora_b, np.asarray(weights), np.asarray(index), 0.5)
    np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("concentrated", [False, True])
def test_grouped_many_steps(concentrated):
    # 600 assignments over 60 experts in blocks of 64: the static layout has 9 scan steps of 512
    # rows. Routing everything to experts 3 and 41 fills only 2 of them, so the loop must skip
    # the rest; random routing uses nearly all. Both against the NumPy loop.
    rng = np.random.default_rng(21)
    x, gates, lora_a, lora_b = make_site(21, (300,), 12, 9, 60, 4)
    if concentrated:
        index = np.tile(np.array([[3, 41]], np.int32), (300, 1))
        weights = rng.uniform(0.1, 1.0, (300, 2)).astype(np.float32)
    else:
        weights, index = (np.asarray(v) for v in routing.phatgoose_route(x, gates, top_k=2))
    assert routing_backends.grouped_step_rows(64, 12, 9) == 512
    y = routing.combine_lora(x, lora_a, lora_b, weights, index, 0.25, backend="grouped",
                             block_size=64)
    ref = np_combine(x, lora_a, lora_b, weights, index, 0.25)
    np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("key_limit", [2**31, 0])
def test_grouped_sort_keys_and_argsort_agree(monkeypatch, key_limit):
    # One sort of expert * A + position where that fits int32, argsort past it: the same stable
    # order (equal experts keep token order), checked through the result of both paths.
    monkeypatch.setattr(routing_backends, "_SORT_KEY_LIMIT", key_limit)
    rng = np.random.default_rng(25)
    x, _, lora_a, lora_b = make_site(25, (90,), 8, 6, 5, 3)
    index = rng.integers(0, 5, (90, 2)).astype(np.int32)  # many repeats of each expert
    weights = rng.uniform(0.1, 1.0, (90, 2)).astype(np.float32)
    _, order, sorted_expert, counts = routing_backends.sort_by_expert(jnp.asarray(index), 5)
    np.testing.assert_array_equal(np.asarray(order), np.argsort(index.reshape(-1), kind="stable"))
    np.testing.assert_array_equal(np.asarray(sorted_expert), np.sort(index.reshape(-1)))
    np.testing.assert_array_equal(np.asarray(counts), np.bincount(index.reshape(-1), minlength=5))
    y = jax.jit(functools.partial(routing_backends.combine_grouped, block_size=8))(
        x, lora_a, lora_b, weights, index, 0.5)
    ref = np_combine(x, lora_a, lora_b, weights, index, 0.5)
    np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5, atol=1e-5)


def test_grouped_gradients_match_dense():
    # The grouped loop (scan + cond + scatter-add) stays reverse-differentiable.
    x, gates, lora_a, lora_b = make_site(22, (300,), 12, 9, 60, 4)
    weights, index = routing.phatgoose_route(x, gates, top_k=2)

    def loss(backend, x, a, b):
        y = routing.combine_lora(x, a, b, weights, index, 0.5, backend=backend)
        return jnp.sum(jnp.sin(y))

    args = (jnp.asarray(x), jnp.asarray(lora_a), jnp.asarray(lora_b))
    grads = {backend: jax.grad(functools.partial(loss, backend), argnums=(0, 1, 2))(*args)
             for backend in ("dense", "grouped")}
    for got, want in zip(grads["grouped"], grads["dense"]):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS[:-1])
def test_combine_bf16_returns_bf16(backend):
    x, gates, lora_a, lora_b = make_site(13, (2, 9), 16, 12, 5, 4)
    x16, a16, b16 = (jnp.asarray(v, jnp.bfloat16) for v in (x, lora_a, lora_b))
    weights, index = routing.phatgoose_route(x16, jnp.asarray(gates, jnp.bfloat16), top_k=2)
    assert weights.dtype == jnp.float32
    y = routing.combine_lora(x16, a16, b16, weights, index, 0.25, backend=backend)
    assert y.dtype == jnp.bfloat16
    ref = np_combine(np.asarray(x16, np.float32), np.asarray(a16, np.float32),
                     np.asarray(b16, np.float32), np.asarray(weights), np.asarray(index), 0.25)
    # float32 accumulation: only the final rounding to bfloat16 (8 bits of mantissa) remains.
    np.testing.assert_allclose(np.asarray(y, np.float32), ref, rtol=1e-2, atol=1e-2)


def test_zero_b_gives_zero():
    x, gates, lora_a, lora_b = make_site(14, (8,), 10, 6, 4, 2)
    weights, index = routing.phatgoose_route(x, gates, top_k=2)
    y = routing.combine_lora(x, lora_a, np.zeros_like(lora_b), weights, index, 0.5)
    np.testing.assert_array_equal(np.asarray(y), 0.0)


def test_route_and_combine_under_one_jit():
    # The whole site under an outer jit, with a traced scale: static shapes all the way through.
    x, gates, lora_a, lora_b = make_site(17, (2, 6), 10, 6, 5, 2)

    @functools.partial(jax.jit, static_argnames="backend")
    def site(x, gates, lora_a, lora_b, scale, backend):
        weights, index = routing.phatgoose_route(x, routing.prepare_router(gates), top_k=2,
                                                 gates_normed=True)
        return routing.combine_lora(x, lora_a, lora_b, weights, index, scale, backend=backend)

    weights, index = np_phatgoose_route(x, gates, 2)
    ref = np_combine(x, lora_a, lora_b, weights, index, 0.5)
    for backend in ("grouped", "gather"):
        y = site(x, gates, lora_a, lora_b, jnp.float32(0.5), backend)
        np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5, atol=1e-5)


def test_auto_rule():
    assert routing.choose_backend(4, 2, 166, platform="cpu") == "gather"
    assert routing.choose_backend(83, 2, 166, platform="cpu") == "gather"
    assert routing.choose_backend(84, 2, 166, platform="cpu") == "grouped"
    assert routing.choose_backend(2048, 2, 166, platform="cpu") == "grouped"
    assert routing.choose_backend(2048, 2, 8, platform="cpu") == "dense"
    assert routing.choose_backend(2048, 2, 9, platform="cpu") == "grouped"
    assert routing.choose_backend(2048, 2, 166, platform="tpu") == "ragged"


def test_grouped_block_size_rule():
    # The cost model's optimum, a power of two in [8, 64] (bench/README.md).
    size = routing_backends.grouped_block_size
    assert [size(2048, 2, e, 16) for e in (36, 166, 1000)] == [64, 32, 8]
    assert size(4, 2, 166, 16) == 8  # fewer assignments than experts: one small block each
    rows = routing_backends.grouped_step_rows
    assert [rows(32, 768, 768), rows(32, 768, 2048), rows(8, 2048, 5120)] == [512, 256, 64]
    assert rows(64, 12, 9) == 512 and rows(64, 8192, 8192) == 64
    assert size(1, 1, 10_000, 16) == 8 and size(10**6, 2, 2, 64) == 64
    # The default size on a shape where the rule picks 64, against the NumPy loop.
    x, gates, lora_a, lora_b = make_site(23, (2000,), 16, 9, 2, 16)
    weights, index = (np.asarray(v) for v in routing.phatgoose_route(x, gates, top_k=2))
    assert size(2000, 2, 2, 16) == 64
    y = routing.combine_lora(x, lora_a, lora_b, weights, index, 0.5, backend="grouped")
    ref = np_combine(x, lora_a, lora_b, weights, index, 0.5)
    np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(jax.device_count() < 2, reason="needs several (fake) devices")
def test_expert_sharded_library_gives_the_single_device_result():
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    n = jax.device_count()
    mesh = Mesh(np.array(jax.devices()), ("expert",))
    x, gates, lora_a, lora_b = make_site(18, (3, 7), 12, 10, 2 * n, 3)
    weights, index = np_phatgoose_route(x, gates, 2)
    ref = np_combine(x, lora_a, lora_b, weights, index, 0.5)

    def site(x, gates, lora_a, lora_b, backend):
        weights, index = routing.phatgoose_route(x, gates, top_k=2)
        return routing.combine_lora(x, lora_a, lora_b, weights, index, 0.5, backend=backend)

    on_experts = NamedSharding(mesh, P("expert"))
    sharded = [jax.device_put(v, on_experts) for v in (gates, lora_a, lora_b)]
    for backend in ("dense", "grouped"):
        y = jax.jit(site, static_argnames="backend")(x, *sharded, backend=backend)
        np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Telemetry.


def test_route_stats_match_numpy():
    rng = np.random.default_rng(15)
    x, gates, _, _ = make_site(15, (3, 11), 24, 3, 6, 2)
    weights, index = routing.phatgoose_route(x, gates, top_k=3)
    mask = rng.random((3, 11)) < 0.6
    stats = jax.jit(routing.route_stats, static_argnums=2)(weights, index, 6, mask)
    w = np.asarray(weights).reshape(-1, 3)
    i = np.asarray(index).reshape(-1, 3)
    m = mask.reshape(-1)
    counts, weight_sum = np.zeros(6, int), np.zeros(6)
    entropies = []
    for t in range(w.shape[0]):
        if not m[t]:
            continue
        for j in range(3):
            counts[i[t, j]] += 1
            weight_sum[i[t, j]] += w[t, j]
        entropies.append(-sum(p * np.log(p) for p in w[t] if p > 0))
    np.testing.assert_array_equal(np.asarray(stats.counts), counts)
    np.testing.assert_allclose(np.asarray(stats.weight), weight_sum, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(stats.mean_weight), w[m].mean(0), rtol=1e-5)
    np.testing.assert_allclose(float(stats.entropy), np.mean(entropies), rtol=1e-5)
    assert float(stats.num_tokens) == m.sum()


def test_route_stats_unmasked_and_empty_mask():
    weights = np.array([[1.0, 0.0], [0.5, 0.5]], np.float32)
    index = np.array([[0, 1], [2, 0]], np.int32)
    stats = routing.route_stats(weights, index, 3)
    np.testing.assert_array_equal(np.asarray(stats.counts), [2, 1, 1])
    np.testing.assert_allclose(float(stats.entropy), np.log(2) / 2, rtol=1e-6)
    empty = routing.route_stats(weights, index, 3, mask_T=np.zeros(2, bool))
    np.testing.assert_array_equal(np.asarray(empty.counts), 0)
    assert float(empty.entropy) == 0.0


# ----------------------------------------------------------------------------------------------
# Bad input: one clear error each, raised before anything compiles.


def _site():
    return make_site(16, (5,), 8, 4, 3, 2)


def test_top_k_out_of_range():
    x, gates, _, _ = _site()
    with pytest.raises(ValueError, match=r"between 1 and the number of experts \(3\); found 4"):
        routing.phatgoose_route(x, gates, top_k=4)
    with pytest.raises(ValueError, match=r"found 0"):
        routing.phatgoose_route(x, gates, top_k=0)
    with pytest.raises(ValueError, match=r"Python int"):
        routing.phatgoose_route(x, gates, top_k=2.0)


def test_errors_raise_while_tracing():
    x, gates, _, _ = _site()
    with pytest.raises(routing.RoutingError, match=r"found 4"):
        jax.jit(lambda x, g: routing.phatgoose_route(x, g, top_k=4))(x, gates)


def test_empty_library():
    x, _, _, _ = _site()
    with pytest.raises(ValueError, match=r"empty \(E = 0\)"):
        routing.phatgoose_route(x, np.zeros((0, 8), np.float32), top_k=1)
    with pytest.raises(ValueError, match=r"empty \(E = 0\)"):
        routing.combine_lora(x, np.zeros((0, 8, 2)), np.zeros((0, 2, 4)),
                             np.ones((5, 1)), np.zeros((5, 1), np.int32), 1.0)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_gates(bad):
    x, gates, _, _ = _site()
    gates[2, 5] = bad
    with pytest.raises(ValueError, match=r"NaN or inf in 1 of 3 experts .*\[2\]"):
        routing.phatgoose_route(x, gates, top_k=2)
    with pytest.raises(ValueError, match=r"NaN or inf"):
        routing.prepare_router(gates)
    with pytest.raises(ValueError, match=r"NaN or inf"):
        routing.arrow_route(x, gates, top_k=1)


def test_gate_shape_mismatch():
    x, gates, _, _ = _site()
    with pytest.raises(ValueError, match=r"d_in 9 but the site input x has d_in 8"):
        routing.phatgoose_route(x, np.zeros((3, 9), np.float32), top_k=2)
    with pytest.raises(ValueError, match=r"shape \(E, d_in\); found shape \(8,\)"):
        routing.phatgoose_route(x, gates[0], top_k=1)


def test_combine_shape_mismatches():
    x, gates, lora_a, lora_b = _site()
    weights, index = routing.phatgoose_route(x, gates, top_k=2)
    with pytest.raises(ValueError, match=r"lora_a has d_in 7 but the site input x has d_in 8"):
        routing.combine_lora(x, lora_a[:, :7], lora_b, weights, index, 1.0)
    with pytest.raises(ValueError, match=r"expected \(3, 2, d_out\)"):
        routing.combine_lora(x, lora_a, lora_b[:, :1], weights, index, 1.0)
    with pytest.raises(ValueError, match=r"expected \(3, 2, d_out\)"):
        routing.combine_lora(x, lora_a, lora_b[:2], weights, index, 1.0)
    with pytest.raises(ValueError, match=r"same shape; found \(5, 2\) and \(5, 1\)"):
        routing.combine_lora(x, lora_a, lora_b, weights, index[:, :1], 1.0)
    with pytest.raises(ValueError, match=r"expected weights/index of shape \(5, 'k'\)"):
        routing.combine_lora(x, lora_a, lora_b, weights[:4], index[:4], 1.0)
    with pytest.raises(ValueError, match=r"found shapes \(3, 8\)"):
        routing.combine_lora(x, lora_a[:, :, 0], lora_b, weights, index, 1.0)
    with pytest.raises(ValueError, match=r"index must be integer"):
        routing.combine_lora(x, lora_a, lora_b, weights, weights, 1.0)
    with pytest.raises(ValueError, match=r"0 <= index < 3; found values from 0 to 3"):
        routing.combine_lora(x, lora_a, lora_b, weights, np.full((5, 2), 3, np.int32) * [0, 1],
                             1.0)
    with pytest.raises(ValueError, match=r"unknown combine backend 'fast'"):
        routing.combine_lora(x, lora_a, lora_b, weights, index, 1.0, backend="fast")


def test_bad_arrow_temperature_and_stats_inputs():
    x, gates, _, _ = _site()
    with pytest.raises(ValueError, match=r"temperature must be > 0"):
        routing.arrow_route(x, gates, top_k=1, temperature=0.0)
    with pytest.raises(ValueError, match=r"mask must have shape \(5,\)"):
        routing.route_stats(np.ones((5, 2)), np.zeros((5, 2), np.int32), 3, mask_T=np.ones(4))
