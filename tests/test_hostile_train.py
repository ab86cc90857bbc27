"""goose-train against careless and hostile input: every refusal is one line, an exit code of the
table, and comes before any write; divergence, a corrupt checkpoint and Ctrl-C lose no work."""

import hashlib
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import one_line, tool, tree_hash, write_jsonl

from goose_jax.core import errors
from goose_jax.library.store import ExpertLibrary
from goose_jax.training.checkpoints import TrainCheckpointer

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.py")
PROG = "goose-train"
main = tool(PROG)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    words = ["goose", "jax", "flax", "route", "token"]
    return [write_jsonl(d / "reverse.jsonl", [(f"reverse: {w}", w[::-1]) for w in words]),
            write_jsonl(d / "upper.jsonl", [(f"upper: {w}", w.upper()) for w in words])]


def args(data, lib, work, *extra, command="experts"):
    return [command, "--config", TINY, "--base", "random:tiny", "--data", *data,
            "--library", str(lib), "--workdir", str(work), *extra]


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """A library with experts `reverse` and `upper` and their gates (and the two work dirs)."""
    root = tmp_path_factory.mktemp("trained")
    assert main(args(data, root / "lib", root / "w_experts")) == 0
    assert main(args(data, root / "lib", root / "w_gates", "--names", "reverse", "upper",
                     command="gate")) == 0
    return root


def refused(capsys, argv, code, *parts, watch=()):
    """Runs goose-train, asserting ``code``, one stderr line holding ``parts``, and that no
    file under ``watch`` changed (nor appeared)."""
    before = tree_hash(*watch)
    capsys.readouterr()
    assert main(argv) == code
    line = one_line(capsys.readouterr().err, PROG)
    for part in parts:
        assert part in line, (part, line)
    assert tree_hash(*watch) == before
    return line


# --- 1. validated before any work ----------------------------------------------------------------


def test_bad_data_is_refused_before_any_write(data, trained, tmp_path, capsys):
    lib, work = tmp_path / "lib", tmp_path / "work"
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes(b'{"input": "ok", "target": "ok"}\n{"input": "caf\xe9", "target": "x"}\n')
    refused(capsys, args([str(latin1)], lib, work), 1, "latin1.jsonl:2", "not UTF-8", "0xe9")
    malformed = write_jsonl(tmp_path / "malformed.jsonl", [("a", "b")])
    with open(malformed, "a") as f:
        f.write('{"input": "a"}\n')
    refused(capsys, args([malformed], lib, work), 1, "malformed.jsonl:2", "'target'")
    negative = write_jsonl(tmp_path / "negative.jsonl", [([5, 6], "x"), ([7, -3], "y")])
    refused(capsys, args([negative], lib, work), 1, "negative.jsonl:2", "-3")
    huge = write_jsonl(tmp_path / "huge.jsonl", [("x", [1, 2]), ("y", [3, 100000]), ("z", "w")])
    refused(capsys, args([huge], lib, work), 1, "huge.jsonl:2", "'target'", "100000",
            "0 .. 258")
    for i, empty in enumerate(["", "  ", []]):   # nothing to learn: a no-op expert at loss 0
        path = write_jsonl(tmp_path / f"empty{i}.jsonl", [("a", "b"), ("c", empty)])
        refused(capsys, args([path], lib, work), 1, f"empty{i}.jsonl:2", "'target' is empty",
                watch=[tmp_path])
    # The same reader serves goose-train prototypes.
    refused(capsys, ["prototypes", "--config", TINY, "--base", "random:tiny", "--data", path,
                     "--names", "reverse", "--library", str(trained / "lib")], 1,
            "empty2.jsonl:2", "'target' is empty", watch=[tmp_path, trained / "lib"])
    # held-out data is checked as early as training data
    refused(capsys, args(data, lib, work, "--eval-data", str(huge), str(huge)), 1,
            "huge.jsonl:2")
    assert not lib.exists() and not work.exists()


def test_bad_names_and_paths_are_refused_before_any_write(data, trained, tmp_path, capsys):
    lib, work = tmp_path / "lib", tmp_path / "work"
    for name in ("../evil", "a/b", ".hidden", "x" * 129):
        refused(capsys, args(data[:1], lib, work, "--name", name, command="expert"), 1,
                "invalid expert name")
    refused(capsys, args(data, lib, work, "--names", "ok", "bad name"), 1, "'bad name'")
    a_file = tmp_path / "a_file"
    a_file.write_text("not a directory")
    refused(capsys, args(data, a_file, work), 1, str(a_file), "--library",
            watch=[a_file])
    refused(capsys, args(data, lib, a_file), 1, str(a_file), "--workdir", watch=[a_file])
    refused(capsys, args(data, lib, a_file / "sub"), 1, "is a file", watch=[a_file])
    refused(capsys, args(data, lib, "/proc/goose-train-work"), 1, "/proc", "cannot write")
    # a gate run over experts the library does not hold
    refused(capsys, args(data[:1], trained / "lib", work, "--names", "nobody", command="gate"),
            1, "no expert named 'nobody'", watch=[trained / "lib"])
    refused(capsys, args(data, tmp_path / "nolib", work, command="gate"), 1,
            "not an expert library")
    assert not lib.exists() and not work.exists()

    # The corrected command then trains: nothing recorded by the refused ones stands in its way.
    assert main(args(data[:1], lib, work, "--name", "fixed", "--set", "steps=2",
                     command="expert")) == 0
    assert ExpertLibrary.open(lib).names == ["fixed"]


# --- 2. nothing replaced without --overwrite ------------------------------------------------------


def test_a_refused_run_records_nothing_so_its_rerun_is_refused_again(data, trained, tmp_path,
                                                                     capsys):
    lib, work = trained / "lib", tmp_path / "again"
    assert all(ExpertLibrary.open(lib).info(n)["has_gate"] for n in ("reverse", "upper"))
    watch = [lib, trained / "w_experts", trained / "w_gates"]
    for _ in range(2):  # the identical command, twice: refused both times
        refused(capsys, args(data, lib, work), 1, "already has experts", "--overwrite",
                watch=watch)
        assert not work.exists()
    # a new gate run over gated experts, and the experts' own finished run again
    refused(capsys, args(data, lib, tmp_path / "g2", "--names", "reverse", "upper",
                         command="gate"), 1, "already have gates", "--overwrite", watch=watch)
    before = tree_hash(*watch)
    assert main(args(data, lib, trained / "w_experts")) == 0
    assert "already finished" in capsys.readouterr().out
    assert tree_hash(*watch) == before
    lib_now = ExpertLibrary.open(lib)
    assert all(lib_now.info(n)["has_gate"] for n in ("reverse", "upper"))


def test_multitask_model_out_is_checked_before_training(data, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    argv = ["multitask", "--config", TINY, "--base", "random:tiny", "--data", *data,
            "--set", "multitask_mode=full", "--out", str(out), "--workdir", str(tmp_path / "w")]
    refused(capsys, argv, 1, "not a goose-jax checkpoint", watch=[out])
    assert not (tmp_path / "w").exists()


# --- 3. divergence --------------------------------------------------------------------------------


@pytest.mark.parametrize("lr", ["1e30", "1e37"])
def test_divergence_stops_with_one_line_and_writes_nothing(data, trained, tmp_path, capsys, lr):
    lib = tmp_path / "lib"
    shutil.copytree(trained / "lib", lib)
    work = tmp_path / "work"
    line = refused(capsys, args(data, lib, work, "--names", "r2", "u2", "--set", f"lr={lr}",
                                "--set", "checkpoint_every=1"), 1,
                   "diverged at step", "non-finite", "lower learning rate", "lr=",
                   watch=[lib])
    with TrainCheckpointer(work / "checkpoints") as ckpt:
        steps = ckpt.all_steps()
    step = int(line.split("diverged at step ")[1].split(":")[0])
    assert all(s < step for s in steps)  # only good states were saved
    if steps:
        assert f"step {steps[-1]}" in line
    for text in (work / "metrics.jsonl").read_text().splitlines():
        json.loads(text, parse_constant=lambda c: pytest.fail(f"bare {c} in metrics"))
    json.loads((lib / "manifest.json").read_text(),
               parse_constant=lambda c: pytest.fail(f"bare {c} in the manifest"))


# --- 4. a corrupt latest checkpoint ---------------------------------------------------------------


def _chunks(step_dir: pathlib.Path) -> list[pathlib.Path]:
    """The array data chunks of a step (OCDBT's data files), largest first."""
    chunks = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
    return sorted(chunks, key=lambda p: (-p.stat().st_size, str(p)))


def _damage(file: pathlib.Path, how: str) -> None:
    raw = file.read_bytes()
    if how == "truncate":
        file.write_bytes(raw[: len(raw) // 3])
    elif how == "flip":  # one bit, in the middle: inside the array data of a large chunk
        i = len(raw) // 2
        file.write_bytes(raw[:i] + bytes([raw[i] ^ 0x01]) + raw[i + 1:])
    else:
        file.unlink()


def _corrupt(step_dir: pathlib.Path, how: str) -> None:
    if how == "flip-several":
        for chunk in _chunks(step_dir)[:3]:
            _damage(chunk, "flip")
    else:
        _damage(_chunks(step_dir)[0], how)


def _experts(lib):
    experts, _ = ExpertLibrary.open(lib).load()
    return {jax.tree_util.keystr(p): np.asarray(x)
            for p, x in jax.tree_util.tree_flatten_with_path(experts)[0]}


@pytest.fixture(scope="module")
def straight_lib(data, tmp_path_factory):
    root = tmp_path_factory.mktemp("straight")
    assert main(args(data, root / "lib", root / "w")) == 0
    return root / "lib"


@pytest.fixture(scope="module")
def straight(straight_lib):
    return _experts(straight_lib)


def _expert_bytes(lib):
    return {p.name: p.read_bytes() for p in sorted((lib / "experts").iterdir())}


@pytest.mark.parametrize("how", ["truncate", "flip-several", "missing"])
def test_a_corrupt_latest_checkpoint_falls_back_to_the_previous_one(data, straight, straight_lib,
                                                                    tmp_path, capsys, monkeypatch,
                                                                    how):
    from goose_jax.training import program as training

    lib, work = tmp_path / "lib", tmp_path / "work"
    original, calls = training.Program.step, []

    def killed_after_five(self, *a):
        if len(calls) == 5:
            raise KeyboardInterrupt
        calls.append(1)
        return original(self, *a)

    monkeypatch.setattr(training.Program, "step", killed_after_five)
    assert main(args(data, lib, work)) == errors.INTERRUPTED
    monkeypatch.undo()
    with TrainCheckpointer(work / "checkpoints") as ckpt:
        assert ckpt.all_steps() == [2, 4]
    _corrupt(work / "checkpoints" / "4", how)
    capsys.readouterr()
    assert main(args(data, lib, work)) == 0
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    assert "checkpoints/4: unreadable checkpoint (state/" in lines[0]
    assert "resuming from step 2" in lines[0]
    assert (work / "checkpoints" / "4.unreadable").is_dir()
    resumed = _experts(lib)
    assert resumed.keys() == straight.keys()
    for k in straight:
        assert np.array_equal(resumed[k], straight[k]), k
    # The same run writes the same bytes (header metadata in a fixed order, no timestamps).
    assert _expert_bytes(lib) == _expert_bytes(straight_lib)


def _small_tree(seed):
    r = np.random.default_rng(seed)
    return {"a": r.normal(size=(64, 200)).astype(np.float32),
            "b": {"c": r.normal(size=(300,)).astype(np.float32),
                  "d": r.integers(0, 9, size=(50, 7)).astype(np.int32)}}


def test_every_file_of_a_training_checkpoint_is_checked(tmp_path):
    """Each file of the latest step (array chunks flipped, truncated or deleted; every other
    file flipped) is found before it is restored: one warning naming the step and the file,
    and the older step restores exactly."""
    src = tmp_path / "src"
    with TrainCheckpointer(src) as ckpt:
        for step in (1, 2):
            ckpt.save(step, jax.tree.map(jnp.asarray, _small_tree(step)), {"positions": [step]})
    step_dir = src / "2"
    record = json.loads((step_dir / "integrity.json").read_text())["files"]
    files = sorted(str(p.relative_to(step_dir)) for p in step_dir.rglob("*")
                   if p.is_file() and p.name != "integrity.json")
    assert sorted(record) == files
    for rel in files:   # the record is an independent sha256 of the bytes on disk
        raw = (step_dir / rel).read_bytes()
        assert record[rel] == {"bytes": len(raw),
                               "sha256": "sha256:" + hashlib.sha256(raw).hexdigest()}
    chunks = [str(p.relative_to(step_dir)) for p in _chunks(step_dir)]
    assert len(chunks) >= 3
    cases = [(rel, "flip") for rel in files] + [
        (rel, how) for rel in chunks[:2] for how in ("truncate", "missing")]
    want = _small_tree(1)
    for rel, how in cases:
        work = tmp_path / "w"
        shutil.rmtree(work, ignore_errors=True)
        shutil.copytree(src, work)
        _damage(work / "2" / rel, how)
        warned = []
        with TrainCheckpointer(work) as ckpt:
            tree, meta, step = ckpt.restore_usable(_small_tree(0), warn=warned.append)
        assert step == 1 and meta == {"positions": [1]}, (rel, how)
        assert len(warned) == 1 and f"/2: unreadable checkpoint ({rel}: " in warned[0], warned
        for x, y in zip(jax.tree.leaves(tree), jax.tree.leaves(want)):
            assert np.array_equal(x, y), (rel, how)
        assert (work / "2.unreadable").is_dir() and not (work / "2").exists()


def test_no_readable_checkpoint_is_one_line_suggesting_a_new_workdir(data, tmp_path, capsys):
    lib, work = tmp_path / "lib", tmp_path / "work"
    assert main(args(data[:1], lib, work, "--set", "steps=4")) == 0
    shutil.rmtree(lib)
    for step in (2, 4):
        _corrupt(work / "checkpoints" / str(step), "truncate")
    refused(capsys, args(data[:1], lib, work, "--set", "steps=4"), 1,
            "no training checkpoint can be read", "new --workdir", watch=[work])


# --- 5. Ctrl-C ------------------------------------------------------------------------------------


def _goose_train(argv):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    # A shell may start background jobs with SIGINT ignored; a user's terminal does not.
    code = ("import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
            "from importlib.metadata import entry_points; "
            "(ep,) = entry_points(group='console_scripts', name='goose-train'); "
            "sys.exit(ep.load()(sys.argv[1:]))")
    return subprocess.Popen([sys.executable, "-c", code, *argv], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("delay", [0.15, pytest.param(0.0, marks=pytest.mark.slow)])
def test_ctrl_c_mid_training_is_one_line_and_resumes(data, tmp_path, delay):
    lib, work = tmp_path / "lib", tmp_path / "work"
    argv = args(data[:1], lib, work, "--set", "steps=60", "--set", "checkpoint_every=1",
                "--set", "eval_every=0")
    proc = _goose_train(argv)
    t0 = time.monotonic()
    while not (work / "checkpoints" / "3").exists():
        assert proc.poll() is None and time.monotonic() - t0 < 120, proc.communicate()
        time.sleep(0.02)
    time.sleep(delay)  # while checkpoints are being written, asynchronously, every step
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == errors.INTERRUPTED, err
    assert "interrupted" in one_line(err, PROG)
    with TrainCheckpointer(work / "checkpoints") as ckpt:
        stopped = ckpt.latest_step()
    assert stopped is not None and stopped < 60
    again = _goose_train(argv)  # the same command
    out, err = again.communicate(timeout=300)
    assert again.returncode == 0, err
    assert f"resuming from step {stopped}" in out
    assert ExpertLibrary.open(lib).names == ["reverse"]


# --- the script ---------------------------------------------------------------------------------


def test_experts_and_gates_script_refuses_before_any_write(data, trained, tmp_path):
    import runpy

    script = runpy.run_path(str(ROOT / "train" / "experts_and_gates.py"), run_name="script")
    watch = [trained / "lib"]
    before = tree_hash(*watch)
    argv = ["--config", TINY, "--base", "random:tiny", "--data", *data, "--library",
            str(trained / "lib"), "--workdir", str(tmp_path / "w")]
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert script["main"](argv) == 1
    one_line(err.getvalue(), "train/experts_and_gates.py")
    assert "already has experts" in err.getvalue()
    assert tree_hash(*watch) == before and not (tmp_path / "w").exists()
