"""`attention auto` (the default): eager only where a step reads the attention pattern (the QK fix, the norm fix
for values, the edges) or RelP changes its gradient, else sdpa, which is faster and keeps less for the backward
(benchmarks/bench_scale.py, atpdsl.memory_sizes). Scores with sdpa equal eager's to float32 rounding; a plan that
reads the pattern on an sdpa model is refused clearly."""
from __future__ import annotations

from dataclasses import replace

import pytest

from engine_support import NodeGroup, Verification, make_plan, max_abs_diff, per_pair, tiny_folder, tm

from atpdsl.engine import execute
from atpdsl.errors import ModelError
from atpdsl.language.compiler import compile_text
from atpdsl.plan import Diagnosis, MethodSpec


def _spec(folder, method: str, settings: str = "", nodes: str = "heads") -> str:
    return (f'model "{folder}" {{ {settings} }}\npair {{ clean "the cat sat on the" corrupt "the dog sat on the" '
            f'answer "mat" wrong "park" }}\nmetric logit_diff(answer, wrong)\nnodes {{ {nodes} }}\n{method}\n')


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("attn"))
    return {name: tiny_folder(name, root, n_layer=2) for name in ("llama", "gptj")}


@pytest.mark.parametrize("model, method, expected", [
    ("llama", "method exact", "sdpa"),
    ("gptj", "method atp", "sdpa"),  # GPT-J's record has no edges: nothing reads the pattern
    ("gptj", "method atp* { qk_fix off }", "sdpa"),  # GradDrop alone reads no pattern
    ("llama", "method atp", "eager"),  # the edges read every layer's pattern
    ("gptj", "method atp*", "sdpa"),  # heads only: no QK fix step
    ("gptj-queries", "method atp*", "eager"),  # the QK fix reads it
    ("llama", "method relp", "eager"),
])
def test_auto_resolves_from_the_steps(folders, model, method, expected):
    name, _, nodes = model.partition("-")
    text = _spec(folders[name], method, nodes=nodes or "heads")
    assert compile_text(text, base_dir=".").model.attention == expected


def test_explicit_attention_stays(folders):
    assert compile_text(_spec(folders["gptj"], "method atp", "attention eager"), base_dir=".").model.attention == \
        "eager"


@pytest.mark.parametrize("method", [MethodSpec("exact"), MethodSpec("atp*", qk_fix=False, graddrop=True)],
                         ids=["exact", "graddrop"])
def test_sdpa_scores_equal_eager(folders, method):
    folder = folders["gptj"] if method.name != "exact" else folders["llama"]
    plan = make_plan(folder, tm.TINY_PAIRS, (NodeGroup("heads"), NodeGroup("neurons")), method_spec=method,
                     write_per_pair=True, batch=3, verification=Verification(4), diagnosis=Diagnosis(samples=8))
    eager = execute(plan)
    sdpa = execute(replace(plan, model=replace(plan.model, attention="sdpa")))
    assert max_abs_diff(per_pair(eager), per_pair(sdpa)) <= 1e-5


def test_pattern_reader_on_sdpa_is_refused(folders):
    plan = make_plan(folders["llama"], tm.TINY_PAIRS, (NodeGroup("heads"),))
    with pytest.raises(ModelError, match=r"read\(s\) the attention pattern"):
        execute(replace(plan, model=replace(plan.model, attention="sdpa")))
