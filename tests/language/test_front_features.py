"""New statements reach the plan: adaptive verification, `method relp`, whole-answer metrics, check's warnings."""
from __future__ import annotations

import pytest

from atpdsl.language.compiler import check_text, compile_text
from atpdsl.plan import Verification

BASE = 'model "EleutherAI/pythia-70m"\npair { clean "a b" corrupt "a c" answer " x" wrong " y" }\n'


def plan_of(body: str, metric: str = "logit_diff(answer, wrong)"):
    return compile_text(f"{BASE}metric {metric}\n{body}", filename="t.atp")


@pytest.mark.parametrize("body, expected", [
    ("verify top 7", Verification(7)),
    ("verify until confident", Verification(20, adaptive=True, budget=200)),  # the default selection's 20
    ("verify until confident { budget 50 }", Verification(20, adaptive=True, budget=50)),
    ("verify until confident { budget 4 }", Verification(4, adaptive=True, budget=4)),
    ("select top 25\nverify until confident { budget 120 }", Verification(25, adaptive=True, budget=120)),
])
def test_verification_is_lowered(body, expected):
    assert plan_of(body).verification == expected


@pytest.mark.parametrize("body, code", [
    ("verify until\nbatch 2", "E001"),
    ("verify until 5", "E802"),
    ("verify until confident { budget 0 }", "E106"),
    ("verify until confident { samples 3 }", "E103"),
    ("verify top confident", "E802"),
    ("verify top 3 { budget 9 }", "E702"),
    ("verify sometimes 3", "E802"),
])
def test_verification_errors(body, code):
    r = check_text(f"{BASE}metric logit_diff(answer, wrong)\n{body}\n", filename="t.atp")
    assert code in [d.code for d in r.errors], r.diagnostics


def test_relp_is_a_method_without_settings():
    assert plan_of("method relp").method.name == "relp"
    r = check_text(f"{BASE}metric logit_diff(answer, wrong)\nmethod relp {{ qk_fix on }}\n")
    assert [d.code for d in r.errors] == ["E702"]
    r = check_text(f"{BASE}metric kl\nmethod relp\n")
    assert [d.code for d in r.errors] == ["E512"]


def test_sequence_arguments_are_lowered():
    plan = plan_of("", "logit_diff(sequence(answer), sequence(\" z w\"))")
    a, b = plan.metric.args
    assert (a.field, a.sequence, a.first_token) == ("answer", True, False)
    assert (b.literal, b.sequence) == (" z w", True)
    plan = plan_of("eval metric prob(first_token(answer))\nverify top 1", "loss(sequence(answer))")
    assert plan.metric.kind == "loss" and plan.metric.args[0].sequence
    assert plan.eval_metric.args[0].first_token and not plan.eval_metric.args[0].sequence


def test_loss_takes_zero_or_one_argument():
    assert plan_of("", "loss").metric.args == ()
    assert check_text(f"{BASE}metric loss(answer, wrong)\n").errors[0].code == "E502"


def test_plan_carries_checks_warnings():
    plan = plan_of("diagnose false_negatives { samples 10 }")
    assert any(w.startswith("t.atp:4:1: W502 warning:") for w in plan.warnings), plan.warnings
