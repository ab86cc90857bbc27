"""Hostile cases against what goose-jax reads and where it writes: a checkpoint folder that
brings its own Python, outputs over inputs, two runs into one folder, a run that replaces experts
it did not write, a read-only output folder.

Every case asserts the exit code, exactly one line on stderr without a traceback, and that the
trees it could touch hash the same before and after (or, where code could run, that its marker
file never appears). Each class is tried in at least two tools or files.
"""

import io
import json
import os
import re
import socket
import sys

import pytest
from conftest import one_line, script, tool, tree_hash

from goose_jax.core import errors
from goose_jax.core.errors import CheckpointError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --- A. a folder's own code is never run ---------------------------------------------------------


def _word_tokenizer_json(path):
    """A tiny tokenizer.json (word level: pad 0, EOS 1) written with the tokenizers library."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(
        "the quick brown fox jumps over lazy dog".split())}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path))


def _code_folder(root, marker, where):
    """A tokenizer (and base) folder whose ``where`` file maps AutoTokenizer / AutoConfig to a
    module of its own that writes ``marker`` when imported."""
    root.mkdir()
    _word_tokenizer_json(root / "tokenizer.json")
    (root / "evil.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "from transformers import PreTrainedTokenizerFast as EvilTokenizer\n"
        "from transformers import PretrainedConfig as EvilConfig\n")
    tok_cfg = {"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
    if where == "tokenizer_config.json":
        tok_cfg.update(tokenizer_class="EvilTokenizer",
                       auto_map={"AutoTokenizer": ["evil.EvilTokenizer", "evil.EvilTokenizer"]})
    (root / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    if where == "config.json":
        (root / "config.json").write_text(json.dumps(
            {"model_type": "evil", "auto_map": {"AutoConfig": "evil.EvilConfig",
                                                "AutoTokenizer": ["evil.EvilTokenizer", None]}}))
    return root


@pytest.fixture
def yes_on_stdin(monkeypatch):
    """transformers' "run the custom code? [y/N]" prompt reads ``input()``: answer yes."""
    monkeypatch.setattr(sys, "stdin", io.StringIO("y\n" * 10))


@pytest.mark.parametrize("where", ["tokenizer_config.json", "config.json"])
def test_tokenizer_code_never_runs_even_answering_yes(tmp_path, yes_on_stdin, where):
    from goose_jax.data.tokenizers import load_hf_tokenizer

    marker = tmp_path / "marker"
    folder = _code_folder(tmp_path / "tok", marker, where)
    with pytest.raises(CheckpointError, match=rf"{where}: names custom code \(auto_map"):
        load_hf_tokenizer(folder)
    assert not marker.exists()


def test_eval_tokenizer_with_code_is_one_line_and_runs_nothing(world, tmp_path, capsys,
                                                               yes_on_stdin):
    marker = tmp_path / "marker"
    folder = _code_folder(tmp_path / "tok", marker, "tokenizer_config.json")
    before = tree_hash(world, folder)
    got = tool("goose-eval")([
        "--base", str(world / "base"), "--tokenizer", str(folder), "--library",
        str(world / "lib"), "--method", "phatgoose", "--bbh-root", str(world / "bbh"),
        "--tasks", "bbh/boolean_expressions", "--out", str(tmp_path / "out"), "--no-progress"])
    line = one_line(capsys.readouterr().err, "goose-eval")
    assert got == errors.USER_ERROR and "auto_map" in line, line
    assert not marker.exists() and not (tmp_path / "out").exists()
    assert tree_hash(world, folder) == before


def _on_a_terminal(argv, typed: bytes, timeout: float = 240) -> tuple[int, str]:
    """Runs ``argv`` with a terminal (a pseudo-terminal) as its stdin, stdout and stderr, with
    ``typed`` typed ahead (echo off); returns the exit code and everything it wrote there."""
    import pty
    import select
    import subprocess
    import termios
    import time

    main_fd, term_fd = pty.openpty()
    attrs = termios.tcgetattr(term_fd)
    attrs[3] &= ~termios.ECHO
    termios.tcsetattr(term_fd, termios.TCSANOW, attrs)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    proc = subprocess.Popen(argv, stdin=term_fd, stdout=term_fd, stderr=term_fd, env=env,
                            start_new_session=True)
    os.close(term_fd)
    os.write(main_fd, typed)
    out, deadline = b"", time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if select.select([main_fd], [], [], 0.5)[0]:
                try:
                    chunk = os.read(main_fd, 4096)
                except OSError:  # EIO: every end of the terminal is closed
                    break
                if not chunk:
                    break
                out += chunk
            elif proc.poll() is not None:
                break
        code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(main_fd)
    return code, out.decode(errors="replace").replace("\r\n", "\n")


def test_tokenizer_code_on_a_terminal_neither_asks_nor_runs(world, tmp_path):
    """With a terminal attached, transformers asks "Do you wish to run the custom code? [y/N]"
    on it and runs the folder's code when the user answers yes. goose-eval with such a
    --tokenizer on a terminal, "y" typed ahead: no question, one line, exit 1, no code run."""
    marker = tmp_path / "marker"
    folder = _code_folder(tmp_path / "tok", marker, "tokenizer_config.json")
    before = tree_hash(world, folder)
    code, said = _on_a_terminal([
        os.path.join(os.path.dirname(sys.executable), "goose-eval"), "--base",
        str(world / "base"), "--tokenizer", str(folder), "--library", str(world / "lib"),
        "--method", "phatgoose", "--bbh-root", str(world / "bbh"), "--tasks",
        "bbh/boolean_expressions", "--out", str(tmp_path / "out"), "--no-progress"],
        typed=b"y\n" * 3)
    assert "[y/N]" not in said and "custom code?" not in said, said
    line = one_line(said, "goose-eval")
    assert code == errors.USER_ERROR and "auto_map" in line, said
    assert not marker.exists() and not (tmp_path / "out").exists()
    assert tree_hash(world, folder) == before


def test_base_and_embedder_with_code_are_refused(world, tmp_path, capsys):
    import shutil

    from goose_jax.routing.retrieval import SentenceEmbedder

    base = tmp_path / "base"
    shutil.copytree(world / "base", base)
    cfg = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**cfg, "auto_map": {"AutoConfig": "x.C"}}))
    before = tree_hash(base)
    got = tool("goose-convert")(["hf-to-orbax", str(base), str(tmp_path / "ckpt")])
    line = one_line(capsys.readouterr().err, "goose-convert")
    assert got == errors.USER_ERROR and "config.json: names custom code" in line, line
    assert tree_hash(base) == before and not (tmp_path / "ckpt").exists()
    with pytest.raises(CheckpointError, match="names custom code"):
        SentenceEmbedder.load(base)


_DIRECT = re.compile(r"\.from_pretrained\(|\bAuto(Tokenizer|Config|Model\w*)\b|"
                     r"trust_remote_code\s*=\s*True|\bSentenceTransformer\(")


def test_only_one_module_hands_folders_to_transformers():
    """Any new direct call (``from_pretrained``, an Auto class, ``SentenceTransformer(...)``) in
    the package or its scripts fails here: it must go through goose_jax.core.hf_code."""
    found = []
    for top in ("goose_jax", "train", "eval", "bench"):
        for d, _, names in os.walk(os.path.join(ROOT, top)):
            for n in names:
                path = os.path.join(d, n)
                if not n.endswith(".py") or path.endswith(os.path.join("core", "hf_code.py")):
                    continue
                for i, text in enumerate(open(path, encoding="utf-8"), 1):
                    code = text.split("#")[0]
                    if _DIRECT.search(code) and not code.lstrip().startswith(("\"", "'", "``")):
                        found.append(f"{os.path.relpath(path, ROOT)}:{i}: {text.strip()}")
    assert not found, "\n".join(found)


# --- B1. no output over, around or into an input -------------------------------------------------


@pytest.fixture
def release(tmp_path):
    """A FLAN release folder of one good JSONL file."""
    src = tmp_path / "flan"
    src.mkdir()
    (src / "rows.jsonl").write_text("".join(json.dumps(
        {"inputs": f"q{i}", "targets": "a", "_task_name": "t", "_template_type": "zs_opt"})
        + "\n" for i in range(5)))
    return src


def _refused(capsys, main, prog, argv, code, words, watch):
    before = tree_hash(*watch)
    capsys.readouterr()
    got = main([str(a) for a in argv])
    line = one_line(capsys.readouterr().err, prog)
    assert got == code, line
    for word in words:
        assert word in line, (word, line)
    assert tree_hash(*watch) == before, line
    return line


@pytest.mark.parametrize("command,out,how", [
    ("flan", "{src}", "is the same path as the input FLAN_DIR"),
    ("flan", "{tmp}", "holds the input FLAN_DIR"),
    ("flan", "{src}/out", "lies inside the input FLAN_DIR"),
    ("flan", "{tmp}/link", "is the same path as the input FLAN_DIR"),   # a symlink to it
    ("p3-heldin", "{tmp}", "holds the input P3_DIR"),
])
def test_goose_data_never_writes_over_its_source(release, tmp_path, capsys, command, out, how):
    from goose_jax.data.synthetic import write_p3

    (tmp_path / "link").symlink_to(release)
    out = out.format(src=release, tmp=tmp_path)
    src, extra = release, []
    if command == "p3-heldin":   # a release that builds: only the overlap can stop it
        src, extra = tmp_path / "p3", ["--datasets", "ag_news"]
        for split, n in (("train", 12), ("test", 2)):
            write_p3(src, "ag_news_classify", split, [
                {"inputs_pretokenized": f"news {i}", "targets_pretokenized": "World",
                 "answer_choices": ["World", "Sports"]} for i in range(n)])
    _refused(capsys, tool("goose-data"), "goose-data",
             [command, src, out, "--overwrite", *extra], errors.USER_ERROR, [how], [tmp_path])


@pytest.fixture
def lib_copy(world, tmp_path):
    import shutil

    shutil.copytree(world / "lib", tmp_path / "lib")
    return tmp_path / "lib"


@pytest.mark.parametrize("prog,argv,how", [
    ("goose-eval", ["--library", "{lib}", "--out", "{lib}/run"],
     "lies inside the input --library"),
    ("goose-eval", ["--library", "{lib}", "--out", "{world}/base"],
     "is the same path as the input --base"),
    ("goose-eval", ["--library", "{lib}", "--out", "{world}/bbh/x"],
     "lies inside the input --bbh-root"),
    ("goose-convert", ["to-peft", "{lib}", "alpha", "{lib}/adapter"],
     "lies inside the input LIBRARY_DIR"),
    ("goose-convert", ["hf-to-orbax", "{world}/base", "{world}"], "holds the input SRC_HF_DIR"),
    ("goose-eval report", ["report", "{run}", "--out", "{run}"],
     "is the same path as the input RUN_DIR"),
    ("goose-train", ["prototypes", "--library", "{lib}", "--data", "{lib}/alpha.jsonl",
                     "--base", "{world}/base", "--set", "tokenizer=byte"],
     "--library {lib}: holds the input --data"),
])
def test_eval_convert_and_report_never_write_into_inputs(world, lib_copy, one_run, capsys,
                                                         prog, argv, how):
    run, _ = one_run
    argv = [a.format(lib=lib_copy, world=world, run=run) for a in argv]
    how = how.format(lib=lib_copy)
    (lib_copy / "alpha.jsonl").write_text('{"input": "q", "target": "a"}\n')
    if prog == "goose-eval":
        argv += ["--base", world / "base", "--byte-tokenizer", "--bbh-root", world / "bbh",
                 "--tasks", "bbh/boolean_expressions", "--no-progress"]
    _refused(capsys, tool(prog.split()[0]), prog, argv, errors.USER_ERROR, [how],
             [lib_copy, world, run])


@pytest.mark.parametrize("lib,work,how", [
    ("{d}", "{tmp}/w", "--library {d}: holds the input --data"),
    ("{tmp}/lib", "{d}", "--workdir {d}: holds the input --data"),
    ("{tmp}/lib", "{tmp}/lib/w", "lies inside the input --library"),
])
def test_goose_train_never_writes_over_its_data_or_into_its_library(tmp_path, capsys, lib, work,
                                                                    how):
    from conftest import write_jsonl

    folder = tmp_path / "d"
    folder.mkdir()
    data = write_jsonl(folder / "a.jsonl", [("in", "out")] * 3)
    lib, work, how = (x.format(d=folder, tmp=tmp_path) for x in (lib, work, how))
    _refused(capsys, tool("goose-train"), "goose-train", _train_args(data, lib, work),
             errors.USER_ERROR, [how], [tmp_path])


def test_the_setting_scripts_never_write_around_their_inputs(tmp_path, capsys):
    for name in ("p3", "bbh", "bbl", "base"):
        (tmp_path / name).mkdir()
    argv = ["--p3-dir", tmp_path / "p3", "--bbh-root", tmp_path / "bbh", "--bbl-root",
            tmp_path / "bbl", "--base", tmp_path / "base", "--workdir", tmp_path]
    _refused(capsys, script("train/t0.py"), "train/t0.py", argv, errors.USER_ERROR,
             ["--workdir", "holds the input --p3-dir"], [tmp_path])


# --- B2. a rerun replaces only what it wrote itself ----------------------------------------------


TINY = os.path.join(ROOT, "configs", "tiny.py")


def _train_args(data, lib, work, *extra, command="experts"):
    return [command, "--config", TINY, "--base", "random:tiny", "--data", str(data),
            "--library", str(lib), "--workdir", str(work), "--set", "steps=2",
            "--set", "gate_steps=2", "--set", "eval_every=0", *extra]


def _killed_after_its_record(monkeypatch, argv):
    """Runs goose-train as if killed right after run.json was written, before any output."""
    from goose_jax.pipeline import train_runs

    def killed(*a, **k):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(train_runs, "train_loop", killed)
        assert tool("goose-train")(argv) == errors.INTERRUPTED


def _other_run_adds(lib_path, gate):
    """What another run (another workdir, a library import) writes: expert ``reverse``, or its
    gate."""
    import numpy as np

    from goose_jax.core.trees import nest_sites
    from goose_jax.library.store import ExpertLibrary

    lib = ExpertLibrary.open(lib_path)
    rng = np.random.default_rng(0)
    sites = lib.sites
    experts = nest_sites({s: {"lora_a": rng.standard_normal((i, lib.rank), np.float32),
                              "lora_b": rng.standard_normal((lib.rank, o), np.float32)}
                          for s, (i, o) in sites.items()})
    gates = nest_sites({s: {"gate": rng.standard_normal((i,), np.float32)}
                        for s, (i, _) in sites.items()})
    lib.add("reverse", experts, gates if gate else None,   # the same expert, gated or not
            info={"data": "another run's", "workdir": str(lib_path.parent / "other")},
            overwrite=gate)


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """A library whose expert ``reverse`` and then its gate another run wrote, while a first
    experts run (``w_killed``) and a first gate run (``g_killed``), each killed before writing
    anything, wait for their reruns."""
    from conftest import write_jsonl

    root = tmp_path_factory.mktemp("two_runs")
    data = write_jsonl(root / "reverse.jsonl",
                       [(f"reverse: {w}", w[::-1]) for w in ("goose", "jax", "flax")])
    from goose_jax.pipeline.train_runs import RunArgs, Setup, create_library

    setup = Setup(RunArgs("experts", data=[data], workdir=str(root / "w_first"), config=TINY,
                          base="random:tiny"))
    create_library(str(root / "lib"), setup, setup.tcfg.lora)   # as a first run leaves it
    mp = pytest.MonkeyPatch()
    try:
        _killed_after_its_record(mp, _train_args(data, root / "lib", root / "w_killed"))
        _other_run_adds(root / "lib", gate=False)
        _killed_after_its_record(mp, _train_args(data, root / "lib", root / "g_killed",
                                                 command="gate"))
        _other_run_adds(root / "lib", gate=True)
    finally:
        mp.undo()
    return root, data


def test_a_run_that_fails_on_a_new_library_leaves_no_library(monkeypatch, tmp_path, capsys):
    from conftest import write_jsonl

    from goose_jax.pipeline import train_runs

    def fails(*a, **k):
        raise errors.DataError("a bad row at step 1")

    monkeypatch.setattr(train_runs, "train_loop", fails)
    data = write_jsonl(tmp_path / "a.jsonl", [("in", "out")] * 3)
    argv = _train_args(data, tmp_path / "lib", tmp_path / "w")
    assert tool("goose-train")(argv) == errors.USER_ERROR
    assert "bad row" in one_line(capsys.readouterr().err, "goose-train")
    assert not (tmp_path / "lib").exists()


@pytest.mark.parametrize("command,work,says", [("experts", "w_killed", "did not write"),
                                              ("gate", "g_killed", "did not train")])
def test_a_killed_run_never_replaces_what_another_run_added(two_runs, capsys, command, work,
                                                            says):
    root, data = two_runs
    assert json.loads((root / work / "run.json").read_text()).get("finished") is None
    _refused(capsys, tool("goose-train"), "goose-train",
             _train_args(data, root / "lib", root / work, command=command),
             errors.USER_ERROR, [says, "reverse", "--overwrite"], [root / "lib"])


# --- B3. one run at a time per output folder -----------------------------------------------------


def _hold_lock(folder):
    """Another live process that holds ``folder``'s run lock: a lock file beside the folder,
    ``.<name>.lock``, naming this host and that process (the format every goose-jax writer
    reads). The caller kills it."""
    import socket
    import subprocess

    proc = subprocess.Popen(["sleep", "60"])
    parent, name = os.path.split(str(folder))
    with open(os.path.join(parent, f".{name}.lock"), "w") as f:
        f.write(f"{socket.gethostname()} {proc.pid}\n")
    return proc


@pytest.mark.parametrize("prog", ["goose-data", "goose-eval", "goose-train", "goose-demo"])
def test_a_second_run_into_a_folder_another_run_writes_is_refused(release, world, tmp_path,
                                                                   capsys, prog):
    from conftest import write_jsonl

    out = tmp_path / "busy"
    argv = {"goose-data": ["flan", release, out],
            "goose-eval": ["--base", world / "base", "--byte-tokenizer", "--bbh-root",
                           world / "bbh", "--tasks", "bbh/boolean_expressions", "--out", out,
                           "--no-progress", "--max-examples", "1"],
            "goose-train": _train_args(write_jsonl(tmp_path / "a.jsonl", [("q", "a")] * 3),
                                       tmp_path / "lib", out),
            "goose-demo": ["--out", out, "--preset", "small"]}[prog]
    holder = _hold_lock(out)
    try:
        _refused(capsys, tool(prog), prog, argv, errors.USER_ERROR,
                 ["another run", f"pid {holder.pid}", str(tmp_path / ".busy.lock")],
                 [tmp_path])
        assert not out.exists()
    finally:
        holder.kill()
        holder.wait()


def test_a_dead_runs_lock_is_taken_over(release, tmp_path):
    out = tmp_path / "built"
    holder = _hold_lock(out)
    holder.kill()   # SIGKILL: its lock file stays, naming a dead process
    holder.wait()
    assert (tmp_path / ".built.lock").exists()
    assert tool("goose-data")(["flan", str(release), str(out)]) == errors.OK
    assert (out / "summary.json").exists() and not (tmp_path / ".built.lock").exists()


def test_goose_eval_holds_the_lock_while_it_writes(one_run):
    run, seen = one_run
    assert seen == [[socket.gethostname(), str(os.getpid())]]
    assert not (run.parent / ".run.lock").exists()


# --- B4. unwritable or full outputs: found before the work, named --------------------------------


@pytest.fixture
def read_only():
    """Makes folders unwritable (chmod for a user, the immutable flag for root) and undoes it."""
    import subprocess

    done = []

    def make(folder):
        if os.geteuid() != 0:
            os.chmod(folder, 0o555)
        elif subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode:
            pytest.skip("cannot make a folder read-only here (root without chattr +i)")
        done.append(folder)

    yield make
    for folder in done:
        if os.geteuid() != 0:
            os.chmod(folder, 0o755)
        else:
            subprocess.run(["chattr", "-i", str(folder)], check=True)


@pytest.mark.parametrize("command,extra", [("experts", ["--names", "fresh"]),
                                           ("gate", ["--overwrite"])])
def test_a_read_only_library_is_refused_before_training(two_runs, tmp_path, read_only, capsys,
                                                        command, extra):
    import shutil

    root, data = two_runs
    lib = tmp_path / "lib"
    shutil.copytree(root / "lib", lib)
    read_only(lib / "experts")
    _refused(capsys, tool("goose-train"), "goose-train",
             _train_args(data, lib, tmp_path / "w", *extra, command=command),
             errors.USER_ERROR, [str(lib / "experts"), "cannot write"], [lib])
    assert not (tmp_path / "w").exists()


def test_a_full_disk_names_the_file(tmp_path):
    from goose_jax.core.tensorfile import write_atomic

    # ENOSPC comes from write() / close() without a file name: the error names the file.
    (tmp_path / f"a.json.tmp-{os.getpid()}").symlink_to("/dev/full")
    with pytest.raises(OSError) as e:
        write_atomic(tmp_path / "a.json", "x" * 10)
    assert str(tmp_path / "a.json") in errors.one_line(e.value), errors.one_line(e.value)
    assert os.listdir(tmp_path) == []


@pytest.fixture(scope="module")
def one_run(world, tmp_path_factory):
    """A goose-eval run, and what its lock file said while the results were written."""
    from goose_jax.evaluation import report

    run = tmp_path_factory.mktemp("one_run") / "run"
    seen = []
    write = report.write_results

    def watching(out, *a, **k):
        lock = run.parent / ".run.lock"
        seen.append(lock.read_text().split() if lock.exists() else None)
        return write(out, *a, **k)

    mp = pytest.MonkeyPatch()
    try:
        mp.setattr(report, "write_results", watching)
        assert tool("goose-eval")([str(a) for a in (
            "--base", world / "base", "--byte-tokenizer", "--bbh-root", world / "bbh",
            "--tasks", "bbh/boolean_expressions", "--out", run, "--no-progress",
            "--max-examples", "2")]) == 0
    finally:
        mp.undo()
    return run, seen


def test_a_full_disk_under_a_tool_is_one_line_naming_the_file(one_run, tmp_path, capsys):
    out = tmp_path / "report"
    out.mkdir()
    (out / f"report.md.tmp-{os.getpid()}").symlink_to("/dev/full")
    capsys.readouterr()
    run, _ = one_run
    _refused(capsys, tool("goose-eval"), "goose-eval report", ["report", run, "--out", out],
             errors.USER_ERROR, [str(out / "report.md"), "No space left"], [run])


def test_a_known_size_is_checked_against_the_free_space_first(world, tmp_path, capsys,
                                                              monkeypatch):
    import shutil

    from goose_jax.core import outputs

    monkeypatch.setattr(outputs.shutil, "disk_usage",
                        lambda p: shutil._ntuple_diskusage(10, 10, 1000))
    dst = tmp_path / "ckpt"
    _refused(capsys, tool("goose-convert"), "goose-convert",
             ["hf-to-orbax", world / "base", dst], errors.USER_ERROR,
             ["needs", "MiB", "free"], [world / "base"])
    assert not dst.exists()
