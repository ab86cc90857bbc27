"""Whether the paper's settings fit a chip: the real programs compiled for their meshes.

For each setting, the jitted programs goose-train and goose-eval run are lowered with abstract
inputs (``jax.ShapeDtypeStruct`` with shardings: nothing is materialised) and compiled, with
``--target tpu`` (the default when libtpu is installed) by the TPU compiler for the setting's
real topology (``TOPOLOGY``; no TPU needed), with ``--target cpu`` for a mesh of fake CPU devices
by XLA:CPU. The programs and the measuring are ``goose_jax.pipeline.plan``'s (goose-plan's).
Per program it prints, per device, the argument, output, temporary and
code bytes of ``compiled.memory_analysis()``, their total against the chip's memory (outputs that
alias donated arguments counted once), and the collectives of ``compiled.as_text()``: count and
result bytes per kind, counted once per instruction of the HLO (an instruction inside a loop
counts once, not once per iteration).

    setting  base                     experts  devices  chip         programs
    t0       T5-XL LM-adapt, bf16     36       16       v4, 32 GiB   experts step, gate step (12
                                                                     at a time), rank
                                                                     classification, generate
    flan     T5-XL LM-adapt, bf16     166      16       v5e, 16 GiB  the same (trained 8 at a time)
    ocean    T5-XL LM-adapt, bf16     1000     64       v5e, 16 GiB  rank classification, generate

The programs: ``training.program.Program`` for kinds "expert" (the experts of one run at
once, the config's micro batch) and "gate" (as goose-train runs them), over a scanned model
(``T5Config.scan_layers``: the base stacked, the library in its per-layer layout) with
``remat="block"``; ``evaluation``'s choice-NLL scorer
(batch 64 x 4 choices, 256 encoder and 8 decoder tokens, PHATGOOSE top-2 over the whole
library, as goose-eval's ``Evaluator.score_choices`` calls it); ``generation``'s greedy decoder
(batch 64, 256 encoder tokens, 8 new tokens: the encoder, the first step and the loop whose body
is one decode step); both scanned, as the Evaluator compiles them, and expert parallel
(``build_routed(..., mesh=mesh)``: the library padded to a multiple of the ``expert`` axis and
never gathered; the table counts the all-gathers whose result is a whole library leaf). Rank 16
at every site. The base is laid out by the rules table, every
expert-stacked tree with E over ``expert``, batches over ``data``.

Each setting has a mesh for training and one for evaluation (printed, and why beside
``SETTINGS``; ``--mesh`` replaces both). A setting whose arguments alone (the
parameters, exactly as laid out) exceed the chip fails before anything compiles, in one line
that says by how much and which axis would help. ``--layers N`` compiles N + N blocks instead of
24 + 24 (compiling the full depth is slow on a small CPU). The last line is the worst fraction
of chip memory over every program compiled.

    python bench/pod_plan.py                          # every setting, full depth
    python bench/pod_plan.py --target cpu             # fake CPU devices, XLA:CPU
    python bench/pod_plan.py --ratios                 # estimated routed / base, E = 36, 166, 1000
    python bench/pod_plan.py --settings t0,flan --programs experts,gate
    python bench/pod_plan.py --layers 2               # 2 + 2 blocks, for iteration
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys

GIB = 1024**3


@dataclasses.dataclass(frozen=True)
class Setting:
    name: str
    experts: int
    devices: int
    chip: str
    chip_gib: float
    train_mesh: str  # goose-train's --mesh for the experts and gate steps
    eval_mesh: str  # goose-eval's --mesh for rank classification and generation
    programs: tuple[str, ...]
    config: str  # configs/<config>.py: the training hyper-parameters of this setting
    train_experts: int = 0  # experts one goose-train run trains at once (0: all of them)
    remat: str = "block"  # the train steps' --set remat=... (activations recomputed per block)
    scan_train: bool = True  # the train steps over a scanned model (the base passed stacked)


SETTINGS = {
    "t0": Setting("t0", 36, 16, "v4", 32, "data=4,model=1,expert=4", "data=1,model=4,expert=4",
                  ("experts", "gate", "rank", "generate"), "t0_heldin", train_experts=12),
    "flan": Setting("flan", 166, 16, "v5e", 16, "data=1,model=2,expert=8",
                    "data=1,model=2,expert=8", ("experts", "gate", "rank", "generate"), "flan",
                    train_experts=8),
    "ocean": Setting("ocean", 1000, 64, "v5e", 16, "", "data=1,model=4,expert=16",
                     ("rank", "generate"), "flan"),
}
# Why these meshes and runs (each measured at full depth, README "Several hosts"):
# - Training: a step's activations grow with the rows a device holds (E / X experts x
#   micro_batch / D rows), and with the stacked scan its temporaries also hold copies of the
#   base's stacked kernels (split by ``model`` only). T0 trains its 36 experts in 3 runs of 12
#   (12 / 4 = 3 experts x 8 / 4 = 2 rows a device; all 36 at once on data=2,model=2,expert=4
#   extrapolates from 2 and 4 blocks to 0.90 of a v4). FLAN trains in runs of 8 (166 = 20 x 8
#   + 6, each run writing into the one library) on model=2 (the base halved: 16 at a time, or
#   model=1, extrapolate to 0.99 and 1.32 of a v5e).
# - Evaluation routes expert-parallel (``expert_parallel``): each device holds E_pad / X experts
#   of every site and gathers only the (N, E) scores, so ``expert`` is as large as the other
#   axes allow and ``model`` splits the base. T0: model=4,expert=4 (36 divides; base and
#   library both a quarter). FLAN: model=2,expert=8 (166 -> 168; the library an eighth, 1.4 GiB;
#   the old model=8,expert=2 held 5.8 GiB of library). Ocean: model=4,expert=16 on 64 devices
#   (1000 -> 1008; 4.4 GiB of library and a quarter of the base; model=8,expert=8 would hold
#   8.8 GiB of library, estimated 0.89 of a v5e).
# XLA:CPU has no bf16 matmul: it converts each bf16 dot's operands to f32, and its while-loop
# invariant code motion then hoists that convert of the whole stacked kernel out of the scan
# over layers, so an f32 copy of every stacked base kernel a device holds (7 of FLAN
# rank classification's 10.2 GiB of temporaries on model=2,expert=8) sits in memory for the
# whole program. A TPU or GPU multiplies bf16 natively and makes no such copy. By default the
# pass is switched off so the table measures the program rather than the CPU's upcast;
# ``--keep-cpu-hoist`` compiles as XLA:CPU does by default (both tables are in the README).
CPU_HOIST = "--xla_disable_hlo_passes=while-loop-invariant-code-motion"
PROGRAMS = ("experts", "gate", "rank", "generate")
# The real topology of each setting on the TPU path (Cloud TPU names: v4-32 is 16 chips).
TOPOLOGY = {"t0": "v4-32", "flan": "v5e-16", "ocean": "v5e-64"}
# --ratios: the routed / base estimate of each library size, on its setting's eval mesh.
RATIO_SETTINGS = {36: "t0", 166: "flan", 1000: "ocean"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="pod_plan", description=__doc__.split("\n\n")[0])
    p.add_argument("--target", choices=("tpu", "cpu"), default=None,
                   help="tpu: the TPU compiler for each setting's real topology (the default "
                   "when libtpu is installed); cpu: fake CPU devices, compiled by XLA:CPU")
    p.add_argument("--settings", default="t0,flan,ocean",
                   help=f"comma-separated subset of {','.join(SETTINGS)}")
    p.add_argument("--programs", default=",".join(PROGRAMS),
                   help="comma-separated subset of the programs each setting compiles")
    p.add_argument("--layers", type=int, default=24,
                   help="encoder and decoder blocks each (24: T5-XL; the blocks are scanned, "
                   "so fewer barely shorten a TPU compile)")
    p.add_argument("--mesh", default="", help="replace every chosen setting's mesh, e.g. "
                   "data=2,model=4,expert=2 (the product must be the setting's device count)")
    p.add_argument("--keep-cpu-hoist", action="store_true",
                   help="(cpu) compile as XLA:CPU does by default, with the f32 copies of the "
                   "stacked bf16 kernels that its loop-invariant code motion hoists")
    p.add_argument("--no-costs", action="store_true",
                   help="skip the step-time estimate (its two small unrolled compiles per "
                   "program)")
    p.add_argument("--ratios", action="store_true",
                   help="(tpu) instead of the table: the estimated routed / base rank "
                   "classification time for E = 36, 166, 1000, backends ragged and grouped")
    p.add_argument("--backends", default="ragged,grouped",
                   help="(--ratios) the routed programs' combination backends")
    return p


def default_target() -> str:
    import importlib.util

    return "tpu" if importlib.util.find_spec("libtpu") is not None else "cpu"


def load_config(name: str):
    from goose_jax.core.config_files import load_config as load
    from goose_jax.training.program import TrainConfig

    here = os.path.dirname(os.path.abspath(__file__))
    return load(os.path.join(here, "..", "configs", f"{name}.py"), TrainConfig)


def setting_run(s: Setting, args, programs):
    from goose_jax.models.t5.config import T5Config
    from goose_jax.pipeline import plan as P

    tcfg = load_config(s.config)
    cfg = T5Config.preset("t5-xl-lm-adapt").replace(
        num_encoder_layers=args.layers, num_decoder_layers=args.layers).with_dtypes(
        tcfg.param_dtype, tcfg.compute_dtype)
    return P.Run(cfg, tcfg, s.experts, s.train_experts or s.experts,
                 args.mesh or s.train_mesh, args.mesh or s.eval_mesh,
                 tuple(p for p in programs if p in s.programs), remat=s.remat)


def setting_devices(s: Setting, target: str):
    """(devices, chip) of a setting: its TPU topology, or the first N fake CPU devices."""
    import jax

    from goose_jax.pipeline import plan as P

    if target == "tpu":
        topo = P.parse_topology(TOPOLOGY[s.name])
        return P.tpu_devices(topo), topo.chip
    return jax.devices()[:s.devices], P.CHIPS[s.chip]


def run(args) -> int:
    from goose_jax.core.errors import UsageError
    from goose_jax.pipeline import plan as P

    if args.ratios:
        return ratios(args)
    settings = [SETTINGS[s] for s in args.settings.split(",")]
    programs = args.programs.split(",")
    todo = []
    for s in settings:  # every request checked, and every fit estimated, before compiling
        r = setting_run(s, args, programs)
        if not r.programs:
            continue
        devices, chip = setting_devices(s, args.target)
        for name in r.programs:
            mesh_text, built = P.build(r, name, devices)
            P.check_arguments(built, chip, f"setting {s.name}, {name}", mesh_text)
        todo.append((s, r, devices, chip))
    if not todo:
        raise UsageError(f"no program of {programs} belongs to the settings {args.settings}")
    if args.target == "tpu":
        where = "the TPU compiler (libtpu), each setting on its real topology"
    else:
        where = ("XLA:CPU on fake devices; " + (
            "its hoisted f32 kernel copies kept" if args.keep_cpu_hoist else
            "its loop-invariant code motion off"))
    print(f"T5-XL LM-adapt with {args.layers} + {args.layers} blocks, bf16; per device, GiB; "
          f"collectives: kind instructions/MiB of results; {where}")
    print("| setting | program | E | mesh | args | out | temp | code | total | chip | fraction "
          "| collectives | library gathers | GFLOP | GB accessed | est. ms | tokens/s/chip "
          "| compile s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    worst = (0.0, "")
    for s, r, devices, chip in todo:
        topo = TOPOLOGY[s.name] if args.target == "tpu" else f"{s.devices} x"

        def show(row, s=s, chip=chip, topo=topo):
            coll = ", ".join(f"{k} {n}/{b / 2**20:.0f}"
                             for k, (n, b) in row.get("collectives", {}).items() if n) or "none"
            gathers = "-" if row.get("library_gathers") is None else row["library_gathers"]

            def g(k, row=row):
                return P.fmt_gib(row[k]) if k in row else "-"

            est = f"{row['step_s'] * 1e3:.1f} ({row['bound']})" if "step_s" in row else "-"
            tps = (f"{row['tokens_per_s_chip']:.0f}" if row.get("tokens_per_s_chip") and
                   row["program"] == "experts" else "-")
            print(f"| {s.name} | {row['program']} | {row['E']} | {row['mesh']} | "
                  f"{g('argument')} | {g('output')} | {g('temp')} | {g('generated_code')} | "
                  f"{P.fmt_gib(row['total'])} | {topo} {chip.name} {chip.hbm_gib:g} | "
                  f"{row['fraction']:.2f}{' OOM' if row.get('oom') else ''} | {coll} | "
                  f"{gathers} | {row.get('flops', 0) / 1e9:.0f} | "
                  f"{row.get('bytes', 0) / 1e9:.1f} | {est} | {tps} | "
                  f"{row['compile_s']:.0f} |", flush=True)

        for row in P.plan(r, devices, chip, costs=not args.no_costs, on_row=show):
            worst = max(worst, (row["fraction"], f"{s.name} {row['program']}"))
    print(f"worst fraction of chip memory: {worst[0]:.2f} ({worst[1]})")
    return 0


def ratios(args) -> int:
    """Estimated routed / base time of rank classification on each library size's setting."""
    import dataclasses

    from goose_jax.pipeline import plan as P

    print(f"rank classification, T5-XL with {args.layers} + {args.layers} blocks, bf16, "
          f"{args.target}: roofline estimate (max of FLOPs / peak, bytes / HBM bandwidth)")
    backends = args.backends.split(",")
    print("| E | topology | mesh | base ms | " + " | ".join(
        f"routed {b} ms | {b} / base" for b in backends) + " | compile s |")
    print("|---" * (4 + 2 * len(backends)) + "|")
    for E, name in RATIO_SETTINGS.items():
        if name not in args.settings.split(","):
            continue
        s = SETTINGS[name]
        r = setting_run(s, args, ("rank",))
        devices, chip = setting_devices(s, args.target)
        times, spent = {}, 0.0
        for label, experts, backend in [("base", 0, "auto")] + [(b, E, b) for b in backends]:
            c = P.cost(dataclasses.replace(r, experts=experts, backend=backend), "rank", devices)
            times[label] = P.roofline(c["flops"], c["bytes"], chip)
            spent += c["cost_s"]
        cells = " | ".join(f"{times[b] * 1e3:.1f} | {times[b] / times['base']:.2f}"
                           for b in backends)
        print(f"| {E} | {TOPOLOGY[name] if args.target == 'tpu' else s.devices} | "
              f"{r.eval_mesh} | {times['base'] * 1e3:.1f} | {cells} | {spent:.0f} |",
              flush=True)
    return 0


def main(argv=None) -> int:
    parser = parse_args(argv)
    known = parser.parse_known_args(argv)[0]
    target = known.target or default_target()
    if target == "cpu":  # the fake device count must be set before jax is imported
        names = [s for s in known.settings.split(",") if s in SETTINGS]
        count = max([SETTINGS[s].devices for s in names] or [1])
        flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                       os.environ.get("XLA_FLAGS", ""))
        flags = f"{flags} --xla_force_host_platform_device_count={count}"
        if not known.keep_cpu_hoist:
            flags = f"{flags} {CPU_HOIST}"
        os.environ["XLA_FLAGS"] = flags.strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the TPU is a compile target, not a device

    from goose_jax.core.errors import UsageError
    from goose_jax.core.tool import run_tool

    def checked(args):
        args.target = target
        bad = [s for s in args.settings.split(",") if s not in SETTINGS]
        badp = [p for p in args.programs.split(",") if p not in PROGRAMS]
        if bad or badp:
            raise UsageError(f"unknown {'setting' if bad else 'program'} "
                             f"{(bad or badp)[0]!r}; choose from "
                             f"{', '.join(SETTINGS if bad else PROGRAMS)}")
        if args.layers < 1:
            raise UsageError(f"--layers must be >= 1, got {args.layers}")
        if target == "tpu" and importlib_missing("libtpu"):
            raise UsageError('--target tpu needs the libtpu wheel: pip install '
                             '"goose-jax[tpu-plan]"')
        if args.mesh:
            from goose_jax.core.sharding import parse_mesh

            axes = parse_mesh(args.mesh)
            product = 1
            for n in axes.values():
                product *= n
            for name in args.settings.split(","):
                if product != SETTINGS[name].devices:
                    raise UsageError(
                        f"--mesh {args.mesh}: its axes multiply to {product}, but setting "
                        f"{name} runs on {SETTINGS[name].devices} devices; pass axis sizes "
                        f"whose product is {SETTINGS[name].devices}")
        return run(args)

    parser.set_defaults(run=checked)
    return run_tool("pod_plan", parser, argv)


def importlib_missing(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is None


if __name__ == "__main__":
    sys.exit(main())
