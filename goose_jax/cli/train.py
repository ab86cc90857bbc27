"""``goose-train``: train LoRA experts, PHATGOOSE gates and multitask baselines.

    goose-train expert    --config C --base B --data task.jsonl --library LIB --workdir W
    goose-train experts   --config C --base B --data a.jsonl b.jsonl ... --library LIB --workdir W
    goose-train gate      --config C --base B --data a.jsonl ... --names a ... --library LIB
                          --workdir W
    goose-train multitask --config C --base B --data a.jsonl b.jsonl ... --workdir W
                          (--library LIB | --set multitask_mode=full --out MODEL_DIR)

``--config`` is a python file whose ``get_config()`` returns a ``TrainConfig`` (default: the
paper's settings); ``--set key=value`` overrides any field, typed by the field's type. ``--base``
is a local Hugging Face T5 directory, a goose-jax (Orbax) model checkpoint, or ``random:PRESET``.
``--data`` files are JSON lines ``{"input": ..., "target": ...}``: one per expert (``experts``,
``gate``), or the mixture (``multitask``).

``experts`` trains all its experts in one jitted step, side by side. An expert's initialisation
and data order depend on the seed and its name only, so it is the same expert whether trained
alone (``expert``) or with others. ``gate`` trains the gates of experts already in the library
(base and LoRA frozen) and writes them into those experts' files.

Resumable: the work directory keeps the last checkpoints (trainable trees, optimiser state,
step, data positions) and ``run.json``; rerunning the same command after an interruption
continues from the last checkpoint and ends with the same parameters as an uninterrupted run.
Metrics go to ``metrics.jsonl`` in the work directory (and TensorBoard, if ``tensorboardX`` is
installed). A user error prints one line and exits 1; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import logging
import math
import os
import sys
import time
import types
import typing
import zlib
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from goose_jax import distributed
from goose_jax.errors import DataError, GooseError, TrainConfigError

PROG = "goose-train"


# --- configs -------------------------------------------------------------------------------------


def load_config(path: str | None):
    """The ``TrainConfig`` a config file's ``get_config()`` returns; the defaults for None."""
    from goose_jax.training import TrainConfig

    if path is None:
        return TrainConfig()
    if not os.path.isfile(path):
        raise TrainConfigError(f"{path}: config file does not exist")
    spec = importlib.util.spec_from_file_location(f"_goose_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # a config file is user code: report any failure as one line
        raise TrainConfigError(f"{path}: cannot load the config: {type(e).__name__}: {e}"
                               ) from None
    if not callable(getattr(module, "get_config", None)):
        raise TrainConfigError(f"{path}: defines no get_config()")
    cfg = module.get_config()
    if not isinstance(cfg, TrainConfig):
        raise TrainConfigError(f"{path}: get_config() returned {type(cfg).__name__}, expected "
                               "goose_jax.training.TrainConfig")
    return cfg


def _parse_value(name: str, text: str, typ: Any) -> Any:
    if typing.get_origin(typ) in (typing.Union, types.UnionType):
        if text.lower() in ("none", "null"):
            return None
        typ = next(a for a in typing.get_args(typ) if a is not type(None))
    if typing.get_origin(typ) is tuple:
        return tuple(s.strip() for s in text.split(",") if s.strip())
    if typ is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError("expected true or false")
    return typ(text)


def apply_overrides(cfg, overrides: Sequence[str]):
    """``cfg`` with ``key=value`` overrides, each value parsed by its field's declared type."""
    hints = typing.get_type_hints(type(cfg))
    changes = {}
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or key not in hints:
            known = ", ".join(f.name for f in dataclasses.fields(cfg))
            raise TrainConfigError(f"--set {item!r}: expected KEY=VALUE with KEY one of: {known}")
        try:
            changes[key] = _parse_value(key, text.strip(), hints[key])
        except (ValueError, StopIteration) as e:
            raise TrainConfigError(f"--set {item!r}: cannot parse as {hints[key]}: {e}") from None
    return cfg.replace(**changes)


# --- base model and tokenizer --------------------------------------------------------------------


def load_base(spec: str, tcfg):
    """(cfg, params, tokenizer) of ``spec`` (a directory or ``random:PRESET``)."""
    from goose_jax.base_model import load_base as load
    from goose_jax.base_model import load_tokenizer
    from goose_jax.data.tokenizers import ByteTokenizer

    byte = tcfg.tokenizer == "byte"
    if spec and spec.startswith("random:") and not byte:
        raise TrainConfigError(f"base {spec!r} has no tokenizer: use --set tokenizer=byte")
    cfg, params = load(spec, seed=tcfg.seed,
                       min_vocab_size=ByteTokenizer().vocab_size if byte else 0)
    return cfg, params, load_tokenizer(spec, cfg, byte=byte)


# --- the training loop ---------------------------------------------------------------------------


def _progress_enabled() -> bool:
    from goose_jax.interop.hf import progress_enabled

    return progress_enabled()


def _tensorboard(workdir: str):
    if importlib.util.find_spec("tensorboardX") is None:
        return None
    from tensorboardX import SummaryWriter

    return SummaryWriter(os.path.join(workdir, "tensorboard"))


def _to_json(metrics: dict) -> dict:
    # On a mesh that spans processes, per-expert metrics live on several hosts: every process
    # gathers them (a collective), and only process 0 writes them.
    out = {}
    for k, v in distributed.fetch(metrics).items():
        v = np.asarray(v)
        out[k] = v.tolist() if v.ndim else float(v)
    return out


def _truncate_metrics(path: str, last_step: int) -> None:
    # Lines logged after the checkpoint we resume from are logged again by this run.
    if not os.path.exists(path):
        return
    with open(path) as f:
        keep = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= last_step]
    with open(path, "w") as f:
        f.writelines(keep)


def _expert_metrics(history: dict, i: int) -> dict:
    """Expert ``i`` 's share of a many-experts history (per-expert lists; scalars shared)."""
    return {k: (v[i] if isinstance(v, list) else v) for k, v in history.items()}


def _mean(v) -> float:
    return float(np.mean(v))


def train_loop(program, base, frozen, trainable, batchers, workdir: str, *,
               eval_batchers=None, mesh=None, desc: str = "train", seed_key=None):
    """Runs (or resumes) ``program`` to ``program.steps``.

    Returns:
      (state, last metrics, steps run by this call): 0 steps when the work directory already
      held the finished run.

    Args:
      program: a ``training.Program``.
      base, frozen: the frozen trees (see ``Program.step``).
      trainable: the initial trainable tree (ignored when a checkpoint exists).
      batchers: one ``Batcher`` per expert stream (``program.many``), or a one-element list.
      workdir: where checkpoints and metrics live.
      eval_batchers: optional batchers evaluated every ``eval_every`` steps (and at step 0).
      mesh: optional mesh; the expert axis is split over its ``expert`` axis.
      desc: progress-bar label.
      seed_key: the run's RNG (saved with the state; kept for dropout and sampling to come).

    In a process group every process runs this with the same arguments over one global mesh;
    each builds only its devices' share of every batch, all of them save and restore the
    checkpoints together, and only process 0 prints, draws the progress bar and writes metrics.
    """
    from goose_jax import sharding, training
    from goose_jax.checkpoint import TrainCheckpointer

    tcfg = program.train
    primary = distributed.is_primary()
    state = program.init(trainable)
    rng = jax.random.key_data(seed_key if seed_key is not None else jax.random.key(tcfg.seed))
    if mesh is not None:
        # Many experts: their axis over "expert". One model: whole on every device.
        state = (training.shard_state(state, mesh) if program.many
                 else sharding.replicate(state, mesh))
        rng = sharding.replicate(rng, mesh)
    positions = [0] * len(batchers)
    metrics_path = os.path.join(workdir, "metrics.jsonl")
    tb = _tensorboard(workdir) if primary else None
    history: dict = {}
    with TrainCheckpointer(os.path.join(workdir, "checkpoints"),
                           keep=tcfg.keep_checkpoints) as ckpt:
        if ckpt.latest_step() is not None:
            tree = {"step": state.step, "trainable": state.trainable,
                    "opt_state": state.opt_state, "rng": rng}
            tree, meta = ckpt.restore(tree)
            state = training.TrainState(tree["step"], tree["trainable"], tree["opt_state"])
            rng, positions = tree["rng"], list(meta["positions"])
            history = meta.get("last_metrics", {})
        start = int(distributed.fetch(state.step))
        if start and primary:
            print(f"{workdir}: resuming from step {start} of {program.steps}", flush=True)
        if primary:
            _truncate_metrics(metrics_path, start)
        hint = ("Rerun the same command on every host to resume from the last checkpoint "
                f"in {ckpt.directory}.")

        def save(step):
            tree = {"step": state.step, "trainable": state.trainable,
                    "opt_state": state.opt_state, "rng": rng}
            ckpt.save(step, tree, {"positions": positions, "last_metrics": history})

        def evaluate(step):
            batch = training.global_batch(eval_batchers, [0] * len(eval_batchers), mesh,
                                          many=program.many)
            m = _to_json(program.evaluate(base, frozen, state.trainable, batch))
            line = {"step": step, "eval_loss": m["loss"], "eval_tokens": m["tokens"]}
            if primary:
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(line) + "\n")
            return m["loss"]

        bar = None
        if _progress_enabled() and primary:
            from tqdm.auto import tqdm

            bar = tqdm(total=program.steps, initial=start, desc=desc, unit="step")
        donate = jax.default_backend() != "cpu"  # CPU arrays may alias the async save's copy
        t_last = time.perf_counter()
        try:
            with distributed.peer_failure_guard(hint):
                if eval_batchers and start == 0:
                    history["eval_loss"] = evaluate(0)
                for step in range(start, program.steps):
                    batch = training.global_batch(batchers, positions, mesh, many=program.many)
                    step_fn = program.step_donating if donate else program.step
                    state, metrics = step_fn(base, frozen, state, batch)
                    positions = [p + b.batch_size for p, b in zip(positions, batchers)]
                    done = step + 1
                    if done % tcfg.log_every == 0 or done == program.steps:
                        m = _to_json(metrics)
                        now = time.perf_counter()
                        m.update(step=done, seconds=now - t_last)
                        t_last = now
                        history.update(loss=m["loss"], grad_norm=m["grad_norm"])
                        if primary:
                            with open(metrics_path, "a") as f:
                                f.write(json.dumps(m) + "\n")
                        if tb is not None:
                            tb.add_scalar("loss", _mean(m["loss"]), done)
                            tb.add_scalar("lr", m["lr"], done)
                        if bar is not None:
                            bar.set_postfix(loss=f"{_mean(m['loss']):.4f}")
                    if eval_batchers and tcfg.eval_every and (done % tcfg.eval_every == 0
                                                              or done == program.steps):
                        history["eval_loss"] = evaluate(done)
                    if done == program.steps or (tcfg.checkpoint_every
                                                 and done % tcfg.checkpoint_every == 0):
                        save(done)
                    if bar is not None:
                        bar.update(1)
        finally:
            if bar is not None:
                bar.close()
            if tb is not None:
                tb.close()
            ckpt.wait()
    return state, history, program.steps - start


# --- run bookkeeping -----------------------------------------------------------------------------


def _check_run(workdir: str, identity: dict) -> bool:
    """Records the run in ``run.json``; returns whether this is a resumed run.

    Raises ``TrainConfigError`` if the work directory holds a different run. In a process group
    every process checks, and process 0 writes once all have looked (so all agree on whether
    this is a resumed run)."""
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "run.json")
    identity = json.loads(json.dumps(identity))
    identity["config"] = {k: v for k, v in identity.get("config", {}).items() if k != "mesh"}
    found = os.path.exists(path)
    distributed.barrier("goose-train: run.json read")
    if found:
        with open(path) as f:
            old = json.load(f)
        for key in sorted(set(old) | set(identity)):
            if old.get(key) != identity.get(key):
                a, b = old.get(key), identity.get(key)
                if isinstance(a, dict) and isinstance(b, dict):
                    sub = next(k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k))
                    key, a, b = f"{key}.{sub}", a.get(sub), b.get(sub)
                raise TrainConfigError(f"{path}: this work directory holds a different run "
                                       f"({key}: was {a!r}, now {b!r}); use a new --workdir")
        return True
    if os.path.isdir(os.path.join(workdir, "checkpoints")):
        raise TrainConfigError(f"{workdir}: has checkpoints but no run.json; use a new --workdir")
    if distributed.is_primary():
        with open(path, "w") as f:
            json.dump(identity, f, indent=1)
    return False


def _stream_id(name: str) -> int:
    return zlib.crc32(name.encode()) & 0x7FFFFFFF


def _parse_mesh(text: str | None, num_experts: int = 1):
    """The mesh of ``--mesh`` / ``TrainConfig.mesh``; without one, None on a single process
    and, in a process group, a mesh over all global devices whose ``expert`` axis is as large
    as both the expert count and the device count allow (the rest is ``data``)."""
    from goose_jax.sharding import make_mesh, parse_mesh

    if not text:
        if not distributed.is_multiprocess():
            return None
        n = jax.device_count()
        experts = math.gcd(max(num_experts, 1), n)
        return make_mesh(data=n // experts, expert=experts)
    try:
        return make_mesh(**parse_mesh(text))
    except ValueError as e:
        raise TrainConfigError(f"--mesh {text!r}: {e}") from None


class _Setup:
    """What every subcommand resolves first: config, base, tokenizer, data."""

    def __init__(self, args: argparse.Namespace, min_files: int = 1):
        from goose_jax import training

        self.args = args
        tcfg = apply_overrides(load_config(args.config), args.set or [])
        self.tcfg = tcfg
        # Cheap checks first: data files and the mesh fail before a model is read.
        if len(args.data) < min_files:
            raise DataError(f"{args.command}: needs at least {min_files} --data file(s)")
        self.sources = [training.JsonlSource(p) for p in args.data]
        self.eval_sources = [training.JsonlSource(p) for p in (args.eval_data or [])]
        experts = len(self.sources) if args.command in ("experts", "gate") else 1
        self.mesh = _parse_mesh(getattr(args, "mesh", None) or tcfg.mesh, experts)
        self.base_spec = args.base or tcfg.base_model
        cfg, params, self.tokenizer = load_base(self.base_spec, tcfg)
        self.full_cfg = cfg
        self.cfg = cfg.with_dtypes(tcfg.param_dtype, tcfg.compute_dtype)
        self.host_params = params  # this process's own copy: libraries fingerprint it
        self.params = params
        if self.mesh is not None:
            from goose_jax.sharding import shard_params
            from goose_jax.t5 import param_logical_axes

            self.params = shard_params(self.params, param_logical_axes(cfg), self.mesh)

    def frozen_base(self):
        from goose_jax import training

        return training.cast_floats(self.params, self.cfg.dtype.param)

    def batcher(self, source, stream: int):
        from goose_jax import training

        return training.Batcher.from_config(source, self.tokenizer, self.tcfg, stream,
                                            vocab_size=self.cfg.vocab_size)

    def identity(self, **extra) -> dict:
        return {"command": self.args.command, "config": self.tcfg.to_dict(),
                "base": self.base_spec, "data": [os.path.abspath(p) for p in self.args.data],
                "eval_data": [os.path.abspath(p) for p in (self.args.eval_data or [])], **extra}


def _names(args, tcfg, count: int) -> list[str]:
    names = list(args.names or [])
    if not names and tcfg.expert_names and len(tcfg.expert_names) == count:
        names = list(tcfg.expert_names)
    if not names:
        names = [os.path.splitext(os.path.basename(p))[0] for p in args.data]
    if len(names) != count:
        raise TrainConfigError(f"{len(names)} names for {count} --data files")
    if len(set(names)) != len(names):
        raise TrainConfigError(f"expert names must be distinct, got {names}")
    if tcfg.num_experts and count != tcfg.num_experts:
        raise TrainConfigError(f"config expects {tcfg.num_experts} experts, got {count} "
                               "--data files (set num_experts=0 to allow any number)")
    return names


def _already_written(ran: int, lib, names, workdir: str, gates: bool = False) -> bool:
    # Rerunning a finished command must not rewrite its outputs: gates trained since then
    # (or other later edits) would be lost. Outputs missing from the library are written.
    done = ran == 0 and all(n in lib and (not gates or lib.info(n)["has_gate"]) for n in names)
    if done and distributed.is_primary():
        print(f"{workdir}: this run had already finished; {lib.path} is unchanged")
    return done


def _create_library(path: str, setup, lora):
    # Process 0 creates (or checks) the library; the others open it once it exists.
    from goose_jax.library import ExpertLibrary

    lib = None
    if distributed.is_primary():
        lib = ExpertLibrary.create(path, setup.full_cfg, setup.host_params, lora, exist_ok=True)
    distributed.barrier("goose-train: library created")
    if lib is None:
        lib = ExpertLibrary.create(path, setup.full_cfg, setup.host_params, lora, exist_ok=True)
    return lib


def _write_experts(lib, entries) -> None:
    """Writes ``(name, experts, gates, index, info, message)`` entries from process 0, after
    every process has gathered the trained trees; the others wait until they are on disk."""
    for name, experts, gates, index, info, message in entries:
        if distributed.is_primary():
            lib.add(name, experts, gates, index=index, info=info, overwrite=True)
            print(message)
    distributed.barrier("goose-train: library written")


def _eval_batchers(setup, names):
    if not setup.eval_sources:
        return None
    if len(setup.eval_sources) != len(names):
        raise DataError(f"{len(setup.eval_sources)} --eval-data files for {len(names)} experts")
    return [setup.batcher(s, _stream_id(n)) for s, n in zip(setup.eval_sources, names)]


def _run_experts(args: argparse.Namespace) -> int:
    from goose_jax import training

    if args.command == "expert" and len(args.data) != 1:
        raise TrainConfigError("expert trains one expert from one --data file (use `experts` "
                               "for several)")
    setup = _Setup(args)
    tcfg, lora = setup.tcfg, setup.tcfg.lora
    names = _names(args, tcfg, len(setup.sources))
    lib = _create_library(args.library, setup, lora)
    resumed = _check_run(args.workdir, setup.identity(names=names))
    clash = [n for n in names if n in lib]
    if clash and not resumed and not args.overwrite:
        raise TrainConfigError(f"{lib.path}: already has experts {clash}; pass --overwrite to "
                               "replace them")
    root = jax.random.key(tcfg.seed)
    trainable = training.init_expert_stack(
        setup.cfg, lora, [jax.random.fold_in(root, _stream_id(n)) for n in names],
        fast_compile=tcfg.fast_compile)
    program = training.Program("expert", setup.cfg, tcfg, tcfg.steps, lora.lora_scale)
    batchers = [setup.batcher(s, _stream_id(n)) for s, n in zip(setup.sources, names)]
    state, history, ran = train_loop(program, setup.frozen_base(), None, trainable, batchers,
                                     args.workdir, eval_batchers=_eval_batchers(setup, names),
                                     mesh=setup.mesh, desc=f"{len(names)} expert(s)",
                                     seed_key=root)
    if _already_written(ran, lib, names, args.workdir):
        return 0
    trained = distributed.fetch(state.trainable)
    entries = []
    for i, (name, path) in enumerate(zip(names, args.data)):
        metrics = _expert_metrics(history, i)
        info = {"data": args.description or os.path.abspath(path), "steps": tcfg.steps,
                "metrics": metrics, "train_config": tcfg.to_dict()}
        entries.append((name, trained, None, i, info,
                        f"{name}: loss {metrics.get('loss', float('nan')):.4f} -> {lib.path}"))
    _write_experts(lib, entries)
    return 0


def _run_gate(args: argparse.Namespace) -> int:
    from goose_jax import training
    from goose_jax.experts import init_gates
    from goose_jax.library import ExpertLibrary

    setup = _Setup(args)
    tcfg = setup.tcfg
    lib = ExpertLibrary.open(args.library, setup.full_cfg, setup.host_params)
    names = _names(args, tcfg, len(setup.sources))
    experts, _ = lib.load(names, dtype=None, gates=False)
    _check_run(args.workdir, setup.identity(names=names, library=lib.path))
    frozen = training.cast_floats(experts, setup.cfg.dtype.param)
    if setup.mesh is not None:
        frozen = training.shard_experts(frozen, setup.mesh)
    program = training.Program("gate", setup.cfg, tcfg, tcfg.gate_steps, lib.scale)
    batchers = [setup.batcher(s, _stream_id(n)) for s, n in zip(setup.sources, names)]
    state, history, ran = train_loop(program, setup.frozen_base(), frozen, init_gates(experts),
                                     batchers, args.workdir,
                                     eval_batchers=_eval_batchers(setup, names), mesh=setup.mesh,
                                     desc=f"{len(names)} gate(s)",
                                     seed_key=jax.random.key(tcfg.seed))
    if _already_written(ran, lib, names, args.workdir, gates=True):
        return 0
    gates = distributed.fetch(state.trainable)
    entries = []
    for i, name in enumerate(names):
        info = lib.info(name)
        metrics = _expert_metrics(history, i)
        info["gate"] = {"steps": tcfg.gate_steps, "data": os.path.abspath(args.data[i]),
                        "metrics": metrics}
        entries.append((name, experts, gates, i, info,
                        f"{name}: gate loss {metrics.get('loss', float('nan')):.4f} -> "
                        f"{lib.path}"))
    _write_experts(lib, entries)
    return 0


def _run_multitask(args: argparse.Namespace) -> int:
    from goose_jax import checkpoint, training

    setup = _Setup(args)
    tcfg = setup.tcfg
    full = tcfg.multitask_mode == "full"
    if full and not args.out:
        raise TrainConfigError("multitask_mode=full writes a model: pass --out DIR")
    if not full and not args.library:
        raise TrainConfigError("multitask_mode=lora writes one expert: pass --library DIR")
    resumed = _check_run(args.workdir, setup.identity(name=args.name))
    mixture = training.ConcatSource(setup.sources)
    batchers = [setup.batcher(mixture, _stream_id(args.name))]
    evals = None
    if setup.eval_sources:
        evals = [setup.batcher(training.ConcatSource(setup.eval_sources), _stream_id(args.name))]
    key = jax.random.key(tcfg.seed)
    if full:
        program = training.Program("full", setup.cfg.with_dtypes("float32", tcfg.compute_dtype),
                                   tcfg, tcfg.steps, many=False)
        state, history, _ = train_loop(program, None, None, setup.params, batchers,
                                       args.workdir, eval_batchers=evals, mesh=setup.mesh,
                                       desc="multitask (full)", seed_key=key)
        written = checkpoint.save_model(args.out, setup.full_cfg.with_dtypes(
            "float32", setup.full_cfg.dtype.compute_dtype), state.trainable,
            overwrite=resumed or args.overwrite)
        if distributed.is_primary():
            print(f"multitask model: loss {_mean(history.get('loss', np.nan)):.4f} -> "
                  f"{written}")
        return 0
    lora = tcfg.lora
    lib = _create_library(args.library, setup, lora)
    if args.name in lib and not resumed and not args.overwrite:
        raise TrainConfigError(f"{lib.path}: already has {args.name!r}; pass --overwrite")
    trainable = training.init_expert_stack(setup.cfg, lora,
                                           [jax.random.fold_in(key, _stream_id(args.name))],
                                           fast_compile=tcfg.fast_compile)
    program = training.Program("expert", setup.cfg, tcfg, tcfg.steps, lora.lora_scale,
                               many=False)
    state, history, ran = train_loop(program, setup.frozen_base(), None, trainable, batchers,
                                     args.workdir, eval_batchers=evals, mesh=setup.mesh,
                                     desc="multitask (lora)", seed_key=key)
    if _already_written(ran, lib, [args.name], args.workdir):
        return 0
    info = {"data": args.description or "mixture of " + ", ".join(map(os.path.abspath,
                                                                      args.data)),
            "steps": tcfg.steps, "metrics": history, "train_config": tcfg.to_dict()}
    _write_experts(lib, [(args.name, distributed.fetch(state.trainable), None, None, info,
                          f"{args.name}: loss {_mean(history.get('loss', np.nan)):.4f} -> "
                          f"{lib.path}")])
    return 0


# --- command line --------------------------------------------------------------------------------


def _common(p: argparse.ArgumentParser, many: bool) -> None:
    p.add_argument("--config", help="python file with get_config() -> TrainConfig "
                                    "(default: the paper's expert settings)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config field (repeatable), e.g. --set steps=200")
    p.add_argument("--base", help="HF T5 directory, goose-jax model checkpoint, or "
                                  "random:PRESET (default: the config's base_model)")
    p.add_argument("--data", nargs="+" if many else 1, required=True, metavar="JSONL",
                   help="JSON-lines training data, {\"input\": ..., \"target\": ...} per line")
    p.add_argument("--eval-data", nargs="+", metavar="JSONL",
                   help="held-out data in the same order as --data, evaluated every eval_every")
    p.add_argument("--workdir", required=True, help="checkpoints, run.json and metrics.jsonl")
    p.add_argument("--description", help="what the data is (stored in the library)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace experts (or a model) that already exist in the output")
    p.add_argument("--mesh", help="device mesh sizes, e.g. data=2,expert=4 (experts are split "
                                  "over the expert axis)")
    distributed.add_arguments(p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Train LoRA experts, PHATGOOSE gates and multitask baselines.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    specs = {
        "expert": ("train one LoRA expert", False, _run_experts),
        "experts": ("train several LoRA experts at once, one per --data file", True,
                    _run_experts),
        "gate": ("train the PHATGOOSE gates of library experts (base and LoRA frozen)", True,
                 _run_gate),
        "multitask": ("train one model on the mixture of --data files (LoRA or full)", True,
                      _run_multitask),
    }
    for name, (help_text, many, run) in specs.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        _common(p, many)
        p.set_defaults(run=run)
        if name in ("expert", "multitask"):
            p.add_argument("--name", default="multitask" if name == "multitask" else None,
                           help="expert name (default: the data file's stem)")
        else:
            p.add_argument("--names", nargs="+", help="expert names, in --data order")
        p.add_argument("--library", required=name != "multitask",
                       help="expert library directory (created if missing)")
        if name == "multitask":
            p.add_argument("--out", help="model directory (multitask_mode=full)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs ``goose-train``; returns the exit code (0 ok, 1 user error, 2 usage, 130 interrupt)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    if args.command == "expert":
        args.names = [args.name] if args.name else None
    logging.getLogger("absl").setLevel(logging.ERROR)
    try:
        distributed.maybe_initialize(args, prog=PROG)
        return args.run(args)
    except jax.errors.JaxRuntimeError as e:
        distributed.exit_on_peer_failure(e)  # in a process group: one line, exit 75
        raise
    except (GooseError, OSError) as e:
        print(f"{PROG}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
