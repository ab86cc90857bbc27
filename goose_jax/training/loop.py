"""The training loop: runs a ``training.program.Program`` to its last step, resumably.

Shared by goose-train's runs (``goose_jax.pipeline.train_runs``), the demo and the world-base
script.
A work directory holds the loop's state:

    checkpoints/    the last ``keep_checkpoints`` steps: trainable tree, optimiser state, step,
                    RNG, and each stream's data position
                    (``training.checkpoints.TrainCheckpointer``)
    metrics.jsonl   one JSON line per logged step (loss, grad_norm, lr, seconds), per eval and
                    per validation (each expert's score and best step so far)
    tensorboard/    the same scalars, if ``tensorboardX`` is installed

Rerunning after an interruption continues from the last checkpoint and ends with the parameters
of an uninterrupted run: a batch is a pure function of (seed, stream, position), and metric
lines logged after that checkpoint are dropped and logged again. A checkpoint that cannot be read
is set aside with a one-line warning on stderr and the one kept before it is used instead.

The host never holds the device back. A background thread builds (tokenises, and places on
the devices) the batches of the coming steps, at most ``PREFETCH`` ahead, in the same pure order;
an error it meets (a bad token id, an unreadable example) is raised in the loop at the step whose
batch it was building, as if the loop had built it. Metrics are read one step late: a logged
step's line is written once the next step has been dispatched, so the device always has a step
queued; the last step's line is written at the end. The loop waits on the device only where it
must: checkpoints, evaluations and the last step (all pending lines are written first).

Divergence stops the loop: the loss and gradient norm of every logged step, and of every step
that is checkpointed, must be finite, and so must the trainable tree before it is saved (one
reduction over the trainable tree, at checkpoints only). Otherwise ``TrainingDivergedError``
names the step; nothing non-finite reaches a checkpoint or ``metrics.jsonl``, and the last good
checkpoint stays the newest. A logged step's values are checked when its line is written, so
the loop stops at most one step after the step that diverged (never after a checkpoint of it);
checking every step would wait on the device each step.
"""

from __future__ import annotations

import importlib.util
import json
import os
import queue
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from goose_jax.core import distributed, sharding
from goose_jax.core.errors import TrainingDivergedError
from goose_jax.core.progress import progress_enabled
from goose_jax.data.batching import Batcher, global_batch
from goose_jax.training import program as training
from goose_jax.training.checkpoints import TrainCheckpointer

if TYPE_CHECKING:
    from goose_jax.evaluation.validation import BestKeeper

PREFETCH = 2  # batches built ahead of the step that runs


def _warn(line: str) -> None:
    print(f"warning: {line}", file=sys.stderr, flush=True)


def _mute(line: str) -> None:
    pass


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


def _mean(v) -> float:
    return float(np.mean(v))


@jax.jit
def _all_finite(tree) -> jax.Array:
    return jnp.all(jnp.asarray([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def _check_finite(program: training.Program, step: int, what: dict, last_good: int | None,
                  directory: str) -> None:
    """Raises ``TrainingDivergedError`` naming ``step`` if a value of ``what`` is not finite."""
    bad = [k for k, v in what.items() if not np.all(np.isfinite(np.asarray(v)))]
    if not bad:
        return
    kept = (f"the last good checkpoint, step {last_good}, is kept in {directory}"
            if last_good is not None else "no checkpoint was written")
    raise TrainingDivergedError(
        f"training diverged at step {step}: the {' and '.join(bad)} became non-finite (NaN or "
        f"inf); {kept} and nothing was written to the output; rerun with a lower learning rate "
        f"(now lr={program.train.lr:g}, e.g. --set lr={program.train.lr / 10:g}) in a new "
        "--workdir")


class _Prefetcher:
    """The batches of steps ``first`` .. ``last - 1``, built in order on a background thread.

    ``make(step)`` builds one step's batch; at most ``depth`` finished batches wait in a bounded
    queue. An exception ``make`` raises is handed over in its batch's place and raised by
    ``next`` in the calling thread; the thread then stops. ``close`` stops it early.
    """

    def __init__(self, make: Callable[[int], Any], first: int, last: int, depth: int = PREFETCH):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(make, first, last),
                                        name="goose-train batches", daemon=True)
        self._thread.start()

    def _run(self, make, first: int, last: int) -> None:
        for step in range(first, last):
            try:
                item = (make(step), None)
            except Exception as e:  # raised again in the loop, at this step
                item = (None, e)
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if item[1] is not None or self._stop.is_set():
                return

    def next(self) -> Any:
        """The next step's batch (waits for it); raises what building it raised."""
        batch, error = self._queue.get()
        if error is not None:
            self._stop.set()
            raise error
        return batch

    def close(self) -> None:
        """Stops the thread; it finishes the batch it is building (no JAX call is cut short)."""
        self._stop.set()
        self._thread.join()


def train_loop(program: training.Program, base: Any, frozen: Any, trainable: Any,
               batchers: Sequence[Batcher], workdir: str, *,
               eval_batchers: Sequence[Batcher] | None = None,
               mesh: jax.sharding.Mesh | None = None, desc: str = "train",
               seed_key: jax.Array | None = None,
               best: BestKeeper | None = None) -> tuple[training.TrainState, dict, int]:
    """Runs (or resumes) ``program`` to ``program.steps``.

    Args:
      program: a ``training.program.Program``.
      base, frozen: the frozen trees (see ``Program.step``).
      trainable: the initial trainable tree (ignored when a checkpoint exists).
      batchers: one ``Batcher`` per expert stream (``program.many``), or a one-element list.
      workdir: where checkpoints and metrics live.
      eval_batchers: optional batchers evaluated every ``eval_every`` steps (and at step 0).
      mesh: optional mesh; the expert axis is split over its ``expert`` axis.
      desc: progress-bar label.
      seed_key: the run's RNG (saved with the state; kept for dropout and sampling to come).
      best: validation and best-step keeping (``evaluation.validation.BestKeeper``), run at step 0,
      every
        ``eval_every`` steps and at the last step; its state is part of every checkpoint. The
        trainable leaves must lead with the expert axis (kind ``"expert"``).

    Returns:
      (state, last metrics, steps run by this call): 0 steps when the work directory already
      held the finished run.

    In a process group every process runs this with the same arguments over one global mesh;
    each builds only its devices' share of every batch, all of them save and restore the
    checkpoints together, and only process 0 prints, draws the progress bar and writes metrics.
    """
    tcfg = program.train
    primary = distributed.is_primary()
    state = program.init(trainable)
    rng = jax.random.key_data(seed_key if seed_key is not None else jax.random.key(tcfg.seed))
    if mesh is not None:
        # Many experts: their axis over "expert". One model: whole on every device.
        state = (sharding.shard_state(state, mesh) if program.many
                 else sharding.replicate(state, mesh))
        rng = sharding.replicate(rng, mesh)
    positions = [0] * len(batchers)
    metrics_path = os.path.join(workdir, "metrics.jsonl")
    tb = _tensorboard(workdir) if primary else None
    history: dict = {}
    with TrainCheckpointer(os.path.join(workdir, "checkpoints"),
                           keep=tcfg.keep_checkpoints) as ckpt:
        last_good = None
        if ckpt.latest_step() is not None:
            tree = {"step": state.step, "trainable": state.trainable,
                    "opt_state": state.opt_state, "rng": rng}
            if best is not None:
                tree["best"] = state.trainable  # the best slices: shaped as the trainable tree
            tree, meta, last_good = ckpt.restore_usable(tree, warn=_warn if primary else _mute)
            if best is not None:
                best.restore(tree["best"], meta["validation"])
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

        def save(step, metrics):
            nonlocal last_good
            # Never save a diverged state: the metrics of the step just taken, and the tree.
            finite = {"loss": metrics["loss"], "grad_norm": metrics["grad_norm"]}
            ok = bool(distributed.fetch(_all_finite(state.trainable)))
            finite["parameters"] = 0.0 if ok else np.nan
            _check_finite(program, step, finite, last_good, ckpt.directory)
            tree = {"step": state.step, "trainable": state.trainable,
                    "opt_state": state.opt_state, "rng": rng}
            meta = {"positions": positions, "last_metrics": history}
            if best is not None:
                tree["best"], meta["validation"] = best.trainable, best.meta()
            ckpt.save(step, tree, meta)
            last_good = step

        def evaluate(step):
            batch = global_batch(eval_batchers, [0] * len(eval_batchers), mesh,
                                          many=program.many)
            m = _to_json(program.evaluate(base, frozen, state.trainable, batch))
            _check_finite(program, step, {"eval_loss": m["loss"]}, last_good, ckpt.directory)
            line = {"step": step, "eval_loss": m["loss"], "eval_tokens": m["tokens"]}
            if primary:
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(line) + "\n")
            return m["loss"]

        def validate(step):
            line = best.update(step, state.trainable)
            if primary:
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(line) + "\n")

        bar = None
        if progress_enabled() and primary:
            from tqdm.auto import tqdm

            bar = tqdm(total=program.steps, initial=start, desc=desc, unit="step")
        donate = jax.default_backend() != "cpu"  # CPU arrays may alias the async save's copy
        step_fn = program.step_donating if donate else program.step
        t_last = time.perf_counter()
        pending = None  # (step, metrics) of a logged step whose line is not written yet

        def write_pending() -> dict | None:
            # Reads a logged step's metrics: by now the device has the next step queued.
            nonlocal pending, t_last
            if pending is None:
                return None
            done, metrics = pending
            pending = None
            m = _to_json(metrics)
            _check_finite(program, done, {"loss": m["loss"], "grad_norm": m["grad_norm"]},
                          last_good, ckpt.directory)
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
            return m

        first = list(positions)

        def make_batch(step: int) -> dict:
            # A pure function of the step: the positions are those the loop will have reached.
            at = [p + (step - start) * b.batch_size for p, b in zip(first, batchers)]
            batch = global_batch(batchers, at, mesh, many=program.many)
            return batch if mesh is not None else jax.device_put(batch)

        batches = None
        try:
            with distributed.peer_failure_guard(hint):
                if eval_batchers and start == 0:
                    history["eval_loss"] = evaluate(0)
                if best is not None and start == 0:
                    validate(0)
                batches = _Prefetcher(make_batch, start, program.steps)
                for step in range(start, program.steps):
                    state, metrics = step_fn(base, frozen, state, batches.next())
                    positions = [p + b.batch_size for p, b in zip(positions, batchers)]
                    done = step + 1
                    write_pending()  # the previous logged step's line, one step late
                    if done % tcfg.log_every == 0 or done == program.steps:
                        pending = (done, metrics)
                    eval_step = bool(tcfg.eval_every) and (done % tcfg.eval_every == 0
                                                           or done == program.steps)
                    evaluating = eval_step and bool(eval_batchers or best is not None)
                    saving = done == program.steps or bool(
                        tcfg.checkpoint_every and done % tcfg.checkpoint_every == 0)
                    m = None
                    if evaluating or saving:  # the loop waits on the device here anyway
                        m = write_pending()
                    if evaluating and eval_batchers:
                        history["eval_loss"] = evaluate(done)
                    if evaluating and best is not None:
                        validate(done)
                    if saving:
                        save(done, m if m is not None else _to_json(metrics))
                    if bar is not None:
                        bar.update(1)
        finally:
            if batches is not None:
                batches.close()
            if bar is not None:
                bar.close()
            if tb is not None:
                tb.close()
            ckpt.wait()
    return state, history, program.steps - start
