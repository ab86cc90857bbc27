"""Rank-classification throughput: encoder-once scoring against naive per-choice scoring.

One process, one tiny random T5 (byte tokenizer), 4-choice examples with T0-like shapes: prompts
of a few hundred bytes, answer choices of a few bytes. Both scorers use the same bucketing and
batching; the naive one repeats each prompt per choice and runs the whole model on every
(prompt, choice) row, the way the original release scores choices. Compilation is excluded (one
warm-up pass each); timed passes alternate between the two so machine noise hits both alike.
The last line printed is the examples/s ratio, encoder-once over naive.

    python bench/eval.py
    python bench/eval.py --examples 128 --method phatgoose --experts 8 --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
from calibrate import print_calibration

import goose_jax as gj
from goose_jax.data.examples import Example
from goose_jax.data.tokenizers import ByteTokenizer
from goose_jax.evaluation import evaluator as ev


def make_examples(n: int, rng: np.random.Generator) -> list[Example]:
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz     "))
    out = []
    for i in range(n):
        prompt = "".join(rng.choice(letters, int(rng.integers(150, 400))))
        choices = tuple("".join(rng.choice(letters[:26], int(rng.integers(2, 12))))
                        for _ in range(4))
        out.append(Example(prompt, choices, (int(rng.integers(4)),), "bench", "", str(i)))
    return out


def routed_world(cfg: gj.T5Config, experts: int):
    from goose_jax.core.trees import nest_sites
    from goose_jax.routing.methods import build_routed

    rng = np.random.default_rng(1)
    tree, gates = {}, {}
    for site, (d_in, d_out) in gj.site_shapes(cfg).items():
        tree[site] = {"lora_a": 0.05 * rng.standard_normal((experts, d_in, 8), np.float32),
                      "lora_b": 0.05 * rng.standard_normal((experts, 8, d_out), np.float32)}
        gates[site] = {"gate": rng.standard_normal((experts, d_in), np.float32)}
    return build_routed("phatgoose", cfg, nest_sites(tree), gates=nest_sites(gates), top_k=2,
                        scale=1 / 8)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--method", choices=("base", "phatgoose"), default="base")
    ap.add_argument("--experts", type=int, default=8)
    args = ap.parse_args()
    print_calibration()

    tok = ByteTokenizer()
    cfg = gj.T5Config(vocab_size=384, d_model=128, d_kv=32, num_heads=4, d_ff=256,
                      num_encoder_layers=4, num_decoder_layers=4,
                      feed_forward_proj="gated-gelu", tie_word_embeddings=False)
    params = gj.init_params(cfg, 0)
    routed = routed_world(cfg, args.experts) if args.method == "phatgoose" else None
    examples = make_examples(args.examples, np.random.default_rng(0))
    enc_tokens = np.mean([len(tok.encode(e.input)) for e in examples])
    ch_tokens = np.mean([len(tok.encode(c)) for e in examples for c in e.choices])
    print(f"model: d_model {cfg.d_model}, {cfg.num_encoder_layers}+{cfg.num_decoder_layers} "
          f"blocks, method {args.method}; {args.examples} examples x 4 choices, mean prompt "
          f"{enc_tokens:.0f} tokens, mean choice {ch_tokens:.1f} tokens, batch {args.batch_size}")

    scorers = {name: ev.Evaluator(cfg, params, tok, routed, batch_size=args.batch_size,
                                  encoder_once=(name == "encoder-once"))
               for name in ("encoder-once", "naive")}
    results = {}
    for name, s in scorers.items():
        t0 = time.perf_counter()
        results[name] = s.score_choices(examples)
        print(f"{name}: warm-up (compile) {time.perf_counter() - t0:.1f}s, "
              f"{len(s.compiled_shapes)} shapes")
    diff = max(float(np.max(np.abs(a - b))) for a, b in zip(*results.values()))
    print(f"max |score difference| between the two: {diff:.2e}")
    times: dict[str, list[float]] = {name: [] for name in scorers}
    for _ in range(args.repeats):
        for name, s in scorers.items():
            t0 = time.perf_counter()
            s.score_choices(examples)
            times[name].append(time.perf_counter() - t0)
    rates = {name: args.examples / statistics.median(t) for name, t in times.items()}
    for name, rate in rates.items():
        print(f"{name}: {rate:.1f} examples/s (median of {args.repeats})")
    print(f"encoder-once / naive examples/s: {rates['encoder-once'] / rates['naive']:.2f}")


if __name__ == "__main__":
    main()
