"""Validation as the original release ran it (``TrainConfig.validation_rules = "release"``):
each expert's dataset keeps the release's metric and generation length (the gin files' numbers,
typed here from colm/datasets/*.gin), and the Validator's scores equal an independent scorer's
(greedy decoding one token at a time, the rules transcribed in tests/test_fidelity.py)."""

import importlib.util
import json
import pathlib

import jax
import numpy as np
import pytest
from test_fidelity import release_score

from goose_jax.core.errors import DataError
from goose_jax.evaluation import release_validation as rv
from goose_jax.evaluation import validation

ROOT = pathlib.Path(__file__).resolve().parents[1]

# (scope, metric, max_gen_length) read off the release's gin files.
GIN = [
    ("P3ROPES", "squad", 16), ("P3ADVERSARIALQA", "squad", 128), ("P3DUORC", "squad", 64),
    ("P3QUOREF", "squad", 32), ("P3WIKIBIO", "bleu_rouge", 256), ("P3XSUM", "bleu_rouge", 256),
    ("P3CNNDAILYMAIL", "bleu_rouge", 128), ("P3COMMONGEN", "bleu_rouge", 64),
    ("P3GIGAWORD", "bleu_rouge", 128), ("P3MULTINEWS", "bleu_rouge", 256),
    ("P3SAMSUM", "rouge_l", 128), ("P3HOTPOTQA", "rouge_l", 64), ("P3AGNEWS", "accuracy", 0),
    ("P3WEBQUESTIONS", "rouge_l", 32), ("FLAN2021ALGEBRALINEAR1D", "rouge_l", 4),
    ("FLAN2021DROP", "rouge_l", 512), ("NIV2PAPERREVIEW", "rouge_l", 2),
    ("NIV2TRANSLATION", "rouge_l", 512), ("DIALOGQRECC", "rouge_l", 128),
]


@pytest.mark.parametrize("scope,metric,length", GIN)
def test_the_table_holds_the_release_rule(scope, metric, length):
    rule = rv.RULES[scope]
    assert (rule.metric, rule.max_gen_length) == (metric, length)
    if length:   # HF generate's max_length counts the decoder start token
        assert rule.max_new_tokens == length - 1


def test_the_pools_are_the_release_sizes_and_every_t0_name_is_found():
    assert len(rv.T0_HELDIN) == 36 and len(rv.RULES) == 166
    spec = importlib.util.spec_from_file_location("t0cfg", ROOT / "configs" / "t0_heldin.py")
    cfg = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cfg)
    from goose_jax.data import p3
    for names in (cfg.EXPERTS, list(p3.T0_HELDIN)):
        assert sorted(rv.scope_of(n) for n in names) == sorted(rv.T0_HELDIN)
    assert cfg.get_config().validation_rules == "release"
    for name, scope in (("ai2_arc/ARC-Easy:1.0.0", "FLAN2021AI2ARCEASY"),
                        ("Flanv2zsAi2arceasy", "FLAN2021AI2ARCEASY"), ("Misc.", "NIV2MISC"),
                        ("wmt16_translate/cs-en", "FLAN2021WMT16TRANSLATECSEN")):
        assert rv.scope_of(name) == scope
    assert rv.scope_of("ai2_arc") is None   # two datasets: no guess


def test_unknown_names_are_refused_all_at_once():
    with pytest.raises(DataError, match="nosuch, other"):
        rv.rules_for(["ag_news", "nosuch", "other"])


# --- the Validator -------------------------------------------------------------------------------


PAD = 16   # every reference forward uses one padded decoder shape (the decoder is causal)


_ROUTED = {}


def _forward(cfg, params, tok, experts, i, text, dec, scale):
    import goose_jax as gj
    from goose_jax.models.config import FAST_COMPILE_OPTIONS
    from goose_jax.routing.methods import build_routed

    key = (id(experts), i)
    if key not in _ROUTED:   # one compiled forward per expert
        routed = build_routed("single", cfg, experts, scale=scale, expert=i)
        _ROUTED[key] = jax.jit(lambda p, r, d, m: gj.t5_logits(cfg, p, r, d, m, routing=routed),
                               compiler_options=FAST_COMPILE_OPTIONS)
    logits = _ROUTED[key]
    ids = tok.encode(text, add_eos=True)[:24]
    row, mask = np.zeros((1, 24), np.int32), np.zeros((1, 24), np.int32)
    row[0, :len(ids)], mask[0, :len(ids)] = ids, 1
    pad = np.zeros((1, PAD), np.int32)
    pad[0, :len(dec)] = dec
    out = np.asarray(logits(params, row, pad, mask), np.float64)[0]
    out = out - out.max(-1, keepdims=True)
    return out - np.log(np.exp(out).sum(-1, keepdims=True))


def _greedy(cfg, params, tok, experts, i, text, max_new, scale):
    """Expert ``i`` 's greedy continuation of ``text`` and its token count."""
    dec = [cfg.decoder_start_token_id]
    while len(dec) <= max_new:
        nxt = int(np.argmax(_forward(cfg, params, tok, experts, i, text, dec, scale)[len(dec) - 1]))
        if nxt == tok.eos_id:
            break
        dec.append(nxt)
    return tok.decode(dec[1:]), len(dec) - 1


def _nll_choice(cfg, params, tok, experts, i, text, choices, scale):
    nll = []
    for c in choices:
        tgt = tok.encode(c, add_eos=True)
        logp = _forward(cfg, params, tok, experts, i, text,
                        [cfg.decoder_start_token_id] + tgt[:-1], scale)
        nll.append(-np.mean([logp[t, k] for t, k in enumerate(tgt)]))
    return int(np.argmin(nll))


def test_release_validator_scores_as_an_independent_scorer(tmp_path):
    """ropes (SQuAD; release length 16: 15 new tokens) and ag_news (rank accuracy) on a random
    tiny T5: the generation length is the release's, and the scores equal the independent
    scorer's (whose greedy outputs are partly the references, so SQuAD is not trivially 0)."""
    from goose_jax.experts.lora import init_experts
    from goose_jax.pipeline.train_runs import load_train_base, load_train_config

    tcfg = load_train_config(str(ROOT / "configs" / "tiny.py"),
                             ["validation_rules=release", "max_target_length=16"])
    cfg, params, tok = load_train_base("random:tiny", tcfg)
    names = ["ropes", "ag_news"]
    experts = init_experts(cfg, tcfg.lora, [jax.random.key(k) for k in range(2)],
                           fast_compile=True)
    # Non-zero B, so that each expert changes the outputs.
    experts = jax.tree.map(lambda x: x + 0.3 * jax.random.normal(jax.random.key(7), x.shape),
                           experts)
    scale = tcfg.lora.lora_scale
    prompts = ["ask: goose", "ask: jax"]
    own = [_greedy(cfg, params, tok, experts, 0, p, 15, scale) for p in prompts]
    # The continuations run to the limit: the limit is what is tested.
    assert [n for _, n in own] == [15, 15]
    texts = [t for t, _ in own]
    rows = {
        "ropes": [{"input": prompts[0], "target": texts[0],
                   "references": [texts[0], "the " + texts[1]]},
                  {"input": prompts[1], "target": "no"}],
        "ag_news": [{"input": p, "target": "b", "choices": ["a", "b", "cc"]} for p in prompts],
    }
    examples = []
    for n in names:
        path = tmp_path / f"{n}.validation.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows[n]))
        examples.append(validation.read_validation(str(path), n))
    v = validation.Validator(cfg, params, tok, examples, lora_scale=scale, tcfg=tcfg)
    assert v.metrics == ["squad", "accuracy"]
    # ropes generates at most 15 tokens (not max_target_length = 16).
    assert sorted((t.kind, t.max_new_tokens) for t, _ in v.tasks if t.kind == "generate") == [
        ("generate", 15)]
    got = v.scores(experts)

    right = [float(_nll_choice(cfg, params, tok, experts, 1, r["input"], r["choices"],
                               scale) == 1) for r in rows["ag_news"]]
    want = [100 * release_score("squad", texts,
                                [r.get("references", [r["target"]]) for r in rows["ropes"]]),
            100 * release_score("accuracy", right, [])]
    np.testing.assert_allclose(got, want, atol=1e-9)
    assert 0 < got[0] < 100   # SQuAD: one exact hit of two, partial F1


def test_a_rank_rule_without_choices_is_refused(tmp_path):
    from goose_jax.pipeline.train_runs import load_train_base, load_train_config

    tcfg = load_train_config(str(ROOT / "configs" / "tiny.py"), ["validation_rules=release"])
    path = tmp_path / "imdb.validation.jsonl"
    path.write_text(json.dumps({"input": "x", "target": "positive"}) + "\n")
    cfg, params, tok = load_train_base("random:tiny", tcfg)
    with pytest.raises(DataError, match="imdb.*rank accuracy"):
        validation.Validator(cfg, params, tok, [validation.read_validation(str(path), "imdb")],
                             lora_scale=1.0, tcfg=tcfg)


def test_every_expert_of_the_release_pool_has_its_release_rule():
    """Each of the 166 names of the packaged pool resolves to the gin scope its row names."""
    import json

    from goose_jax.evaluation import release_validation as rv

    with open(rv.POOL_FILE, encoding="utf-8") as f:
        pool = json.load(f)["experts"]
    assert len(pool) == 166
    got = {e["name"]: rv.scope_of(e["name"]) for e in pool}
    assert got == {e["name"]: e["config"].split("/")[0] for e in pool}
    assert len(rv.rules_for([e["name"] for e in pool])) == 166
