"""Two-level routing: clusters of a library's gates, the cluster-probing router against exact
PHATGOOSE routing computed independently (a NumPy loop over experts), recall, and the versioned
library format that stores the clusters."""

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tool

import goose_jax as gj
from goose_jax.core.errors import LibraryError, LibraryMismatchError
from goose_jax.core.trees import flatten_sites, nest_sites
from goose_jax.library.clusters import load_clusters
from goose_jax.library.store import ExpertLibrary
from goose_jax.routing import formula as routing
from goose_jax.routing import two_level as tl
from goose_jax.routing.methods import build_routed
from goose_jax.routing.two_level import TwoLevel

K = 2


def numpy_phatgoose(x_NI, gates_EI, top_k):
    """Exact PHATGOOSE routing, one expert at a time, in float64: (weights, index)."""
    def ln(v):
        v = np.asarray(v, np.float64)
        c = v - v.mean(-1, keepdims=True)
        return c / np.sqrt((c * c).mean(-1, keepdims=True) + 1e-5)

    xn = ln(x_NI)
    scores = np.stack([xn @ ln(g) / np.sqrt(xn.shape[-1]) for g in gates_EI], axis=-1)
    index = np.argsort(-scores, axis=-1, kind="stable")[:, :top_k]
    kept = np.take_along_axis(scores, index, axis=-1)
    w = np.exp(kept - kept.max(-1, keepdims=True))
    return w / w.sum(-1, keepdims=True), index


def ocean_gates(seed_EI, num_experts, rng):
    """Gates grown from trained ones: each a seed gate plus 0.3 of another's difference and
    noise of 0.15 of the seed's spread (the bench's scheme, smaller)."""
    seed_EI = np.asarray(seed_EI, np.float64)
    parent = np.arange(num_experts) % len(seed_EI)
    other = rng.integers(0, len(seed_EI), num_experts)
    mix = rng.uniform(0, 0.3, (num_experts, 1))
    noise = rng.standard_normal((num_experts, seed_EI.shape[1])) * seed_EI.std() * 0.15
    out = seed_EI[parent] + mix * (seed_EI[other] - seed_EI[parent]) + noise
    return out.astype(np.float32)


@pytest.fixture(scope="module")
def ocean(world):
    """The world library's trained sites, with 48 experts per site grown from its 3 gates."""
    lib = ExpertLibrary.open(world / "lib")
    _, gates = lib.load()
    rng = np.random.default_rng(0)
    grown = {site: ocean_gates(leaf["gate"], 48, rng)
             for site, leaf in flatten_sites(gates).items()}
    inputs = {site: rng.standard_normal((400, g.shape[1])).astype(np.float32)
              for site, g in grown.items()}
    return grown, inputs


@pytest.mark.parametrize("num_clusters", [1, 5, 8])
def test_probing_every_cluster_is_exact_phatgoose(ocean, num_clusters):
    grown, inputs = ocean
    for site, gates_EI in grown.items():
        cents, members = tl.cluster_vectors(routing.prepare_router(gates_EI), num_clusters)
        assert sorted(members[members >= 0].tolist()) == list(range(len(gates_EI)))
        table = tl.member_vectors(routing.prepare_router(gates_EI), members)
        w, i = tl.two_level_route(inputs[site], table, cents, members, K, num_clusters)
        ref_w, ref_i = numpy_phatgoose(inputs[site], gates_EI, K)
        np.testing.assert_array_equal(np.asarray(i), ref_i, err_msg=site)
        np.testing.assert_allclose(np.asarray(w), ref_w, atol=2e-6, err_msg=site)
        assert tl.route_recall(ref_w, ref_i, w, i) == pytest.approx((1.0, 1.0), abs=1e-6)


def test_a_narrow_search_loses_recall_and_a_wider_one_recovers_it(ocean):
    grown, inputs = ocean
    recall = {}
    for n_probe in (1, 3, 8):
        shares, masses = [], []
        for site, gates_EI in grown.items():
            gn = routing.prepare_router(gates_EI)
            cents, members = tl.cluster_vectors(gn, 8, seed=3)
            w, i = tl.two_level_route(inputs[site], tl.member_vectors(gn, members), cents,
                                      members, K, n_probe)
            share, mass = tl.route_recall(*numpy_phatgoose(inputs[site], gates_EI, K), w, i)
            shares.append(share)
            masses.append(mass)
        recall[n_probe] = (min(shares), min(masses))
    assert recall[8] == pytest.approx((1.0, 1.0), abs=1e-6)
    assert recall[1][0] < 0.95 and recall[1][1] < 0.99
    assert recall[1][0] <= recall[3][0] <= recall[8][0]


def test_clusters_are_seeded_and_deterministic(ocean):
    grown, _ = ocean
    gn = routing.prepare_router(next(iter(grown.values())))
    a = tl.cluster_vectors(gn, 6, seed=1)
    b = tl.cluster_vectors(gn, 6, seed=1)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    # Balanced: no cluster above ceil(1.5 * 48 / 6) = 12 members.
    assert (a[1] >= 0).sum(axis=1).max() <= 12


def test_route_recall_counts_sets_weights_and_mass():
    ew = np.array([[0.7, 0.3], [0.6, 0.4], [0.5, 0.5], [0.9, 0.1]])
    ei = np.array([[4, 1], [0, 2], [3, 5], [7, 6]])
    w = np.array([[0.3, 0.7], [0.6, 0.4], [0.5, 0.5], [0.9, 0.1]])   # same set, other order
    i = np.array([[1, 4], [0, 9], [3, 5], [7, 6]])
    w[3] = [0.8, 0.2]                                             # same set, other weights
    share, mass = tl.route_recall(ew, ei, w, i)
    assert share == pytest.approx(2 / 4)
    assert mass == pytest.approx((1.0 + 0.6 + 1.0 + 1.0) / 4)


def _model(world):
    cfg, params = gj.load_hf_t5(str(world / "base"))
    rng = np.random.default_rng(1)
    ids = jnp.asarray(rng.integers(2, cfg.vocab_size, (2, 9)), jnp.int32)
    dec = jnp.asarray(rng.integers(2, cfg.vocab_size, (2, 5)), jnp.int32)
    mask = jnp.ones((2, 9), jnp.int32)
    return lambda routed: np.asarray(gj.t5_logits(cfg, params, ids, dec, mask, routing=routed)), cfg


def test_library_clusters_are_versioned_and_route_like_exact(world, tmp_path):
    path = tmp_path / "lib"
    shutil.copytree(world / "lib", path)
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["format_version"] == 1 and "clusters" not in manifest
    run, cfg = _model(world)
    lib = ExpertLibrary.open(path)
    experts, gates = lib.load()
    exact = run(build_routed("phatgoose", cfg, experts, gates=gates, top_k=K, scale=lib.scale))

    done = tl.cluster_library(lib, 2, seed=0)
    assert done["experts"] == 3 and done["num_clusters"] == 2
    lib = ExpertLibrary.open(path)
    assert lib.manifest["format_version"] == 2 and lib.manifest["clusters"]["experts"] == 3
    clusters = load_clusters(lib)
    routed = build_routed("phatgoose", cfg, experts, gates=gates, top_k=K, scale=lib.scale,
                          two_level=TwoLevel(2, clusters=clusters))
    np.testing.assert_allclose(run(routed), exact, atol=1e-5)
    with pytest.raises(LibraryError, match="already has clusters"):
        tl.cluster_library(lib, 2)
    with pytest.raises(LibraryError, match="not the 2 asked for"):
        load_clusters(lib, lib.names[:2])

    # A manifest that claims clusters it lacks, or a future version, is refused.
    text = (path / "manifest.json").read_text()
    broken = json.loads(text)
    del broken["clusters"]
    (path / "manifest.json").write_text(json.dumps(broken))
    with pytest.raises(LibraryError, match="format_version 2 without a clusters record"):
        ExpertLibrary.open(path)
    broken["format_version"] = 3
    (path / "manifest.json").write_text(json.dumps(broken))
    with pytest.raises(LibraryError, match="format_version: expected one of"):
        ExpertLibrary.open(path)
    (path / "manifest.json").write_text(text)

    # Changing the experts forgets the clusters: version 1 again, and the file is gone.
    lib = ExpertLibrary.open(path)
    one = nest_sites({s: {k: v[:1] for k, v in leaf.items()}
                      for s, leaf in flatten_sites(experts).items()})
    one_gate = nest_sites({s: {"gate": v["gate"][:1]} for s, v in flatten_sites(gates).items()})
    lib.add("delta", one, one_gate)
    lib = ExpertLibrary.open(path)
    assert lib.manifest["format_version"] == 1 and "clusters" not in lib.manifest
    assert not (path / "clusters.safetensors").exists()
    with pytest.raises(LibraryError, match="no two-level routing clusters"):
        load_clusters(lib)


@pytest.mark.parametrize("method", ["arrow", "average_activation"])
def test_other_per_token_methods_share_the_path(world, method):
    run, cfg = _model(world)
    lib = ExpertLibrary.open(world / "lib")
    experts, gates = lib.load()
    kw = dict(top_k=K, scale=lib.scale)
    if method == "average_activation":   # stand-in prototypes: the gates, shifted
        kw["prototypes"] = nest_sites({s: {"gate": v["gate"] + 0.5}
                                       for s, v in flatten_sites(gates).items()})
    exact = run(build_routed(method, cfg, experts, **kw))
    every = run(build_routed(method, cfg, experts, two_level=TwoLevel(2, num_clusters=2), **kw))
    np.testing.assert_allclose(every, exact, atol=1e-5)
    with pytest.raises(LibraryMismatchError, match="n_probe"):
        build_routed(method, cfg, experts, two_level=TwoLevel(3, num_clusters=2), **kw)


def test_goose_train_clusters_stores_them_and_prints_the_cost(world, tmp_path, capsys):
    path = tmp_path / "lib"
    shutil.copytree(world / "lib", path)
    main = tool("goose-train")
    assert main(["clusters", "--library", str(path), "--clusters", "2"]) == 0
    out = capsys.readouterr().out
    assert "clustered the gates of 3 experts at 3 sites into 2 clusters" in out and " s;" in out
    assert ExpertLibrary.open(path).manifest["format_version"] == 2
    assert main(["clusters", "--library", str(path)]) != 0      # no silent rebuild
    assert main(["clusters", "--library", str(path), "--overwrite"]) == 0
    assert json.loads((path / "manifest.json").read_text())["clusters"]["num_clusters"] == 2
