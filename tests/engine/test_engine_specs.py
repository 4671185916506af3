"""The shipped specs end to end: compile (atpdsl.language.compiler) then execute()."""
from __future__ import annotations

import pytest

from engine_support import SHARED

from atpdsl.language.compiler import compile_file, compile_text
from atpdsl.engine import execute

SPECS = SHARED / "specs"


def test_pronoun_spec_with_method_atp(tmp_path):
    """pronoun.atp asks for atp*; run the same spec with `method atp` (AtP* is wired separately)."""
    text = (SPECS / "pronoun.atp").read_text()
    start = text.index("method atp*")
    end = text.index("}", start) + 1
    plan = compile_text(text[:start] + "method atp" + text[end:], filename=str(SPECS / "pronoun.atp"),
                        base_dir=SPECS, out_dir=tmp_path)
    result = execute(plan)
    assert result.n_pairs == 20 and len(result.nodes) == 5 * (8 + 172)
    assert list(plan.sites) == result.extras["sites"]  # the compiler's site list is the engine's
    by = result.by_name()
    assert by["L4.H2"].estimate == pytest.approx(-67.7 / 20, abs=0.01)  # nnsight-llama.md: sum -67.7 over 20 pairs
    verified = [n for n in result.nodes if n.verified_effect is not None]
    assert len(verified) == 30 and verified == list(result.nodes[:30])
    assert by["L4.H2"].verified_effect == pytest.approx(-68.1 / 20, abs=0.01)  # true patch, same doc
    assert result.clean_metric > 3 and result.corrupt_metric < 0


def test_inline_spec(tmp_path):
    """Two inline pairs of 19 and 20 tokens that end alike: per-position queries/keys count from the end."""
    plan = compile_file(SPECS / "inline.atp", out_dir=tmp_path)
    result = execute(plan)
    assert result.extras["positions"]["mode"] == "end"
    names = set(result.by_name())
    assert {"L4.H2", "L0.H0.q@-19", "L4.H7.q@-1", "L1.G3.k@-1"} <= names
    assert not any(n.node.position is not None and n.node.position < -19 for n in result.nodes)
    assert len(result.nodes) == 5 * 8 + 19 * 5 * (8 + 4)
