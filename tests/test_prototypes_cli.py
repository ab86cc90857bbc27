"""`goose-train prototypes` end to end on a random tiny base with the byte tokenizer: the file it
stores in the library, its refusals, and `goose-eval --method average_activation` finding it."""

import hashlib
import json
import pathlib

import numpy as np
import pytest
from conftest import tool

from goose_jax.core.trees import flatten_sites

train = tool("goose-train")
evaluate = tool("goose-eval")

TINY = str(pathlib.Path(__file__).resolve().parents[1] / "configs" / "tiny.py")
SITES = r"encoder/block_0/self_attn/q|decoder/block_0/(self_attn/v|cross_attn/k)"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A random base checkpoint (byte vocabulary), a library of two random experts at three
    sites, their data files, and one BIG-bench task."""
    from datasets import Dataset, DatasetDict

    import goose_jax as gj
    from goose_jax.core.trees import nest_sites
    from goose_jax.experts.lora import LoRAConfig
    from goose_jax.library.store import ExpertLibrary
    from goose_jax.models.checkpoint import save_model
    from goose_jax.models.t5.model import init_params

    root = tmp_path_factory.mktemp("protos")
    cfg = gj.T5Config.preset("tiny").replace(vocab_size=259, num_encoder_layers=1,
                                             num_decoder_layers=1)
    params = init_params(cfg, 0)
    save_model(root / "base", cfg, params)
    lib = ExpertLibrary.create(root / "lib", cfg, params, LoRAConfig(rank=2, sites=SITES))
    rng = np.random.default_rng(0)
    for name in ("reverse", "upper"):
        lib.add(name, nest_sites({
            site: {"lora_a": rng.standard_normal((d_in, 2), np.float32),
                   "lora_b": rng.standard_normal((2, d_out), np.float32)}
            for site, (d_in, d_out) in lib.sites.items()}))
    words = ["goose", "jax", "flax", "route", "token", "lora", "gate"]
    for name, rows in (("reverse", [(f"reverse: {w}", w[::-1]) for w in words]),
                       ("upper", [(f"upper the word: {w}", w.upper()) for w in words[:5]])):
        (root / f"{name}.jsonl").write_text(
            "".join(json.dumps({"input": i, "target": t}) + "\n" for i, t in rows))
    DatasetDict({"test": Dataset.from_list(
        [{"input": f"{a} and {b}", "target": str(a and b)}
         for a in (True, False) for b in (True, False)])}).save_to_disk(
        str(root / "bbh" / "boolean_expressions"))
    return root


def _args(world, lib, *extra):
    return ["prototypes", "--config", TINY, "--base", str(world / "base"), "--library",
            str(lib), "--data", str(world / "reverse.jsonl"), str(world / "upper.jsonl"),
            "--batch-size", "3", *extra]


def _one_line_error(capsys, prog):
    err = capsys.readouterr().err.strip()
    assert err.startswith(prog) and ": error:" in err, err
    assert "\n" not in err and "Traceback" not in err
    return err


def _copy_library(world, tmp_path):
    import shutil

    shutil.copytree(world / "lib", tmp_path / "lib")
    return tmp_path / "lib"


def _digest(path):
    return hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()


def test_prototypes_stored_in_the_library(world, tmp_path, capsys):
    from goose_jax.core.tensorfile import SafetensorsFile
    from goose_jax.library.prototypes import PROTOTYPES_FILE, load_prototypes, prototype_names

    lib = _copy_library(world, tmp_path)
    assert train(_args(world, lib, "--names", "upper", "reverse", "--examples", "6")) == 0
    path = lib / PROTOTYPES_FILE
    assert "prototypes of 2 experts (example pooling, 5-6 examples each)" in \
        capsys.readouterr().out
    assert prototype_names(str(path)) == ["upper", "reverse"]
    info = json.loads(SafetensorsFile(str(path)).metadata["info"])
    assert info["pooling"] == "example" and info["examples"] == {"upper": 6, "reverse": 5}
    stored = flatten_sites(load_prototypes(str(path)))
    assert set(stored) == {"encoder/block_0/self_attn/q", "decoder/block_0/self_attn/v",
                           "decoder/block_0/cross_attn/k"}
    # Rows are picked by name, in the order asked for.
    by_name = flatten_sites(load_prototypes(str(path), ["reverse", "upper"]))
    for site, leaf in stored.items():
        assert leaf["gate"].shape == (2, 24) and np.isfinite(leaf["gate"]).all()
        np.testing.assert_array_equal(by_name[site]["gate"], leaf["gate"][::-1])

    # A second run is refused without --overwrite, and the file is untouched.
    before = _digest(path)
    assert train(_args(world, lib, "--names", "upper", "reverse", "--pooling", "token")) == 1
    err = _one_line_error(capsys, "goose-train")
    assert PROTOTYPES_FILE in err and "--overwrite" in err
    assert _digest(path) == before
    assert train(_args(world, lib, "--names", "upper", "reverse", "--pooling", "token",
                       "--examples", "6", "--overwrite")) == 0
    token = flatten_sites(load_prototypes(str(path)))
    assert json.loads(SafetensorsFile(str(path)).metadata["info"])["pooling"] == "token"
    # Ragged examples: the two poolings differ (where tokens of different lengths are pooled).
    site = "encoder/block_0/self_attn/q"
    assert not np.allclose(token[site]["gate"], stored[site]["gate"], atol=1e-4)


def test_one_example_pools_the_same_either_way(world, tmp_path):
    """With one example per expert, the mean of per-example means is the token mean."""
    from goose_jax.library.prototypes import PROTOTYPES_FILE, load_prototypes

    lib = _copy_library(world, tmp_path)
    got = {}
    for pooling in ("example", "token"):
        assert train(_args(world, lib, "--examples", "1", "--pooling", pooling,
                           "--overwrite")) == 0
        got[pooling] = flatten_sites(load_prototypes(str(lib / PROTOTYPES_FILE)))
    for site, leaf in got["example"].items():
        np.testing.assert_allclose(leaf["gate"], got["token"][site]["gate"], atol=1e-5)


@pytest.mark.parametrize("extra, code, words", [
    (["--names", "reverse", "zeta"], 1, ["zeta", "--names"]),
    (["--names", "reverse"], 2, ["1 --names for 2 --data"]),
    (["--pooling", "mean"], 2, ["--pooling", "mean"]),
    (["--examples", "0"], 2, ["--examples 0"]),
])
def test_prototypes_refusals(world, tmp_path, capsys, extra, code, words):
    from goose_jax.library.prototypes import PROTOTYPES_FILE

    lib = _copy_library(world, tmp_path)
    assert train(_args(world, lib, *extra)) == code
    err = _one_line_error(capsys, "goose-train")
    assert all(w in err for w in words), err
    assert not (lib / PROTOTYPES_FILE).exists()


def test_prototypes_refuses_a_folder_that_is_no_library(world, tmp_path, capsys):
    assert train(_args(world, tmp_path / "nowhere")) == 1
    assert "nowhere" in _one_line_error(capsys, "goose-train")
    assert not (tmp_path / "nowhere").exists()


def _eval_args(world, lib, out, *extra):
    return ["--base", str(world / "base"), "--byte-tokenizer", "--bbh-root", str(world / "bbh"),
            "--tasks", "bbh/boolean_expressions", "--out", str(out), "--no-progress",
            "--batch-size", "4", "--library", str(lib), "--method", "average_activation",
            *extra]


def test_goose_eval_finds_the_library_prototypes(world, tmp_path, capsys):
    from goose_jax.library.prototypes import PROTOTYPES_FILE

    lib = _copy_library(world, tmp_path)
    # None yet: one line naming the library, the file and both fixes; nothing written.
    assert evaluate(_eval_args(world, lib, tmp_path / "none")) == 1
    err = _one_line_error(capsys, "goose-eval")
    assert PROTOTYPES_FILE in err and "goose-train prototypes" in err and "--prototypes" in err
    assert not (tmp_path / "none").exists()

    assert train(_args(world, lib, "--names", "upper", "reverse", "--examples", "4")) == 0
    capsys.readouterr()
    assert evaluate(_eval_args(world, lib, tmp_path / "found")) == 0
    found = json.loads((tmp_path / "found" / "results.json").read_text())
    assert found["method"] == "average_activation"
    assert found["prototypes"] == str(lib / PROTOTYPES_FILE)
    assert found["experts"] == ["reverse", "upper"]   # library order; the file's is the reverse
    assert evaluate(_eval_args(world, lib, tmp_path / "given", "--prototypes",
                               str(lib / PROTOTYPES_FILE))) == 0
    lines = {run: [json.loads(x)["scores"] for x in
                   (tmp_path / run / "predictions.jsonl").read_text().splitlines()]
             for run in ("found", "given")}
    np.testing.assert_allclose(lines["found"], lines["given"], atol=1e-6)
    # A subset of the experts is routed with its own rows.
    assert evaluate(_eval_args(world, lib, tmp_path / "one", "--experts", "upper",
                               "--top-k", "1")) == 0
    assert json.loads((tmp_path / "one" / "results.json").read_text())["experts"] == ["upper"]


def test_prototypes_are_recorded_checked_and_dropped_with_their_expert(world, tmp_path, capsys):
    import os
    import shutil

    from conftest import one_line, tree_hash

    from goose_jax.core.errors import DataError, LibraryError
    from goose_jax.core.tensorfile import read_safetensors
    from goose_jax.library.prototypes import PROTOTYPES_FILE, load_prototypes
    from goose_jax.library.store import ExpertLibrary

    lib = _copy_library(world, tmp_path)
    path = lib / PROTOTYPES_FILE
    assert train(_args(world, lib, "--examples", "3")) == 0
    raw = path.read_bytes()
    manifest = json.loads((lib / "manifest.json").read_text())
    assert manifest["prototypes"] == {"file": PROTOTYPES_FILE, "bytes": len(raw),
                                      "sha256": "sha256:" + hashlib.sha256(raw).hexdigest()}
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask   # as every library file
    before_rows = read_safetensors(str(path))

    # One bit flipped in a vector: goose-eval and the reader refuse it, naming the file.
    flipped = bytearray(raw)
    flipped[-5] ^= 0x01
    path.write_bytes(bytes(flipped))
    watch = tree_hash(lib)
    capsys.readouterr()
    assert evaluate(_eval_args(world, lib, tmp_path / "flipped")) == 1
    line = one_line(capsys.readouterr().err, "goose-eval")
    assert str(path) in line and "changed after it was written" in line, line
    assert tree_hash(lib) == watch and not (tmp_path / "flipped").exists()
    with pytest.raises(LibraryError, match="changed after it was written"):
        load_prototypes(str(path), ["reverse"])
    path.write_bytes(raw)

    # Replacing an expert drops its prototype (the other row is kept, bit for bit) ...
    library = ExpertLibrary.open(lib)
    experts, _ = library.load(["upper"], gates=False)
    library.add("upper", experts, index=0, overwrite=True)
    after = read_safetensors(str(path))
    for key, rows in before_rows.items():
        np.testing.assert_array_equal(after[key], rows[[0]])   # "reverse" was row 0
    record = json.loads((lib / "manifest.json").read_text())["prototypes"]
    assert record["sha256"] == "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(DataError, match=r"no prototypes for experts \['upper'\]"):
        load_prototypes(str(path), ["reverse", "upper"])
    # ... and removing the last expert with one drops the file and its record.
    shutil.copy(path, tmp_path / "kept")
    library.remove("reverse")
    assert not path.exists()
    assert "prototypes" not in json.loads((lib / "manifest.json").read_text())
