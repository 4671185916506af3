"""The same spec, seed and thread count give bit-identical outputs (the JSON apart from its timings section);
one and two threads give the same ranking, selection and bound, and values within 1e-5."""
from __future__ import annotations

import json

import pytest
import torch

import atpdsl

pytestmark = pytest.mark.needs("stories260K")

SPEC = """
model "{model}"
pairs from "{pairs}"
metric logit_diff(answer, wrong) at last
nodes {{ heads ; neurons layers 3..4 }}
method atp* {{ graddrop on }}
batch 4
select top 8
verify top 6
diagnose false_negatives {{ samples 60 inclusion 0.2 }}
"""


def _run(shared_dir, tmp_path, threads: int) -> dict:
    rows = (shared_dir / "data" / "stories260K-pronoun.jsonl").read_text().splitlines()[:8]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("\n".join(rows) + "\n")
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        res = atpdsl.run(text=SPEC.format(model=shared_dir / "models" / "stories260K", pairs=pairs))
    finally:
        torch.set_num_threads(old)
    doc = json.loads(res.to_json())
    doc.pop("timings")
    return doc


def test_same_threads_bit_identical_and_two_threads_agree(shared_dir, tmp_path):
    first, second = _run(shared_dir, tmp_path, 1), _run(shared_dir, tmp_path, 1)
    assert json.dumps(first, sort_keys=True) == json.dumps(second, sort_keys=True)
    two = _run(shared_dir, tmp_path, 2)
    rank_of = lambda doc: [r["node"] for r in doc["scores"]["rows"]]  # noqa: E731
    assert rank_of(two) == rank_of(first)
    assert two["selection"]["selected"] == first["selection"]["selected"]
    assert two["false_negatives"]["status"] == first["false_negatives"]["status"]
    for key in ("estimate", "score", "verified_effect"):
        for a, b in zip(first["scores"]["rows"], two["scores"]["rows"]):
            if a[key] is not None:
                assert abs(a[key] - b[key]) <= 1e-5, (key, a["node"], a[key], b[key])
    bound_a, bound_b = first["false_negatives"]["bound"], two["false_negatives"]["bound"]
    assert (bound_a is None and bound_b is None) or abs(bound_a - bound_b) <= 1e-5 * max(1.0, abs(bound_a))
