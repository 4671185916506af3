"""Golden diagnostics: every bad spec in check/ renders exactly as its .expected file says.

Set ATPDSL_UPDATE_GOLDEN=1 to rewrite the .expected files (then review the diff).
"""
import os
from pathlib import Path

import pytest

from atpdsl.language.compiler import check_text
from atpdsl.language.diagnostics import render_concise, render_full

CHECK = Path(__file__).resolve().parent / "check"
CASES = sorted(p.stem for p in CHECK.glob("*.atp"))
UPDATE = os.environ.get("ATPDSL_UPDATE_GOLDEN") == "1"


def rendered(name: str) -> tuple[str, list]:
    result = check_text((CHECK / f"{name}.atp").read_text(), filename=f"{name}.atp", base_dir=CHECK)
    # paths that depend on where the checkout lives
    text = render_full(result.diagnostics).replace(str(CHECK), "<dir>") + "\n"
    return text, list(result.diagnostics)


def test_catalogue_is_large_enough():
    assert len([c for c in CASES if not c.startswith("warn_")]) >= 40


@pytest.mark.parametrize("name", CASES)
def test_golden_diagnostics(name):
    text, diags = rendered(name)
    expected_file = CHECK / f"{name}.expected"
    if UPDATE:
        expected_file.write_text(text)
    assert text == expected_file.read_text()
    errors = [d for d in diags if d.is_error]
    if name.startswith("warn_"):
        assert diags and not errors
    else:
        assert errors, "a bad spec must produce at least one error"
    # concise output names the same places, one line each
    concise = render_concise(diags).splitlines()
    assert [line.split(": ")[0] for line in concise] == [d.location for d in sorted(
        diags, key=lambda d: (d.span.file, d.span.line, d.span.column, d.code))]
