"""Train steps on a mesh: declared input / output shardings, donation, and initialisation built
in its layout, against the single-device program."""

import jax
import numpy as np
import pytest

import goose_jax as gj
from goose_jax.core import sharding
from goose_jax.experts.lora import init_experts, init_gates
from goose_jax.models.t5.model import init_params
from goose_jax.training import program as training

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices: "
                                "XLA_FLAGS=--xla_force_host_platform_device_count=8")

CFG = gj.T5Config.preset("tiny").replace(num_encoder_layers=1, num_decoder_layers=1)
TCFG = training.TrainConfig(steps=4, lr=5e-4, warmup_ratio=0.25, micro_batch=2, grad_accum=2,
                            lora_rank=4, max_input_length=8, max_target_length=4, seed=0,
                            fast_compile=True)
E = 4


@pytest.fixture(scope="module")
def mesh():
    return sharding.make_mesh(data=2, expert=4)


@pytest.fixture(scope="module")
def params():
    return init_params(CFG, 0)


def keys(n=E):
    return [jax.random.key(10 + e) for e in range(n)]


def make_batch(seed, lead=(E,), A=2, M=2, L=8, T=4):
    rng = np.random.default_rng(seed)
    shape = tuple(lead) + (A, M)
    inputs = rng.integers(2, CFG.vocab_size, shape + (L,)).astype(np.int32)
    mask = (np.arange(L) < rng.integers(3, L + 1, shape)[..., None]).astype(np.int32)
    targets = rng.integers(2, CFG.vocab_size, shape + (T,)).astype(np.int32)
    targets *= np.arange(T) < rng.integers(1, T + 1, shape)[..., None]
    return {"inputs": inputs * mask, "input_mask": mask, "targets": targets}


def shard_rows(tree):
    """Leading dims of every leaf's addressable shards."""
    return {s.data.shape[0] for x in jax.tree.leaves(tree) for s in x.addressable_shards}


def assert_close(a, b, atol=1e-6):
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=1e-5,
                                   err_msg=jax.tree_util.keystr(path))


def test_init_builds_the_experts_and_state_already_sharded(mesh):
    host = init_experts(CFG, TCFG.lora, keys(), fast_compile=True)
    placed = init_experts(CFG, TCFG.lora, keys(), fast_compile=True, mesh=mesh)
    assert shard_rows(placed) == {E // 4}  # E / X experts on each device, never the whole stack
    assert_close(placed, host, atol=0)  # the single-device values, bit for bit
    program = training.Program("expert", CFG, TCFG, TCFG.steps, 1.0, mesh=mesh)
    state = program.init(placed)
    assert shard_rows((state.trainable, state.opt_state[0]["train"])) == {E // 4} | {1}
    mu = jax.tree.leaves(state.opt_state)[1]
    assert mu.sharding.spec[0] == "expert" and mu.addressable_shards[0].data.shape[0] == 1
    assert state.step.sharding.is_fully_replicated
    gates = init_gates(placed, mesh=mesh)
    assert shard_rows(gates) == {1}
    assert_close(gates, init_gates(host), atol=0)


def test_sharded_steps_equal_the_single_device_steps_and_declare_their_layouts(mesh, params):
    experts = init_experts(CFG, TCFG.lora, keys(), fast_compile=True)
    batches = [make_batch(s) for s in range(2)]
    single = training.Program("expert", CFG, TCFG, TCFG.steps, 1.0)
    on_mesh = training.Program("expert", CFG, TCFG, TCFG.steps, 1.0, mesh=mesh)
    base = sharding.shard_params(params, gj.param_logical_axes(CFG), mesh)
    a, b = single.init(experts), on_mesh.init(experts)
    for batch in batches:
        a, ma = single.step(params, None, a, batch)
        b, mb = on_mesh.step_donating(base, None, b, batch)  # host batch: placed as declared
    assert_close(b.trainable, a.trainable, atol=1e-6)
    assert_close(mb, ma, atol=1e-6)

    declared = on_mesh.shardings(base, None, b, batches[0])
    lowered = on_mesh.step_fn(base, None, b, batches[0]).lower(
        *sharding.abstract((base, None, b, batches[0]), declared))
    compiled = lowered.compile()
    args, _ = compiled.input_shardings
    ndim = [x.ndim for x in jax.tree.leaves((base, b, batches[0]))]
    for got, want, n in zip(jax.tree.leaves(args), jax.tree.leaves(declared), ndim):
        assert got.is_equivalent_to(want, n), (got, want)
    out_state, out_metrics = compiled.output_shardings
    for got, want, n in zip(jax.tree.leaves(out_state), jax.tree.leaves(declared[2]),
                            [x.ndim for x in jax.tree.leaves(b)]):
        assert got.is_equivalent_to(want, n)
    assert out_metrics["loss"].spec[0] == "expert" and out_metrics["lr"].is_fully_replicated
    # The state leaves as it came in: the next step takes it as is (no copy, no recompile).
    for x, s in zip(jax.tree.leaves(b), jax.tree.leaves(declared[2])):
        assert x.sharding == s


def test_gate_step_on_a_mesh_equals_the_single_device_step(mesh, params):
    experts = init_experts(CFG, TCFG.lora, keys(), fast_compile=True)
    # Non-zero B, so the gates get a gradient.
    experts = jax.tree_util.tree_map_with_path(
        lambda p, x: x + 0.05 if "lora_b" in jax.tree_util.keystr(p) else x, experts)
    batch = make_batch(7)
    single = training.Program("gate", CFG, TCFG, TCFG.steps, 1.0)
    on_mesh = training.Program("gate", CFG, TCFG, TCFG.steps, 1.0, mesh=mesh)
    a, ma = single.step(params, experts, single.init(init_gates(experts)), batch)
    frozen = sharding.shard_experts(experts, mesh)
    b, mb = on_mesh.step(params, frozen, on_mesh.init(init_gates(frozen, mesh=mesh)), batch)
    assert shard_rows(b.trainable) == {1}
    assert_close(b.trainable, a.trainable, atol=1e-6)
    np.testing.assert_allclose(mb["loss"], ma["loss"], rtol=1e-5)
