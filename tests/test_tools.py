"""One error policy: every tool answers each class of bad input with the exit code of the table in
goose_jax.core.errors and exactly one line on stderr, never a traceback."""

import json

import pytest
from conftest import one_line, script, tool

from goose_jax.core import errors


@pytest.fixture
def jsonl(tmp_path):
    path = tmp_path / "task.jsonl"
    path.write_text("\n".join(json.dumps({"input": f"x {i}", "target": "y"}) for i in range(4)))
    return str(path)


def _cases(tmp_path, jsonl):
    """(tool, argv, expected code, a word the message must contain) per tool and error class."""
    missing = str(tmp_path / "missing")
    a_file = str(tmp_path / "a_file")
    with open(a_file, "w") as f:
        f.write("not a directory")
    train = ["--workdir", str(tmp_path / "w"), "--library", str(tmp_path / "lib")]
    return [
        # usage: an unknown flag, a missing subcommand or a missing option
        ("goose-train", ["experts", "--data", jsonl, *train, "--no-such-flag"], errors.USAGE,
         "unrecognized"),
        ("goose-train", ["experts", "--workdir", "w", "--library", "l"], errors.USAGE, "--data"),
        ("goose-eval", ["--base", missing, "--out", str(tmp_path / "o")], errors.USAGE,
         "--benchmark"),
        ("goose-convert", [], errors.USAGE, "COMMAND"),
        ("goose-demo", ["--preset", "enormous"], errors.USAGE, "enormous"),
        ("goose-data", ["flan", missing], errors.USAGE, "OUT_DIR"),
        # user errors: a path that does not exist, a file that is not what it should be, a value
        ("goose-train", ["experts", "--data", missing, *train, "--base", "random:tiny",
                         "--set", "tokenizer=byte"], errors.USER_ERROR, "missing"),
        ("goose-train", ["experts", "--data", jsonl, *train, "--base", "random:tiny",
                         "--set", "tokenizer=byte", "--set", "lr=fast"], errors.USER_ERROR,
         "lr"),
        ("goose-eval", ["--base", missing, "--tasks", "bbh/navigate", "--bbh-root", missing,
                        "--out", str(tmp_path / "o")], errors.USER_ERROR, "missing"),
        ("goose-eval", ["--base", missing, "--tasks", "bbh/navigate", "--out", a_file],
         errors.USER_ERROR, "a_file"),
        ("goose-convert", ["hf-to-orbax", missing, str(tmp_path / "dst")], errors.USER_ERROR,
         "missing"),
        ("goose-convert", ["to-peft", a_file, "x", str(tmp_path / "dst")], errors.USER_ERROR,
         "a_file"),
        ("goose-demo", ["--base", missing, "--out", str(tmp_path / "demo")],
         errors.USER_ERROR, "missing"),
        ("goose-data", ["p3-heldin", missing, str(tmp_path / "built")], errors.USER_ERROR,
         "missing"),
        ("goose-data", ["flan", missing, a_file], errors.USER_ERROR, "a_file"),
        ("train/experts_and_gates.py", ["--data", missing, "--base", "random:tiny", "--set",
                                        "tokenizer=byte", *train], errors.USER_ERROR, "missing"),
        ("eval/paper.py", ["--base", missing, "--library", missing, "--tasks", "bbh/navigate",
                           "--out", a_file], errors.USER_ERROR, "a_file"),
    ]


def _main(name):
    return script(name) if name.endswith(".py") else tool(name)


def test_each_tool_each_error_classone_line(tmp_path, jsonl, capsys):
    for name, argv, code, word in _cases(tmp_path, jsonl):
        got = _main(name)(argv)
        err = capsys.readouterr().err
        assert got == code, (name, argv, err)
        line = one_line(err, name)
        assert word in line, (name, line)
        if code == errors.USAGE:
            assert line.endswith("--help)") and f"(see {name}" in line, line


@pytest.mark.parametrize("name,argv,hint", [
    ("goose-train", ["experts", "--data", "{jsonl}", "--base", "random:tiny", "--set",
                     "tokenizer=byte", "--workdir", "{tmp}/w", "--library", "{tmp}/l"],
     "resume"),
    ("goose-demo", ["--out", "{tmp}/demo", "--preset", "small"], "rerun"),
    ("goose-convert", ["peft", "{tmp}/adapter", "--base", "{tmp}/base", "--out", "{tmp}/lib"],
     ""),
    ("train/experts_and_gates.py", ["--data", "{jsonl}", "--base", "random:tiny", "--set",
                                    "tokenizer=byte", "--workdir", "{tmp}/w", "--library",
                                    "{tmp}/l"], "resume"),
])
def test_ctrl_c_is_one_line_and_130(name, argv, hint, tmp_path, jsonl, capsys, monkeypatch):
    from goose_jax.interop import conversions
    from goose_jax.pipeline import demo, train_runs, zeroshot

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    for user in (conversions, demo, train_runs, zeroshot):   # every tool's base loading
        monkeypatch.setattr(user, "load_base", interrupt)
    argv = [a.format(jsonl=jsonl, tmp=tmp_path) for a in argv]
    assert _main(name)(argv) == errors.INTERRUPTED
    line = one_line(capsys.readouterr().err, name)
    assert "interrupted" in line and hint in line


def test_goose_eval_ctrl_c(tmp_path, capsys, monkeypatch):
    from goose_jax.pipeline import zeroshot

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(zeroshot, "run_eval", interrupt)
    code = tool("goose-eval")(["--base", "b", "--tasks", "bbh/x", "--out", str(tmp_path / "o")])
    assert code == errors.INTERRUPTED
    assert "interrupted" in one_line(capsys.readouterr().err, "goose-eval")


def test_goose_data_ctrl_c_leaves_nothing(tmp_path, capsys, monkeypatch):
    import os

    from goose_jax.data import build_flan

    flan_dir = tmp_path / "flan"
    flan_dir.mkdir()
    (flan_dir / "rows.jsonl").write_text(json.dumps(
        {"inputs": "q", "targets": "a", "_task_name": "t", "_template_type": "zs_opt"}) + "\n")

    def interrupt(stage, *args, **kwargs):  # half-way through writing
        (tmp_path / "seen").write_text(stage)
        with open(os.path.join(stage, "half.jsonl"), "w") as f:
            f.write("{")
        raise KeyboardInterrupt

    monkeypatch.setattr(build_flan, "write_build", interrupt)
    code = tool("goose-data")(["flan", str(flan_dir), str(tmp_path / "out")])
    assert code == errors.INTERRUPTED
    assert "interrupted" in one_line(capsys.readouterr().err, "goose-data")
    assert sorted(os.listdir(tmp_path)) == ["flan", "seen"]  # no OUT_DIR, no staging folder


def test_every_exception_class_is_a_goose_error_defined_in_errors():
    import importlib
    import inspect
    import pkgutil

    import goose_jax

    found = []
    for info in pkgutil.walk_packages(goose_jax.__path__, "goose_jax."):
        module = importlib.import_module(info.name)
        for _, obj in inspect.getmembers(module, inspect.isclass):
            if issubclass(obj, BaseException) and obj.__module__ == info.name:
                found.append(f"{info.name}.{obj.__name__}")
    assert found == [n for n in found if n.startswith("goose_jax.core.errors.")]
    assert all(issubclass(getattr(errors, n.rsplit(".", 1)[1]), errors.GooseError)
               for n in found)
