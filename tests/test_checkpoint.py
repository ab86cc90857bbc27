"""Orbax save/restore, model checkpoints, and the goose-convert command line."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tool

from goose_jax.core import checkpoint as core_checkpoint
from goose_jax.core.errors import CheckpointError
from goose_jax.models import checkpoint
from goose_jax.models.config import DTypePolicy
from goose_jax.models.t5.config import T5Config

main = tool("goose-convert")


def _random_tree(seed=0):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    return {
        "encoder": {"block_0": {"q": {"kernel": jax.random.normal(k1, (24, 24), jnp.float32)}},
                    "final_norm": {"scale": jax.random.normal(k2, (24,), jnp.bfloat16)}},
        "lm_head": {"kernel": jax.random.normal(k3, (24, 101), jnp.float32)},
    }


def _assert_bit_exact(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert isinstance(y, jax.Array)
        assert x.dtype == y.dtype and x.shape == y.shape
        assert np.array_equal(np.asarray(x), np.asarray(y))


def test_save_restore_tree_is_exact(tmp_path, monkeypatch):
    tree = _random_tree()
    monkeypatch.chdir(tmp_path)  # a relative path must work: it is made absolute before Orbax
    written = core_checkpoint.save_tree("ckpt", tree, metadata={"step": 7, "note": "hi"})
    assert written == str(tmp_path / "ckpt")
    assert core_checkpoint.read_metadata(tmp_path / "ckpt") == {"step": 7, "note": "hi"}
    _assert_bit_exact(tree, core_checkpoint.restore_tree(tmp_path / "ckpt"))

    # A target casts and a sharding places every leaf.
    device = jax.local_devices()[0]
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32), tree)
    restored = core_checkpoint.restore_tree("ckpt", target=target,
                                       shardings=jax.sharding.SingleDeviceSharding(device))
    assert {x.dtype for x in jax.tree.leaves(restored)} == {np.dtype(np.float32)}
    np.testing.assert_array_equal(
        restored["encoder"]["final_norm"]["scale"],
        np.asarray(tree["encoder"]["final_norm"]["scale"]).astype(np.float32))


@pytest.mark.skipif(jax.device_count() < 2, reason="needs several devices, e.g. "
                    "XLA_FLAGS=--xla_force_host_platform_device_count=8 as `make test` sets")
def test_tree_saved_on_a_mesh_restores_on_one_device_or_the_mesh(tmp_path):
    from jax.sharding import NamedSharding, PartitionSpec

    n = jax.device_count()
    mesh = jax.make_mesh((n,), ("data",))
    sharded = NamedSharding(mesh, PartitionSpec("data", None))
    x_NxD = jax.device_put(np.arange(n * 3 * 5, dtype=np.float32).reshape(n * 3, 5), sharded)
    core_checkpoint.save_tree(tmp_path / "ckpt", {"w": x_NxD})

    local = core_checkpoint.restore_tree(tmp_path / "ckpt")["w"]
    assert len(local.sharding.device_set) == 1
    np.testing.assert_array_equal(local, np.asarray(x_NxD))
    on_mesh = core_checkpoint.restore_tree(tmp_path / "ckpt", shardings={"w": sharded})["w"]
    assert on_mesh.sharding == sharded
    np.testing.assert_array_equal(on_mesh, np.asarray(x_NxD))


def test_save_tree_refuses_to_clobber(tmp_path):
    tree = _random_tree()
    core_checkpoint.save_tree(tmp_path / "a", tree)
    with pytest.raises(CheckpointError, match=r"already exists"):
        core_checkpoint.save_tree(tmp_path / "a", tree)
    other = _random_tree(seed=1)
    core_checkpoint.save_tree(tmp_path / "a", other, overwrite=True)
    _assert_bit_exact(other, core_checkpoint.restore_tree(tmp_path / "a"))

    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "precious.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match=r"not a goose-jax checkpoint; refusing"):
        core_checkpoint.save_tree(tmp_path / "b", tree, overwrite=True)
    assert (tmp_path / "b" / "precious.txt").read_text() == "keep me"
    with pytest.raises(CheckpointError, match=r"not JSON-serializable"):
        core_checkpoint.save_tree(tmp_path / "c", tree, metadata={"x": object()})


def test_restore_errors(tmp_path):
    with pytest.raises(CheckpointError, match=r"nowhere: checkpoint does not exist"):
        core_checkpoint.restore_tree(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match=rf"{tmp_path}: not a goose-jax checkpoint"):
        core_checkpoint.restore_tree(tmp_path)
    core_checkpoint.save_tree(tmp_path / "ok", _random_tree())
    wrong = {"lm_head": {"kernel": jax.ShapeDtypeStruct((24, 101), jnp.float32)}}
    with pytest.raises(CheckpointError, match=r"ok/params: cannot restore"):
        core_checkpoint.restore_tree(tmp_path / "ok", target=wrong)
    with pytest.raises(CheckpointError, match=r"not a T5 model checkpoint"):
        checkpoint.load_model(tmp_path / "ok")


def test_save_load_model_round_trip(tmp_path):
    from goose_jax.models.t5.model import init_params

    for cfg in (T5Config.preset("tiny"),
                T5Config.preset("tiny").replace(
                    feed_forward_proj="relu", tie_word_embeddings=True,
                    scale_decoder_outputs=False, dtype=DTypePolicy("bfloat16", "bfloat16"))):
        # Random leaves in the model's own tree (abstract init: no compile, keeps the test fast).
        shapes = jax.eval_shape(functools.partial(init_params, cfg))
        leaves, treedef = jax.tree.flatten(shapes)
        rng = np.random.default_rng(1)
        params = treedef.unflatten([jnp.asarray(rng.normal(size=x.shape), cfg.dtype.param)
                                    for x in leaves])
        path = tmp_path / cfg.dtype.param_dtype
        checkpoint.save_model(path, cfg, params)
        cfg2, params2 = checkpoint.load_model(path)
        assert cfg2 == cfg
        _assert_bit_exact(params, params2)


def _hf_dir(tmp_path):
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.T5Config(
        vocab_size=101, d_model=24, d_kv=8, d_ff=40, num_heads=3, num_layers=2,
        num_decoder_layers=3, relative_attention_num_buckets=8,
        relative_attention_max_distance=20, feed_forward_proj="gated-gelu",
        tie_word_embeddings=False)
    model = transformers.T5ForConditionalGeneration(config)
    model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.lm_head.weight))
    folder = tmp_path / "hf"
    model.save_pretrained(folder)
    return folder


def test_goose_convert_round_trip_is_bit_exact(tmp_path, capsys):
    from safetensors.numpy import load_file

    src = _hf_dir(tmp_path)
    assert main(["hf-to-orbax", str(src), str(tmp_path / "orbax")]) == 0
    out = capsys.readouterr().out
    assert "wrote goose-jax checkpoint" in out and "untied head" in out
    assert json.loads((tmp_path / "orbax" / core_checkpoint.META_NAME).read_text())["format"] == \
        "goose-jax"
    assert main(["orbax-to-hf", str(tmp_path / "orbax"), str(tmp_path / "back")]) == 0
    assert "model.safetensors" in capsys.readouterr().out

    want = load_file(src / "model.safetensors")
    got = load_file(tmp_path / "back" / "model.safetensors")
    assert set(got) == set(want)
    for key in want:
        assert got[key].dtype == want[key].dtype and np.array_equal(got[key], want[key]), key

    # bfloat16 on the way in: the written checkpoint holds bfloat16 parameters.
    assert main(["hf-to-orbax", str(src), str(tmp_path / "bf16"), "--dtype", "bfloat16"]) == 0
    cfg, params = checkpoint.load_model(tmp_path / "bf16")
    assert cfg.dtype.param_dtype == "bfloat16"
    assert {x.dtype for x in jax.tree.leaves(params)} == {np.dtype(jnp.bfloat16)}


def test_goose_convert_user_errors_are_one_line(tmp_path, capsys):
    code = main(["hf-to-orbax", str(tmp_path / "missing"), str(tmp_path / "dst")])
    err = capsys.readouterr().err
    assert code == 1
    assert err.count("\n") == 1 and err.startswith("goose-convert: error: ")
    assert "missing" in err and "does not exist" in err and "Traceback" not in err

    (tmp_path / "plain").mkdir()   # a folder that is not a checkpoint (DST apart from it)
    assert main(["orbax-to-hf", str(tmp_path / "plain"), str(tmp_path / "dst")]) == 1
    assert "not a goose-jax checkpoint" in capsys.readouterr().err
    assert main(["no-such-command"]) == 2


def test_overwrite_replaces_whole_and_a_crash_keeps_the_old(tmp_path, monkeypatch):
    """A replacing save writes the new tree beside the old one and commits by replacing the meta
    file: interrupted before that, the old checkpoint still loads, bit for bit."""
    old, new = _random_tree(0), _random_tree(1)
    core_checkpoint.save_tree(tmp_path / "c", old)
    meta = json.loads((tmp_path / "c" / core_checkpoint.META_NAME).read_text())
    assert meta["tree"] == "params" and all(v["bytes"] > 0 and v["sha256"].startswith("sha256:")
                                            for v in meta["files"].values())

    def crash(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(core_checkpoint, "_tree_files", crash)   # after Orbax wrote, before commit
    with pytest.raises(KeyboardInterrupt):
        core_checkpoint.save_tree(tmp_path / "c", new, overwrite=True)
    monkeypatch.undo()
    _assert_bit_exact(old, core_checkpoint.restore_tree(tmp_path / "c", verify=True))
    core_checkpoint.save_tree(tmp_path / "c", new, overwrite=True)
    _assert_bit_exact(new, core_checkpoint.restore_tree(tmp_path / "c", verify=True))
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == [core_checkpoint.META_NAME,
                                                                   "params-1"]


def test_checkpoint_without_a_file_record_still_loads_and_damage_is_one_error(tmp_path):
    """Checkpoints written before files were recorded load as before; damage to them is still
    a CheckpointError (never Orbax's AttributeError)."""
    tree = _random_tree()
    core_checkpoint.save_tree(tmp_path / "c", tree)
    meta_path = tmp_path / "c" / core_checkpoint.META_NAME
    meta = json.loads(meta_path.read_text())
    del meta["files"]
    meta_path.write_text(json.dumps(meta))
    _assert_bit_exact(tree, core_checkpoint.restore_tree(tmp_path / "c"))
    (tmp_path / "c" / "params" / "_METADATA").unlink()
    with pytest.raises(CheckpointError, match=r"metadata is unreadable.*re-create it"):
        core_checkpoint.restore_tree(tmp_path / "c")


def test_orbax_to_hf_overwrite_keeps_other_files(tmp_path, capsys):
    """--overwrite replaces the model in DST (and its stale weights of other formats); files
    that are not the model (a tokenizer) stay. Without it DST is left as it was."""
    from safetensors.numpy import load_file

    src = _hf_dir(tmp_path)
    assert main(["hf-to-orbax", str(src), str(tmp_path / "orbax")]) == 0
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "config.json").write_text("{}")
    (dst / "pytorch_model.bin").write_bytes(b"old weights")
    (dst / "tokenizer.json").write_text("{}")
    assert main(["orbax-to-hf", str(tmp_path / "orbax"), str(dst)]) == 1
    assert "already holds a Hugging Face model" in capsys.readouterr().err
    assert (dst / "config.json").read_text() == "{}"
    assert main(["orbax-to-hf", str(tmp_path / "orbax"), str(dst), "--overwrite"]) == 0
    assert sorted(p.name for p in dst.iterdir()) == ["config.json", "model.safetensors",
                                                     "tokenizer.json"]
    want = load_file(src / "model.safetensors")
    got = load_file(dst / "model.safetensors")
    assert all(np.array_equal(got[k], want[k]) for k in want)
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
