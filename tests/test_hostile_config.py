"""Hugging Face config keys against careless and hostile input: the rope keys in both layouts
(``rope_parameters`` and ``rope_scaling``) are read in one place and only what the model computes
is accepted; a ``tie_word_embeddings: true`` beside a distinct ``lm_head.weight`` keeps the head,
as transformers does. Refusals are one line, exit 1, before anything is written."""

import json
import shutil

import numpy as np
import pytest
from conftest import build_hf_t5, one_line, tool, tree_hash

from goose_jax.core import errors
from goose_jax.core.errors import ConfigError
from goose_jax.models.llama import model as decoder
from goose_jax.models.llama.config import DecoderConfig, read_rope

SIZES = dict(vocab_size=101, hidden_size=24, intermediate_size=40, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, head_dim=8,
             max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0)
DEFAULT = {"rope_type": "default", "rope_theta": 10000.0}
LINEAR2 = {"type": "linear", "factor": 2.0}
LLAMA3 = {"rope_type": "llama3", "rope_theta": 100.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 32}

# name -> (the keys added to a Llama config.json, words of the one line refusing it)
REFUSED = {
    "linear x2 beside default": (dict(rope_parameters=DEFAULT, rope_scaling=LINEAR2),
                                 ["rope_parameters and rope_scaling disagree", "rope_type"]),
    "dynamic": (dict(rope_parameters=DEFAULT, rope_scaling={"type": "dynamic", "factor": 2.0}),
                ["rope_scaling.type 'dynamic' is not supported"]),
    "yarn": (dict(rope_parameters=DEFAULT, rope_scaling={
        "rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 32}),
        ["rope_scaling.rope_type 'yarn'"]),
    "longrope": (dict(rope_scaling={"rope_type": "longrope", "long_factor": [1.0] * 4,
                                    "short_factor": [1.0] * 4}),
                 ["rope_scaling.rope_type 'longrope'"]),
    "garbage type": (dict(rope_parameters={"rope_type": "banana"}),
                     ["rope_parameters.rope_type 'banana'"]),
    "bare string": (dict(rope_scaling="linear"), ["rope_scaling 'linear' is not supported"]),
    "bare string, v5 key": (dict(rope_parameters="linear"), ["rope_parameters 'linear'"]),
    "factor a string": (dict(rope_scaling={"type": "linear", "factor": "2"}),
                        ["rope_scaling.factor '2'", "positive number"]),
    "factor zero": (dict(rope_scaling={"type": "linear", "factor": 0}),
                    ["rope_scaling.factor 0"]),
    "unread key": (dict(rope_scaling={**LINEAR2, "attention_factor": 3.0}),
                   ["rope_scaling.attention_factor 3.0"]),
    "linear without factor": (dict(rope_parameters={"rope_type": "linear"}),
                              ["'linear' needs ['factor']"]),
    "two thetas": (dict(rope_parameters={"rope_type": "default", "rope_theta": 500.0},
                        rope_theta=10000.0), ["rope_theta values disagree"]),
    "llama3 factors disagree": (dict(rope_parameters=LLAMA3, rope_scaling={**LLAMA3,
                                                                          "factor": 4.0}),
                                ["disagree on factor (8.0 and 4.0)"]),
    "two type keys": (dict(rope_scaling={"type": "linear", "rope_type": "llama3"}),
                      ["names two rope types"]),
    "partial rotary": (dict(partial_rotary_factor=0.5), ["partial_rotary_factor 0.5"]),
}
# Accepted: every one of them is what transformers itself computes (checked below).
ACCEPTED = {
    "v5 default": dict(rope_parameters=DEFAULT),
    "v4 linear x2": dict(rope_scaling=LINEAR2, rope_theta=500.0),
    "v4 null scaling": dict(rope_scaling=None, rope_theta=500.0),
    "v5 llama3": dict(rope_parameters=LLAMA3),
    "both, equal (as goose-jax writes)": dict(rope_parameters={**LINEAR2, "rope_theta": 50.0},
                                              rope_scaling=LINEAR2, rope_theta=50.0),
    "v4 llama3 without original length": dict(rope_scaling={
        k: v for k, v in LLAMA3.items() if k not in ("original_max_position_embeddings",
                                                     "rope_theta")}),
}


def _llama(extra):
    return {**SIZES, "model_type": "llama", **extra}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_rope_keys_are_refused_in_one_line(name):
    extra, words = REFUSED[name]
    with pytest.raises(ConfigError) as e:
        DecoderConfig.from_hf_dict(_llama(extra), source="m/config.json")
    message = str(e.value)
    assert "\n" not in message and message.startswith("m/config.json: "), message
    for word in words:
        assert word in message, message


def _hf_inv_freq(d):
    """transformers' own reading of ``d``: its config class and its rotary embedding."""
    import transformers

    config = transformers.LlamaConfig.from_dict(d)
    return config, transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(
        config).inv_freq.numpy()


@pytest.mark.parametrize("name", sorted(ACCEPTED))
def test_accepted_rope_keys_are_what_transformers_computes(name):
    d = _llama(ACCEPTED[name])
    cfg = DecoderConfig.from_hf_dict(d)
    config, want = _hf_inv_freq(json.loads(json.dumps(d)))
    assert cfg.rope_type == config.rope_parameters["rope_type"]
    np.testing.assert_allclose(decoder.rope_inv_freq(cfg), want, rtol=1e-6)
    # What goose-jax writes back (both layouts) reads back as the same config, in both readers.
    back = cfg.to_hf_dict()
    assert DecoderConfig.from_hf_dict(back) == cfg
    np.testing.assert_allclose(_hf_inv_freq(back)[1], want, rtol=1e-6)


def test_read_rope_is_the_one_reader():
    assert read_rope({"rope_scaling": LINEAR2, "rope_theta": 7.0}) == {
        "rope_type": "linear", "factor": 2.0, "rope_theta": 7.0}
    assert read_rope({}) == {"rope_type": "default", "rope_theta": 10000.0}


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    """A tiny Llama with rope_scaling linear x2 in its config.json and an untied head."""
    import torch
    import transformers

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        **SIZES, tie_word_embeddings=False, rope_scaling=LINEAR2, initializer_range=0.3)).eval()
    folder = tmp_path_factory.mktemp("llama")
    model.save_pretrained(folder)
    return folder


def _with_config(folder, dst, **changes):
    shutil.copytree(folder, dst)
    d = json.loads((dst / "config.json").read_text())
    d.update(changes)
    for k in [k for k, v in changes.items() if v is None]:
        d.pop(k)
    (dst / "config.json").write_text(json.dumps(d))
    return dst


def test_linear_rope_and_a_distinct_head_under_a_tie_match_transformers(llama_folder, tmp_path):
    import torch
    import transformers

    from goose_jax.models.llama.hf import load_hf_llama

    # transformers 5 writes rope_parameters; the v4 layout alone must read the same.
    v4 = _with_config(llama_folder, tmp_path / "v4", rope_parameters=None,
                      rope_scaling=LINEAR2, rope_theta=10000.0, tie_word_embeddings=True)
    ids = np.random.default_rng(0).integers(3, 101, size=(2, 7))
    for folder in (llama_folder, v4):
        model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
        assert model.config.rope_parameters["rope_type"] == "linear"
        with torch.no_grad():
            want = model(input_ids=torch.tensor(ids)).logits.float().numpy()
        cfg, params = load_hf_llama(folder)
        assert cfg.rope_type == "linear" and cfg.rope_factor == 2.0
        assert not cfg.tie_word_embeddings and "lm_head" in params
        got = np.asarray(decoder.decoder_logits(cfg, params, ids))
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_a_tied_config_beside_an_equal_head_stays_tied(llama_folder, tmp_path):
    from safetensors.numpy import load_file, save_file

    from goose_jax.models.llama.hf import load_hf_llama

    folder = _with_config(llama_folder, tmp_path / "tied", tie_word_embeddings=True)
    state = load_file(folder / "model.safetensors")
    state["lm_head.weight"] = state["model.embed_tokens.weight"].copy()
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    cfg, params = load_hf_llama(folder)
    assert cfg.tie_word_embeddings and "lm_head" not in params


def test_a_t5_tied_config_beside_a_distinct_head_matches_transformers(tmp_path):
    import torch
    import transformers

    import goose_jax as gj
    from goose_jax.models.t5 import model as t5

    model = build_hf_t5("v1_1")   # a distinct lm_head
    model.save_pretrained(tmp_path / "t5")
    d = json.loads((tmp_path / "t5" / "config.json").read_text())
    d["tie_word_embeddings"] = True
    (tmp_path / "t5" / "config.json").write_text(json.dumps(d))
    hf = transformers.AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "t5").eval()
    assert not torch.equal(hf.lm_head.weight, hf.shared.weight)   # transformers kept it
    ids = np.random.default_rng(0).integers(2, 101, size=(2, 6))
    dec = np.random.default_rng(1).integers(2, 101, size=(2, 4))
    with torch.no_grad():
        want = hf(input_ids=torch.tensor(ids), decoder_input_ids=torch.tensor(dec)).logits
    cfg, params = gj.load_hf_t5(tmp_path / "t5")
    assert not cfg.tie_word_embeddings
    got = np.asarray(t5.T5(cfg).apply({"params": params}, ids, dec, np.ones_like(ids)))
    np.testing.assert_allclose(got, want.numpy(), atol=1e-4, rtol=0)


# --- the tools -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["linear x2 beside default", "bare string", "yarn"])
def test_goose_convert_refuses_bad_rope_keys_before_writing(llama_folder, tmp_path, capsys,
                                                            name):
    extra, words = REFUSED[name]
    src = _with_config(llama_folder, tmp_path / "src", **extra)
    dst = tmp_path / "dst"
    before = tree_hash(src, dst)
    capsys.readouterr()
    assert tool("goose-convert")(["hf-to-orbax", str(src), str(dst)]) == errors.USER_ERROR
    line = one_line(capsys.readouterr().err, "goose-convert")
    assert "config.json" in line and all(w in line for w in words), line
    assert tree_hash(src, dst) == before and not dst.exists()


def test_goose_train_refuses_bad_rope_keys_of_its_base(llama_folder, tmp_path, capsys):
    src = _with_config(llama_folder, tmp_path / "src", rope_scaling="linear")
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"input": "a b", "target": "c"}) + "\n")
    lib, work = tmp_path / "lib", tmp_path / "work"
    before = tree_hash(src, data)
    capsys.readouterr()
    code = tool("goose-train")(["experts", "--base", str(src), "--data", str(data),
                                "--library", str(lib), "--workdir", str(work)])
    line = one_line(capsys.readouterr().err, "goose-train")
    assert code == errors.USER_ERROR and "rope_scaling 'linear' is not supported" in line, line
    assert tree_hash(src, data) == before and not lib.exists() and not work.exists()
