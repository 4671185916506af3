"""`--emit python` keeps embedded text as data, refuses what it cannot reproduce with a clear EngineError, copies
atpdsl's own definitions verbatim, and finds undefined names before a program is written."""
from __future__ import annotations

import ast
import inspect

import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine_support import NodeGroup, make_plan, tiny_folder, tm
from test_emit import run_programs

from atpdsl.engine import emit_python
from atpdsl.engine.emit.source import IntRange, literal, undefined_names
from atpdsl.errors import EngineError
from atpdsl.plan import MethodSpec, MetricSpec, Verification

HOSTILE = '"""+__import__("os").system("touch {marker}")+"""\n\'\'\'+__import__("os").system("touch {marker}")+\'\'\''


def test_embedded_text_stays_data(tmp_path):
    """A model folder, a spec name and prompts that would break out of a string literal (issue 12): the program
    compiles, loads the model from that folder, runs, and no embedded command runs at emit or at run time."""
    marker = tmp_path / "injected-command-ran"
    hostile = HOSTILE.format(marker=marker)
    model = tm.save_model(tm.make_llama(), tm.make_tokenizer(), tmp_path / f"model{hostile}")
    pairs = [dict(p, clean=p["clean"] + " " + hostile.replace("\n", " "),
                  corrupt=p["corrupt"] + " " + hostile.replace("\n", " ")) for p in tm.TINY_PAIRS[1:]]
    plan = make_plan(model, pairs, (NodeGroup("heads"), NodeGroup("mlp")), batch=2)
    from dataclasses import replace

    plan = replace(plan, spec_file=f"spec{hostile}.atp")
    src = emit_python(plan)
    compile(src, "emitted.py", "exec")
    assert hostile not in src.split("# === The plan, as data")[0]  # the docstring and imports hold no embedded text
    got = run_programs(tmp_path, {"hostile": src})["hostile"]
    assert got["ok"], got["stderr"][-3000:]
    assert len(got["nodes"]) == 2 * tm.make_llama().config.num_attention_heads + 2
    assert not marker.exists(), "an embedded command ran"


@given(st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                    max_leaves=12))
def test_literal_round_trips_any_data(value):
    """Whatever the data, its literal is a Python literal of the same value (never code)."""
    assert ast.literal_eval(literal(value)) == value


def test_literal_writes_integer_runs_as_ranges():
    assert literal(IntRange(3, 9)) == "list(range(3, 9))"
    assert literal({"units": IntRange(0, 172)}) == "{'units': list(range(0, 172))}"


def test_undefined_names_are_found_and_annotations_ignored():
    assert undefined_names("def f(x):\n    return g(x) + len(x)\n") == ["g"]
    assert undefined_names("def f(x: Foo) -> Bar:\n    return x\n") == []
    assert undefined_names("class A:\n    def m(self):\n        return A, B\n") == ["B"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("emit-refusals"))
    return {name: tiny_folder(name, root) for name in ("llama", "opt", "gptj")}


@pytest.mark.parametrize("arch, change, match", [
    ("llama", {"method_spec": MethodSpec("relp")}, "methods atp, atp\\* and exact, not 'relp'"),
    ("llama", {"metric": MetricSpec("kl")}, "metric kl has zero gradient"),
    ("opt", {}, "OPT models do not support emit: the emitted program does not reshape"),
    ("llama", {"verification": Verification(3, adaptive=True, budget=10)}, "`verify until confident`"),
    ("gptj", {"method_spec": MethodSpec("atp*", qk_fix=True)}, "QK fix on GPT-J rotates q and k with"),
])
def test_what_cannot_be_emitted_is_refused(folders, arch, change, match):
    plan = make_plan(folders[arch], tm.TINY_PAIRS, (NodeGroup("heads"), NodeGroup("keys")), batch=2, **change)
    with pytest.raises(EngineError, match=match):
        emit_python(plan)


def test_atpdsl_definitions_are_copied_verbatim(folders):
    """The program runs atpdsl's own QK fix and norm fix: their source, word for word (a class's setup, which reads
    architecture records, is left out and comes in as data)."""
    from atpdsl.engine.corrections.qk_fix import QkFix
    from atpdsl.engine.normfix import norm_inputs, rank1_change
    from atpdsl.engine.qkfix import QKFix

    plan = make_plan(folders["llama"], tm.TINY_PAIRS, (NodeGroup("keys"), NodeGroup("neurons")), batch=2,
                     method_spec=MethodSpec("atp*", qk_fix=True, norm_fix=True))
    src = emit_python(plan)
    for fn in (QKFix, norm_inputs, rank1_change):
        assert inspect.getsource(fn) in src, fn.__name__
    qk = inspect.getsource(QkFix)
    setup = qk[qk.index("    def setup"): qk.index("    @property")]
    assert qk.replace(setup, "") in src and "def setup" not in src


def test_edge_steps_are_left_out_and_unknown_kinds_refused(folders, monkeypatch):
    """Every edge step (reads, integrated gradients, path patching) is left out with its reason; a step kind the
    program does not know is refused rather than copied blindly."""
    from atpdsl.engine.emit import prepare as emit_prepare
    from atpdsl.plan import EdgeSettings

    plan = make_plan(folders["llama"], tm.TINY_PAIRS, (NodeGroup("heads"), NodeGroup("mlp")), batch=2,
                     edges=EdgeSettings(ig_steps=2, verify=2), verification=Verification(2))
    src = emit_python(plan)
    tree = ast.parse(src)
    consts = {t.id: ast.literal_eval(node.value) for node in tree.body if isinstance(node, ast.Assign)
              for t in node.targets if isinstance(t, ast.Name) and t.id in ("STEPS", "LEFT_OUT")}
    assert {s["kind"] for s in consts["LEFT_OUT"]} == {"edge_reads", "edge_ig", "edges", "verify_edges"}
    assert [s["kind"] for s in consts["STEPS"]] == ["corrupt_forward", "clean_backward", "rank", "verify"]
    monkeypatch.setattr(emit_prepare, "EMITTED", tuple(k for k in emit_prepare.EMITTED if k != "verify"))
    with pytest.raises(EngineError, match="does not know the step kind 'verify'"):
        emit_python(plan)
