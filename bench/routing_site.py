"""One routed LoRA site: each combine backend's time over the site's base matmul, one process.

A site is a frozen linear layer ``x @ W`` (I x O) with E LoRA experts of rank R; every token goes
to its top-k experts (PHATGOOSE routing on random gates). For each E the script times, jitted and
after warm-up:

    base      x @ W, the layer the experts are added to (the denominator)
    route     PHATGOOSE scores + top-k + softmax
    <backend> combine_lora with that backend (routing precomputed)
    site      base + route + combine with backend="auto": the whole routed layer

Calls alternate (base, then each candidate, repeat) so machine noise hits all alike, and each
ratio is the median over repeats of candidate time / base time of the same repeat. Every backend's
output is checked against the dense one. The last line printed is the fastest backend's combine
ratio at E = 166 (or the largest E asked for).

    python bench/routing_site.py                          # N=2048, E in (36, 166)
    python bench/routing_site.py --tokens 64 --experts 8 166 --repeats 5
    python bench/routing_site.py --backends dense grouped  # skip the slow ones

Shapes follow the package legend (the ``goose_jax`` module docstring): N tokens, I and O the
site's input and output widths. Results: bench/README.md.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from calibrate import print_calibration

from goose_jax.routing import formula as routing
from goose_jax.routing.backends import BACKENDS


def _timed(fn) -> float:
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - t0


def interleaved_ratios(base, candidates: dict, repeats: int, warmup: int = 2):
    """Median base time and, per candidate, the median of (its time / base time) per repeat."""
    for _ in range(warmup):
        _timed(base)
        for fn in candidates.values():
            _timed(fn)
    base_times, ratios, times = [], {name: [] for name in candidates}, {n: [] for n in candidates}
    for _ in range(repeats):
        t_base = _timed(base)
        base_times.append(t_base)
        for name, fn in candidates.items():
            t = _timed(fn)
            times[name].append(t)
            ratios[name].append(t / t_base)
    return (statistics.median(base_times),
            {n: statistics.median(v) for n, v in times.items()},
            {n: statistics.median(v) for n, v in ratios.items()})


def make_site(seed: int, tokens: int, d_in: int, d_out: int, experts: int, rank: int):
    rng = np.random.default_rng(seed)
    x_NI = jnp.asarray(rng.standard_normal((tokens, d_in), np.float32))
    w_IO = jnp.asarray(rng.standard_normal((d_in, d_out), np.float32) / np.sqrt(d_in))
    gates_EI = jnp.asarray(0.01 * rng.standard_normal((experts, d_in), np.float32))
    lora_a_EIR = jnp.asarray(rng.standard_normal((experts, d_in, rank), np.float32) * 0.01)
    lora_b_ERO = jnp.asarray(rng.standard_normal((experts, rank, d_out), np.float32) * 0.01)
    return x_NI, w_IO, gates_EI, lora_a_EIR, lora_b_ERO


def bench_experts(args, experts: int) -> dict[str, float]:
    x_NI, w_IO, gates_EI, lora_a_EIR, lora_b_ERO = make_site(
        experts, args.tokens, args.d_in, args.d_out, experts, args.rank)
    gn_EI = routing.prepare_router(gates_EI)
    scale = 1.0 / args.rank
    k = args.top_k

    base = jax.jit(lambda x, w: x @ w)
    route = jax.jit(functools.partial(routing.phatgoose_route, top_k=k, gates_normed=True))

    @jax.jit
    def site(x, w, gn, a, b):
        weights, index = routing.phatgoose_route(x, gn, top_k=k, gates_normed=True)
        return x @ w + routing.combine_lora(x, a, b, weights, index, scale)

    weights_Nk, index_Nk = route(x_NI, gn_EI)
    candidates = {
        "route": functools.partial(route, x_NI, gn_EI),
        "site": functools.partial(site, x_NI, w_IO, gn_EI, lora_a_EIR, lora_b_ERO),
    }
    outputs = {}
    for name in args.backends:
        combine = jax.jit(functools.partial(routing.combine_lora, backend=name))
        call = functools.partial(combine, x_NI, lora_a_EIR, lora_b_ERO, weights_Nk, index_Nk, scale)
        outputs[name] = np.asarray(call())
        candidates[name] = call
    reference = outputs.get("dense", next(iter(outputs.values())))
    base_s, times, ratios = interleaved_ratios(
        functools.partial(base, x_NI, w_IO), candidates, args.repeats)

    auto = routing.choose_backend(args.tokens, k, experts)
    print(f"\nE={experts}  N={args.tokens} I={args.d_in} O={args.d_out} R={args.rank} k={k}  "
          f"base {base_s * 1e3:.2f} ms  auto -> {auto}")
    print(f"{'candidate':>10} {'ms':>9} {'x base':>8} {'max |err|':>10}")
    for name in candidates:
        err = np.abs(outputs[name] - reference).max() if name in outputs else float("nan")
        print(f"{name:>10} {times[name] * 1e3:9.2f} {ratios[name]:8.3f} {err:10.2e}")
    return {name: ratios[name] for name in args.backends}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--experts", type=int, nargs="+", default=[36, 166])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--d-in", type=int, default=768)
    ap.add_argument("--d-out", type=int, default=768)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=list(BACKENDS))
    args = ap.parse_args(argv)
    print_calibration()
    print(f"jax {jax.__version__} on {jax.default_backend()}, {jax.device_count()} device(s); "
          "ratios are medians of per-repeat (time / base matmul time)")
    results = {e: bench_experts(args, e) for e in args.experts}
    last = 166 if 166 in results else max(results)
    best = min(results[last], key=results[last].get)
    print(f"fastest combine backend at E={last}: {best} {results[last][best]:.3f}x base matmul")


if __name__ == "__main__":
    main()
