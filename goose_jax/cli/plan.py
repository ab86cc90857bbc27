"""`goose-plan`: will a goose-train / goose-eval run fit a TPU slice, before renting one.

    goose-plan --topology v5e-16 --base t5-xl-lm-adapt --library 166 --train-experts 8 \\
        --config configs/flan.py --train-mesh data=1,model=2,expert=8 \\
        --eval-mesh data=1,model=2,expert=8

Each program the run executes (the ``experts`` and ``gate`` train steps, rank classification,
generation) is compiled by the TPU compiler for the named topology from abstract inputs (no TPU
and no weights needed: ``pip install "goose-jax[tpu-plan]"`` brings the compiler, ``libtpu``).
One table: per program, whether it fits, its fraction of a chip's memory, which mesh axis would
make it fit, and an estimated step time (a roofline of the compiler's FLOPs and bytes against
the chip's published peak; an estimate, not a measurement). The programs themselves are
``goose_jax.pipeline.plan``'s; exit codes are those of ``goose_jax.core.errors`` (1 when a
program does not fit).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence

from goose_jax.core import errors
from goose_jax.core.tool import run_tool

PROG = "goose-plan"
PROGRAMS = ("experts", "gate", "rank", "generate")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    ap.add_argument("--topology", required=True, help="the TPU slice: v5e-16, v4-32, v5p-8, "
                    "v6e-8 (Cloud TPU accelerator types) or v5e:4x4")
    ap.add_argument("--base", help="base model: a preset (t5-xl-lm-adapt, t5-v1_1-xl, ...), "
                    "random:PRESET, or a Hugging Face directory (only its config.json is read); "
                    "default: the --library manifest's base")
    ap.add_argument("--library", default="36", help="the expert library: a directory or a "
                    "number of experts (default 36)")
    ap.add_argument("--method", choices=("phatgoose", "base"), default="phatgoose",
                    help="what evaluation runs: PHATGOOSE top-k routing, or the base alone")
    ap.add_argument("--train-experts", type=int, help="experts one goose-train run trains at "
                    "once (default: the whole library)")
    ap.add_argument("--config", help="goose-train's config file (micro batch, accumulation, "
                    "lengths, rank, dtypes; default: TrainConfig's defaults)")
    ap.add_argument("--set", action="append", metavar="KEY=VALUE", default=[],
                    help="override a config field, as goose-train --set (repeatable)")
    ap.add_argument("--mesh", help="one mesh for every program, e.g. data=2,model=2,expert=4")
    ap.add_argument("--train-mesh", help="the train steps' mesh (default --mesh; else all "
                    "devices on data)")
    ap.add_argument("--eval-mesh", help="evaluation's mesh (default --mesh; else all devices "
                    "on expert)")
    ap.add_argument("--batch-size", type=int, default=64, help="goose-eval's examples per batch")
    ap.add_argument("--choices", type=int, default=4, help="answer choices per example")
    ap.add_argument("--max-input-length", type=int, default=256, help="evaluation input tokens")
    ap.add_argument("--max-target-length", type=int, default=8,
                    help="evaluation tokens per choice, and tokens generated")
    ap.add_argument("--programs", default=",".join(PROGRAMS),
                   help=f"comma-separated subset of {','.join(PROGRAMS)}")
    ap.add_argument("--layers", type=int, help="compile this many encoder and decoder blocks "
                    "instead of the base's: a shallower model's memory and step time "
                    "(the blocks are scanned, so the compile is not quicker)")
    ap.add_argument("--no-estimate", action="store_true", help="skip the step-time estimate "
                    "(two small unrolled compiles per program): memory only, quicker")
    ap.add_argument("--target", choices=("tpu", "cpu"), default="tpu", help=argparse.SUPPRESS)
    ap.set_defaults(run=_run)
    return ap


def _run(args: argparse.Namespace) -> int:
    import importlib.util

    if args.target == "tpu" and importlib.util.find_spec("libtpu") is None:
        raise errors.ConfigError('compiling for a TPU needs the TPU compiler, which is not '
                                 'installed: pip install "goose-jax[tpu-plan]"')
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the TPU is a compile target, not a device
    import jax

    from goose_jax.pipeline import plan as P
    from goose_jax.pipeline.train_runs import load_train_config

    programs = tuple(p for p in args.programs.split(",") if p)
    bad = [p for p in programs if p not in PROGRAMS]
    if bad:
        raise errors.UsageError(f"--programs: unknown {bad[0]!r}; choose from "
                                f"{', '.join(PROGRAMS)}")
    topo = P.parse_topology(args.topology)
    tcfg = load_train_config(args.config, args.set)
    cfg = P.resolve_base(args.base, args.library).with_dtypes(tcfg.param_dtype,
                                                                tcfg.compute_dtype)
    if args.layers:
        cfg = cfg.replace(num_encoder_layers=args.layers, num_decoder_layers=args.layers)
    E = P.library_size(args.library)
    train_E = args.train_experts or E
    n = topo.chips
    run = P.Run(cfg, tcfg, 0 if args.method == "base" else E, train_E,
                args.train_mesh or args.mesh or f"data={n},model=1,expert=1",
                args.eval_mesh or args.mesh or f"data=1,model=1,expert={n}", programs,
                P.EvalShape(args.batch_size, args.choices, args.max_input_length,
                            args.max_target_length, args.max_target_length))
    chip = topo.chip
    if args.target == "tpu":
        devices = P.tpu_devices(topo)
    else:
        devices = jax.devices()[:n]
        P.check_devices(n, len(devices), args.topology)
    blocks = f"{cfg.num_encoder_layers} + {cfg.num_decoder_layers} blocks"
    print(f"{PROG}: {topo.name} ({topo.topology_name}, {n} chips of {chip.hbm_gib:g} GiB, "
          f"{chip.bf16_tflops:g} TFLOP/s bf16, {chip.hbm_gbps:g} GB/s); T5 d_model "
          f"{cfg.d_model}, {blocks}; {E} experts, rank {tcfg.lora.rank}; "
          f"{'TPU compiler' if args.target == 'tpu' else 'XLA:CPU'}")
    print("| program | experts | mesh | GiB per chip | fraction | fits | to fit | est. step "
          "ms | tokens/s/chip | compile s |")
    print("|---|---|---|---|---|---|---|---|---|---|")

    def show(row):
        est = f"{row['step_s'] * 1e3:.1f} ({row['bound']})" if "step_s" in row else "-"
        tps = f"{row['tokens_per_s_chip']:.0f}" if row.get("tokens_per_s_chip") else "-"
        fits = "yes" if row["fits"] else ("no (arguments alone)" if row.get("args_only")
                                          else "no")
        print(f"| {row['program']} | {row['E']} | {row['mesh']} | {P.fmt_gib(row['total'])} | "
              f"{row['fraction']:.2f} | {fits} | {row['advice'] or '-'} | {est} | {tps} | "
              f"{row['compile_s']:.0f} |", flush=True)

    start = time.perf_counter()
    rows = P.plan(run, devices, chip, costs=not args.no_estimate, on_row=show)
    worst = max(rows, key=lambda r: r["fraction"])
    print(f"worst fraction of chip memory: {worst['fraction']:.2f} ({worst['program']}); "
          f"{time.perf_counter() - start:.0f} s; step times are roofline estimates "
          f"(FLOPs / peak, bytes / HBM bandwidth), not measurements")
    return errors.OK if all(r["fits"] for r in rows) else errors.USER_ERROR


def main(argv: Sequence[str] | None = None) -> int:
    """Runs ``goose-plan``; returns the exit code (the table in ``goose_jax.core.errors``)."""
    return run_tool(PROG, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
