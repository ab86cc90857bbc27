"""Whether the paper's settings fit a chip: the real programs compiled for simulated meshes.

For each setting, the jitted programs goose-train and goose-eval run are lowered with abstract
inputs (``jax.ShapeDtypeStruct`` with shardings: nothing is materialised) for a mesh of fake CPU
devices, and compiled. Per program it prints, per device, the argument, output, temporary and
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
    python bench/pod_plan.py --settings t0,flan --programs experts,gate
    python bench/pod_plan.py --layers 2               # 2 + 2 blocks, for iteration
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
import time

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
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
RANK_SHAPE = dict(batch=64, choices=4, input_length=256, target_length=8)
GENERATE_SHAPE = dict(batch=64, input_length=256, new_tokens=8)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="pod_plan", description=__doc__.split("\n\n")[0])
    p.add_argument("--settings", default="t0,flan,ocean",
                   help=f"comma-separated subset of {','.join(SETTINGS)}")
    p.add_argument("--programs", default=",".join(PROGRAMS),
                   help="comma-separated subset of the programs each setting compiles")
    p.add_argument("--layers", type=int, default=24,
                   help="encoder and decoder blocks each (24: T5-XL; fewer compiles faster)")
    p.add_argument("--mesh", default="", help="replace every chosen setting's mesh, e.g. "
                   "data=2,model=4,expert=2 (the product must be the setting's device count)")
    p.add_argument("--keep-cpu-hoist", action="store_true",
                   help="compile as XLA:CPU does by default, with the f32 copies of the stacked "
                   "bf16 kernels that its loop-invariant code motion hoists (see CPU_HOIST)")
    return p


# --- the programs: each one small function over the library's own API --------------------------


@dataclasses.dataclass
class Built:
    """A jitted program and its abstract arguments."""

    fn: object
    args: tuple
    kwargs: dict
    base: object  # the base params among the arguments
    shared: int = 0  # per-device bytes of an argument passed twice (one buffer on a device)
    library: tuple = ()  # (E_pad, R) of a split routed library: its gathers are counted


def abstract_base(cfg, mesh):
    """The base params as shapes laid out by the rules table (nothing built); with
    ``cfg.scan_layers`` the stacked tree, each block parameter led by ``layers`` (unsplit)."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from goose_jax.core import sharding
    from goose_jax.models.scan import per_layer, stack_layers
    from goose_jax.models.t5.model import T5, param_logical_axes

    ids = jax.ShapeDtypeStruct((1, 4), jnp.int32)
    flat = per_layer(cfg)
    shapes = nn.meta.unbox(jax.eval_shape(T5(flat).init, jax.random.key(0), ids, ids, ids))
    shapes = stack_layers(shapes["params"], cfg) if cfg.scan_layers else shapes["params"]
    return sharding.abstract(shapes, sharding.param_shardings(shapes, param_logical_axes(cfg),
                                                              mesh))


def abstract_library(cfg, lora, E, mesh, dtype):
    """E experts (init_experts' shapes) in ``dtype``, E over ``expert``."""
    import jax

    from goose_jax.core import sharding
    from goose_jax.experts.lora import init_experts

    shapes = jax.eval_shape(lambda: init_experts(cfg, lora, E, dtype=dtype))
    return sharding.abstract(shapes, sharding.leading_shardings(shapes, mesh))


def abstract_batch(tcfg, E, mesh):
    """One experts-step batch [E, A, M, L] / [E, A, M, T], laid out as global_batch lays it."""
    import jax
    import numpy as np

    from goose_jax.core import sharding

    lead = (E, tcfg.grad_accum, tcfg.micro_batch)
    shapes = {"inputs": jax.ShapeDtypeStruct(lead + (tcfg.max_input_length,), np.int32),
              "input_mask": jax.ShapeDtypeStruct(lead + (tcfg.max_input_length,), np.int32),
              "targets": jax.ShapeDtypeStruct(lead + (tcfg.max_target_length,), np.int32)}
    return sharding.abstract(shapes, sharding.batch_shardings(shapes, mesh, many=True))


def train_program(kind, cfg, tcfg, E, mesh, remat, scan):
    """goose-train's jitted step of kind "expert" or "gate", lowered for abstract inputs."""
    import jax

    from goose_jax.experts.lora import init_gates
    from goose_jax.models.scan import per_layer
    from goose_jax.training.program import Program

    lora = tcfg.lora
    tcfg = dataclasses.replace(tcfg, remat=remat)
    cfg = cfg.replace(scan_layers=scan)
    steps = tcfg.steps if kind == "expert" else tcfg.gate_steps
    program = Program(kind, cfg, tcfg, steps, lora.lora_scale, mesh=mesh)
    base = abstract_base(cfg, mesh)
    experts = abstract_library(per_layer(cfg), lora, E, mesh, cfg.dtype.param)  # user layout
    frozen, trainable = (None, experts) if kind == "expert" else (
        experts, jax.eval_shape(init_gates, experts))
    state = program.state_shapes(trainable)
    batch = abstract_batch(tcfg, E, mesh)
    args = (base, frozen, state, batch)
    return Built(program.step_fn(*args, donate=True), args, {}, base)


def routed_collections(cfg, lora, E, mesh, dtype):
    """PHATGOOSE top-2 over E experts as goose-eval runs it: ``build_routed``'s adapter (expert
    parallel on a mesh whose ``expert`` axis X > 1), and its collections as shapes.

    ``build_routed`` checks concrete arrays, so it builds from a two-expert stand-in without a
    mesh; the adapter is then given the mesh and the real count, as ``build_routed(...,
    mesh=mesh)`` sets them for a library padded to E_pad = ``padded_count(E, X)``. Its
    collections are declared at E_pad over ``expert``; with ``cfg.scan_layers`` stacked as the
    Evaluator stacks them, (Y, E_pad, ...): the expert axis is then axis 1."""
    import dataclasses

    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec

    from goose_jax.core import sharding
    from goose_jax.experts.lora import init_experts, init_gates
    from goose_jax.models.scan import per_layer, stack_layers
    from goose_jax.routing.methods import build_routed

    flat = per_layer(cfg)
    small = jax.eval_shape(lambda: init_experts(flat, lora, 2, dtype=dtype))
    experts = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), small)
    gates = jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype), jax.eval_shape(init_gates, small))
    routed = build_routed("phatgoose", flat, experts, gates=gates, top_k=2,
                          scale=lora.lora_scale)
    X = int(mesh.shape["expert"])
    E_pad = sharding.padded_count(E, X)
    adapter = dataclasses.replace(routed.adapter, mesh=mesh if X > 1 else None,
                                  num_experts=E if E_pad > E else 0)
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct((E_pad,) + x.shape[1:], x.dtype),
                          routed.collections)
    if not cfg.scan_layers:
        return adapter, sharding.abstract(shapes, sharding.leading_shardings(shapes, mesh))
    stacked = stack_layers(shapes, cfg)
    split = NamedSharding(mesh, PartitionSpec(None, "expert"))
    return adapter, sharding.abstract(stacked, split)


def batch_input(shape, mesh, dtype="int32"):
    import jax

    from goose_jax.core.sharding import batch_sharding

    return jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sharding(mesh, len(shape)))


def rank_program(cfg, lora, E, mesh):
    """goose-eval's rank classification scorer (``Evaluator.score_choices``'s jitted call)."""
    from goose_jax.models.t5.scoring import CHOICE_NLL

    adapter, collections = routed_collections(cfg, lora, E, mesh, cfg.dtype.param)
    variables = {"params": abstract_base(cfg, mesh), **collections}
    B, C, L, T = (RANK_SHAPE[k] for k in ("batch", "choices", "input_length", "target_length"))
    ids, mask = batch_input((B, L), mesh), batch_input((B, L), mesh)
    tgt, tmask = batch_input((B, C, T), mesh), batch_input((B, C, T), mesh)
    fn = CHOICE_NLL[False]  # the scorer Evaluator.score_choices calls (T5)
    # The encoder's and the decoder's variables are one tree (as the Evaluator passes them):
    # held once on a device. (jit drops the half of each copy its side does not use, so the
    # executable's argument bytes count it once too.)
    args = (cfg, adapter, variables, variables, ids, mask, tgt, tmask)
    return Built(fn, args, {"naive": False, "sites": ()}, variables["params"],
                 per_device_bytes(variables), library_shape(E, mesh, lora))


def generate_program(cfg, lora, E, mesh):
    """goose-eval's greedy decoder (``generate_greedy``'s jitted call), routed."""
    from goose_jax.models.t5 import generation

    adapter, collections = routed_collections(cfg, lora, E, mesh, cfg.dtype.param)
    variables = {"params": abstract_base(cfg, mesh), **collections}
    B, L, T = (GENERATE_SHAPE[k] for k in ("batch", "input_length", "new_tokens"))
    fn = generation._generate  # the decoder generate_greedy calls
    args = (cfg, variables, batch_input((B, L), mesh), batch_input((B, L), mesh), T)
    return Built(fn, args, {"adapter": adapter, "telemetry": False}, variables["params"],
                 library=library_shape(E, mesh, lora))


def library_shape(E, mesh, lora) -> tuple[int, int]:
    """(E_pad, R): the routed library's stacked experts on ``mesh`` and its rank."""
    from goose_jax.core.sharding import padded_count

    return padded_count(E, int(mesh.shape["expert"])), lora.rank


# --- measuring ------------------------------------------------------------------------------------


_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4,
                "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_COLLECTIVE = re.compile(r"=\s*(.*?)\s(" + "|".join(COLLECTIVES) + r")(-start)?\(")
_SHAPE = re.compile(r"\b(" + "|".join(_DTYPE_BYTES) + r")\[([\d,]*)\]")


def collectives(hlo: str) -> dict[str, tuple[int, int]]:
    """kind -> (instructions, result bytes) in the compiled HLO text."""
    out = {k: [0, 0] for k in COLLECTIVES}
    for line in hlo.splitlines():
        m = _COLLECTIVE.search(line)
        if not m:
            continue
        nbytes = 0
        for dtype, dims in _SHAPE.findall(m.group(1)):
            n = 1
            for d in filter(None, dims.split(",")):
                n *= int(d)
            nbytes += n * _DTYPE_BYTES[dtype]
        out[m.group(2)][0] += 1
        out[m.group(2)][1] += nbytes
    return {k: tuple(v) for k, v in out.items()}


def library_gathers(hlo: str, E_pad: int, R: int) -> int:
    """All-gathers whose result is a whole library leaf: an (E_pad, I, R) or (E_pad, R, O) block
    (optionally led by the layer axis). Expert parallelism gathers only (N, E) scores."""
    count = 0
    for line in hlo.splitlines():
        m = _COLLECTIVE.search(line)
        if not m or m.group(2) != "all-gather":
            continue
        for _, dims in _SHAPE.findall(m.group(1)):
            d = [int(x) for x in filter(None, dims.split(","))]
            if len(d) >= 3 and d[-3] == E_pad and R in d[-2:]:
                count += 1
                break
    return count


def per_device_bytes(tree) -> int:
    """Bytes one device holds of the abstract (sharded) leaves of ``tree`` (the largest share)."""
    import jax
    import numpy as np

    total = 0
    for x in jax.tree.leaves(tree):
        if isinstance(x, jax.ShapeDtypeStruct):
            shape = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
            total += int(np.prod(shape)) * np.dtype(x.dtype).itemsize
    return total


def fmt_gib(n: float) -> str:
    return f"{n / GIB:.2f}"


def build(name, setting, cfg, tcfg, mesh):
    lora = tcfg.lora
    if name in ("experts", "gate"):
        return train_program("expert" if name == "experts" else name, cfg, tcfg,
                             setting.train_experts or setting.experts, mesh, setting.remat,
                             setting.scan_train)
    scan = cfg.replace(scan_layers=True)  # as goose-eval compiles the XL scorer: one scanned block
    return (rank_program if name == "rank" else generate_program)(scan, lora, setting.experts,
                                                                  mesh)


def check_fits(setting, name, built: Built, mesh_text) -> None:
    """One line, before compiling, when the arguments alone exceed the chip."""
    from goose_jax.core.errors import ConfigError

    need = per_device_bytes(built.args) - built.shared
    chip = setting.chip_gib * GIB
    if need <= chip:
        return
    base = per_device_bytes(built.base)
    rest = need - base
    axis = ("`expert` axis (it splits the expert-stacked trees)" if rest >= base
            else "`model` axis (it splits the base's kernels)")
    raise ConfigError(
        f"setting {setting.name}, {name}: its arguments alone need {fmt_gib(need)} GiB per "
        f"device on {mesh_text}, {fmt_gib(need - chip)} GiB over the {setting.chip} chip's "
        f"{setting.chip_gib:g} GiB (base {fmt_gib(base)}, the rest {fmt_gib(rest)} GiB); a "
        f"larger {axis} would help: pass --mesh")


def measure(built: Built) -> dict:
    t0 = time.perf_counter()
    lowered = built.fn.lower(*built.args, **built.kwargs)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    mem = compiled.memory_analysis()
    sizes = {k: int(getattr(mem, f"{k}_size_in_bytes")) for k in
             ("argument", "output", "temp", "generated_code", "alias")}
    total = sizes["argument"] + sizes["output"] - sizes["alias"] + sizes["temp"] + \
        sizes["generated_code"]
    hlo = compiled.as_text()
    gathered = library_gathers(hlo, *built.library) if built.library else None
    return {**sizes, "total": total, "collectives": collectives(hlo), "library_gathers": gathered,
            "lower_s": t1 - t0, "compile_s": t2 - t1}


def load_config(name: str):
    from goose_jax.core.config_files import load_config as load
    from goose_jax.training.program import TrainConfig

    here = os.path.dirname(os.path.abspath(__file__))
    return load(os.path.join(here, "..", "configs", f"{name}.py"), TrainConfig)


def run(args) -> int:
    import jax

    from goose_jax.core import sharding
    from goose_jax.core.errors import UsageError
    from goose_jax.models.t5.config import T5Config

    devices = jax.devices()
    settings = [SETTINGS[s] for s in args.settings.split(",")]
    programs = args.programs.split(",")
    plan = []
    for s in settings:  # every request checked, and every fit estimated, before compiling
        tcfg = load_config(s.config)
        cfg = T5Config.preset("t5-xl-lm-adapt").replace(
            num_encoder_layers=args.layers, num_decoder_layers=args.layers).with_dtypes(
            tcfg.param_dtype, tcfg.compute_dtype)
        for name in (p for p in programs if p in s.programs):
            mesh_text = args.mesh or (s.train_mesh if name in ("experts", "gate") else s.eval_mesh)
            mesh = sharding.make_mesh(**sharding.parse_mesh(mesh_text), devices=devices[:s.devices])
            built = build(name, s, cfg, tcfg, mesh)
            check_fits(s, name, built, mesh_text)
            plan.append((s, mesh_text, name, built))
    if not plan:
        raise UsageError(f"no program of {programs} belongs to the settings {args.settings}")
    hoist = ("XLA:CPU's hoisted f32 kernel copies kept" if args.keep_cpu_hoist else
             "XLA:CPU's loop-invariant code motion off")
    print(f"T5-XL LM-adapt with {args.layers} + {args.layers} blocks, bf16; per device, GiB; "
          f"collectives: kind instructions/MiB of results; {hoist}")
    print("| setting | program | E | mesh | args | out | temp | code | total | chip | fraction "
          "| collectives | library gathers | compile s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    worst = (0.0, "")
    for s, mesh_text, name, built in plan:
        r = measure(built)
        frac = r["total"] / (s.chip_gib * GIB)
        coll = ", ".join(f"{k} {n}/{b / 2**20:.0f}" for k, (n, b) in r["collectives"].items()
                         if n) or "none"
        E = s.train_experts or s.experts if name in ("experts", "gate") else s.experts
        if built.library and built.library[0] != E:
            E = f"{E} ({built.library[0]})"  # padded with inert experts to a multiple of X
        gathers = "-" if r["library_gathers"] is None else r["library_gathers"]
        print(f"| {s.name} | {name} | {E} | {mesh_text} | {fmt_gib(r['argument'])} | "
              f"{fmt_gib(r['output'])} | {fmt_gib(r['temp'])} | "
              f"{fmt_gib(r['generated_code'])} | {fmt_gib(r['total'])} | {s.chip} "
              f"{s.chip_gib:g} | {frac:.2f} | {coll} | {gathers} | "
              f"{r['lower_s'] + r['compile_s']:.0f} |",
              flush=True)
        worst = max(worst, (frac, f"{s.name} {name}"))
    print(f"worst fraction of chip memory: {worst[0]:.2f} ({worst[1]})")
    return 0


def main(argv=None) -> int:
    parser = parse_args(argv)
    known = parser.parse_known_args(argv)[0]
    # The fake device count must be set before jax is imported.
    names = [s for s in known.settings.split(",") if s in SETTINGS]
    count = max([SETTINGS[s].devices for s in names] or [1])
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                   os.environ.get("XLA_FLAGS", ""))
    flags = f"{flags} --xla_force_host_platform_device_count={count}"
    if "--keep-cpu-hoist" not in (argv if argv is not None else sys.argv[1:]):
        flags = f"{flags} {CPU_HOIST}"
    os.environ["XLA_FLAGS"] = flags.strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

    from goose_jax.core.errors import UsageError
    from goose_jax.core.tool import run_tool

    def checked(args):
        bad = [s for s in args.settings.split(",") if s not in SETTINGS]
        badp = [p for p in args.programs.split(",") if p not in PROGRAMS]
        if bad or badp:
            raise UsageError(f"unknown {'setting' if bad else 'program'} "
                             f"{(bad or badp)[0]!r}; choose from "
                             f"{', '.join(SETTINGS if bad else PROGRAMS)}")
        if args.layers < 1:
            raise UsageError(f"--layers must be >= 1, got {args.layers}")
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


if __name__ == "__main__":
    sys.exit(main())
