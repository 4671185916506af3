"""The memory plan (atpdsl.memory) against the peak memory a run really takes on CPU, for two model sizes.

Each case runs in a fresh process (`python test_memory_measured.py '<json>'`) with one thread and glibc's mmap
threshold fixed at 64 kB, so that freed tensors go back to the system and resident memory follows live memory:
the process builds a random Llama of the given sizes (no disk), resets the kernel's peak-RSS mark
(/proc/self/clear_refs) and runs the plan. Measured = peak resident set size minus the size before the model
was built (weights + run); other processes on the machine do not change it. The estimate must be within 30%.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent

SMALL = {"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 4,
         "intermediate_size": 688, "vocab_size": 8000}
LARGER = {"hidden_size": 384, "num_hidden_layers": 6, "num_attention_heads": 6, "num_key_value_heads": 2,
          "intermediate_size": 1024, "vocab_size": 16000}
CASES = {
    "small, AtP + edges": {"config": SMALL, "tokens": 96, "pairs": 8, "batch": 4,
                           "nodes": [["heads", False], ["neurons", False]], "method": "atp"},
    "larger, AtP + edges": {"config": LARGER, "tokens": 160, "pairs": 8, "batch": 4,
                            "nodes": [["heads", False], ["neurons", False]], "method": "atp"},
    "larger, per-position heads": {"config": LARGER, "tokens": 128, "pairs": 4, "batch": 4,
                                   "nodes": [["heads", True]], "method": "atp"},
}


def _status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith(("VmRSS", "VmHWM")):
                out[line.split(":")[0]] = int(line.split()[1]) * 1024
    return out


def _pairs(n: int, tokens: int) -> list[dict[str, str]]:
    """Equal-length pairs over the tiny tokenizer's words (one token each, no BOS)."""
    import random

    import tiny_models as tm

    rng = random.Random(0)
    words = [w for w in tm.WORDS[2:] if w not in ("cat", "dog")]
    out = []
    for _ in range(n):
        body = [rng.choice(words) for _ in range(tokens - 2)]
        out.append({"clean": " ".join(["cat"] + body + ["she"]), "corrupt": " ".join(["dog"] + body + ["she"]),
                    "answer": "cat", "wrong": "dog"})
    return out


def probe(case: dict) -> dict:
    """Run one case in this process; returns the estimate, the measurement and the estimate's parts (bytes)."""
    import gc

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from engine_support import NodeGroup, make_plan, tm
    from atpdsl.engine import execute
    from atpdsl.engine.load import wrap_model
    from atpdsl.engine.run import complete_plan
    from atpdsl.memory import estimate, model_sizes, shape_for
    from atpdsl.plan import MethodSpec

    torch.set_num_threads(1)
    base = _status()["VmRSS"]
    torch.manual_seed(0)
    config = LlamaConfig(max_position_embeddings=4096, tie_word_embeddings=True, **case["config"])
    loaded = wrap_model(LlamaForCausalLM(config), tm.make_tokenizer())
    nodes = tuple(NodeGroup(k, per_position=pp) for k, pp in case["nodes"])
    plan = make_plan("memory-probe", _pairs(case["pairs"], case["tokens"]), nodes, batch=case["batch"],
                     method_spec=MethodSpec(case["method"]))
    plan = complete_plan(plan, loaded)
    cfg = config.to_dict()
    lengths = [case["tokens"]] * case["pairs"]
    est = estimate(model_sizes(cfg, loaded.arch.name), shape_for(plan, cfg, lengths, attention="eager"),
                   case["batch"], lengths)
    gc.collect()
    with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
        handle.write("5")  # reset the peak-RSS mark: VmHWM restarts from the current RSS
    execute(plan, loaded=loaded)
    return {"estimate": est.peak, "measured": _status()["VmHWM"] - base, "phase": est.phase,
            "parts": {p.name: p.bytes for p in est.parts}}


def run_probe(case: dict, timeout: float = 900) -> dict:
    """`probe(case)` in a fresh process (see the module docstring)."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", PYTHONPATH=os.pathsep.join([str(HERE), str(HERE.parent)]))
    done = subprocess.run([sys.executable, __file__, json.dumps(case)], capture_output=True, text=True, env=env,
                          timeout=timeout, check=False)
    if done.returncode != 0:
        raise AssertionError(f"probe failed ({done.returncode}): {done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc/self/clear_refs")
@pytest.mark.parametrize("name", list(CASES))
def test_estimate_within_30_percent_of_measured_peak(name: str) -> None:
    got = run_probe(CASES[name])
    ratio = got["estimate"] / got["measured"]
    print(f"{name}: estimate {got['estimate'] / 1e6:.1f} MB, measured {got['measured'] / 1e6:.1f} MB "
          f"(ratio {ratio:.2f}, peak in the {got['phase']}; parts MB "
          f"{ {k: round(v / 1e6, 1) for k, v in got['parts'].items()} })")
    assert 0.7 <= ratio <= 1.3, got


if __name__ == "__main__":
    print(json.dumps(probe(json.loads(sys.argv[1]))))
