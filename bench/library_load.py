"""Loading an expert library with its sha256 verified (the default) against without.

A library of 16 experts of T5-base sizes (v1.1, rank 16, the default LoRA sites: about 27 MB
each in float32) is written once to a temporary directory; then ``ExpertLibrary.load`` of all
of it runs with ``verify=True`` and ``verify=False`` in turn (interleaved, files in the page
cache, medians of 3). Then the same load in bfloat16, on one host and straight into the
expert layout over every device (``load(mesh=)``, ``expert`` = the device count: run with
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` to see the split). The last line printed
is the cost of verifying, verified / unverified.

    python bench/library_load.py
    python bench/library_load.py --experts 16 --rank 16 --repeats 3
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import tempfile
import time

import jax
import numpy as np
from calibrate import print_calibration

import goose_jax as gj
from goose_jax.core.sharding import expert_shards, make_mesh
from goose_jax.experts.lora import LoRAConfig, init_experts
from goose_jax.library.store import ExpertLibrary


def write_library(path: str, experts: int, rank: int) -> ExpertLibrary:
    cfg = gj.T5Config.preset("t5-v1_1-base")
    lora = LoRAConfig(rank=rank)
    lib = ExpertLibrary.create(path, cfg, gj.init_params(cfg, 0), lora)
    for i in range(experts):
        one = jax.tree.map(np.asarray, init_experts(cfg, lora, 1, rng=i))
        one = jax.tree.map(lambda x: x + np.float32(1e-3), one)  # B is zero at init
        lib.add(f"expert{i:02d}", one)
    return lib


def sharded_figure(lib: ExpertLibrary, repeats: int) -> None:
    """bfloat16 loads: on one host, and into the layout over every device (medians)."""
    mesh = make_mesh(data=1, expert=jax.device_count())
    times = {"host": [], "sharded": []}
    for _ in range(repeats + 1):
        for way, kw in (("host", {}), ("sharded", {"mesh": mesh})):
            t0 = time.perf_counter()
            experts, _ = lib.load(dtype="bfloat16", **kw)
            jax.block_until_ready(experts)
            times[way].append(time.perf_counter() - t0)
    leaf = jax.tree.leaves(experts)[0]
    med = {w: statistics.median(t[1:]) for w, t in times.items()}
    print(f"bfloat16 load on one host: {med['host']:.3f} s; into the layout over "
          f"{jax.device_count()} devices (expert={expert_shards(mesh)}, E_pad "
          f"{leaf.shape[0]}, {leaf.addressable_shards[0].data.shape[0]} per device): "
          f"{med['sharded']:.3f} s ({med['sharded'] / med['host']:.2f}x)")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    print_calibration()
    with tempfile.TemporaryDirectory() as tmp:
        lib = write_library(os.path.join(tmp, "lib"), args.experts, args.rank)
        size = sum(e["bytes"] for e in lib.manifest["experts"])
        print(f"library: {len(lib)} experts, rank {args.rank}, {len(lib.sites)} sites, "
              f"{size / 1e6:.0f} MB ({size / len(lib) / 1e6:.1f} MB per expert)")
        data = open(os.path.join(lib.path, lib.info(lib.names[0])["file"]), "rb").read()
        t0 = time.perf_counter()
        hashlib.sha256(data).hexdigest()
        print(f"sha256 alone: {len(data) / (time.perf_counter() - t0) / 1e6:.0f} MB/s")
        times = {True: [], False: []}
        for _ in range(args.repeats + 1):  # the first round warms up (compiles the casts)
            for verify in (False, True):
                t0 = time.perf_counter()
                experts, _ = lib.load(verify=verify)
                jax.block_until_ready(experts)
                times[verify].append(time.perf_counter() - t0)
                del experts
        med = {v: statistics.median(t[1:]) for v, t in times.items()}
        for verify in (False, True):
            print(f"load verify={verify!s:5}: {med[verify]:.3f} s  "
                  f"{size / med[verify] / 1e6:.0f} MB/s")
        sharded_figure(lib, args.repeats)
        print(f"verified / unverified load time: {med[True] / med[False]:.2f}x")


if __name__ == "__main__":
    main()
