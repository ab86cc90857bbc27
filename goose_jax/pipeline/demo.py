"""The whole PHATGOOSE pipeline on the built-in miniature world (``make demo`` / ``goose-demo``).

    summary = run_demo(DemoSettings(preset="small", out="demo_out"))

Stages (each cached under ``<out>/work``; a rerun reuses what is done):
  1. load the shipped miniature base (``goose_jax/assets/world_base``);
  2. one LoRA expert per held-in task, all trained at once;
  3. their PHATGOOSE gates, all at once (experts frozen);
  4. a multitask LoRA on the mixture of held-in tasks (the "multitask" baseline);
  5. router vectors of the other methods: average activation, Arrow, the retrieval index;
  6. every method on every held-in and held-out task;
  7. ``results.md``, ``results.json``, heatmaps, the library, and a plain-language summary.

With several seeds (``DemoSettings(seeds=(0, 1, 2))``, ``goose-demo --seeds 0,1,2``) each seed
runs in turn (its own library and cache; its tables under ``<out>/seed<N>/``), then
``results.md``, ``results.json`` and ``results.png`` give every table as the mean and range
over the seeds (``goose_jax.evaluation.paper_table``, the layout of ``goose-eval report``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import jax
import numpy as np

from goose_jax.core.checkpoint import check_folder_writable
from goose_jax.core.errors import CheckpointError, DataError, UsageError
from goose_jax.core.outputs import check_apart, run_lock
from goose_jax.core.progress import progress_enabled
from goose_jax.core.tensorfile import write_atomic
from goose_jax.data import batching, world
from goose_jax.evaluation import evaluator as ev
from goose_jax.evaluation.paper_table import best_expert, oracle
from goose_jax.evaluation.report import telemetry_table, write_heatmaps
from goose_jax.experts.lora import init_experts, init_gates
from goose_jax.library.prototypes import load_prototypes
from goose_jax.library.store import ExpertLibrary, save_prototypes
from goose_jax.models import families
from goose_jax.models.base import load_base
from goose_jax.pipeline.demo_seeds import report_seeds
from goose_jax.routing import retrieval
from goose_jax.routing.methods import build_routed, compute_average_activations
from goose_jax.training import program as training
from goose_jax.training.loop import train_loop

ASSET = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets",
                     "world_base")


@dataclasses.dataclass(frozen=True)
class Preset:
    """Sizes of one demo run (``full``: the README's numbers; ``small``: the smoke test)."""

    train_size: int = 4000      # training examples generated per held-in task
    expert_steps: int = 200
    expert_batch: int = 16
    gate_steps: int = 100
    multitask_steps: int = 200
    multitask_batch: int = 32
    lora_rank: int = 8
    lr: float = 5e-3
    eval_size: int = 64         # test examples per task
    prototype_examples: int = 128
    retrieval_examples: int = 200
    fast_compile: bool = False


PRESETS = {
    "full": Preset(),
    "small": Preset(train_size=400, expert_steps=30, expert_batch=8, gate_steps=10,
                    multitask_steps=30, multitask_batch=16, eval_size=8, prototype_examples=16,
                    retrieval_examples=16, fast_compile=True),
}


@dataclasses.dataclass(frozen=True)
class DemoSettings:
    """One demo run.

    Attributes:
      preset: a key of ``PRESETS``.
      out: the output folder (its ``work/`` subfolder caches every stage).
      seed: the seed of the data and the training.
      base: a different base model directory (HF format; None: the shipped miniature base).
      retrieval: run the retrieval baseline (it loads a sentence encoder).
      seeds: several seeds, run one after another and reported as mean and range (empty:
        ``seed`` alone).
    """

    preset: str = "full"
    out: str = "demo_out"
    seed: int = 0
    base: str | None = None
    retrieval: bool = True
    seeds: tuple[int, ...] = ()

    def __post_init__(self):
        if self.preset not in PRESETS:
            raise UsageError(f"unknown demo preset {self.preset!r}; expected one of "
                             f"{sorted(PRESETS)}")
        if len(set(self.seeds)) != len(self.seeds) or any(x < 0 for x in self.seeds):
            raise UsageError(f"--seeds {','.join(map(str, self.seeds))}: expected distinct "
                             "seeds >= 0")


def _say(msg: str) -> None:
    if jax.process_index() == 0:
        print(msg, flush=True)


class _Stages:
    """Timings of the stages, printed as they finish."""

    def __init__(self):
        self.t0 = time.perf_counter()
        self.times: dict[str, float] = {}

    def run(self, name: str, fn, *args, **kwargs):
        t = time.perf_counter()
        out = fn(*args, **kwargs)
        self.times[name] = time.perf_counter() - t
        _say(f"[{name}] {self.times[name]:.1f}s")
        return out


def load_world_base(path: str = ASSET):
    """(cfg, params) of the miniature base; a clear error if the files are missing."""

    # Any base format load_base reads is welcome; the shipped asset is one safetensors file.
    shipped = path == ASSET
    if not os.path.isdir(path) or (shipped and not os.path.isfile(
            os.path.join(path, "model.safetensors"))):
        fix = ("recreate it with `python train/make_world_base.py --overwrite`" if shipped else
               "pass an existing directory as --base (or leave it out for the shipped one)")
        raise CheckpointError(f"{path}: the miniature base is missing; {fix}")
    return load_base(path)


def _train_config(p: Preset, steps: int, batch: int, seed: int):
    return training.TrainConfig(steps=steps, gate_steps=p.gate_steps, lr=p.lr, warmup_ratio=0.06,
                                micro_batch=batch, grad_accum=1, seed=seed, max_input_length=24,
                                max_target_length=4, eval_every=0, checkpoint_every=50,
                                log_every=10, lora_rank=p.lora_rank, tokenizer="byte",
                                fast_compile=p.fast_compile)


def _batchers(tcfg, tok, cfg, names, size, seed):
    return [batching.Batcher.from_config(world.TaskSource(n, size, "train", seed), tok, tcfg,
                                         stream=i + 1, vocab_size=cfg.vocab_size)
            for i, n in enumerate(names)]


def train_experts(cfg, params, tok, p: Preset, seed: int, work: str, lib_path: str):
    """Stages 2-3: experts then gates; both written to the library at ``lib_path``."""

    names = [t.name for t in world.HELDIN]
    tcfg = _train_config(p, p.expert_steps, p.expert_batch, seed)
    lora = tcfg.lora
    lib = ExpertLibrary.create(lib_path, cfg, params, lora, exist_ok=True)
    if all(n in lib and lib.info(n).get("has_gate") for n in names):
        _say(f"experts and gates: reusing {lib_path}")
        return lib
    batchers = _batchers(tcfg, tok, cfg, names, p.train_size, seed)
    root = jax.random.key(seed)
    if not all(n in lib for n in names):
        init = init_experts(cfg, lora, [jax.random.fold_in(root, i + 1)
                                                      for i in range(len(names))],
                                          fast_compile=p.fast_compile)
        program = training.Program("expert", cfg, tcfg, tcfg.steps, lora.lora_scale)
        state, hist, _ = train_loop(program, params, None, init, batchers,
                                    os.path.join(work, "experts"),
                                    desc=f"{len(names)} experts at once", seed_key=root)
        for i, n in enumerate(names):
            lib.add(n, state.trainable, index=i, overwrite=True,
                    info={"data": f"world/{n} (train, seed {seed})", "steps": tcfg.steps,
                          "loss": float(np.asarray(hist["loss"])[i])})
    experts, _ = lib.load(names, gates=False)
    program = training.Program("gate", cfg, tcfg, p.gate_steps, lib.scale)
    state, hist, _ = train_loop(program, params, experts, init_gates(experts), batchers,
                                os.path.join(work, "gates"),
                                desc=f"{len(names)} gates at once", seed_key=root)
    for i, n in enumerate(names):
        info = lib.info(n)
        info["gate_loss"] = float(np.asarray(hist["loss"])[i])
        lib.add(n, experts, state.trainable, index=i, info=info, overwrite=True)
    return lib


def train_multitask(cfg, params, tok, p: Preset, seed: int, work: str, lib_path: str):
    """Stage 4: one LoRA on the mixture of all held-in tasks (library of one expert)."""

    tcfg = _train_config(p, p.multitask_steps, p.multitask_batch, seed)
    lib = ExpertLibrary.create(lib_path, cfg, params, tcfg.lora, exist_ok=True)
    if "multitask" in lib:
        return lib
    names = [t.name for t in world.HELDIN]
    mixture = batching.ConcatSource([world.TaskSource(n, p.train_size, "train", seed)
                                     for n in names])
    batcher = batching.Batcher.from_config(mixture, tok, tcfg, stream=99,
                                           vocab_size=cfg.vocab_size)
    key = jax.random.key(seed + 99)
    init = init_experts(cfg, tcfg.lora, [key], fast_compile=p.fast_compile)
    program = training.Program("expert", cfg, tcfg, tcfg.steps, tcfg.lora.lora_scale,
                               many=False)
    state, hist, _ = train_loop(program, params, None, init, [batcher],
                                os.path.join(work, "multitask"), desc="multitask LoRA",
                                seed_key=key)
    lib.add("multitask", state.trainable, index=0, overwrite=True,
            info={"data": "mixture of the world's held-in tasks", "steps": tcfg.steps,
                  "loss": float(np.asarray(hist["loss"]))})
    return lib


def average_activations(cfg, params, tok, experts, scale, p: Preset, seed: int, path: str):
    """Stage 5a: per-site mean inputs of each expert's own training examples (cached)."""

    if os.path.isfile(path):  # the file format goose-eval --prototypes reads
        return load_prototypes(path)
    names = [t.name for t in world.HELDIN]
    tcfg = _train_config(p, 1, min(p.prototype_examples, 64), seed)
    batches = []
    for i, n in enumerate(names):
        b = batching.Batcher.from_config(world.TaskSource(n, p.train_size, "train", seed), tok,
                                         tcfg, stream=i + 1, vocab_size=cfg.vocab_size)
        rows = []
        for pos in range(0, p.prototype_examples, b.batch_size):
            x = {k: v[0] for k, v in b.batch(pos).items()}   # one micro-batch
            rows.append(families.of(cfg).activation_batch(cfg, x, tok))
        batches.append(rows)
    # Token pooling, as the demo's published numbers were measured (the release pools per
    # example, the library's default).
    protos = compute_average_activations(cfg, params, experts, batches, scale=scale,
                                         pooling="token")
    save_prototypes(protos, path)
    return protos


def _retrieval_chooser(names, examples, p: Preset, seed: int, lib_path: str):
    """Stage 5b: the retrieval baseline's per-example expert choice; its index is saved in the
    library (``goose-eval --method retrieval --library ...`` reads it there)."""

    path = os.path.join(lib_path, retrieval.INDEX_FILE)
    embedder = retrieval.SentenceEmbedder.load()
    if os.path.isfile(path):
        index = retrieval.RetrievalIndex.load(path)
    else:
        queries = {}
        for n in names:
            exs = [world.make_example(n, "train", i, seed) for i in range(p.retrieval_examples)]
            queries[n] = [retrieval.format_query(e.input, e.choices) for e in exs]
        index = retrieval.RetrievalIndex.build(queries, embedder,
                                               max_per_expert=p.retrieval_examples, seed=seed)
        index.save(path)
    return retrieval.expert_chooser(index, embedder, examples)


# --- evaluation ----------------------------------------------------------------------------------


def _evaluate(name, cfg, params, tok, routed, tasks, examples, cache: str, *, chooser=None,
              telemetry=False, fixed_expert=None):
    """Runs one method over every task; cached as JSON in ``cache``."""

    if os.path.isfile(cache):
        with open(cache) as f:
            return json.load(f)
    if fixed_expert is not None:
        def chooser(exs, _e=fixed_expert):
            return [_e] * len(exs)
    evaluator = ev.Evaluator(cfg, params, tok, routed, batch_size=32, max_input_length=24,
                             max_target_length=4, telemetry=telemetry, choose_experts=chooser,
                             fixed_shapes=True, fast_compile=True)
    results = ev.evaluate(evaluator, tasks, examples=examples, progress=_progress())
    out = {"scores": {k.removeprefix("world/"): r.score for k, r in results.items()},
           "telemetry": telemetry_table(results) if telemetry else {}}
    write_atomic(cache, json.dumps(out))
    _say(f"  {name}: " + ", ".join(f"{k.split('_')[0]} {v:.0f}"
                                    for k, v in out["scores"].items()))
    return out


def _progress() -> bool:
    return progress_enabled() and jax.process_index() == 0


def agreement(telemetry: dict, names: list[str]) -> dict[str, float]:
    """Per site: the share of held-in tokens whose top-1 expert is their own task's expert."""
    out = {}
    for site, by_dataset in telemetry.items():
        hits = total = 0.0
        for dataset, counts in by_dataset.items():
            task = dataset.removeprefix("world/")
            if task in names:
                counts = np.asarray(counts, np.float64)
                hits += counts[names.index(task)]
                total += counts.sum()
        if total:
            out[site] = hits / total
    return out


def _by_layer(per_site: dict[str, float]) -> dict[str, float]:
    groups: dict[str, list[float]] = {}
    for site, v in per_site.items():
        groups.setdefault("/".join(site.split("/")[:2]), []).append(v)
    return {k: float(np.mean(v)) for k, v in groups.items()}


def check_out(out: str) -> None:
    """Fails before any work unless ``out`` is missing, empty, or an earlier demo's output (a
    rerun reuses its finished stages): the demo never writes into another folder's files.

    Raises:
      DataError: ``out`` is a file or lies below one, or is a folder of something else.
    """

    check_folder_writable(out, error=DataError, fix="; pass another --out")
    if os.path.isdir(out) and os.listdir(out) and not os.path.isdir(os.path.join(out, "work")):
        raise DataError(f"{out}: not empty and not a goose-demo output folder (no work/); pass "
                        "another --out")


def run_demo(settings: DemoSettings) -> dict:
    """Runs every stage (each reused when cached under ``<out>/work``); writes ``results.md``,
    ``results.json`` and the heatmaps to ``settings.out``; returns the summary (results.json).
    With several ``seeds``: each seed's outputs go to ``<out>/seed<N>/`` and the results files
    to ``out`` hold every table as the mean and range over the seeds."""

    check_apart({"--out": settings.out}, {"--base": settings.base})
    check_out(settings.out)
    with run_lock(settings.out, prog="goose-demo"):
        return _run_seeds(settings)


def _run_seeds(settings: DemoSettings) -> dict:
    if len(settings.seeds) > 1:

        out = os.path.abspath(settings.out)
        summaries = [_run_one(dataclasses.replace(settings, seed=s),
                              os.path.join(out, f"seed{s}")) for s in settings.seeds]
        summary = report_seeds(summaries, out, settings.preset)
        _say(summary["plain_summary"])
        return summary
    if settings.seeds:
        settings = dataclasses.replace(settings, seed=settings.seeds[0])
    return _run_one(settings, os.path.abspath(settings.out))


def _run_one(settings: DemoSettings, dest: str) -> dict:
    """One seed's run; its tables, heatmaps and summary go to ``dest``."""

    p = PRESETS[settings.preset]
    out = os.path.abspath(settings.out)
    work = os.path.join(out, "work", f"{settings.preset}_seed{settings.seed}")
    os.makedirs(work, exist_ok=True)
    stages = _Stages()
    tok = world.WorldTokenizer()
    cfg, params = stages.run("load base", load_world_base, settings.base or ASSET)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params))
    _say(f"miniature base: T5 v1.1-style, d_model {cfg.d_model}, {cfg.num_encoder_layers}+"
         f"{cfg.num_decoder_layers} blocks, {n_params:,} parameters, vocabulary "
         f"{tok.vocab_size} words; preset {settings.preset}, seed {settings.seed}")
    names = [t.name for t in world.HELDIN]
    lib_path = os.path.join(out, f"library_{settings.preset}_seed{settings.seed}")
    lib = stages.run("experts + gates", train_experts, cfg, params, tok, p, settings.seed, work,
                     lib_path)
    mt_lib = stages.run("multitask", train_multitask, cfg, params, tok, p, settings.seed, work,
                        os.path.join(work, "multitask_library"))
    experts, gates = lib.load(names)
    scale = lib.scale
    protos = stages.run("average activations", average_activations, cfg, params, tok, experts,
                        scale, p, settings.seed, os.path.join(work, "prototypes.safetensors"))

    tasks = world.eval_tasks(split="test", size=p.eval_size, seed=settings.seed)
    examples = {t.name: t.load() for t in tasks}
    all_examples = [e for v in examples.values() for e in v]
    ev_dir = os.path.join(work, "eval")
    os.makedirs(ev_dir, exist_ok=True)

    timings: dict[str, float] = {}

    def evaluate_all():
        res = {}
        mt, _ = mt_lib.load(["multitask"], gates=False)
        plan = [
            ("base", build_routed("base", cfg), {}),
            ("multitask", build_routed("example", cfg, mt, scale=mt_lib.scale),
             {"fixed_expert": 0}),
            ("merged", build_routed("merged", cfg, experts, scale=scale), {}),
            ("average_activation", build_routed("average_activation", cfg, experts,
                                                prototypes=protos, top_k=2, scale=scale),
             {"telemetry": True}),
            ("arrow", build_routed("arrow", cfg, experts, top_k=2, scale=scale),
             {"telemetry": True}),
            ("phatgoose_k1", build_routed("phatgoose", cfg, experts, gates=gates, top_k=1,
                                          scale=scale), {"telemetry": True}),
            ("phatgoose_k2", build_routed("phatgoose", cfg, experts, gates=gates, top_k=2,
                                          scale=scale), {"telemetry": True}),
        ]
        one_each = build_routed("example", cfg, experts, scale=scale)
        for i, n in enumerate(names):
            plan.append((f"expert:{n}", one_each, {"fixed_expert": i}))
        if settings.retrieval:
            chooser = _retrieval_chooser(names, all_examples, p, settings.seed, lib.path)
            plan.insert(5, ("retrieval", one_each, {"chooser": chooser}))
        for method, routed, kw in plan:
            cache = os.path.join(ev_dir, method.replace(":", "_") + ".json")
            t = time.perf_counter()
            res[method] = _evaluate(method, cfg, params, tok, routed, tasks, examples, cache,
                                    **kw)
            timings[method] = time.perf_counter() - t
        return res

    res = stages.run("evaluation", evaluate_all)
    os.makedirs(dest, exist_ok=True)
    summary = stages.run("report", report, res, names, lib, dest, settings, stages)
    summary["method_seconds"] = {k: round(v, 1) for k, v in timings.items()}
    total = time.perf_counter() - stages.t0
    summary["seconds"] = round(total, 1)
    write_atomic(os.path.join(dest, "results.json"), json.dumps(summary, indent=2))
    _say(summary["plain_summary"])
    _say(f"\ngoose-demo finished in {total / 60:.1f} min (model part); outputs in {dest}")
    return summary


def report(res: dict, names: list[str], lib, out: str, settings: DemoSettings, stages) -> dict:
    """Tables, heatmaps and the summary (stage 7)."""

    heldin = [t.name for t in world.HELDIN]
    heldout = [t.name for t in world.HELDOUT]
    scores = {m: r["scores"] for m, r in res.items()}
    singles = {m.split(":", 1)[1]: s for m, s in scores.items() if m.startswith("expert:")}
    table = {m: s for m, s in scores.items() if not m.startswith("expert:")}
    table["oracle"] = oracle(singles)

    def mean(s, group):
        return float(np.mean([s[t] for t in group]))

    best = {g: best_expert(singles, grp) for g, grp in (("held-in", heldin),
                                                        ("held-out", heldout))}
    table["best_individual"] = {**{t: singles[best["held-in"]][t] for t in heldin},
                                **{t: singles[best["held-out"]][t] for t in heldout}}
    means = {m: {"held-in": mean(s, heldin), "held-out": mean(s, heldout)}
             for m, s in table.items()}
    own = {n: singles[n][n] for n in names}
    agree = {m: agreement(r["telemetry"], names) for m, r in res.items() if r.get("telemetry")}
    agree_summary = {m: {"mean": float(np.mean(list(a.values()))), "by_layer": _by_layer(a)}
                     for m, a in agree.items() if a}
    heatmaps = []
    if res.get("phatgoose_k2", {}).get("telemetry"):
        heatmaps = write_heatmaps(res["phatgoose_k2"]["telemetry"], names,
                                  os.path.join(out, "heatmaps"))
    lines = [f"# goose-demo results (preset {settings.preset}, seed {settings.seed})", "",
             "Scores in percent: accuracy (rank classification) or exact match (generation). "
             "Oracle and best individual pick experts with the test labels (not zero-shot).", "",
             "| method | held-in mean | held-out mean |", "|---|---:|---:|"]
    for m, v in means.items():
        lines.append(f"| {m} | {v['held-in']:.1f} | {v['held-out']:.1f} |")
    lines += ["", "## Per task", "",
              "| task | " + " | ".join(table) + " |", "|---|" + "---:|" * len(table)]
    for t in heldin + heldout:
        tag = "" if t in heldin else f" (held-out: {world.TASKS[t].kind_of_heldout})"
        lines.append(f"| {t}{tag} | " + " | ".join(f"{table[m][t]:.0f}" for m in table) + " |")
    lines += ["", "## Each expert on its own task vs the base model", "",
              "| expert | own task | base |", "|---|---:|---:|"]
    for n in names:
        lines.append(f"| {n} | {own[n]:.0f} | {table['base'][n]:.0f} |")
    lines += ["", "## Per-token top-1 agreement with the task's own expert (held-in tasks)", "",
              f"Chance is {1 / len(names):.3f}.", ""]
    if agree_summary:
        layers = list(next(iter(agree_summary.values()))["by_layer"])
        lines += ["| method | mean over sites | " + " | ".join(layers) + " |",
                  "|---|---:|" + "---:|" * len(layers)]
    for m, a in agree_summary.items():
        lines.append(f"| {m} | {a['mean']:.3f} | " + " | ".join(
            f"{v:.2f}" for v in a["by_layer"].values()) + " |")
    lines += ["", "Stage times: " + ", ".join(f"{k} {v:.0f}s" for k, v in stages.times.items())]
    write_atomic(os.path.join(out, "results.md"), "\n".join(lines) + "\n")
    pg = means.get("phatgoose_k2", {})
    summary_lines = [
        "", "What happened:",
        f"- Each of the {len(names)} experts scores {np.mean(list(own.values())):.0f}% on its "
        f"own task on average, against {np.mean([table['base'][n] for n in names]):.0f}% for "
        "the base model.",
        f"- Held-in mean: PHATGOOSE (k=2) {pg.get('held-in', float('nan')):.1f}, merged "
        f"experts {means['merged']['held-in']:.1f}, base {means['base']['held-in']:.1f}, "
        f"multitask {means['multitask']['held-in']:.1f}.",
        f"- Held-out mean: PHATGOOSE (k=2) {pg.get('held-out', float('nan')):.1f}; best other "
        "zero-shot method " + _best_other(means) + ".",
    ]
    if "phatgoose_k2" in agree_summary:
        summary_lines.append(
            f"- PHATGOOSE sends {agree_summary['phatgoose_k2']['mean']:.0%} of held-in tokens "
            f"(averaged over sites) first to their own task's expert (chance "
            f"{1 / len(names):.0%}).")
    summary_lines.append(f"- Table: {os.path.join(out, 'results.md')}; heatmaps: "
                         f"{len(heatmaps)} PNGs in {os.path.join(out, 'heatmaps')}; library: "
                         f"{lib.path}")
    return {"preset": settings.preset, "seed": settings.seed, "scores": table, "means": means,
            "experts": singles, "own_task": own, "best_individual": best,
            "agreement": agree_summary, "agreement_per_site": agree, "stage_seconds": stages.times,
            "heatmaps": heatmaps, "library": lib.path,
            "plain_summary": "\n".join(summary_lines)}


_ZERO_SHOT = ("base", "multitask", "merged", "average_activation", "arrow", "retrieval",
              "phatgoose_k1")


def _best_other(means: dict) -> str:
    cands = [(v["held-out"], m) for m, v in means.items() if m in _ZERO_SHOT]
    score, m = max(cands)
    return f"{m} {score:.1f}"
