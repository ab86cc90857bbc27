"""Train steps: what trains and what stays frozen, LoRA numerics, many experts at once, gradient
accumulation, sharding over the expert axis, data order."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import goose_jax as gj
from goose_jax.core import sharding
from goose_jax.core.errors import DataError, TrainConfigError
from goose_jax.core.trees import flatten_sites, nest_sites
from goose_jax.data import batching
from goose_jax.data.tokenizers import ByteTokenizer
from goose_jax.experts.lora import LoRAAdapter, dense_delta, init_experts, init_gates
from goose_jax.models.t5 import loss as t5_loss
from goose_jax.models.t5.model import T5, init_params
from goose_jax.training import program as training

# The tiny preset with 1 + 2 blocks: compiling train steps dominates this file's time.
CFG = gj.T5Config.preset("tiny").replace(num_encoder_layers=1, num_decoder_layers=2)
# Freezing the first encoder FFN exercises the optimiser's freeze mask in every step below.
# Adam normalises each coordinate, so where a gradient nearly cancels, float32 rounding
# differences between equivalent computations become differences in the update proportional to
# lr: the comparisons at 1e-5 use a smaller lr than the paper's 5e-3.
TCFG = training.TrainConfig(steps=8, lr=5e-4, warmup_ratio=0.25, micro_batch=2, grad_accum=4,
                            lora_rank=4, max_input_length=12, max_target_length=6, seed=0,
                            freeze=r"encoder/block_0/ffn/.*", fast_compile=True)
SCALE = TCFG.lora.lora_scale


FAST = training.FAST_COMPILE_OPTIONS  # compile in a fraction of the time


@pytest.fixture(scope="module")
def params():
    return init_params(CFG, 0)


@functools.partial(jax.jit, static_argnames="adapter", compiler_options=FAST)
def logits(params, ids, dec, mask, collections=None, adapter=None):
    """Teacher-forced logits (B, T, V), as ``gj.t5_logits`` computes them."""
    return T5(CFG, adapter).apply({"params": params, **(collections or {})}, ids, dec, mask)


def make_batch(seed, lead, A, M, L=12, T=6):
    """Random [*lead, A, M, L] inputs with ragged padding and [*lead, A, M, T] padded targets."""
    rng = np.random.default_rng(seed)
    shape = tuple(lead) + (A, M)
    inputs = rng.integers(2, CFG.vocab_size, shape + (L,)).astype(np.int32)
    mask = (np.arange(L) < rng.integers(3, L + 1, shape)[..., None]).astype(np.int32)
    targets = rng.integers(2, CFG.vocab_size, shape + (T,)).astype(np.int32)
    targets *= np.arange(T) < rng.integers(1, T + 1, shape)[..., None]
    return {"inputs": inputs * mask, "input_mask": mask, "targets": targets}


def expert_stack(E, seed=1):
    """E fresh experts, expert e from key seed + e."""
    return init_experts(CFG, TCFG.lora, [jax.random.key(seed + e) for e in range(E)],
                        fast_compile=True)


def run(program, base, frozen, trainable, batches):
    state = program.init(trainable)
    metrics = []
    for batch in batches:
        state, m = program.step(base, frozen, state, batch)
        metrics.append(jax.device_get(m))
    return state, metrics


def leaves(tree):
    return {k: np.asarray(v) for k, v in flatten_leaves(tree).items()}


def flatten_leaves(tree):
    return {"/".join(str(k.key) for k in p): x
            for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def assert_trees_close(a, b, atol=1e-5):
    la, lb = leaves(a), leaves(b)
    assert la.keys() == lb.keys()
    for k in la:
        np.testing.assert_allclose(la[k], lb[k], atol=atol, rtol=1e-5, err_msg=k)


# --- what trains ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def three_at_once(params):
    """Three experts trained side by side for two steps, and what went in."""
    program = training.Program("expert", CFG, TCFG, TCFG.steps, SCALE)
    experts = expert_stack(3)
    base_before = leaves(params)
    batches = [make_batch(s, (3,), 4, 2) for s in range(2)]
    state, metrics = run(program, params, None, experts, batches)
    return experts, base_before, batches, state, metrics


def test_expert_step_moves_only_unfrozen_expert_leaves(params, three_at_once):
    experts, base_before, _, state, metrics = three_at_once
    before = leaves(experts)
    assert int(state.step) == 2
    for k, v in leaves(params).items():  # the base is never touched
        assert np.array_equal(v, base_before[k]), k
    after = leaves(state.trainable)
    frozen = [k for k in after if k.startswith("encoder/block_0/ffn/")]
    moving = [k for k in after if k not in frozen]
    assert len(frozen) == 6 and len(moving) > 30
    for k in frozen:  # the freeze mask keeps these exactly, although their gradient is not 0
        assert np.array_equal(after[k], before[k]), k
    for k in moving:
        assert not np.allclose(after[k], before[k], atol=1e-6), k
    assert np.all(metrics[0]["grad_norm"] > 0) and metrics[0]["grad_norm"].shape == (3,)
    # Warm-up: the first step already uses lr / warmup_steps (2 warm-up steps of 8).
    assert metrics[0]["lr"] == pytest.approx(TCFG.lr / 2)
    assert metrics[1]["lr"] == pytest.approx(TCFG.lr)


def test_gate_step_trains_only_gates_and_needs_nonzero_b(params):
    program = training.Program("gate", CFG, TCFG, TCFG.gate_steps, SCALE)
    experts = expert_stack(2)
    rng = np.random.default_rng(5)
    flat = flatten_sites(experts)
    experts_b = nest_sites({site: {"lora_a": leaf["lora_a"],
                                   "lora_b": jnp.asarray(rng.normal(0, 0.5, leaf["lora_b"].shape),
                                                         jnp.float32)}
                            for site, leaf in flat.items()})
    gates = init_gates(experts_b)
    batches = [make_batch(10 + s, (2,), 4, 2) for s in range(2)]
    frozen_before = leaves(experts_b)
    state, metrics = run(program, params, experts_b, gates, batches)
    for k, v in leaves(experts_b).items():
        assert np.array_equal(v, frozen_before[k]), k
    moved = [k for k, v in leaves(state.trainable).items() if np.any(v != 0)]
    # every gate but the frozen encoder block-0 FFN ones moved away from zero
    assert len(moved) == len(leaves(gates)) - 3
    assert all(not k.startswith("encoder/block_0/ffn/") for k in moved)
    assert np.all(metrics[0]["grad_norm"] > 1e-6)

    # B = 0: the LoRA path is zero, so the gates get exactly zero gradient and stay at zero.
    state0, metrics0 = run(program, params, experts, gates, batches)
    assert np.all(metrics0[0]["grad_norm"] == 0)
    assert all(np.all(v == 0) for v in leaves(state0.trainable).values())


def test_full_finetune_step_respects_the_freeze_mask(params):
    tcfg = TCFG.replace(freeze=r"shared/.*|decoder/block_\d+/cross_attn/.*", grad_accum=1)
    program = training.Program("full", CFG, tcfg, tcfg.steps, many=False)
    before = leaves(params)
    state, _ = run(program, None, None, params, [make_batch(20, (), 1, 2)])
    after = leaves(state.trainable)
    frozen = [k for k in after if k.startswith("shared/") or "/cross_attn/" in k]
    assert len(frozen) == 1 + 2 * 4
    for k in after:
        same = np.array_equal(after[k], before[k])
        assert same == (k in frozen), k


# --- LoRA numerics -------------------------------------------------------------------------------


def test_zero_b_is_the_base_model_and_one_expert_is_a_dense_update(params):
    ids, mask, dec = (np.asarray(x) for x in make_batch(30, (), 1, 3).values())
    ids, mask, dec = ids[0], mask[0], np.concatenate([np.zeros((3, 1), np.int32),
                                                      dec[0][:, :-1]], axis=1)
    adapter = LoRAAdapter(SCALE)
    experts = expert_stack(1, seed=3)
    base = np.asarray(logits(params, ids, dec, mask))
    zero_b = np.asarray(logits(params, ids, dec, mask, {"experts": experts}, adapter))
    assert np.array_equal(zero_b, base)

    rng = np.random.default_rng(0)
    flat = flatten_sites(experts)
    flat = {s: {"lora_a": jnp.asarray(rng.normal(0, 0.3, v["lora_a"].shape), jnp.float32),
                "lora_b": jnp.asarray(rng.normal(0, 0.3, v["lora_b"].shape), jnp.float32)}
            for s, v in flat.items()}
    with_lora = np.asarray(logits(params, ids, dec, mask, {"experts": nest_sites(flat)},
                                  adapter))
    # Independent model: W + A B / r written into the kernels, no adapter at all.
    dense = jax.tree.map(np.array, params)
    for site, leaf in flat.items():
        node = dense
        for part in site.split("/"):
            node = node[part]
        node["kernel"] = node["kernel"] + np.asarray(
            dense_delta(leaf["lora_a"], leaf["lora_b"], 1.0 / TCFG.lora_rank))[0]
    merged = np.asarray(logits(dense, ids, dec, mask))
    assert np.abs(with_lora - base).max() > 0.1  # the experts really change the output
    np.testing.assert_allclose(with_lora, merged, atol=1e-5, rtol=1e-5)


def test_token_nll_is_masked_cross_entropy_of_shifted_targets(params):
    batch = {k: v[0] for k, v in make_batch(40, (), 1, 3).items()}
    assert np.any(batch["targets"] == 0)  # some padding to mask
    nll_fn = jax.jit(t5_loss.token_nll, static_argnums=0, compiler_options=FAST)
    nll, n = nll_fn(CFG, {"params": params}, batch)
    dec = np.concatenate([np.zeros((3, 1), np.int32), batch["targets"][:, :-1]], axis=1)
    np.testing.assert_array_equal(t5_loss.shift_right(jnp.asarray(batch["targets"]), 0), dec)
    z = np.asarray(logits(params, batch["inputs"], dec, batch["input_mask"]), np.float64)
    z = z - z.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    picked = np.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0]
    real = batch["targets"] != 0
    assert float(n) == real.sum()
    np.testing.assert_allclose(float(nll), -(picked * real).sum(), rtol=1e-5)


# --- many at once, accumulation, sharding ------------------------------------------------------


def _single_runs(params, experts_E, batches_E, E, steps):
    program = training.Program("expert", CFG, TCFG, TCFG.steps, SCALE)
    out = []
    for e in range(E):
        state, _ = run(program, params, None, training.slice_tree(experts_E, e),
                       [{k: v[e:e + 1] for k, v in b.items()} for b in batches_E[:steps]])
        out.append(state.trainable)
    return training.stack_trees(out)


def test_three_experts_at_once_equal_three_single_runs(params, three_at_once):
    experts, _, batches, state, _ = three_at_once
    alone = _single_runs(params, experts, batches, 3, 2)
    assert_trees_close(state.trainable, alone)
    # An expert's initialisation depends on its own key, not on how many train beside it.
    assert_trees_close(training.slice_tree(experts, 1), expert_stack(1, seed=2), atol=0)
    b = leaves(state.trainable)["decoder/block_1/ffn/wo/lora_b"]
    assert not np.allclose(b[0], b[1])  # the experts did learn different things


def test_grad_accum_four_by_two_equals_one_batch_of_eight(params):
    experts = expert_stack(1)
    batch = make_batch(60, (1,), 4, 2)
    accum = training.Program("expert", CFG, TCFG, TCFG.steps, SCALE)
    one = training.Program("expert", CFG, TCFG.replace(grad_accum=1, micro_batch=8),
                           TCFG.steps, SCALE)
    flat = {k: v.reshape(1, 1, 8, -1) for k, v in batch.items()}
    s_acc, m_acc = run(accum, params, None, experts, [batch, batch])
    s_one, m_one = run(one, params, None, experts, [flat, flat])
    assert_trees_close(s_acc.trainable, s_one.trainable)
    np.testing.assert_allclose(m_acc[0]["loss"], m_one[0]["loss"], rtol=1e-5)
    assert m_acc[0]["tokens"] == m_one[0]["tokens"] == (batch["targets"] != 0).sum()


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices: "
                    "XLA_FLAGS=--xla_force_host_platform_device_count=8")
def test_step_sharded_over_expert_and_data_axes_equals_single_runs(params):
    from goose_jax.core.sharding import make_mesh

    mesh = make_mesh(data=2, expert=4)
    experts = expert_stack(4)
    batches = [make_batch(70 + s, (4,), 4, 2) for s in range(2)]
    program = training.Program("expert", CFG, TCFG, TCFG.steps, SCALE)
    state = sharding.shard_state(program.init(experts), mesh)
    a = state.trainable["decoder"]["block_1"]["self_attn"]["q"]["lora_a"]
    assert a.sharding.spec[0] == "expert" and len(a.addressable_shards) == 8
    for b in batches:
        state, _ = program.step(params, None, state, sharding.shard_batch(b, mesh))
    assert_trees_close(state.trainable, _single_runs(params, experts, batches, 4, 2))


# --- config, schedule, data ----------------------------------------------------------------------


def test_schedule_and_config_validation():
    schedule = training.warmup_constant(5e-3, 4)
    assert [float(schedule(c)) for c in (0, 1, 3, 10)] == pytest.approx(
        [1.25e-3, 2.5e-3, 5e-3, 5e-3])
    assert TCFG.effective_batch == 8
    with pytest.raises(TrainConfigError, match="micro_batch"):
        TCFG.replace(micro_batch=0)
    with pytest.raises(TrainConfigError, match="freeze"):
        TCFG.replace(freeze="(")
    with pytest.raises(TrainConfigError, match="kind"):
        training.Program("experts", CFG, TCFG, 8)


class ListSource(list):
    pass


def test_batcher_order_is_a_pure_function_of_seed_stream_and_position():
    source = ListSource((f"in {i}", f"out {i}") for i in range(7))
    tok = ByteTokenizer()

    def batcher(stream=0, seed=3):
        return batching.Batcher(source, tok, micro_batch=2, grad_accum=2, max_input_length=8,
                                max_target_length=6, seed=seed, stream=stream)

    b = batcher()
    first_epoch = np.concatenate([b.indices(0), b.indices(4)[:3]])
    assert sorted(first_epoch.tolist()) == list(range(7))  # each example once per epoch
    assert not np.array_equal(b.indices(0), batcher(stream=1).indices(0))
    for key, value in b.batch(9).items():
        np.testing.assert_array_equal(value, batcher().batch(9)[key])
    batch = b.batch(0)
    assert batch["inputs"].shape == (2, 2, 8) and batch["targets"].shape == (2, 2, 6)
    first = source[int(b.indices(0)[0])]
    ids, _ = tok.encode_batch([first[1]], 6)
    np.testing.assert_array_equal(batch["targets"][0, 0], ids[0])
    # pre-tokenised examples pass through untouched (truncated to the length)
    pre = batching.Batcher(ListSource([([5, 6, 7], [8, 9])]), tok, micro_batch=1, grad_accum=1,
                           max_input_length=4, max_target_length=4, seed=0)
    np.testing.assert_array_equal(pre.batch(0)["inputs"][0, 0], [5, 6, 7, 0])
    with pytest.raises(DataError, match="vocabulary"):
        batching.Batcher(source, tok, micro_batch=1, grad_accum=1, max_input_length=4,
                         max_target_length=4, seed=0, vocab_size=101).batch(0)


def test_jsonl_source_reports_bad_files(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text('{"input": "a", "target": "b"}\n\n{"input": [4, 5], "target": "c"}\n')
    assert len(batching.JsonlSource(good)) == 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input": "a", "target": "b"}\n{"input": "a"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: expected"):
        batching.JsonlSource(bad)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match="empty dataset"):
        batching.JsonlSource(empty)
    with pytest.raises(DataError, match="cannot read"):
        batching.JsonlSource(tmp_path / "missing.jsonl")


def test_jsonl_source_names_the_line_of_bad_bytes_and_token_ids(tmp_path):
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes(b'{"input": "a", "target": "b"}\n\n{"input": "caf\xe9", "target": "c"}\n')
    with pytest.raises(DataError, match=r"latin1.jsonl:3: not UTF-8 text \(byte 0xe9"):
        batching.JsonlSource(latin1)
    negative = tmp_path / "negative.jsonl"
    negative.write_text('{"input": [4, 5], "target": "c"}\n{"input": "a", "target": [3, -1]}\n')
    with pytest.raises(DataError, match=r"negative.jsonl:2: 'target' holds the token id -1"):
        batching.JsonlSource(negative)
    ids = tmp_path / "ids.jsonl"
    ids.write_text('{"input": [4, 5], "target": "c"}\n\n{"input": [7, 101], "target": "d"}\n')
    source = batching.JsonlSource(ids)
    source.check_token_ids(102)
    with pytest.raises(DataError, match=r"ids.jsonl:3: 'input' holds the token id 101"):
        batching.ConcatSource([source]).check_token_ids(101)


# --- the loop -------------------------------------------------------------------------------------


class CountedSource(ListSource):
    """Pre-tokenised examples; reading example ``bad`` raises, as a broken file would."""

    bad = None

    def __getitem__(self, index):
        if index == self.bad:
            raise DataError(f"example {index} cannot be read")
        return super().__getitem__(index)


def loop_setup(tmp_path, steps, bad_position=None):
    from goose_jax.training.loop import train_loop

    source = CountedSource(([2 + i, 3 + i, 4], [5 + i, 6]) for i in range(10))
    tcfg = TCFG.replace(steps=steps, micro_batch=1, grad_accum=1, log_every=1, eval_every=0,
                        checkpoint_every=1 if bad_position else 0)
    batcher = batching.Batcher.from_config(source, ByteTokenizer(), tcfg, stream=1)
    if bad_position is not None:
        source.bad = int(batcher.indices(bad_position)[0])
    program = training.Program("expert", CFG, tcfg, steps, SCALE)
    return lambda params: train_loop(program, params, None, expert_stack(1), [batcher],
                                     str(tmp_path / "work"))


def test_train_loop_reads_each_logged_step_after_dispatching_the_next(params, tmp_path,
                                                                      monkeypatch):
    from goose_jax.training import loop as trainer

    events, step, to_json = [], training.Program.step, trainer._to_json

    def dispatch(self, *args):
        events.append("step")
        return step(self, *args)

    def fetch(metrics):
        events.append("read")
        return to_json(metrics)

    monkeypatch.setattr(training.Program, "step", dispatch)
    monkeypatch.setattr(training.Program, "step_donating", dispatch)
    monkeypatch.setattr(trainer, "_to_json", fetch)
    _, history, ran = loop_setup(tmp_path, 4)(params)
    # Step n's metrics are read once step n + 1 is queued; the last step's at the end.
    assert events == ["step", "step", "read", "step", "read", "step", "read", "read"]
    lines = [int(line.split('"step": ')[1].split(",")[0])
             for line in (tmp_path / "work" / "metrics.jsonl").read_text().splitlines()]
    assert lines == [1, 2, 3, 4] and ran == 4 and np.isfinite(history["loss"]).all()


def test_train_loop_raises_a_batch_error_at_the_step_of_that_batch(params, tmp_path,
                                                                   monkeypatch):
    from goose_jax.training.checkpoints import TrainCheckpointer

    calls, step = [], training.Program.step

    def dispatch(self, *args):
        calls.append(1)
        return step(self, *args)

    monkeypatch.setattr(training.Program, "step", dispatch)
    monkeypatch.setattr(training.Program, "step_donating", dispatch)
    # Step 3 reads position 2: the batches of steps 3 and 4 were built ahead, on another thread.
    with pytest.raises(DataError, match=r"^example \d+ cannot be read$"):
        loop_setup(tmp_path, 4, bad_position=2)(params)
    assert len(calls) == 2
    with TrainCheckpointer(tmp_path / "work" / "checkpoints") as ckpt:
        assert ckpt.all_steps() == [1, 2]
