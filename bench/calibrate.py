"""The calibration line every benchmark prints first: this machine's plain GEMM speed.

Machines of one kind differ several-fold, and a ratio can flip between them, so each ratio is
quoted beside the GEMM speed of the process that measured it (bench/README.md).

    python bench/calibrate.py          # the line alone
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np


def _median_seconds(fn, repeats: int) -> float:
    fn()  # compile / warm up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def gemm_gflops(n: int = 1024, repeats: int = 7) -> float:
    """GFLOP/s of a jitted float32 (n, n) x (n, n) matmul, median of ``repeats``."""
    rng = np.random.default_rng(0)
    a, b = (jnp.asarray(rng.standard_normal((n, n), np.float32)) for _ in range(2))
    matmul = jax.jit(jnp.matmul)
    return 2 * n**3 / _median_seconds(lambda: matmul(a, b).block_until_ready(), repeats) / 1e9


def torch_gemm_gflops(n: int = 1024, repeats: int = 7) -> float:
    """GFLOP/s of the same matmul in PyTorch (where torch is the peer being compared)."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    with torch.inference_mode():
        return 2 * n**3 / _median_seconds(lambda: torch.mm(a, b), repeats) / 1e9


def print_calibration(torch_too: bool = False) -> None:
    """Prints the calibration line: jitted fp32 GEMM GFLOP/s (and torch's when asked)."""
    line = (f"calibration: jitted fp32 GEMM 1024^3 {gemm_gflops():.1f} GFLOP/s "
            f"(jax {jax.__version__} on {jax.default_backend()})")
    if torch_too:
        import torch

        line += (f"; torch GEMM {torch_gemm_gflops():.1f} GFLOP/s "
                 f"({torch.get_num_threads()} threads)")
    print(line, flush=True)


if __name__ == "__main__":
    print_calibration(torch_too=True)
