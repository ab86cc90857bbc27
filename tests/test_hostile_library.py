"""Hostile inputs and faults against the expert library: concurrent writers, corrupt and escaping
expert files, bad manifest fields, non-finite weights and metrics.

Each case goes through the Python API and, where a tool reads the library, through goose-eval
(``--method merged``) and ``goose-convert to-peft``: exit code 1, one line on stderr without a
traceback, and no file of the library changed (its tree hashed before and after).
"""

import hashlib
import json
import math
import os
import shutil
import struct
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import one_line, tool, tree_hash

import goose_jax as gj
from goose_jax.core.errors import LibraryError
from goose_jax.core.trees import nest_sites
from goose_jax.experts.lora import LoRAConfig
from goose_jax.library.store import ExpertLibrary

CFG = gj.T5Config(vocab_size=300, d_model=24, d_kv=8, num_heads=3, d_ff=40, num_encoder_layers=1,
                  num_decoder_layers=1, relative_attention_num_buckets=8,
                  relative_attention_max_distance=20, feed_forward_proj="gated-gelu",
                  tie_word_embeddings=False)
LORA = LoRAConfig(rank=2,
                  sites=r"encoder/block_0/self_attn/q|decoder/block_0/(cross_attn/k|ffn/wo)")
NAMES = ("alpha", "beta", "gamma")


def make_expert(sites, seed, gate=True):
    """(experts, gates) trees of one expert at ``sites`` (name -> (d_in, d_out)), rank 2."""
    rng = np.random.default_rng(seed)
    experts = {s: {"lora_a": rng.standard_normal((i, 2), np.float32),
                   "lora_b": rng.standard_normal((2, o), np.float32)}
               for s, (i, o) in sites.items()}
    gates = {s: {"gate": rng.standard_normal((i,), np.float32)} for s, (i, _) in sites.items()}
    return nest_sites(experts), (nest_sites(gates) if gate else None)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A saved tiny base, a library of three gated experts for it, and one BBH task."""
    from datasets import Dataset, DatasetDict

    root = tmp_path_factory.mktemp("world")
    params = gj.init_params(CFG, 5)
    gj.save_hf_t5(CFG, params, root / "base")
    np.savez(root / "base.npz", **{k: np.asarray(v) for k, v in _flat(params).items()})
    lib = ExpertLibrary.create(root / "lib", CFG, params, LORA)
    for seed, name in enumerate(NAMES):
        lib.add(name, *make_expert(lib.sites, seed), info={"data": name, "steps": 1})
    DatasetDict({"test": Dataset.from_list(
        [{"input": f"{a} and {b}", "target": str(a and b)}
         for a in (True, False) for b in (True, False)])}).save_to_disk(
        str(root / "bbh" / "boolean_expressions"))
    return root


def _flat(tree, prefix=""):
    if not isinstance(tree, dict):
        return {prefix[:-1]: tree}
    return {k: v for key, sub in tree.items() for k, v in _flat(sub, f"{prefix}{key}/").items()}


@pytest.fixture
def lib(world, tmp_path):
    """A private copy of the world's library (corrupt it freely)."""
    return shutil.copytree(world / "lib", tmp_path / "lib", symlinks=True)


def manifest_of(lib):
    return json.loads(open(os.path.join(lib, "manifest.json")).read())


def write_manifest(lib, manifest):
    with open(os.path.join(lib, "manifest.json"), "w") as f:
        f.write(manifest if isinstance(manifest, str) else json.dumps(manifest))


def expert_file(lib, name):
    return os.path.join(lib, "experts", f"{name}.safetensors")


def assert_refused_everywhere(world, lib, tmp_path, capsys, expert, *parts):
    """The API, goose-convert to-peft and goose-eval --method merged each refuse ``lib`` in one
    line holding ``parts``, exit 1, and change none of its files."""
    before = tree_hash(lib)
    with pytest.raises(LibraryError) as e:
        ExpertLibrary.open(lib).load()
    message = str(e.value)
    assert "\n" not in message and all(p in message for p in parts), message
    runs = [("goose-convert", ["to-peft", str(lib), expert, str(tmp_path / "peft")]),
            ("goose-eval", ["--base", str(world / "base"), "--byte-tokenizer", "--bbh-root",
                            str(world / "bbh"), "--out", str(tmp_path / "eval"), "--no-progress",
                            "--library", str(lib), "--method", "merged", "--tasks",
                            "bbh/boolean_expressions"])]
    for name, argv in runs:
        assert tool(name)(argv) == 1
        line = one_line(capsys.readouterr().err, name)
        assert all(p in line for p in parts), line
    assert not (tmp_path / "peft").exists()
    assert tree_hash(lib) == before


# --- concurrent writers ------------------------------------------------------------------------

WRITER = r"""
import os, sys, time
import numpy as np
from goose_jax.library import store as library
from test_hostile_library import CFG, LORA, make_expert

path, who, go, create, remove = sys.argv[1], int(sys.argv[2]), sys.argv[3], *sys.argv[4:6]
write = library.ExpertLibrary._write_manifest


def slow_write(self):  # widens the window between reading the manifest and writing it
    time.sleep(0.05)
    write(self)


library.ExpertLibrary._write_manifest = slow_write
open(f"{go}.{who}", "w").close()
while not os.path.exists(go):
    time.sleep(0.005)
if create:
    base = dict(np.load(create))
    lib = library.ExpertLibrary.create(path, CFG, base, LORA, exist_ok=True)
else:
    lib = library.ExpertLibrary.open(path)
for j in range(3):
    lib.add(f"w{who}-{j}", *make_expert(lib.sites, 100 * who + j, gate=j % 2 == 0))
    if remove and j == 1:
        lib.remove(remove)
"""


def run_writers(tmp_path, path, create="", remove=()):
    """Four processes, started together, each adding three experts (and removing one)."""
    go = str(tmp_path / "go")
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join(
        [os.path.dirname(__file__), os.path.dirname(os.path.dirname(gj.__file__))]))
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(w), go, create,
                               remove[w] if remove else ""], env=env, stderr=subprocess.PIPE)
             for w in range(4)]
    deadline = time.time() + 120
    while not all(os.path.exists(f"{go}.{w}") for w in range(4)) and time.time() < deadline:
        time.sleep(0.01)
    open(go, "w").close()
    for p in procs:
        assert p.wait(120) == 0, p.stderr.read().decode()
    return {f"w{w}-{j}" for w in range(4) for j in range(3)}


def assert_all_present(path, names):
    lib = ExpertLibrary.open(path)
    assert set(lib.names) == names and len(lib.names) == len(names)
    experts, _ = lib.load(sorted(names), gates=False)
    for i, name in enumerate(sorted(names)):
        w, j = (int(x) for x in name[1:].split("-"))
        want, gate = make_expert(lib.sites, 100 * w + j, gate=j % 2 == 0)
        site = "encoder/block_0/self_attn/q"
        got = experts["encoder"]["block_0"]["self_attn"]["q"]["lora_a"][i]
        np.testing.assert_array_equal(got, want["encoder"]["block_0"]["self_attn"]["q"]["lora_a"])
        assert lib.info(name)["has_gate"] == (gate is not None), site
    on_disk = set(os.listdir(os.path.join(path, "experts")))
    assert on_disk == {f"{n}.safetensors" for n in names}


def test_concurrent_writers_lose_no_expert(lib, tmp_path):
    names = run_writers(tmp_path, lib, remove=["alpha", "beta", "gamma", ""])
    assert_all_present(lib, names)


def test_concurrent_creators_share_one_library(world, tmp_path):
    path = tmp_path / "fresh"
    names = run_writers(tmp_path, path, create=str(world / "base.npz"))
    assert_all_present(path, names)


def test_add_of_a_name_a_concurrent_writer_took_is_refused(lib):
    stale = ExpertLibrary.open(lib)
    other = ExpertLibrary.open(lib)
    other.add("delta", *make_expert(other.sites, 7))
    before = tree_hash(lib)
    with pytest.raises(LibraryError) as e:
        stale.add("delta", *make_expert(stale.sites, 8))
    assert "'delta' already exists" in str(e.value)
    assert tree_hash(lib) == before
    stale.remove("alpha")  # acts on the manifest on disk: delta, added meanwhile, stays
    assert ExpertLibrary.open(lib).names == ["beta", "gamma", "delta"]


# --- corruption on disk ------------------------------------------------------------------------


def flip_last_byte(lib):
    data = bytearray(open(expert_file(lib, "beta"), "rb").read())
    data[-1] ^= 0x01
    open(expert_file(lib, "beta"), "wb").write(data)
    return "sha256"


def truncate(lib):
    data = open(expert_file(lib, "beta"), "rb").read()
    open(expert_file(lib, "beta"), "wb").write(data[:-4])
    return "truncated"


def swap_with_a_sibling(lib):  # a valid file of the same size, not the one recorded
    shutil.copyfile(expert_file(lib, "alpha"), expert_file(lib, "beta"))
    return "sha256"


def garble_header(lib):
    data = open(expert_file(lib, "beta"), "rb").read()
    open(expert_file(lib, "beta"), "wb").write(b"\xff" * 12 + data[12:])
    return "not a readable safetensors file"


@pytest.mark.parametrize("corrupt", [flip_last_byte, truncate, swap_with_a_sibling, garble_header])
def test_corrupt_expert_file_is_refused(world, lib, tmp_path, capsys, corrupt):
    word = corrupt(lib)
    assert_refused_everywhere(world, lib, tmp_path, capsys, "beta", word, expert_file(lib, "beta"))


def test_default_load_verifies_and_verify_false_does_not(lib):
    flip_last_byte(lib)
    with pytest.raises(LibraryError) as e:
        ExpertLibrary.open(lib).load(["beta"])
    assert "expert 'beta'" in str(e.value) and "add the expert again" in str(e.value)
    ExpertLibrary.open(lib).load(["beta"], verify=False)  # size and header only


# --- expert files outside the library ----------------------------------------------------------


def absolute_path(lib, outside):
    return outside, "beta"


def dot_dot(lib, outside):
    return os.path.relpath(outside, lib), "beta"


def symlink_out(lib, outside):
    os.remove(expert_file(lib, "beta"))
    os.symlink(outside, expert_file(lib, "beta"))
    return "experts/beta.safetensors", "beta"


def symlinked_dir(lib, outside):  # every expert is outside now; the first is named
    moved = os.path.join(os.path.dirname(outside), "moved")
    os.rename(os.path.join(lib, "experts"), moved)
    os.symlink(moved, os.path.join(lib, "experts"))
    return "experts/beta.safetensors", "alpha"


@pytest.mark.parametrize("escape", [absolute_path, dot_dot, symlink_out, symlinked_dir])
def test_expert_file_outside_the_library_is_refused(world, lib, tmp_path, capsys, escape):
    os.makedirs(tmp_path / "elsewhere")
    outside = str(tmp_path / "elsewhere" / "beta.safetensors")
    shutil.copyfile(expert_file(lib, "beta"), outside)  # a valid file: only its place is wrong
    manifest = manifest_of(lib)
    manifest["experts"][1]["file"], named = escape(lib, outside)
    write_manifest(lib, manifest)
    assert_refused_everywhere(world, lib, tmp_path, capsys, "beta", "manifest.json",
                              f"expert {named!r}", "outside the library")


# --- bad manifest fields -----------------------------------------------------------------------


def _t5_config(manifest, drop):
    del manifest["base_model"]["t5_config"][drop]
    return manifest


def _entry(field, value):
    def change(m):
        if value is KeyError:
            del m["experts"][1][field]
        else:
            m["experts"][1][field] = value
        return m
    return change


@pytest.mark.parametrize("change, parts", [
    (lambda m: [m], ["expected a JSON object, found list"]),
    (lambda m: "{not json", ["cannot read as JSON"]),
    (lambda m: {**m, "format_version": 3}, ["format_version: expected one of [1, 2], found 3"]),
    (lambda m: {**m, "format_version": 2}, ["format_version 2 without a clusters record"]),
    (lambda m: {**m, "clusters": {"file": "clusters.safetensors"}},
     ["format_version 1 with a clusters record"]),
    (lambda m: {**m, "format_version": 2, "clusters": {"file": "x"}}, ["clusters: expected"]),
    (lambda m: {**m, "lora": {**m["lora"], "rank": "2"}}, ["lora: expected"]),
    (lambda m: {**m, "sites": {"x": [24]}}, ["sites: expected"]),
    (lambda m: {**m, "experts": {}}, ["experts: expected a list"]),
    (lambda m: {k: v for k, v in m.items() if k != "sites"}, ["manifest lacks 'sites'"]),
    (lambda m: _t5_config(m, "d_model"), ["base_model.t5_config", "d_model"]),
    (lambda m: _t5_config(m, "tie_word_embeddings"), ["t5_config: field 'tie_word_embeddings'"]),
    (_entry("sha256", KeyError), ["experts[1] ('beta')", "field 'sha256' is missing"]),
    (_entry("bytes", "12"), ["experts[1] ('beta')", "field 'bytes'", "found str"]),
    (_entry("has_gate", "yes"), ["experts[1] ('beta')", "field 'has_gate'"]),
    (_entry("name", "../x"), ["experts[1]", "field 'name'"]),
    (_entry("name", "alpha"), ["experts[1] ('alpha')", "a second expert named"]),
    (_entry("metrics", [1]), ["experts[1] ('beta')", "field 'metrics'"]),
    (lambda m: {**m, "experts": [m["experts"][0], "beta"]}, ["experts[1]", "found str"]),
])
def test_bad_manifest_is_refused_at_open(world, lib, tmp_path, capsys, change, parts):
    write_manifest(lib, change(manifest_of(lib)))
    assert_refused_everywhere(world, lib, tmp_path, capsys, "beta", "manifest.json", *parts)


# --- non-finite weights and metrics ------------------------------------------------------------


@pytest.mark.parametrize("where, bad", [("lora_a", np.nan), ("lora_b", np.inf),
                                        ("gate", -np.inf), ("bf16", np.nan)])
def test_add_refuses_non_finite_weights(lib, where, bad):
    import ml_dtypes

    lib = ExpertLibrary.open(lib)
    experts, gates = make_expert(lib.sites, 9)
    site = experts["decoder"]["block_0"]["ffn"]["wo"]
    if where == "bf16":
        site["lora_a"] = site["lora_a"].astype(ml_dtypes.bfloat16)
        where = "lora_a"
    (gates["decoder"]["block_0"]["ffn"]["wo"] if where == "gate" else site)[where][1] = bad
    before = tree_hash(lib.path)
    with pytest.raises(LibraryError) as e:
        lib.add("delta", experts, gates)
    assert "expert 'delta'" in str(e.value) and f"decoder/block_0/ffn/wo/{where}" in str(e.value)
    assert "non-finite" in str(e.value) and "\n" not in str(e.value)
    assert tree_hash(lib.path) == before and "delta" not in ExpertLibrary.open(lib.path)


def test_non_finite_weights_already_on_disk_are_refused(world, lib, tmp_path, capsys):
    """A file written before the guard (or by hand), whose recorded sha256 matches."""
    from goose_jax.core.tensorfile import read_safetensors, safetensors_bytes

    tensors = read_safetensors(expert_file(lib, "beta"))
    tensors["encoder/block_0/self_attn/q/lora_b"][0, 3] = np.nan
    data = safetensors_bytes(tensors)
    open(expert_file(lib, "beta"), "wb").write(data)
    manifest = manifest_of(lib)
    manifest["experts"][1].update(bytes=len(data),
                                  sha256="sha256:" + hashlib.sha256(data).hexdigest())
    write_manifest(lib, manifest)
    assert_refused_everywhere(world, lib, tmp_path, capsys, "beta", "expert 'beta'",
                              "encoder/block_0/self_attn/q/lora_b", "1 non-finite")


def strict(text):
    def refuse(constant):
        raise AssertionError(f"not strict JSON: {constant}")
    return json.loads(text, parse_constant=refuse)


@pytest.mark.parametrize("metrics, stored", [
    ({"loss": math.nan, "acc": 0.5}, {"loss": None, "acc": 0.5}),
    ({"loss": [1.0, math.inf, -math.inf]}, {"loss": [1.0, None, None]}),
    ({"eval": {"loss": np.float64("nan")}}, {"eval": {"loss": None}}),
])
def test_non_finite_metrics_are_stored_as_null(lib, metrics, stored):
    lib = ExpertLibrary.open(lib)
    lib.add("delta", *make_expert(lib.sites, 9), info={"metrics": metrics, "extra": math.nan})
    manifest = strict(open(os.path.join(lib.path, "manifest.json")).read())
    assert manifest["experts"][-1]["metrics"] == stored
    assert manifest["experts"][-1]["extra"] is None


def test_a_bare_nan_left_by_an_older_writer_is_rewritten_as_null(lib):
    text = open(os.path.join(lib, "manifest.json")).read()
    write_manifest(lib, text.replace('"metrics": {}', '"metrics": {"loss": NaN}', 1))
    old = ExpertLibrary.open(lib)
    assert math.isnan(old.info("alpha")["metrics"]["loss"])  # readable as it is
    old.add("delta", *make_expert(old.sites, 9))
    manifest = strict(open(os.path.join(lib, "manifest.json")).read())
    assert manifest["experts"][0]["metrics"] == {"loss": None}
    assert [e["name"] for e in manifest["experts"]] == [*NAMES, "delta"]


def test_info_that_is_not_json_or_mistyped_is_refused(lib):
    lib = ExpertLibrary.open(lib)
    before = tree_hash(lib.path)
    for info, word in (({"metrics": {"loss": np.float32(1.0)}}, "not JSON"),
                       ({"steps": "ten"}, "field 'steps'"), ({"metrics": [1.0]}, "'metrics'")):
        with pytest.raises(LibraryError) as e:
            lib.add("delta", *make_expert(lib.sites, 9), info=info)
        assert "'delta'" in str(e.value) and word in str(e.value), str(e.value)
    assert tree_hash(lib.path) == before


def test_expert_files_are_the_same_bytes_every_time(lib):
    """safetensors writes the header's metadata in a hash map's order, which changes from one
    map to the next (and from process to process); an expert file, and so its sha256 in the
    manifest, must not."""
    library = ExpertLibrary.open(lib)
    experts, gates = make_expert(library.sites, 7)
    got = set()
    for _ in range(12):
        library.add("same", experts, gates, info={"data": "d", "steps": 3}, overwrite=True)
        with open(expert_file(lib, "same"), "rb") as f:
            raw = f.read()
        assert manifest_of(lib)["experts"][-1]["sha256"] == (
            "sha256:" + hashlib.sha256(raw).hexdigest())
        got.add(raw)
    assert len(got) == 1
    raw = got.pop()
    n = struct.unpack("<Q", raw[:8])[0]
    assert n % 8 == 0
    meta = json.loads(raw[8:8 + n])["__metadata__"]
    assert list(meta) == sorted(meta) and len(meta) >= 3
