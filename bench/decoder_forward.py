"""Decoder-only models: goose-jax's forward against transformers' PyTorch Llama, and prompt-once
rank classification against per-choice scoring, each side by side in one process.

(a) ``forward``: a small random Llama (default 4 layers, d_model 512, 8 query and 4 key/value
heads, vocabulary 32000) built by transformers, its weights converted to goose-jax
(``models.llama.hf.hf_state_dict_to_params``); both compute the logits of the same batch of
B x N tokens, float32, on the same CPU. Runs alternate so that machine noise hits both alike.
Last line of the part: goose-jax / torch throughput ratio.

(b) ``scoring``: the same model scores B examples of C answer choices each
(``models.causal.scoring.choice_nll``): prompt once (each prompt through the model once into
the key/value cache, every choice scored from it in one batched call) against per choice (each
prompt + choice row through the whole model, the way a naive evaluator scores). Prompts are
200 to L real tokens, choices 3 to T, padded to L and T. Last line: the examples/s ratio,
prompt once over per choice.

The last line printed is (b)'s ratio when both parts run.

    python bench/decoder_forward.py
    python bench/decoder_forward.py --parts scoring --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import numpy as np
from calibrate import print_calibration

from goose_jax.models.llama import model as decoder
from goose_jax.models.llama.config import DecoderConfig
from goose_jax.models.llama.hf import hf_state_dict_to_params
from goose_jax.models.llama.scoring import decoder_choice_nll


def build(args, seed: int = 0):
    """(cfg, params, HF model): one random Llama, the same weights on both sides."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = DecoderConfig(family="llama", vocab_size=args.vocab, d_model=args.d_model,
                        d_ff=args.d_ff, num_layers=args.layers, num_heads=args.heads,
                        num_kv_heads=args.kv_heads, head_dim=args.d_model // args.heads,
                        max_position_embeddings=2048)
    hf = {k: v for k, v in cfg.to_hf_dict().items() if k not in ("architectures", "dtype")}
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**hf)).eval()
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    return cfg, hf_state_dict_to_params(cfg, state), model


def forward_flops(cfg: DecoderConfig, rows: int, n: int) -> float:
    """FLOPs (2 x multiply-adds) of logits for ``rows`` sequences of ``n`` tokens: the seven
    projections, attention's two products (causal: half the square) and the head."""
    D, F, J, G = cfg.d_model, cfg.d_ff, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads
    kv = G * cfg.head_dim
    layer = n * (2 * D * J + 2 * D * kv + 3 * D * F) + n * n * J
    return 2.0 * rows * (cfg.num_layers * layer + n * D * cfg.vocab_size)


def alternate(fns: dict, repeats: int) -> dict[str, float]:
    """Median seconds of each warmed-up call, the calls alternating."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def part_forward(args, cfg, params, model) -> None:
    import torch

    B, N = args.batch, args.tokens
    rng = np.random.default_rng(0)
    ids = rng.integers(3, cfg.vocab_size, (B, N)).astype(np.int32)
    mask = np.ones_like(ids)
    ids_t, mask_t = (torch.from_numpy(a.astype(np.int64)) for a in (ids, mask))
    ids_j, mask_j = jax.device_put(ids), jax.device_put(mask)

    def run_jax():
        return decoder.decoder_logits(cfg, params, ids_j, mask_j).block_until_ready()

    def run_torch():
        with torch.inference_mode():
            return model(input_ids=ids_t, attention_mask=mask_t).logits

    diff = float(np.max(np.abs(np.asarray(run_jax()) - run_torch().numpy())))
    t = alternate({"jax": run_jax, "torch": run_torch}, args.repeats)
    flops = forward_flops(cfg, B, N)
    tokens = B * N
    print(f"(a) forward, {B} x {N} tokens ({flops / 1e9:.1f} GFLOP); largest logit difference "
          f"{diff:.1e}")
    for name in ("jax", "torch"):
        print(f"    {'goose-jax' if name == 'jax' else 'torch':9s} {t[name] * 1e3:8.1f} ms "
              f"{tokens / t[name]:9.0f} tok/s {flops / t[name] / 1e9:6.1f} GFLOP/s")
    print(f"(a) goose-jax / torch throughput ratio {t['torch'] / t['jax']:.2f} (medians of "
          f"{args.repeats})")


def scoring_batch(cfg, B: int, C: int, L: int, T: int, rng: np.random.Generator):
    ids, mask = np.zeros((B, L), np.int32), np.zeros((B, L), np.int32)
    tgt, tmask = np.zeros((B, C, T), np.int32), np.zeros((B, C, T), np.int32)
    for b in range(B):
        n = int(rng.integers(min(200, L), L + 1))
        ids[b, :n], mask[b, :n] = rng.integers(3, cfg.vocab_size, n), 1
        for c in range(C):
            m = int(rng.integers(min(3, T), T + 1))
            tgt[b, c, :m], tmask[b, c, :m] = rng.integers(3, cfg.vocab_size, m), 1
    return ids, mask, tgt, tmask


def part_scoring(args, cfg, params) -> None:
    B, C, L, T = args.examples, args.choices, args.prompt, args.choice_len
    batch = [jax.device_put(a) for a in scoring_batch(cfg, B, C, L, T,
                                                      np.random.default_rng(1))]
    variables = {"params": params}

    def scorer(naive):
        def run():
            nll, _ = decoder_choice_nll(cfg, None, variables, variables, *batch, naive=naive)
            return nll.block_until_ready()
        return run

    once, naive = scorer(False), scorer(True)
    diff = float(np.max(np.abs(np.asarray(once()) - np.asarray(naive()))))
    t = alternate({"once": once, "naive": naive}, args.repeats)
    print(f"(b) rank classification, {B} examples x {C} choices, prompts padded to {L}, "
          f"choices to {T} tokens; largest NLL difference {diff:.1e}")
    for name, label in (("once", "prompt once"), ("naive", "per choice")):
        print(f"    {label:11s} {t[name] * 1e3:8.1f} ms {B / t[name]:8.2f} examples/s")
    print(f"(b) prompt-once / per-choice examples/s ratio {t['naive'] / t['once']:.2f} "
          f"(medians of {args.repeats})")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", nargs="+", choices=("forward", "scoring"),
                    default=["forward", "scoring"])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--d-ff", type=int, default=1376)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--batch", type=int, default=8, help="(a) sequences")
    ap.add_argument("--tokens", type=int, default=256, help="(a) tokens per sequence")
    ap.add_argument("--examples", type=int, default=8, help="(b) examples")
    ap.add_argument("--choices", type=int, default=4, help="(b) choices per example")
    ap.add_argument("--prompt", type=int, default=256, help="(b) prompt slots")
    ap.add_argument("--choice-len", type=int, default=8, help="(b) choice slots")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)

    import torch

    print_calibration(torch_too=True)
    cfg, params, model = build(args)
    print(f"jax {jax.__version__} on {jax.default_backend()}, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads); Llama {args.layers} layers, d_model "
          f"{args.d_model}, d_ff {args.d_ff}, {args.heads} / {args.kv_heads} heads, vocabulary "
          f"{args.vocab}, float32")
    if "forward" in args.parts:
        part_forward(args, cfg, params, model)
    if "scoring" in args.parts:
        part_scoring(args, cfg, params)


if __name__ == "__main__":
    main()
