"""goose-jax model checkpoints of decoder-only models: save_model / load_model, goose-convert
hf-to-orbax / orbax-to-hf against transformers, goose-train's multitask_mode=full, and the
padding rule of Llama-family tokenizers; hostile cases one line each with nothing written."""

import functools
import json
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import one_line, tool, tree_hash, write_jsonl
from family_cases import DECODERS, FIRST, FIRST_RANDOM_BASE, family_of, hf_model, tiny_config

from goose_jax.core import checkpoint as core_checkpoint
from goose_jax.core.errors import CheckpointError
from goose_jax.models import checkpoint, families
from goose_jax.models.config import DTypePolicy
from goose_jax.models.t5.config import T5Config

convert = tool("goose-convert")
train = tool("goose-train")
# The first decoder family's random:...-tiny base; and every family's tiny case (each with its
# quirks: q/k/v biases, a tied head, ...) in bfloat16 storage.
TINY = family_of(FIRST).preset(FIRST_RANDOM_BASE.removeprefix("random:"))
CASE_CONFIGS = [tiny_config(name).replace(dtype=DTypePolicy("bfloat16", "bfloat16"))
                for name in DECODERS]


def _random_params(cfg, seed=1):
    """Random leaves in the model's own tree (abstract init: nothing compiled)."""
    shapes = jax.eval_shape(functools.partial(families.init_params, cfg))
    leaves, treedef = jax.tree.flatten(shapes)
    rng = np.random.default_rng(seed)
    return treedef.unflatten([jnp.asarray(rng.normal(size=x.shape), cfg.dtype.param)
                              for x in leaves])


def _assert_bit_exact(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert np.array_equal(np.asarray(x), np.asarray(y))


def _same_model(a, b):
    """Equal as transformers sees them and in dtype policy. (``DecoderConfig`` fields that
    config.json does not carry, such as ``rope_original_max_position_embeddings`` of a model
    without llama3 rotary scaling, come back as ``from_hf_dict`` defaults them; they change
    nothing.)"""
    return a.to_hf_dict() == b.to_hf_dict() and a.dtype == b.dtype and type(a) is type(b)


def _set_metadata(path, **changes):
    meta_path = path / core_checkpoint.META_NAME
    meta = json.loads(meta_path.read_text())
    meta["metadata"].update(changes)
    meta_path.write_text(json.dumps(meta))


# --- save_model / load_model ----------------------------------------------------------------------


def test_decoder_model_round_trip_is_bit_exact(tmp_path):
    for n, cfg in enumerate((TINY, *CASE_CONFIGS)):
        params = _random_params(cfg)
        name = families.family(cfg)
        path = tmp_path / f"{n}_{name}"
        checkpoint.save_model(path, cfg, params)
        meta = core_checkpoint.read_metadata(path)
        assert meta["family"] == name and meta["config"]["model_type"] == name
        cfg2, params2 = checkpoint.load_model(path)
        assert _same_model(cfg2, cfg)
        _assert_bit_exact(params, params2)
        assert checkpoint.read_model_config(path, family=families.DECODER_FAMILIES) == cfg2


def test_t5_checkpoint_written_before_decoder_support_still_loads(tmp_path):
    """The old metadata (kind t5, t5_config, no family), written here as it was then."""
    cfg = T5Config.preset("tiny").replace(tie_word_embeddings=True, scale_decoder_outputs=False,
                                          dtype=DTypePolicy("bfloat16", "float32"))
    params = _random_params(cfg)
    core_checkpoint.save_tree(tmp_path / "old", params, metadata={
        "kind": "t5", "t5_config": cfg.to_hf_dict(), "tie_word_embeddings": True,
        "dtype_policy": {"param_dtype": "bfloat16", "compute_dtype": "float32"}})
    cfg2, params2 = checkpoint.load_model(tmp_path / "old")
    assert cfg2 == cfg
    _assert_bit_exact(params, params2)
    # Written now, a T5 records its family like any model and loads the same.
    checkpoint.save_model(tmp_path / "new", cfg, params)
    assert core_checkpoint.read_metadata(tmp_path / "new")["family"] == "t5"
    assert checkpoint.load_model(tmp_path / "new", family="t5")[0] == cfg


def test_a_checkpoint_of_one_family_is_refused_where_the_other_is_expected(tmp_path):
    t5_cfg = T5Config.preset("tiny")
    t5_params = _random_params(t5_cfg)
    checkpoint.save_model(tmp_path / "t5", t5_cfg, t5_params)
    checkpoint.save_model(tmp_path / "dec", TINY, _random_params(TINY))
    dec = re.escape(families.describe(FIRST))   # decoder-only (llama), escaped

    def refused(match, fn, *args, **kwargs):
        with pytest.raises(CheckpointError, match=match) as e:
            fn(*args, **kwargs)
        assert "\n" not in str(e.value)

    refused(rf"holds a {dec} model, expected T5", checkpoint.load_model,
            tmp_path / "dec", family="t5")
    refused(rf"holds a T5 model, expected {dec} or", checkpoint.load_model,
            tmp_path / "t5", family=families.DECODER_FAMILIES)
    # A T5 tree under a decoder's metadata: the decoder's params check refuses it.
    _set_metadata(tmp_path / "t5", **core_checkpoint.read_metadata(tmp_path / "dec"))
    refused(r"params: \d+ parameter\(s\) missing for this config: embed_tokens/embedding",
            checkpoint.load_model, tmp_path / "t5")
    # Saving a model under the other family's config writes nothing.
    refused(r"parameter\(s\) missing", checkpoint.save_model, tmp_path / "x", TINY, t5_params)
    assert not (tmp_path / "x").exists()


# --- goose-convert ------------------------------------------------------------------------------


def _logits(model):
    import torch

    ids = np.random.default_rng(0).integers(3, 101, size=(2, 9))
    mask = np.ones_like(ids)
    mask[1, 6:] = 0
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)
                     ).logits.float().numpy()


@pytest.mark.parametrize("family", DECODERS)
def test_goose_convert_round_trip_loads_in_transformers_with_the_same_logits(
        family, tmp_path, capsys):
    import transformers

    from goose_jax.models.base import load_base

    model = hf_model(family)
    model.save_pretrained(tmp_path / "hf")
    want_cfg, want_params = family_of(family).load_hf(str(tmp_path / "hf"))
    assert convert(["hf-to-orbax", str(tmp_path / "hf"), str(tmp_path / "orbax")]) == 0
    assert family_of(family).summary(want_cfg) in capsys.readouterr().out
    # load_base reads the checkpoint as the directory it came from, bit for bit.
    cfg, params = load_base(str(tmp_path / "orbax"))
    assert cfg == want_cfg
    _assert_bit_exact(want_params, params)
    assert convert(["orbax-to-hf", str(tmp_path / "orbax"), str(tmp_path / "back")]) == 0
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    assert type(back) is type(model)
    np.testing.assert_allclose(_logits(back), _logits(model), atol=1e-5, rtol=0)
    if family == FIRST:   # bfloat16 on the way in: the checkpoint holds bfloat16
        assert convert(["hf-to-orbax", str(tmp_path / "hf"), str(tmp_path / "bf16"),
                        "--dtype", "bfloat16"]) == 0
        cfg, params = checkpoint.load_model(tmp_path / "bf16")
        assert cfg.dtype.param_dtype == "bfloat16"
        assert {x.dtype for x in jax.tree.leaves(params)} == {np.dtype(jnp.bfloat16)}


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices, as `make test` sets")
def test_a_decoder_checkpoint_loads_onto_a_mesh(tmp_path):
    from goose_jax.core import sharding
    from goose_jax.models.base import load_base
    from goose_jax.models.families import base_shardings

    params = _random_params(TINY)
    checkpoint.save_model(tmp_path / "m", TINY, params)
    mesh = sharding.make_mesh(data=4, model=2)
    cfg, placed = load_base(str(tmp_path / "m"), mesh=mesh)
    assert _same_model(cfg, TINY)
    _assert_bit_exact(params, placed)
    want = base_shardings(TINY, mesh)
    assert jax.tree.leaves(jax.tree.map(lambda x: x.sharding, placed)) == jax.tree.leaves(want)
    assert any(len(s.spec) and any(s.spec) for s in jax.tree.leaves(want))  # some split


# --- goose-train multitask_mode=full ------------------------------------------------------------


def test_multitask_full_on_a_decoder_base_writes_a_model_load_base_reads(tmp_path, capsys):
    import pathlib

    from goose_jax.models.base import load_base

    data = write_jsonl(tmp_path / "mix.jsonl",
                       [(f"reverse: {w}", w[::-1]) for w in ("goose", "jax", "llama", "route")])
    config = pathlib.Path(__file__).resolve().parents[1] / "configs" / "tiny.py"
    assert train(["multitask", "--config", str(config), "--base", FIRST_RANDOM_BASE,
                  "--set", "tokenizer=byte", "--set", "steps=2", "--set", "multitask_mode=full",
                  "--data", data,
                  "--out", str(tmp_path / "model"), "--workdir", str(tmp_path / "w")]) == 0
    assert "multitask model" in capsys.readouterr().out
    cfg, params = load_base(str(tmp_path / "model"))
    start_cfg, start = load_base(FIRST_RANDOM_BASE, min_vocab_size=259)
    assert _same_model(cfg, start_cfg.with_dtypes("float32", start_cfg.dtype.compute_dtype))
    assert jax.tree.structure(params) == jax.tree.structure(start)
    moved = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params),
                                                      jax.tree.leaves(start), strict=True)]
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(params)) and all(moved)


# --- tokenizers without a padding token ---------------------------------------------------------


WORDS = ["the", "goose", "routes", "tokens", "among", "experts", "llama", "jax"]


def _tokenizer_dir(folder, pad=None):
    """A Llama-style tokenizer (<unk> 0, <s> 1, </s> 2, words from 3), built offline; padding
    token ``pad`` (None: none, as most Llama-family tokenizers)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(WORDS)},
             "<pad>": 3 + len(WORDS)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    extra = {} if pad is None else {"pad_token": pad}
    PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>", **extra).save_pretrained(folder)
    return str(folder)


def test_a_tokenizer_without_padding_pads_with_the_model_pad_id(tmp_path):
    from goose_jax.models.base import load_tokenizer

    cfg = TINY.replace(pad_token_id=0)
    folder = _tokenizer_dir(tmp_path / "nopad")
    tok = load_tokenizer(folder, cfg)
    assert (tok.pad_id, tok.eos_id, tok.own_pad) == (0, 2, False)
    ids, mask = tok.encode_batch(["the goose", "jax"], max_length=4)
    np.testing.assert_array_equal(ids, [[3, 4, 2, 0], [10, 2, 0, 0]])
    np.testing.assert_array_equal(mask, [[1, 1, 1, 0], [1, 1, 0, 0]])
    assert tok.decode(ids[0]) == "the goose"
    # A padding token of the tokenizer's own that agrees with the model is used.
    agreed = load_tokenizer(_tokenizer_dir(tmp_path / "pad", "<pad>"), cfg.replace(
        pad_token_id=11))
    assert (agreed.pad_id, agreed.own_pad) == (11, True)
    # One that differs, or none and no model to take it from: one line each.
    for spec, model, match in [(str(tmp_path / "pad"), cfg, "pad id 11 differs from the "
                                "model's pad_token_id 0; make them one id"),
                               (folder, None, "no EOS or no padding token")]:
        with pytest.raises(CheckpointError, match=match) as e:
            load_tokenizer(spec, model)
        assert "\n" not in str(e.value)


def test_goose_train_batches_of_a_llama_dir_without_a_pad_token(tmp_path):
    """A Hugging Face Llama directory whose tokenizer has no padding token: goose-train's
    batches pad with the model's pad_token_id (its EOS, since config.json names no pad), which
    the causal loss masks after each row's first EOS."""
    from goose_jax.pipeline import train_runs

    hf_model(FIRST, pad_token_id=None).save_pretrained(tmp_path / "hf")  # config.json: no pad
    _tokenizer_dir(tmp_path / "hf")
    data = write_jsonl(tmp_path / "d.jsonl", [("the goose routes", "tokens"), ("jax", "llama")])
    setup = train_runs.Setup(train_runs.RunArgs(
        "experts", [data], str(tmp_path / "w"), overrides=["eval_every=0"],
        base=str(tmp_path / "hf")))
    assert setup.tokenizer.pad_id == setup.cfg.pad_token_id == setup.cfg.eos_token_id == 2
    batch = setup.batcher(setup.sources[0], 0).batch(0)
    # Targets "tokens </s>" / "llama </s>", padded with EOS (2) to max_target_length.
    rows = {tuple(row) for row in batch["targets"].reshape(-1, batch["targets"].shape[-1])}
    tail = (2,) * (batch["targets"].shape[-1] - 2)
    assert rows == {(6, 2, *tail), (9, 2, *tail)}


# --- hostile cases: one line each, nothing written ----------------------------------------------


def test_hostile_conversions_and_runs_are_one_line_and_write_nothing(tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    checkpoint.save_model(ckpt, TINY, _random_params(TINY))
    hf = tmp_path / "hf"
    hf_model(FIRST).save_pretrained(hf)
    unknown = tmp_path / "unknown"
    shutil.copytree(ckpt, unknown)
    _set_metadata(unknown, family="gpt2")
    biased = tmp_path / "biased"   # metadata of a Llama with attention biases
    shutil.copytree(ckpt, biased)
    bad = dict(core_checkpoint.read_metadata(ckpt)["config"], attention_bias=True)
    _set_metadata(biased, config=bad)
    missing = tmp_path / "missing"               # a Llama directory short of a tensor
    shutil.copytree(hf, missing)
    from safetensors.numpy import load_file, save_file

    tensors = load_file(missing / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, missing / "model.safetensors", metadata={"format": "pt"})
    taken = tmp_path / "taken"                   # holds a Hugging Face model already
    shutil.copytree(hf, taken)
    data = write_jsonl(tmp_path / "d.jsonl", [("a", "b")])
    cases = {
        "unknown family": (convert, ["orbax-to-hf", str(unknown), str(tmp_path / "o1")],
                           "unknown model family 'gpt2'"),
        "metadata that does not fit the tree": (
            convert, ["orbax-to-hf", str(biased), str(tmp_path / "o2")],
            "parameter(s) missing for this config: layers_0/self_attn/k/bias"),
        "a tensor short": (convert, ["hf-to-orbax", str(missing), str(tmp_path / "o3")],
                           "lacks 1 tensor(s)"),
        "destination holds a model": (convert, ["orbax-to-hf", str(ckpt), str(taken)],
                                      "already holds a Hugging Face model"),
        "destination holds a checkpoint": (convert, ["hf-to-orbax", str(hf), str(ckpt)],
                                           "checkpoint already exists"),
        "full run into a folder that is no checkpoint": (
            train, ["multitask", "--base", FIRST_RANDOM_BASE, "--set", "tokenizer=byte",
                    "--set", "multitask_mode=full", "--data", data, "--out", str(taken),
                    "--workdir", str(tmp_path / "w")], "is not a goose-jax checkpoint"),
    }
    before = tree_hash(tmp_path)
    capsys.readouterr()
    for name, (main, argv, match) in cases.items():
        assert main(argv) == 1, name
        line = one_line(capsys.readouterr().err, "goose-convert" if main is convert
                        else "goose-train")
        assert match in line, (name, line)
        assert tree_hash(tmp_path) == before, name
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(("o1", "o2", "o3", "w"))]
