"""emit_python: the emitted standalone nnsight program reproduces execute()'s AtP scores."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from engine_support import STORIES, NodeGroup, make_plan, stories_pairs

from atpdsl.engine import emit_python, execute
from atpdsl.errors import EngineError
from atpdsl.plan import MethodSpec, MetricSpec


def test_emitted_program_reproduces_atp_scores(tmp_path):
    """Stories pairs of different lengths (batches of 8 with left padding), summed and from-the-end nodes."""
    plan = make_plan(STORIES, stories_pairs(12), (NodeGroup("heads"), NodeGroup("neurons", (3, 4), (7, 80, 96)),
                                                   NodeGroup("keys", (1, 1)), NodeGroup("heads", (4, 4), (2,), True)))
    src = emit_python(plan)
    assert "with model.trace(clean_in, use_cache=False):" in src and "with metric.backward():" in src
    assert "model.model.layers[1].self_attn.k_proj.output" in src
    script = tmp_path / "atp_program.py"
    script.write_text(src)
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    emitted = {d["node"]: d for d in map(json.loads, out.stdout.splitlines())}
    result = execute(plan)
    assert set(emitted) == {n.name for n in result.nodes}
    assert "L4.H2@-1" in emitted
    worst = max(max(abs(emitted[n.name]["estimate"] - n.estimate), abs(emitted[n.name]["score"] - n.score))
                for n in result.nodes)
    assert worst < 1e-5, worst
    print(f"emitted program vs execute(): {len(emitted)} nodes, max diff {worst:.1e}")


def test_emit_refuses_what_it_cannot_reproduce():
    plan = make_plan(STORIES, stories_pairs(2), (NodeGroup("heads"),))
    with pytest.raises(EngineError, match="exact"):
        emit_python(make_plan(STORIES, stories_pairs(2), (NodeGroup("heads"),), method="exact"))
    from dataclasses import replace

    with pytest.raises(EngineError, match="at last"):
        emit_python(replace(plan, metric=replace(plan.metric, position="name")))
    with pytest.raises(EngineError, match="kl"):
        emit_python(replace(plan, metric=MetricSpec("kl")))
    with pytest.raises(EngineError, match="AtP\\* corrections"):
        emit_python(replace(plan, method=MethodSpec("atp*", qk_fix=True)))
