"""PEFT LoRA adapters of decoder-only models in and out, checked against the peft package itself
on the tiny random model of every registered decoder family (tests/family_cases.py)."""

import copy
import json
import shutil
import warnings

import jax
import numpy as np
import pytest
from conftest import build_hf_t5, one_line, tool, tree_hash
from family_cases import DECODERS, family_of, hf_model, logits_of
from test_decoder import _batch, _hf_logits

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

from goose_jax.core.trees import flatten_sites  # noqa: E402
from goose_jax.experts.lora import EXPERTS, LoRAAdapter  # noqa: E402
from goose_jax.interop.peft import export_peft, import_peft, load_peft_adapter  # noqa: E402
from goose_jax.library.stacking import write_library  # noqa: E402
from goose_jax.library.store import ExpertLibrary  # noqa: E402

SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# name -> (LoraConfig keywords, save as safetensors). Every adapter covers all seven modules.
ADAPTERS = {
    "plain": (dict(r=4, lora_alpha=8, target_modules=SEVEN), True),
    "patterns": (dict(r=4, lora_alpha=6, target_modules=SEVEN,
                      rank_pattern={"down_proj": 2, "model.layers.1.self_attn.k_proj": 6},
                      alpha_pattern={"gate_proj": 3, "o_proj": 10}), False),
    "rslora": (dict(r=3, lora_alpha=5, use_rslora=True, target_modules="all-linear",
                    rank_pattern={"up_proj": 5}), True),
}
REL = 1e-4
convert_main = tool("goose-convert")


def _peft_model(base, folder, seed, **kwargs):
    """``base`` (copied) under a fresh LoRA, with random non-zero B (PEFT starts B at zero)."""
    model = copy.deepcopy(base)
    model.name_or_path = str(folder)  # PEFT records it as base_model_name_or_path
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(model, peft.LoraConfig(task_type="CAUSAL_LM", **kwargs))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    return model.eval()


def _close(got, want, real, what):
    """Within REL of the largest |logit| of ``want``, at the real tokens."""
    err = np.abs(np.asarray(got) - want)[real].max()
    assert err <= REL * np.abs(want[real]).max(), f"{what}: {err}"


@pytest.fixture(scope="module", params=DECODERS)
def world(request, tmp_path_factory):
    """One family: the HF base (in memory and saved), our params, three adapters on disk with
    their PEFT logits."""
    family = request.param
    root = tmp_path_factory.mktemp(f"peft_{family}")
    base = hf_model(family)
    base.save_pretrained(root / "base")
    cfg, params = family_of(family).load_hf(str(root / "base"))
    ids, mask = _batch()
    dirs, logits, covered = {}, {}, {}
    for seed, (name, (kwargs, safe)) in enumerate(ADAPTERS.items()):
        model = _peft_model(base, root / "base", seed, **kwargs)
        dirs[name] = root / name
        model.save_pretrained(dirs[name], safe_serialization=safe)
        logits[name] = _hf_logits(model, ids, mask)
        covered[name] = sum(n.endswith("lora_A.default") for n, _ in model.named_modules())
    return dict(family=family, root=root, base=base, cfg=cfg, params=params, ids=ids, mask=mask,
                real=mask.astype(bool), dirs=dirs, logits=logits, covered=covered,
                base_logits=_hf_logits(base, ids, mask))


@pytest.fixture(scope="module")
def imported(world):
    return import_peft([world["dirs"][n] for n in ADAPTERS], world["cfg"])


def _one_expert(experts, n):
    return jax.tree.map(lambda x: x[n:n + 1], experts)


def test_import_gives_peft_logits(world, imported):
    cfg, params, ids, mask, real = (world[k] for k in ("cfg", "params", "ids", "mask", "real"))
    assert imported.rank == 6  # the rank_pattern maximum
    assert imported.scale == 2.0  # alpha / r of "plain", the scale most (adapter, site) pairs have
    assert len(imported.sites) == 7 * cfg.num_layers
    for n, name in enumerate(ADAPTERS):
        assert world["covered"][name] == len(imported.info[n]["covered_sites"]) == 14
        got = logits_of(world["family"])(
            cfg, params, ids, mask, adapter=LoRAAdapter(imported.scale),
            collections={EXPERTS: _one_expert(imported.experts, n)})
        _close(got, world["logits"][name], real, name)
        # The adapter really moves the logits, so the comparison above can fail.
        assert np.abs(world["logits"][name] - world["base_logits"])[real].max() > 1e-2


def test_export_loads_in_peft_and_reimports_exactly(world, imported, tmp_path):
    cfg, params = world["cfg"], world["params"]
    lib = write_library(imported, tmp_path / "lib", cfg, params)
    assert lib.family == world["family"] and lib.names == list(ADAPTERS)
    out = {}
    for name in ADAPTERS:
        out[name] = tmp_path / name
        export_peft(lib, name, out[name])
    conf = json.loads((out["patterns"] / "adapter_config.json").read_text())
    assert conf["task_type"] == "CAUSAL_LM" and conf["r"] == 4
    assert conf["base_model_name_or_path"] is None or "base" in conf["base_model_name_or_path"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in ADAPTERS:
            model = peft.PeftModel.from_pretrained(copy.deepcopy(world["base"]), out[name])
            got = _hf_logits(model.eval(), world["ids"], world["mask"])
            _close(got, world["logits"][name], world["real"], name)
    again = import_peft([out[n] for n in ADAPTERS], cfg, rank=lib.rank, scale=lib.scale,
                        sites=lib.sites)
    mine = flatten_sites(lib.load()[0])
    for site, leaf in flatten_sites(again.experts).items():
        for key in ("lora_a", "lora_b"):
            np.testing.assert_array_equal(leaf[key], np.asarray(mine[site][key]), err_msg=site)


def test_fan_in_fan_out_is_what_peft_loads(world, tmp_path):
    """PEFT resets fan_in_fan_out on nn.Linear (with a warning) when it loads an adapter, so
    such an adapter is plain LoRA: ours equals the plain one, and PEFT gives the same logits."""
    src, twin = world["dirs"]["plain"], tmp_path / "fifo"
    shutil.copytree(src, twin)
    conf = json.loads((twin / "adapter_config.json").read_text())
    (twin / "adapter_config.json").write_text(json.dumps({**conf, "fan_in_fan_out": True}))
    a, b = load_peft_adapter(src, world["cfg"]), load_peft_adapter(twin, world["cfg"])
    for site in a.sites:
        np.testing.assert_array_equal(a.sites[site].lora_a, b.sites[site].lora_a)
        assert a.sites[site].scale == b.sites[site].scale
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.PeftModel.from_pretrained(copy.deepcopy(world["base"]), twin).eval()
    np.testing.assert_allclose(_hf_logits(model, world["ids"], world["mask"]),
                               world["logits"]["plain"], atol=1e-6, rtol=0)


def test_cli_peft_and_to_peft(world, tmp_path, capsys):
    base, dirs, lib = str(world["root"] / "base"), world["dirs"], tmp_path / "lib"
    assert convert_main(["peft", str(dirs["plain"]), str(dirs["rslora"]), "--base", base,
                         "--out", str(lib), "--names", "one", "two"]) == 0
    assert "wrote 2 expert(s) without gates" in capsys.readouterr().out
    opened = ExpertLibrary.open(lib)
    assert opened.family == world["family"] and opened.rank == 5 and opened.scale == 2.0
    assert convert_main(["to-peft", str(lib), "two", str(tmp_path / "two")]) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.PeftModel.from_pretrained(copy.deepcopy(world["base"]), tmp_path / "two")
    _close(_hf_logits(model.eval(), world["ids"], world["mask"]), world["logits"]["rslora"],
           world["real"], "rslora via the command line")


# --- what a LoRA expert cannot hold: one line each, nothing written -----------------------------


def _hostile(world, tmp_path):
    """name -> (adapter dir, base dir, the message's telling part) for this family."""
    root, base, fam = world["root"], world["base"], world["family"]
    cases = {}

    def made(name, seed=0, **kwargs):
        model = _peft_model(base, root / "base", seed, **kwargs)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.save_pretrained(tmp_path / name)
        return tmp_path / name

    def edited(name, **changes):
        shutil.copytree(world["dirs"]["plain"], tmp_path / name)
        file = tmp_path / name / "adapter_config.json"
        file.write_text(json.dumps({**json.loads(file.read_text()), **changes}))
        return tmp_path / name

    base_dir = str(root / "base")
    cases["dora"] = (made("dora", r=2, target_modules=SEVEN, use_dora=True), base_dir, "DoRA")
    cases["modules_to_save"] = (made("mts", r=2, target_modules=["q_proj"],
                                     modules_to_save=["lm_head"]), base_dir, "modules_to_save")
    cases["t5_names"] = (edited("t5names", target_modules=["q", "v"]), base_dir,
                         f"match no module of this {family_of(fam).label(fam)}")
    cases["embeddings"] = (made("emb", r=2, target_modules=["embed_tokens", "q_proj"]),
                           base_dir, "not attention or feed-forward linear layers")
    t5 = tmp_path / "t5_base"
    build_hf_t5("v1_1").save_pretrained(t5)
    cases["t5_base"] = (world["dirs"]["plain"], str(t5), "base given is T5")
    if any(n.endswith(".bias") for n, _ in base.named_parameters()):  # for bias="all" to train
        cases["bias_all"] = (made("bias", r=2, target_modules=SEVEN, bias="all"), base_dir,
                             "bias='all' trained base-model biases")
    else:  # a decoder of another family (same module names)
        other = next(n for n in DECODERS if n != fam)
        hf_model(other).save_pretrained(tmp_path / other)
        cases["other_family"] = (world["dirs"]["plain"], str(tmp_path / other),
                                 f"made on a '{world['family']}' base")
    return cases


def test_hostile_adapters_one_line_nothing_written(world, tmp_path, capsys):
    cases = _hostile(world, tmp_path / "in")
    before = tree_hash(tmp_path)
    for name, (adapter, base, telling) in cases.items():
        out = tmp_path / f"lib_{name}"
        capsys.readouterr()
        assert convert_main(["peft", str(adapter), "--base", base, "--out", str(out)]) == 1, name
        line = one_line(capsys.readouterr().err, "goose-convert")
        assert telling in line, f"{name}: {line}"
        assert not out.exists(), name
    assert tree_hash(tmp_path) == before
