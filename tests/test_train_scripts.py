"""The runnable programs under train/: each runs from a checkout, a few steps of a tiny model."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
from conftest import one_line, script, tree_hash, write_jsonl

ROOT = pathlib.Path(__file__).resolve().parents[1]
TRAIN = ROOT / "train"


def run_script(name, *argv, code=0):
    """``python train/NAME ARGV`` in a fresh process, as a user runs it from the checkout."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    proc = subprocess.run([sys.executable, str(TRAIN / name), *map(str, argv)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == code, proc.stdout + proc.stderr
    return proc


def test_train_is_not_a_package():
    # Scripts run from the checkout; an installed top-level package named `train` would shadow
    # users' own modules.
    assert not (TRAIN / "__init__.py").exists()
    assert {"experts_and_gates.py", "make_world_base.py"} <= {p.name for p in TRAIN.glob("*.py")}


def test_make_world_base_writes_a_loadable_base(tmp_path):
    from goose_jax.models.t5.hf import load_hf_t5

    out = tmp_path / "base"
    run_script("make_world_base.py", "--steps", 2, "--batch", 4, "--fast-compile",
               "--out", out, "--workdir", tmp_path / "work")
    meta = json.loads((out / "world.json").read_text())
    assert meta["steps"] == 2 and np.isfinite(meta["final_loss"])
    cfg, params = load_hf_t5(out)
    assert (cfg.d_model, cfg.num_encoder_layers) == (128, 4) and "lm_head" in params
    assert (tmp_path / "work" / "checkpoints" / "2").is_dir()
    # A model already in --out is replaced only with --overwrite, refused before any training.
    before = (out / "model.safetensors").read_bytes()
    proc = run_script("make_world_base.py", "--steps", 4, "--batch", 4, "--fast-compile",
                      "--out", out, "--workdir", tmp_path / "work2", code=1)
    assert "--overwrite" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "work2").exists() and (out / "model.safetensors").read_bytes() == before


def test_make_world_base_keeps_its_model_and_its_checkpoints_apart(tmp_path, capsys):
    """--out and --workdir overlapping (the work folder inside the model's, which --overwrite
    replaces; the model inside the work folder; one folder for both): refused in one line
    before any work, nothing written."""
    main = script("train/make_world_base.py")
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "config.json").write_text("{}")
    for out, work in [("base", "base/work"), ("work/base", "work"), ("base", "base")]:
        before = tree_hash(tmp_path)
        capsys.readouterr()
        code = main(["--steps", "2", "--batch", "4", "--fast-compile", "--overwrite",
                     "--out", str(tmp_path / out), "--workdir", str(tmp_path / work)])
        line = one_line(capsys.readouterr().err, "train/make_world_base.py")
        assert code == 1, line
        assert "--out" in line and "--workdir" in line, line
        assert tree_hash(tmp_path) == before and not (tmp_path / "work").exists()


def test_experts_and_gates_trains_both_into_the_library(tmp_path):
    from goose_jax.library.store import ExpertLibrary

    words = ["goose", "jax", "flax", "route", "token"]
    data = [write_jsonl(tmp_path / "reverse.jsonl", [(f"reverse: {w}", w[::-1]) for w in words]),
            write_jsonl(tmp_path / "upper.jsonl", [(f"upper: {w}", w.upper()) for w in words])]
    lib, work = tmp_path / "lib", tmp_path / "work"
    argv = ["--config", ROOT / "configs" / "tiny.py", "--base", "random:tiny", "--data", *data,
            "--library", lib, "--workdir", work, "--set", "steps=2", "--set", "gate_steps=2",
            "--set", "eval_every=0"]
    run_script("experts_and_gates.py", *argv)
    library = ExpertLibrary.open(lib)
    assert library.names == ["reverse", "upper"]
    assert all(library.info(n)["has_gate"] and library.info(n)["gate"]["steps"] == 2
               for n in library.names)
    assert (work / "experts" / "run.json").is_file() and (work / "gates" / "run.json").is_file()
    # The same command again finds both stages done and leaves the library alone.
    stamp = os.stat(lib / "manifest.json").st_mtime_ns
    again = run_script("experts_and_gates.py", *argv)
    assert "already finished" in again.stdout
    assert os.stat(lib / "manifest.json").st_mtime_ns == stamp


def test_settings_scripts_need_their_release_or_small(tmp_path):
    # The real settings need the release and the base; without them (and without --small) one
    # usage line, before anything is written. test_settings_scripts.py runs --small end to end.
    for name, flag in (("t0.py", "--p3-dir"), ("flan.py", "--flan-dir")):
        proc = run_script(name, "--workdir", tmp_path / name, "--base", tmp_path, code=2)
        line = proc.stderr.strip()
        assert len(line.splitlines()) == 1 and flag in line and "--small" in line
        assert not (tmp_path / name).exists()
