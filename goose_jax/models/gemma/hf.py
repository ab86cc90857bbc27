"""Hugging Face Gemma / Gemma 2 checkpoints <-> goose-jax parameter pytrees: the family's tensor
names over the decoder-only conversion of ``goose_jax.models.causal.hf``.

HF's q and k weights are already permuted for the ``rotate_half`` rotary layout, which
``goose_jax.models.gemma.model`` uses too. Gemma's ``post_attention_layernorm`` is the norm
before the feed-forward (ours ``pre_mlp_norm``); Gemma 2's is the one after attention (ours
``post_attn_norm``), its ``pre_feedforward_layernorm`` the one before the feed-forward.
"""

from __future__ import annotations

from collections.abc import Iterator

from goose_jax.models.causal import hf as causal_hf
from goose_jax.models.gemma.config import GemmaConfig
from goose_jax.models.gemma.model import abstract_variables

_PROJ = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
         "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj",
         "down": "mlp.down_proj"}
_NORMS = {"gemma": {"input_layernorm": "input_norm", "post_attention_layernorm": "pre_mlp_norm"},
          "gemma2": {"input_layernorm": "input_norm", "post_attention_layernorm": "post_attn_norm",
                     "pre_feedforward_layernorm": "pre_mlp_norm",
                     "post_feedforward_layernorm": "post_mlp_norm"}}


def tensor_map(cfg: GemmaConfig) -> Iterator[tuple[str, tuple[str, ...], bool]]:
    """Every HF tensor of ``cfg``: (HF name, our param path, transposed)."""
    yield "model.embed_tokens.weight", ("embed_tokens", "embedding"), False
    for i in range(cfg.num_layers):
        hf, ours = f"model.layers.{i}", f"layers_{i}"
        for name, norm in _NORMS[cfg.family].items():
            yield f"{hf}.{name}.weight", (ours, norm, "scale"), False
        for name, proj in _PROJ.items():
            scope = "self_attn" if proj.startswith("self_attn") else "mlp"
            yield f"{hf}.{proj}.weight", (ours, scope, name, "kernel"), True
            if cfg.attention_bias and scope == "self_attn":
                yield f"{hf}.{proj}.bias", (ours, scope, name, "bias"), False
    yield "model.norm.weight", ("final_norm", "scale"), False
    if not cfg.tie_word_embeddings:
        yield "lm_head.weight", ("lm_head", "kernel"), True


LAYOUT = causal_hf.HFLayout(tensor_map, abstract_variables, GemmaConfig.from_hf_dict)
