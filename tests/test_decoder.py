"""Every registered decoder-only family (tests/family_cases.py: Llama, Qwen2, Mistral) against
its transformers PyTorch model, through the family contract (``goose_jax.models.family``).

Every checkpoint is a tiny random model built with a fixed torch seed; no network.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from family_cases import (
    CASES,
    DECODERS,
    SIZES,
    family_of,
    hf_model,
    logits_of,
    rope_inv_freq,
    tiny_config,
)

from goose_jax.core.errors import CheckpointError, ConfigError
from goose_jax.experts.lora import EXPERTS, LoRAAdapter
from goose_jax.models import families

B, T = 3, 9
ATOL = 1e-4


@pytest.fixture(scope="module", params=DECODERS)
def family(request, tmp_path_factory):
    """(name, HF model, its folder, our cfg, our params), one per family per module."""
    name = request.param
    model = hf_model(name)
    folder = tmp_path_factory.mktemp(name)
    model.save_pretrained(folder)
    cfg, params = family_of(name).load_hf(str(folder))
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
    assert families.family(cfg) == name
    assert {k: getattr(cfg, k) for k in CASES[name].expect} == CASES[name].expect
    assert cfg.num_kv_heads == model.config.num_key_value_heads
    assert ("lm_head" in params) == (not CASES[name].tied)


def test_logits_match_transformers_padded(family):
    name, model, _, cfg, params = family
    ids, mask = _batch()
    want = _hf_logits(model, ids, mask)
    got = np.asarray(logits_of(name)(cfg, params, ids, mask))
    real = mask.astype(bool)
    np.testing.assert_allclose(got[real], want[real], atol=ATOL, rtol=0)
    # The padded rows' real tokens equal the same tokens unpadded (positions from the mask).
    alone = np.asarray(logits_of(name)(cfg, params, ids[1:2, 3:]))
    np.testing.assert_allclose(got[1, 3:], alone[0], atol=ATOL, rtol=0)


def test_greedy_generation_matches_transformers(family):
    import torch

    name, model, _, cfg, params = family
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
    got = np.asarray(family_of(name).generate(cfg, params, ids, new, mask))
    assert got.shape == (B, new)
    np.testing.assert_array_equal(got[:, :want.shape[1]], want)
    assert np.all(got[:, want.shape[1]:] == 0)


def test_save_round_trip_loads_in_transformers(family, tmp_path):
    import transformers

    name, model, _, cfg, params = family
    fam = family_of(name)
    paths = fam.save_hf(cfg, params, str(tmp_path / "out"))
    assert [os.path.basename(p) for p in paths] == ["config.json", "model.safetensors"]
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(back) is type(model)
    ids, mask = _batch()
    np.testing.assert_allclose(_hf_logits(back, ids, mask), _hf_logits(model, ids, mask),
                               atol=1e-6, rtol=0)
    cfg2, params2 = fam.load_hf(str(tmp_path / "out"))
    assert cfg2 == cfg
    jax.tree.map(np.testing.assert_array_equal, params2, params)
    with pytest.raises(CheckpointError, match="already holds"):
        fam.save_hf(cfg, params, str(tmp_path / "out"))


def test_sharded_checkpoint_loads(family, tmp_path):
    name, model, _, cfg, params = family
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert os.path.isfile(tmp_path / "model.safetensors.index.json")
    assert len([f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]) > 1
    _, sharded = family_of(name).load_hf(str(tmp_path))
    jax.tree.map(np.testing.assert_array_equal, sharded, params)


def test_lora_adapter_on_a_site_matches_numpy(family):
    """A LoRA expert on layers_1/mlp/up: the logits equal a NumPy forward with the base kernel
    replaced by W + scale * A B (the adapter is exactly a weight update)."""
    name, _, _, cfg, params = family
    forward = logits_of(name)
    ids, mask = _batch()
    rng = np.random.default_rng(3)
    D, F, R, scale = cfg.d_model, cfg.d_ff, 3, 0.5
    a = rng.normal(size=(1, D, R)).astype(np.float32)
    b = rng.normal(size=(1, R, F)).astype(np.float32)
    experts = {"layers_1": {"mlp": {"up": {"lora_a": jnp.asarray(a), "lora_b": jnp.asarray(b)}}}}
    got = forward(cfg, params, ids, mask, adapter=LoRAAdapter(scale),
                  collections={EXPERTS: experts})
    merged = jax.tree.map(lambda x: x, params)
    kernel = np.asarray(params["layers_1"]["mlp"]["up"]["kernel"])
    merged["layers_1"]["mlp"]["up"] = {**params["layers_1"]["mlp"]["up"],
                                       "kernel": jnp.asarray(kernel + scale * a[0] @ b[0])}
    want = forward(cfg, merged, ids, mask)
    base = forward(cfg, params, ids, mask)
    real = mask.astype(bool)
    assert np.abs(np.asarray(got - base))[real].max() > 1e-2
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], atol=ATOL, rtol=0)


# --- cheap checks without transformers ----------------------------------------------------------


def test_site_shapes_match_params():
    for name in DECODERS:
        fam, cfg = family_of(name), tiny_config(name)
        params = fam.init_params(cfg, 0)
        sites = fam.site_shapes(cfg)
        assert list(sites)[:4] == [f"layers_0/self_attn/{p}" for p in "qkvo"], name
        assert len(sites) == 7 * cfg.num_layers, name
        for site, shape in sites.items():
            node = params
            for key in site.split("/"):
                node = node[key]
            assert node["kernel"].shape == shape, (name, site)
        axes = fam.param_logical_axes(cfg)
        assert tuple(axes["layers_0"]["self_attn"]["k"]["kernel"]) == ("embed", "joined_kv")


def test_rope_llama3_matches_reference_formula():
    """The llama case's rotary scaling (its frequencies fall in all three bands)."""
    rope = CASES["llama"].config["rope_parameters"]
    cfg = tiny_config("llama")
    theta, factor, k = rope["rope_theta"], rope["factor"], cfg.head_dim
    low = rope["original_max_position_embeddings"] / rope["low_freq_factor"]
    high = rope["original_max_position_embeddings"] / rope["high_freq_factor"]
    inv = np.array([1.0 / theta ** (i / k) for i in range(0, k, 2)])
    want, bands = [], set()
    for f in inv:
        wavelen = 2 * np.pi / f
        if wavelen < high:
            want.append(f)
            bands.add("high")
        elif wavelen > low:
            want.append(f / factor)
            bands.add("low")
        else:
            s = (rope["original_max_position_embeddings"] / wavelen - rope["low_freq_factor"]) / (
                rope["high_freq_factor"] - rope["low_freq_factor"])
            want.append((1 - s) * f / factor + s * f)
            bands.add("between")
    assert bands == {"high", "low", "between"}
    np.testing.assert_allclose(rope_inv_freq(cfg), want, rtol=1e-6)
    linear = cfg.replace(rope_type="linear", rope_factor=4.0)
    np.testing.assert_allclose(rope_inv_freq(linear), inv / 4, rtol=1e-6)


def test_presets_and_config_errors():
    """The Llama family's presets and config checks."""
    fam = family_of("llama")
    p = fam.preset("llama-3-8b")
    assert (p.num_heads, p.num_kv_heads, p.d_ff) == (32, 8, 14336)
    q = fam.preset("qwen2-0.5b")
    assert q.qkv_bias and q.tie_word_embeddings
    assert fam.preset("mistral-7b").sliding_window == 4096
    with pytest.raises(ConfigError, match="unknown decoder preset"):
        fam.preset("llama-9")
    with pytest.raises(ConfigError, match="multiple of"):
        fam.config_type(num_heads=6, num_kv_heads=4)
    with pytest.raises(ConfigError, match="rope_type 'yarn'"):
        fam.config_from_hf_dict({**SIZES, "model_type": "llama",
                                 "rope_parameters": {"rope_type": "yarn", "factor": 4.0}},
                                source="config.json")
    with pytest.raises(ConfigError, match="not a supported decoder-only"):
        fam.config_from_hf_dict({**SIZES, "model_type": "gpt2"}, source="config.json")


def test_bad_checkpoints_are_one_clear_error(tmp_path):
    from safetensors import safe_open

    for name in DECODERS:
        fam, cfg = family_of(name), tiny_config(name)
        folder = tmp_path / name
        fam.save_hf(cfg, fam.init_params(cfg, 0), str(folder))
        with safe_open(folder / "model.safetensors", "np") as f:
            per_layer = sum(k.startswith("model.layers.0.") for k in f.keys())
        with open(folder / "config.json") as f:
            d = json.load(f)
        d["intermediate_size"] = 48
        with open(folder / "config.json", "w") as f:
            json.dump(d, f)
        with pytest.raises(CheckpointError, match=r"mlp.gate_proj.weight has shape"):
            fam.load_hf(str(folder))
        d["num_hidden_layers"] = 3
        d.pop("layer_types", None)   # a per-layer list (Gemma 2) must match the layer count
        with open(folder / "config.json", "w") as f:
            json.dump(d, f)
        with pytest.raises(CheckpointError, match=f"lacks {per_layer} tensor"):
            fam.load_hf(str(folder))
        assert per_layer >= 9, name


def test_import_is_light():
    """Importing every registered family (the registry imports them all) loads no torch or
    TensorFlow."""
    import subprocess
    import sys

    code = ("import sys, goose_jax, goose_jax.models.families; "
            "bad = [m for m in ('tensorflow', 'torch') if m in sys.modules]; "
            "print(','.join(bad)); sys.exit(1 if bad else 0)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, f"pulled in: {res.stdout} {res.stderr[-500:]}"
