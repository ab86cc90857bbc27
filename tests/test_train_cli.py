"""goose-train: configs and overrides, resuming after an interruption, what a checkpoint holds,
the gate subcommand, and one-line errors."""

import functools
import json
import os
import pathlib

import jax
import numpy as np
import pytest
from conftest import tool, write_jsonl

from goose_jax.core import config_files
from goose_jax.core.errors import TrainConfigError
from goose_jax.library.store import ExpertLibrary
from goose_jax.pipeline.train_runs import load_train_config as load_config
from goose_jax.training import program as training
from goose_jax.training.checkpoints import TrainCheckpointer

main = tool("goose-train")
apply_overrides = functools.partial(config_files.apply_overrides, error=TrainConfigError)

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"
TINY = str(CONFIGS / "tiny.py")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A random base checkpoint: the tiny preset with one block each side, byte vocabulary."""
    import goose_jax as gj
    from goose_jax.models.checkpoint import save_model
    from goose_jax.models.t5.model import init_params

    cfg = gj.T5Config.preset("tiny").replace(vocab_size=259, num_encoder_layers=1,
                                             num_decoder_layers=1)
    return save_model(tmp_path_factory.mktemp("base") / "model", cfg, init_params(cfg, 0))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    words = ["goose", "jax", "flax", "route", "token", "lora", "gate"]
    return [write_jsonl(d / "reverse.jsonl", [(f"reverse: {w}", w[::-1]) for w in words]),
            write_jsonl(d / "upper.jsonl", [(f"upper: {w}", w.upper()) for w in words[:5]])]


def train_args(base, data, lib, work, *extra):
    return ["experts", "--config", TINY, "--base", base, "--data", *data, "--library", str(lib),
            "--workdir", str(work), *extra]


def library_tensors(path):
    lib = ExpertLibrary.open(path)
    experts, _ = lib.load()
    return lib, {"/".join(str(k.key) for k in p): np.asarray(x) for p, x in
                 jax.tree_util.tree_flatten_with_path(experts)[0]}


def metric_lines(work):
    return [json.loads(line) for line in open(os.path.join(work, "metrics.jsonl"))]


@pytest.fixture(scope="module")
def uninterrupted(base, data, tmp_path_factory):
    root = tmp_path_factory.mktemp("straight")
    assert main(train_args(base, data, root / "lib", root / "work")) == 0
    return root


def test_configs_and_typed_overrides():
    t0 = load_config(str(CONFIGS / "t0_heldin.py"))
    assert (t0.steps, t0.gate_steps, t0.lr, t0.effective_batch, t0.lora_rank) == (
        1000, 100, 5e-3, 1024, 16)
    assert t0.num_experts == len(t0.expert_names) == 36 and t0.param_dtype == "bfloat16"
    flan = load_config(str(CONFIGS / "flan.py"))
    assert flan.num_experts == 166 and flan.effective_batch == 1024
    cfg = apply_overrides(load_config(TINY), ["lr=1e-3", "lora_scale=none", "clip=0",
                                              "expert_names=a, b", "fast_compile=false"])
    assert (cfg.lr, cfg.lora_scale, cfg.clip, cfg.expert_names, cfg.fast_compile) == (
        1e-3, None, 0.0, ("a", "b"), False)
    assert apply_overrides(cfg, ["lora_scale=0.5"]).lora_scale == 0.5
    with pytest.raises(TrainConfigError, match="steps"):
        apply_overrides(cfg, ["steps=many"])
    with pytest.raises(TrainConfigError, match="KEY=VALUE"):
        apply_overrides(cfg, ["nonsense=1"])
    with pytest.raises(TrainConfigError, match="micro_batch must be a positive"):
        apply_overrides(cfg, ["micro_batch=0"])


def test_interrupted_run_resumes_to_the_same_parameters(base, data, uninterrupted, tmp_path,
                                                        monkeypatch):
    lib, work = tmp_path / "lib", tmp_path / "work"
    original = training.Program.step
    calls = []

    def killed_after_five(self, *args):
        if len(calls) == 5:  # steps 1-5 ran; checkpoints exist for steps 2 and 4
            raise KeyboardInterrupt
        calls.append(1)
        return original(self, *args)

    monkeypatch.setattr(training.Program, "step", killed_after_five)
    monkeypatch.setattr(training.Program, "step_donating", killed_after_five)
    assert main(train_args(base, data, lib, work)) == 130
    assert ExpertLibrary.open(lib).names == []  # nothing written before the run ends
    with TrainCheckpointer(work / "checkpoints") as ckpt:
        assert ckpt.all_steps() == [2, 4]
    monkeypatch.undo()

    assert main(train_args(base, data, lib, work)) == 0  # the same command again
    _, resumed = library_tensors(lib)
    names, straight = library_tensors(uninterrupted / "lib")
    assert names.names == ["reverse", "upper"]
    assert resumed.keys() == straight.keys()
    for k in straight:
        assert np.array_equal(resumed[k], straight[k]), k
    assert np.abs(straight["decoder/block_0/ffn/wo/lora_b"]).max() > 0  # it did train
    # Metrics: each step once; those redone after the resume equal the uninterrupted ones.
    lines, ref = metric_lines(work), metric_lines(uninterrupted / "work")
    assert [m["step"] for m in lines] == [m["step"] for m in ref] == [1, 2, 3, 4, 5, 6]
    assert [m["loss"] for m in lines] == [m["loss"] for m in ref]
    # Rerunning the finished command leaves the library alone (gates trained since survive).
    stamp = os.stat(lib / "manifest.json").st_mtime_ns
    assert main(train_args(base, data, lib, work)) == 0
    assert os.stat(lib / "manifest.json").st_mtime_ns == stamp


def test_checkpoints_hold_only_the_trainable_state(uninterrupted):
    with TrainCheckpointer(uninterrupted / "work" / "checkpoints") as ckpt:
        assert ckpt.all_steps() == [4, 6]
        paths = ckpt.saved_leaf_paths()
    lib = ExpertLibrary.open(uninterrupted / "lib")
    assert {p.split("/")[0] for p in paths} == {"step", "trainable", "opt_state", "rng"}
    trainable = [p for p in paths if p.startswith("trainable/")]
    assert len(trainable) == 2 * len(lib.sites)
    assert all(p.endswith(("/lora_a", "/lora_b")) for p in trainable)
    base_names = ("kernel", "embedding", "norm", "lm_head", "shared")
    assert not [p for p in paths if any(n in p for n in base_names)]


def test_gate_subcommand_trains_gates_into_the_library(base, data, uninterrupted, tmp_path):
    import shutil

    lib_path = tmp_path / "lib"
    shutil.copytree(uninterrupted / "lib", lib_path)
    _, before = library_tensors(lib_path)
    args = ["gate", "--config", TINY, "--base", base, "--data", *data, "--names", "reverse",
            "upper",
            "--library", str(lib_path), "--workdir", str(tmp_path / "work"),
            "--eval-data", *data]
    assert main(args) == 0
    lib = ExpertLibrary.open(lib_path)
    experts, gates = lib.load(gates=True)
    assert all(lib.info(n)["has_gate"] for n in lib.names)
    assert lib.info("reverse")["gate"]["steps"] == 4 and "eval_loss" in lib.info(
        "reverse")["gate"]["metrics"]
    gate_values = np.concatenate([np.ravel(x) for x in jax.tree.leaves(gates)])
    assert np.abs(gate_values).max() > 0
    _, after = library_tensors(lib_path)
    for k in before:  # LoRA weights untouched by gate training
        assert np.array_equal(before[k], after[k]), k
    evals = [m for m in metric_lines(tmp_path / "work") if "eval_loss" in m]
    assert [m["step"] for m in evals] == [0, 3, 4]


def test_user_errors_are_one_line_and_exit_1(base, data, uninterrupted, tmp_path, capsys):
    def error(argv, *parts):
        assert main(argv) == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith("goose-train: error:") and "\n" not in err, err
        for part in parts:
            assert part in err, (part, err)

    lib, work = str(tmp_path / "lib"), str(tmp_path / "work")
    missing = str(tmp_path / "missing.jsonl")
    error(train_args(base, [missing], lib, work), missing, "cannot read")
    bad = write_jsonl(tmp_path / "bad.jsonl", [("a", "b")])
    open(bad, "a").write("{oops\n")
    error(train_args(base, [bad], lib, work), "bad.jsonl:2")
    error(train_args(base, data, lib, work, "--set", "lr=fast"), "lr")
    error(["expert", "--config", TINY, "--data", data[0], "--library", lib, "--workdir", work,
           "--base", str(tmp_path / "nowhere")], "nowhere", "not a local directory")
    # the library already has these experts, from another run
    error(train_args(base, data, uninterrupted / "lib", tmp_path / "work2"), "already has experts",
          "--overwrite")
    # the same work directory with a different config
    error(train_args(base, data, tmp_path / "lib3", uninterrupted / "work", "--set", "lr=1e-3"),
          "different run", "config.lr")
    error(["gate", "--config", TINY, "--base", base, "--data", data[0], "--names", "nobody",
           "--library",
           str(uninterrupted / "lib"), "--workdir", str(tmp_path / "w4")], "no expert named")
    # a LoRA site pattern that selects nothing fails before any work (no library, no run.json)
    error(train_args(base, data, tmp_path / "lib5", tmp_path / "w5", "--set",
                     "lora_sites=nomatch"), "lora_sites", "nomatch", "matches no site")
    assert not (tmp_path / "lib5").exists() and not (tmp_path / "w5").exists()
    assert main(["experts"]) == 2  # argparse usage error


@pytest.mark.slow
def test_multitask_lora_and_full(base, data, tmp_path):
    from goose_jax.models.checkpoint import load_model

    common = ["--config", TINY, "--base", base, "--data", *data, "--set", "steps=2"]
    assert main(["multitask", *common, "--library", str(tmp_path / "lib"),
                 "--workdir", str(tmp_path / "w1")]) == 0
    assert ExpertLibrary.open(tmp_path / "lib").names == ["multitask"]
    assert main(["multitask", *common, "--set", "multitask_mode=full", "--out",
                 str(tmp_path / "model"), "--workdir", str(tmp_path / "w2")]) == 0
    cfg, params = load_model(tmp_path / "model")
    assert cfg.vocab_size == 259 and "lm_head" in params
