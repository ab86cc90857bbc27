"""Encoder+decoder forward throughput: goose-jax against transformers' PyTorch T5, one process.

Both run the same random weights on the same CPU, teacher-forced, float32, batch B with L encoder
and T decoder tokens. Runs alternate between the two implementations so that machine noise hits
both alike. After each goose-jax run a plain jitted GEMM of the model's largest product,
(B * (L + T), D) x (D, F), is timed too: the efficiency, the model's GFLOP/s over that GEMM's,
says how close the forward comes to XLA's own matmul speed on this machine (each model run is
paired with the GEMM run right after it). The same ratio in CPU seconds is printed too: on a
loaded machine it still counts the work, though it misses cores left idle. The last line printed
gives, for the last size, the efficiency and the goose-jax / PyTorch throughput ratio.

    python bench/t5_forward.py                      # t5-small and t5-base, 8 x 128
    python bench/t5_forward.py --sizes t5-small --repeats 3
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
from goose_jax.models.t5.hf import hf_state_dict_to_params


def forward_flops(cfg: gj.T5Config, B: int, L: int, T: int) -> float:
    """Multiply-add FLOPs (x2) of one teacher-forced forward, matmuls and attention."""
    D, F, J, V = cfg.d_model, cfg.d_ff, cfg.inner_dim, cfg.vocab_size  # J = H * K
    ffn = (3 if cfg.is_gated else 2) * D * F
    enc = cfg.num_encoder_layers * (L * (4 * D * J + ffn) + 2 * L * L * J)
    dec = cfg.num_decoder_layers * (T * (4 * D * J + 2 * D * J + ffn) + 2 * L * D * J
                                    + 2 * T * T * J + 2 * T * L * J)
    return 2.0 * B * (enc + dec + T * D * V)


def build(preset: str, seed: int = 0):
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    cfg = gj.T5Config.preset(preset)
    hf = T5Config(**{k: v for k, v in cfg.to_hf_dict().items() if k not in ("architectures",)})
    torch.manual_seed(seed)
    model = T5ForConditionalGeneration(hf).eval()
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    return cfg, hf_state_dict_to_params(cfg, state), model


def gemm_call(cfg: gj.T5Config, B: int, L: int, T: int, times: int = 5):
    """``times`` jitted float32 (B * (L + T), D) x (D, F) matmuls in a row, warmed up: the
    call, its FLOPs and the shape's name."""
    rng = np.random.default_rng(0)
    M, D, F = B * (L + T), cfg.d_model, cfg.d_ff
    a, b = (jnp.asarray(rng.standard_normal(s, np.float32)) for s in ((M, D), (D, F)))
    matmul = jax.jit(jnp.matmul)
    matmul(a, b).block_until_ready()

    def run():
        for _ in range(times):
            matmul(a, b).block_until_ready()

    return run, 2.0 * M * D * F * times, f"{M}x{D}x{F}"


def time_call(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", default=["t5-small", "t5-base"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--enc-len", type=int, default=128)
    ap.add_argument("--dec-len", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args(argv)

    import torch

    print_calibration(torch_too=True)
    B, L, T = args.batch, args.enc_len, args.dec_len
    print(f"jax {jax.__version__} on {jax.default_backend()}, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads); batch {B}, encoder {L}, decoder {T} tokens, fp32")
    efficiency = ratio = None
    for preset in args.sizes:
        cfg, params, model = build(preset)
        rng = np.random.default_rng(0)
        ids = rng.integers(2, cfg.vocab_size, (B, L)).astype(np.int32)
        dec = rng.integers(2, cfg.vocab_size, (B, T)).astype(np.int32)
        mask = np.ones_like(ids)
        ids_j, dec_j, mask_j = (jax.device_put(a) for a in (ids, dec, mask))
        ids_t, dec_t, mask_t = (torch.from_numpy(a.astype(np.int64)) for a in (ids, dec, mask))

        def run_jax():
            gj.t5_logits(cfg, params, ids_j, dec_j, mask_j).block_until_ready()

        def run_torch():
            with torch.inference_mode():
                model(input_ids=ids_t, attention_mask=mask_t, decoder_input_ids=dec_t)

        run_gemm, gemm_flops, gemm_shape = gemm_call(cfg, B, L, T)
        run_jax(), run_torch()  # compile / warm up
        t_jax, t_torch, t_gemm, c_jax, c_gemm = [], [], [], [], []
        for _ in range(args.repeats):
            for fn, wall, cpu in ((run_jax, t_jax, c_jax), (run_gemm, t_gemm, c_gemm)):
                c0, t0 = time.process_time(), time.perf_counter()
                fn()
                wall.append(time.perf_counter() - t0)
                cpu.append(time.process_time() - c0)
            t_torch += time_call(run_torch, 1)
        flops = forward_flops(cfg, B, L, T)
        mj, mt, mg = (statistics.median(t) for t in (t_jax, t_torch, t_gemm))
        tokens = B * (L + T)
        print(f"{preset:10s} goose-jax {mj * 1e3:8.1f} ms  {tokens / mj:9.0f} tok/s "
              f"{flops / mj / 1e9:6.1f} GFLOP/s | torch {mt * 1e3:8.1f} ms  {tokens / mt:9.0f} "
              f"tok/s {flops / mt / 1e9:6.1f} GFLOP/s | ratio {mt / mj:.2f}")
        # Each model run is paired with the GEMM run right after it, so load that drifts
        # between pairs cancels; CPU seconds (all threads) count work done, not waiting.
        efficiency = statistics.median(
            (flops / tj) / (gemm_flops / tg) for tj, tg in zip(t_jax, t_gemm))
        cpu_efficiency = statistics.median(
            (flops / cj) / (gemm_flops / cg) for cj, cg in zip(c_jax, c_gemm))
        ratio = mt / mj
        print(f"{preset:10s} GEMM {gemm_shape} {gemm_flops / mg / 1e9:6.1f} GFLOP/s (median "
              f"of {args.repeats}, each 5 in a row right after a model run); per CPU second: model "
              f"{flops / statistics.median(c_jax) / 1e9:6.1f}, GEMM "
              f"{gemm_flops / statistics.median(c_gemm) / 1e9:6.1f} GFLOP, efficiency "
              f"{cpu_efficiency:.2f}")
    print(f"{args.sizes[-1]}: efficiency {efficiency:.2f} (goose-jax GFLOP/s / GEMM GFLOP/s, "
          f"median of paired runs); "
          f"goose-jax / torch throughput ratio {ratio:.2f}")


if __name__ == "__main__":
    main()
