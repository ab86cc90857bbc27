"""goose-data on bad inputs: each case exits 1 (bad input) or 2 (usage) with one line on stderr,
and writes nothing (no OUT_DIR, no staging folder; an existing OUT_DIR keeps every byte)."""

import json
import os
import shutil
import struct

import pytest
from conftest import one_line, tool, tree_hash
from test_tasks import write_p3

from goose_jax.core import errors


@pytest.fixture(scope="module")
def p3_dir(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("p3"))
    for split, n in (("train", 40), ("test", 2)):
        write_p3(root, "ag_news_classify", split, [
            {"inputs_pretokenized": f"news {i} " + "x" * 50, "targets_pretokenized": "World",
             "answer_choices": ["World", "Sports"]} for i in range(n)])
    return root


@pytest.fixture(scope="module")
def flan_dirs(tmp_path_factory):
    import pyarrow as pa
    import pyarrow.parquet as pq

    base = tmp_path_factory.mktemp("flan")
    no_type = base / "no_type"
    no_type.mkdir()
    pq.write_table(pa.table({"inputs": ["q"], "targets": ["a"], "_task_name": ["t"]}),
                   no_type / "part.0.parquet")
    no_targets = base / "no_targets"
    no_targets.mkdir()
    (no_targets / "rows.jsonl").write_text(json.dumps(
        {"inputs": "q", "_task_name": "t", "_template_type": "zs_opt"}) + "\n")
    good = base / "good"
    good.mkdir()
    (good / "rows.jsonl").write_text("".join(json.dumps(
        {"inputs": f"q{i}", "targets": "a", "_task_name": "t", "_template_type": "zs_opt"})
        + "\n" for i in range(5)))
    return {"no_type": str(no_type), "no_targets": str(no_targets), "good": str(good)}


def _truncated(p3_dir, tmp_path):
    root = tmp_path / "p3_cut"
    shutil.copytree(p3_dir, root)
    (shard,) = (root / "data" / "ag_news_classify").glob("train.tfrecord*")
    data = shard.read_bytes()
    first = 12 + struct.unpack("<Q", data[:8])[0] + 4  # length, its CRC, data, data CRC
    shard.write_bytes(data[: first + 5])  # cut inside the second record's length header
    return str(root)


def _empty_shard(p3_dir, tmp_path):
    root = tmp_path / "p3_empty"
    shutil.copytree(p3_dir, root)
    (shard,) = (root / "data" / "ag_news_classify").glob("train.tfrecord*")
    shard.write_bytes(b"")
    return str(root)


def _cases(p3_dir, flan_dirs, tmp_path):
    """(argv without OUT_DIR, expected code, a word the line must contain)."""
    return [
        (["p3-heldin", p3_dir, "--datasets", "ag_news,paws"], errors.USER_ERROR, "paws"),
        (["p3-heldin", p3_dir], errors.USER_ERROR, "--datasets"),  # the 35 others are missing
        (["p3-heldin", str(tmp_path / "nowhere")], errors.USER_ERROR, "nowhere"),
        (["p3-heldin", _truncated(p3_dir, tmp_path), "--datasets", "ag_news"],
         errors.USER_ERROR, "TFRecord"),
        (["p3-heldin", _empty_shard(p3_dir, tmp_path), "--datasets", "ag_news"],
         errors.USER_ERROR, "train.tfrecord-00000-of-00001: empty TFRecord file"),
        (["flan", flan_dirs["no_type"]], errors.USER_ERROR, "_template_type"),
        (["flan", flan_dirs["no_targets"]], errors.USER_ERROR, "targets"),
        (["flan", flan_dirs["good"], "--grouping", str(tmp_path / "none.json")],
         errors.USER_ERROR, "none.json"),
        (["p3-heldin", p3_dir, "--datasets", "ag_nwes"], errors.USAGE, "ag_news"),
        (["flan", flan_dirs["good"], "--max-examples", "-3"], errors.USAGE, "-3"),
        (["flan", flan_dirs["good"], "--datasets", "u"], errors.USAGE, "u"),
    ]


def test_bad_inputs_write_nothing(p3_dir, flan_dirs, tmp_path, capsys):
    out = tmp_path / "out"
    for argv, code, word in _cases(p3_dir, flan_dirs, tmp_path):
        got = tool("goose-data")([*argv[:2], str(out), *argv[2:]])
        line = one_line(capsys.readouterr().err, "goose-data")
        assert got == code, (argv, line)
        assert word in line, (argv, line)
        assert not os.path.exists(out), argv
        assert not [n for n in os.listdir(tmp_path) if n.startswith(".out")], argv


def test_existing_out_dir_is_kept(p3_dir, flan_dirs, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.jsonl").write_text("keep me\n")
    before = tree_hash(out)
    # Not empty and no --overwrite: refused. With --overwrite but a build that fails: the old
    # folder stays as it was.
    for argv, word in ((["flan", flan_dirs["good"], str(out)], "--overwrite"),
                       (["p3-heldin", _truncated(p3_dir, tmp_path), str(out), "--datasets",
                         "ag_news", "--overwrite"], "TFRecord"),
                       (["flan", flan_dirs["good"], str(tmp_path / "out" / "mine.jsonl")],
                        "file")):
        assert tool("goose-data")(argv) == errors.USER_ERROR
        assert word in one_line(capsys.readouterr().err, "goose-data")
        assert tree_hash(out) == before
        assert sorted(n for n in os.listdir(tmp_path) if n.startswith(".")) == []
