"""PEFT LoRA adapters in and out, checked against the peft package itself on a tiny T5."""

import json
import shutil
import warnings

import numpy as np
import pytest
from conftest import build_hf_t5, random_batch, tool

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

import goose_jax as gj  # noqa: E402
from goose_jax.core.errors import AdapterError, GooseError, UnsafeCheckpointError  # noqa: E402
from goose_jax.core.trees import flatten_sites  # noqa: E402
from goose_jax.interop.peft import export_peft, import_peft, load_peft_adapter  # noqa: E402
from goose_jax.library.stacking import write_library  # noqa: E402
from goose_jax.library.store import ExpertLibrary  # noqa: E402
from goose_jax.routing.methods import build_routed  # noqa: E402

VARIANT = "v1_1"  # gated FFN (wi_0, wi_1), untied head

# name -> (LoraConfig keywords, save as safetensors)
ADAPTERS = {
    "qv": (dict(r=4, lora_alpha=8, target_modules=["q", "v"]), True),
    "rslora_regex": (dict(r=3, lora_alpha=5, use_rslora=True,
                          target_modules=r"decoder\.block\.\d+\.layer\.1\.EncDecAttention\.(k|o)"
                                         r"|encoder\.block\.1\.layer\.1\.DenseReluDense\.wi_1"),
                     True),
    "patterns": (dict(r=4, lora_alpha=7, target_modules=["k", "o", "wi_0", "wo"],
                      rank_pattern={"wo": 2, "encoder.block.1.layer.0.SelfAttention.k": 5},
                      alpha_pattern={"wi_0": 3}), True),
    "layers_bin": (dict(r=2, lora_alpha=2, target_modules=["q", "wi_1"],
                        layers_to_transform=[1], layers_pattern="block"), False),
}

convert_main = tool("goose-convert")


class NotATensor:
    """A class a weights-only unpickler must refuse to import."""


def _peft_model(name, seed):
    kwargs, _ = ADAPTERS[name]
    config = peft.LoraConfig(task_type="SEQ_2_SEQ_LM", **kwargs)
    model = peft.get_peft_model(build_hf_t5(VARIANT), config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # PEFT starts B at zero; a test of the product needs B != 0.
        for pname, p in model.named_parameters():
            if "lora_B" in pname:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    return model.eval()


def _torch_logits(model, batch):
    ids, mask, dec = batch
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                     decoder_input_ids=torch.tensor(dec)).logits.numpy()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Base model (HF dir + goose-jax params), four PEFT adapters on disk, their logits."""
    root = tmp_path_factory.mktemp("peft")
    base = build_hf_t5(VARIANT)
    base.save_pretrained(root / "base")
    cfg, params = gj.load_hf_t5(root / "base")
    batch = random_batch(np.random.default_rng(0), 2, 9, 5, cfg.vocab_size)
    dirs, logits, covered = {}, {}, {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for seed, name in enumerate(ADAPTERS):
            model = _peft_model(name, seed)
            dirs[name] = root / name
            model.save_pretrained(dirs[name], safe_serialization=ADAPTERS[name][1])
            logits[name] = _torch_logits(model, batch)
            covered[name] = {n.removeprefix("base_model.model.").removesuffix(".lora_A.default")
                             for n, _ in model.named_modules() if n.endswith("lora_A.default")}
    return dict(root=root, cfg=cfg, params=params, batch=batch, dirs=dirs, logits=logits,
                covered=covered, base_logits=_torch_logits(base, batch))


@pytest.fixture(scope="module")
def imported(world):
    return import_peft([world["dirs"][n] for n in ADAPTERS], world["cfg"])


def _site_to_module(cfg):
    from goose_jax.models.t5.hf import tensor_specs

    return {"/".join(s.path[:-1]): s.hf_key.removesuffix(".weight") for s in tensor_specs(cfg)
            if s.transpose and s.path[0] != "lm_head"}


def test_stacked_import_matches_peft_logits(world, imported):
    cfg, params = world["cfg"], world["params"]
    assert imported.names == list(ADAPTERS)
    assert imported.rank == 5  # the rank_pattern maximum
    assert imported.scale == 2.0  # alpha / r of "qv": the scale most (adapter, site) pairs have
    assert imported.gates is None
    ids, mask, dec = world["batch"]
    for n, name in enumerate(ADAPTERS):
        routed = build_routed("single", cfg, imported.experts, expert=n, scale=imported.scale)
        got = np.asarray(gj.t5_logits(cfg, params, ids, dec, mask, routing=routed))
        np.testing.assert_allclose(got, world["logits"][name], atol=1e-4, rtol=0, err_msg=name)
        # The adapter really changes the model, so the comparison above can fail.
        assert np.abs(world["logits"][name] - world["base_logits"]).max() > 1e-2


def test_coverage_padding_and_exact_copy(world, imported):
    to_module = _site_to_module(world["cfg"])
    flat = flatten_sites(imported.experts)
    for n, name in enumerate(ADAPTERS):
        covered = {to_module[s] for s in imported.info[n]["covered_sites"]}
        assert covered == world["covered"][name], name
        for site, leaf in flat.items():
            if to_module[site] not in covered:  # no expert here: exactly zero
                assert not leaf["lora_a"][n].any() and not leaf["lora_b"][n].any()
    assert set(imported.sites) == {s for s, m in to_module.items()
                                   if any(m in c for c in world["covered"].values())}
    # "qv" has the library scale: its B is copied bit for bit, its rank 4 padded to 5 with zeros.
    from safetensors.numpy import load_file

    state = load_file(str(world["dirs"]["qv"] / "adapter_model.safetensors"))
    site = "decoder/block_2/cross_attn/v"
    module = to_module[site]
    leaf = flat[site]
    a = state[f"base_model.model.{module}.lora_A.weight"]
    b = state[f"base_model.model.{module}.lora_B.weight"]
    np.testing.assert_array_equal(leaf["lora_a"][0, :, :4], a.T)
    np.testing.assert_array_equal(leaf["lora_b"][0, :4], b.T)
    assert not leaf["lora_a"][0, :, 4:].any() and not leaf["lora_b"][0, 4:].any()


def test_bin_and_fan_in_fan_out(world, tmp_path):
    """A .bin adapter reads like its safetensors twin; fan_in_fan_out changes nothing for T5."""
    cfg = world["cfg"]
    bin_dir = world["dirs"]["layers_bin"]
    assert (bin_dir / "adapter_model.bin").is_file()
    twin = tmp_path / "twin"
    twin.mkdir()
    shutil.copy(bin_dir / "adapter_config.json", twin)
    state = torch.load(bin_dir / "adapter_model.bin", weights_only=True)
    from safetensors.torch import save_file

    save_file(state, str(twin / "adapter_model.safetensors"))
    conf = json.loads((twin / "adapter_config.json").read_text())
    conf["fan_in_fan_out"] = True
    (twin / "adapter_config.json").write_text(json.dumps(conf))
    a, b = load_peft_adapter(bin_dir, cfg), load_peft_adapter(twin, cfg)
    assert list(a.sites) == list(b.sites) == ["encoder/block_1/self_attn/q",
                                              "encoder/block_1/ffn/wi_1",
                                              "decoder/block_1/self_attn/q",
                                              "decoder/block_1/cross_attn/q",
                                              "decoder/block_1/ffn/wi_1"]
    for site in a.sites:
        np.testing.assert_array_equal(a.sites[site].lora_b, b.sites[site].lora_b)
        assert a.sites[site].scale == b.sites[site].scale == 1.0


def test_bfloat16_adapter(world, tmp_path):
    from safetensors.torch import load_file, save_file

    src = world["dirs"]["qv"]
    half = tmp_path / "bf16"
    half.mkdir()
    shutil.copy(src / "adapter_config.json", half)
    state = load_file(str(src / "adapter_model.safetensors"))
    save_file({k: v.to(torch.bfloat16) for k, v in state.items()},
              str(half / "adapter_model.safetensors"))
    a, b = load_peft_adapter(src, world["cfg"]), load_peft_adapter(half, world["cfg"])
    for site, lora in a.sites.items():
        rounded = torch.from_numpy(lora.lora_b).to(torch.bfloat16).float().numpy()
        np.testing.assert_array_equal(b.sites[site].lora_b, rounded)
        assert b.sites[site].lora_b.dtype == np.float32


def test_export_reimport_exact_and_peft_loads_it(world, imported, tmp_path):
    cfg, params = world["cfg"], world["params"]
    lib = write_library(imported, tmp_path / "lib", cfg, params)
    assert lib.names == list(ADAPTERS)
    assert "covered_sites" in lib.info("qv")
    experts, gates = lib.load()
    assert gates is None
    exported = {}
    for name in ADAPTERS:
        exported[name] = tmp_path / f"out_{name}"
        export_peft(lib, name, exported[name])
    again = import_peft([exported[n] for n in ADAPTERS], cfg, rank=lib.rank, scale=lib.scale,
                        sites=lib.sites)
    assert again.scale == lib.scale
    for site, leaf in flatten_sites(experts).items():
        for key in ("lora_a", "lora_b"):
            np.testing.assert_array_equal(flatten_sites(again.experts)[site][key],
                                          np.asarray(leaf[key]), err_msg=f"{site}/{key}")
    # PEFT itself loads an exported adapter (folded scale, rank_pattern) and gives the logits
    # of the original adapter.
    conf = json.loads((exported["patterns"] / "adapter_config.json").read_text())
    assert conf["r"] == 4 and sorted(conf["rank_pattern"].values()) == [2] * 5 + [5]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in ("patterns", "rslora_regex"):
            model = peft.PeftModel.from_pretrained(build_hf_t5(VARIANT), exported[name]).eval()
            np.testing.assert_allclose(_torch_logits(model, world["batch"]),
                                       world["logits"][name], atol=1e-4, rtol=0, err_msg=name)


def test_arrow_routes_imported_experts_without_gates(world, imported):
    cfg, params = world["cfg"], world["params"]
    ids, mask, dec = world["batch"]
    routed = build_routed("arrow", cfg, imported.experts, scale=imported.scale, top_k=2)
    logits = np.asarray(gj.t5_logits(cfg, params, ids, dec, mask, routing=routed))
    assert logits.shape == world["logits"]["qv"].shape and np.isfinite(logits).all()


def test_cli_peft_and_to_peft(world, tmp_path, capsys):
    base, dirs = str(world["root"] / "base"), world["dirs"]
    out = tmp_path / "lib"
    args = ["peft", str(dirs["qv"]), str(dirs["layers_bin"]), "--base", base, "--out", str(out),
            "--names", "first", "second"]
    assert convert_main(args) == 0
    assert "wrote 2 expert(s) without gates" in capsys.readouterr().out
    lib = ExpertLibrary.open(out)
    assert lib.names == ["first", "second"] and lib.rank == 4 and lib.scale == 2.0
    # Appending pads to the library's rank and folds into its scale ...
    assert convert_main(["peft", str(dirs["layers_bin"]), "--base", base, "--out", str(out),
                         "--append", "--names", "again"]) == 0
    lib = ExpertLibrary.open(out)
    assert lib.names == ["first", "second", "again"]
    experts, _ = lib.load(["second", "again"])
    for leaf in flatten_sites(experts).values():
        np.testing.assert_array_equal(leaf["lora_a"][0], leaf["lora_a"][1])
    # ... but refuses an adapter at sites the library does not have.
    assert convert_main(["peft", str(dirs["patterns"]), "--base", base, "--out", str(out),
                         "--append"]) == 1
    assert "sites the library lacks" in capsys.readouterr().err
    assert convert_main(["to-peft", str(out), "second", str(tmp_path / "second")]) == 0
    assert (tmp_path / "second" / "adapter_model.safetensors").is_file()
    assert convert_main(["to-peft", str(out), "second", str(tmp_path / "second")]) == 1
    assert "already holds a PEFT adapter" in capsys.readouterr().err
    # --overwrite replaces it (and a stale pickled copy); a new library leaves no temporary.
    (tmp_path / "second" / "adapter_model.bin").write_bytes(b"stale")
    assert convert_main(["to-peft", str(out), "first", str(tmp_path / "second"),
                         "--overwrite"]) == 0
    assert sorted(p.name for p in (tmp_path / "second").iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors"]
    again = import_peft([tmp_path / "second"], world["cfg"], rank=lib.rank, scale=lib.scale,
                        sites=lib.sites)
    first = flatten_sites(lib.load(["first"])[0])
    for site, leaf in flatten_sites(again.experts).items():
        np.testing.assert_array_equal(leaf["lora_b"], first[site]["lora_b"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lib", "second"]


# --- bad input: one clear error each ------------------------------------------------------------


def _write_adapter(path, config, tensors, torch_pickle=False):
    path.mkdir()
    (path / "adapter_config.json").write_text(json.dumps(config))
    if torch_pickle:
        torch.save(tensors, path / "adapter_model.bin")
    else:
        from safetensors.torch import save_file

        save_file(tensors, str(path / "adapter_model.safetensors"))
    return path


def _lora(module, r, d_in, d_out, prefix="base_model.model."):
    return {f"{prefix}{module}.lora_A.weight": torch.randn(r, d_in),
            f"{prefix}{module}.lora_B.weight": torch.randn(d_out, r)}


def test_adapter_for_another_architecture(world, tmp_path):
    cfg = world["cfg"]
    llama = _write_adapter(tmp_path / "llama", {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 2, "lora_alpha": 4,
        "base_model_name_or_path": "meta-llama/Llama-2-7b-hf",
        "target_modules": ["q_proj", "v_proj"]},
        _lora("model.layers.0.self_attn.q_proj", 2, 24, 24))
    with pytest.raises(AdapterError, match=r"match no module of this T5 .*another "
                                           r"architecture.*Llama-2-7b-hf.*CAUSAL_LM"):
        load_peft_adapter(llama, cfg)
    # Config names that exist in T5, but weights saved from another model class.
    cls = _write_adapter(tmp_path / "seqcls", {
        "peft_type": "LORA", "task_type": "SEQ_CLS", "r": 2, "lora_alpha": 4,
        "target_modules": ["q"]},
        _lora("transformer.encoder.block.0.layer.0.SelfAttention.q", 2, 24, 24))
    with pytest.raises(AdapterError, match=r"'transformer.encoder.block.0.layer.0.SelfAttention"
                                           r".q' is not a linear layer of this T5"):
        load_peft_adapter(cls, cfg)


def test_adapter_for_a_base_with_other_shapes(world):
    other = world["cfg"].replace(d_model=32)
    with pytest.raises(AdapterError, match=r"expected lora_A \(r, 32\).*found \(4, 24\).*other "
                                           r"shapes"):
        load_peft_adapter(world["dirs"]["qv"], other)


def test_adapter_type_other_than_lora(world, tmp_path):
    ia3 = _write_adapter(tmp_path / "ia3", {
        "peft_type": "IA3", "task_type": "SEQ_2_SEQ_LM", "target_modules": ["k", "v", "wo"],
        "feedforward_modules": ["wo"]},
        {"base_model.model.encoder.block.0.layer.0.SelfAttention.k.ia3_l": torch.ones(24, 1)})
    with pytest.raises(AdapterError, match=r"peft_type: expected 'LORA', found 'IA3'"):
        load_peft_adapter(ia3, world["cfg"])
    dora = _write_adapter(tmp_path / "dora", {
        "peft_type": "LORA", "r": 2, "lora_alpha": 2, "target_modules": ["q"], "use_dora": True},
        _lora("encoder.block.0.layer.0.SelfAttention.q", 2, 24, 24))
    with pytest.raises(AdapterError, match="DoRA"):
        load_peft_adapter(dora, world["cfg"])
    # The command line prints the same error on one line and exits 1.
    assert convert_main(["peft", str(ia3), "--base", str(world["root"] / "base"),
                         "--out", str(tmp_path / "lib")]) == 1


def test_pickle_that_is_not_weights_only(world, tmp_path):
    tensors = _lora("encoder.block.0.layer.0.SelfAttention.q", 4, 24, 24)
    tensors["extra"] = NotATensor()
    config = json.loads((world["dirs"]["qv"] / "adapter_config.json").read_text())
    bad = _write_adapter(tmp_path / "bad", config, tensors, torch_pickle=True)
    with pytest.raises(UnsafeCheckpointError, match=r"refused: this pickle is not weights-only"
                                                    r".*NotATensor"):
        load_peft_adapter(bad, world["cfg"])


def test_config_and_weights_disagree(world, tmp_path):
    config = json.loads((world["dirs"]["qv"] / "adapter_config.json").read_text())
    config.update(r=3, target_modules=["encoder.block.0.layer.0.SelfAttention.q"])
    bad = _write_adapter(tmp_path / "rank", config,
                         _lora("encoder.block.0.layer.0.SelfAttention.q", 4, 24, 24))
    with pytest.raises(GooseError, match="config and weights disagree"):
        load_peft_adapter(bad, world["cfg"])
