"""The expert library on disk: exact round trips, adding and removing experts, and one clear
LibraryError for each way a library can fail to fit."""

import json
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import goose_jax as gj
from goose_jax.core.errors import GooseError, LibraryError
from goose_jax.core.trees import flatten_sites, nest_sites
from goose_jax.experts.lora import LoRAConfig, select_sites
from goose_jax.library.store import ExpertLibrary, weights_fingerprint
from goose_jax.models.t5.model import init_params
from goose_jax.training import program as training

CFG = gj.T5Config.preset("tiny")
LORA = LoRAConfig(rank=4, sites=r".*/(self_attn/[qv]|cross_attn/k|ffn/wo)")


# Everything here is NumPy: the library takes any arrays, and eager jax ops would only add
# compile time to these tests.


@pytest.fixture(scope="module")
def base():
    return jax.tree.map(np.asarray, init_params(CFG, 0))


def random_experts(E, seed=0):
    rng = np.random.default_rng(seed)
    return nest_sites({s: {"lora_a": rng.normal(size=(E, d_in, 4)).astype(np.float32),
                           "lora_b": rng.normal(size=(E, 4, d_out)).astype(np.float32)}
                       for s, (d_in, d_out) in select_sites(CFG, LORA).items()})


def random_gates(experts, seed=1):
    rng = np.random.default_rng(seed)
    return nest_sites({s: {"gate": rng.normal(size=leaf["lora_a"].shape[:2]).astype(np.float32)}
                       for s, leaf in flatten_sites(experts).items()})


@pytest.fixture
def lib(tmp_path, base):
    """A library with experts "a" (with a gate), "b" and "c" (no gates)."""
    lib = ExpertLibrary.create(tmp_path / "lib", CFG, base, LORA)
    experts = random_experts(3)
    lib.add("a", experts, random_gates(experts), index=0, info={"data": "task a", "steps": 5,
                                                                "metrics": {"loss": 1.5}})
    lib.add("b", training.slice_tree(experts, 1), info={"data": "task b"})
    lib.add("c", experts, index=2)
    return lib, experts


def assert_exact(a, b):
    fa, fb = flatten_sites(a), flatten_sites(b)
    assert fa.keys() == fb.keys()
    for site in fa:
        for k in fa[site]:
            x, y = np.asarray(fa[site][k]), np.asarray(fb[site][k])
            assert x.dtype == y.dtype and x.shape == y.shape, (site, k)
            assert np.array_equal(x.view(np.uint8), y.view(np.uint8)), (site, k)


def one_line_error(excinfo, *parts):
    message = str(excinfo.value)
    assert "\n" not in message and isinstance(excinfo.value, GooseError)
    for part in parts:
        assert str(part) in message, (part, message)


def test_round_trip_is_exact_in_any_order_and_subset(lib, base):
    lib, experts = lib
    reopened = ExpertLibrary.open(lib.path, CFG, base)
    assert reopened.names == ["a", "b", "c"] and reopened.rank == 4 and reopened.scale == 0.25
    assert reopened.base_config == CFG
    assert reopened.sites == {k: v for k, v in gj.site_shapes(CFG).items()
                              if k.endswith(("self_attn/q", "self_attn/v", "cross_attn/k",
                                             "ffn/wo"))}
    loaded, gates = reopened.load()
    assert gates is None  # b and c have no gates
    assert_exact(loaded, experts)
    sub, sub_gates = reopened.load(["c", "a"], gates=False)
    assert_exact(sub, training.stack_trees([training.slice_tree(experts, i) for i in (2, 0)]))
    only_a, gate_a = reopened.load(["a"])
    assert_exact(gate_a, training.slice_tree(random_gates(experts), 0))
    info = reopened.info("a")
    assert info["data"] == "task a" and info["steps"] == 5 and info["has_gate"]
    assert info["metrics"] == {"loss": 1.5} and not reopened.info("b")["has_gate"]
    with pytest.raises(LibraryError) as e:
        reopened.load(["a", "b"], gates=True)
    one_line_error(e, "without a trained gate", "'b'")


def test_bfloat16_experts_round_trip_bit_exactly(tmp_path, base):
    lib = ExpertLibrary.create(tmp_path / "lib", CFG, base, LORA)
    experts = jax.tree.map(lambda x: x.astype(ml_dtypes.bfloat16), random_experts(1, seed=4))
    lib.add("x", experts)
    loaded, _ = ExpertLibrary.open(lib.path).load(dtype=None)
    assert_exact(loaded, experts)
    assert next(iter(flatten_sites(loaded).values()))["lora_a"].dtype == jnp.bfloat16


def test_add_and_remove_touch_only_their_own_file(lib):
    lib, experts = lib
    files = {n: os.path.join(lib.path, "experts", f"{n}.safetensors") for n in "abc"}
    stamps = {n: os.stat(f).st_mtime_ns for n, f in files.items()}
    lib.remove("b")
    assert not os.path.exists(files["b"]) and ExpertLibrary.open(lib.path).names == ["a", "c"]
    lib.add("a", experts, index=1, overwrite=True)  # replaces a in place, now without a gate
    assert ExpertLibrary.open(lib.path).names == ["a", "c"]
    assert os.stat(files["c"]).st_mtime_ns == stamps["c"]
    assert_exact(lib.load(["a"])[0], training.slice_tree(experts, 1))
    with pytest.raises(LibraryError) as e:
        lib.add("c", experts, index=0)
    one_line_error(e, "already exists", "'c'")
    with pytest.raises(LibraryError) as e:
        lib.add("../evil", experts, index=0)
    one_line_error(e, "invalid expert name")
    with pytest.raises(LibraryError) as e:
        lib.add("d", experts)  # three experts, no index
    one_line_error(e, "holds 3 experts")


def test_expert_with_wrong_shapes_or_sites_is_refused(lib):
    lib, experts = lib
    flat = flatten_sites(random_experts(1))
    site = next(iter(flat))
    flat[site] = {"lora_a": np.zeros((24, 5)), "lora_b": np.zeros((5, 24))}
    with pytest.raises(LibraryError) as e:
        lib.add("d", nest_sites(flat))
    one_line_error(e, site, "expected shape (24, 4)", "found (24, 5)")
    del flat[site]
    with pytest.raises(LibraryError) as e:
        lib.add("d", nest_sites(flat))
    one_line_error(e, "missing", site)


def test_mismatched_base_model_is_refused(lib, base):
    lib, _ = lib
    with pytest.raises(LibraryError) as e:
        ExpertLibrary.open(lib.path, CFG.replace(d_ff=48), base)
    one_line_error(e, "manifest.json", "d_ff", "expected 40", "found 48")
    other = jax.tree.map(lambda x: x * 1.01, base)
    with pytest.raises(LibraryError) as e:
        ExpertLibrary.open(lib.path, CFG, other)
    one_line_error(e, "manifest.json", "weights differ", "expected fingerprint sha256:")
    # The same weights stored in bfloat16 are the same base model.
    ExpertLibrary.open(lib.path, CFG.with_dtypes("bfloat16"),
                       jax.tree.map(lambda x: x.astype(ml_dtypes.bfloat16), base))
    with pytest.raises(LibraryError) as e:
        ExpertLibrary.create(lib.path, CFG, base, LoRAConfig(rank=8, sites=LORA.sites),
                             exist_ok=True)
    one_line_error(e, "rank", "expected 8", "found 4")


def test_fingerprint_covers_names_shapes_and_sampled_values(base):
    fp = weights_fingerprint(base)
    assert fp == weights_fingerprint(jax.tree.map(jnp.asarray, base))  # host or device alike
    changed = jax.tree.map(np.copy, base)
    changed["encoder"]["final_norm"]["scale"][3] += 1.0
    assert weights_fingerprint(changed) != fp
    renamed = dict(base)
    renamed["head"] = renamed.pop("lm_head")
    assert weights_fingerprint(renamed) != fp


def test_missing_expert_file_is_refused(lib):
    lib, _ = lib
    file = os.path.join(lib.path, "experts", "b.safetensors")
    os.remove(file)
    with pytest.raises(LibraryError) as e:
        ExpertLibrary.open(lib.path)
    one_line_error(e, file, "missing", "'b'")


def test_corrupt_safetensors_file_is_refused(lib):
    lib, _ = lib
    file = os.path.join(lib.path, "experts", "c.safetensors")
    data = bytearray(open(file, "rb").read())
    # Same size, garbage header: the manifest's size check passes, parsing does not.
    open(file, "wb").write(b"\xff" * 16 + data[16:])
    with pytest.raises(LibraryError) as e:
        ExpertLibrary.open(lib.path).load(["c"])
    one_line_error(e, file, "not a readable safetensors file")
    # Truncated: caught by the size recorded in the manifest.
    open(file, "wb").write(data[:-10])
    with pytest.raises(LibraryError) as e:
        ExpertLibrary.open(lib.path).load(["c"])
    one_line_error(e, file, f"expected {len(data)} bytes", f"found {len(data) - 10}")
    # A flipped byte in the data passes the parser; verify=True compares the sha256.
    data[-1] ^= 0xFF
    open(file, "wb").write(data)
    ExpertLibrary.open(lib.path).load(["c"], verify=False)
    with pytest.raises(LibraryError) as e:
        ExpertLibrary.open(lib.path).load(["c"], verify=True)
    one_line_error(e, file, "sha256", "corrupt")


def test_unknown_manifest_version_is_refused(lib):
    lib, _ = lib
    path = os.path.join(lib.path, "manifest.json")
    manifest = json.load(open(path))
    manifest["format_version"] = 99
    json.dump(manifest, open(path, "w"))
    with pytest.raises(LibraryError) as e:
        ExpertLibrary.open(lib.path)
    one_line_error(e, path, "format_version: expected one of [1, 2], found 99")
    open(path, "w").write("{not json")
    with pytest.raises(LibraryError) as e:
        ExpertLibrary.open(lib.path)
    one_line_error(e, path, "cannot read as JSON")
    with pytest.raises(LibraryError) as e:
        ExpertLibrary.open(os.path.dirname(lib.path))
    one_line_error(e, "not an expert library")


def test_fingerprint_sees_values_at_bfloat16_precision():
    a = {"w": np.array([1.0, 2.0], np.float32)}
    b = {"w": np.array([1.0, 2.0 + 2 ** -6], np.float32)}  # one bfloat16 ulp at 2.0
    c = {"w": np.array([1.0, 2.0 + 2 ** -10], np.float32)}  # rounds to 2.0 in bfloat16
    assert weights_fingerprint(a) != weights_fingerprint(b)
    assert weights_fingerprint(a) == weights_fingerprint(c)
    assert weights_fingerprint(a) == weights_fingerprint({"w": a["w"].astype(ml_dtypes.bfloat16)})


def test_add_from_device_arrays_picks_the_indexed_expert(lib):
    # Stacked experts as they come back from training (device arrays): add copies one expert to
    # the host, and an index past the stack is refused (JAX indexing would clamp it silently).
    lib, experts = lib
    on_device = jax.tree.map(jax.numpy.asarray, experts)
    lib.add("d", on_device, index=2)
    assert_exact(lib.load(["d"])[0], training.slice_tree(experts, 2))
    with pytest.raises(LibraryError) as e:
        lib.add("e", on_device, index=3)
    one_line_error(e, "holds 3 experts", "index 3")
    assert "e" not in ExpertLibrary.open(lib.path)
