"""Expert and gate training on a decoder-only base: the causal-LM loss against transformers'
LlamaForCausalLM, what trains and what stays frozen, many experts at once against single runs,
and goose-train end to end on ``random:llama-tiny``. On the first decoder family only (the Llama
family's tiny preset): training is the same code for every family past the family's
``token_nll``, and each check compiles a training step."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tool, write_jsonl
from family_cases import FIRST, FIRST_RANDOM_BASE, family_of, pack, target_weights

from goose_jax.core.trees import flatten_sites, nest_sites
from goose_jax.data import batching
from goose_jax.data.tokenizers import ByteTokenizer
from goose_jax.experts.lora import init_experts, init_gates
from goose_jax.library.store import ExpertLibrary
from goose_jax.models import families
from goose_jax.training import program as training

# Tiny GQA Llama, untied head; odd sizes.
FAM = family_of(FIRST)
CFG = FAM.preset(FIRST_RANDOM_BASE.removeprefix("random:"))
FAST = training.FAST_COMPILE_OPTIONS
# Freezing layer 0's MLP exercises the optimiser's freeze mask on decoder sites. A small lr keeps
# the comparisons at 1e-5 clear of Adam's amplified rounding (see tests/test_training.py).
TCFG = training.TrainConfig(steps=8, lr=5e-4, warmup_ratio=0.25, micro_batch=2, grad_accum=2,
                            lora_rank=3, max_input_length=6, max_target_length=5, seed=0,
                            freeze=r"layers_0/mlp/.*", fast_compile=True)
SCALE = TCFG.lora.lora_scale
L, T = TCFG.max_input_length, TCFG.max_target_length

main = tool("goose-train")


@pytest.fixture(scope="module")
def params():
    # Ten times the default std: logits far from uniform, so an error in the loss shows.
    return jax.tree.map(lambda x: x * 10.0 if x.ndim == 2 else x, FAM.init_params(CFG, 0))


def make_batch(seed, lead, A, M):
    """Random [*lead, A, M, L] right-padded prompts (at least one token) and [*lead, A, M, T]
    right-padded targets (pad 0)."""
    rng = np.random.default_rng(seed)
    shape = tuple(lead) + (A, M)
    inputs = rng.integers(3, CFG.vocab_size, shape + (L,)).astype(np.int32)
    mask = (np.arange(L) < rng.integers(1, L + 1, shape)[..., None]).astype(np.int32)
    targets = rng.integers(3, CFG.vocab_size, shape + (T,)).astype(np.int32)
    targets *= np.arange(T) < rng.integers(1, T + 1, shape)[..., None]
    return {"inputs": inputs * mask, "input_mask": mask, "targets": targets}


def leaves(tree):
    return {"/".join(str(k.key) for k in p): np.asarray(x)
            for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def run(program, base, frozen, trainable, batches):
    state = program.init(trainable)
    for batch in batches:
        state, metrics = program.step(base, frozen, state, batch)
    return state, jax.device_get(metrics)


def expert_stack(E, seed=1):
    return init_experts(CFG, TCFG.lora, [jax.random.key(seed + e) for e in range(E)],
                        fast_compile=True)


# --- the loss ------------------------------------------------------------------------------------


def test_loss_equals_transformers_llama_with_prompt_and_padding_ignored(params, tmp_path):
    import torch
    import transformers

    batch = {k: v[0] for k, v in make_batch(0, (), 1, 4).items()}
    nll, n = jax.jit(FAM.token_nll, static_argnums=0, compiler_options=FAST)(
        CFG, {"params": params}, batch)

    # The reference: each row's prompt and target written out by hand, then padded; labels
    # -100 on the prompt and the padding; transformers shifts the labels itself.
    rows = [list(i[m == 1]) + list(t[t != 0]) for i, m, t in
            zip(batch["inputs"], batch["input_mask"], batch["targets"])]
    ids = np.zeros((len(rows), L + T), np.int64)
    att = np.zeros_like(ids)
    labels = np.full_like(ids, -100)
    for b, row in enumerate(rows):
        ids[b, :len(row)], att[b, :len(row)] = row, 1
        prompt = int(batch["input_mask"][b].sum())
        labels[b, prompt:len(row)] = row[prompt:]
    FAM.save_hf(CFG, params, str(tmp_path / "hf"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        want = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(att),
                  labels=torch.tensor(labels)).loss.item()
    assert float(n) == (labels != -100).sum() == (batch["targets"] != 0).sum()
    assert abs(want - np.log(CFG.vocab_size)) > 0.5  # far from uniform: a wrong token shows
    np.testing.assert_allclose(float(nll) / float(n), want, rtol=0, atol=1e-5)


def test_pack_and_pad_equal_to_eos():
    batch = {"inputs": jnp.asarray([[5, 6, 0], [7, 0, 0]]),
             "input_mask": jnp.asarray([[1, 1, 0], [1, 0, 0]]),
             "targets": jnp.asarray([[8, 2, 2, 2], [9, 4, 2, 2]])}
    ids, mask, target = pack(CFG.replace(pad_token_id=2), batch)
    # pad == EOS (Qwen2): a row's first 2 is its EOS and counts; the rest is padding.
    np.testing.assert_array_equal(ids, [[5, 6, 8, 2, 2, 2, 2], [7, 9, 4, 2, 2, 2, 2]])
    np.testing.assert_array_equal(mask, [[1, 1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0, 0]])
    np.testing.assert_array_equal(target, [[0, 0, 1, 1, 0, 0, 0], [0, 1, 1, 1, 0, 0, 0]])
    ids, mask, target = pack(CFG, batch)  # pad 0, EOS 2: every 2 is a token
    np.testing.assert_array_equal(target.sum(-1), [4, 4])


def test_prompts_have_no_eos_and_a_bos_only_where_both_have_one():
    class Source(list):
        pass

    class WithBos(ByteTokenizer):
        bos_id = 1

    source = Source([("ab", "c")])

    def inputs(cfg, tok):
        b = batching.Batcher(source, tok, micro_batch=1, grad_accum=1, max_input_length=4,
                             max_target_length=3, seed=0,
                             **FAM.batch_encoding(cfg, tok))
        out = b.batch(0)
        np.testing.assert_array_equal(out["targets"][0, 0], [ord("c") + 3, 1, 0])  # EOS
        return out["inputs"][0, 0].tolist()

    a, b = ord("a") + 3, ord("b") + 3
    assert inputs(CFG, ByteTokenizer()) == [a, b, 0, 0]  # no BOS in the tokenizer
    assert inputs(CFG, WithBos()) == [1, a, b, 0]
    assert inputs(CFG.replace(bos_token_id=None), WithBos()) == [a, b, 0, 0]


# --- steps ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def three_at_once(params):
    program = training.Program("expert", CFG, TCFG, TCFG.steps, SCALE)
    experts = expert_stack(3)
    base_before = leaves(params)
    batches = [make_batch(s, (3,), 2, 2) for s in range(2)]
    state, metrics = run(program, params, None, experts, batches)
    return experts, base_before, batches, state, metrics


def test_expert_step_moves_only_unfrozen_lora_leaves(params, three_at_once):
    experts, base_before, _, state, metrics = three_at_once
    for k, v in leaves(params).items():
        assert np.array_equal(v, base_before[k]), k
    before, after = leaves(experts), leaves(state.trainable)
    assert after.keys() == before.keys()
    assert all(k.endswith(("/lora_a", "/lora_b")) for k in after)
    assert {k.rsplit("/", 1)[0] for k in after} == set(FAM.site_shapes(CFG))
    frozen = [k for k in after if k.startswith("layers_0/mlp/")]
    assert len(frozen) == 6
    for k in after:
        assert np.array_equal(after[k], before[k]) == (k in frozen), k
    assert metrics["loss"].shape == (3,) and np.all(metrics["grad_norm"] > 0)


def test_three_experts_at_once_equal_three_single_runs(params, three_at_once):
    experts, _, batches, state, _ = three_at_once
    program = training.Program("expert", CFG, TCFG, TCFG.steps, SCALE)
    alone = []
    for e in range(3):
        s, _ = run(program, params, None, training.slice_tree(experts, e),
                   [{k: v[e:e + 1] for k, v in b.items()} for b in batches])
        alone.append(s.trainable)
    got, want = leaves(state.trainable), leaves(training.stack_trees(alone))
    for k in want:
        np.testing.assert_allclose(got[k], want[k], atol=1e-5, rtol=1e-5, err_msg=k)
    b = got["layers_1/mlp/down/lora_b"]
    assert not np.allclose(b[0], b[1])  # the experts learned different things


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices: "
                    "XLA_FLAGS=--xla_force_host_platform_device_count=8")
def test_step_on_a_mesh_equals_single_runs(params, three_at_once):
    """Experts over ``expert``, rows over ``data``, the base laid out by the decoder's logical
    axes: the single-device result."""
    from goose_jax.core import sharding

    experts, _, batches, state, _ = three_at_once
    mesh = sharding.make_mesh(data=2, expert=4)
    program = training.Program("expert", CFG, TCFG, TCFG.steps, SCALE, mesh=mesh)
    four = training.stack_trees([experts, training.slice_tree(experts, 0)])
    batches4 = [{k: np.concatenate([v, v[:1]]) for k, v in b.items()} for b in batches]
    sharded, _ = run(program, params, None, four, batches4)
    a = sharded.trainable["layers_1"]["self_attn"]["k"]["lora_a"]
    assert a.sharding.spec[0] == "expert"
    got, want = leaves(sharded.trainable), leaves(state.trainable)
    for k in want:
        np.testing.assert_allclose(got[k][:3], want[k], atol=1e-5, rtol=1e-5, err_msg=k)
        np.testing.assert_allclose(got[k][3], want[k][0], atol=1e-5, rtol=1e-5, err_msg=k)


def test_gate_step_trains_only_gates(params):
    program = training.Program("gate", CFG, TCFG, TCFG.gate_steps, SCALE)
    rng = np.random.default_rng(5)
    experts = nest_sites({site: {"lora_a": leaf["lora_a"],
                                 "lora_b": jnp.asarray(rng.normal(0, 0.5, leaf["lora_b"].shape),
                                                       jnp.float32)}
                          for site, leaf in flatten_sites(expert_stack(2)).items()})
    gates = init_gates(experts)
    frozen_before, base_before = leaves(experts), leaves(params)
    state, metrics = run(program, params, experts, gates,
                         [make_batch(10 + s, (2,), 2, 2) for s in range(2)])
    for k, v in leaves(experts).items():
        assert np.array_equal(v, frozen_before[k]), k
    for k, v in leaves(params).items():
        assert np.array_equal(v, base_before[k]), k
    after = leaves(state.trainable)
    assert after.keys() == leaves(gates).keys() and all(k.endswith("/gate") for k in after)
    moved = {k for k, v in after.items() if np.any(v != 0)}
    assert moved == {k for k in after if not k.startswith("layers_0/mlp/")}
    assert np.all(metrics["grad_norm"] > 1e-6)


def test_remat_gradients_equal_plain_gradients():
    """``TrainConfig.remat`` reaches the decoder's layers (a checkpoint in the jaxpr) and leaves
    the expert gradients as they are without it."""
    params = FAM.init_params(CFG, 0)
    experts = jax.tree.map(lambda x: x + 0.01, expert_stack(1))   # B non-zero: A moves too
    rng = np.random.default_rng(1)
    batch = {"inputs": jnp.asarray(rng.integers(3, CFG.vocab_size, (2, 5)), jnp.int32),
             "input_mask": jnp.ones((2, 5), jnp.int32),
             "targets": jnp.asarray(rng.integers(3, CFG.vocab_size, (2, 4)), jnp.int32)}

    def grads(remat):
        program = training.Program("expert", CFG, TCFG.replace(remat=remat), steps=1,
                                   lora_scale=0.5, many=False)

        def loss(trainable):
            nll, n = program._nll(params, None, trainable, batch)
            return nll / n

        jaxpr = str(jax.make_jaxpr(jax.grad(loss))(experts))
        assert ("checkpoint" in jaxpr or "remat" in jaxpr) == (remat != "none")
        return jax.jit(jax.grad(loss))(experts)

    plain = grads("none")
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(plain)) > 1e-5
    for remat in ("block", "dots"):
        got = grads(remat)
        for g, h in zip(jax.tree.leaves(got), jax.tree.leaves(plain)):
            np.testing.assert_allclose(np.asarray(g), np.asarray(h), rtol=1e-5, atol=1e-7)


# --- goose-train ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    words = ["goose", "jax", "llama", "route", "token"]
    return [write_jsonl(d / "reverse.jsonl", [(f"reverse: {w}", w[::-1]) for w in words]),
            write_jsonl(d / "upper.jsonl", [(f"upper: {w}", w.upper()) for w in words])]


def _args(command, data, lib, work, *extra):
    import pathlib

    tiny = pathlib.Path(__file__).resolve().parents[1] / "configs" / "tiny.py"
    return [command, "--config", str(tiny), "--base", FIRST_RANDOM_BASE, "--set",
            "tokenizer=byte", "--data", *data, "--library", str(lib), "--workdir", str(work),
            *extra]


def test_goose_train_experts_and_gates_on_llama_tiny(data, tmp_path, capsys):
    lib = tmp_path / "lib"
    assert main(_args("experts", data, lib, tmp_path / "w1")) == 0
    assert main(_args("gate", data, lib, tmp_path / "w2")) == 0
    manifest = json.loads((lib / "manifest.json").read_text())
    assert manifest["base_model"]["family"] == FIRST
    opened = ExpertLibrary.open(lib)
    assert opened.family == FIRST and opened.names == ["reverse", "upper"]
    experts, gates = opened.load(gates=True)
    assert set(flatten_sites(experts)) == set(FAM.site_shapes(CFG.replace(vocab_size=259)))
    assert np.abs(leaves(experts)["layers_1/mlp/down/lora_b"]).max() > 0  # it trained
    assert np.abs(np.concatenate([np.ravel(g) for g in jax.tree.leaves(gates)])).max() > 0
    lines = [json.loads(s) for s in open(tmp_path / "w1" / "metrics.jsonl")]
    assert all(np.all(np.isfinite(m["loss"])) for m in lines if "loss" in m)
    # One LoRA on the mixture of both files (not vmapped over experts).
    assert main(_args("multitask", data, lib, tmp_path / "w4", "--set", "steps=2")) == 0
    assert ExpertLibrary.open(lib).names == ["reverse", "upper", "multitask"]
    capsys.readouterr()
    # A T5 base is refused, in one line, and the library is left as it was.
    before = (lib / "manifest.json").read_bytes()
    t5 = _args("gate", data, lib, tmp_path / "w3", "--overwrite")
    t5[t5.index(FIRST_RANDOM_BASE)] = "random:tiny"
    assert main(t5) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and families.describe(FIRST) in err and "T5" in err, err
    assert (lib / "manifest.json").read_bytes() == before


def test_goose_train_refuses_an_unknown_remat_before_any_work(data, tmp_path, capsys):
    args = _args("experts", data, tmp_path / "lib", tmp_path / "w", "--set", "remat=all")
    assert main(args) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "remat" in err, err
    assert not (tmp_path / "lib").exists() and not (tmp_path / "w").exists()


def test_goose_train_runs_encode_prompts_without_eos(data, tmp_path):
    from goose_jax.pipeline import train_runs

    setup = train_runs.Setup(train_runs.RunArgs(
        "experts", data, str(tmp_path / "w"), overrides=["tokenizer=byte", "eval_every=0"],
        base=FIRST_RANDOM_BASE))
    batch = setup.batcher(setup.sources[0], 0).batch(0)
    ends = batch["inputs"][0, 0, batch["input_mask"][0, 0].sum() - 1]
    assert ends != ByteTokenizer.eos_id  # the prompt runs straight into its target
    # Validation during training (tests/test_decoder_e2e.py) and multitask_mode=full
    # (tests/test_decoder_checkpoint.py) run on a decoder base.


def test_targets_end_at_the_tokenizers_eos_not_the_configs_first(data, tmp_path):
    """A config whose pad is its first EOS (Llama 3.1 Instruct lists three, no pad) while the
    tokenizer ends text with another EOS: the loss counts each target up to the tokenizer's EOS
    and no padding after it."""
    from goose_jax.pipeline import train_runs

    setup = train_runs.Setup(train_runs.RunArgs(
        "experts", data, str(tmp_path / "w"), overrides=["tokenizer=byte", "eval_every=0"],
        base=FIRST_RANDOM_BASE))
    assert setup.cfg.eos_token_id == ByteTokenizer.eos_id != setup.full_cfg.eos_token_id
    assert setup.full_cfg.eos_token_id == CFG.eos_token_id
    base = setup.full_cfg.replace(pad_token_id=setup.full_cfg.eos_token_id)  # pad = EOS = 2
    run = FAM.with_tokenizer(base, ByteTokenizer())                # targets end at 1
    targets = jnp.asarray([[10, 11, ByteTokenizer.eos_id, 2, 2, 2]], jnp.int32)
    np.testing.assert_array_equal(target_weights(run, targets),
                                  [[1, 1, 1, 0, 0, 0]])
    # The base's own config would train a padding token as an EOS after every target.
    np.testing.assert_array_equal(target_weights(base, targets),
                                  [[1, 1, 1, 1, 0, 0]])
