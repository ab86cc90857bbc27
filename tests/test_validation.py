"""goose-train's validation and best step: each expert keeps the step its validation split scored
best, the library holds that step's expert, a resume keeps the best so far, and the scores are
those of an independent scorer."""

import json
import pathlib

import jax
import numpy as np
import pytest
from conftest import one_line, tool, tree_hash, write_jsonl

from goose_jax.evaluation import validation
from goose_jax.library.store import ExpertLibrary
from goose_jax.training import program as training
from goose_jax.training.checkpoints import TrainCheckpointer

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.py")
PROG = "goose-train"
main = tool(PROG)
# Checkpoints at every step, all kept: the test compares the library with the validated steps.
EVERY = ("--set", "steps=6", "--set", "eval_every=2", "--set", "checkpoint_every=1",
         "--set", "keep_checkpoints=7")
WORDS = ["goose", "jax", "flax", "route", "token", "lora", "gate"]


def write_validation(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """reverse.jsonl (validated by exact match) and pick.jsonl (by accuracy over choices), each
    with its <name>.validation.jsonl beside it."""
    d = tmp_path_factory.mktemp("data")
    write_validation(d / "reverse.validation.jsonl",
                     [{"input": f"reverse: {w}", "target": w[::-1]} for w in WORDS[:3]])
    write_validation(d / "pick.validation.jsonl",
                     [{"input": f"pick: {w}", "target": w, "choices": [w.upper(), w, "x"]}
                      for w in WORDS[3:]])
    return [write_jsonl(d / "reverse.jsonl", [(f"reverse: {w}", w[::-1]) for w in WORDS]),
            write_jsonl(d / "pick.jsonl", [(f"pick: {w}", w) for w in WORDS])]


def args(data, lib, work, *extra):
    return ["experts", "--config", TINY, "--base", "random:tiny", "--data", *data,
            "--library", str(lib), "--workdir", str(work), *EVERY, *extra]


def flat(tree):
    return {jax.tree_util.keystr(p): np.asarray(x)
            for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def library_expert(lib, name):
    experts, _ = ExpertLibrary.open(lib).load([name], gates=False)
    return flat(experts)


def checkpoint_expert(work, step, i):
    """Expert ``i`` of the trainable tree checkpointed at ``step``, as (1, ...) leaves."""
    with TrainCheckpointer(pathlib.Path(work) / "checkpoints") as ckpt:
        tree, _ = ckpt.restore(ckpt.saved_shapes(step), step)
    return {k: v[i:i + 1] for k, v in flat(tree["trainable"]).items()}


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def validation_lines(work):
    return [m for m in map(json.loads, (pathlib.Path(work) / "metrics.jsonl").open())
            if "validation" in m]


# --- the best step, with scores fixed per step ----------------------------------------------------

# Per validated step, the scores of (reverse, pick): reverse peaks at step 2, pick ties at 4
# and 6 (the later step wins, as in the original release).
SCORES = {0: [10.0, 5.0], 2: [50.0, 5.0], 4: [30.0, 60.0], 6: [20.0, 60.0]}


def patch_scores(mp):
    """Validator.scores replaced by SCORES at the step the run has reached (the clock counts
    the steps this process took; a resumed run sets it to its first step)."""
    clock = {"step": 0}
    step = training.Program.step

    def counted(self, *a):
        clock["step"] += 1
        return step(self, *a)

    mp.setattr(training.Program, "step", counted)
    mp.setattr(training.Program, "step_donating", counted)
    mp.setattr(validation.Validator, "scores",
               lambda self, trainable: np.asarray(SCORES[clock["step"]]))
    return clock


@pytest.fixture(scope="module")
def straight(data, tmp_path_factory):
    root = tmp_path_factory.mktemp("straight")
    with pytest.MonkeyPatch.context() as mp:
        patch_scores(mp)
        assert main(args(data, root / "lib", root / "work")) == 0
    return root


def test_each_expert_keeps_its_own_best_step_in_the_library(straight):
    lib, work = straight / "lib", straight / "work"
    info = {n: ExpertLibrary.open(lib).info(n)["validation"] for n in ("reverse", "pick")}
    assert (info["reverse"]["best_step"], info["reverse"]["score"]) == (2, 50.0)
    assert (info["pick"]["best_step"], info["pick"]["score"]) == (6, 60.0)
    assert info["reverse"]["metric"] == "exact_match" and info["pick"]["metric"] == "accuracy"
    assert info["reverse"]["scores"] == {"0": 10.0, "2": 50.0, "4": 30.0, "6": 20.0}
    assert info["pick"]["examples"] == 4 and info["reverse"]["every"] == 2
    assert info["pick"]["data"].endswith("pick.validation.jsonl")
    assert_same(library_expert(lib, "reverse"), checkpoint_expert(work, 2, 0))
    assert_same(library_expert(lib, "pick"), checkpoint_expert(work, 6, 1))
    last = checkpoint_expert(work, 6, 0)
    assert any(not np.array_equal(v, last[k]) for k, v in library_expert(lib, "reverse").items())
    assert [(m["step"], m["best_step"]) for m in validation_lines(work)] == [
        (0, [0, 0]), (2, [2, 2]), (4, [2, 4]), (6, [2, 6])]


def test_a_resumed_run_keeps_the_best_so_far(data, straight, tmp_path, monkeypatch):
    lib, work = tmp_path / "lib", tmp_path / "work"
    clock = patch_scores(monkeypatch)
    counted = training.Program.step

    def killed_after_five(self, *a):
        if clock["step"] == 5:
            raise KeyboardInterrupt
        return counted(self, *a)

    monkeypatch.setattr(training.Program, "step", killed_after_five)
    assert main(args(data, lib, work)) == 130
    monkeypatch.setattr(training.Program, "step", counted)
    with TrainCheckpointer(work / "checkpoints") as ckpt:
        assert ckpt.latest_step() == 5
    assert main(args(data, lib, work)) == 0  # resumes at step 5: reverse's best was step 2
    for name in ("reverse", "pick"):
        assert_same(library_expert(lib, name), library_expert(straight / "lib", name))
        assert (ExpertLibrary.open(lib).info(name)["validation"]
                == ExpertLibrary.open(straight / "lib").info(name)["validation"])
    assert validation_lines(work) == validation_lines(straight / "work")


# --- the real scorer ------------------------------------------------------------------------------


def reference_scores(cfg, params, tok, experts, i, examples, scale, max_len):
    """Expert ``i`` 's score in percent, one example at a time: the choice of lowest mean
    token NLL (teacher forcing), or the greedy continuation equal to the target. Inputs and
    decoder rows are padded to fixed lengths (one compiled shape; the decoder is causal)."""
    import goose_jax as gj
    from goose_jax.routing.methods import build_routed

    routed = build_routed("single", cfg, experts, scale=scale, expert=i)

    def log_probs(ids, dec):
        row, mask = np.zeros((1, 24), np.int32), np.zeros((1, 24), np.int32)
        row[0, :len(ids)], mask[0, :len(ids)] = ids, 1
        pad = np.zeros((1, max_len), np.int32)
        pad[0, :len(dec)] = dec
        out = np.asarray(gj.t5_logits(cfg, params, row, pad, mask, routing=routed), np.float64)
        out = out[0] - out[0].max(-1, keepdims=True)
        return out - np.log(np.exp(out).sum(-1, keepdims=True))

    right = 0
    start = cfg.decoder_start_token_id
    for ex in examples:
        ids = tok.encode(ex.input, add_eos=True)[:24]
        if ex.choices:
            nll = []
            for c in ex.choices:
                tgt = tok.encode(c, add_eos=True)[:max_len]
                logp = log_probs(ids, [start] + tgt[:-1])
                nll.append(-np.mean([logp[t, k] for t, k in enumerate(tgt)]))
            right += int(np.argmin(nll)) in ex.answers
        else:
            dec = [start]
            while len(dec) <= max_len:
                nxt = int(np.argmax(log_probs(ids, dec[:max_len])[len(dec) - 1]))
                if nxt == tok.eos_id:
                    break
                dec.append(nxt)
            right += tok.decode(dec[1:]).strip() == ex.references[0].strip()
    return 100.0 * right / len(examples)


def test_real_scorer_scores_match_an_independent_scorer_and_the_best_step_is_written(
        data, tmp_path):
    from goose_jax.experts.lora import init_experts
    from goose_jax.pipeline.train_runs import load_train_base, load_train_config, stream_id

    lib, work = tmp_path / "lib", tmp_path / "work"
    assert main(args(data, lib, work)) == 0
    tcfg = load_train_config(TINY, [a for a in EVERY if a != "--set"])
    cfg, params, tok = load_train_base("random:tiny", tcfg)
    names = ["reverse", "pick"]
    init = init_experts(cfg, tcfg.lora, [jax.random.fold_in(jax.random.key(tcfg.seed),
                                                            stream_id(n)) for n in names],
                        fast_compile=True)
    examples = [validation.read_validation(validation.sibling(p), n)
                for p, n in zip(data, names)]
    lines = validation_lines(work)
    assert [m["step"] for m in lines] == [0, 2, 4, 6]
    trees = {0: init}
    with TrainCheckpointer(work / "checkpoints") as ckpt:
        for step in (2, 4, 6):
            trees[step] = ckpt.restore(ckpt.saved_shapes(step), step)[0]["trainable"]
    for i, name in enumerate(names):
        scores = {m["step"]: m["validation"][i] for m in lines}
        for step, experts in trees.items():
            want = reference_scores(cfg, params, tok, experts, i, examples[i],
                                    tcfg.lora.lora_scale, tcfg.max_target_length)
            assert scores[step] == pytest.approx(want), (name, step)
        best = max(scores, key=lambda s: (scores[s], s))  # ties: the later step
        info = ExpertLibrary.open(lib).info(name)["validation"]
        assert (info["best_step"], info["score"]) == (best, scores[best])
        want = {k: v[i:i + 1] for k, v in flat(trees[best]).items()}
        assert_same(library_expert(lib, name), want)


# --- inputs ---------------------------------------------------------------------------------------


def refused(capsys, argv, code, *parts, watch=()):
    before = tree_hash(*watch)
    capsys.readouterr()
    assert main(argv) == code
    line = one_line(capsys.readouterr().err, PROG)
    for part in parts:
        assert part in line, (part, line)
    assert tree_hash(*watch) == before
    return line


def test_validation_files_are_checked_before_any_write(data, tmp_path, capsys):
    lib, work = tmp_path / "lib", tmp_path / "work"
    d = pathlib.Path(data[0]).parent
    glob = [*data, str(d / "reverse.validation.jsonl")]  # what OUT/*.jsonl would pass
    refused(capsys, args(glob, lib, work), 1, "reverse.validation.jsonl",
            "is the validation split", watch=[tmp_path])
    lone = write_jsonl(tmp_path / "lone.jsonl", [("a", "b")])
    refused(capsys, args([data[0], lone], lib, work), 1, "lone.jsonl: has no validation file",
            "lone.validation.jsonl", "--validation none", watch=[tmp_path])
    bad = write_validation(tmp_path / "bad.jsonl", [{"input": "q", "target": "z",
                                                     "choices": ["a", "b"]}])
    refused(capsys, args(data, lib, work, "--validation", data[0], bad), 1,
            "bad.jsonl:1", "not one of its choices", watch=[tmp_path])
    refused(capsys, args(data, lib, work, "--validation", bad), 2, "1 files for 2 --data",
            watch=[tmp_path])
    assert not lib.exists() and not work.exists()


def test_validation_none_trains_to_the_last_step(data, tmp_path):
    lib, work = tmp_path / "lib", tmp_path / "work"
    assert main(args(data, lib, work, "--validation", "none")) == 0
    assert "validation" not in ExpertLibrary.open(lib).info("reverse")
    assert_same(library_expert(lib, "reverse"), checkpoint_expert(work, 6, 0))
    assert validation_lines(work) == []


def test_goose_data_layout_is_found_and_its_absence_is_said(data, tmp_path, capsys):
    from goose_jax.data.builds import ExpertData, Row, write_build

    out = tmp_path / "out"
    rows = [Row("reverse: goose", "esoog", "t")]
    write_build(str(out), [ExpertData(n, rows, [Row("reverse: jax", "xaj", "t")])
                           for n in ("a", "b")], {}, stems={"a": "a", "b": "b"})
    train = [str(out / "train" / f"{n}.jsonl") for n in ("a", "b")]
    assert validation.validation_files(train) == [
        str(out / "validation" / f"{n}.jsonl") for n in ("a", "b")]
    # The older layout, <name>.validation.jsonl beside the training file, is still read.
    assert validation.validation_files(data) == [
        str(pathlib.Path(p).with_suffix(".validation.jsonl")) for p in data]
    # goose-train finds them (no note) and says so in one line when there are none; both runs
    # stop at the check that the --library holds none of the inputs, after the validation files
    # are resolved.
    lone = write_jsonl(tmp_path / "lone.jsonl", [("a", "b")])
    for files, noted, holder in ((train, False, out), ([lone], True, tmp_path)):
        assert main(args(files, holder, tmp_path / f"work_{int(noted)}")) == 1
        captured = capsys.readouterr()
        notes = [x for x in captured.out.splitlines() if "no validation file" in x]
        assert len(notes) == int(noted), captured.out
        if noted:
            assert f"for {lone}: looked for {tmp_path / 'lone.validation.jsonl'}" in notes[0]
            assert "--validation none" in notes[0]
