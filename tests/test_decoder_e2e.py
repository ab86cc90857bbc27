"""The whole PHATGOOSE protocol on a decoder-only base, through the tools, on ``random:llama-tiny``
with the byte tokenizer: goose-train experts (validated while they train), gate and prototypes,
then goose-eval with every routing method on that library. Checked against independent
references: the base model's own scores for step-0 validation, the layer-0 site inputs computed
in NumPy for the prototypes, and whole-sequence scoring and uncached greedy decoding under the
library loaded by hand for PHATGOOSE's predictions; telemetry counts every real token once. And
the two family mix-ups goose-eval refuses in one line, writing nothing.

On the first decoder family only (tests/family_cases.py ``FIRST``): every stage is a whole tool
run, the costliest tests of the suite; the stages are the same code for every family past the
family contract, which tests/test_decoder.py checks for each family against transformers."""

import json
import pathlib

import numpy as np
import pytest
from conftest import one_line, tool, tree_hash
from family_cases import FIRST, FIRST_RANDOM_BASE, family_of, logits_of

from goose_jax.core.trees import flatten_sites
from goose_jax.data import tasks as T
from goose_jax.data.tokenizers import ByteTokenizer
from goose_jax.evaluation.metrics import rank_prediction
from goose_jax.models import families

train = tool("goose-train")
evaluate = tool("goose-eval")

TINY = str(pathlib.Path(__file__).resolve().parents[1] / "configs" / "tiny.py")
BASE = FIRST_RANDOM_BASE
decoder_logits = logits_of(FIRST)
# A few sites over both layers keep the compilations short.
SITES = r"layers_0/self_attn/(q|v)|layers_1/mlp/(gate|down)"
TOK = ByteTokenizer()
TASKS = ("bbh/boolean_expressions", "bbh/object_counting")
RANK, GENERATE = TASKS
PER_TOKEN = ("phatgoose", "arrow", "average_activation")
METHODS = (*PER_TOKEN, "merged", "base")
WORDS = ["goose", "jax", "llama", "route", "token"]
WIDTH = 64   # every reference row's length: one compilation per adapter


def _jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def protocol(world, tmp_path_factory):
    """Runs every stage once; ``(root, {stage: exit code})``. Validation: ``reverse`` by rank
    classification (lines with choices), ``upper`` by generation (exact match)."""
    root = tmp_path_factory.mktemp("decoder_e2e")
    data = [_jsonl(root / "reverse.jsonl", [{"input": f"reverse: {w}", "target": w[::-1]}
                                            for w in WORDS]),
            _jsonl(root / "upper.jsonl", [{"input": f"upper: {w}", "target": w.upper()}
                                          for w in WORDS])]
    _jsonl(root / "reverse.validation.jsonl", [
        {"input": f"reverse: {w}", "target": w[::-1], "choices": [w, w[::-1], w.upper()]}
        for w in WORDS[:3]])
    _jsonl(root / "upper.validation.jsonl", [{"input": f"upper: {w}", "target": w.upper()}
                                             for w in WORDS[:3]])
    lib = root / "lib"
    # seed=0: the random base goose-eval builds from the same spec (the library checks it).
    common = ["--config", TINY, "--base", BASE, "--set", "tokenizer=byte", "--set", "seed=0",
              "--set", f"lora_sites={SITES}", "--data", *data, "--library", str(lib)]
    codes = {"experts": train(["experts", *common, "--workdir", str(root / "w_experts")]),
             "gate": train(["gate", *common, "--workdir", str(root / "w_gate")]),
             "prototypes": train(["prototypes", *common])}
    for method in METHODS:
        codes[method] = evaluate([
            "--base", BASE, "--byte-tokenizer", "--bbh-root", str(world / "bbh"), "--tasks",
            ",".join(TASKS), "--library", str(lib), "--method", method, "--top-k", "2",
            "--out", str(root / method), "--no-progress", "--batch-size", "4"])
    return root, codes


@pytest.fixture(scope="module")
def base():
    from goose_jax.models.base import load_base

    return load_base(BASE, min_vocab_size=TOK.vocab_size)


def _rows(seqs):
    ids, mask = np.zeros((len(seqs), WIDTH), np.int32), np.zeros((len(seqs), WIDTH), np.int32)
    for i, seq in enumerate(seqs):
        ids[i, :len(seq)], mask[i, :len(seq)] = seq, 1
    return ids, mask


def _mean_nlls(cfg, params, prompt, choices, routing=None) -> np.ndarray:
    """Each choice's mean token NLL after the prompt: every (prompt, choice) one whole sequence
    through ``decoder_logits`` (no cache), log-softmax in float64."""
    ids, mask = _rows([prompt + c for c in choices])
    lg = np.asarray(decoder_logits(cfg, params, ids, mask, routing=routing), np.float64)
    m = lg.max(-1, keepdims=True)
    logp = lg - m - np.log(np.exp(lg - m).sum(-1, keepdims=True))
    return np.array([-sum(logp[i, len(prompt) - 1 + t, tok] for t, tok in enumerate(c)) / len(c)
                     for i, c in enumerate(choices)])


def _greedy(cfg, params, prompt, steps, routing, eos=TOK.eos_id) -> list[int]:
    """Greedy decoding without a cache: the whole sequence at every step; up to ``eos``."""
    seq = list(prompt)
    for _ in range(steps):
        ids, mask = _rows([seq])
        logits = np.asarray(decoder_logits(cfg, params, ids, mask, routing=routing))
        seq.append(int(np.argmax(logits[0, len(seq) - 1])))
        if seq[-1] == eos:
            break
    return seq[len(prompt):]


def _phatgoose(root, cfg, params, telemetry=False):
    """(the library's scale, PHATGOOSE top-2 over the library, loaded by hand)."""
    from goose_jax.library.store import ExpertLibrary
    from goose_jax.routing.methods import build_routed

    lib = ExpertLibrary.open(root / "lib", cfg, params)
    experts, gates = lib.load(["reverse", "upper"], gates=True)
    return lib, build_routed("phatgoose", cfg, experts, gates=gates, top_k=2, scale=lib.scale,
                             telemetry=telemetry)


def _examples(world):
    rank, gen = T.get_tasks(list(TASKS), [], T.DataRoots(bbh=str(world / "bbh")))
    return rank, gen


def _read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_every_stage_exits_0_and_writes_its_results(protocol):
    root, codes = protocol
    assert codes == dict.fromkeys(codes, 0)
    manifest = json.loads((root / "lib" / "manifest.json").read_text())
    assert manifest["base_model"]["family"] == FIRST
    assert set(manifest["sites"]) == {"layers_0/self_attn/q", "layers_0/self_attn/v",
                                      "layers_1/mlp/gate", "layers_1/mlp/down"}
    assert all(e["has_gate"] for e in manifest["experts"])
    assert (root / "lib" / "prototypes.safetensors").is_file()
    for method in METHODS:
        summary = json.loads((root / method / "results.json").read_text())
        assert summary["method"] == method and set(summary["datasets"]) == set(TASKS)
        assert (root / method / "results.md").is_file()
        assert len(_read(root / method / "predictions.jsonl")) == 4 + 3
        per_token = method in PER_TOKEN
        assert (root / method / "telemetry.json").is_file() == per_token
        if per_token:   # one heatmap per decoder layer, named after it
            assert sorted(p.name for p in (root / method / "telemetry").iterdir()) == [
                "layers_0.png", "layers_1.png"]


def test_validation_selects_steps_and_starts_at_the_base_model(protocol, base):
    """Each expert is validated at steps 0, 3 and 6 and keeps its best (ties: the later); at
    step 0 (zero B) it is the base model, whose rank accuracy is computed here independently."""
    root, _ = protocol
    records = {e["name"]: e["validation"] for e in json.loads(
        (root / "lib" / "manifest.json").read_text())["experts"]}
    assert records["reverse"]["metric"] == "accuracy"
    assert records["upper"]["metric"] == "exact_match"
    for rec in records.values():
        scores = {int(s): v for s, v in rec["scores"].items()}
        assert sorted(scores) == [0, 3, 6] and rec["examples"] == 3
        best = max(scores.values())
        assert rec["score"] == best
        assert rec["best_step"] == max(s for s, v in scores.items() if v == best)
    cfg, params = base
    correct = []
    for w in WORDS[:3]:
        choices = [w, w[::-1], w.upper()]
        nll = _mean_nlls(cfg, params, TOK.encode(f"reverse: {w}", add_eos=False),
                         [TOK.encode(c) for c in choices])
        correct.append(rank_prediction(nll) == 1)
    assert records["reverse"]["scores"]["0"] == pytest.approx(100.0 * np.mean(correct))


def test_prototypes_are_the_mean_inputs_of_the_packed_training_sequences(protocol, base):
    """Layer 0's attention sites read RMSNorm(embedding) of the tokens, whatever the experts
    do: their prototypes, from NumPy, over each example's prompt (no EOS) and target (with EOS)
    packed into one sequence, averaged per example and then over the examples."""
    from goose_jax.library.prototypes import load_prototypes

    root, _ = protocol
    cfg, params = base
    emb = np.asarray(params["embed_tokens"]["embedding"], np.float64)
    scale = np.asarray(params["layers_0"]["input_norm"]["scale"], np.float64)
    protos = flatten_sites(load_prototypes(str(root / "lib" / "prototypes.safetensors"),
                                           ["reverse", "upper"]))
    for row, (name, target) in enumerate((("reverse", lambda w: w[::-1]),
                                          ("upper", str.upper))):
        means = []
        for w in WORDS:
            x = emb[TOK.encode(f"{name}: {w}", add_eos=False) + TOK.encode(target(w))]
            x = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + cfg.rms_norm_eps)
            means.append((x * scale[None, :]).mean(axis=0))
        for site in ("layers_0/self_attn/q", "layers_0/self_attn/v"):
            np.testing.assert_allclose(protos[site]["gate"][row], np.mean(means, axis=0),
                                       atol=1e-5, rtol=1e-5, err_msg=f"{name} {site}")


def test_phatgoose_predictions_and_telemetry_against_the_library_by_hand(protocol, base, world):
    """The library loaded by hand, routed top-2 against its standardized gates: each choice
    scored as a whole sequence, each answer decoded without a cache, give goose-eval's scores,
    predictions and texts; each site's top-1 counts sum to the tokens the model read (rank:
    the prompt but its last token once plus every choice token fed; generation: the prompt and
    every generated token but the last)."""
    root, _ = protocol
    cfg, params = base
    lib, routed = _phatgoose(root, cfg, params)
    preds = {(p["dataset"], p["id"]): p for p in _read(root / "phatgoose" / "predictions.jsonl")}
    rank, gen = _examples(world)
    rank_tokens = 0
    for ex in rank.load():
        prompt = TOK.encode(ex.input, add_eos=False)
        choices = [TOK.encode(c) for c in ex.choices]
        ref = _mean_nlls(cfg, params, prompt, choices, routing=routed)
        pred = preds[(rank.dataset, ex.example_id)]
        np.testing.assert_allclose(pred["scores"], ref, atol=2e-5, rtol=0)
        assert pred["prediction"] == rank_prediction(ref)
        rank_tokens += len(prompt) - 1 + sum(map(len, choices))
    gen_tokens = 0
    for ex in gen.load():
        prompt = TOK.encode(ex.input, add_eos=False)
        toks = _greedy(cfg, params, prompt, gen.max_new_tokens, routed)
        assert preds[(gen.dataset, ex.example_id)]["prediction"] == TOK.decode(toks)
        gen_tokens += len(prompt) + len(toks) - 1
    counts = json.loads((root / "phatgoose" / "telemetry.json").read_text())["top1_counts"]
    assert set(counts) == set(lib.sites)
    for site, by_dataset in counts.items():
        assert {d: sum(c) for d, c in by_dataset.items()} == {RANK: rank_tokens,
                                                              GENERATE: gen_tokens}, site
        assert all(len(c) == 2 for c in by_dataset.values())


def test_every_per_token_method_counts_each_rank_token_once(protocol, world):
    rank, _ = _examples(world)
    expected = sum(len(TOK.encode(ex.input, add_eos=False)) - 1 +
                   sum(len(TOK.encode(c)) for c in ex.choices) for ex in rank.load())
    for method in PER_TOKEN:
        tele = json.loads((protocol[0] / method / "telemetry.json").read_text())
        assert tele["experts"] == ["reverse", "upper"]
        for site, by_dataset in tele["top1_counts"].items():
            assert sum(by_dataset[RANK]) == expected, (method, site)


def test_generation_telemetry_counts_each_row_until_it_ends(protocol, base):
    """Rows that end at different steps (the model's EOS made the first token of row 0's
    answer) and a row of batch padding: cached, batched, routed generation gives each row's
    uncached greedy answer, and every site counts each real row's prompt and its generated
    tokens but the last, nothing after a row's EOS and nothing of the padding row."""
    cfg, params = base
    _, routed = _phatgoose(protocol[0], cfg, params)
    prompts = [TOK.encode(t, add_eos=False) for t in ("count 1", "reverse: goose", "upper: j")]
    eos = _greedy(cfg, params, prompts[0], 1, routed)[0]
    ref = [_greedy(cfg, params, p, 6, routed, eos=eos) for p in prompts]
    assert len(ref[0]) == 1 and max(map(len, ref)) > 1   # rows end at different steps
    ids, mask = _rows(prompts + [[]])
    _, telemetry = _phatgoose(protocol[0], cfg, params, telemetry=True)
    toks, counts = family_of(FIRST).generate(
        cfg.replace(eos_token_id=eos), params, ids[:, :16], 6, mask[:, :16],
        adapter=telemetry.adapter, collections=telemetry.collections, telemetry=True,
        check_finite=True, fast_compile=True)
    toks = np.asarray(toks).tolist()
    assert [t[:len(r)] for t, r in zip(toks, ref)] == ref
    assert all(set(t[len(r):]) <= {cfg.pad_token_id} for t, r in zip(toks, ref))
    expected = sum(len(p) + len(r) - 1 for p, r in zip(prompts, ref))
    assert {s: float(np.sum(c)) for s, c in counts.items()} == dict.fromkeys(
        flatten_sites(telemetry.collections["experts"]), expected)


@pytest.mark.parametrize("mixup", ["t5 library, decoder base", "decoder library, t5 base"])
def test_goose_eval_refuses_a_library_of_the_other_family(protocol, world, tmp_path, capsys,
                                                          mixup):
    root, _ = protocol
    lib, base = ((world / "lib", BASE) if mixup.startswith("t5")
                 else (root / "lib", str(world / "base")))
    before = tree_hash(tmp_path, lib)
    capsys.readouterr()
    rc = evaluate(["--base", base, "--byte-tokenizer", "--bbh-root", str(world / "bbh"),
                   "--tasks", RANK, "--library", str(lib), "--method", "phatgoose",
                   "--out", str(tmp_path / "run"), "--no-progress"])
    assert rc == 1
    line = one_line(capsys.readouterr().err, "goose-eval")
    assert families.describe(FIRST) in line and "T5" in line and "families" in line, line
    assert tree_hash(tmp_path, lib) == before and not (tmp_path / "run").exists()


def test_generation_with_non_finite_logits_is_an_error_not_a_score(base):
    """A base whose head holds a NaN: the Evaluator's decoder generation reports it (one line)
    instead of scoring the tokens argmax picks from NaN logits."""
    import goose_jax.evaluation.evaluator as ev
    from goose_jax.core.errors import EvalError
    from goose_jax.data.examples import EvalTask, Example

    cfg, params = base
    head = np.asarray(params["lm_head"]["kernel"]).copy()
    head[0, 5] = np.nan
    broken = {**params, "lm_head": {"kernel": head}}
    examples = [Example(f"count {i}", references=(str(i),), dataset="d") for i in range(3)]
    task = EvalTask("d/gen", "d", "generate", "exact_match", lambda: examples, max_new_tokens=3)
    evaluator = ev.Evaluator(cfg, broken, TOK, batch_size=4, fast_compile=True)
    with pytest.raises(EvalError, match="NaN or inf.*no score reported"):
        evaluator.evaluate_task(task)
