"""Where the TPU roofline of a routed site goes: the combination backends' pieces, as the TPU
compiler's cost analysis charges them, beside the bytes each piece must move.

``bench/pod_plan.py --ratios`` estimates routed / base from XLA's cost analysis of whole
programs. This compiles one T5-XL feed-forward-sized site (I = O = 2048, rank 16, top-2, bf16)
for one v5e chip (the TPU compiler via libtpu; no TPU needed), over N tokens (default: one
rank-classification batch, 64 x (256 + 4 x 8)), and prints per piece

- the compiler's FLOPs and bytes accessed, and the roofline time they give on a v5e;
- the bytes the piece must move at the least (each operand it reads and the result it writes,
  once), and the roofline time of those.

The pieces are the base matmul, the ``ragged`` backend whole and its five steps (the gather of
the sorted token rows, the two ``ragged_dot`` calls, the inverse gather and the sum over k), and
the ``dense`` backend (every expert's shrink; no data-dependent movement). The ``grouped``
backend is left out: its scan over row blocks is counted once by the cost analysis, so its
figures say nothing.

    python bench/tpu_routing_cost.py                     # E = 36, 166, 1000
    python bench/tpu_routing_cost.py --experts 166 --tokens 4096
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the TPU is a compile target, not a device
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from calibrate import print_calibration  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec  # noqa: E402

from goose_jax.pipeline import plan as P  # noqa: E402
from goose_jax.routing import backends  # noqa: E402

I = O = 2048  # noqa: E741 (the package's shape legend)
R, K = 16, 2
BF16, F32, I32 = 2, 4, 4


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--experts", type=int, nargs="+", default=[36, 166, 1000])
    p.add_argument("--tokens", type=int, default=64 * (256 + 4 * 8),
                   help="tokens N at the site (default: one rank-classification batch)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    print_calibration()
    if not P.libtpu_available():
        print(f"needs the TPU compiler: {P.INSTALL}")
        return 2
    chip = P.CHIPS["v5e"]
    device = P.tpu_devices(P.parse_topology("v5e-4"))[0]
    where = NamedSharding(Mesh(np.array([device]), ("x",)), PartitionSpec())

    def spec(shape, dtype=jnp.bfloat16):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=where)

    def line(name, fn, args, least):
        cost = jax.jit(fn).lower(*args).compile().cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        flops, nbytes = float(cost.get("flops", 0)), float(cost.get("bytes accessed", 0))
        est = P.roofline(flops, nbytes, chip) * 1e3
        low = P.roofline(flops, least, chip) * 1e3
        print(f"| {name} | {flops / 1e9:.2f} | {nbytes / 1e6:.0f} | {est:.3f} | "
              f"{least / 1e6:.0f} | {low:.3f} | {nbytes / least:.1f} |", flush=True)
        return est, low

    N = args.tokens
    A = N * K
    print(f"one site, I = O = {I}, rank {R}, top-{K}, bf16, N = {N} tokens, one v5e chip "
          f"({chip.bf16_tflops:g} TFLOP/s, {chip.hbm_gbps:g} GB/s); MB = 1e6 bytes")
    print("| piece | GFLOP | compiler MB | compiler est. ms | least MB | least est. ms | "
          "compiler / least bytes |")
    print("|---|---|---|---|---|---|---|")
    base = line("base matmul", lambda x, w: x @ w, (spec((N, I)), spec((I, O))),
                (N * I + I * O + N * O) * BF16)
    summary = []
    for E in args.experts:
        lib = (spec((N, I)), spec((E, I, R)), spec((E, R, O)), spec((N, K), jnp.float32),
               spec((N, K), jnp.int32))
        touched = min(E, A)  # experts whose factors the step must read
        steps = [
            ("gather sorted rows", lambda x, i: x[i], (spec((N, I)), spec((A,), jnp.int32)),
             N * I * BF16 + A * I32 + A * I * BF16),
            ("ragged_dot shrink", lambda x, a, g: jax.lax.ragged_dot(
                x, a, g, preferred_element_type=jnp.float32),
             (spec((A, I)), spec((E, I, R)), spec((E,), jnp.int32)),
             A * I * BF16 + touched * I * R * BF16 + A * R * F32),
            ("ragged_dot expand", lambda h, b, g: jax.lax.ragged_dot(
                h, b, g, preferred_element_type=jnp.float32),
             (spec((A, R), jnp.float32), spec((E, R, O), jnp.float32), spec((E,), jnp.int32)),
             A * R * F32 + touched * R * O * F32 + A * O * F32),
            ("inverse gather", lambda y, i: y[i], (spec((A, O), jnp.float32),
                                                   spec((A,), jnp.int32)),
             2 * A * O * F32 + A * I32),
            ("sum over k", lambda y: y.reshape(N, K, O).sum(1).astype(jnp.bfloat16),
             (spec((A, O), jnp.float32),), A * O * F32 + N * O * BF16),
        ]
        parts = [line(f"E={E}: {name}", fn, a, least) for name, fn, a, least in steps]
        whole = line(f"E={E}: ragged, whole", lambda x, a, b, w, i: backends.combine_ragged(
            x, a, b, w, i, 1.0 / R), lib, sum(s[3] for s in steps))
        dense = line(f"E={E}: dense, whole", lambda x, a, b, w, i: backends.combine_dense(
            x, a, b, w, i, 1.0 / R), lib, (N * I + E * I * R + E * R * O + N * O) * BF16)
        summary.append((E, whole, dense, sum(p[1] for p in parts)))
    print("\nper routed site, (base + routing) / base, on the roofline:")
    print("| E | ragged, compiler bytes | ragged, least bytes | dense, compiler |")
    print("|---|---|---|---|")
    for E, whole, dense, least in summary:
        print(f"| {E} | {1 + whole[0] / base[0]:.2f} | {1 + least / base[0]:.2f} | "
              f"{1 + dense[0] / base[0]:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
