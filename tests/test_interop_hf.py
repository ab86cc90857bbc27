"""Hugging Face T5 checkpoints <-> params: mapping, round trips, file layouts and bad input.

Every checkpoint here is a tiny random transformers model built in the test; no network.
"""

import json
import os
import re
import shutil
import subprocess
import sys

import jax
import ml_dtypes
import numpy as np
import pytest

from goose_jax.core.errors import CheckpointError
from goose_jax.models import hf_folder
from goose_jax.models.config import DTypePolicy
from goose_jax.models.t5 import hf

SIZES = dict(vocab_size=101, d_model=24, d_kv=8, d_ff=40, num_heads=3, num_layers=2,
             num_decoder_layers=3, relative_attention_num_buckets=8,
             relative_attention_max_distance=20, dropout_rate=0.0)
# v1.0: ReLU, tied, scaled. v1.1: gated-GELU, untied, unscaled. tied-unscaled: gated-GELU with
# the head tied to the embedding but no output scaling (what transformers 5 builds for
# tie_word_embeddings=False unless lm_head is replaced).
VARIANTS = ("v1.0", "v1.1", "tied-unscaled")


def build_hf_model(variant: str, seed: int = 0):
    import torch
    import transformers

    torch.manual_seed(seed)
    if variant == "v1.0":
        config = transformers.T5Config(**SIZES, feed_forward_proj="relu")
    else:
        config = transformers.T5Config(**SIZES, feed_forward_proj="gated-gelu",
                                       tie_word_embeddings=False)
    model = transformers.T5ForConditionalGeneration(config).eval()
    with torch.no_grad():
        # Norm scales start at 1.0 everywhere; random ones make a swapped norm detectable.
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * 0.5 + (1.0 if "layer_norm" in name else 0.0))
    if variant == "v1.1":
        model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.lm_head.weight))
    return model


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """variant -> (the transformers model, the directory it saved itself to)."""
    out = {}
    for seed, variant in enumerate(VARIANTS):
        model = build_hf_model(variant, seed)
        folder = tmp_path_factory.mktemp(variant.replace(".", "_"))
        model.save_pretrained(folder)
        out[variant] = (model, str(folder))
    return out


def _hf_state(model) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def _our_path(hf_key: str) -> str:
    """The params path of a HF tensor, written independently of the table in interop/hf.py."""
    fixed = {"shared.weight": "shared/embedding", "lm_head.weight": "lm_head/kernel"}
    if hf_key in fixed:
        return fixed[hf_key]
    stack, rest = hf_key.split(".", 1)
    if rest == "final_layer_norm.weight":
        return f"{stack}/final_norm/scale"
    if rest == "block.0.layer.0.SelfAttention.relative_attention_bias.weight":
        return f"{stack}/relpos_bias/embedding"
    m = re.fullmatch(r"block\.(\d+)\.layer\.(\d)\.(\w+)\.(?:(\w+)\.)?weight", rest)
    assert m, hf_key
    block, layer, module, name = m.group(1), int(m.group(2)), m.group(3), m.group(4)
    if module == "layer_norm":
        names = (["self_attn_norm", "ffn_norm"] if stack == "encoder"
                 else ["self_attn_norm", "cross_attn_norm", "ffn_norm"])
        return f"{stack}/block_{block}/{names[layer]}/scale"
    site = {"SelfAttention": "self_attn", "EncDecAttention": "cross_attn",
            "DenseReluDense": "ffn"}[module]
    return f"{stack}/block_{block}/{site}/{name}/kernel"


def _flat(params) -> dict[str, np.ndarray]:
    return {"/".join(k.key for k in path): np.asarray(v)
            for path, v in jax.tree_util.tree_flatten_with_path(params)[0]}


def _assert_same_tree(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    fa, fb = _flat(a), _flat(b)
    for name in fa:
        assert fa[name].dtype == fb[name].dtype, name
        assert np.array_equal(fa[name], fb[name]), name


def _logits(model, input_ids, attention_mask, decoder_ids):
    import torch

    with torch.no_grad():
        return model(input_ids=torch.tensor(input_ids), attention_mask=torch.tensor(attention_mask),
                     decoder_input_ids=torch.tensor(decoder_ids)).logits.numpy()


# --- mapping -------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ("v1.0", "v1.1"))
def test_load_equals_transposed_hf_tensors(hf_dirs, variant):
    model, folder = hf_dirs[variant]
    cfg, params = hf.load_hf_t5(folder)
    assert cfg.tie_word_embeddings == (variant == "v1.0")
    assert cfg.scale_decoder_outputs == (variant == "v1.0")
    assert cfg.is_gated == (variant == "v1.1")
    assert (cfg.num_encoder_layers, cfg.num_decoder_layers, cfg.vocab_size) == (2, 3, 101)

    flat = _flat(params)
    expected = {}
    for key, value in _hf_state(model).items():
        if key.endswith("embed_tokens.weight") or (key == "lm_head.weight" and variant == "v1.0"):
            continue  # tied copies of shared.weight
        expected[_our_path(key)] = value.T if value.ndim == 2 and not key.endswith(
            ("shared.weight", "relative_attention_bias.weight")) else value
    assert set(flat) == set(expected)
    for name, value in expected.items():
        assert flat[name].dtype == np.float32, name
        assert np.array_equal(flat[name], value), name


def test_param_tree_matches_the_flax_model():
    from goose_jax.models.t5.config import T5Config
    from goose_jax.models.t5.model import init_params

    model = build_hf_model("v1.1")
    cfg = T5Config.preset("tiny")  # the sizes above, gated and untied
    params = hf.hf_state_dict_to_params(cfg, _hf_state(model))
    reference = jax.eval_shape(lambda: init_params(cfg))  # shapes only: no compile
    assert jax.tree.structure(params) == jax.tree.structure(reference)
    assert jax.tree.map(np.shape, params) == jax.tree.map(lambda x: x.shape, reference)


# --- round trips and transformers reading our output ----------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_round_trip_is_bit_exact_and_transformers_reads_it(hf_dirs, variant, tmp_path):
    import transformers
    from safetensors.numpy import load_file

    model, folder = hf_dirs[variant]
    cfg, params = hf.load_hf_t5(folder)
    out = tmp_path / "out"
    written = hf.save_hf_t5(cfg, params, out)
    assert sorted(os.path.basename(p) for p in written) == ["config.json", "model.safetensors"]

    cfg2, params2 = hf.load_hf_t5(out)
    assert cfg2 == cfg
    _assert_same_tree(params, params2)

    ours = load_file(out / "model.safetensors")
    theirs = load_file(os.path.join(folder, "model.safetensors"))
    config = json.loads((out / "config.json").read_text())
    if variant == "tied-unscaled":
        # transformers 4 can load a model without output scaling only untied, so we write the
        # head explicitly, equal to the embedding, and mark the config untied.
        assert set(ours) == set(theirs) | {"lm_head.weight"}
        assert np.array_equal(ours["lm_head.weight"], ours["shared.weight"])
        assert config["tie_word_embeddings"] is False
    else:
        assert set(ours) == set(theirs)
        assert config["tie_word_embeddings"] is (variant == "v1.0")
    for key in theirs:
        assert np.array_equal(ours[key], theirs[key]), key

    reloaded, info = transformers.T5ForConditionalGeneration.from_pretrained(
        out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert not info["mismatched_keys"]
    input_ids = np.array([[5, 17, 33, 99, 1], [8, 4, 1, 0, 0]])
    mask = (input_ids != 0).astype(np.int64)
    decoder_ids = np.array([[0, 12, 7, 50], [0, 3, 3, 100]])
    want = _logits(model, input_ids, mask, decoder_ids)
    got = _logits(reloaded.eval(), input_ids, mask, decoder_ids)
    assert np.max(np.abs(got - want)) <= 1e-6


def test_sharded_safetensors_load_equal(hf_dirs, tmp_path):
    model, folder = hf_dirs["v1.1"]
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / hf_folder.SAFE_INDEX_NAME).exists()
    assert not (tmp_path / hf_folder.SAFE_WEIGHTS_NAME).exists()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 2
    cfg, params = hf.load_hf_t5(tmp_path)
    cfg_ref, params_ref = hf.load_hf_t5(folder)
    assert cfg == cfg_ref
    _assert_same_tree(params, params_ref)


@pytest.mark.parametrize("variant", ("v1.0", "v1.1"))
def test_pytorch_bin_loads_equal(hf_dirs, variant, tmp_path):
    import torch

    model, folder = hf_dirs[variant]
    # A raw state dict also holds encoder/decoder.embed_tokens and, when tied, an lm_head equal
    # to the embedding: the loader must accept them and still infer the tying right.
    torch.save(model.state_dict(), tmp_path / hf_folder.TORCH_WEIGHTS_NAME)
    shutil.copy(os.path.join(folder, "config.json"), tmp_path)
    cfg, params = hf.load_hf_t5(tmp_path)
    cfg_ref, params_ref = hf.load_hf_t5(folder)
    assert cfg == cfg_ref
    _assert_same_tree(params, params_ref)


def test_bfloat16_params_and_sources(hf_dirs, tmp_path):
    import torch

    model, folder = hf_dirs["v1.1"]
    cfg, params = hf.load_hf_t5(folder, dtype=DTypePolicy("bfloat16", "bfloat16"))
    assert cfg.dtype.param_dtype == "bfloat16"
    flat = _flat(params)
    assert {v.dtype for v in flat.values()} == {np.dtype(ml_dtypes.bfloat16)}
    q = model.encoder.block[1].layer[0].SelfAttention.q.weight.detach()
    q_bf16 = q.to(torch.bfloat16).float().numpy().T
    assert np.array_equal(flat["encoder/block_1/self_attn/q/kernel"].astype(np.float32), q_bf16)

    # bf16 on disk (safetensors and .bin) reads as the same bits, into float32 or bfloat16.
    model.to(torch.bfloat16).save_pretrained(tmp_path / "st")
    model.to(torch.float32)
    torch.save({k: v.to(torch.bfloat16) for k, v in model.state_dict().items()},
               tmp_path / hf_folder.TORCH_WEIGHTS_NAME)
    shutil.copy(os.path.join(folder, "config.json"), tmp_path)
    _, from_st = hf.load_hf_t5(tmp_path / "st", dtype=DTypePolicy("bfloat16"))
    _, from_bin = hf.load_hf_t5(tmp_path, dtype=DTypePolicy("bfloat16"))
    _assert_same_tree(from_st, params)
    _assert_same_tree(from_bin, params)
    _, as_f32 = hf.load_hf_t5(tmp_path / "st")
    assert np.array_equal(_flat(as_f32)["encoder/block_1/self_attn/q/kernel"], q_bf16)

    hf.save_hf_t5(cfg, params, tmp_path / "out")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "out" / "model.safetensors"), "np") as f:
        assert f.get_slice("shared.weight").get_dtype() == "BF16"
    cfg2, params2 = hf.load_hf_t5(tmp_path / "out", dtype=DTypePolicy("bfloat16", "bfloat16"))
    assert cfg2 == cfg
    _assert_same_tree(params2, params)


def test_hf_cache_layout(hf_dirs, tmp_path):
    _, folder = hf_dirs["v1.0"]
    entry = tmp_path / "models--org--tiny-t5"
    good, stale = "a" * 40, "b" * 40
    shutil.copytree(folder, entry / "snapshots" / good)
    (entry / "snapshots" / stale).mkdir(parents=True)  # newer, but not what refs/main names
    (entry / "refs").mkdir()
    (entry / "refs" / "main").write_text(good + "\n")
    cfg, params = hf.load_hf_t5(entry)
    cfg_ref, params_ref = hf.load_hf_t5(folder)
    assert cfg == cfg_ref
    _assert_same_tree(params, params_ref)

    # Without refs/main the newest snapshot wins: here the empty one, so no weights.
    (entry / "refs" / "main").unlink()
    os.utime(entry / "snapshots" / stale, (2e9, 2e9))
    with pytest.raises(CheckpointError, match=stale):
        hf.load_hf_t5(entry)


def test_progress_bar_only_on_a_terminal(monkeypatch):
    from goose_jax.core.progress import progress_enabled

    class Terminal:
        def isatty(self):
            return True

    monkeypatch.delenv("GOOSE_QUIET", raising=False)
    monkeypatch.setattr(sys, "stderr", Terminal())
    assert progress_enabled()
    monkeypatch.setenv("GOOSE_QUIET", "1")
    assert not progress_enabled()
    monkeypatch.undo()
    monkeypatch.delenv("GOOSE_QUIET", raising=False)
    assert not progress_enabled()  # pytest captures stderr: not a terminal


def test_import_does_not_pull_torch_or_tensorflow():
    code = ("import sys, goose_jax.models.t5.hf, goose_jax.data.tokenizers, "
            "goose_jax.models.checkpoint, goose_jax.cli.convert, goose_jax.core.tensorfile, "
            "goose_jax.core.progress, goose_jax.library.store, "
            "goose_jax.interop.peft, goose_jax.interop.release, goose_jax.library.stacking; "
            "print(sorted(m for m in ('torch', 'tensorflow', 'transformers', 'safetensors') "
            "if m in sys.modules))")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         check=True)
    assert out.stdout.strip() == "[]"


# --- bad input -----------------------------------------------------------------------------------


@pytest.fixture
def v11_copy(hf_dirs, tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(hf_dirs["v1.1"][1], folder)
    return folder


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match=r"nowhere.*does not exist"):
        hf.load_hf_t5(tmp_path / "nowhere")


def test_directory_without_config(v11_copy):
    (v11_copy / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"config\.json: missing"):
        hf.load_hf_t5(v11_copy)


def test_config_not_t5(v11_copy):
    (v11_copy / "config.json").write_text(json.dumps(
        {"model_type": "bert", "architectures": ["BertModel"], "hidden_size": 24}))
    with pytest.raises(CheckpointError, match=r"config\.json: not a T5 config"):
        hf.load_hf_t5(v11_copy)


def test_config_not_json(v11_copy):
    (v11_copy / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config\.json: cannot read the config as JSON"):
        hf.load_hf_t5(v11_copy)


def test_no_weights_file(v11_copy):
    (v11_copy / "model.safetensors").unlink()
    (v11_copy / "flax_model.msgpack").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"no weights file.*flax_model\.msgpack"):
        hf.load_hf_t5(v11_copy)


def test_shape_mismatch_names_tensor_and_shapes(v11_copy):
    config = json.loads((v11_copy / "config.json").read_text())
    config["d_ff"] = 44
    (v11_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError) as err:
        hf.load_hf_t5(v11_copy)
    msg = str(err.value)
    assert "model.safetensors" in msg and "shape" in msg
    assert "encoder.block.0.layer.1.DenseReluDense.wi_0.weight has shape (40, 24), " \
           "expected (44, 24)" in msg


def test_truncated_safetensors(v11_copy):
    path = v11_copy / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a readable safetensors "
                                              r"file \(truncated or corrupt"):
        hf.load_hf_t5(v11_copy)


def test_missing_shard(hf_dirs, tmp_path):
    hf_dirs["v1.1"][0].save_pretrained(tmp_path, max_shard_size="20KB")
    shard = sorted(tmp_path.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError) as err:
        hf.load_hf_t5(tmp_path)
    assert hf_folder.SAFE_INDEX_NAME in str(err.value) and shard.name in str(err.value)
    assert "missing" in str(err.value)


def test_bin_without_torch(hf_dirs, tmp_path, monkeypatch):
    import torch

    model, folder = hf_dirs["v1.0"]
    torch.save(model.state_dict(), tmp_path / hf_folder.TORCH_WEIGHTS_NAME)
    shutil.copy(os.path.join(folder, "config.json"), tmp_path)
    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` raise ImportError
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin: .*needs torch"):
        hf.load_hf_t5(tmp_path)


def test_corrupt_bin(hf_dirs, tmp_path):
    shutil.copy(os.path.join(hf_dirs["v1.0"][1], "config.json"), tmp_path)
    (tmp_path / hf_folder.TORCH_WEIGHTS_NAME).write_bytes(b"\x80\x02not a checkpoint")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin: not a readable PyTorch"):
        hf.load_hf_t5(tmp_path)


def test_missing_and_unexpected_tensors(hf_dirs):
    model, folder = hf_dirs["v1.1"]
    cfg, _ = hf.load_hf_t5(folder)
    state = _hf_state(model)
    del state["decoder.block.2.layer.1.EncDecAttention.k.weight"]
    with pytest.raises(CheckpointError, match=r"src\.bin: 1 tensor\(s\).*missing: "
                                              r"decoder\.block\.2\.layer\.1\.EncDecAttention\.k"):
        hf.hf_state_dict_to_params(cfg, state, source="src.bin")

    state = _hf_state(model)
    state["encoder.block.2.layer.0.SelfAttention.q.weight"] = np.zeros((24, 24), np.float32)
    with pytest.raises(CheckpointError, match=r"unexpected tensor.*encoder\.block\.2\.layer\.0"):
        hf.hf_state_dict_to_params(cfg, state, source="src.bin")

    # Known-harmless extras are ignored.
    state = _hf_state(model)
    state["decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight"] = \
        np.zeros((8, 3), np.float32)
    params = hf.hf_state_dict_to_params(cfg, state)
    assert "lm_head" in params


def test_tied_config_with_different_head_is_refused(hf_dirs):
    model, folder = hf_dirs["v1.1"]
    cfg, _ = hf.load_hf_t5(folder)
    with pytest.raises(CheckpointError, match=r"lm_head\.weight differs"):
        hf.hf_state_dict_to_params(cfg.replace(tie_word_embeddings=True), _hf_state(model))


def test_saving_params_that_do_not_fit(hf_dirs, tmp_path):
    cfg, params = hf.load_hf_t5(hf_dirs["v1.1"][1])
    with pytest.raises(CheckpointError, match=r"unexpected parameter.*lm_head/kernel"):
        hf.save_hf_t5(cfg.replace(tie_word_embeddings=True), params, tmp_path)
    params["encoder"]["block_0"]["ffn"]["wo"]["kernel"] = np.zeros((41, 24), np.float32)
    with pytest.raises(CheckpointError, match=r"encoder/block_0/ffn/wo/kernel has shape "
                                              r"\(41, 24\), expected \(40, 24\)"):
        hf.save_hf_t5(cfg, params, tmp_path)
    assert not os.listdir(tmp_path)
