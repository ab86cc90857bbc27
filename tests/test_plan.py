"""goose_jax.pipeline.plan and goose-plan: topologies, the roofline, the depth extrapolation of
the compiler's cost analysis, the refusals, and (with libtpu) one small TPU-target compile."""

import importlib.util
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from goose_jax.cli import plan as cli
from goose_jax.core.errors import UsageError
from goose_jax.models.t5.config import T5Config
from goose_jax.pipeline import plan as P
from goose_jax.training.program import TrainConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None


def test_accelerator_names_map_to_the_chips_and_tori_cloud_tpu_documents():
    # Cloud TPU's accelerator types: v4 and v5p count TensorCores (two a chip), v5e and v6e chips.
    expected = {"v4-32": (16, (2, 2, 4)), "v4-8": (4, (1, 2, 2)), "v5p-8": (4, (1, 2, 2)),
                "v5p-128": (64, (4, 4, 4)), "v5e-16": (16, (4, 4)), "v5e-64": (64, (8, 8)),
                "v5e-8": (8, (2, 4)), "v6e-256": (256, (16, 16))}
    for name, (chips, shape) in expected.items():
        topo = P.parse_topology(name)
        assert (topo.chips, tuple(sorted(topo.shape))) == (chips, shape), name
        assert topo.name == name
    assert P.parse_topology("v5e:4x4").chips == 16
    assert P.parse_topology("v4-32").topology_name == "v4:2x2x4"
    for bad in ("v5e-12", "v4-3", "v9-8", "tpu"):
        with pytest.raises(UsageError):
            P.parse_topology(bad)


def test_roofline_is_the_slower_of_compute_and_memory_at_the_published_peaks():
    v5e = P.CHIPS["v5e"]
    # 197 TFLOP/s and 819 GB/s: 1.97e12 FLOPs take 10 ms; 8.19e9 bytes take 10 ms.
    assert P.roofline(1.97e12, 1e6, v5e) == pytest.approx(0.010)
    assert P.roofline(1e6, 8.19e9, v5e) == pytest.approx(0.010)
    assert P.roofline(3.94e12, 8.19e9, v5e) == pytest.approx(0.020)


def test_cost_extrapolated_from_one_and_two_blocks_equals_the_compiled_deeper_program():
    # XLA counts a loop body once; plan.cost compiles 1 and 2 unrolled blocks and extrapolates.
    # Reference: the 3-block unrolled program's own cost analysis.
    cfg = T5Config.preset("tiny").replace(num_encoder_layers=3, num_decoder_layers=3)
    tcfg = TrainConfig(micro_batch=2, grad_accum=1, max_input_length=16, max_target_length=4)
    run = P.Run(cfg, tcfg, 4, 4, "data=2,model=1,expert=1", "data=1,model=1,expert=2",
                ("rank",), P.EvalShape(4, 2, 16, 4, 4))
    devices = jax.devices()[:2]
    got = P.cost(run, "rank", devices)
    ref = P.measure(P.build(run, "rank", devices, scan=False)[1], memory=False)
    assert ref["flops"] > 0
    np.testing.assert_allclose(got["flops"], ref["flops"], rtol=0.02)
    np.testing.assert_allclose(got["bytes"], ref["bytes"], rtol=0.05)


def test_a_train_steps_cost_counts_every_microbatch_of_its_accumulation():
    # The accumulation is a scan, whose body XLA counts once. Reference: the same tokens in one
    # microbatch (grad_accum 1, micro_batch 4 x 2), a program with no accumulation loop.
    cfg = T5Config.preset("tiny").replace(num_encoder_layers=1, num_decoder_layers=1)
    devices = jax.devices()[:2]

    def run(micro, accum):
        tcfg = TrainConfig(micro_batch=micro, grad_accum=accum, max_input_length=16,
                           max_target_length=4)
        return P.Run(cfg, tcfg, 2, 2, "data=1,model=1,expert=2", "data=1,model=1,expert=2",
                     ("experts",))

    got = P.cost(run(2, 4), "experts", devices)
    ref = P.cost(run(8, 1), "experts", devices)
    assert ref["flops"] > 0
    # Counted once per microbatch, the optimiser update makes the estimate slightly larger (6%
    # on this tiny model, whose update is a large share of its step); a loop counted once
    # would give a quarter.
    assert ref["flops"] <= got["flops"] <= 1.1 * ref["flops"]


def goose_plan(*argv, timeout=300):
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-m", "goose_jax.cli.plan", *argv],
                          capture_output=True, text=True, env=env, timeout=timeout)
    return proc.returncode, proc.stdout, proc.stderr


def test_without_libtpu_goose_plan_says_how_to_install_it_in_one_line(monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "libtpu" else real(name, *a))
    code = cli.main(["--topology", "v5e-16", "--base", "t5-xl-lm-adapt"])
    err = capsys.readouterr().err
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert 'pip install "goose-jax[tpu-plan]"' in err


def test_a_library_too_large_for_the_chips_is_refused_before_compiling_and_says_what_would_fit():
    # T5-XL at full depth, 1,000 experts over expert=4: 250 experts x 24 block pairs of rank-16
    # LoRA on a v5e chip, over its 16 GiB before anything compiles (the CPU target: no libtpu
    # needed, and the arguments' check is the same on both).
    env_devices = "--xla_force_host_platform_device_count=8"
    os.environ.setdefault("XLA_FLAGS", env_devices)
    code, out, err = goose_plan("--topology", "v5e-4", "--base", "t5-xl-lm-adapt",
                                "--library", "1000", "--programs", "rank", "--target", "cpu",
                                "--eval-mesh", "data=1,model=1,expert=4")
    assert code == 1, err
    row = [c.strip() for c in out.strip().splitlines()[-2].strip("|").split("|")]
    program, experts, mesh, gib, frac, fits, advice = row[:7]
    assert (program, experts, fits) == ("rank", "1000", "no (arguments alone)")
    pair = 12 * (2048 + 2048) + 6 * (2048 + 5120)  # (I + O) over one block pair's sites
    library = 250 * 24 * pair * 16 * 2 / 2**30
    assert float(gib) >= library > 16 and float(frac) == pytest.approx(float(gib) / 16, abs=0.01)
    assert advice.startswith("grow `expert`")


@pytest.mark.skipif(not HAS_LIBTPU, reason="libtpu is not installed (pip install "
                    "\"goose-jax[tpu-plan]\"): the TPU compiler is not available")
def test_goose_plan_compiles_a_small_run_with_the_tpu_compiler():
    code, out, err = goose_plan("--topology", "v5e-4", "--base", "tiny", "--library", "8",
                                "--set", "micro_batch=2", "--set", "max_input_length=32",
                                "--set", "max_target_length=8", "--batch-size", "8",
                                "--max-input-length", "32", "--programs", "rank")
    assert code == 0, err
    lines = out.strip().splitlines()
    assert "v5e-4 (v5e:2x2, 4 chips of 16 GiB" in lines[0] and "TPU compiler" in lines[0]
    r = [c.strip() for c in lines[3].strip("|").split("|")]
    assert r[:3] == ["rank", "8 (8)" if r[1] != "8" else "8", "data=1,model=1,expert=4"]
    assert r[5] == "yes" and float(r[4]) <= 0.01 and float(r[3]) < 0.1
    assert float(r[7].split()[0]) > 0  # an estimated step time
