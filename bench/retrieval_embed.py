"""Retrieval query embedding: goose-jax's JAX all-MiniLM-L6-v2 against sentence-transformers.

One process, the packaged model, ``--sentences`` retrieval queries (``format_query``) with
P3-like lengths (10 to 200 words, so a few to 256 word pieces). Both embedders get the same texts
and batch size; compilation is excluded (one warm-up pass each); timed passes alternate so
machine noise hits both alike. Needs sentence-transformers (the test extra). The last line is
the sentences/s ratio, JAX over sentence-transformers.

    python bench/retrieval_embed.py --sentences 1000 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
from calibrate import print_calibration

from goose_jax.routing import retrieval as rt


def make_queries(n: int, rng: np.random.Generator) -> list[str]:
    words = "the a goose routes every token among many experts which answer is right".split()
    out = []
    for _ in range(n):
        text = " ".join(rng.choice(words, int(rng.integers(10, 200))))
        choices = None if rng.random() < 0.3 else ["yes", "no", "maybe"][:int(rng.integers(2, 4))]
        out.append(rt.format_query(text, choices))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sentences", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    from goose_jax.core.hf_code import sentence_transformer

    print_calibration(torch_too=True)

    texts = make_queries(args.sentences, np.random.default_rng(0))
    ours = rt.SentenceEmbedder.load()
    theirs = sentence_transformer(ours.path, device="cpu")
    runs = {"jax": lambda: ours.encode(texts, batch_size=args.batch_size, progress=False),
            "sentence-transformers": lambda: theirs.encode(texts, batch_size=args.batch_size)}
    outputs = {name: fn() for name, fn in runs.items()}   # warm-up (compiles)
    diff = float(np.abs(outputs["jax"] - outputs["sentence-transformers"]).max())
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    rate = {name: len(texts) / statistics.median(t) for name, t in times.items()}
    for name, r in rate.items():
        print(f"{name:>22}: {r:8.1f} sentences/s (median of {args.repeats})")
    print(f"max |difference| {diff:.2e}")
    print(f"ratio jax / sentence-transformers: {rate['jax'] / rate['sentence-transformers']:.2f}")


if __name__ == "__main__":
    main()
