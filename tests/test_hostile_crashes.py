"""Hostile cases that used to crash a tool or break its one-line contract: Ctrl-C, a full disk,
bad input met late, and messages that misled.

Four classes, each with its case in a second tool or file: every case asserts the exit code, one
line on stderr without a traceback (``conftest.one_line``), and that nothing it could touch
changed (trees hashed before and after) or, for a write the disk refused, that nothing of it is
left and the same command then succeeds. Signals need a process of their own; everything else
calls the tools' ``main`` in-process.
"""

import contextlib
import gc
import json
import os
import pathlib
import random
import resource
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import one_line, script, tool, tree_hash, write_jsonl

from goose_jax.core import errors, tool_process

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.py")
TRAIN, EVAL, CONVERT = "goose-train", "goose-eval", "goose-convert"


def _main(prog):
    return script(prog) if prog.endswith(".py") else tool(prog)


def _refused(capsys, prog, argv, code, words, watch=()):
    """Runs one case; checks the code, the one line, its words and that nothing watched
    changed. Returns the line."""
    before = tree_hash(*watch)
    capsys.readouterr()
    got = _main(prog)([str(a) for a in argv])
    err = capsys.readouterr().err
    assert got == code, err
    line = one_line(err, prog.split()[0])
    for word in words:
        assert word in line, line
    assert tree_hash(*watch) == before
    return line


def _train_args(data, root, *extra, command="experts"):
    return [command, "--config", TINY, "--base", "random:tiny", "--data", *data,
            "--library", root / "lib", "--workdir", root / "work", *extra]


def _eval_args(world, out, *extra):
    return ["--base", world / "base", "--byte-tokenizer", "--bbh-root", world / "bbh",
            "--out", out, "--no-progress", "--tasks", "bbh/boolean_expressions", *extra]


# --- 1. Ctrl-C ------------------------------------------------------------------------------------


def _tool_process(argv, cwd):
    """A console script started as a user's terminal starts it (SIGINT at its default)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]),
        PYTHONFAULTHANDLER="1")
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # the child: SIG_DFL
    try:
        return subprocess.Popen([os.path.join(os.path.dirname(sys.executable), argv[0]),
                                 *map(str, argv[1:])], cwd=cwd, env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    finally:
        signal.signal(signal.SIGINT, previous)


def test_ctrl_c_on_goose_eval_is_one_line_and_exit_130_during_imports_and_mid_run(world,
                                                                                  tmp_path):
    """The case that died of SIGSEGV in half the runs (an interrupted import of a jaxlib
    module, freed half-built) and gave a traceback during start-up: SIGINT at random moments
    of the start-up imports and of the run. Each run is interrupted (exit 130, the one line) or
    had finished; never a crash or a traceback."""
    rng = random.Random(os.getpid())
    for i, (low, high) in enumerate([(0.3, 1.5), (1.5, 6.0)]):
        out = tmp_path / f"out{i}"
        proc = _tool_process([EVAL, *_eval_args(world, out, "--library", world / "lib")],
                             tmp_path)
        time.sleep(rng.uniform(low, high))
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=300)
        if proc.returncode == 0:
            assert "Traceback" not in err and "Fatal" not in err, err
            continue
        assert proc.returncode == errors.INTERRUPTED, err
        assert "interrupted" in one_line(err, EVAL)


def test_interrupts_are_held_inside_imports_gc_callbacks_and_finalizers(tmp_path, monkeypatch):
    """Where a KeyboardInterrupt would crash the process (an import) or be printed and dropped
    (a gc callback, a ``__del__``), the handler holds it; elsewhere it raises at once."""
    assert not tool_process._unsafe(sys._getframe())
    seen = {}
    (tmp_path / "goose_probe_module.py").write_text(
        "import sys\nFRAME = sys._getframe()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import goose_probe_module

    seen["import"] = goose_probe_module.FRAME

    def callback(phase, info):
        seen.setdefault("gc", sys._getframe())

    class Finalized:
        def __del__(self):
            seen["del"] = sys._getframe()

    gc.callbacks.append(callback)
    try:
        gc.collect()
        assert tool_process._unsafe(seen["gc"])
    finally:
        gc.callbacks.remove(callback)
    Finalized()
    assert tool_process._unsafe(seen["del"])
    # the module's own frame is no longer executing, but its callers are importlib's
    assert seen["import"].f_back is not None and tool_process._unsafe(seen["import"])

    # running, at a safe point: raises; at an unsafe one: holds (and schedules the retry)
    monkeypatch.setitem(tool_process._state, "prog", "goose-test")
    monkeypatch.setitem(tool_process._state, "running", True)
    monkeypatch.setitem(tool_process._state, "raised", False)
    monkeypatch.setitem(tool_process._state, "held", False)
    monkeypatch.setitem(tool_process._state, "held_since", None)
    retried = []
    monkeypatch.setattr(tool_process, "_retry", lambda: retried.append(1))
    tool_process.on_sigint(signal.SIGINT, seen["del"])
    assert tool_process._state["held"] and not tool_process._state["raised"]
    time.sleep(10 * tool_process.RETRY_S)
    assert retried == [1]
    # held for longer than MAX_HOLD_S (TensorFlow's import): the process ends at once
    ended = []
    monkeypatch.setattr(tool_process, "exit_now", lambda *a: ended.append(a))
    tool_process._state["held_since"] = time.monotonic() - tool_process.MAX_HOLD_S - 1
    tool_process.on_sigint(signal.SIGINT, seen["del"])
    assert ended == [()]
    with pytest.raises(KeyboardInterrupt):
        tool_process.on_sigint(signal.SIGINT, sys._getframe())
    assert tool_process._state["raised"] and tool_process._state["held_since"] is None


_CTRL_C_AT_JAX = """import importlib.abc, os, runpy, signal, sys


class CtrlCAtJax(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "jax" and not getattr(self, "sent", False):
            self.sent = True
            os.kill(os.getpid(), signal.SIGINT)  # the handler runs here
        return None


sys.meta_path.insert(0, CtrlCAtJax())
sys.argv = [sys.argv[1], "--help"]
runpy.run_path(sys.argv[0], run_name="__main__")
"""
_SCRIPTS = sorted(str(p.relative_to(ROOT)) for d in ("train", "eval")
                  for p in (ROOT / d).glob("*.py") if 'if __name__ == "__main__"' in p.read_text())


@pytest.mark.parametrize("path", _SCRIPTS)
def test_ctrl_c_during_a_scripts_start_up_imports_is_one_line(tmp_path, path):
    """eval/paper.py and train/experts_and_gates.py gave a traceback for a Ctrl-C during their
    start-up imports (train/make_world_base.py too, JAX imported before goose-jax): every
    script under train/ and eval/ names itself (GOOSE_TOOL) before it imports goose-jax, so
    its handler is in place from the start. SIGINT as the imports reach JAX's: exit 130 and
    the one line."""
    assert len(_SCRIPTS) >= 5, _SCRIPTS
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # the child: SIG_DFL
    try:
        proc = subprocess.run([sys.executable, "-c", _CTRL_C_AT_JAX, str(ROOT / path)],
                              cwd=tmp_path, env=env, text=True, capture_output=True, timeout=300)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert proc.returncode == errors.INTERRUPTED, proc.stderr
    assert one_line(proc.stderr, path) == f"{path}: interrupted"


_LATE_TOOL = """GOOSE_TOOL = "goose-x"
import argparse, atexit, os, signal, sys, time, weakref
import goose_jax  # noqa: F401  (installs the handler)
from goose_jax.core.tool import run_tool


def ctrl_c(*_):
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.2)  # the handler runs here, inside the callback


class Thing:
    pass


def run(args):
    if args.where == "weakref":
        thing = Thing()
        ref = weakref.ref(thing, ctrl_c)
        del thing
        time.sleep(2)
        print("went on", file=sys.stderr)
    elif args.where == "atexit":
        atexit.register(ctrl_c)
    else:  # freed as the interpreter tears its modules down, after the atexit functions
        global LAST
        LAST = Freed()


class Freed:
    def __del__(self, kill=os.kill, pid=os.getpid(), sig=signal.SIGINT, sleep=time.sleep):
        kill(pid, sig)  # the module's names may be gone by now
        sleep(0.2)


parser = argparse.ArgumentParser(prog="goose-x")
parser.add_argument("where")
parser.set_defaults(run=run)
sys.exit(run_tool("goose-x", parser))
"""


@pytest.mark.parametrize("where,code,err", [("weakref", errors.INTERRUPTED,
                                             "goose-x: interrupted\n"), ("atexit", 0, ""),
                                             ("teardown", 0, "")])
def test_ctrl_c_where_python_drops_exceptions_and_once_the_run_is_over(tmp_path, where, code,
                                                                       err):
    """Ctrl-C inside a weak reference's callback (as while tf.data frees an iterator) was
    printed with a traceback and dropped: the run went on and exited 0. Ctrl-C once the run
    was over gave a traceback (in an atexit function) or killed the process by SIGINT without
    a word (exit -2: as the interpreter frees its modules, after Python restored the signal's
    default action). Now the first is delivered again (exit 130, the one line), and the others
    end with the run's exit code, without a word."""
    (tmp_path / "goose_x.py").write_text(_LATE_TOOL)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # the child: SIG_DFL
    try:
        proc = subprocess.run([sys.executable, str(tmp_path / "goose_x.py"), where],
                              cwd=tmp_path, env=env, text=True, capture_output=True,
                              timeout=300)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert (proc.returncode, proc.stderr) == (code, err), proc.stderr


# --- 2. a full disk -------------------------------------------------------------------------------


@contextlib.contextmanager
def file_size_limit(limit: int):
    """Writes past ``limit`` bytes in any one file fail with EFBIG ("File too large"), in Python
    and native writers alike (RLIMIT_FSIZE with SIGXFSZ ignored): a full disk, simulated."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


def _disk_full(capsys, prog, argv, path, watch, limit=4096, rerun=False):
    """The write refused by the disk: one line naming ``path`` and the system's reason, exit 1,
    nothing of it left (``watch`` as it was); with ``rerun``, the same command then succeeds."""
    before = tree_hash(*watch)
    capsys.readouterr()
    with file_size_limit(limit):
        got = tool(prog)([str(a) for a in argv])
    err = capsys.readouterr().err
    assert got == errors.USER_ERROR, err
    line = one_line(err, prog)
    assert str(path) in line and "File too large" in line, line
    assert tree_hash(*watch) == before
    leftovers = [p for w in watch for p in pathlib.Path(w).parent.glob("*tmp*")]
    assert not leftovers, leftovers
    if rerun:
        assert tool(prog)([str(a) for a in argv]) == 0, capsys.readouterr().err


def test_a_full_disk_is_one_line_and_the_rerun_succeeds(world, tmp_path, capsys):
    # an Orbax checkpoint (hf-to-orbax: 336 lines and a temp folder that refused the rerun)
    ckpt = tmp_path / "ckpt"
    _disk_full(capsys, CONVERT, ["hf-to-orbax", world / "base", ckpt], ckpt, [tmp_path],
               rerun=True)
    # a Hugging Face folder (orbax-to-hf: a safetensors traceback)
    hf_out = tmp_path / "hf" / "model"
    _disk_full(capsys, CONVERT, ["orbax-to-hf", ckpt, hf_out], hf_out, [tmp_path / "hf"])
    # a file in a library (prototypes: a traceback); the library is as it was
    lib = tmp_path / "lib"
    shutil.copytree(world / "lib", lib)
    data = [write_jsonl(tmp_path / f"{n}.jsonl", [(f"{n} {i}", "x") for i in range(3)])
            for n in ("alpha", "beta", "gamma")]
    _disk_full(capsys, TRAIN, ["prototypes", "--base", world / "base", "--set", "tokenizer=byte",
                               "--library", lib, "--data", *data],
               lib / "prototypes.safetensors", [lib], limit=1024)


@pytest.mark.slow
def test_a_full_disk_under_a_training_checkpoint_is_one_line(words, tmp_path, capsys):
    """Orbax's asynchronous training checkpoints raise the disk's refusal as a ValueError from
    TensorStore: still one line naming the file, no traceback, no temporary step folder left,
    and the same command then succeeds."""
    capsys.readouterr()
    with file_size_limit(4096):
        got = tool(TRAIN)([str(a) for a in _train_args([words], tmp_path, "--set", "steps=2")])
    err = capsys.readouterr().err
    assert got == errors.USER_ERROR, err
    line = one_line(err, TRAIN)
    assert str(tmp_path / "work" / "checkpoints") in line and "File too large" in line, line
    assert not list((tmp_path / "work" / "checkpoints").glob("*tmp*"))  # the save cleaned up
    args = _train_args([words], tmp_path, "--set", "steps=2")
    assert tool(TRAIN)([str(a) for a in args]) == 0, capsys.readouterr().err


def test_a_training_checkpoint_the_disk_refused_leaves_no_unfinished_step(tmp_path):
    """A save the disk refused removed nothing of its own: its ``<step>.orbax-checkpoint-tmp``
    folder stayed beside the steps. Now the failed save removes it before the error is raised,
    a folder a killed run left is removed when the directory is opened again, and the rerun
    saves that step and restores it."""
    from goose_jax.training.checkpoints import TrainCheckpointer

    small = {"a": np.arange(4, dtype=np.float32)}
    # random values: they do not compress under the limit
    big = {"a": np.random.default_rng(0).standard_normal(8192).astype(np.float32)}
    ckpt = tmp_path / "checkpoints"
    with TrainCheckpointer(ckpt) as saver:
        saver.save(1, small, {"p": 1})
        saver.wait()
        with file_size_limit(4096), pytest.raises(Exception, match="File too large"):
            saver.save(2, big, {"p": 2})
            saver.wait()
        assert sorted(os.listdir(ckpt)) == ["1"]
    shutil.copytree(ckpt / "1", ckpt / "3.orbax-checkpoint-tmp")  # a killed run's
    with TrainCheckpointer(ckpt) as saver:
        assert saver.all_steps() == [1]
        saver.save(2, big, {"p": 2})
        saver.wait()
        assert sorted(os.listdir(ckpt)) == ["1", "2"]
        tree, meta = saver.restore({"a": np.zeros(8192, np.float32)})
    np.testing.assert_array_equal(np.asarray(tree["a"]), big["a"])
    assert meta == {"p": 2}


def test_a_native_writers_refusal_reaching_the_tool_is_one_line(capsys):
    """The seam the training checkpoint's case goes through (fast; the real one is above):
    whatever type a native writer raises, an error number in it makes the tool's one line."""
    import argparse

    from goose_jax.core.tool import run_tool

    def fail(args):
        raise ValueError('OUT_OF_RANGE: Error writing local file "/w/checkpoints/2.orbax-'
                         'checkpoint-tmp/state/_sharding": Failed to write 44673 bytes to file '
                         "9: No space left on device [os_error_code='28']")

    parser = argparse.ArgumentParser(prog="goose-x")
    parser.set_defaults(run=fail)
    capsys.readouterr()
    assert run_tool("goose-x", parser, []) == errors.USER_ERROR
    line = one_line(capsys.readouterr().err, "goose-x")
    assert line == ("goose-x: error: /w/checkpoints/2.orbax-checkpoint-tmp/state/_sharding: "
                    "cannot write: No space left on device"), line
    parser.set_defaults(run=lambda args: 1 / 0)  # any other error is a bug: its traceback
    with pytest.raises(ZeroDivisionError):
        run_tool("goose-x", parser, [])


def test_a_native_writers_os_error_is_one_line_naming_its_file():
    """Errors raised by native writers as other types still carry the error number."""
    from goose_jax.core.tensorfile import disk_write_error, os_error

    orbax = ValueError('OUT_OF_RANGE: Error writing "k/0.0" in OCDBT database at local file '
                       '"/x/params.orbax-checkpoint-tmp/": Failed to write 79851 bytes to file '
                       "7: No space left on device [os_error_code='28']")
    safetensors = RuntimeError("Error while serializing: I/O error: Disk quota exceeded (os "
                               "error 122)")
    assert os_error(orbax) == (28, os.strerror(28))
    assert os_error(safetensors) == (122, os.strerror(122))
    assert os_error(ValueError("a bug, not the disk")) is None
    e = disk_write_error("/x/ckpt", orbax)
    assert isinstance(e, errors.GooseError) and isinstance(e, OSError) and e.errno == 28
    assert str(e).startswith("/x/ckpt: cannot write: No space left on device") and "rerun" in str(e)


# --- 3. bad input, refused before anything is written ------------------------------------------


@pytest.fixture(scope="module")
def words(tmp_path_factory):
    d = tmp_path_factory.mktemp("words")
    return write_jsonl(d / "words.jsonl", [(f"reverse: {w}", w[::-1]) for w in ("ab", "cd")])


def test_text_that_is_not_text_is_refused_before_any_write(world, words, tmp_path, capsys):
    # a lone surrogate: JSON's \ud800 escape is half of a UTF-16 pair; it failed at step 1,
    # after run.json and the library were written
    lone = tmp_path / "lone.jsonl"
    lone.write_text('{"input": "ok", "target": "ok"}\n{"input": "a\\ud800b", "target": "x"}\n')
    _refused(capsys, TRAIN, _train_args([lone], tmp_path), 1,
             ["lone.jsonl:2", "'input'", "lone surrogate U+D800", "character 2"])
    # the same in a validation file, and in a prototypes data file
    _refused(capsys, TRAIN, _train_args([words], tmp_path, "--validation", lone), 1,
             ["lone.jsonl:2", "lone surrogate"])
    _refused(capsys, TRAIN, ["prototypes", "--base", world / "base", "--set", "tokenizer=byte",
                             "--library", world / "lib", "--data", lone, "--names", "alpha"], 1,
             ["lone.jsonl:2", "lone surrogate"], watch=[world / "lib"])
    # a JSON row nested past the parser's recursion
    deep = tmp_path / "deep.jsonl"
    deep.write_text('{"input": ' + "[" * 100_000 + "]" * 100_000 + ', "target": "x"}\n')
    _refused(capsys, TRAIN, _train_args([deep], tmp_path), 1, ["deep.jsonl:1"])
    assert not (tmp_path / "lib").exists() and not (tmp_path / "work").exists()


def test_a_byte_order_mark_is_not_part_of_the_first_line(words, tmp_path):
    from goose_jax.data.batching import JsonlSource
    from goose_jax.evaluation.validation import read_validation

    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + pathlib.Path(words).read_bytes())
    assert JsonlSource(bom).examples == JsonlSource(words).examples
    assert ([(e.input, e.references) for e in read_validation(str(bom), "w")]
            == [(e.input, e.references) for e in read_validation(words, "w")])


def test_training_numbers_that_cannot_work_are_refused_before_any_write(words, tmp_path, capsys):
    args = _train_args([words], tmp_path)
    # each step would hold 10^12 examples: the batcher died allocating 14.6 TiB, after writes
    _refused(capsys, TRAIN, [*args, "--set", "grad_accum=1000000000000"], 1,
             ["grad_accum", "1000000000000", "at most 1,048,576"])
    _refused(capsys, TRAIN, [*args[:-4], "--library", tmp_path / "lib", "--workdir",
                             tmp_path / "work", "--set", "micro_batch=100000000"], 1,
             ["micro_batch", "100000000"])
    # inf passed "> 0" and led to wrong advice once the loss was not finite
    for setting in ("lora_scale=inf", "lr=inf", "lora_scale=nan", "lora_scale=0"):
        _refused(capsys, TRAIN, [*args, "--set", setting], 1, [setting.split("=")[0]])
    _refused(capsys, TRAIN, [*args, "--set", "lora_scale=inf"], 1, ["a finite"])
    assert not (tmp_path / "lib").exists() and not (tmp_path / "work").exists()


@pytest.fixture(scope="module")
def adapter(world, tmp_path_factory):
    from goose_jax.interop.peft import export_peft

    root = tmp_path_factory.mktemp("adapter")
    export_peft(world / "lib", "alpha", root / "adapter")
    return root / "adapter"


def _with_config(adapter, tmp_path, name, **changes):
    copy = tmp_path / name
    shutil.copytree(adapter, copy)
    config = json.loads((copy / "adapter_config.json").read_text())
    config.update(changes)
    (copy / "adapter_config.json").write_text(json.dumps(config))
    return copy


def test_adapter_options_that_cannot_work_are_refused_before_any_write(world, adapter, tmp_path,
                                                                       capsys):
    lib = tmp_path / "lib"
    peft = ["peft", "--base", world / "base", "--out", lib]
    # --scale 0 divided B by zero; inf and nan too: a usage error of the flag
    for scale in ("0", "inf", "nan", "-0"):
        _refused(capsys, CONVERT, [*peft, adapter, "--scale", scale], errors.USAGE,
                 ["--scale", "finite non-zero"])
    # the same number from the adapter's own config
    for alpha in (0, float("inf")):
        bad = _with_config(adapter, tmp_path, f"alpha{alpha}", lora_alpha=alpha)
        _refused(capsys, CONVERT, [*peft, bad], 1, ["lora_alpha", "finite non-zero"])
    # target_modules of the wrong type (a traceback inside the matcher), or a broken regex
    for i, targets in enumerate((5, [1, 2], {"q": 1}, "(unclosed")):
        bad = _with_config(adapter, tmp_path, f"targets{i}", target_modules=targets)
        _refused(capsys, CONVERT, [*peft, bad], 1, ["adapter_config.json", "target_modules"])
    for key, value in (("exclude_modules", 3), ("layers_to_transform", "0"),
                       ("rank_pattern", {"q": "x"}), ("alpha_pattern", {"(": 2})):
        bad = _with_config(adapter, tmp_path, key, **{key: value})
        _refused(capsys, CONVERT, [*peft, bad], 1, ["adapter_config.json", key])
    assert not lib.exists()


def test_damaged_files_are_one_line(world, adapter, tmp_path, capsys):
    out = tmp_path / "out"
    # a manifest nested past the JSON parser's recursion (a RecursionError traceback)
    lib = tmp_path / "lib"
    shutil.copytree(world / "lib", lib)
    manifest = json.loads((lib / "manifest.json").read_text())
    text = json.dumps(manifest).replace('"experts"', '"deep": ' + "[" * 100_000
                                        + "]" * 100_000 + ', "experts"', 1)
    (lib / "manifest.json").write_text(text)
    _refused(capsys, EVAL, _eval_args(world, out, "--library", lib), 1,
             ["manifest.json", "nested deeper than"], watch=[lib])
    # the same in another JSON file: an adapter's config
    deep = tmp_path / "deep_adapter"
    shutil.copytree(adapter, deep)
    (deep / "adapter_config.json").write_text("[" * 100_000 + "]" * 100_000)
    _refused(capsys, CONVERT, ["peft", deep, "--base", world / "base", "--out",
                               tmp_path / "lib2"], 1, ["adapter_config.json", "nested"])
    # damaged retrieval indexes: truncated, not a zip, pickled names, wrong dtypes
    good = tmp_path / "good.npz"
    np.savez(good, version=np.int32(1), names=np.asarray(["alpha", "beta", "gamma"]),
             keys=np.ones((3, 4), np.float32), owner=np.arange(3, dtype=np.int32))
    cases = {"truncated": good.read_bytes()[:200], "garbage": b"PK\x03\x04" + b"\x00" * 64}
    for name, data in cases.items():
        (tmp_path / f"{name}.npz").write_bytes(data)
    np.savez(tmp_path / "pickled.npz", version=np.int32(1),
             names=np.asarray(["alpha", 1, None], dtype=object),
             keys=np.ones((3, 4), np.float32), owner=np.arange(3))
    np.savez(tmp_path / "strings.npz", version=np.int32(1), names=np.asarray(["a", "b", "c"]),
             keys=np.asarray([["x"] * 4] * 3), owner=np.arange(3))
    for name in ("truncated", "garbage", "pickled", "strings"):
        line = _refused(capsys, EVAL, _eval_args(world, out, "--library", world / "lib",
                                                 "--method", "retrieval", "--retrieval-index",
                                                 tmp_path / f"{name}.npz"), 1,
                        [f"{name}.npz", "retrieval index"], watch=[tmp_path / f"{name}.npz"])
        assert "allow_pickle" not in line  # numpy's advice to run pickles
    assert not out.exists()


# --- 4. messages ----------------------------------------------------------------------------------


def test_a_tool_process_imports_tensorflow_with_stderr_muted(tmp_path, capfd, monkeypatch):
    """The mechanism, on a stand-in module that writes to file descriptor 2 as TensorFlow's
    C++ start-up does (the real import: the slow test below)."""
    (tmp_path / "goose_fake_tf.py").write_text(
        "import logging, os\nos.write(2, b'I0000 cudart_stub.cc:31] no GPU\\n')\n"
        "logging.getLogger('goose_fake_tf').setLevel(logging.INFO)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    finder = tool_process._QuietTensorFlow("goose_fake_tf")
    monkeypatch.setattr(sys, "meta_path", [finder, *sys.meta_path])
    capfd.readouterr()
    import goose_fake_tf

    assert capfd.readouterr().err == ""
    assert finder not in sys.meta_path  # once
    import logging

    assert logging.getLogger(goose_fake_tf.__name__).level == logging.ERROR
    os.write(2, b"after\n")  # stderr is back
    assert capfd.readouterr().err == "after\n"


def test_an_inherited_tensorflow_log_level_is_raised_unless_it_asks_for_the_logs():
    """JAX sets TF_CPP_MIN_LOG_LEVEL=1 in any process that imports it; a tool started from one
    inherited it, and at 1 TensorFlow's first operation printed CUDA's probing error
    (``cuda_platform.cc:52] failed call to cuInit``) before the tool's line."""
    for given, want in [(None, "3"), ("1", "3"), ("2", "3"), ("3", "3"), ("0", "0")]:
        env = {} if given is None else {"TF_CPP_MIN_LOG_LEVEL": given}
        tool_process.quiet_tensorflow_level(env)
        assert env == {"TF_CPP_MIN_LOG_LEVEL": want}, given


@pytest.mark.slow
@pytest.mark.parametrize("inherited", [None, "1"])
def test_tensorflow_says_nothing_in_a_tool_process(tmp_path, inherited):
    """TensorFlow's C++ start-up lines (absl, CUDA probing) broke goose-data's and
    train/t0.py's one-line contract: a tool process imports it silently, also when started
    by a process that imported JAX (TF_CPP_MIN_LOG_LEVEL=1 inherited)."""
    code = ("GOOSE_TOOL = 'goose-data'\nimport goose_jax\nimport logging, tensorflow as tf\n"
            "tf.data.Dataset.range(3).reduce(tf.constant(0, tf.int64), lambda a, b: a + b)\n"
            "assert logging.getLogger('tensorflow').level == logging.ERROR\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)
    if inherited is not None:
        env["TF_CPP_MIN_LOG_LEVEL"] = inherited
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, text=True,
                          capture_output=True, timeout=300)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr


def test_a_config_without_model_type_says_what_to_add(world, tmp_path, capsys):
    from goose_jax.models.llama import model as decoder
    from goose_jax.models.llama.config import DecoderConfig
    from goose_jax.models.llama.hf import save_hf_llama

    base = tmp_path / "llama"
    cfg = DecoderConfig.preset("tiny")
    save_hf_llama(cfg, decoder.init_params(cfg, 0), base)
    config = json.loads((base / "config.json").read_text())
    del config["model_type"]  # "not a T5 config", said of a Llama
    (base / "config.json").write_text(json.dumps(config))
    for prog, argv in ((CONVERT, ["hf-to-orbax", base, tmp_path / "ckpt"]),
                       (EVAL, ["--base", base, "--byte-tokenizer", "--bbh-root", world / "bbh",
                               "--out", tmp_path / "out", "--tasks",
                               "bbh/boolean_expressions"])):
        line = _refused(capsys, prog, argv, 1, ["config.json", "no model_type",
                                                '"model_type": "llama"'], watch=[base])
        assert "not a T5" not in line
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / "out").exists()


def test_a_bad_mesh_flag_is_a_usage_error(world, words, tmp_path, capsys):
    for mesh in ("data=-8", "data=3,expert=5", "nonsense"):
        _refused(capsys, TRAIN, _train_args([words], tmp_path, "--mesh", mesh), errors.USAGE,
                 ["--mesh"])
        _refused(capsys, EVAL, _eval_args(world, tmp_path / "out", "--mesh", mesh),
                 errors.USAGE, ["--mesh"])
    # the same sizes in a config file stay a config error (exit 1)
    _refused(capsys, TRAIN, _train_args([words], tmp_path, "--set", "mesh=data=-8"), 1,
             ["mesh"])
    assert not (tmp_path / "lib").exists() and not (tmp_path / "out").exists()


def _cells(row: str) -> int:
    """Cells of a markdown table row: its unescaped ``|`` less one."""
    return row.replace("\\|", "").count("|") - 1


def test_a_pipe_in_a_name_stays_in_its_cell():
    from goose_jax.evaluation import paper_table, report

    summary = {"datasets": {"bbh/a|b": {"metric": "exact|match", "score": 50.0,
                                        "examples": 2, "skipped": 0}},
               "benchmarks": {"bb|h": {"score": 50.0, "num_datasets": 1}}, "score": 50.0,
               "num_datasets": 1}
    for table in (report.markdown_table(summary),
                  report.comparison_table({"run|1": summary, "run 2": summary})):
        rows = [r for r in table.splitlines() if r.startswith("|")]
        assert len({_cells(r) for r in rows}) == 1, table
        assert "a\\|b" in table
    table = {"columns": ["bbh"], "held_in": [], "held_out": [], "base": None,
             "rows": {"phat|goose": {"columns": {"bbh": None}, "datasets": {"bbh/x|y": None}}}}
    text = paper_table.markdown(table)
    rows = [r for r in text.splitlines() if r.startswith("|")]
    assert "phat\\|goose" in text and "x\\|y" in text
    assert [_cells(r) for r in rows] == [2] * 6, text
