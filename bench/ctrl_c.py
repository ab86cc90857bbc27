"""Ctrl-C at random moments on every goose-jax tool: no crash, no traceback, one line, exit 130.

    python bench/ctrl_c.py [--runs 20] [--tools goose-eval,train/t0.py] [--seed 0]

Builds tiny inputs in a temporary folder (a random T5, a 3-expert gated library, BBH files, a
synthetic P3 release, training data), then for each tool starts it ``--runs`` times as a user's
shell would (the console script itself, SIGINT at its default) and sends SIGINT after a delay
drawn uniformly between 0.05 s and the tool's window (start-up imports included). A run passes
if it ends with 130 and exactly one stderr line ``PROG: interrupted...`` without a traceback, or
finished before the signal (exit 0, no traceback). A signal that lands while the interpreter
itself starts (before the site module has run, so before any line of goose-jax), or once a
finished run's interpreter has begun to exit, gets Python's own behaviour (killed by SIGINT
without a word, or a traceback of site) and is counted apart, as ``python_start``. Prints one
row per tool (runs, interrupted, finished, python_start, failed, slowest exit after the signal)
and the stderr of every run not interrupted or finished; exits 1 if any run failed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
TINY = os.path.join(ROOT, "configs", "tiny.py")
# tool -> seconds within which SIGINT is sent (about its whole run on a small CPU)
WINDOW_S = {"goose-data": 10.0, "goose-train": 14.0, "goose-eval": 12.0, "goose-convert": 7.0,
            "goose-demo": 20.0, "train/t0.py": 25.0, "train/flan.py": 25.0}


def build_inputs(root: str) -> None:
    """The tools' inputs under ``root`` (a base, a library, BBH, P3, two JSONL files)."""
    import numpy as np
    from datasets import Dataset, DatasetDict

    import goose_jax as gj
    from goose_jax.core.trees import nest_sites
    from goose_jax.data import synthetic
    from goose_jax.experts.lora import LoRAConfig
    from goose_jax.library.store import ExpertLibrary

    cfg = gj.T5Config(vocab_size=300, d_model=24, d_kv=8, num_heads=3, d_ff=40,
                      num_encoder_layers=1, num_decoder_layers=1,
                      relative_attention_num_buckets=8, relative_attention_max_distance=20,
                      feed_forward_proj="gated-gelu", tie_word_embeddings=False)
    params = gj.init_params(cfg, 5)
    gj.save_hf_t5(cfg, params, os.path.join(root, "base"))
    lib = ExpertLibrary.create(os.path.join(root, "lib"), cfg, params,
                               LoRAConfig(rank=2, sites=r"decoder/block_0/ffn/wo"))
    rng = np.random.default_rng(0)
    for name in ("alpha", "beta", "gamma"):
        experts, gates = {}, {}
        for site, (d_in, d_out) in lib.sites.items():
            experts[site] = {"lora_a": rng.standard_normal((d_in, 2), np.float32),
                             "lora_b": rng.standard_normal((2, d_out), np.float32)}
            gates[site] = {"gate": rng.standard_normal((d_in,), np.float32)}
        lib.add(name, nest_sites(experts), nest_sites(gates))
    rows = [{"input": f"{a} and {b}", "target": str(a and b)}
            for a in (True, False) for b in (True, False)]
    DatasetDict({"test": Dataset.from_list(rows * 4)}).save_to_disk(
        os.path.join(root, "bbh", "boolean_expressions"))
    synthetic.write_p3_release(os.path.join(root, "p3"))
    with open(os.path.join(root, "words.jsonl"), "w") as f:
        for w in ("goose", "jax", "flax", "route", "token", "gate", "expert"):
            f.write(json.dumps({"input": f"reverse: {w}", "target": w[::-1]}) + "\n")


def command(tool: str, root: str, out: str) -> list[str]:
    """The command line of one run of ``tool`` writing to ``out``."""
    if tool.startswith("train/"):
        return [sys.executable, os.path.join(ROOT, tool), "--small", "--workdir", out]
    argv = {
        "goose-data": ["p3-heldin", f"{root}/p3", out, "--datasets", "ag_news,rotten_tomatoes"],
        "goose-train": ["experts", "--config", TINY, "--base", "random:tiny", "--data",
                        f"{root}/words.jsonl", "--library", f"{out}/lib", "--workdir",
                        f"{out}/work", "--set", "steps=30"],
        "goose-eval": ["--base", f"{root}/base", "--byte-tokenizer", "--bbh-root", f"{root}/bbh",
                       "--library", f"{root}/lib", "--out", out, "--no-progress",
                       "--batch-size", "4", "--tasks", "bbh/boolean_expressions"],
        "goose-convert": ["hf-to-orbax", f"{root}/base", out],
        "goose-demo": ["--preset", "small", "--no-retrieval", "--out", out],
    }[tool]
    return [os.path.join(BIN, tool), *argv]


def one_run(tool: str, root: str, out: str, delay: float) -> dict:
    """Starts ``tool``, sends SIGINT after ``delay`` seconds; returns what happened."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]),
        PYTHONFAULTHANDLER="1")
    proc = subprocess.Popen(command(tool, root, out), cwd=root, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    time.sleep(delay)
    sent = time.monotonic()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=600)
    lines = err.strip().splitlines()
    code = proc.returncode
    interrupted = (code == 130 and len(lines) == 1
                   and lines[0].startswith(f"{tool}: interrupted"))
    finished = code == 0 and "Traceback" not in err and "Fatal Python error" not in err
    # SIGINT before the interpreter has set itself up (its own start-up and the site module's
    # .pth files, before any line of the tool runs), or after its exit began (a finished run:
    # Python restores the default action first): Python's behaviour, not the tool's.
    python_start = ((code == -signal.SIGINT and not err.strip())
                    or "init_import_site" in err or "<frozen site>" in err)
    verdict = ("interrupted" if interrupted else "finished" if finished else
               "python_start" if python_start else "FAILED")
    return {"tool": tool, "delay": round(delay, 2), "code": code, "stderr": err,
            "exit_s": time.monotonic() - sent, "verdict": verdict}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=20, help="interrupts per tool")
    ap.add_argument("--tools", default=",".join(WINDOW_S), help="comma-separated tools")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--window", type=float, help="longest delay (default: the tool's own)")
    args = ap.parse_args(argv)
    rng = random.Random(args.seed)
    # A background job of a non-interactive shell starts with SIGINT ignored, and its children
    # inherit that; a terminal's foreground command has it at its default, as a user's tools do
    # (a Python handler becomes the default in the children).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    failed = 0
    with tempfile.TemporaryDirectory(prefix="ctrl_c_") as root:
        build_inputs(root)
        print(f"{'tool':15s} runs interrupted finished python_start failed slowest_exit_s")
        for tool in args.tools.split(","):
            results = []
            for i in range(args.runs):
                delay = rng.uniform(0.05, args.window or WINDOW_S[tool])
                results.append(one_run(tool, root, os.path.join(root, "out", f"{tool}{i}"),
                                       delay))
            bad = [r for r in results if r["verdict"] == "FAILED"]
            failed += len(bad)
            count = {v: sum(r["verdict"] == v for r in results)
                     for v in ("interrupted", "finished", "python_start")}
            print(f"{tool:15s} {len(results):4d} {count['interrupted']:11d} "
                  f"{count['finished']:8d} {count['python_start']:12d} {len(bad):6d} "
                  f"{max(r['exit_s'] for r in results):14.2f}", flush=True)
            for r in [r for r in results if r["verdict"] == "python_start"] + bad:
                print(f"  {r['verdict']} after {r['delay']} s: exit {r['code']}\n"
                      + "\n".join("    " + line for line in r["stderr"].splitlines()[-15:]),
                      flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
