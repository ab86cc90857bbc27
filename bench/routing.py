"""Whole-model cost of PHATGOOSE routing: routed T5 forward time / base T5 forward time.

T5 v1.1-base sizes (216 sites, all routed), top-2, float32, teacher-forced forward of a batch of
B examples with L encoder and T decoder tokens, for several library sizes E and combination
backends, all in one process, base and routed runs interleaved.

To fit E = 1000 in memory, every site of one shape shares one stacked (E, I, R) / (E, R, O)
buffer and one router matrix. The arithmetic, memory traffic and shapes of each site are exactly
those of separate experts: each site's arrays enter the compiled program as parameters of their
own, so nothing is computed once for two (the compiled program has one top-k and one combine
loop per site).

    python bench/routing.py                                  # E = 36, 166, 1000; dense, grouped
    python bench/routing.py --experts 166 --backends grouped --repeats 3

The last line is the E = 166 ratio of the fastest backend. Results: bench/README.md.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from calibrate import print_calibration

import goose_jax as gj
from goose_jax.experts import lora as ex
from goose_jax.routing.methods import build_routed


def shared_library(cfg: gj.T5Config, E: int, R: int, seed: int = 0):
    """A library whose sites of equal shape share their stacked arrays (see module doc)."""
    rng = np.random.default_rng(seed)
    by_shape = {}
    experts, gates = {}, {}
    for name, (d_in, d_out) in gj.site_shapes(cfg).items():
        if (d_in, d_out) not in by_shape:
            by_shape[(d_in, d_out)] = (
                jnp.asarray(rng.normal(0, 0.02, (E, d_in, R)), jnp.float32),
                jnp.asarray(rng.normal(0, 0.02, (E, R, d_out)), jnp.float32),
                jnp.asarray(rng.normal(0, 1.0, (E, d_in)), jnp.float32),
            )
        a, b, g = by_shape[(d_in, d_out)]
        experts[name] = {"lora_a": a, "lora_b": b}
        gates[name] = {"gate": g}
    return ex.nest_sites(experts), ex.nest_sites(gates)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="t5-v1_1-base")
    ap.add_argument("--experts", type=int, nargs="+", default=[36, 166, 1000])
    ap.add_argument("--backends", nargs="+", default=["dense", "grouped"],
                    help="any of dense, gather, grouped, ragged, auto")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--enc-len", type=int, default=256)
    ap.add_argument("--dec-len", type=int, default=256)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    print_calibration()

    cfg = gj.T5Config.preset(args.preset)
    params = gj.init_params(cfg, 0)
    rng = np.random.default_rng(0)
    B, L, T = args.batch, args.enc_len, args.dec_len
    ids = jnp.asarray(rng.integers(2, cfg.vocab_size, (B, L)), jnp.int32)
    dec = jnp.asarray(rng.integers(2, cfg.vocab_size, (B, T)), jnp.int32)
    mask = jnp.ones((B, L), jnp.int32)
    print(f"{args.preset}: {len(gj.site_shapes(cfg))} routed sites, batch {B}, encoder {L}, "
          f"decoder {T} tokens, rank {args.rank}, top-{args.top_k}, fp32, "
          f"jax {jax.__version__} on {jax.default_backend()}")

    def run(routed):
        gj.t5_logits(cfg, params, ids, dec, mask, routing=routed).block_until_ready()

    run(None)
    results = {}
    for E in args.experts:
        lib, gates = shared_library(cfg, E, args.rank)
        for backend in args.backends:
            routed = build_routed("phatgoose", cfg, lib, gates=gates, top_k=args.top_k,
                                  scale=1 / args.rank, backend=backend)
            t0 = time.perf_counter()
            run(routed)
            compile_s = time.perf_counter() - t0
            base_t, routed_t = [], []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                run(None)
                base_t.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                run(routed)
                routed_t.append(time.perf_counter() - t0)
            mb, mr = statistics.median(base_t), statistics.median(routed_t)
            results[(E, backend)] = mr / mb
            print(f"E={E:5d} {backend:8s} base {mb:7.2f}s routed {mr:7.2f}s "
                  f"ratio {mr / mb:6.2f}  (first call {compile_s:.1f}s)", flush=True)
    key_e = 166 if any(e == 166 for e, _ in results) else args.experts[-1]
    best = min((r, b) for (e, b), r in results.items() if e == key_e)
    print(f"E={key_e} fastest backend {best[1]}: routed/base forward time {best[0]:.2f}")


if __name__ == "__main__":
    main()
