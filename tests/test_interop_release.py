"""The original release's checkpoints: import, and routing against a NumPy copy of its formula."""

import numpy as np
import pytest
from conftest import build_hf_t5, tool

torch = pytest.importorskip("torch")

import goose_jax as gj  # noqa: E402
from goose_jax.core.errors import AdapterError, UnsafeCheckpointError  # noqa: E402
from goose_jax.core.trees import flatten_sites  # noqa: E402
from goose_jax.interop.release import (  # noqa: E402
    RELEASE_EXPERT_SETS,
    import_release,
    release_names,
)
from goose_jax.library.store import ExpertLibrary  # noqa: E402
from goose_jax.routing.formula import combine_lora, phatgoose_route  # noqa: E402

E, R = 5, 4
NAMES = ["alpha", "beta", "gamma", "delta", "epsilon"]
ADAPTED = ("q", "k", "v", "o", "wi_0", "wi_1", "wo")

convert_main = tool("goose-convert")


def _release_state(model, num_experts=E, rank=R, seed=0, gates=True):
    """A state dict in the release's key layout for every adapted linear layer of ``model``."""
    gen = torch.Generator().manual_seed(seed)
    state = {"encoder.embed_tokens.weight": model.shared.weight.detach().clone(),
             "decoder.embed_tokens.weight": model.shared.weight.detach().clone()}
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or name.split(".")[-1] not in ADAPTED:
            continue
        d_out, d_in = module.weight.shape
        for i in range(num_experts):
            prefix = f"{name}._addons."
            state[f"{prefix}expert_lora.layer1__{i}"] = (
                0.3 * torch.randn(d_in, rank, generator=gen)).to(torch.bfloat16)
            state[f"{prefix}expert_lora.layer2__{i}"] = (
                0.3 * torch.randn(rank, d_out, generator=gen)).to(torch.bfloat16)
            if gates:
                # Gate vectors of small variance, where the 1e-5 of the layer norm matters.
                state[f"{prefix}router.expert_embeddings__{i}"] = (
                    0.004 * torch.randn(d_in, generator=gen) + 0.002 * i)
    return state


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("release")
    model = build_hf_t5("v1_1")
    model.save_pretrained(root / "base")
    cfg, params = gj.load_hf_t5(root / "base")
    state = _release_state(model)
    torch.save(state, root / "best.pt")
    return dict(root=root, cfg=cfg, params=params, state=state, ckpt=root / "best.pt")


def _module_of(cfg):
    from goose_jax.models.t5.hf import tensor_specs

    return {"/".join(s.path[:-1]): s.hf_key.removesuffix(".weight") for s in tensor_specs(cfg)
            if s.transpose and s.path[0] != "lm_head"}


def test_import_keeps_layout_names_and_scale(world):
    imported = import_release(world["ckpt"], world["cfg"], names=NAMES)
    assert imported.names == NAMES and imported.rank == R and imported.scale == 1 / R
    assert imported.gates is not None
    assert any("ignored 2 tensor(s)" in note for note in imported.notes)
    modules = _module_of(world["cfg"])
    assert list(imported.sites) == list(modules)  # every linear layer, in model order
    experts, gates = flatten_sites(imported.experts), flatten_sites(imported.gates)
    state = world["state"]
    for site, module in modules.items():
        for i in range(E):
            key = f"{module}._addons.expert_lora.layer"
            np.testing.assert_array_equal(experts[site]["lora_a"][i],
                                          state[f"{key}1__{i}"].float().numpy())
            np.testing.assert_array_equal(experts[site]["lora_b"][i],
                                          state[f"{key}2__{i}"].float().numpy())
            np.testing.assert_array_equal(
                gates[site]["gate"][i],
                state[f"{module}._addons.router.expert_embeddings__{i}"].numpy())


def _release_formula(x, layer1, layer2, embeddings, top_k=2):
    """The release's routed LoRA at one site, written out in float64 NumPy.

    x (T, d); layer1 (N, d, r); layer2 (N, r, o); embeddings (N, d).
    """
    def ln(v):
        mu = v.mean(-1, keepdims=True)
        var = ((v - mu) ** 2).mean(-1, keepdims=True)
        return (v - mu) / np.sqrt(var + 1e-5)

    d, r = x.shape[-1], layer1.shape[-1]
    scores = ln(x) @ ln(embeddings).T / np.sqrt(d)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    index = np.argsort(-p, axis=-1)[:, :top_k]
    w = np.take_along_axis(p, index, -1)
    w = w / (w.sum(-1, keepdims=True) + 1e-6)
    out = np.zeros((x.shape[0], layer2.shape[-1]))
    for t in range(x.shape[0]):
        for j in range(top_k):
            n = index[t, j]
            out[t] += w[t, j] * (x[t] @ layer1[n] @ layer2[n]) / r
    return w, index, out


def test_cli_library_routes_like_the_release(world, tmp_path, capsys):
    out = tmp_path / "lib"
    assert convert_main(["phatgoose-release", str(world["ckpt"]), "--base",
                         str(world["root"] / "base"), "--out", str(out), "--names", *NAMES]) == 0
    assert "wrote 5 expert(s) with gates" in capsys.readouterr().out
    lib = ExpertLibrary.open(out)
    assert lib.names == NAMES and lib.scale == 1 / R and lib.info("gamma")["data"] == "gamma"
    experts, gates = lib.load()
    experts, gates = flatten_sites(experts), flatten_sites(gates)
    modules, state = _module_of(world["cfg"]), world["state"]
    rng = np.random.default_rng(1)
    for site in ("encoder/block_0/self_attn/q", "encoder/block_1/ffn/wo",
                 "decoder/block_2/cross_attn/k", "decoder/block_1/ffn/wi_1"):
        module = modules[site]

        def raw(kind, i, module=module):
            return state[f"{module}._addons.{kind}__{i}"].double().numpy()

        layer1 = np.stack([raw("expert_lora.layer1", i) for i in range(E)])
        layer2 = np.stack([raw("expert_lora.layer2", i) for i in range(E)])
        embeddings = np.stack([raw("router.expert_embeddings", i) for i in range(E)])
        x = rng.normal(size=(13, layer1.shape[1]))
        w_ref, idx_ref, out_ref = _release_formula(x, layer1, layer2, embeddings)

        x32 = np.asarray(x, np.float32)
        weights, index = phatgoose_route(x32, gates[site]["gate"], 2)
        got = combine_lora(x32, experts[site]["lora_a"], experts[site]["lora_b"], weights, index,
                           lib.scale)
        np.testing.assert_array_equal(np.asarray(index), idx_ref, err_msg=site)
        # Ours renormalises exactly (softmax over the kept scores); the release divides by
        # sum + 1e-6, a relative difference of about 1e-6.
        np.testing.assert_allclose(np.asarray(weights), w_ref, rtol=1e-5, atol=1e-6,
                                   err_msg=site)
        np.testing.assert_allclose(np.asarray(got), out_ref, rtol=1e-4, atol=1e-5, err_msg=site)
        assert np.abs(out_ref).max() > 0.1
    # Any expert goes back out as a PEFT adapter with the release's 1/r scale.
    assert convert_main(["to-peft", str(out), "beta", str(tmp_path / "beta")]) == 0
    assert (tmp_path / "beta" / "adapter_config.json").is_file()


def test_safetensors_checkpoint_reads_like_the_pickle(world, tmp_path):
    from safetensors.torch import save_file

    save_file(world["state"], str(tmp_path / "best.safetensors"))
    a = import_release(world["ckpt"], world["cfg"])
    b = import_release(tmp_path / "best.safetensors", world["cfg"])
    assert a.names == b.names == [f"expert_{i:03d}" for i in range(E)]
    for tree in ("experts", "gates"):
        fa, fb = flatten_sites(getattr(a, tree)), flatten_sites(getattr(b, tree))
        for site in fa:
            for key in fa[site]:
                np.testing.assert_array_equal(fa[site][key], fb[site][key])


def test_release_expert_order():
    p3, full = RELEASE_EXPERT_SETS["P3"], RELEASE_EXPERT_SETS["Full"]
    assert release_names(None, 36) == list(p3) and len(set(p3)) == 36
    assert release_names(None, 166) == list(full) and len(set(full)) == 166
    assert (full[0], full[35], full[36], full[72], full[146], full[147], full[165]) == (
        "P3Agnews", "P3Dbpedia14", "Flanv2zsAi2arceasy", "Niv2zsTranslation", "Niv2zsMisc",
        "P3Wscfixed", "Flanv2zsWmt14translatefren")
    assert release_names(None, 147) == list(full[:147])
    assert release_names("Flanv2", 36) == list(full[36:72])
    assert release_names(None, 3) == ["expert_000", "expert_001", "expert_002"]
    with pytest.raises(AdapterError, match="36 expert names for a checkpoint with 5 experts"):
        release_names("P3", 5)


def test_single_expert_input_gate_becomes_the_gate(world, tmp_path):
    state = {k.replace("router.expert_embeddings__0", "expert_lora.expert_input_gate"): v
             for k, v in _release_state(build_hf_t5("v1_1"), num_experts=1).items()}
    torch.save(state, tmp_path / "one.pt")
    imported = import_release(tmp_path / "one.pt", world["cfg"], names=["solo"])
    gate = flatten_sites(imported.gates)["decoder/block_0/cross_attn/v"]["gate"]
    key = "decoder.block.0.layer.1.EncDecAttention.v._addons.expert_lora.expert_input_gate"
    np.testing.assert_array_equal(gate[0], state[key].numpy())


# --- bad input ----------------------------------------------------------------------------------


def test_missing_expert(world, tmp_path):
    state = dict(world["state"])
    del state["decoder.block.1.layer.2.DenseReluDense.wo._addons.expert_lora.layer2__3"]
    torch.save(state, tmp_path / "ckpt.pt")
    with pytest.raises(AdapterError, match=r"DenseReluDense.wo' lacks layer2 of expert\(s\) "
                                           r"\[3\] \(the checkpoint has 5 experts\)"):
        import_release(tmp_path / "ckpt.pt", world["cfg"])


def test_base_with_other_shapes(world):
    with pytest.raises(AdapterError, match=r"expected \(32, r\).*found \(24, 4\).*other shapes"):
        import_release(world["ckpt"], world["cfg"].replace(d_model=32))
    with pytest.raises(AdapterError, match="not linear layers of this T5"):
        import_release(world["ckpt"], world["cfg"].replace(num_decoder_layers=2))


def test_unknown_addons_and_unsafe_pickle(world, tmp_path):
    state = dict(world["state"])
    state["encoder.block.0.layer.0.SelfAttention.q._addons.router.router_layer_norm.weight"] = (
        torch.ones(24))
    torch.save(state, tmp_path / "odd.pt")
    with pytest.raises(AdapterError, match="tensors of unknown kind.*router_layer_norm"):
        import_release(tmp_path / "odd.pt", world["cfg"])
    torch.save({"encoder.embed_tokens.weight": torch.ones(2, 2)}, tmp_path / "plain.pt")
    with pytest.raises(AdapterError, match="not a PHATGOOSE release checkpoint"):
        import_release(tmp_path / "plain.pt", world["cfg"])
    torch.save({"x": torch.ones(2), "config": {"lr": 1e-3}, "hook": np.float32}, tmp_path / "p.pt")
    with pytest.raises(UnsafeCheckpointError, match="refused: this pickle is not weights-only"):
        import_release(tmp_path / "p.pt", world["cfg"])
