"""What routing telemetry costs an evaluation: the Evaluator with telemetry on against off.

One process: the miniature world's base (goose_jax/assets/world_base), PHATGOOSE (top-2) over a
seeded random library of one expert per held-in task at every site, every world task (rank
classification and generation) at the demo's evaluation settings. Compilation is excluded (one
warm-up pass each); timed passes alternate between on and off. The last line is the ratio of the
medians, on over off.

    python bench/telemetry.py
    python bench/telemetry.py --examples 64 --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import numpy as np
from calibrate import print_calibration

from goose_jax.core.trees import flatten_sites, nest_sites
from goose_jax.data import world
from goose_jax.evaluation import evaluator as ev
from goose_jax.experts.lora import LoRAConfig, init_experts
from goose_jax.pipeline.demo import load_world_base
from goose_jax.routing.methods import build_routed


def random_library(cfg, num_experts: int, seed: int = 0):
    """Experts with non-zero A and B and random gates, so routing has something to choose."""
    rng = np.random.default_rng(seed)
    experts = init_experts(cfg, LoRAConfig(rank=8, sites=".*"), num_experts, seed)
    flat = flatten_sites(experts)
    experts = nest_sites({s: {"lora_a": v["lora_a"],
                              "lora_b": rng.normal(0, 0.02, v["lora_b"].shape).astype(np.float32)}
                          for s, v in flat.items()})
    gates = nest_sites({s: {"gate": rng.normal(0, 1, v["lora_a"].shape[:2]).astype(np.float32)}
                        for s, v in flat.items()})
    return experts, gates


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=64, help="test examples per world task")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    print_calibration()

    cfg, params = load_world_base()
    tok = world.WorldTokenizer()
    experts, gates = random_library(cfg, len(world.HELDIN))
    routed = build_routed("phatgoose", cfg, experts, gates=gates, top_k=2, scale=2.0)
    tasks = world.eval_tasks(split="test", size=args.examples, seed=0)
    examples = {t.name: t.load() for t in tasks}
    kinds = {t.name: t.kind for t in tasks}
    print(f"{len(tasks)} world tasks x {args.examples} examples "
          f"({sum(k == 'rank' for k in kinds.values())} rank classification, "
          f"{sum(k == 'generate' for k in kinds.values())} generation), "
          f"{len(world.HELDIN)} experts, {jax.device_count()} device(s)")

    def evaluator(telemetry: bool):
        return ev.Evaluator(cfg, params, tok, routed, batch_size=32, max_input_length=24,
                            max_target_length=4, telemetry=telemetry, fixed_shapes=True,
                            fast_compile=True)

    runs = {"on": evaluator(True), "off": evaluator(False)}

    def once(e):
        t0 = time.perf_counter()
        ev.evaluate(e, tasks, examples=examples, progress=False)
        return time.perf_counter() - t0

    for name, e in runs.items():
        print(f"telemetry {name}: first pass (compiles) {once(e):.2f} s")
    times = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, e in runs.items():
            times[name].append(once(e))
    med = {name: statistics.median(t) for name, t in times.items()}
    for name in runs:
        print(f"telemetry {name}: median {med[name]:.3f} s over {args.repeats} "
              f"(min {min(times[name]):.3f}, max {max(times[name]):.3f})")
    print(f"telemetry on / off: {med['on'] / med['off']:.3f}")


if __name__ == "__main__":
    main()
