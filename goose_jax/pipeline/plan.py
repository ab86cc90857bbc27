"""Will a run fit its chips: goose-train's and goose-eval's programs compiled ahead of time.

The jitted programs a run executes (the ``experts`` and ``gate`` train steps, the
rank-classification scorer, the greedy decoder) are lowered from abstract inputs
(``jax.ShapeDtypeStruct`` with shardings: nothing is materialised) for a mesh over either

- the devices of a real TPU topology (``tpu_devices``: ``jax.experimental.topologies``, which
  needs the ``libtpu`` wheel but no TPU): the TPU compiler itself compiles them, and its
  ``memory_analysis()`` and ``cost_analysis()`` are what a pod would see; or
- fake CPU devices (``XLA_FLAGS=--xla_force_host_platform_device_count=N``), compiled by XLA:CPU.

Per program, ``measure`` reads the memory analysis (argument, output, temporary and code bytes
per device; outputs aliasing donated arguments counted once), the collectives of the compiled
HLO and the cost analysis, and ``roofline`` turns FLOPs and bytes accessed into an estimated
step time against the chip's published peak (``CHIPS``). ``plan`` does it for a whole run
(``Run``) and ``advice`` says which mesh axis would make a program fit.

``bench/pod_plan.py`` (the paper's settings) and ``goose-plan`` (a user's run) both call this.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import time
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from goose_jax.core import sharding
from goose_jax.core.errors import ConfigError, UsageError
from goose_jax.experts.lora import init_experts, init_gates
from goose_jax.library.manifest import MANIFEST, base_config, read_manifest
from goose_jax.models import families
from goose_jax.models.base import RANDOM, random_config
from goose_jax.models.hf_folder import read_config_json
from goose_jax.models.scan import per_layer, stack_layers
from goose_jax.models.t5 import generation
from goose_jax.models.t5.model import T5, param_logical_axes
from goose_jax.models.t5.scoring import CHOICE_NLL
from goose_jax.routing.methods import build_routed
from goose_jax.training.program import Program

GIB = 1024**3
PROGRAMS = ("experts", "gate", "rank", "generate")
TRAIN_PROGRAMS = ("experts", "gate")
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
INSTALL = 'pip install "goose-jax[tpu-plan]"'


@dataclasses.dataclass(frozen=True)
class Chip:
    """One TPU generation's published per-chip figures."""

    name: str
    hbm_gib: float  # HBM per chip
    bf16_tflops: float  # peak dense bf16 matmul, TFLOP/s
    hbm_gbps: float  # HBM bandwidth, GB/s (1e9 bytes)
    cores_per_chip: int  # TensorCores a chip counts for in an accelerator name (v4-32: 16 chips)
    source: str


# Published figures (Google Cloud TPU documentation, the system architecture page of each chip).
CHIPS = {
    "v4": Chip("v4", 32, 275, 1200, 2, "cloud.google.com/tpu/docs/v4"),
    "v5e": Chip("v5e", 16, 197, 819, 1, "cloud.google.com/tpu/docs/v5e"),
    "v5p": Chip("v5p", 95, 459, 2765, 2, "cloud.google.com/tpu/docs/v5p"),
    "v6e": Chip("v6e", 32, 918, 1640, 1, "cloud.google.com/tpu/docs/v6e"),
}


@dataclasses.dataclass(frozen=True)
class Topology:
    """A TPU slice: its chip, how many chips, and the torus's shape."""

    chip: Chip
    chips: int
    shape: tuple[int, ...]  # chips along each axis of the torus

    @property
    def name(self) -> str:  # the accelerator type, as Cloud TPU names it
        return f"{self.chip.name}-{self.chips * self.chip.cores_per_chip}"

    @property
    def topology_name(self) -> str:  # as jax.experimental.topologies names it
        return f"{self.chip.name}:{'x'.join(map(str, self.shape))}"


def chip_shape(chip: Chip, chips: int) -> tuple[int, ...]:
    """The torus a slice of ``chips`` chips is: 2-D for v5e / v6e (4x4, 8x8, ...), 3-D for v4 /
    v5p (2x2x1, 2x2x2, 2x2x4, 2x4x4, 4x4x4, ...)."""
    if chips < 1 or chips & (chips - 1):
        raise UsageError(f"{chip.name}: {chips} chips is not a power of two")
    if chip.cores_per_chip == 1:
        a = 1 << (int(math.log2(chips)) // 2)
        return (a, chips // a)
    if chips < 4:
        return (1, 1, chips) if chips > 1 else (1, 1, 1)
    dims = [2, 2, 1]
    while math.prod(dims) < chips:  # grow the smallest axis, the last of equals first
        low = min(dims)
        dims[max(i for i, d in enumerate(dims) if d == low)] *= 2
    return tuple(dims)


def parse_topology(text: str) -> Topology:
    """``v5e-16``, ``v4-32``, ``v5p-8`` (Cloud TPU accelerator types: the number counts
    TensorCores, two a chip on v4 and v5p) or ``v5e:4x4`` (the torus itself)."""
    m = re.fullmatch(r"(v\d+[a-z]?)([-:])([\dx]+)", text.strip().lower())
    if not m or m.group(1) not in CHIPS:
        raise UsageError(f"topology {text!r}: expected CHIP-N or CHIP:AxB[xC] with CHIP one of "
                         f"{', '.join(CHIPS)} (e.g. v5e-16, v4-32, v5p-8, v5e:4x4)")
    chip = CHIPS[m.group(1)]
    if m.group(2) == ":":
        shape = tuple(int(x) for x in m.group(3).split("x") if x)
        return Topology(chip, math.prod(shape), shape)
    cores = int(m.group(3)) if m.group(3).isdigit() else 0
    if cores < 1 or cores % chip.cores_per_chip:
        raise UsageError(f"topology {text!r}: {chip.name} names count TensorCores, "
                         f"{chip.cores_per_chip} a chip; give a multiple of it")
    chips = cores // chip.cores_per_chip
    return Topology(chip, chips, chip_shape(chip, chips))


def libtpu_available() -> bool:
    """Whether the TPU compiler (the ``libtpu`` wheel) can be loaded on this machine."""
    try:
        import libtpu  # noqa: F401
    except ImportError:
        return False
    return True


def tpu_devices(topology: Topology) -> list:
    """The devices of ``topology``, from the TPU compiler, with no TPU attached."""
    from jax.experimental import topologies

    if not libtpu_available():
        raise ConfigError(f"compiling for a TPU needs the libtpu wheel: {INSTALL}")
    # No TPU is used, so several planning processes may load the compiler at once (libtpu
    # otherwise takes a machine-wide lock, meant for processes sharing real chips).
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    # v4 and v5p chips hold two TensorCores, run as one device ("megacore"), as on a pod.
    kwargs = {"chip_config_name": "megacore"} if topology.chip.cores_per_chip == 2 else {}
    desc = topologies.get_topology_desc(topology.topology_name, "tpu", **kwargs)
    devices = list(desc.devices)
    if len(devices) != topology.chips:
        raise ConfigError(f"{topology.name}: the TPU compiler gave {len(devices)} devices for "
                          f"{topology.chips} chips")
    return devices


# --- the programs: each one small function over the library's own API --------------------------


@dataclasses.dataclass
class Built:
    """A jitted program and its abstract arguments."""

    fn: Any
    args: tuple
    kwargs: dict
    base: Any  # the base params among the arguments
    shared: int = 0  # per-device bytes of an argument passed twice (one buffer on a device)
    library: tuple = ()  # (E_pad, R) of a split routed library: its gathers are counted
    stacked: int = 0  # per-device bytes of the expert-stacked arguments (library, its state)
    tokens: int = 0  # tokens one call of the program processes (all devices together)


def abstract_base(cfg, mesh):
    """The base params as shapes laid out by the rules table (nothing built); with
    ``cfg.scan_layers`` the stacked tree, each block parameter led by ``layers`` (unsplit)."""
    ids = jax.ShapeDtypeStruct((1, 4), jnp.int32)
    flat = per_layer(cfg)
    shapes = nn.meta.unbox(jax.eval_shape(T5(flat).init, jax.random.key(0), ids, ids, ids))
    shapes = stack_layers(shapes["params"], cfg) if cfg.scan_layers else shapes["params"]
    return sharding.abstract(shapes, sharding.param_shardings(shapes, param_logical_axes(cfg),
                                                              mesh))


def abstract_library(cfg, lora, E, mesh, dtype):
    """E experts (init_experts' shapes) in ``dtype``, E over ``expert``."""
    shapes = jax.eval_shape(lambda: init_experts(cfg, lora, E, dtype=dtype))
    return sharding.abstract(shapes, sharding.leading_shardings(shapes, mesh))


def abstract_batch(tcfg, E, mesh):
    """One experts-step batch [E, A, M, L] / [E, A, M, T], laid out as global_batch lays it."""
    lead = (E, tcfg.grad_accum, tcfg.micro_batch)
    shapes = {"inputs": jax.ShapeDtypeStruct(lead + (tcfg.max_input_length,), np.int32),
              "input_mask": jax.ShapeDtypeStruct(lead + (tcfg.max_input_length,), np.int32),
              "targets": jax.ShapeDtypeStruct(lead + (tcfg.max_target_length,), np.int32)}
    return sharding.abstract(shapes, sharding.batch_shardings(shapes, mesh, many=True))


def train_program(kind, cfg, tcfg, E, mesh, remat="block", scan=True) -> Built:
    """goose-train's jitted step of kind "expert" or "gate" for E experts at once."""
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
    tokens = E * tcfg.grad_accum * tcfg.micro_batch * (tcfg.max_input_length +
                                                       tcfg.max_target_length)
    return Built(program.step_fn(*args, donate=True), args, {}, base,
                 stacked=per_device_bytes((frozen, state)), tokens=tokens)


def routed_collections(cfg, lora, E, mesh, dtype, backend="auto"):
    """PHATGOOSE top-2 over E experts as goose-eval runs it: ``build_routed``'s adapter (expert
    parallel on a mesh whose ``expert`` axis X > 1), and its collections as shapes.

    ``build_routed`` checks concrete arrays, so it builds from a two-expert stand-in without a
    mesh; the adapter is then given the mesh and the real count, as ``build_routed(...,
    mesh=mesh)`` sets them for a library padded to E_pad = ``padded_count(E, X)``. Its
    collections are declared at E_pad over ``expert``; with ``cfg.scan_layers`` stacked as the
    Evaluator stacks them, (Y, E_pad, ...): the expert axis is then axis 1."""
    flat = per_layer(cfg)
    small = jax.eval_shape(lambda: init_experts(flat, lora, 2, dtype=dtype))
    experts = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), small)
    gates = jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype), jax.eval_shape(init_gates, small))
    routed = build_routed("phatgoose", flat, experts, gates=gates, top_k=2,
                          scale=lora.lora_scale, backend=backend)
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
    """An abstract int batch of ``shape`` sharded over ``mesh``'s batch axes."""
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.batch_sharding(mesh, len(shape)))


@dataclasses.dataclass(frozen=True)
class EvalShape:
    """goose-eval's batches: rank classification (B x C choices, L encoder and T decoder tokens)
    and generation (B x L encoder tokens, ``new_tokens`` generated)."""

    batch: int = 64
    choices: int = 4
    input_length: int = 256
    target_length: int = 8
    new_tokens: int = 8


def rank_program(cfg, lora, E, mesh, shape: EvalShape = EvalShape(), backend="auto") -> Built:
    """goose-eval's rank classification scorer (``Evaluator.score_choices``'s jitted call);
    E = 0: the base model alone (no routing)."""
    adapter, collections = (routed_collections(cfg, lora, E, mesh, cfg.dtype.param, backend)
                            if E else (None, {}))
    variables = {"params": abstract_base(cfg, mesh), **collections}
    B, C, L, T = shape.batch, shape.choices, shape.input_length, shape.target_length
    ids, mask = batch_input((B, L), mesh), batch_input((B, L), mesh)
    tgt, tmask = batch_input((B, C, T), mesh), batch_input((B, C, T), mesh)
    # The encoder's and the decoder's variables are one tree (as the Evaluator passes them):
    # held once on a device. (jit drops the half of each copy its side does not use, so the
    # executable's argument bytes count it once too.)
    args = (cfg, adapter, variables, variables, ids, mask, tgt, tmask)
    return Built(CHOICE_NLL[False], args, {"naive": False, "sites": ()}, variables["params"],
                 per_device_bytes(variables), library_shape(E, mesh, lora) if E else (),
                 stacked=per_device_bytes(collections), tokens=B * (L + C * T))


def generate_program(cfg, lora, E, mesh, shape: EvalShape = EvalShape(),
                     backend="auto") -> Built:
    """goose-eval's greedy decoder (``generate_greedy``'s jitted call), routed (E = 0: the base)."""
    adapter, collections = (routed_collections(cfg, lora, E, mesh, cfg.dtype.param, backend)
                            if E else (None, {}))
    variables = {"params": abstract_base(cfg, mesh), **collections}
    B, L, T = shape.batch, shape.input_length, shape.new_tokens
    args = (cfg, variables, batch_input((B, L), mesh), batch_input((B, L), mesh), T)
    return Built(generation.GREEDY, args, {"adapter": adapter, "telemetry": False},
                 variables["params"], library=library_shape(E, mesh, lora) if E else (),
                 stacked=per_device_bytes(collections), tokens=B * (L + T))


def library_shape(E, mesh, lora) -> tuple[int, int]:
    """(E_pad, R): the routed library's stacked experts on ``mesh`` and its rank."""
    return sharding.padded_count(E, int(mesh.shape["expert"])), lora.rank


# --- measuring ------------------------------------------------------------------------------------


DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4,
               "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_COLLECTIVE = re.compile(r"=\s*(.*?)\s(" + "|".join(COLLECTIVES) + r")(-start)?\(")
_SHAPE = re.compile(r"\b(" + "|".join(DTYPE_BYTES) + r")\[([\d,]*)\]")


def collectives(hlo: str) -> dict[str, tuple[int, int]]:
    """kind -> (instructions, result bytes) in the compiled HLO text (an instruction inside a
    loop counts once)."""
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
            nbytes += n * DTYPE_BYTES[dtype]
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
    total = 0
    for x in jax.tree.leaves(tree):
        if isinstance(x, jax.ShapeDtypeStruct):
            shape = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
            total += int(np.prod(shape)) * np.dtype(x.dtype).itemsize
    return total


def arguments_bytes(built: Built) -> int:
    """Per-device bytes of the arguments, exactly as laid out (known before compiling)."""
    return per_device_bytes(built.args) - built.shared


_OOM = re.compile(r"Used ([\d.]+)([KMGT]?) of ([\d.]+)([KMGT]?) hbm")
_UNIT = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def measure(built: Built, memory: bool = True) -> dict:
    """Compiles ``built``: the memory analysis (bytes per device; ``total`` counts aliased
    outputs once), the collectives, the library gathers, the cost analysis (``flops`` and
    ``bytes`` per device) and the lowering and compile seconds. A program the TPU compiler
    refuses for want of memory returns ``oom`` with the compiler's ``total`` instead."""
    t0 = time.perf_counter()
    lowered = built.fn.lower(*built.args, **built.kwargs)
    t1 = time.perf_counter()
    try:
        compiled = lowered.compile()
    except Exception as e:  # the TPU compiler's RESOURCE_EXHAUSTED: the program does not fit
        m = _OOM.search(str(e))
        if not m:
            raise
        used = float(m.group(1)) * _UNIT[m.group(2)]
        return {"oom": True, "total": int(used), "argument": arguments_bytes(built),
                "lower_s": t1 - t0, "compile_s": time.perf_counter() - t1}
    t2 = time.perf_counter()
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    cost = {"flops": float((cost or {}).get("flops", 0.0)),
            "bytes": float((cost or {}).get("bytes accessed", 0.0)),
            "lower_s": t1 - t0, "compile_s": t2 - t1}
    if not memory:
        return cost
    mem = compiled.memory_analysis()
    sizes = {k: int(getattr(mem, f"{k}_size_in_bytes")) for k in
             ("argument", "output", "temp", "generated_code", "alias")}
    total = sizes["argument"] + sizes["output"] - sizes["alias"] + sizes["temp"] + \
        sizes["generated_code"]
    hlo = compiled.as_text()
    gathered = library_gathers(hlo, *built.library) if built.library else None
    return {**sizes, **cost, "oom": False, "total": total, "collectives": collectives(hlo),
            "library_gathers": gathered}


def roofline(flops: float, nbytes: float, chip: Chip) -> float:
    """Estimated seconds of one call on one chip: the larger of its FLOPs at the chip's peak
    bf16 rate and its bytes at the HBM bandwidth (no overlap loss, no collectives counted)."""
    return max(flops / (chip.bf16_tflops * 1e12), nbytes / (chip.hbm_gbps * 1e9))


# --- a whole run ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Run:
    """What a user would run: the base, the library size, the training config, the meshes."""

    cfg: Any  # the base's config (a T5Config), dtypes set
    tcfg: Any  # the TrainConfig (micro batch, accumulation, lengths, LoRA rank)
    experts: int  # experts in the library (routed over at evaluation)
    train_experts: int  # experts one goose-train run trains at once
    train_mesh: str
    eval_mesh: str
    programs: tuple[str, ...] = PROGRAMS
    shape: EvalShape = EvalShape()
    remat: str = "block"
    backend: str = "auto"  # the routed programs' combination backend


def build(run: Run, name: str, devices: Sequence, scan: bool = True) -> tuple[str, Built]:
    """(mesh text, the program) of ``name`` in ``run`` on ``devices``; ``scan=False`` unrolls
    the blocks (``cost``'s compiles)."""
    mesh_text = run.train_mesh if name in TRAIN_PROGRAMS else run.eval_mesh
    try:
        mesh = sharding.make_mesh(**sharding.parse_mesh(mesh_text), devices=devices)
    except ConfigError as e:
        raise UsageError(f"mesh {mesh_text}: {e}; give axis sizes whose product is "
                         f"{len(devices)}") from None
    lora = run.tcfg.lora
    if name in TRAIN_PROGRAMS:
        built = train_program("expert" if name == "experts" else name, run.cfg, run.tcfg,
                              run.train_experts, mesh, run.remat, scan)
    else:
        cfg = run.cfg.replace(scan_layers=scan)  # as goose-eval compiles an XL scorer: scanned
        make = rank_program if name == "rank" else generate_program
        built = make(cfg, lora, run.experts, mesh, run.shape, run.backend)
    return mesh_text, built


def cost(run: Run, name: str, devices: Sequence) -> dict:
    """FLOPs and bytes accessed per device of one call of ``name``, from the compiler's cost
    analysis, at the run's depth.

    XLA's cost analysis counts the body of a loop once, whatever its trip count, so the scanned
    program under-counts its blocks. This compiles the program unrolled with 1 and with 2 blocks
    each side (small compiles) and extrapolates linearly to the run's depth. Loops other than the
    blocks are still counted once: generation's decode loop (its body is one of the
    ``new_tokens`` steps) and the ``grouped`` routing backend's scan over row blocks; those
    estimates are lower bounds.

    A train step's gradient accumulation is a loop too (a scan over ``grad_accum``
    microbatches): its cost is compiled with one microbatch and multiplied by ``grad_accum``,
    which counts the optimiser update (once a step, a few reads of the trainable state)
    ``grad_accum`` times instead of once."""
    accum = run.tcfg.grad_accum if name in TRAIN_PROGRAMS else 1
    one_micro = dataclasses.replace(run, tcfg=dataclasses.replace(run.tcfg, grad_accum=1))
    depth = (run.cfg.num_encoder_layers + run.cfg.num_decoder_layers) / 2
    out = []
    for layers in (1, 2) if depth != 1 else (1,):  # one block a side: no extrapolation
        cfg = run.cfg.replace(num_encoder_layers=layers, num_decoder_layers=layers)
        r = measure(build(dataclasses.replace(one_micro, cfg=cfg), name, devices,
                          scan=False)[1], memory=False)
        out.append(r)
    one, two = out[0], out[-1]
    return {k: accum * (one[k] + (depth - 1) * (two[k] - one[k])) for k in ("flops", "bytes")} | {
        "cost_s": sum(r["lower_s"] + r["compile_s"] for r in out)}


def advice(built: Built, total: float, chip_bytes: float, mesh_text: str) -> str:
    """Which mesh axis would bring ``total`` per device under the chip: the one splitting the
    largest part (the base: ``model``; expert-stacked trees: ``expert``; the rest, activations
    and temporaries: ``data``, or a smaller batch)."""
    base = per_device_bytes(built.base)
    stacked = built.stacked
    rest = max(total - base - stacked, 0)
    axes = sharding.parse_mesh(mesh_text)
    part, axis = max((base, "model"), (stacked, "expert"), (rest, "data"))
    half = total - part / 2
    what = {"model": "it splits the base's kernels", "expert": "it splits the expert-stacked "
            "trees", "data": "it splits the batch; or a smaller batch"}[axis]
    others = [a for a, n in axes.items() if a != axis and n > 1]
    source = f"halve `{others[0]}`" if others else "twice the chips"
    if others:  # the halved axis doubles the part it splits
        half += {"model": base, "expert": stacked, "data": rest}[others[0]]
    return (f"grow `{axis}` ({what}): {axis}={axes.get(axis, 1)} -> {2 * axes.get(axis, 1)} "
            f"({source}) about {half / chip_bytes:.2f} of the chip")


def check_arguments(built: Built, chip: Chip, where: str, mesh_text: str) -> None:
    """Raises ConfigError, before compiling, when the arguments alone exceed the chip."""
    need = arguments_bytes(built)
    chip_bytes = chip.hbm_gib * GIB
    if need <= chip_bytes:
        return
    base = per_device_bytes(built.base)
    rest = need - base
    axis = ("`expert` axis (it splits the expert-stacked trees)" if rest >= base
            else "`model` axis (it splits the base's kernels)")
    raise ConfigError(
        f"{where}: its arguments alone need {fmt_gib(need)} GiB per device on {mesh_text}, "
        f"{fmt_gib(need - chip_bytes)} GiB over the {chip.name} chip's {chip.hbm_gib:g} GiB "
        f"(base {fmt_gib(base)}, the rest {fmt_gib(rest)} GiB); a larger {axis} would help: "
        f"pass --mesh")


def fmt_gib(n: float) -> str:
    """``n`` bytes in GiB, two decimals."""
    return f"{n / GIB:.2f}"


def row(name: str, E: Any, mesh_text: str, built: Built, r: dict, chip: Chip,
        devices: int) -> dict:
    """One program's line of a plan: memory, fit, advice, estimated time and throughput."""
    chip_bytes = chip.hbm_gib * GIB
    frac = r["total"] / chip_bytes
    out = {"program": name, "E": E, "mesh": mesh_text, "fraction": frac, "fits": frac <= 1.0,
           **r, "compile_s": r["lower_s"] + r["compile_s"] + r.get("cost_s", 0.0)}
    out["advice"] = "" if frac <= 0.85 else advice(built, r["total"], chip_bytes, mesh_text)
    if not r.get("oom") and r.get("flops") and "cost_s" in r:  # depth-extrapolated costs only
        seconds = roofline(r["flops"], r["bytes"], chip)
        out["step_s"] = seconds
        out["bound"] = ("compute" if r["flops"] / (chip.bf16_tflops * 1e12) >=
                        r["bytes"] / (chip.hbm_gbps * 1e9) else "HBM")
        out["tokens_per_s_chip"] = built.tokens / seconds / devices if built.tokens else 0.0
    return out


def plan(run: Run, devices: Sequence, chip: Chip, *, compile_programs: bool = True,
         costs: bool = True, on_row=None) -> list[dict]:
    """Every program of ``run`` built, checked against ``chip`` and compiled on ``devices``;
    one row per program (``row``), each passed to ``on_row`` as it is measured. A program whose
    arguments alone exceed the chip is not compiled: its row says so (``args_only``). With
    ``costs`` the FLOPs and bytes are ``cost``'s (depth-extrapolated); without, the scanned
    program's own cost analysis (its blocks counted once)."""
    built = [(name,) + build(run, name, devices) for name in run.programs]
    rows = []
    for name, mesh_text, b in built:
        E = run.train_experts if name in TRAIN_PROGRAMS else run.experts
        if b.library and b.library[0] != E:
            E = f"{E} ({b.library[0]})"  # padded with inert experts to a multiple of X
        need = arguments_bytes(b)
        if need > chip.hbm_gib * GIB or not compile_programs:
            r = {"oom": need > chip.hbm_gib * GIB, "args_only": True, "total": need,
                 "argument": need, "lower_s": 0.0, "compile_s": 0.0}
        else:
            r = measure(b)
            if costs and not r["oom"]:
                r.update(cost(run, name, devices))
        rows.append(row(name, E, mesh_text, b, r, chip, len(devices)))
        if on_row is not None:
            on_row(rows[-1])
    return rows


def check_devices(count: int, available: int, what: str) -> None:
    """Raises UsageError when ``what`` needs more than the ``available`` devices."""
    if count > available:
        raise UsageError(f"{what} needs {count} devices, {available} available")


# --- a user's run, named as goose-train and goose-eval name it ------------------------------------


def resolve_base(spec: str | None, library: str | None):
    """The config of ``--base``: a preset name (``t5-xl-lm-adapt``), ``random:PRESET``, a Hugging
    Face directory (its config.json alone is read), or, without one, the base a library's
    manifest names. Only the T5 family's programs are planned."""
    if spec:
        if os.path.isdir(spec):
            d, source = read_config_json(spec)
            cfg = families.config_from_hf_dict(d, source=source)
        else:
            cfg = random_config(spec if spec.startswith(RANDOM) else RANDOM + spec)
    elif library and os.path.isdir(library):
        cfg = base_config(read_manifest(library), os.path.join(library, MANIFEST))
    else:
        raise UsageError("name the base: --base PRESET or DIRECTORY (or --library DIR, whose "
                         "manifest names it)")
    if families.of(cfg).decoder_only:
        raise UsageError(f"base {spec or library!r} is a {families.family(cfg)} model: only "
                         "encoder-decoder (T5) bases are planned so far (the plan builds the "
                         "T5's programs)")
    return cfg


def library_size(spec: str) -> int:
    """``--library``: a count of experts, or a library directory (its manifest's experts)."""
    if spec.isdigit():
        if int(spec) < 1:
            raise UsageError("--library: at least one expert")
        return int(spec)
    return len(read_manifest(spec)["experts"])
