"""Golden `atpdsl plan` output for one spec (no colour, fixed width).

Set ATPDSL_UPDATE_GOLDEN=1 to rewrite plan/tiny.expected (then review the diff).
"""
import os
from pathlib import Path

from atpdsl.cli.app import plan_text
from atpdsl.language.compiler import compile_file

HERE = Path(__file__).resolve().parent


def test_plan_output_golden(monkeypatch):
    monkeypatch.chdir(HERE)  # the plan shows paths relative to the working folder
    plan = compile_file("plan/tiny.atp")
    text = plan_text(plan, width=100)
    assert str(HERE) not in text
    expected = HERE / "plan" / "tiny.expected"
    if os.environ.get("ATPDSL_UPDATE_GOLDEN") == "1":
        expected.write_text(text)
    assert text == expected.read_text()
