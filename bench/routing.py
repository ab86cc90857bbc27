"""Whole-model cost of PHATGOOSE routing: routed T5 forward time / base T5 forward time.

T5 v1.1-base sizes (216 sites, all routed), top-2, float32, teacher-forced forward of a batch of
B examples with L encoder and T decoder tokens, for several library sizes E and routers, all in
one process, base and routed runs interleaved. Routers: exact top-k with a combination backend
(``dense``, ``grouped``, ...), and ``two_level`` (``goose_jax.routing.two_level``: C clusters per
site, n_probe kept per token, combined with ``grouped``), for each ``--n-probe``.

To fit E = 10,000 in memory, every site of one shape shares one stacked (E, I, R) / (E, R, O)
buffer, and every site of one input width one router (gate matrix, or centroids, member table
and padded member vectors). The arithmetic, memory traffic and shapes of each site are exactly
those of separate experts: each site's arrays enter the compiled program as parameters of their
own, so nothing is computed once for two (the compiled program has one router and one combine
loop per site).

Gates. Without ``--gates-from`` the gates are random normal (cost only: recall on them means
nothing). With ``--gates-from LIBRARY`` (a trained library, e.g. the demo's) the gates of E
experts are grown from its trained gates, and recall is measured:

  seeds     every trained gate vector of the library, grouped by input width w (the demo's:
            64 sites x 8 experts = 512 at w = 128, 8 x 8 = 64 at w = 256);
  ocean     expert e of E: seed (e mod S), moved toward a uniformly drawn other seed by
            u ~ U(0, 0.3), plus Gaussian noise of 0.15 times the seeds' spread: every seed
            grows a cloud of E / S experts, the seeds' own geometry kept;
  width     lifted to the bench site's width I (768 from w = 128, 2048 from w = 256) by a fixed
            random isometry Q (w x I, orthonormal rows): g -> g Q keeps every inner product;
  tokens    recall is measured on real site inputs: the library's base (the demo's world base)
            run on prompts of every world task, the inputs of every site of width w, lifted by
            the same Q, up to --recall-tokens of them per width.

Recall per width: the share of tokens whose two-level expert set and weights equal exact
routing's (weights within 1e-5), and the mean exact weight mass recovered
(``routing.two_level.route_recall``); the lower of the widths is printed.

    python bench/routing.py                                  # E = 36, 166, 1000; dense, grouped
    python bench/routing.py --experts 1000 10000 --backends grouped two_level \
        --n-probe 2 4 8 --gates-from demo_out/library_small_seed0
    python bench/routing.py --experts 1000 --clusters 100 --backends two_level \
        --n-probe 2 4 8 16 32 --gates-from demo_out/library_small_seed0 --recall-only

The last line is the E = 166 (or the largest E) ratio of the fastest router. Results:
bench/README.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from calibrate import print_calibration

import goose_jax as gj
from goose_jax.core.trees import flatten_sites, nest_sites
from goose_jax.data import world
from goose_jax.experts import lora as ex
from goose_jax.experts.lora import EXPERTS
from goose_jax.library.store import ExpertLibrary
from goose_jax.models import families
from goose_jax.models.base import load_base
from goose_jax.pipeline.demo import ASSET
from goose_jax.routing import formula as routing
from goose_jax.routing import two_level as tl
from goose_jax.routing.methods import ROUTER, Routed, RoutedAdapter

ATOL = 1e-5   # weights equal within this (float32 summation order)


def shared_library(cfg: gj.T5Config, E: int, R: int, seed: int = 0, gates_by_width=None):
    """A library whose sites of equal shape share their stacked arrays (see module doc);
    ``gates_by_width``: the (E, I) gates of each input width (default: random normal)."""
    rng = np.random.default_rng(seed)
    by_shape = {}
    experts, gates = {}, {}
    for name, (d_in, d_out) in gj.site_shapes(cfg).items():
        if (d_in, d_out) not in by_shape:
            g = (gates_by_width[d_in] if gates_by_width is not None
                 else rng.normal(0, 1.0, (E, d_in)))
            by_shape[(d_in, d_out)] = (
                jnp.asarray(rng.normal(0, 0.02, (E, d_in, R)), jnp.float32),
                jnp.asarray(rng.normal(0, 0.02, (E, R, d_out)), jnp.float32),
                jnp.asarray(g, jnp.float32),
            )
        a, b, g = by_shape[(d_in, d_out)]
        experts[name] = {"lora_a": a, "lora_b": b}
        gates[name] = {"gate": g}
    return ex.nest_sites(experts), ex.nest_sites(gates)


# --- gates and tokens grown from a trained library (module doc) -------------------------------


@dataclasses.dataclass(frozen=True)
class _Capture:
    """Site adapter that records each site's input and the mask of the tokens it reads."""

    def __call__(self, module, x, y):
        if module.has_variable("capture", "mask"):
            module.sow("intermediates", "x", x)
            module.sow("intermediates", "mask", module.get_variable("capture", "mask"))
        return y


def trained_seeds(path: str):
    """The library's trained gates grouped by input width, and its base model's real site
    inputs (on prompts of every world task) grouped the same way."""
    lib = ExpertLibrary.open(path)
    _, gates = lib.load(gates=True)
    seeds = {}
    for site, (d_in, _) in lib.sites.items():
        seeds.setdefault(d_in, []).append(np.asarray(flatten_sites(gates)[site]["gate"]))
    seeds = {w: np.concatenate(v) for w, v in seeds.items()}
    cfg, params = load_base(world_base_path())
    tok = world.WorldTokenizer()
    texts, targets = [], []
    for task in world.HELDIN + world.HELDOUT:
        for i in range(12):
            e = world.make_example(task.name, "test", i)
            texts.append(e.input)
            targets.append(e.choices[e.answers[0]] if e.choices else e.references[0])
    ids, mask = tok.encode_batch(texts, 64)
    tgt, tmask = tok.encode_batch(targets, 8)
    dec = np.concatenate([np.zeros((len(tgt), 1), tgt.dtype), tgt[:, :-1]], axis=1)
    forward, _ = families.of(cfg).masked_forward(cfg, _Capture(), tuple(lib.sites), "capture")
    _, state = jax.jit(forward)({"params": params}, jnp.asarray(ids), jnp.asarray(mask),
                                jnp.asarray(dec), jnp.asarray(tmask))
    tokens = {}
    for leaf in flatten_sites(state["intermediates"]).values():
        x, m = np.asarray(leaf["x"][0]), np.asarray(leaf["mask"][0]).astype(bool)
        tokens.setdefault(x.shape[-1], []).append(x[m])
    return seeds, {w: np.concatenate(v) for w, v in tokens.items()}


def world_base_path() -> str:
    return ASSET


def lift(width: int, target: int, seed: int) -> np.ndarray:
    """A fixed random isometry (width x target, orthonormal rows)."""
    if target < width:
        raise SystemExit(f"cannot lift trained gates of width {width} to a site of width "
                         f"{target}: pick a larger --preset")
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((target, width)))
    return q.T.astype(np.float32)


def ocean_gates(seeds_Sw: np.ndarray, E: int, rng) -> np.ndarray:
    """E gates grown from S trained ones (module doc)."""
    S = len(seeds_Sw)
    parent = np.arange(E) % S
    other = rng.integers(0, S, E)
    u = rng.uniform(0, 0.3, (E, 1))
    noise = rng.standard_normal((E, seeds_Sw.shape[1])) * seeds_Sw.std() * 0.15
    return (seeds_Sw[parent] + u * (seeds_Sw[other] - seeds_Sw[parent]) + noise).astype(
        np.float32)


# --- routers sharing one buffer per input width ------------------------------------------------


def routed_shared(cfg, lib, gates_by_width, adapter, entries_by_width) -> Routed:
    """A ``Routed`` whose router entries are shared by the sites of one input width."""
    router = {name: entries_by_width[d_in] for name, (d_in, _) in gj.site_shapes(cfg).items()}
    return Routed("phatgoose", adapter, {EXPERTS: lib, ROUTER: nest_sites(router)})


def site_ratio(args, entries, gn, n_probe: int) -> dict[int, float]:
    """Per input width I: median over repeats of (routed site time / base matmul time) for one
    site I -> I of N = batch * (enc + dec) tokens: exact routing (``entries`` None) or two-level,
    each with the grouped combine; calls interleaved."""
    out = {}
    rng = np.random.default_rng(1)
    N, k, R = args.batch * (args.enc_len + args.dec_len), args.top_k, args.rank
    for I, gn_EI in gn.items():
        E = gn_EI.shape[0]
        x = jnp.asarray(rng.standard_normal((N, I)), jnp.float32)
        w = jnp.asarray(rng.standard_normal((I, I)) / np.sqrt(I), jnp.float32)
        a = jnp.asarray(rng.normal(0, 0.02, (E, I, R)), jnp.float32)
        b = jnp.asarray(rng.normal(0, 0.02, (E, R, I)), jnp.float32)
        base = jax.jit(lambda x, w: x @ w)
        if entries is None:
            def route(x, e=gn_EI):
                return routing.phatgoose_route(x, e, k, gates_normed=True)
        else:
            t, c, m = entries[I]["table"], entries[I]["centroids"], entries[I]["members"]

            def route(x, t=t, c=c, m=m):
                return tl.two_level_route(x, t, c, m, k, n_probe)

        @jax.jit
        def site(x, w, a, b, route=route):
            weights, index = route(x)
            return x @ w + routing.combine_lora(x, a, b, weights, index, 1 / R,
                                                backend="grouped")

        jax.block_until_ready((base(x, w), site(x, w, a, b)))
        ratios = []
        for _ in range(max(args.repeats, 3)):
            t0 = time.perf_counter()
            jax.block_until_ready(base(x, w))
            tb = time.perf_counter() - t0
            t0 = time.perf_counter()
            jax.block_until_ready(site(x, w, a, b))
            ratios.append((time.perf_counter() - t0) / tb)
        out[I] = statistics.median(ratios)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="t5-v1_1-base")
    ap.add_argument("--experts", type=int, nargs="+", default=[36, 166, 1000])
    ap.add_argument("--backends", nargs="+", default=["dense", "grouped"],
                    help="any of dense, gather, grouped, ragged, auto (exact routing), and "
                         "two_level")
    ap.add_argument("--n-probe", type=int, nargs="+", default=[4, 8],
                    help="clusters kept per token, for two_level")
    ap.add_argument("--clusters", type=int, nargs="+", default=None,
                    help="clusters per site for two_level, one per --experts value (default: "
                         "round(sqrt(E)))")
    ap.add_argument("--gates-from", default=None,
                    help="a trained library to grow the gates from and measure recall on "
                         "(module doc); default: random gates, no recall")
    ap.add_argument("--recall-tokens", type=int, default=4096)
    ap.add_argument("--site-only", action="store_true",
                    help="time one routed site per input width (router + grouped combine over "
                         "the site's base matmul, batch * (enc + dec) tokens) instead of the "
                         "whole model: compiles in seconds")
    ap.add_argument("--recall-only", action="store_true",
                    help="print two_level's clusters and recall, no timing (needs --gates-from)")
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
    widths = sorted({d_in for d_in, _ in gj.site_shapes(cfg).values()})
    print(f"{args.preset}: {len(gj.site_shapes(cfg))} routed sites, batch {B}, encoder {L}, "
          f"decoder {T} tokens, rank {args.rank}, top-{args.top_k}, fp32, "
          f"jax {jax.__version__} on {jax.default_backend()}")
    seeds = tokens = lifts = None
    if args.gates_from:
        seeds, tokens = trained_seeds(args.gates_from)
        source = sorted(seeds)
        # Feed-forward output sites (input width d_ff) grow from the library's widest trained
        # gates (its own d_ff), the other sites from its narrowest (its d_model).
        pick = {I: source[-1] if I >= cfg.d_ff else source[0] for I in widths}
        lifts = {I: lift(pick[I], I, seed=I) for I in widths}
        for I in widths:
            w = pick[I]
            print(f"gates of width {I}: grown from {len(seeds[w])} trained gates of width {w} "
                  f"({args.gates_from}); recall on "
                  f"{min(len(tokens[w]), args.recall_tokens)} real site inputs of width {w}, "
                  "lifted")
    else:
        print("gates: random normal (cost only; pass --gates-from LIBRARY for recall)")

    if args.site_only:
        args.recall_only = True   # no whole-model runs; the site timing is printed instead
    if args.recall_only and seeds is None:
        raise SystemExit("--recall-only needs --gates-from")

    def run(routed):
        gj.t5_logits(cfg, params, ids, dec, mask, routing=routed).block_until_ready()

    def timed(routed):
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
        return statistics.median(base_t), statistics.median(routed_t), compile_s

    if not args.recall_only:
        run(None)
    results = {}
    k = args.top_k
    scale = 1 / args.rank
    if args.clusters and len(args.clusters) != len(args.experts):
        raise SystemExit("--clusters takes one value per --experts value")
    for e_index, E in enumerate(args.experts):
        grown = None
        if seeds is not None:
            g_rng = np.random.default_rng(E)
            grown = {I: ocean_gates(seeds[pick[I]], E, g_rng) @ lifts[I] for I in widths}
        if args.recall_only:   # no LoRA weights needed
            lib = gates = None
            gn = {I: routing.prepare_router(jnp.asarray(grown[I])) for I in widths}
        else:
            lib, gates = shared_library(cfg, E, args.rank, gates_by_width=grown)
            gn = {I: routing.prepare_router(flatten_sites(gates)[name]["gate"])
                  for name, (I, _) in gj.site_shapes(cfg).items()}
        exact_entries = {I: {"vectors": v} for I, v in gn.items()}
        x_tok = exact_route = None
        if tokens is not None:
            x_tok = {I: jnp.asarray(tokens[pick[I]][:args.recall_tokens] @ lifts[I])
                     for I in widths}
            exact_route = {I: routing.phatgoose_route(x_tok[I], gn[I], k, gates_normed=True)
                           for I in widths}
        for backend in args.backends:
            if backend != "two_level" and args.recall_only:
                continue
            if backend != "two_level":
                adapter = RoutedAdapter(scale, k, "standardized", backend)
                mb, mr, compile_s = timed(routed_shared(cfg, lib, gates, adapter, exact_entries))
                results[(E, backend)] = mr / mb
                print(f"E={E:5d} {'exact ' + backend:22s} base {mb:7.2f}s routed {mr:7.2f}s "
                      f"ratio {mr / mb:6.2f}  recall 1.0000 mass 1.0000  "
                      f"(first call {compile_s:.1f}s)", flush=True)
                continue
            C = args.clusters[e_index] if args.clusters else tl.default_clusters(E)
            t0 = time.perf_counter()
            clusters = {I: tl.cluster_vectors(gn[I], C) for I in widths}
            build_s = time.perf_counter() - t0
            biggest = max(m.shape[1] for _, m in clusters.values())
            print(f"E={E:5d} two_level: {C} clusters per width, largest {biggest} members "
                  f"(balance {tl.DEFAULT_BALANCE}), k-means of {len(widths)} widths "
                  f"{build_s:.1f}s", flush=True)
            for n_probe in args.n_probe:
                entries = {I: {"centroids": jnp.asarray(c), "members": jnp.asarray(m),
                               "table": tl.member_vectors(gn[I], m)}
                           for I, (c, m) in clusters.items()}
                recall = mass = float("nan")
                if exact_route is not None:
                    pairs = [tl.route_recall(*exact_route[I], *tl.two_level_route(
                        x_tok[I], entries[I]["table"], entries[I]["centroids"],
                        entries[I]["members"], k, n_probe), atol=ATOL) for I in widths]
                    recall, mass = min(p[0] for p in pairs), min(p[1] for p in pairs)
                name = f"two_level C={C} p={n_probe}"
                if args.site_only:
                    ratio = site_ratio(args, entries, gn, n_probe)
                    exact = site_ratio(args, None, gn, 0)
                    print(f"E={E:5d} {name:22s} site/base by width "
                          + " ".join(f"{I}: exact {exact[I]:5.2f} two-level {ratio[I]:5.2f}"
                                     for I in widths)
                          + f"  recall {recall:.4f} mass {mass:.4f}", flush=True)
                    continue
                if args.recall_only:
                    rows = C + n_probe * biggest
                    print(f"E={E:5d} {name:22s} scores per token {rows:6d} ({rows / E:5.1%} of E)"
                          f"  recall {recall:.4f} mass {mass:.4f}", flush=True)
                    continue
                adapter = RoutedAdapter(scale, k, "standardized", "grouped", n_probe=n_probe)
                mb, mr, compile_s = timed(routed_shared(cfg, lib, gates, adapter, entries))
                results[(E, name)] = mr / mb
                print(f"E={E:5d} {name:22s} base {mb:7.2f}s routed {mr:7.2f}s "
                      f"ratio {mr / mb:6.2f}  recall {recall:.4f} mass {mass:.4f}  "
                      f"(first call {compile_s:.1f}s)", flush=True)
    if not results:
        return
    key_e = 166 if any(e == 166 for e, _ in results) else args.experts[-1]
    best = min((r, b) for (e, b), r in results.items() if e == key_e)
    print(f"E={key_e} fastest router {best[1]}: routed/base forward time {best[0]:.2f}")


if __name__ == "__main__":
    main()
