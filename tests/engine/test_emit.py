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
from atpdsl.language.compiler import compile_text
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

LEFT_OUT = {"diagnose", "edge_reads", "edges", "edge_ig", "verify_edges"}


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
# whole answers (teacher-forced, one model row per answer) from words of the tiny vocabulary
SEQUENCE_PAIRS = [dict(p, answer=a, wrong=w) for p, (a, w) in
                  zip(tm.TINY_PAIRS, [("john gave", "mary gave"), ("mat and", "park and"), ("was a", "is a")])]
SEQUENCE = MetricSpec("logit_diff", (MetricArg("answer", sequence=True), MetricArg("wrong", sequence=True)))
CASES = {
    # name: (architecture, make_plan arguments)
    "llama-atp": ("llama", dict(verification=Verification(4), diagnosis=Diagnosis(samples=8))),
    "llama-atpstar-layer": ("llama", dict(method_spec=MethodSpec("atp*", qk_fix=True, graddrop=True))),
    "llama-atpstar-sublayer-norm": ("llama", dict(method_spec=SUBLAYER, verification=Verification(4),
                                                  eval_metric=MetricSpec("kl"))),
    "llama-exact": ("llama", dict(method_spec=MethodSpec("exact"), verification=Verification(3))),
    "llama-sequence-metric": ("llama", dict(method_spec=SUBLAYER, metric=SEQUENCE, pairs=SEQUENCE_PAIRS,
                                            verification=Verification(2))),
    "gpt2-atpstar-sublayer-norm": ("gpt2", dict(method_spec=SUBLAYER, verification=Verification(3))),
    "gpt2-exact-eval": ("gpt2", dict(method_spec=MethodSpec("exact"), verification=Verification(3),
                                     eval_metric=MetricSpec("prob", (MetricArg("answer"),)))),
    "gpt2-graddrop-abs-mean": ("gpt2", dict(method_spec=MethodSpec("atp*", graddrop=True, aggregate="abs_mean"))),
    "neox-atpstar-sublayer-norm": ("neox", dict(method_spec=SUBLAYER)),
    "neox-atpstar-layer-per-pair": ("neox", dict(method_spec=MethodSpec("atp*", qk_fix=True, graddrop=True,
                                                                        norm_fix=True, aggregate="per_pair"),
                                                 verification=Verification(2))),
}

TEMPLATE = """model {model}
template {{
    text    "when {{a}} and mary went to the store mary gave a bottle to"
    slot    a ["john", "the cat"]
    corrupt a ["the big dog"]
    answer  "mary"
    wrong   "john"
    count   2
}}
metric logit_diff(answer, wrong) at last
nodes {{
    heads layers 1 per position
    keys layers 1 per position
    mlp
}}
method atp* {{ qk_fix on  graddrop per sublayer  norm_fix on }}
batch 1
verify top 4
"""


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    """Every tiny case (and a template whose slot values differ in length between clean and corrupt, compiled from
    a spec): its plan, its program and the program's output."""
    root = tmp_path_factory.mktemp("emit")
    plans = {}
    for name, (arch, kw) in CASES.items():
        kw = dict(kw)
        plans[name] = make_plan(tiny_folder(arch, str(root)), kw.pop("pairs", tm.TINY_PAIRS), NODES, batch=2, **kw)
    llama = json.dumps(str(tiny_folder("llama", str(root))))
    plans["llama-template-slots"] = compile_text(TEMPLATE.format(model=llama), base_dir=root)
    programs = {name: emit_python(plan) for name, plan in plans.items()}
    ran = run_programs(root, programs)
    return {name: (plans[name], programs[name], ran[name]) for name in plans}


@pytest.mark.parametrize("case", [*CASES, "llama-template-slots"])
def test_emitted_program_reproduces_execute_on_tiny_models(tiny_runs, case):
    plan, _, got = tiny_runs[case]
    worst = assert_reproduces(got, execute(plan))
    print(f"{case}: {len(got['nodes'])} nodes, max |program - execute()| {worst:.1e}")


def test_template_slots_of_different_lengths_are_aligned(tiny_runs):
    """The template case is what it claims: clean and corrupt prompts of different lengths, per-position nodes
    named by slot."""
    plan, _, got = tiny_runs["llama-template-slots"]
    assert all(len(p.clean.split()) != len(p.corrupt.split()) for p in plan.pairs)
    assert "L1.H0@a" in got["nodes"]


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
    outside = {name for name in imported if name.split(".")[0] not in sys.stdlib_module_names}
    assert outside <= {"nnsight", "torch", "transformers", "numpy"} and {"nnsight", "torch"} <= outside
    assert not any(name.startswith("atpdsl") for name in imported)
    assert "with model.trace(dict(inputs), use_cache=False):" in src and ".backward():" in src
    assert src.count("\n# --- copied from atpdsl/engine/qkfix.py") == 1  # atpdsl's own QK fix, copied once
    compile(src, "emitted.py", "exec")


def test_emitted_program_reproduces_execute_on_stories(tmp_path):
    """stories260K (Llama, GQA): pairs of different lengths (left padding), per-position heads and keys counted
    from the end, AtP* per sublayer with the QK fix and the norm fix, and verify."""
    nodes = (NodeGroup("heads"), NodeGroup("neurons", (3, 4), (7, 80, 96)), NodeGroup("keys", (1, 1), None, True),
             NodeGroup("heads", (4, 4), (2,), True), NodeGroup("mlp"))
    plan = make_plan(STORIES, stories_pairs(6), nodes, method_spec=SUBLAYER, batch=3, verification=Verification(4))
    got = run_programs(tmp_path, {"stories": emit_python(plan)})["stories"]
    result = execute(plan)
    assert "L4.H2@-1" in got["nodes"]
    worst = assert_reproduces(got, result)
    print(f"stories260K: {len(got['nodes'])} nodes, max |program - execute()| {worst:.1e}")
