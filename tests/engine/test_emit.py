"""`--emit python`: the emitted program, run in a subprocess that cannot import atpdsl, reproduces `execute()`'s
numbers (estimate, score, verified effect per node) to 1e-6 and runs the plan's steps, for every method.

All programs of a fixture run in one subprocess (`runpy`, one program after the other) so the suite pays the
torch / transformers / nnsight import once; the subprocess uses the test process's thread count, so both sides
sum in the same order.
"""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine_support import STORIES, NodeGroup, make_plan, stories_pairs, tiny_folder, tm

from atpdsl.engine import emit_python, execute
from atpdsl.plan import Diagnosis, MethodSpec, MetricArg, MetricSpec, Verification

TOLERANCE = 1e-6

DRIVER = r'''
import contextlib, importlib.abc, io, json, runpy, sys, traceback

class NoAtpdsl(importlib.abc.MetaPathFinder):
    """The emitted program must run without atpdsl: importing it fails here."""
    def find_spec(self, name, path, target=None):
        if name == "atpdsl" or name.startswith("atpdsl."):
            raise ImportError(f"the emitted program imported {name}")
        return None

sys.meta_path.insert(0, NoAtpdsl())
results = []
for path in sys.argv[1:]:
    out, err = io.StringIO(), io.StringIO()
    ok = True
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            runpy.run_path(path, run_name="__main__")
        except BaseException:
            ok = False
            traceback.print_exc()
    results.append({"ok": ok, "stdout": out.getvalue(), "stderr": err.getvalue()})
print(json.dumps({"results": results, "atpdsl_loaded": any(m.split(".")[0] == "atpdsl" for m in sys.modules)}))
'''

LEFT_OUT = {"diagnose", "edge_reads", "edges"}


def run_programs(folder: Path, programs: dict[str, str]) -> dict[str, dict]:
    """Write each program to `folder` and run them all in one subprocess; name -> {ok, nodes, summary, stderr}."""
    paths = []
    for name, src in programs.items():
        path = folder / f"{name}.py"
        path.write_text(src)
        paths.append(str(path))
    driver = folder / "driver.py"
    driver.write_text(DRIVER)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS=str(torch.get_num_threads()))
    done = subprocess.run([sys.executable, str(driver), *paths], capture_output=True, text=True, env=env, cwd=folder,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.splitlines()[-1])
    assert not report["atpdsl_loaded"]
    out = {}
    for name, got in zip(programs, report["results"]):
        lines = [json.loads(line) for line in got["stdout"].splitlines() if line.startswith("{")]
        out[name] = {"ok": got["ok"], "stderr": got["stderr"], "nodes": {d["node"]: d for d in lines if "node" in d},
                     "summary": lines[-1] if lines and "steps" in lines[-1] else None}
    return out


def assert_reproduces(got: dict, result) -> float:
    """The program's numbers equal execute()'s to TOLERANCE; its steps are the plan's minus those left out."""
    assert got["ok"], got["stderr"][-3000:]
    nodes = got["nodes"]
    assert set(nodes) == {n.name for n in result.nodes}
    worst = 0.0
    for n in result.nodes:
        mine = nodes[n.name]
        assert mine["rank"] == n.rank, (n.name, mine["rank"], n.rank)
        worst = max(worst, abs(mine["estimate"] - n.estimate), abs(mine["score"] - n.score))
        if n.verified_effect is None:
            assert "verified_effect" not in mine, n.name
        else:
            worst = max(worst, abs(mine["verified_effect"] - n.verified_effect))
    assert worst <= TOLERANCE, worst
    ran = [s for s in result.extras["steps"] if s["kind"] not in LEFT_OUT]
    assert got["summary"]["steps"] == ran
    assert abs(got["summary"]["clean_metric"] - result.clean_metric) <= TOLERANCE
    assert abs(got["summary"]["corrupt_metric"] - result.corrupt_metric) <= TOLERANCE
    return worst


NODES = (NodeGroup("heads"), NodeGroup("queries"), NodeGroup("keys"), NodeGroup("values"),
         NodeGroup("neurons", (1, 1), (3, 7, 11)), NodeGroup("attn"), NodeGroup("mlp"), NodeGroup("resid", (0, 0)))
SUBLAYER = MethodSpec("atp*", qk_fix=True, graddrop=True, graddrop_mode="sublayer", norm_fix=True)
KL = MetricSpec("kl")
CASES = {
    # name: (architecture, method, verify top, eval metric, diagnose)
    "llama-atp": ("llama", MethodSpec("atp"), 4, None, True),
    "llama-atpstar-layer": ("llama", MethodSpec("atp*", qk_fix=True, graddrop=True), None, None, False),
    "llama-atpstar-sublayer-norm": ("llama", SUBLAYER, 4, KL, False),
    "llama-exact": ("llama", MethodSpec("exact"), 3, None, False),
    "gpt2-atpstar-sublayer-norm": ("gpt2", SUBLAYER, 3, None, False),
    "gpt2-exact-eval": ("gpt2", MethodSpec("exact"), 3, MetricSpec("prob", (MetricArg("answer"),)), False),
    "neox-atpstar-sublayer-norm": ("neox", SUBLAYER, None, None, False),
    "neox-atpstar-layer": ("neox", MethodSpec("atp*", qk_fix=True, graddrop=True, norm_fix=True), 2, None, False),
}


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    """Every tiny case: its plan, execute()'s result and the emitted program's output."""
    root = tmp_path_factory.mktemp("emit")
    plans, programs = {}, {}
    for name, (arch, method, top, eval_metric, diagnose) in CASES.items():
        plan = make_plan(tiny_folder(arch, str(root)), tm.TINY_PAIRS, NODES, method_spec=method, batch=2,
                         verification=Verification(top) if top else None, eval_metric=eval_metric,
                         diagnosis=Diagnosis(samples=8) if diagnose else None)
        plans[name] = plan
        programs[name] = emit_python(plan)
    ran = run_programs(root, programs)
    return {name: (plans[name], programs[name], ran[name]) for name in CASES}


@pytest.mark.parametrize("case", list(CASES))
def test_emitted_program_reproduces_execute_on_tiny_models(tiny_runs, case):
    plan, _, got = tiny_runs[case]
    worst = assert_reproduces(got, execute(plan))
    print(f"{case}: {len(got['nodes'])} nodes, max |program - execute()| {worst:.1e}")


def test_the_corrections_change_the_numbers(tiny_runs):
    """Not a vacuous match: AtP*'s QK fix moves query and key estimates, the norm fix head estimates, and
    GradDrop the scores, in the program's own output (same nodes and pairs as plain AtP)."""
    plain = tiny_runs["llama-atp"][2]["nodes"]
    layer = tiny_runs["llama-atpstar-layer"][2]["nodes"]
    norm = tiny_runs["llama-atpstar-sublayer-norm"][2]["nodes"]

    def moved(a: dict, b: dict, names: list[str], field: str) -> float:
        return max(abs(a[n][field] - b[n][field]) for n in names)

    qk = [n for n in plain if n.endswith((".q", ".k"))]
    heads = [n for n in plain if ".H" in n and "." not in n.split(".H")[1]]
    assert moved(plain, layer, qk, "estimate") > 1e-4
    assert moved(plain, norm, heads, "estimate") > 1e-4
    assert moved(plain, layer, list(plain), "score") > 1e-4


def test_left_out_steps_are_said_so(tiny_runs):
    """Edges and the diagnostic are not emitted: the program names them in LEFT_OUT, on stderr and in its last
    line, and runs everything else."""
    _, src, got = tiny_runs["llama-atp"]
    assert "LEFT_OUT = [" in src and "'diagnose'" in src
    assert "leaves out the plan's step 'diagnose'" in got["stderr"]
    assert "leaves out the plan's step 'edges'" in got["stderr"]
    assert set(got["summary"]["left_out"]) == {"edge reads", "diagnose", "edges"}


def test_program_is_plain_nnsight_without_atpdsl(tiny_runs):
    _, src, _ = tiny_runs["neox-atpstar-sublayer-norm"]
    imported = {a.name for node in ast.walk(ast.parse(src)) if isinstance(node, ast.Import) for a in node.names}
    imported |= {node.module for node in ast.walk(ast.parse(src)) if isinstance(node, ast.ImportFrom)}
    assert imported == {"__future__", "dataclasses", "json", "sys", "nnsight", "torch", "transformers"}
    assert "with model.trace(dict(inputs), use_cache=False):" in src and ".backward():" in src
    assert src.count("\n# --- copied from atpdsl/engine/qkfix.py") == 1  # atpdsl's own QK fix, copied once
    compile(src, "emitted.py", "exec")


def test_emitted_program_reproduces_execute_on_stories(tmp_path):
    """stories260K (Llama, GQA): pairs of different lengths (left padding), per-position heads and keys counted
    from the end, AtP* per sublayer with the QK fix and the norm fix, and verify."""
    nodes = (NodeGroup("heads"), NodeGroup("neurons", (3, 4), (7, 80, 96)), NodeGroup("keys", (1, 1), None, True),
             NodeGroup("heads", (4, 4), (2,), True), NodeGroup("mlp"))
    plan = make_plan(STORIES, stories_pairs(8), nodes, method_spec=SUBLAYER, batch=4, verification=Verification(5))
    got = run_programs(tmp_path, {"stories": emit_python(plan)})["stories"]
    result = execute(plan)
    assert "L4.H2@-1" in got["nodes"]
    worst = assert_reproduces(got, result)
    print(f"stories260K: {len(got['nodes'])} nodes, max |program - execute()| {worst:.1e}")
