"""The family seam: decoder-only sites through the T5-built machinery, and libraries that record
their base model's family and refuse another."""

import json
import os

import jax
import numpy as np
import pytest

import goose_jax as gj
from goose_jax.core.errors import ConfigError, LibraryError
from goose_jax.experts.lora import LoRAConfig, select_sites
from goose_jax.library.store import ExpertLibrary
from goose_jax.models import families
from goose_jax.models.llama import model as decoder

DEC = gj.DecoderConfig.preset("tiny")
T5 = gj.T5Config.preset("tiny")


def test_default_sites_cover_each_family():
    lora = LoRAConfig(rank=2)
    assert list(select_sites(DEC, lora)) == list(decoder.site_shapes(DEC))
    assert list(select_sites(T5, lora)) == list(gj.site_shapes(T5))
    picked = select_sites(DEC, LoRAConfig(rank=2, sites=r"layers_1/mlp/down"))
    assert picked == {"layers_1/mlp/down": (DEC.d_ff, DEC.d_model)}


def test_config_record_round_trip():
    for cfg in (T5, DEC, gj.DecoderConfig.preset("qwen2-0.5b")):
        name = families.family(cfg)
        back = families.config_from_record(families.config_record(cfg), name, source="x")
        assert families.config_record(back) == families.config_record(cfg)
    with pytest.raises(ConfigError, match="not a T5 config"):
        families.config_from_record(families.config_record(DEC), "t5", source="x")
    with pytest.raises(ConfigError, match="recorded as 'llama'"):
        families.config_from_record(families.config_record(DEC.replace(family="mistral")),
                                    "llama", source="x")
    with pytest.raises(ConfigError, match="unknown model family"):
        families.config_from_record(families.config_record(DEC), "gpt", source="x")


def test_library_records_family_and_refuses_another(tmp_path):
    params = jax.tree.map(np.asarray, decoder.init_params(DEC, 0))
    lib = ExpertLibrary.create(tmp_path / "lib", DEC, params, LoRAConfig(rank=2))
    manifest = json.load(open(os.path.join(lib.path, "manifest.json")))
    assert manifest["base_model"]["family"] == "llama"
    assert manifest["lora"]["sites_pattern"] == families.named("llama").sites_pattern
    assert "decoder_config" in manifest["base_model"]
    reopened = ExpertLibrary.open(tmp_path / "lib", DEC, params)
    assert reopened.family == "llama"
    assert families.config_record(reopened.base_config) == families.config_record(DEC)
    with pytest.raises(LibraryError, match=r"decoder-only \(llama\) base model, the given "
                                           r"model is T5"):
        ExpertLibrary.open(tmp_path / "lib", T5)
    mistral = DEC.replace(family="mistral")
    with pytest.raises(LibraryError, match=r"given model is decoder-only \(mistral\)"):
        ExpertLibrary.open(tmp_path / "lib", mistral)


def test_t5_library_without_family_field_still_opens(tmp_path):
    params = jax.tree.map(np.asarray, gj.init_params(T5, 0))
    lib = ExpertLibrary.create(tmp_path / "lib", T5, params, LoRAConfig(rank=2))
    path = os.path.join(lib.path, "manifest.json")
    manifest = json.load(open(path))
    assert manifest["base_model"].pop("family") == "t5"
    with open(path, "w") as f:
        json.dump(manifest, f)
    assert ExpertLibrary.open(tmp_path / "lib", T5, params).family == "t5"
    with pytest.raises(LibraryError, match="given model is decoder-only"):
        ExpertLibrary.open(tmp_path / "lib", DEC)


def test_load_base_reads_decoder_bases(tmp_path):
    from goose_jax.core.errors import CheckpointError
    from goose_jax.models.base import load_base

    cfg, params = load_base("random:llama-tiny", seed=3)
    assert cfg == gj.DecoderConfig.preset("tiny")
    gj.save_hf_llama(cfg, params, tmp_path / "hf")
    cfg2, params2 = load_base(str(tmp_path / "hf"))
    assert families.family(cfg2) == "llama"
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params),
                                                    jax.tree.leaves(params2), strict=True))
    assert families.family(load_base("random:tiny")[0]) == "t5"
    with pytest.raises(CheckpointError, match="nor is it a decoder-only preset"):
        load_base("random:gpt-9")


@pytest.mark.parametrize("name", ["tiny", "llama-3-8b", "llama-3.1-8b", "qwen2-0.5b",
                                  "mistral-7b"])
def test_decoder_config_survives_hf_round_trip(name):
    cfg = gj.DecoderConfig.preset(name)
    assert gj.DecoderConfig.from_hf_dict(cfg.to_hf_dict()) == cfg


def test_decoder_config_without_pad_pads_with_eos():
    d = gj.DecoderConfig.preset("tiny").to_hf_dict()
    d["pad_token_id"] = None
    d["eos_token_id"] = [7, 9]
    assert gj.DecoderConfig.from_hf_dict(d).pad_token_id == 7
    d["eos_token_id"] = None
    assert gj.DecoderConfig.from_hf_dict(d).pad_token_id == 0
