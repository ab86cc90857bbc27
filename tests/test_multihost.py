"""goose-jax in JAX's multi-process runtime, proved with real processes on this machine.

A "pod" here is two processes on localhost, each with 4 fake CPU devices
(``--xla_force_host_platform_device_count=4``), joined through ``--coordinator``: 8 global
devices, cross-process collectives over gloo. The reference is one process with 8 fake devices
(this pytest process). What the tests show:

- two processes training four experts at once on a (data 2, expert 4) mesh end with the
  parameters, losses and eval losses of the single-process run (within 1e-5), and only process 0
  writes metrics and the library;
- the checkpoint the pod wrote restores in one process on 8 devices (another mesh) and on 1
  device, equal to what the pod trained;
- a routed model (PHATGOOSE over the pod's experts) evaluated by both processes gives the
  single-process predictions, and only process 0 writes them;
- killing one process mid-run makes the other exit non-zero with one clear line within a
  bound, and rerunning the same command resumes from the last checkpoint;
- a library loaded onto a mesh whose expert axis spans both processes: each process opens only
  the files of the experts its own devices hold, and holds them exactly.

This file is also the workers the pod runs: ``python tests/test_multihost.py eval`` (evaluation)
and ``python tests/test_multihost.py load`` (a sharded library load).
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import needs_8_devices, write_jsonl

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.py")
HEARTBEAT_S = 10   # GOOSE_HEARTBEAT_TIMEOUT in the pod: a silent peer is dead after this
EXIT_BOUND_S = HEARTBEAT_S + 20  # the survivor of a kill must be gone within this
WORDS = ["goose", "jax", "flax", "route", "token", "lora", "gate", "mesh"]
TASKS = {"reverse": lambda w: w[::-1], "upper": str.upper, "first": lambda w: w[0],
         "double": lambda w: w + w}
POD_ARGS = ["--mesh", "data=2,expert=4"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def pod_env(cache_dir: pathlib.Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GOOSE_", "JAX_"))}
    env.update(XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
               # a rerun loads what the first run compiled
               JAX_COMPILATION_CACHE_DIR=str(cache_dir),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               GOOSE_QUIET="1", GOOSE_HEARTBEAT_TIMEOUT=str(HEARTBEAT_S),
               GOOSE_INIT_TIMEOUT="60", GOOSE_SHUTDOWN_TIMEOUT="20",
               PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    return env


def launch(argv: list[str], port: int, log_dir: pathlib.Path, tag: str) -> list:
    """Starts the two processes of a pod running ``python argv...``; returns their Popens."""
    procs = []
    for pid in range(2):
        cmd = [sys.executable, *argv, "--coordinator", f"localhost:{port}",
               "--num-processes", "2", "--process-id", str(pid)]
        out = open(log_dir / f"{tag}.{pid}.out", "w")
        err = open(log_dir / f"{tag}.{pid}.err", "w")
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=pod_env(log_dir / "jax_cache"),
                                      stdout=out, stderr=err))
    return procs


def wait(procs, log_dir: pathlib.Path, tag: str, timeout: float = 150) -> list[int]:
    deadline = time.monotonic() + timeout
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(timeout=max(1.0, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"pod {tag} did not finish in {timeout} s:\n" + logs(log_dir, tag))
    return codes


def logs(log_dir: pathlib.Path, tag: str) -> str:
    return "\n".join(f"--- {f.name}\n{f.read_text()[-3000:]}"
                     for f in sorted(log_dir.glob(f"{tag}.*")))


def train_argv(base, data, lib, work, *extra) -> list[str]:
    return ["experts", "--config", TINY, "--base", str(base), "--data", *data,
            "--eval-data", *data, "--library", str(lib), "--workdir", str(work), *POD_ARGS,
            *extra]


def library_tensors(path) -> dict[str, np.ndarray]:
    import jax

    from goose_jax.library.store import ExpertLibrary

    experts, _ = ExpertLibrary.open(path).load()
    return {"/".join(str(k.key) for k in p): np.asarray(x)
            for p, x in jax.tree_util.tree_flatten_with_path(experts)[0]}


def metric_lines(work) -> list[dict]:
    return [json.loads(line) for line in open(os.path.join(work, "metrics.jsonl"))]


# --- the evaluation worker -----------------------------------------------------------------------


def eval_tasks():
    from goose_jax.data.examples import EvalTask, Example

    # Rank classification only, eight examples: one batch, one compiled shape (greedy
    # generation takes the same Evaluator paths, split and gathered the same way).
    rank = [Example(f"reverse: {w}", choices=(w[::-1], w, w.upper()), answers=(0,),
                    dataset="pod/rank", example_id=str(i)) for i, w in enumerate(WORDS)]
    return [EvalTask("pod/rank", "pod/rank", "rank", "accuracy", lambda: rank)]


def evaluate_routed(base: str, library: str, out: str) -> None:
    """PHATGOOSE over ``library`` (seeded random gates) on all global devices; process 0 writes
    every prediction to ``out``. The pod and the single-process reference both run this."""
    import jax

    from goose_jax.core import distributed
    from goose_jax.core.sharding import make_mesh, replicate
    from goose_jax.core.trees import nest_sites
    from goose_jax.data.tokenizers import ByteTokenizer
    from goose_jax.evaluation import evaluator as ev
    from goose_jax.evaluation import report
    from goose_jax.library.store import ExpertLibrary
    from goose_jax.models import checkpoint
    from goose_jax.routing.methods import build_routed

    cfg, params = checkpoint.load_model(base)
    lib = ExpertLibrary.open(library, cfg, params)
    experts, _ = lib.load()
    rng = np.random.default_rng(7)
    gates = nest_sites({site: {"gate": rng.standard_normal((len(lib.names), d_in), np.float32)}
                        for site, (d_in, _) in lib.sites.items()})
    routed = build_routed("phatgoose", cfg, experts, gates=gates, top_k=2, scale=lib.scale)
    mesh = make_mesh(data=-1)
    routed = type(routed)(routed.method, routed.adapter, replicate(routed.collections, mesh))
    evaluator = ev.Evaluator(cfg, replicate(params, mesh), ByteTokenizer(), routed,
                             batch_size=8, max_input_length=24, max_target_length=8,
                             telemetry=True, mesh=mesh)
    results = ev.evaluate(evaluator, eval_tasks(), progress=False)
    if distributed.is_primary():
        rows = [p for r in results.values() for p in r.predictions]
        telemetry = report.telemetry_table(results)
        with open(out, "w") as f:
            json.dump({"devices": jax.device_count(), "processes": jax.process_count(),
                       "predictions": rows, "telemetry": telemetry}, f)
    distributed.barrier("test: predictions written")


def load_sharded(library: str, out: str) -> None:
    """Loads ``library`` in bfloat16 onto a (data 2, expert 4) mesh whose expert axis spans the
    two processes (expert columns 0-1 on process 0's devices, 2-3 on process 1's, each column
    on two devices), recording every expert file this process opens; writes what it opened and
    the rows its devices hold to ``out``.<process>.npz."""
    import jax

    from goose_jax.core.sharding import make_mesh
    from goose_jax.library.store import EXPERT_DIR, ExpertLibrary

    p0, p1 = ([d for d in jax.devices() if d.process_index == p] for p in range(2))
    mesh = make_mesh(data=2, expert=4, devices=[*p0[:2], *p1[:2], *p0[2:], *p1[2:]])
    lib = ExpertLibrary.open(library)
    folder = os.path.join(lib.path, EXPERT_DIR)
    opened = []

    def hook(event, args):  # every file this process opens, whoever opens it
        if event == "open" and isinstance(args[0], str) and args[0].startswith(folder):
            opened.append(os.path.basename(args[0]))

    sys.addaudithook(hook)
    experts, gates = lib.load(dtype="bfloat16", mesh=mesh)
    folder = "\0"  # stop recording
    rows = {}
    for path, x in jax.tree_util.tree_flatten_with_path((experts, gates))[0]:
        key = "/".join(str(k.key) for k in path[1:])
        for shard in x.addressable_shards:
            start = shard.index[0].start or 0
            for i, row in enumerate(np.asarray(shard.data).astype(np.float32)):
                rows[f"{key}@{start + i}"] = row
    np.savez(f"{out}.{jax.process_index()}.npz", opened=np.asarray(opened, dtype=str), **rows)


def _worker(argv: list[str]) -> int:
    import argparse

    from goose_jax.core import distributed

    ap = argparse.ArgumentParser()
    ap.add_argument("command", choices=["eval", "load"])
    ap.add_argument("--base")
    ap.add_argument("--library", required=True)
    ap.add_argument("--out", required=True)
    distributed.add_arguments(ap)
    args = ap.parse_args(argv)
    distributed.maybe_initialize(args, prog="test-worker")
    if args.command == "load":
        load_sharded(args.library, args.out)
    else:
        evaluate_routed(args.base, args.library, args.out)
    return 0


# --- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    import goose_jax as gj
    from goose_jax.models.checkpoint import save_model
    from goose_jax.models.t5.model import init_params

    root = tmp_path_factory.mktemp("pod")
    cfg = gj.T5Config.preset("tiny").replace(vocab_size=259, num_encoder_layers=1,
                                             num_decoder_layers=1)
    base = save_model(root / "base", cfg, init_params(cfg, 0))
    data = [write_jsonl(root / f"{name}.jsonl", [(f"{name}: {w}", fn(w)) for w in WORDS])
            for name, fn in TASKS.items()]
    return root, base, data


@pytest.fixture(scope="module")
def pod_run(world):
    """goose-train experts on the pod and in one process; both ways' timings."""
    from conftest import tool

    main = tool("goose-train")

    root, base, data = world
    logs_dir = root / "logs"
    logs_dir.mkdir()
    t0 = time.perf_counter()
    procs = launch(["-m", "goose_jax.cli.train",
                    *train_argv(base, data, root / "pod_lib", root / "pod_work")],
                   free_port(), logs_dir, "train")
    codes = wait(procs, logs_dir, "train")
    pod_s = time.perf_counter() - t0
    assert codes == [0, 0], logs(logs_dir, "train")
    t0 = time.perf_counter()
    assert main(train_argv(base, data, root / "one_lib", root / "one_work")) == 0
    one_s = time.perf_counter() - t0
    print(f"\n[timing] 2-process goose-train {pod_s:.1f} s, single process {one_s:.1f} s")
    return root, logs_dir


# --- tests ---------------------------------------------------------------------------------------


@needs_8_devices
def test_two_processes_train_the_single_process_parameters(pod_run):
    root, logs_dir = pod_run
    pod, one = library_tensors(root / "pod_lib"), library_tensors(root / "one_lib")
    assert pod.keys() == one.keys() and len(pod) > 0
    for k in one:
        assert pod[k].shape[0] == 4, k  # four experts trained side by side
        np.testing.assert_allclose(pod[k], one[k], atol=1e-5, rtol=0, err_msg=k)
    assert np.abs(one["decoder/block_0/ffn/wo/lora_b"]).max() > 1e-3  # it did train
    # Metrics: reduced over both hosts, written once (by process 0), equal to one process's.
    got, want = metric_lines(root / "pod_work"), metric_lines(root / "one_work")
    assert [m["step"] for m in got] == [m["step"] for m in want]
    for a, b in zip(got, want):
        for key in ("loss", "eval_loss", "grad_norm"):
            if key in b:
                assert len(np.atleast_1d(a[key])) == len(np.atleast_1d(b[key]))
                np.testing.assert_allclose(a[key], b[key], atol=1e-5, err_msg=(key, b["step"]))
    out0 = (logs_dir / "train.0.out").read_text()
    out1 = (logs_dir / "train.1.out").read_text()
    assert "loss" in out0 and "-> " in out0
    assert "-> " not in out1  # process 1 prints no result lines


@needs_8_devices
def test_pod_checkpoint_restores_in_one_process_on_other_meshes(pod_run):
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    from goose_jax.core.sharding import make_mesh
    from goose_jax.training.checkpoints import TrainCheckpointer

    root, _ = pod_run
    final = library_tensors(root / "pod_lib")
    meshes = {"8 devices, expert=8": make_mesh(data=1, expert=8),
              "8 devices, data=4,expert=2": make_mesh(data=4, expert=2)}
    with TrainCheckpointer(root / "pod_work" / "checkpoints") as ckpt:
        assert ckpt.latest_step() == 6
        restored = {"1 device": ckpt.restore(ckpt.saved_shapes())[0]}
        for name, mesh in meshes.items():
            def place(leaf, mesh=mesh):
                # Experts over "expert" when it divides the leading axis, else replicated.
                split = leaf.ndim and leaf.shape[0] % mesh.shape["expert"] == 0
                spec = PartitionSpec("expert") if split else PartitionSpec()
                return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype,
                                            sharding=NamedSharding(mesh, spec))
            restored[name] = ckpt.restore(jax.tree.map(place, ckpt.saved_shapes()))[0]
    assert len(restored["1 device"]["trainable"]["decoder"]["block_0"]["ffn"]["wo"]
               ["lora_b"].devices()) == 1
    wide = restored["8 devices, data=4,expert=2"]["trainable"]["decoder"]["block_0"]["ffn"]
    assert len(wide["wo"]["lora_b"].devices()) == 8
    for name, tree in restored.items():
        assert int(tree["step"]) == 6, name
        flat = {"/".join(str(k.key) for k in p): np.asarray(x)
                for p, x in jax.tree_util.tree_flatten_with_path(tree["trainable"])[0]}
        assert flat.keys() == final.keys(), name
        for k in final:
            np.testing.assert_array_equal(flat[k], final[k], err_msg=(name, k))


def test_two_processes_evaluate_like_one(pod_run, world):
    root, base, _ = world
    _, logs_dir = pod_run
    lib = root / "pod_lib"
    t0 = time.perf_counter()
    procs = launch([__file__, "eval", "--base", base, "--library", str(lib),
                    "--out", str(root / "pod_preds.json")], free_port(), logs_dir, "eval")
    assert wait(procs, logs_dir, "eval") == [0, 0], logs(logs_dir, "eval")
    pod_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    evaluate_routed(base, str(lib), str(root / "one_preds.json"))
    print(f"\n[timing] 2-process evaluation {pod_s:.1f} s, single process "
          f"{time.perf_counter() - t0:.1f} s")
    pod = json.loads((root / "pod_preds.json").read_text())
    one = json.loads((root / "one_preds.json").read_text())
    assert (pod["processes"], pod["devices"], one["processes"], one["devices"]) == (2, 8, 1, 8)
    assert len(pod["predictions"]) == len(one["predictions"]) == len(WORDS)
    for a, b in zip(pod["predictions"], one["predictions"]):
        assert (a["dataset"], a["id"], a["prediction"]) == (b["dataset"], b["id"],
                                                             b["prediction"])
        if "scores" in b:
            np.testing.assert_allclose(a["scores"], b["scores"], atol=1e-5)
    assert pod["telemetry"] == one["telemetry"] and pod["telemetry"]


def test_each_process_reads_only_its_own_experts_files(tmp_path):
    import ml_dtypes

    import goose_jax as gj
    from goose_jax.core.trees import nest_sites
    from goose_jax.experts.lora import LoRAConfig, select_sites
    from goose_jax.library.store import ExpertLibrary
    from goose_jax.models.t5.model import init_params

    cfg = gj.T5Config.preset("tiny")
    lora = LoRAConfig(rank=2, sites=r".*/ffn/wo|encoder/block_0/self_attn/q")
    lib = ExpertLibrary.create(tmp_path / "lib", cfg, init_params(cfg, 0), lora)
    rng = np.random.default_rng(0)
    written = {}  # "site/leaf@row" -> the expert as the worker should hold it (bfloat16)
    for e in range(7):  # padded to 8 over the 4 expert shards: the last row is inert
        tree = {}
        for site, (d_in, d_out) in select_sites(cfg, lora).items():
            leaves = {"lora_a": rng.normal(size=(d_in, 2)), "lora_b": rng.normal(size=(2, d_out)),
                      "gate": rng.normal(size=(d_in,))}
            tree[site] = {k: v.astype(np.float32) for k, v in leaves.items()}
            written.update({f"{site}/{k}@{e}": v.astype(ml_dtypes.bfloat16).astype(np.float32)
                            for k, v in leaves.items()})
        flat = {s: {k: v for k, v in t.items() if k != "gate"} for s, t in tree.items()}
        gates = {s: {"gate": t["gate"]} for s, t in tree.items()}
        lib.add(f"x{e}", nest_sites(flat), nest_sites(gates))
    procs = launch([__file__, "load", "--library", str(lib.path), "--out", str(tmp_path / "got")],
                   free_port(), tmp_path, "load")
    assert wait(procs, tmp_path, "load") == [0, 0], logs(tmp_path, "load")
    want_files = [[f"x{e}.safetensors" for e in range(4)],
                  [f"x{e}.safetensors" for e in range(4, 7)]]
    for pid in range(2):
        got = np.load(tmp_path / f"got.{pid}.npz")
        assert sorted(got["opened"]) == want_files[pid], pid  # each file once, only its own
        held = {k for k in got.files if k != "opened"}
        assert {int(k.split("@")[1]) for k in held} == set(range(4 * pid, 4 * pid + 4)), pid
        for key in held:
            want = written.get(key)
            if want is None:  # the inert padding row
                assert key.endswith("@7") and not got[key].any(), key
            else:
                np.testing.assert_array_equal(got[key], want, err_msg=key)


@pytest.mark.slow  # 52-102 s measured on 2 shared cores
def test_a_killed_process_stops_the_other_and_a_rerun_resumes(world, tmp_path):
    from goose_jax.core.errors import PEER_LOST
    from goose_jax.training.checkpoints import TrainCheckpointer

    _, base, data = world
    work, lib = tmp_path / "work", tmp_path / "lib"
    argv = ["-m", "goose_jax.cli.train",
            *train_argv(base, data[:2], lib, work, "--set", "steps=16", "--set", "eval_every=0",
                        "--set", "checkpoint_every=4",
                        "--mesh", "data=2,model=2,expert=2")]
    port = free_port()
    procs = launch(argv, port, tmp_path, "run1")
    deadline = time.monotonic() + 150
    metrics = work / "metrics.jsonl"
    while True:  # until step 5 is done and the checkpoint of step 4 is committed
        steps = [json.loads(x)["step"] for x in metrics.read_text().splitlines()] \
            if metrics.exists() else []
        if steps and steps[-1] >= 5 and (work / "checkpoints" / "4").is_dir():
            break
        if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
            for p in procs:
                p.kill()
            pytest.fail("the pod did not get going:\n" + logs(tmp_path, "run1"))
        time.sleep(0.02)
    procs[1].send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    try:
        code = procs[0].wait(timeout=EXIT_BOUND_S)
    except subprocess.TimeoutExpired:
        procs[0].kill()
        pytest.fail(f"process 0 still ran {EXIT_BOUND_S} s after process 1 was killed:\n"
                    + logs(tmp_path, "run1"))
    waited = time.monotonic() - killed_at
    procs[1].wait()
    err = (tmp_path / "run1.0.err").read_text()
    print(f"\n[timing] process 0 exited {waited:.2f} s after process 1 was killed "
          f"(code {code}, bound {EXIT_BOUND_S} s)")
    assert code != 0 and waited < EXIT_BOUND_S
    # Two ways to learn of the death, both bounded. Mostly process 0 is in a collective that
    # breaks at once: goose-train's one line, exit 75. If it is instead waiting in a barrier
    # (Orbax's commit of an asynchronous save), the coordination service declares process 1
    # dead after the heartbeat timeout and JAX itself aborts the process with its own message.
    line = [x for x in err.splitlines() if x.startswith("goose-train: error:")]
    if code == PEER_LOST:
        assert line and "another process of this run died or was killed" in line[-1], err
        assert "Rerun the same command" in line[-1]
    else:
        assert code == -signal.SIGABRT, err
        assert "most likely indicates that another task died" in err, err
    with TrainCheckpointer(work / "checkpoints") as ckpt:
        last = ckpt.latest_step()
    assert last is not None and 4 <= last < 16 and last % 4 == 0

    t0 = time.perf_counter()
    procs = launch(argv, port, tmp_path, "run2")  # the same command again
    assert wait(procs, tmp_path, "run2") == [0, 0], logs(tmp_path, "run2")
    print(f"[timing] rerun from step {last}: {time.perf_counter() - t0:.1f} s")
    out = (tmp_path / "run2.0.out").read_text()
    assert f"resuming from step {last} of 16" in out, out
    assert "resuming" not in (tmp_path / "run2.1.out").read_text()
    steps = [m["step"] for m in metric_lines(work) if "loss" in m]
    assert steps == list(range(1, 17))  # each step logged once, across the two runs
    assert sorted(library_tensors(lib)) and len(next(iter(library_tensors(lib).values()))) == 2


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1:]))
