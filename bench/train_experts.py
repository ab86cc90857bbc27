"""Training E experts at once (one vmapped, jitted step) against E sequential single-expert runs.

Both sides run the same code (``goose_jax.training.Program``, E = 8 versus E = 1 called 8
times) on the same tiny random T5 (d_model 64), the same batches and the same hyper-parameters,
in one process, jitted and warmed up. Repeats alternate between the two so that machine noise
hits both alike; medians are reported. The last line printed is the speed-up of training all
experts at once over training them one after another.

    python bench/train_experts.py
    python bench/train_experts.py --experts 8 --steps 10 --repeats 5 --micro-batch 4
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import numpy as np
from calibrate import print_calibration

import goose_jax as gj
from goose_jax import training
from goose_jax.experts import init_experts
from goose_jax.t5 import init_params


def make_batches(E: int, steps: int, A: int, M: int, L: int, T: int, vocab: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(steps):
        inputs = rng.integers(2, vocab, (E, A, M, L)).astype(np.int32)
        targets = rng.integers(2, vocab, (E, A, M, T)).astype(np.int32)
        out.append({"inputs": inputs, "input_mask": np.ones_like(inputs), "targets": targets})
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10, help="steps per timed repeat")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--length", type=int, default=32, help="input tokens")
    ap.add_argument("--target-length", type=int, default=16)
    ap.add_argument("--d-model", type=int, default=64)
    ap.add_argument("--rank", type=int, default=16)
    args = ap.parse_args(argv)
    print_calibration()

    E = args.experts
    cfg = gj.T5Config.preset("tiny").replace(vocab_size=259, d_model=args.d_model, d_kv=16,
                                             num_heads=4, d_ff=2 * args.d_model)
    tcfg = training.TrainConfig(steps=1000, micro_batch=args.micro_batch,
                                grad_accum=args.grad_accum, lora_rank=args.rank,
                                max_input_length=args.length,
                                max_target_length=args.target_length)
    params = init_params(cfg, 0)
    keys = [jax.random.key(e) for e in range(E)]
    experts = init_experts(cfg, tcfg.lora, keys)
    program = training.Program("expert", cfg, tcfg, tcfg.steps, tcfg.lora.lora_scale)
    batches = make_batches(E, args.steps, args.grad_accum, args.micro_batch, args.length,
                           args.target_length, cfg.vocab_size)
    singles = [[{k: v[e:e + 1] for k, v in b.items()} for b in batches] for e in range(E)]
    n_sites = len(gj.site_shapes(cfg))
    print(f"model: d_model {cfg.d_model}, d_ff {cfg.d_ff}, {cfg.num_encoder_layers}+"
          f"{cfg.num_decoder_layers} blocks, {n_sites} LoRA sites of rank {args.rank}; "
          f"batch per expert {args.grad_accum} x {args.micro_batch} x "
          f"({args.length} + {args.target_length}) tokens; {jax.device_count()} device(s), "
          f"{jax.default_backend()}")

    def run_many(state):
        for b in batches:
            state, m = program.step(params, None, state, b)
        jax.block_until_ready(m)
        return state

    def run_sequential(states):
        out = []
        for state, mine in zip(states, singles):
            for b in mine:
                state, m = program.step(params, None, state, b)
            out.append(state)
        jax.block_until_ready(m)
        return out

    many_state = program.init(experts)
    single_states = [program.init(training.slice_tree(experts, e)) for e in range(E)]
    t0 = time.perf_counter()
    run_many(many_state)
    t1 = time.perf_counter()
    run_sequential(single_states)
    t2 = time.perf_counter()
    print(f"compile + first repeat: all at once {t1 - t0:.1f}s, one by one {t2 - t1:.1f}s")

    many_s, seq_s = [], []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        run_many(many_state)
        t1 = time.perf_counter()
        run_sequential(single_states)
        t2 = time.perf_counter()
        many_s.append((t1 - t0) / args.steps)
        seq_s.append((t2 - t1) / args.steps)
    many, seq = statistics.median(many_s), statistics.median(seq_s)
    print(f"{E} experts at once:  {1e3 * many:8.2f} ms per step of all {E} "
          f"({1 / many:6.1f} steps/s, {E / many:7.1f} expert-steps/s)")
    print(f"{E} experts in turn:  {1e3 * seq:8.2f} ms per step of all {E} "
          f"({1 / seq:6.1f} steps/s, {E / seq:7.1f} expert-steps/s)")
    print(f"speed-up of training {E} experts at once over one by one: {seq / many:.2f}x")


if __name__ == "__main__":
    main()
