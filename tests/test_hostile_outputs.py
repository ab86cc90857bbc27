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
import sys

import pytest
from conftest import one_line, tool, tree_hash

from goose_jax import errors
from goose_jax.errors import CheckpointError

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


def test_base_and_embedder_with_code_are_refused(world, tmp_path, capsys):
    import shutil

    from goose_jax.retrieval import SentenceEmbedder

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
    the package or its scripts fails here: it must go through goose_jax.interop.hf_code."""
    found = []
    for top in ("goose_jax", "train", "eval", "bench"):
        for d, _, names in os.walk(os.path.join(ROOT, top)):
            for n in names:
                path = os.path.join(d, n)
                if not n.endswith(".py") or path.endswith(os.path.join("interop", "hf_code.py")):
                    continue
                for i, text in enumerate(open(path, encoding="utf-8"), 1):
                    code = text.split("#")[0]
                    if _DIRECT.search(code) and not code.lstrip().startswith(("\"", "'", "``")):
                        found.append(f"{os.path.relpath(path, ROOT)}:{i}: {text.strip()}")
    assert not found, "\n".join(found)
