"""Every family that scans (``ModelFamily.scans``) runs a scanned, rematerialised layer stack as
it runs the unrolled one, through the family contract itself: the training loss and its
gradients, greedy generation with routing telemetry, and rank classification with telemetry
(parametrized over the registry; the T5's scan is also tested on its own in test_scan.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from goose_jax.experts import lora as ex
from goose_jax.models import families
from goose_jax.models.scan import stack_layers, unstack_layers
from goose_jax.routing.methods import build_routed

# Each scanning family's tiny preset, and those of its names whose layers differ (Gemma 2's
# sliding-window and global layers alternate; its window of 3 is shorter than the sequences).
SCANNING = {**{fam.names[0]: (fam, "tiny") for fam in families.REGISTRY if fam.scans},
            "gemma2": (families.named("gemma2"), "gemma2-tiny")}
E, R = 4, 2


@pytest.fixture(scope="module", params=sorted(SCANNING))
def world(request):
    fam, preset = SCANNING[request.param]
    cfg = fam.preset(preset)
    params = fam.init_params(cfg, 0)
    rng = np.random.default_rng(3)
    lib = ex.init_experts(cfg, ex.LoRAConfig(rank=R), E, 1, fast_compile=True)
    lib = jax.tree.map(lambda x: jnp.asarray(x + 0.2 * rng.standard_normal(x.shape), x.dtype), lib)
    gates = jax.tree.map(lambda g: jnp.asarray(rng.standard_normal(g.shape), g.dtype),
                         ex.init_gates(lib))
    ids = rng.integers(3, cfg.vocab_size, (3, 7)).astype(np.int32)
    mask = np.ones((3, 7), np.int32)
    mask[1, 5:] = 0            # padding in one row
    return fam, cfg, params, lib, gates, ids, mask


def _close(a, b, atol=1e-5):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=atol)


def test_scanned_training_loss_and_gradients_equal_the_unrolled(world):
    fam, cfg, params, lib, _, ids, mask = world
    scan = cfg.replace(scan_layers=True)
    one = jax.tree.map(lambda x: x[:1], lib)
    tgt = np.random.default_rng(4).integers(3, cfg.vocab_size, (3, 4)).astype(np.int32)
    batch = {"inputs": jnp.asarray(ids), "input_mask": jnp.asarray(mask),
             "targets": jnp.asarray(tgt)}
    adapter = ex.LoRAAdapter(scale=0.5, mode="sum")

    def loss(model, remat, base, experts):
        def f(trainable):
            nll, n = fam.token_nll(model, {"params": base, ex.EXPERTS: trainable}, batch,
                                   adapter, remat=remat)
            return nll / n
        return jax.jit(jax.value_and_grad(f))(experts)

    want, g_want = loss(cfg, "none", params, one)
    got, g_got = loss(scan, "dots", stack_layers(params, scan), one)
    np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(g_want)) > 1e-6
    _close(unstack_layers(g_got), g_want)


def test_scanned_generation_and_telemetry_equal_the_unrolled(world):
    fam, cfg, params, lib, gates, ids, mask = world
    scan = cfg.replace(scan_layers=True)

    def generate(model, base):
        routed = build_routed("phatgoose", model, lib, gates=gates, telemetry=True)
        collections = routed.collections
        if model.scan_layers:
            collections = stack_layers(collections, model)
        return fam.generate(model, base, jnp.asarray(ids), 5, jnp.asarray(mask),
                            adapter=routed.adapter, collections=collections, telemetry=True,
                            fast_compile=True)

    toks, counts = generate(cfg, params)
    toks_s, counts_s = generate(scan, stack_layers(params, scan))
    np.testing.assert_array_equal(np.asarray(toks_s), np.asarray(toks))
    assert set(counts_s) == set(counts) and counts
    _close(counts_s, counts, atol=0)


@pytest.mark.parametrize("naive", [False, True])
def test_scanned_choice_scores_and_telemetry_equal_the_unrolled(world, naive):
    fam, cfg, params, lib, gates, ids, mask = world
    rng = np.random.default_rng(5)
    C, T = 2, 3
    tgt = rng.integers(3, cfg.vocab_size, (3, C, T)).astype(np.int32)
    tmask = np.ones((3, C, T), np.int32)
    tmask[0, 1, 2:] = 0
    sites = tuple(fam.site_shapes(cfg))

    def score(model, base):
        routed = build_routed("phatgoose", model, lib, gates=gates, telemetry=True)
        collections = dict(routed.collections)
        if model.scan_layers:
            collections = stack_layers(collections, model)
            base = stack_layers(base, model)
        variables = {"params": base, **collections}
        nll, counts = fam.choice_scorer(True)(
            model, routed.adapter, variables, variables, jnp.asarray(ids), jnp.asarray(mask),
            jnp.asarray(tgt), jnp.asarray(tmask), naive=naive, sites=sites)
        return nll, counts

    nll, counts = score(cfg, params)
    nll_s, counts_s = score(cfg.replace(scan_layers=True), params)
    np.testing.assert_allclose(np.asarray(nll_s), np.asarray(nll), rtol=1e-5, atol=1e-5)
    assert counts and set(counts_s) == set(counts)
    _close(counts_s, counts, atol=0)
