"""Hostile cases against goose-eval, eval/paper.py, goose-convert and goose-demo's output paths.

Three classes, several cases each: work overwritten without asking, inputs checked too late, and
corrupt or non-finite inputs used silently. Every case asserts the exit code, one line on stderr
without a traceback, and that no file it could touch changed (the trees are hashed before and
after). The cases that must fail before any work name an input that would fail later too (a
missing data folder or base), so the order of the checks is asserted as well.
"""

import os
import shutil

import numpy as np
import pytest
from conftest import build_hf_t5, one_line, script, tool, tree_hash

from goose_jax.core import errors

EVAL, CONVERT, DEMO = "goose-eval", "goose-convert", "goose-demo"
PAPER = "eval/paper.py"
TASK = ["--tasks", "bbh/boolean_expressions"]


def _main(prog):
    return script(prog) if prog.endswith(".py") else tool(prog)


def _refused(capsys, prog, argv, code, words, watch=()):
    """Runs one case; checks code, the one line, its words and that nothing watched changed."""
    before = tree_hash(*watch)
    got = _main(prog)([str(a) for a in argv])
    err = capsys.readouterr().err
    assert got == code, err
    line = one_line(err, prog)
    for word in words:
        assert word in line, line
    assert tree_hash(*watch) == before
    return line


def _eval_args(world, out, *extra, bbh=None):
    return ["--base", world / "base", "--byte-tokenizer", "--bbh-root", bbh or world / "bbh",
            "--out", out, "--no-progress", "--batch-size", "4", *extra]


@pytest.fixture(scope="module")
def hostile(world, tmp_path_factory):
    """Bad inputs built from the goose-eval world: a library without gates, a base whose head
    overflows float32, a library whose B overflows, a goose-jax checkpoint of the base, a PEFT
    adapter, and another Hugging Face model."""
    import goose_jax as gj
    from goose_jax.core.trees import nest_sites
    from goose_jax.experts.lora import LoRAConfig
    from goose_jax.library.store import ExpertLibrary
    from goose_jax.models import checkpoint

    root = tmp_path_factory.mktemp("hostile")
    cfg, params = gj.load_hf_t5(world / "base")
    sites = r"decoder/block_0/ffn/wo"
    rng = np.random.default_rng(1)
    for name, b_value, gates in (("nogates", 0.1, False), ("overflow", 3e38, True)):
        lib = ExpertLibrary.create(root / name, cfg, params, LoRAConfig(rank=2, sites=sites))
        for expert in ("one", "two"):
            tree = {s: {"lora_a": rng.standard_normal((d_in, 2), np.float32),
                        "lora_b": np.full((2, d_out), b_value, np.float32)}
                    for s, (d_in, d_out) in lib.sites.items()}
            gate = {s: {"gate": rng.standard_normal((d_in,), np.float32)}
                    for s, (d_in, _) in lib.sites.items()}
            lib.add(expert, nest_sites(tree), nest_sites(gate) if gates else None)
    huge = dict(params, lm_head={"kernel": np.where(
        rng.standard_normal(params["lm_head"]["kernel"].shape) > 0, 3e38, -3e38).astype(
            np.float32)})
    gj.save_hf_t5(cfg, huge, root / "huge_head")
    checkpoint.save_model(root / "ckpt", cfg, params)
    from goose_jax.interop.peft import export_peft

    export_peft(world / "lib", "alpha", root / "adapter")
    build_hf_t5("v1_1").save_pretrained(root / "other_hf")
    (root / "a_file").write_text("not a folder")
    return root


# --- 1. work overwritten without asking ---------------------------------------------------------


def test_goose_eval_refuses_an_out_that_holds_results(world, hostile, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "results.json").write_text('{"score": 61.0}')
    # The data folder is missing too: the output check comes first.
    _refused(capsys, EVAL, _eval_args(world, out, *TASK, bbh=tmp_path / "no_bbh"),
             errors.USER_ERROR, ["already holds results", "--overwrite"], [out])


def test_paper_refuses_an_out_that_holds_a_comparison_or_a_method(world, tmp_path, capsys):
    lib = ["--library", world / "lib"]
    out = tmp_path / "paper"
    out.mkdir()
    (out / "comparison.json").write_text("{}")
    _refused(capsys, PAPER, _eval_args(world, out, *lib, *TASK, bbh=tmp_path / "no_bbh"),
             errors.USER_ERROR, ["comparison.json", "--overwrite"], [out])
    out = tmp_path / "paper2"
    (out / "arrow").mkdir(parents=True)
    (out / "arrow" / "results.json").write_text("{}")
    _refused(capsys, PAPER, _eval_args(world, out, *lib, *TASK, bbh=tmp_path / "no_bbh"),
             errors.USER_ERROR, ["arrow", "already holds results"], [out])


def test_orbax_to_hf_refuses_a_folder_that_holds_a_model(hostile, capsys):
    dst = hostile / "other_hf"
    _refused(capsys, CONVERT, ["orbax-to-hf", hostile / "ckpt", dst], errors.USER_ERROR,
             ["already holds a Hugging Face model", "--overwrite"], [dst, hostile / "ckpt"])
    # Its own source: a goose-jax checkpoint is never written into.
    _refused(capsys, CONVERT, ["orbax-to-hf", hostile / "ckpt", hostile / "ckpt", "--overwrite"],
             errors.USER_ERROR, ["is a goose-jax checkpoint"], [hostile / "ckpt"])


def test_hf_to_orbax_refuses_before_reading_the_model(hostile, tmp_path, capsys):
    # SRC does not exist: the destination is checked first.
    _refused(capsys, CONVERT, ["hf-to-orbax", tmp_path / "missing", hostile / "ckpt"],
             errors.USER_ERROR, ["already exists", "--overwrite"], [hostile / "ckpt"])
    _refused(capsys, CONVERT, ["hf-to-orbax", tmp_path / "missing", hostile / "adapter"],
             errors.USER_ERROR, ["not a goose-jax checkpoint; refusing"], [hostile / "adapter"])


def test_to_peft_refuses_a_folder_with_adapter_weights(world, hostile, tmp_path, capsys):
    dst = tmp_path / "half"
    dst.mkdir()
    shutil.copy(hostile / "adapter" / "adapter_model.safetensors", dst)
    _refused(capsys, CONVERT, ["to-peft", world / "lib", "beta", dst], errors.USER_ERROR,
             ["already holds a PEFT adapter", "adapter_model.safetensors"], [dst])


def test_library_imports_refuse_an_existing_library_or_expert(world, hostile, tmp_path,
                                                              capsys):
    lib = world / "lib"
    missing = tmp_path / "missing"   # the base: never read
    _refused(capsys, CONVERT, ["peft", hostile / "adapter", "--base", missing, "--out", lib],
             errors.USER_ERROR, ["already holds an expert library", "--append"], [lib])
    _refused(capsys, CONVERT, ["peft", hostile / "adapter", "--base", missing, "--out", lib,
                               "--append", "--names", "beta"],
             errors.USER_ERROR, ["already holds experts ['beta']", "--overwrite"], [lib])
    _refused(capsys, CONVERT, ["phatgoose-release", missing, "--base", missing, "--out", lib],
             errors.USER_ERROR, ["already holds an expert library"], [lib])
    _refused(capsys, CONVERT, ["peft", hostile / "adapter", "--base", missing, "--out",
                               hostile / "other_hf"],
             errors.USER_ERROR, ["not an expert library"], [hostile / "other_hf"])


# --- 2. checked before any work -----------------------------------------------------------------


def test_goose_eval_checks_paths_and_flags_first(world, hostile, tmp_path, capsys):
    no_bbh = tmp_path / "no_bbh"   # every case would also fail on the data, later
    out = tmp_path / "out"
    lib = ["--library", world / "lib"]
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{'not': json")
    cases = [
        (["--out", hostile / "a_file" / "sub"], 1, ["a_file is a file"]),
        (["--base", tmp_path / "no_base"], 1, ["--base is not a local directory"]),
        ([*lib, "--method", "example", "--expert-map", bad_json], 1,
         ["bad.json", "--expert-map", "JSON"]),
        (["--flan-grouping", bad_json], 1, ["bad.json", "--flan-grouping"]),
        ([*lib, "--method", "arrow", "--top-k", "4"], 1, ["--top-k 4", "3 experts"]),
        ([*lib, "--top-k", "0"], 2, ["--top-k 0"]),
        ([*lib, "--experts", "alpha,zeta"], 1, ["--experts", "zeta"]),
        (["--library", hostile / "nogates", "--method", "phatgoose"], 1,
         ["phatgoose needs every expert's trained gate", "goose-train gate"]),
        ([*lib, "--method", "single", "--expert", "7"], 1, ["--expert '7'"]),
        ([*lib, "--method", "average_activation", "--prototypes", tmp_path / "p.st"], 1,
         ["p.st", "--prototypes"]),
        ([*lib, "--method", "retrieval"], 1, ["retrieval index does not exist"]),
    ]
    for extra, code, words in cases:
        args = _eval_args(world, out, *TASK, *extra, bbh=no_bbh)   # a repeated flag: the last
        _refused(capsys, EVAL, args, code, words, [world / "lib", hostile / "nogates"])
        assert not out.exists()


def test_paper_checks_every_method_first(world, hostile, tmp_path, capsys):
    _refused(capsys, PAPER, _eval_args(world, hostile / "a_file" / "sub", "--library",
                                       world / "lib", *TASK), errors.USER_ERROR, ["a_file"])
    out = tmp_path / "paper"
    # The last method's file is missing: refused before the first method (or the data) is read.
    _refused(capsys, PAPER, _eval_args(world, out, "--library", world / "lib", *TASK,
                                       "--prototypes", tmp_path / "p.st",
                                       bbh=tmp_path / "no_bbh"),
             errors.USER_ERROR, ["p.st", "--prototypes"], [world / "lib"])
    assert not out.exists()


def test_goose_convert_checks_outputs_first(world, hostile, tmp_path, capsys):
    missing = tmp_path / "missing"
    below_a_file = hostile / "a_file" / "sub"
    _refused(capsys, CONVERT, ["orbax-to-hf", missing, below_a_file], errors.USER_ERROR,
             ["a_file is a file"])
    _refused(capsys, CONVERT, ["to-peft", world / "lib", "alpha", hostile / "a_file"],
             errors.USER_ERROR, ["a_file: exists and is not a directory"], [hostile / "a_file"])
    _refused(capsys, CONVERT, ["peft", hostile / "adapter", "--base", missing, "--out",
                               hostile / "a_file"], errors.USER_ERROR, ["a_file"],
             [hostile / "a_file"])
    _refused(capsys, CONVERT, ["peft", hostile / "adapter", "--base", missing, "--out",
                               tmp_path / "lib", "--names", "a/b"], errors.USER_ERROR,
             ["invalid expert name 'a/b'"])
    assert not (tmp_path / "lib").exists()


def test_goose_demo_checks_its_output_folder_first(hostile, tmp_path, capsys):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "results.json").write_text('{"mine": true}')
    missing = tmp_path / "missing"   # the base: never read
    for out, words in ((hostile / "a_file", ["a_file: exists and is not a directory"]),
                       (hostile / "a_file" / "sub", ["a_file is a file"]),
                       (foreign, ["not a goose-demo output folder"])):
        _refused(capsys, DEMO, ["--out", out, "--base", missing, "--preset", "small"],
                 errors.USER_ERROR, [*words, "--out"], [hostile / "a_file", foreign])


# --- 3. corrupt or non-finite inputs ------------------------------------------------------------


def _damaged(hostile, tmp_path, how):
    """A copy of the goose-jax checkpoint with its largest tree file damaged."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(hostile / "ckpt", ckpt)
    files = [os.path.join(d, f) for d, _, fs in os.walk(ckpt) for f in fs
             if f != "goose_meta.json"]
    path = max(files, key=os.path.getsize)
    if how == "delete":
        os.remove(path)
    elif how == "truncate":
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
    elif how == "flip":
        data = bytearray(open(path, "rb").read())
        data[len(data) // 2] ^= 0xFF
        open(path, "wb").write(bytes(data))
    else:
        (ckpt / "goose_meta.json").write_text('{"format": "goose-jax", "tree": ')
    return ckpt


@pytest.mark.parametrize("how, words", [
    ("delete", ["missing", "re-create it"]),
    ("truncate", ["truncated or altered", "re-create it"]),
    ("flip", ["sha256 differs", "re-create it"]),
    ("meta", ["goose_meta.json: cannot read as JSON"]),
])
def test_a_damaged_model_checkpoint_isone_line(world, hostile, tmp_path, capsys, how,
                                                 words):
    ckpt = _damaged(hostile, tmp_path, how)
    out = tmp_path / "out"
    args = _eval_args(world, out, *TASK)
    args[args.index("--base") + 1] = ckpt
    _refused(capsys, EVAL, args, errors.USER_ERROR, [str(ckpt), *words], [ckpt])
    assert not out.exists()
    _refused(capsys, CONVERT, ["orbax-to-hf", ckpt, tmp_path / "hf"], errors.USER_ERROR,
             [str(ckpt), *words], [ckpt])
    assert not (tmp_path / "hf").exists()


def test_non_finite_scores_are_refused_not_reported(world, hostile, tmp_path, capsys):
    out = tmp_path / "out"
    args = _eval_args(world, out, *TASK)
    args[args.index("--base") + 1] = hostile / "huge_head"
    _refused(capsys, EVAL, args, errors.USER_ERROR,
             ["bbh/boolean_expressions", "method base", "NaN or inf", "no accuracy"])
    assert not (out / "results.json").exists()
    _refused(capsys, EVAL, _eval_args(world, out, *TASK, "--library", hostile / "overflow",
                                      "--method", "single", "--expert", "two"),
             errors.USER_ERROR, ["method single", "NaN or inf"], [hostile / "overflow"])
    assert not (out / "results.json").exists()
    paper = tmp_path / "paper"
    args = _eval_args(world, paper, *TASK, "--library", world / "lib", "--methods", "base")
    args[args.index("--base") + 1] = hostile / "huge_head"
    _refused(capsys, PAPER, args, errors.USER_ERROR, ["method base", "NaN or inf"])
    assert not (paper / "comparison.json").exists()
