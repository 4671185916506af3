"""The fixture tiers (tests/conftest.py): tests that need data outside the repository skip, with one summary
line, where it is missing, and fail instead under CI=true.

The end-to-end cases run pytest in a subprocess with ATPDSL_TEST_HIDE_FIXTURES, which makes the tiers treat
the named fixtures as missing even where they are present, and read each test's outcome from JUnit XML.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

import conftest

ROOT = Path(__file__).resolve().parent.parent
TARGETS = [
    "tests/examples/test_examples.py::test_example_compiles",  # induction examples need no fixture; pronoun ones do
    "tests/language/test_cli.py::test_check_ok",  # the shared specs
    "tests/language/test_cli.py::test_check_missing_file_is_exit_1",  # no fixture
    "tests/outputs/test_roundtrip.py::test_dot_renders_with_graphviz",  # Graphviz
]


def _pytest(tmp_path: Path, *, ci: bool) -> tuple[subprocess.CompletedProcess, dict[str, str]]:
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "PYTEST_ADDOPTS")}
    env["ATPDSL_TEST_HIDE_FIXTURES"] = "stories260K,graphviz"
    if ci:
        env["CI"] = "true"
    report = tmp_path / f"junit-{ci}.xml"
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-ra", "-p", "no:cacheprovider",
                           f"--junitxml={report}", *TARGETS], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    outcomes = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        kinds = [child.tag for child in case if child.tag in ("skipped", "failure", "error")]
        outcomes[f"{case.get('name')}"] = kinds[0] if kinds else "passed"
    return done, outcomes


def test_missing_fixtures_skip_their_tests_with_one_line(tmp_path):
    done, outcomes = _pytest(tmp_path, ci=False)
    assert done.returncode == 0, done.stdout[-3000:]
    assert outcomes["test_example_compiles[induction.atp]"] == "passed"
    assert outcomes["test_example_compiles[pronoun-jsonl.atp]"] == "skipped"
    assert outcomes["test_check_ok"] == "skipped"
    assert outcomes["test_check_missing_file_is_exit_1"] == "passed"
    assert {v for k, v in outcomes.items() if k.startswith("test_dot_renders")} == {"skipped"}
    skipped = [line for line in done.stdout.splitlines() if line.startswith("SKIPPED")]
    assert len(skipped) == 1, skipped
    n = sum(1 for v in outcomes.values() if v == "skipped")
    line = skipped[0]
    assert line.startswith(f"SKIPPED [{n}] tests/conftest.py:")
    assert "missing test fixtures" in line and "CI=true makes a missing fixture a failure" in line
    stories = sum(1 for k, v in outcomes.items() if v == "skipped" and not k.startswith("test_dot"))
    assert f"graphviz for {n - stories} test(s)" in line and f"stories260K for {stories} test(s)" in line
    assert "install Graphviz" in line and "beside the checkout" in line


def test_under_ci_a_missing_fixture_is_a_failure(tmp_path):
    done, outcomes = _pytest(tmp_path, ci=True)
    assert done.returncode != 0
    assert outcomes["test_example_compiles[induction.atp]"] == "passed"
    assert outcomes["test_example_compiles[pronoun-jsonl.atp]"] == "error"
    assert outcomes["test_check_ok"] == "error"
    assert "skipped" not in outcomes.values()
    assert "CI=true and the test fixture(s) stories260K are missing" in done.stdout


def _scope(source: str) -> dict:
    scope: dict = {"__name__": "fake_test_module"}
    exec(compile(source, "fake_test_module.py", "exec"), scope)
    return scope


@pytest.mark.parametrize("source, expected", [
    ("def test_a():\n    return STORIES / 'config.json'\n", {"stories260K"}),
    ("def helper():\n    return stories_pairs(3)\n\ndef test_a():\n    return helper()\n", {"stories260K"}),
    ("P = '../sha' 'red/models'\n\ndef test_a():\n    return P\n", {"stories260K"}),
    ("def test_a():\n    return [PRONOUN for _ in range(2)]\n", {"stories260K"}),
    ("def test_a():\n    return '../cache/' 'smollm2'\n", {"smollm2"}),
    ("def test_a():\n    '''See ../sha''' '''red/models (only a docstring).'''\n    return 1\n", set()),
    ("def test_a():\n    return 'shared gradient terms'\n", set()),
    ("import os\n\ndef test_a():\n    return os.path.join('a', 'b')\n", set()),
])
def test_what_puts_a_test_in_a_tier(source, expected):
    scope = _scope(source)
    assert conftest._signals(scope["test_a"].__code__, scope, set()) == expected


def test_explicit_entries_name_existing_tests():
    for node_id in conftest.EXPLICIT:
        path, name = node_id.split("::")
        assert re.search(rf"^def {re.escape(name)}\(", (ROOT / path).read_text(), flags=re.M), node_id


def test_ci_runs_with_ci_true():
    script = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^export .*\bCI=true\b", script, flags=re.M)
    assert script.index("CI=true") < script.index("make test")


@pytest.mark.parametrize("text, tier", [
    ("../shared/models/stories260K", True), ("/home/u/shared", True), ("shared", True),
    ("/tmp/noshared/atpdsl/tests", False), ("/data/myshared/x.atp", False), ("sharedness/", False),
    (conftest._CHECKOUT + "shared/inside-the-checkout.txt", False),
])
def test_only_a_folder_named_shared_outside_the_checkout_is_a_signal(text, tier):
    """A checkout under a folder whose name merely contains `shared` (or a path inside the checkout) puts no test
    in the stories260K tier: such a clone once skipped 267 tests instead of 95."""
    assert ("stories260K" in conftest._text_signals(text)) is tier
