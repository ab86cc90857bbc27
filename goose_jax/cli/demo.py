"""`make demo` / `goose-demo`.

The miniature world (experts, gates, every routing method, tables and heatmaps) is not built
yet. Until it is, this command is a smoke run, and says so: a tiny random T5 with the byte-level
tokenizer, a teacher-forced forward and cached greedy generation, with timings.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

import goose_jax as gj
from goose_jax.data.tokenizers import ByteTokenizer


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="goose-demo", description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    args = ap.parse_args(argv)

    print("goose-demo: SMOKE RUN ONLY. The miniature PHATGOOSE world is not built yet; this run\n"
          "checks that the model, tokenizer and jitted generation work on this machine, using a\n"
          "tiny RANDOM (untrained) T5, so the generated text is noise by design.\n")
    t_start = time.perf_counter()
    tok = ByteTokenizer()
    cfg = gj.T5Config.preset("tiny").replace(vocab_size=tok.vocab_size, d_model=64, d_kv=16,
                                             num_heads=4, d_ff=128)
    params = gj.init_params(cfg, args.seed)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params))
    print(f"model: T5 v1.1-style, d_model {cfg.d_model}, {cfg.num_encoder_layers}+"
          f"{cfg.num_decoder_layers} blocks, {len(gj.site_shapes(cfg))} adapter sites, "
          f"{n_params:,} parameters, devices: {jax.devices()}")

    texts = ["reverse: goose", "upper: phatgoose routes tokens", "copy: hello world"]
    ids, mask = tok.encode_batch(texts, max_length=32)
    dec = np.concatenate([np.zeros((len(texts), 1), np.int32), ids[:, :-1]], axis=1)

    t0 = time.perf_counter()
    logits = gj.t5_logits(cfg, params, ids, dec, mask).block_until_ready()
    t1 = time.perf_counter()
    gj.t5_logits(cfg, params, ids, dec, mask).block_until_ready()
    t2 = time.perf_counter()
    print(f"forward: logits {logits.shape} {logits.dtype}; first call (compile) {t1 - t0:.2f}s, "
          f"second {1e3 * (t2 - t1):.1f} ms; finite: {bool(np.isfinite(np.asarray(logits)).all())}")

    t0 = time.perf_counter()
    out = gj.generate_greedy(cfg, params, ids, args.max_new_tokens, mask)
    out = np.asarray(out)
    t1 = time.perf_counter()
    print(f"greedy generation of {args.max_new_tokens} tokens (compile included): {t1 - t0:.2f}s")
    for text, row in zip(texts, out):
        print(f"  {text!r:36s} -> {tok.decode(row.tolist())!r}")
    print(f"\nsmoke run finished in {time.perf_counter() - t_start:.1f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
