"""What every decoder-only family shares (Llama, Gemma): padding-aware positions and attention
masks, rotary embeddings, grouped-query attention with a decoding cache, the causal-LM loss,
prompt-once choice scoring, left-aligned greedy generation, the Hugging Face tensor-map
conversion, and the ``ModelFamily`` methods built on them.

Each is parametrized by the family's model class, a Flax module ``Model(cfg, adapter)`` called
as ``(ids_BQ, positions_BQ, mask_BS, *, decode=False, max_len=None) -> float32 logits``; it
never imports a family.
"""
