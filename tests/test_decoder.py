"""The decoder-only family against transformers' PyTorch Llama, Qwen2 and Mistral.

Every checkpoint is a tiny random model built here with a fixed torch seed; no network.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from goose_jax.core.errors import CheckpointError, ConfigError
from goose_jax.experts.lora import EXPERTS, LoRAAdapter
from goose_jax.models.llama import model as decoder
from goose_jax.models.llama.config import DecoderConfig
from goose_jax.models.llama.generation import generate_decoder_greedy
from goose_jax.models.llama.hf import load_hf_llama, save_hf_llama

SIZES = dict(vocab_size=101, hidden_size=24, intermediate_size=40, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
             bos_token_id=1, eos_token_id=2, pad_token_id=0, initializer_range=0.3)
# Llama: GQA, untied head, llama3 rotary scaling (theta 100 and an original context of 32 put
# the 4 frequencies of head_dim 8 in all three bands: wavelengths 6.3 < 8, 20 in [8, 32], 63 and
# 199 > 32). Qwen2: q/k/v biases, tied head, MHA. Mistral: GQA and a sliding window shorter
# than the test sequences. initializer_range 0.3 makes attention sharp enough that a wrong
# position changes greedy tokens.
FAMILIES = {
    "llama": dict(head_dim=8, tie_word_embeddings=False, rope_parameters=dict(
        rope_type="llama3", rope_theta=100.0, factor=8.0, low_freq_factor=1.0,
        high_freq_factor=4.0, original_max_position_embeddings=32)),
    "qwen2": dict(num_key_value_heads=4, tie_word_embeddings=True),
    "mistral": dict(head_dim=6, sliding_window=5, tie_word_embeddings=False),
}
B, T = 3, 9
ATOL = 1e-4


def _hf_model(family: str):
    import torch
    import transformers

    torch.manual_seed({"llama": 0, "qwen2": 1, "mistral": 2}[family])
    cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
           "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
           "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM)}[family]
    config = cls[0](**{**SIZES, **FAMILIES[family]})
    model = cls[1](config).eval()
    with torch.no_grad():
        # Random (not zero) biases and norm scales, so that their mapping is tested.
        for name, p in model.named_parameters():
            if name.endswith(".bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    """(name, HF model, its folder, our cfg, our params), one per family per module."""
    name = request.param
    model = _hf_model(name)
    folder = tmp_path_factory.mktemp(name)
    model.save_pretrained(folder)
    cfg, params = load_hf_llama(folder)
    return name, model, folder, cfg, params


def _batch():
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 101, size=(B, T)).astype(np.int64)
    mask = np.ones((B, T), np.int64)
    mask[1, :3] = 0       # left padded
    mask[2, 6:] = 0       # right padded
    ids[mask == 0] = 0
    return ids, mask


def _hf_logits(model, ids, mask):
    import torch

    positions = np.maximum(np.cumsum(mask, axis=-1) - 1, 0)
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                    position_ids=torch.tensor(positions))
    return out.logits.float().numpy()


def test_config_read(family):
    name, model, _, cfg, params = family
    assert cfg.family == name
    assert cfg.num_kv_heads == model.config.num_key_value_heads
    assert cfg.tie_word_embeddings == (name == "qwen2")
    assert ("lm_head" in params) == (name != "qwen2")
    assert cfg.qkv_bias == (name == "qwen2")
    assert cfg.sliding_window == (5 if name == "mistral" else None)
    assert cfg.rope_type == ("llama3" if name == "llama" else "default")


def test_logits_match_transformers_padded(family):
    _, model, _, cfg, params = family
    ids, mask = _batch()
    want = _hf_logits(model, ids, mask)
    got = np.asarray(decoder.decoder_logits(cfg, params, ids, mask))
    real = mask.astype(bool)
    np.testing.assert_allclose(got[real], want[real], atol=ATOL, rtol=0)
    # The padded rows' real tokens equal the same tokens unpadded (positions from the mask).
    alone = np.asarray(decoder.decoder_logits(cfg, params, ids[1:2, 3:]))
    np.testing.assert_allclose(got[1, 3:], alone[0], atol=ATOL, rtol=0)


def test_greedy_generation_matches_transformers(family):
    import torch

    _, model, _, cfg, params = family
    ids, mask = _batch()
    # HF generates from left-padded prompts: move row 2's padding to the front for it.
    left_ids, left_mask = ids.copy(), mask.copy()
    left_ids[2] = np.concatenate([ids[2, 6:], ids[2, :6]])
    left_mask[2] = np.concatenate([mask[2, 6:], mask[2, :6]])
    new = 6
    with torch.no_grad():
        want = model.generate(input_ids=torch.tensor(left_ids),
                              attention_mask=torch.tensor(left_mask), do_sample=False,
                              max_new_tokens=new, pad_token_id=0, eos_token_id=2,
                              min_new_tokens=0).numpy()[:, T:]
    got = np.asarray(generate_decoder_greedy(cfg, params, ids, new, mask))
    assert got.shape == (B, new)
    np.testing.assert_array_equal(got[:, :want.shape[1]], want)
    assert np.all(got[:, want.shape[1]:] == 0)


def test_save_round_trip_loads_in_transformers(family, tmp_path):
    import transformers

    name, model, _, cfg, params = family
    paths = save_hf_llama(cfg, params, tmp_path / "out")
    assert [os.path.basename(p) for p in paths] == ["config.json", "model.safetensors"]
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(back) is type(model)
    ids, mask = _batch()
    np.testing.assert_allclose(_hf_logits(back, ids, mask), _hf_logits(model, ids, mask),
                               atol=1e-6, rtol=0)
    cfg2, params2 = load_hf_llama(tmp_path / "out")
    assert cfg2 == cfg
    jax.tree.map(np.testing.assert_array_equal, params2, params)
    with pytest.raises(CheckpointError, match="already holds"):
        save_hf_llama(cfg, params, tmp_path / "out")


def test_sharded_checkpoint_loads(family, tmp_path):
    name, model, _, cfg, params = family
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert os.path.isfile(tmp_path / "model.safetensors.index.json")
    assert len([f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]) > 1
    _, sharded = load_hf_llama(tmp_path)
    jax.tree.map(np.testing.assert_array_equal, sharded, params)


def test_lora_adapter_on_a_site_matches_numpy(family):
    """A LoRA expert on layers_1/mlp/up: the logits equal a NumPy forward with the base kernel
    replaced by W + scale * A B (the adapter is exactly a weight update)."""
    _, _, _, cfg, params = family
    ids, mask = _batch()
    rng = np.random.default_rng(3)
    D, F, R, scale = cfg.d_model, cfg.d_ff, 3, 0.5
    a = rng.normal(size=(1, D, R)).astype(np.float32)
    b = rng.normal(size=(1, R, F)).astype(np.float32)
    experts = {"layers_1": {"mlp": {"up": {"lora_a": jnp.asarray(a), "lora_b": jnp.asarray(b)}}}}
    got = decoder.decoder_logits(cfg, params, ids, mask, adapter=LoRAAdapter(scale),
                                 collections={EXPERTS: experts})
    merged = jax.tree.map(lambda x: x, params)
    kernel = np.asarray(params["layers_1"]["mlp"]["up"]["kernel"])
    merged["layers_1"]["mlp"]["up"] = {**params["layers_1"]["mlp"]["up"],
                                       "kernel": jnp.asarray(kernel + scale * a[0] @ b[0])}
    want = decoder.decoder_logits(cfg, merged, ids, mask)
    base = decoder.decoder_logits(cfg, params, ids, mask)
    real = mask.astype(bool)
    assert np.abs(np.asarray(got - base))[real].max() > 1e-2
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], atol=ATOL, rtol=0)


# --- cheap checks without transformers ----------------------------------------------------------


def test_site_shapes_match_params():
    cfg = DecoderConfig.preset("tiny")
    params = decoder.init_params(cfg, 0)
    sites = decoder.site_shapes(cfg)
    assert list(sites)[:4] == [f"layers_0/self_attn/{p}" for p in "qkvo"]
    assert len(sites) == 7 * cfg.num_layers
    for site, shape in sites.items():
        node = params
        for key in site.split("/"):
            node = node[key]
        assert node["kernel"].shape == shape
    axes = decoder.param_logical_axes(cfg)
    assert tuple(axes["layers_0"]["self_attn"]["k"]["kernel"]) == ("embed", "joined_kv")


def test_rope_llama3_matches_reference_formula():
    cfg = DecoderConfig.preset("tiny").replace(
        head_dim=16, rope_type="llama3", rope_factor=8.0, rope_theta=10000.0,
        rope_original_max_position_embeddings=32)
    inv = np.array([1.0 / 10000.0 ** (i / 16) for i in range(0, 16, 2)])
    want = []
    for f in inv:
        wavelen = 2 * np.pi / f
        if wavelen < 32 / 4:
            want.append(f)
        elif wavelen > 32 / 1:
            want.append(f / 8)
        else:
            s = (32 / wavelen - 1) / (4 - 1)
            want.append((1 - s) * f / 8 + s * f)
    np.testing.assert_allclose(decoder.rope_inv_freq(cfg), want, rtol=1e-6)
    linear = cfg.replace(rope_type="linear", rope_factor=4.0)
    np.testing.assert_allclose(decoder.rope_inv_freq(linear), inv / 4, rtol=1e-6)


def test_presets_and_config_errors():
    p = DecoderConfig.preset("llama-3-8b")
    assert (p.num_heads, p.num_kv_heads, p.d_ff) == (32, 8, 14336)
    q = DecoderConfig.preset("qwen2-0.5b")
    assert q.qkv_bias and q.tie_word_embeddings
    assert DecoderConfig.preset("mistral-7b").sliding_window == 4096
    with pytest.raises(ConfigError, match="unknown decoder preset"):
        DecoderConfig.preset("llama-9")
    with pytest.raises(ConfigError, match="multiple of"):
        DecoderConfig(num_heads=6, num_kv_heads=4)
    with pytest.raises(ConfigError, match="rope_type 'yarn'"):
        DecoderConfig.from_hf_dict({**SIZES, "model_type": "llama",
                                    "rope_parameters": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(ConfigError, match="not a supported decoder-only"):
        DecoderConfig.from_hf_dict({**SIZES, "model_type": "gpt2"})


def test_bad_checkpoints_are_one_clear_error(tmp_path):
    cfg = DecoderConfig.preset("tiny")
    params = decoder.init_params(cfg, 0)
    save_hf_llama(cfg, params, tmp_path / "m")
    with open(tmp_path / "m" / "config.json") as f:
        d = json.load(f)
    d["intermediate_size"] = 48
    with open(tmp_path / "m" / "config.json", "w") as f:
        json.dump(d, f)
    with pytest.raises(CheckpointError, match=r"mlp.gate_proj.weight has shape"):
        load_hf_llama(tmp_path / "m")
    d["num_hidden_layers"] = 3
    with open(tmp_path / "m" / "config.json", "w") as f:
        json.dump(d, f)
    with pytest.raises(CheckpointError, match="lacks 9 tensor"):
        load_hf_llama(tmp_path / "m")


def test_import_is_light():
    import subprocess
    import sys

    code = ("import sys, goose_jax, goose_jax.models.llama.generation, goose_jax.models.llama.hf; "
            "bad = [m for m in ('tensorflow', 'torch') if m in sys.modules]; "
            "print(','.join(bad)); sys.exit(1 if bad else 0)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, f"pulled in: {res.stdout} {res.stderr[-500:]}"
