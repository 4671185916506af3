"""The registry of names users type, and the language reference that documents them (atpdsl/registry.py)."""
import math
import re

import pytest

from atpdsl import registry as r
from atpdsl.names import NodeKind


def test_node_kinds_match_the_names_contract():
    scorable = {k.value for k in NodeKind} - set(r.ENDPOINT_KINDS)
    assert set(r.NODE_KINDS) == scorable


@pytest.mark.parametrize("bound, good, bad, text", [
    (r.BATCH, [1, 512, 10**9], [0, -1, 2.0, 10**9 + 1, 10**400], "a positive integer"),
    (r.SEED, [0, 2**32 - 1], [-1, 2**32, 10**400, 1.5], "an integer from 0 to 4294967295"),
    (r.DIAGNOSE_SETTINGS["confidence"].bound, [0.5, 0.99], [0, 1, 1.5, math.inf, math.nan], "a number in (0, 1)"),
    (r.SELECT_KINDS["cumulative"].bound, [1, 0.5], [0, 1.01], "a number in (0, 1]"),
    (r.SELECT_KINDS["threshold"].bound, [0, 3.5], [-0.1, math.inf], "a number >= 0"),
])
def test_bounds(bound, good, bad, text):
    assert all(bound.accepts(v) for v in good)
    assert not any(bound.accepts(v) for v in bad)
    assert bound.describe() == text


def test_a_count_past_its_cap_says_the_cap():
    assert r.BATCH.describe(10**400) == "a positive integer (at most 1000000000)"
    assert r.BATCH.describe(0) == "a positive integer"


def test_language_reference_mentions_every_name(project_root):
    doc = (project_root / "docs" / "language.md").read_text()
    names = [*r.STATEMENTS, *r.METRICS, *r.NODE_KINDS, *r.METHODS, *r.AGGREGATES, *r.KEEP_OPTIONS,
             *r.SELECT_KINDS, *r.DIAGNOSE_TARGETS, *r.MODEL_SETTINGS, *r.METHOD_SETTINGS, *r.DIAGNOSE_SETTINGS,
             *r.ARG_FUNCTIONS, *r.ATTENTIONS]
    missing = [x for x in names if not re.search(r"(?<![\w])" + re.escape(x) + r"(?![\w])", doc)]
    assert missing == []
    assert all(f".{ext}" in doc for ext in r.EXPORT_FORMATS)
