"""When the command-line tools join JAX's distributed runtime, and with which arguments."""

import jax
import pytest
from conftest import tool

from goose_jax.core import distributed, errors
from goose_jax.core.distributed import DistributedError, settings


def test_single_host_needs_nothing():
    assert settings(environ={}) is None
    assert settings("h:1", 1, 0, environ={}) is None  # a group of one is a single host


def test_flags_and_environment():
    assert settings("10.0.0.1:1234", 4, 2, environ={}) == {
        "coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 2}
    env = {"GOOSE_COORDINATOR": "c:9", "GOOSE_NUM_PROCESSES": "2", "GOOSE_PROCESS_ID": "1"}
    assert settings(environ=env) == {"coordinator_address": "c:9", "num_processes": 2,
                                     "process_id": 1}
    # A flag wins over the environment.
    assert settings(process_id=0, environ=env)["process_id"] == 0


def test_clusters_jax_detects_itself():
    assert settings(environ={"SLURM_JOB_ID": "7", "SLURM_NTASKS": "8"}) == {}
    assert settings(environ={"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}) is None
    assert settings(environ={"TPU_WORKER_HOSTNAMES": "w0,w1,w2,w3"}) == {}


@pytest.mark.parametrize("kw,match", [
    ({"coordinator": "c:1"}, "all of"),
    ({"coordinator": "c:1", "num_processes": 2, "process_id": 2}, r"\[0, 2\)"),
    ({"coordinator": "c:1", "num_processes": "x", "process_id": 0}, "integer"),
])
def test_bad_settings_are_one_clear_error(kw, match):
    with pytest.raises(DistributedError, match=match):
        settings(environ={}, **kw)


def test_maybe_initialize_calls_jax_once(monkeypatch):
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: bool(calls))
    assert not distributed.maybe_initialize(environ={})
    assert calls == []
    env = {"GOOSE_COORDINATOR": "c:9", "GOOSE_NUM_PROCESSES": "2", "GOOSE_PROCESS_ID": "0"}
    assert distributed.maybe_initialize(environ=env)
    assert distributed.maybe_initialize(environ=env)
    assert calls == [{"coordinator_address": "c:9", "num_processes": 2, "process_id": 0,
                      **distributed.DEFAULT_TIMEOUTS}]


def test_timeouts_are_bounded_and_configurable():
    assert distributed.timeouts(environ={}) == distributed.DEFAULT_TIMEOUTS
    assert all(0 < v <= 300 for v in distributed.timeouts(environ={}).values())
    env = {"GOOSE_HEARTBEAT_TIMEOUT": "7", "GOOSE_INIT_TIMEOUT": "11"}
    got = distributed.timeouts(environ=env)
    assert (got["heartbeat_timeout_seconds"], got["initialization_timeout"]) == (7, 11)
    with pytest.raises(DistributedError, match="GOOSE_SHUTDOWN_TIMEOUT"):
        distributed.timeouts(environ={"GOOSE_SHUTDOWN_TIMEOUT": "0"})
    with pytest.raises(DistributedError, match="integer"):
        distributed.timeouts(environ={"GOOSE_HEARTBEAT_TIMEOUT": "soon"})


def test_single_process_helpers_are_plain():
    import numpy as np

    assert distributed.is_primary() and not distributed.is_multiprocess()
    distributed.barrier("nothing to wait for")
    tree = {"a": jax.numpy.arange(3), "b": np.ones(2)}
    got = distributed.fetch(tree)
    assert isinstance(got["a"], np.ndarray) and got["a"].tolist() == [0, 1, 2]
    # Not a runtime failure, or not in a process group: nothing happens, the caller re-raises.
    distributed.exit_on_peer_failure(ValueError("x"))


TRAIN_ARGV = ["experts", "--data", "a.jsonl", "--workdir", "w", "--library", "l"]
EVAL_ARGV = ["--base", "b", "--out", "o", "--tasks", "bbh/x"]


def _parsed_args(monkeypatch, name, argv):
    """The arguments tool ``name`` parses from ``argv``, caught where it would join a group."""
    seen = []

    def stop(args, *_, **__):
        seen.append(args)
        raise DistributedError("stopped by the test before joining")

    monkeypatch.setattr(distributed, "maybe_initialize", stop)
    tool(name)(argv)
    (args,) = seen
    return args


def test_tools_accept_the_flags(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    args = _parsed_args(monkeypatch, "goose-train", TRAIN_ARGV + [
        "--coordinator", "h:1", "--num-processes", "2", "--process-id", "1"])
    assert (args.coordinator, args.num_processes, args.process_id) == ("h:1", 2, 1)
    args = _parsed_args(monkeypatch, "goose-eval", EVAL_ARGV + ["--process-id", "0"])
    assert args.process_id == 0


@pytest.mark.parametrize("name,argv", [("goose-train", TRAIN_ARGV), ("goose-eval", EVAL_ARGV)])
def test_tools_reject_incomplete_flags(name, argv, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # should the check ever let the run go on, it writes only here
    rc = tool(name)(argv + ["--coordinator", "h:1"])
    # Incomplete multi-process flags: a one-line error naming what is missing, not a hang.
    assert rc == errors.USER_ERROR
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"{name}: error: ") and "Traceback" not in err
    assert "missing --num-processes and --process-id" in err, err
