"""When the command-line tools join JAX's distributed runtime, and with which arguments."""

import jax
import pytest

from goose_jax import distributed
from goose_jax.cli import eval as eval_cli
from goose_jax.cli import train as train_cli
from goose_jax.distributed import DistributedError, settings


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


def test_tools_accept_the_flags():
    args = train_cli.build_parser().parse_args(
        ["experts", "--data", "a.jsonl", "--workdir", "w", "--library", "l",
         "--coordinator", "h:1", "--num-processes", "2", "--process-id", "1"])
    assert (args.coordinator, args.num_processes, args.process_id) == ("h:1", 2, 1)
    args = eval_cli.build_parser().parse_args(["--base", "b", "--out", "o", "--process-id", "0"])
    assert args.process_id == 0
    rc = eval_cli.main(["--base", "b", "--out", "o", "--tasks", "bbh/x", "--coordinator", "h:1"])
    assert rc == 1  # incomplete multi-process flags: a one-line error, not a hang
