"""bench/pod_plan.py: the real routed scorer compiled for a simulated mesh, and its refusals.

Run as a subprocess: the bench sets its own fake device count (16) before importing jax.
"""

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# (I + O) summed over one encoder + decoder block pair's sites in T5-XL (d_model 2,048, inner
# 2,048, d_ff 5,120): 12 attention projections and 6 feed-forward kernels.
PAIR_SITES = 12 * (2048 + 2048) + 6 * (2048 + 5120)
LAST = re.compile(r"worst fraction of chip memory: (\d+\.\d+) \((\w+) (\w+)\)")


def pod_plan(*argv):
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "pod_plan.py"),
                           "--target", "cpu", *argv],
                          capture_output=True, text=True, env=env, timeout=300)
    return proc.returncode, proc.stdout, proc.stderr


def test_rank_classification_compiles_split_and_never_gathers_the_library():
    code, out, err = pod_plan("--layers", "1", "--settings", "t0", "--programs", "rank")
    assert code == 0, err
    lines = out.strip().splitlines()
    row = [c.strip() for c in lines[-2].strip("|").split("|")]
    (setting, program, E, mesh, args, output, temp, gen, total, chip, frac, coll, gathers,
     *_) = row
    assert (setting, program, E, mesh, chip) == ("t0", "rank", "36", "data=1,model=4,expert=4",
                                                 "16 x v4 32")
    # The library is split over `expert` (36 / 4 = 9 experts a device) and routed in place:
    # no all-gather returns a whole (E, I, R) or (E, R, O) library leaf.
    assert gathers == "0"
    # One T5-XL block pair's library on a device: 36 / 4 experts x R 16 x (I + O) summed over
    # its 18 sites, bf16; the argument bytes hold at least that.
    assert float(args) * 2**30 >= 9 * 16 * PAIR_SITES * 2
    parts = sum(float(x) for x in (args, output, temp, gen))
    assert abs(float(total) - parts) <= 0.02 + float(output)   # aliased outputs count once
    m = LAST.fullmatch(lines[-1])
    assert m and m.group(2, 3) == ("t0", "rank")
    assert float(m.group(1)) == float(frac) and abs(float(total) / 32 - float(frac)) <= 0.01
    assert float(frac) <= 0.85


def test_a_mesh_of_the_wrong_size_and_a_setting_that_cannot_fit_are_refused_in_one_line():
    code, out, err = pod_plan("--settings", "flan", "--programs", "rank", "--mesh", "data=3")
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "multiply to 3" in err and "16 devices" in err
    # The whole FLAN library (166 experts, 432 sites, bf16) on every chip: over a v5e chip.
    code, out, err = pod_plan("--settings", "flan", "--programs", "rank",
                              "--mesh", "data=16,model=1,expert=1")
    assert code == 1 and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    library = 166 * 24 * PAIR_SITES * 16 * 2 / 2**30  # GiB
    need = float(re.search(r"need (\d+\.\d+) GiB", err).group(1))
    assert need > 16 and need >= library
    assert "over the v5e chip's 16 GiB" in err and "`expert` axis" in err


def test_library_gathers_counts_whole_library_leaves_only():
    from goose_jax.pipeline import plan
    hlo = "\n".join([
        "  %ag.1 = bf16[40,2048,16]{2,1,0} all-gather(bf16[5,2048,16]{2,1,0} %p), dimensions={0}",
        "  %ag.2 = bf16[24,40,16,5120]{3,2,1,0} all-gather-start(bf16[24,5,16,5120] %q)",
        "  %ag.3 = f32[256,8,40]{1,0,2} all-gather(f32[256,8,5]{1,0,2} %s), dimensions={2}",
        "  %ar.1 = bf16[40,2048,16]{2,1,0} all-reduce(bf16[40,2048,16]{2,1,0} %p)",
        "  %ag.4 = bf16[36,2048,16]{2,1,0} all-gather(bf16[9,2048,16]{2,1,0} %p)",
    ])
    # (E_pad, I, R) and a stacked (Y, E_pad, R, O) leaf: 2; the (N, E) scores, an all-reduce and
    # another stack's leaf are not this library's gathers.
    assert plan.library_gathers(hlo, 40, 16) == 2


def test_the_scanned_train_step_pod_plan_compiles_equals_the_unrolled_one():
    # pod_plan compiles the experts step over a scanned model, the base passed stacked and the
    # library in its per-layer layout (the step stacks it): one step of it must move the experts
    # exactly as the unrolled step goose-train runs by default does.
    import jax
    import numpy as np

    import goose_jax as gj
    from goose_jax.experts.lora import init_experts
    from goose_jax.models.scan import stack_layers
    from goose_jax.models.t5.model import init_params
    from goose_jax.training import program as training

    cfg = gj.T5Config.preset("tiny").replace(num_encoder_layers=2, num_decoder_layers=2)
    tcfg = training.TrainConfig(steps=2, lr=1e-3, warmup_ratio=0.0, micro_batch=2, grad_accum=1,
                                max_input_length=8, max_target_length=4, fast_compile=True)
    params = init_params(cfg, 0)
    experts = init_experts(cfg, tcfg.lora, [jax.random.key(e) for e in range(2)],
                           fast_compile=True)
    rng = np.random.default_rng(0)
    batch = {"inputs": rng.integers(2, cfg.vocab_size, (2, 1, 2, 8)).astype(np.int32),
             "input_mask": np.ones((2, 1, 2, 8), np.int32),
             "targets": rng.integers(2, cfg.vocab_size, (2, 1, 2, 4)).astype(np.int32)}
    out = []
    for scan in (False, True):
        model = cfg.replace(scan_layers=scan)
        program = training.Program("expert", model, tcfg, tcfg.steps, tcfg.lora.lora_scale)
        base = stack_layers(params, model) if scan else params
        state, metrics = program.step(base, None, program.init(experts), batch)
        out.append((jax.device_get(state.trainable), jax.device_get(metrics["loss"])))
    np.testing.assert_allclose(out[1][1], out[0][1], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(out[1][0]), jax.tree.leaves(out[0][0]), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)
    assert jax.tree.structure(out[1][0]) == jax.tree.structure(experts)
