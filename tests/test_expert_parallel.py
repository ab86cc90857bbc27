"""Expert parallelism: the library split over the mesh's ``expert`` axis, never gathered, and the
routed model equal to the single-device one (goose_jax.routing.expert_parallel,
build_routed(mesh=))."""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import needs_8_devices, one_line, tool

import goose_jax as gj
from goose_jax.core import sharding
from goose_jax.experts import lora as ex
from goose_jax.routing.methods import EXPERTS, ROUTER, build_routed

main = tool("goose-eval")
CFG = gj.T5Config(vocab_size=101, d_model=24, d_kv=8, num_heads=3, d_ff=40, num_encoder_layers=1,
                  num_decoder_layers=1, relative_attention_num_buckets=8,
                  relative_attention_max_distance=20, feed_forward_proj="gated-gelu")
SCALE = 0.5


def _args(world, out, *extra):
    return ["--base", str(world / "base"), "--byte-tokenizer", "--bbh-root", str(world / "bbh"),
            "--out", str(out), "--no-progress", "--batch-size", "4", "--library",
            str(world / "lib"), *extra]


def _library(E: int, seed: int):
    rng = np.random.default_rng(seed)
    lib = ex.init_experts(CFG, ex.LoRAConfig(rank=2, sites=r".*(self_attn/q|ffn/wo)"), E, 0)
    lib = jax.tree.map(lambda x: rng.standard_normal(x.shape).astype(np.float32), lib)
    gates = jax.tree.map(lambda g: rng.standard_normal(g.shape).astype(np.float32),
                         ex.init_gates(lib))
    return lib, gates


@needs_8_devices
@pytest.mark.parametrize("method", ["phatgoose", "arrow", "average_activation"])
def test_goose_eval_on_an_expert_mesh_gives_the_single_device_results(world, tmp_path, method):
    """3 experts on expert=4 (one padding expert): the same predictions, choice scores and
    top-1 telemetry (the same routing choices) as the run without an expert axis."""
    from goose_jax.library.store import ExpertLibrary, save_prototypes

    extra = ["--method", method, "--tasks", "bbh/boolean_expressions"]
    if method == "phatgoose":
        extra[-1] += ",bbh/object_counting"   # generation too
    if method == "average_activation":
        rng = np.random.default_rng(1)
        sites = ExpertLibrary.open(world / "lib").sites
        save_prototypes(ex.nest_sites({s: {"gate": rng.standard_normal((3, d_in))}
                                       for s, (d_in, _) in sites.items()}),
                        str(tmp_path / "p.st"))
        extra += ["--prototypes", str(tmp_path / "p.st")]
    runs = {}
    variants = [("plain", []), ("mesh", ["--mesh", "data=2,expert=4"])]
    if method == "phatgoose":   # the scanned blocks on the same mesh, too
        variants.append(("scan", ["--mesh", "data=2,expert=4", "--scan-layers"]))
    for name, mesh in variants:
        assert main(_args(world, tmp_path / name, *extra, *mesh)) == 0
        out = tmp_path / name
        runs[name] = ([json.loads(line) for line in
                       (out / "predictions.jsonl").read_text().splitlines()],
                      json.loads((out / "telemetry.json").read_text())["top1_counts"],
                      json.loads((out / "results.json").read_text()))
    (plain, plain_tele, _), (mesh, mesh_tele, summary) = runs["plain"], runs["mesh"]
    assert summary["mesh"] == {"data": 2, "model": 1, "expert": 4}
    assert [p["prediction"] for p in mesh] == [p["prediction"] for p in plain]
    for a, b in zip(plain, mesh):
        if "scores" in a:   # written rounded to 5 decimals
            np.testing.assert_allclose(b["scores"], a["scores"], rtol=0, atol=1.0001e-5)
    assert mesh_tele == plain_tele
    if "scan" in runs:
        scan, scan_tele, _ = runs["scan"]
        assert [p["prediction"] for p in scan] == [p["prediction"] for p in plain]
        for a, b in zip(plain, scan):
            if "scores" in a:
                np.testing.assert_allclose(b["scores"], a["scores"], rtol=0, atol=1.0001e-5)
        assert scan_tele == plain_tele


@needs_8_devices
@pytest.mark.parametrize("E", [6, 8])
def test_every_device_holds_its_share_of_the_library(E):
    """6 experts on expert=4 are padded to 8 (2 per device, the padding zero); a library loaded
    already padded (num_experts=6) is laid out alike; nothing is whole on a device."""
    mesh = sharding.make_mesh(data=2, expert=4)
    lib, gates = _library(E, 3)
    routed = [build_routed(m, CFG, lib, gates=gates, prototypes=gates, mesh=mesh, scale=SCALE)
              for m in ("phatgoose", "arrow", "average_activation")]
    padded = sharding.pad_experts(lib, 4)
    routed.append(build_routed("phatgoose", CFG, sharding.shard_experts(padded, mesh),
                               gates=sharding.pad_experts(gates, 4), num_experts=E,
                               mesh=mesh, scale=SCALE))
    for r in routed:
        assert r.adapter.num_experts == (E if E % 4 else 0)
        leaves = jax.tree.leaves({k: r.collections[k] for k in (EXPERTS, ROUTER)})
        assert len(leaves) == 3 * len(ex.flatten_sites(lib))
        for leaf in leaves:
            assert leaf.shape[0] == 8
            shards = leaf.addressable_shards
            assert {s.data.shape[0] for s in shards} == {2}
            assert {s.index[0].start or 0 for s in shards} == {0, 2, 4, 6}
            np.testing.assert_array_equal(np.asarray(leaf)[E:], 0)
    for site, leaf in ex.flatten_sites(routed[0].collections[EXPERTS]).items():
        np.testing.assert_array_equal(np.asarray(leaf["lora_a"])[:E],
                                      ex.flatten_sites(lib)[site]["lora_a"])


@needs_8_devices
def test_a_padded_library_routes_as_the_unpadded_one_and_is_never_gathered():
    """The compiled routed scorer of 6 experts on expert=4 has no all-gather whose result is a
    whole library leaf, and its scores equal the single-device model's."""
    from goose_jax.models.t5.scoring import CHOICE_NLL

    params = gj.init_params(CFG, 2)
    lib, gates = _library(6, 4)
    mesh = sharding.make_mesh(data=2, expert=4)
    rng = np.random.default_rng(5)
    ids = rng.integers(2, CFG.vocab_size, (4, 8)).astype(np.int32)
    mask = np.ones_like(ids)
    tgt = rng.integers(2, CFG.vocab_size, (4, 2, 4)).astype(np.int32)
    tmask = np.ones_like(tgt)
    put = lambda a: jax.device_put(a, sharding.batch_sharding(mesh, a.ndim))  # noqa: E731
    batch = [put(a) for a in (ids, mask, tgt, tmask)]
    on_mesh = sharding.shard_params(params, gj.param_logical_axes(CFG), mesh)
    score = CHOICE_NLL[True]

    def run(routed, p, args):
        v = {"params": p, **routed.collections}
        lowered = score.lower(CFG, routed.adapter, v, v, *args)
        return np.asarray(score(CFG, routed.adapter, v, v, *args)[0]), \
            lowered.compile().as_text()

    single = build_routed("phatgoose", CFG, lib, gates=gates, scale=SCALE)
    want, _ = run(single, params, (ids, mask, tgt, tmask))
    split = build_routed("phatgoose", CFG, lib, gates=gates, scale=SCALE, mesh=mesh)
    got, hlo = run(split, on_mesh, batch)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    shapes = {leaf.shape for leaf in jax.tree.leaves(split.collections)}
    assert (8, 24, 2) in shapes
    assert not _gathered(hlo) & shapes, _gathered(hlo) & shapes
    # The check sees a library leaf gathered whole (here on purpose, to replicate it).
    leaf = ex.flatten_sites(split.collections[EXPERTS])["encoder/block_0/ffn/wo"]["lora_a"]
    whole = jax.jit(lambda a: 2 * a, out_shardings=sharding.NamedSharding(
        mesh, sharding.PartitionSpec()))
    assert (8, 40, 2) in _gathered(whole.lower(leaf).compile().as_text())


def _gathered(hlo: str) -> set[tuple[int, ...]]:
    """The result shapes of every all-gather in compiled HLO text."""
    out = set()
    for line in hlo.splitlines():
        # "%name = f32[8,40,2]{2,1,0} all-gather(...)" (async: a tuple before all-gather-start)
        found = re.search(r"=\s*(.*?)\sall-gather(?:-start)?\(", line)
        if found:
            out |= {tuple(int(d) for d in dims.split(",") if d)
                    for dims in re.findall(r"\w+\[([\d,]*)\]", found.group(1))}
    return out


@needs_8_devices
@pytest.mark.parametrize("mesh, code, message", [
    # A --mesh the devices cannot hold is a usage error too (exit 2), as a malformed one.
    ("data=3,expert=2", 2, "--mesh data=3,expert=2: .*need 6 devices, have 8; give sizes whose "
                           "product is 8"),
    ("data=2,experts=4", 2, "--mesh: mesh 'data=2,experts=4': expected AXIS=SIZE pairs"),
])
def test_a_bad_mesh_fails_in_one_line_before_any_work(world, tmp_path, capsys, mesh, code,
                                                      message):
    out = tmp_path / "out"
    assert main(_args(world, out, "--tasks", "bbh/boolean_expressions", "--mesh", mesh)) == code
    assert re.search(message, one_line(capsys.readouterr().err, "goose-eval")), message
    assert not out.exists()


def test_pad_experts_appends_zero_experts():
    tree = {"a": np.ones((3, 2), np.float32), "b": {"c": jnp.arange(6.0).reshape(3, 2, 1)}}
    out = sharding.pad_experts(tree, 4)
    np.testing.assert_array_equal(out["a"], np.r_[np.ones((3, 2)), np.zeros((1, 2))])
    np.testing.assert_array_equal(out["b"]["c"][:3], tree["b"]["c"])
    assert out["b"]["c"].shape == (4, 2, 1) and not np.asarray(out["b"]["c"][3]).any()
    assert sharding.pad_experts(tree, 3)["a"] is tree["a"]
