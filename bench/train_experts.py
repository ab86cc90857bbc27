"""Training E experts at once (one vmapped, jitted step) against E sequential single-expert runs;
with ``--loop``, goose-train's loop (``training.loop.train_loop``) against an older copy of it.

Both sides run the same code (``goose_jax.training.program.Program``, E = 8 versus E = 1 called 8
times) on the same tiny random T5 (d_model 64), the same batches and the same hyper-parameters,
in one process, jitted and warmed up. Repeats alternate between the two so that machine noise
hits both alike; medians are reported. The last line printed is the speed-up of training all
experts at once over training them one after another.

    python bench/train_experts.py
    python bench/train_experts.py --experts 8 --steps 10 --repeats 5 --micro-batch 4

``--loop`` times whole ``train_loop`` calls in steps per second, as goose-train and the demo run
them (batches built from text, metrics logged, checkpoints written), on the tiny config
(``configs/tiny.py``, two experts, ``random:tiny``) and on the demo's experts stage (the world
base, its eight held-in tasks, the ``full`` preset's settings), each call in a fresh work
directory with fresh example sources. ``--before FILE`` is another version of
``goose_jax/training/loop.py`` (e.g. ``git show REV:goose_jax/training/loop.py >
/tmp/trainer_before.py``)
timed in the same process, the two alternating after one warm-up call each (compilation);
medians are reported:

    python bench/train_experts.py --loop tiny demo --before /tmp/trainer_before.py
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import pathlib
import statistics
import tempfile
import time

import jax
import numpy as np
from calibrate import print_calibration

import goose_jax as gj
from goose_jax.experts.lora import init_experts
from goose_jax.models.t5.model import init_params
from goose_jax.training import program as training


def make_batches(E: int, steps: int, A: int, M: int, L: int, T: int, vocab: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(steps):
        inputs = rng.integers(2, vocab, (E, A, M, L)).astype(np.int32)
        targets = rng.integers(2, vocab, (E, A, M, T)).astype(np.int32)
        out.append({"inputs": inputs, "input_mask": np.ones_like(inputs), "targets": targets})
    return out


ROOT = pathlib.Path(__file__).resolve().parents[1]


def _tiny_setting(steps: int, overrides: tuple[str, ...], folder: str):
    """goose-train experts --config configs/tiny.py on two small files, as its run does it."""
    from goose_jax.pipeline import train_runs

    data = []
    os.makedirs(folder, exist_ok=True)
    for name, fn in (("reverse", lambda w: w[::-1]), ("upper", str.upper)):
        path = os.path.join(folder, f"{name}.jsonl")
        with open(path, "w") as f:
            for i in range(64):
                word = f"goose{i} jax{i * 7 % 13} flax"
                f.write(f'{{"input": "{name}: {word}", "target": "{fn(word)}"}}\n')
        data.append(path)
    args = train_runs.RunArgs("experts", data, os.path.join(folder, "w"),
                              config=str(ROOT / "configs" / "tiny.py"),
                              overrides=(f"steps={steps}",) + overrides)
    setup = train_runs.Setup(args)
    tcfg = setup.tcfg
    names = train_runs.expert_names(args, tcfg, len(data))
    root = jax.random.key(tcfg.seed)
    program = training.Program("expert", setup.cfg, tcfg, tcfg.steps, tcfg.lora.lora_scale)
    base = setup.frozen_base()

    def call(loop, workdir):
        batchers = [setup.batcher(train_runs.JsonlSource(p), train_runs.stream_id(n))
                    for p, n in zip(data, names)]
        trainable = init_experts(setup.cfg, tcfg.lora, [
            jax.random.fold_in(root, train_runs.stream_id(n)) for n in names],
            fast_compile=tcfg.fast_compile)
        loop(program, base, None, trainable, batchers, workdir, seed_key=root)
    return call


def _demo_setting(steps: int, overrides: tuple[str, ...], folder: str):
    """The demo's experts stage (``goose_jax.pipeline.demo.train_experts``, preset full), ``steps``
    long."""
    from goose_jax.core import config_files
    from goose_jax.core.errors import TrainConfigError
    from goose_jax.data import world
    from goose_jax.data.tokenizers import ByteTokenizer
    from goose_jax.pipeline import demo

    cfg, params = demo.load_world_base()
    p = demo.PRESETS["full"]
    tcfg = config_files.apply_overrides(demo._train_config(p, steps, p.expert_batch, 0),
                                        overrides, error=TrainConfigError)
    names = [t.name for t in world.HELDIN]
    root = jax.random.key(0)
    program = training.Program("expert", cfg, tcfg, tcfg.steps, tcfg.lora.lora_scale)

    def call(loop, workdir):
        batchers = demo._batchers(tcfg, ByteTokenizer(), cfg, names, p.train_size, 0)
        init = init_experts(cfg, tcfg.lora, [jax.random.fold_in(root, i + 1)
                                             for i in range(len(names))],
                            fast_compile=p.fast_compile)
        loop(program, params, None, init, batchers, workdir, seed_key=root)
    return call


def _load_loop(path: str):
    spec = importlib.util.spec_from_file_location("trainer_before", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.train_loop


def bench_loop(args) -> None:
    """``--loop``: steps per second of whole train_loop calls, this version and ``--before``."""
    from goose_jax.training.loop import train_loop

    os.environ["GOOSE_QUIET"] = "1"
    loops = {"now": train_loop}
    if args.before:
        loops = {"before": _load_loop(args.before), **loops}
    settings = {"tiny": _tiny_setting, "demo": _demo_setting}
    steps = {"tiny": args.steps or 60, "demo": args.steps or 40}
    with tempfile.TemporaryDirectory() as folder:
        for which in args.loop:
            call = settings[which](steps[which], tuple(args.set or ()),
                                   os.path.join(folder, which))
            runs = 0

            def timed(loop):
                nonlocal runs
                runs += 1
                t0 = time.perf_counter()
                call(loop, os.path.join(folder, which, f"run{runs}"))
                return steps[which] / (time.perf_counter() - t0)

            for loop in loops.values():  # compile
                timed(loop)
            rates = {k: [] for k in loops}
            for _ in range(args.repeats):
                for k, loop in loops.items():
                    rates[k].append(timed(loop))
            extra = f" ({', '.join(args.set)})" if args.set else ""
            parts = [f"{k} {statistics.median(v):6.2f} steps/s "
                     f"[{min(v):.2f}-{max(v):.2f}]" for k, v in rates.items()]
            line = f"loop {which}{extra}, {steps[which]} steps, median of {args.repeats}: "
            line += "; ".join(parts)
            if len(rates) == 2:
                ratio = statistics.median(rates["now"]) / statistics.median(rates["before"])
                line += f"; now / before {ratio:.2f}x"
            print(line, flush=True)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--loop", nargs="+", choices=("tiny", "demo"),
                    help="time goose-train's loop on these settings instead")
    ap.add_argument("--before", help="another goose_jax/training/loop.py to time beside this one")
    ap.add_argument("--set", action="append", metavar="KEY=VALUE",
                    help="--loop: override a TrainConfig field of the setting")
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--steps", type=int, default=None,
                    help="steps per timed repeat (default 10; --loop: tiny 60, demo 40)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--length", type=int, default=32, help="input tokens")
    ap.add_argument("--target-length", type=int, default=16)
    ap.add_argument("--d-model", type=int, default=64)
    ap.add_argument("--rank", type=int, default=16)
    args = ap.parse_args(argv)
    print_calibration()
    if args.loop:
        bench_loop(args)
        return
    args.steps = args.steps or 10

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
