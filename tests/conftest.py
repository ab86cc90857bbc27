"""Shared fixtures: tiny random Hugging Face T5 checkpoints built locally (no network)."""

import os

import numpy as np
import pytest

os.environ.setdefault("GOOSE_QUIET", "1")
# Implicit rank promotion ((N, D) + (D,)) hides shape bugs: the suite, and the subprocesses it
# starts, raise on it instead. Code broadcasts explicitly ([None], reshape).
os.environ.setdefault("JAX_NUMPY_RANK_PROMOTION", "raise")

import jax  # noqa: E402  (after the environment it reads)

jax.config.update("jax_numpy_rank_promotion", "raise")

# Tests that shard over a mesh of 8 devices; `make test` provides 8 fake CPU devices. The device
# count is read when such a test is set up, not at import: the multi-process tests' worker imports
# this file before it joins its process group, which must come before JAX's first device call.
needs_8_devices = pytest.mark.needs_8_devices


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_programs():
    """Drops JAX's compiled programs after each test file. The whole suite compiles thousands of
    programs in one process, and every XLA:CPU executable keeps memory mappings of its own: kept
    all together they reach the kernel's per-process limit (``vm.max_map_count``, 65530 by
    default), after which the next compilation crashes."""
    yield
    import gc

    jax.clear_caches()
    gc.collect()


def pytest_configure(config):
    config.addinivalue_line("markers", "needs_8_devices: skipped on fewer than 8 devices")


def pytest_runtest_setup(item):
    if item.get_closest_marker("needs_8_devices") and jax.device_count() < 8:
        pytest.skip("needs 8 devices: run with XLA_FLAGS=--xla_force_host_platform_device_count=8"
                    ", as `make test` does")


TINY = dict(vocab_size=101, d_model=24, d_kv=8, num_heads=3, d_ff=40, num_layers=2,
            num_decoder_layers=3, relative_attention_num_buckets=8,
            relative_attention_max_distance=20, decoder_start_token_id=0)

# name -> (feed_forward_proj, tie_word_embeddings as HF reads it, untie the head after building)
VARIANTS = {
    "v1_0": ("relu", True, False),             # ReLU FFN, tied head, d_model**-0.5 scaling
    "v1_1": ("gated-gelu", False, True),        # gated-GELU, separate lm_head, no scaling
    "v1_1_tied": ("gated-gelu", False, False),  # how transformers 5 builds a fresh v1.1
}


def build_hf_t5(variant: str, seed: int = 0, **overrides):
    """A random ``T5ForConditionalGeneration`` for one of ``VARIANTS``, in eval mode."""
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    ffp, tie, untie = VARIANTS[variant]
    torch.manual_seed(seed)
    model = T5ForConditionalGeneration(
        T5Config(**{**TINY, **overrides}, feed_forward_proj=ffp, tie_word_embeddings=tie)).eval()
    if untie:
        model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.lm_head.weight))
    return model


@pytest.fixture(params=sorted(VARIANTS))
def hf_variant(request):
    return request.param


@pytest.fixture
def hf_t5_dir(tmp_path, hf_variant):
    """(HF model, directory it was saved to) for each variant."""
    model = build_hf_t5(hf_variant)
    path = tmp_path / f"hf_{hf_variant}"
    model.save_pretrained(path)
    return model, path


def tool(name: str):
    """The console script ``name`` (goose-train, goose-eval, goose-convert, goose-demo) as the
    package installs it: its entry point's ``main(argv) -> exit code``, called in-process."""
    from importlib.metadata import entry_points

    (ep,) = entry_points(group="console_scripts", name=name)
    return ep.load()


def tree_hash(*paths) -> dict:
    """path -> sha256 of every file under ``paths`` (a file path: that file; a missing path:
    nothing; a symlink: its target's name), to show that a refused command changed nothing."""
    import hashlib

    out = {}
    for root in map(str, paths):
        files = [root] if os.path.isfile(root) else [
            os.path.join(d, f) for d, _, names in os.walk(root) for f in names]
        for p in files:
            out[p] = (os.readlink(p) if os.path.islink(p) else
                      hashlib.sha256(open(p, "rb").read()).hexdigest())
    return out


def one_line(err: str, prog: str) -> str:
    """The single line a tool printed on stderr (asserting there is one, without a traceback,
    starting with the tool's name or its subcommand's)."""
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert "Traceback" not in err
    assert lines[0].startswith((f"{prog}: ", f"{prog} ")), lines[0]
    return lines[0]


def write_jsonl(path, rows) -> str:
    """Training data: one ``{"input": ..., "target": ...}`` line per (input, target) pair."""
    import json

    path.write_text("".join(json.dumps({"input": i, "target": t}) + "\n" for i, t in rows))
    return str(path)


def script(path: str):
    """A top-level script (``train/...``, ``eval/...``) as its ``main(argv) -> exit code``."""
    import runpy

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return runpy.run_path(os.path.join(root, path), run_name="goose_script")["main"]


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    """goose-eval's tiny world, built once for the session and only read by the tests: a random
    T5 in HF format (``base``), a 3-expert gated library (``lib``) and BBH files (``bbh``)."""
    from datasets import Dataset, DatasetDict

    import goose_jax as gj
    from goose_jax.core.trees import nest_sites
    from goose_jax.experts.lora import LoRAConfig
    from goose_jax.library.store import ExpertLibrary

    root = tmp_path_factory.mktemp("world")
    cfg = gj.T5Config(vocab_size=300, d_model=24, d_kv=8, num_heads=3, d_ff=40,
                      num_encoder_layers=1, num_decoder_layers=1,
                      relative_attention_num_buckets=8, relative_attention_max_distance=20,
                      feed_forward_proj="gated-gelu", tie_word_embeddings=False)
    params = gj.init_params(cfg, 5)
    gj.save_hf_t5(cfg, params, root / "base")
    # Experts at three sites only (compiles stay short); one per layer for the heatmaps.
    sites = r"encoder/block_0/self_attn/q|decoder/block_0/(cross_attn/k|ffn/wo)"
    lib = ExpertLibrary.create(root / "lib", cfg, params, LoRAConfig(rank=2, sites=sites))
    rng = np.random.default_rng(0)
    for name in ("alpha", "beta", "gamma"):
        experts, gates = {}, {}
        for site, (d_in, d_out) in lib.sites.items():
            experts[site] = {"lora_a": rng.standard_normal((d_in, 2), np.float32),
                             "lora_b": rng.standard_normal((2, d_out), np.float32)}
            gates[site] = {"gate": rng.standard_normal((d_in,), np.float32)}
        lib.add(name, nest_sites(experts), nest_sites(gates))
    bbh = root / "bbh"
    DatasetDict({"test": Dataset.from_list(
        [{"input": f"{a} and {b}", "target": str(a and b)}
         for a in (True, False) for b in (True, False)])}).save_to_disk(
        str(bbh / "boolean_expressions"))
    DatasetDict({"train": Dataset.from_list(
        [{"idx": i, "inputs": f"count {i}", "targets": [str(i)], "multiple_choice_targets": [],
          "multiple_choice_scores": []} for i in range(3)])}).save_to_disk(
        str(bbh / "object_counting"))
    return root


def random_batch(rng: np.random.Generator, batch: int, enc_len: int, dec_len: int, vocab: int):
    """Encoder ids with ragged padding, its mask, and decoder ids starting with 0."""
    ids = rng.integers(2, vocab, (batch, enc_len))
    mask = np.ones_like(ids)
    for b in range(1, batch):
        keep = max(1, enc_len - 7 * b)
        mask[b, keep:] = 0
        ids[b, keep:] = 0
    dec = rng.integers(2, vocab, (batch, dec_len))
    dec[:, 0] = 0
    return ids, mask, dec
