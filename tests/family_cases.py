"""The decoder-only model families the tests run on: one case per Hugging Face ``model_type``.

Adding a decoder-only family to the registry (``goose_jax.models.families``) means adding its
cases to ``CASES`` (and, for a new ``ModelFamily`` object, its logits function to ``LOGITS``):
the tests parametrized over ``DECODERS`` then run on it. Importing this module fails while a
registered decoder family has no case, or a case names no registered family.

Every checkpoint is a tiny random model built with a fixed torch seed; no network. The few names
of a family's own package the tests need, where the ``ModelFamily`` contract has no method for
them, are imported here and nowhere else.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

from goose_jax.models import families
from goose_jax.models.causal.loss import pack, target_weights
from goose_jax.models.gemma import model as gemma_model
from goose_jax.models.llama import model as llama_model

#: The sizes every case shares (HF ``config.json`` names); a case's ``config`` adds to them.
#: initializer_range 0.3 makes attention sharp enough that a wrong position changes greedy
#: tokens.
SIZES = dict(vocab_size=101, hidden_size=24, intermediate_size=40, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
             bos_token_id=1, eos_token_id=2, pad_token_id=0, initializer_range=0.3)


@dataclasses.dataclass(frozen=True)
class Case:
    """A tiny random Hugging Face model of one ``model_type``.

    Attributes:
      name: the HF ``model_type``, which is also the goose-jax family name.
      config_class, model_class: the ``transformers`` classes, by name.
      config: the config keywords beyond ``SIZES`` (what makes the architecture's quirks show).
      seed: the torch seed of its random weights.
      expect: attribute -> value that the goose-jax config read from the model must have.
    """

    name: str
    config_class: str
    model_class: str
    config: dict[str, Any]
    seed: int
    expect: dict[str, Any]

    @property
    def tied(self) -> bool:
        """Whether the output head reuses the embedding."""
        return bool(self.config.get("tie_word_embeddings", False))


# Llama: GQA, untied head, llama3 rotary scaling (theta 100 and an original context of 32 put
# the 4 frequencies of head_dim 8 in all three bands: wavelengths 6.3 < 8, 20 in [8, 32], 63 and
# 199 > 32). Qwen2: q/k/v biases, tied head, MHA. Mistral: GQA and a sliding window shorter
# than the test sequences. Gemma: GeGLU, 1 + w norms, the sqrt(D)-scaled embedding, tied head.
# Gemma 2: a sliding layer (window 4, shorter than the test sequences), then a global one;
# attention scores and final logits soft-capped at 5 and 3 (small enough to bite), queries
# scaled by 12 ** -0.5 rather than head_dim 8's, an untied head.
CASES: dict[str, Case] = {case.name: case for case in (
    Case("llama", "LlamaConfig", "LlamaForCausalLM",
         dict(head_dim=8, tie_word_embeddings=False, rope_parameters=dict(
             rope_type="llama3", rope_theta=100.0, factor=8.0, low_freq_factor=1.0,
             high_freq_factor=4.0, original_max_position_embeddings=32)),
         seed=0, expect=dict(num_kv_heads=2, tie_word_embeddings=False, qkv_bias=False,
                             sliding_window=None, rope_type="llama3")),
    Case("qwen2", "Qwen2Config", "Qwen2ForCausalLM",
         dict(num_key_value_heads=4, tie_word_embeddings=True),
         seed=1, expect=dict(num_kv_heads=4, tie_word_embeddings=True, qkv_bias=True,
                             sliding_window=None, rope_type="default")),
    Case("mistral", "MistralConfig", "MistralForCausalLM",
         dict(head_dim=6, sliding_window=5, tie_word_embeddings=False),
         seed=2, expect=dict(num_kv_heads=2, tie_word_embeddings=False, qkv_bias=False,
                             sliding_window=5, rope_type="default")),
    Case("gemma", "GemmaConfig", "GemmaForCausalLM",
         dict(head_dim=8, tie_word_embeddings=True),
         seed=3, expect=dict(num_kv_heads=2, tie_word_embeddings=True, sliding_window=None,
                             query_scale=8 ** -0.5, final_logit_softcapping=None)),
    Case("gemma2", "Gemma2Config", "Gemma2ForCausalLM",
         dict(head_dim=8, sliding_window=4, attn_logit_softcapping=5.0,
              final_logit_softcapping=3.0, query_pre_attn_scalar=12, tie_word_embeddings=False),
         seed=4, expect=dict(num_kv_heads=2, tie_word_embeddings=False, sliding_window=4,
                             sliding_layers=(True, False), query_scale=12 ** -0.5,
                             attn_logit_softcapping=5.0, final_logit_softcapping=3.0)),
)}

#: Every registered decoder-only family, in registry order: what the tests parametrize over.
DECODERS: tuple[str, ...] = tuple(families.DECODER_FAMILIES)
#: The one family the costly tests (whole tool runs, training, routing) run on.
FIRST: str = DECODERS[0]
#: The ``random:`` base of the first family that the tools' tests start from.
FIRST_RANDOM_BASE = "random:llama-tiny"

#: Per ``ModelFamily`` object: the full forward pass ``logits(cfg, params, ids_BT, mask_BT, *,
#: routing=None, adapter=None, collections=None) -> (B, T, V)``, which the contract does not
#: name (training, scoring and generation go through it).
LOGITS: dict[Any, Callable] = {families.named("llama"): llama_model.decoder_logits,
                               families.named("gemma"): gemma_model.gemma_logits}

#: Family-internal functions that single-family tests check directly (no contract method
#: names them): the rotary frequencies (K/2,) of a config (the llama3 rope test), and the first
#: family's packing of prompt and target into one sequence and its target-token weights (the
#: training tests).
rope_inv_freq = llama_model.rope_inv_freq
__all__ = ["CASES", "DECODERS", "FIRST", "FIRST_RANDOM_BASE", "LOGITS", "SIZES", "Case",
           "family_of", "hf_config_dict", "hf_model", "logits_of", "pack", "rope_inv_freq",
           "target_weights", "tiny_config", "write_hf_model"]


def _check_registry() -> None:
    missing = [n for n in DECODERS if n not in CASES]
    unknown = [n for n in CASES if n not in DECODERS]
    if missing or unknown:
        raise AssertionError(f"tests/family_cases.py: registered decoder families without a case "
                             f"{missing}, cases of no registered decoder family {unknown}")
    for name in CASES:
        fam = families.named(name)
        if name not in fam.hf_model_types or fam not in LOGITS:
            raise AssertionError(f"tests/family_cases.py: family {name!r} does not read "
                                 f"model_type {name!r}, or has no LOGITS entry")


_check_registry()


def family_of(name: str):
    """The registered ``ModelFamily`` of case ``name``."""
    return families.named(name)


def logits_of(name: str) -> Callable:
    """The logits function of case ``name``'s family (``LOGITS``)."""
    return LOGITS[families.named(name)]


def hf_config_dict(name: str, **overrides) -> dict[str, Any]:
    """Case ``name``'s ``config.json`` keys as given to transformers (with ``model_type``)."""
    return {**SIZES, **CASES[name].config, **overrides, "model_type": name}


def tiny_config(name: str, **overrides):
    """The goose-jax config of case ``name``'s tiny model, read from its HF config keys
    without building the model (no torch)."""
    return families.named(name).config_from_hf_dict(hf_config_dict(name, **overrides),
                                                    source=f"case {name}")


def hf_model(name: str, **overrides):
    """The tiny random PyTorch model of case ``name``, in eval mode; ``overrides`` change
    config keywords (``pad_token_id=None``: a config that names no padding token)."""
    import torch
    import transformers

    case = CASES[name]
    torch.manual_seed(case.seed)
    config = getattr(transformers, case.config_class)(**{**SIZES, **case.config, **overrides})
    model = getattr(transformers, case.model_class)(config).eval()
    with torch.no_grad():
        # Random (not zero) biases and norm scales, so that their mapping is tested.
        for param_name, p in model.named_parameters():
            if param_name.endswith(".bias") or "norm" in param_name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def write_hf_model(name: str, folder: str | os.PathLike, **overrides):
    """``hf_model(name, **overrides)`` saved to ``folder`` as a HF checkpoint; returns it."""
    model = hf_model(name, **overrides)
    model.save_pretrained(folder)
    return model
