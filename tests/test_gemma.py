"""What only the Gemma family has, beyond the decoder-only tests every family runs
(tests/family_cases.py): reading Gemma's config.json quirks, a layer_types pattern that is not
Gemma 2's default alternation (unrolled and scanned, against transformers), and the embedding's
sqrt(D) applied in the embedding's dtype."""

import numpy as np
import pytest

from goose_jax.core.errors import ConfigError
from goose_jax.models import families
from goose_jax.models.gemma import model as gemma
from goose_jax.models.gemma.config import FULL, SLIDING, GemmaConfig
from goose_jax.models.layers import Embedding

SIZES = dict(vocab_size=101, hidden_size=24, intermediate_size=40, num_hidden_layers=4,
             num_attention_heads=4, num_key_value_heads=2, head_dim=8,
             max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def test_config_quirks_are_read_as_transformers_reads_them():
    fam = families.named("gemma")
    v1 = fam.config_from_hf_dict({**SIZES, "model_type": "gemma", "hidden_act": "gelu"},
                                 source="x")
    assert v1.hidden_activation == "gelu_pytorch_tanh"   # Gemma's legacy "gelu" is tanh
    assert v1.query_scale == 8 ** -0.5 and v1.sliding_layers == (False,) * 4
    v2 = fam.config_from_hf_dict({**SIZES, "model_type": "gemma2"}, source="x")
    assert v2.layer_types == (SLIDING, FULL, SLIDING, FULL)   # transformers' default
    assert (v2.query_pre_attn_scalar, v2.attn_logit_softcapping,
            v2.final_logit_softcapping, v2.sliding_window) == (256, 50.0, 30.0, 4096)
    full = fam.config_from_hf_dict({**SIZES, "model_type": "gemma2", "sliding_window": None},
                                   source="x")
    assert full.sliding_layers == (False,) * 4
    assert fam.config_from_hf_dict(v2.to_hf_dict(), source="x") == v2
    for bad, match in [({"rope_parameters": {"rope_type": "linear", "factor": 2.0}}, "rope"),
                       ({"use_bidirectional_attention": True}, "bidirectional"),
                       ({"hidden_activation": "relu"}, "hidden_activation")]:
        with pytest.raises(ConfigError, match=match):
            fam.config_from_hf_dict({**SIZES, "model_type": "gemma2", **bad}, source="x")
    with pytest.raises(ConfigError, match="gemma2's"):
        GemmaConfig(family="gemma", attn_logit_softcapping=5.0)
    with pytest.raises(ConfigError, match="layer_types"):
        GemmaConfig(family="gemma2", num_layers=2, sliding_window=3, layer_types=(FULL,))


def _hf_gemma2(layer_types):
    import torch
    import transformers

    torch.manual_seed(7)
    config = transformers.Gemma2Config(
        **SIZES, sliding_window=3, layer_types=layer_types, query_pre_attn_scalar=12,
        attn_logit_softcapping=5.0, final_logit_softcapping=3.0, initializer_range=0.3)
    model = transformers.Gemma2ForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def test_a_custom_layer_pattern_matches_transformers_unrolled_and_scanned(tmp_path):
    import torch

    types = [FULL, SLIDING, SLIDING, FULL]
    model = _hf_gemma2(types)
    model.save_pretrained(tmp_path)
    cfg, params = families.named("gemma2").load_hf(str(tmp_path))
    assert cfg.layer_types == tuple(types)
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 101, size=(2, 9))
    mask = np.ones((2, 9), np.int64)
    mask[1, :2] = 0
    ids[mask == 0] = 0
    positions = np.maximum(np.cumsum(mask, axis=-1) - 1, 0)
    with torch.no_grad():
        want = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                     position_ids=torch.tensor(positions)).logits.numpy()
    real = mask.astype(bool)
    for scan in (False, True):
        got = np.asarray(gemma.gemma_logits(cfg.replace(scan_layers=scan), params, ids, mask))
        np.testing.assert_allclose(got[real], want[real], atol=1e-4, rtol=0)


def test_embedding_is_scaled_in_the_embedding_dtype():
    import jax.numpy as jnp
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.GemmaConfig(**SIZES)
    model = transformers.GemmaForCausalLM(config).to(torch.bfloat16).eval()
    ids = np.array([[5, 17, 99, 3]])
    with torch.no_grad():
        want = model.model.embed_tokens(torch.tensor(ids)).float().numpy()
    cfg = GemmaConfig.preset("tiny").with_dtypes("bfloat16", "bfloat16")
    table = jnp.asarray(model.model.embed_tokens.weight.detach().float().numpy(), jnp.bfloat16)
    got = Embedding(cfg, multiplier=cfg.embed_scale).apply(
        {"params": {"embedding": table}}, jnp.asarray(ids))
    assert got.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(got, np.float32), want)
