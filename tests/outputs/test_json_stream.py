"""The JSON result is written one score row at a time: the text is what the standard library writes for the whole
document (NaN as null, its place listed), and no more than a row's record is made ahead of the text written."""
from __future__ import annotations

import io
import json
import math

import numpy as np

from atpdsl.arch import arch_for_config, geometry
from atpdsl.circuit.graph import build_graph
from atpdsl.circuit.scored_nodes import NodeColumns, ScoredNodes
from atpdsl.circuit.scores import RunResult
from atpdsl.circuit.select import select
from atpdsl.engine.node_table import build_table
from atpdsl.names import NodeId
from atpdsl.outputs.jsonio import document, dumps, read_result, write_json
from atpdsl.outputs.result import Result
from atpdsl.plan import NodeGroup, Selection

GQA = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "num_hidden_layers": 3,
       "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 96, "vocab_size": 100}


def _result(groups, positions=None, made: list[int] | None = None, nan_last: int = 0) -> Result:
    """A result with random scores; the `nan_last` lowest-ranked nodes' second per-pair value is NaN."""
    table = build_table(arch_for_config(GQA), geometry(GQA), groups, positions)
    rng = np.random.default_rng(1)
    score = rng.random(table.size)
    estimate = -score
    per_pair = rng.normal(size=(2, table.size))
    order = np.argsort(-score, kind="stable")
    per_pair[1, order[len(order) - nan_last:]] = math.nan

    def node(column: int) -> NodeId:
        if made is not None:
            made.append(column)
        return table.node(column)

    cols = NodeColumns(estimate, score, "atp", node, table.attrs, table.column_of, per_pair=per_pair,
                       per_pair_score=np.abs(per_pair))
    result = RunResult("m", "h", "atp", "logit_diff", ScoredNodes(cols, order), 2, 1.0, 0.0,
                       provenance=(("n_layers", 3),), extras={"gap": [1.0, math.inf]})
    outcome = select(result, Selection("top", 5))
    return Result(None, result, build_graph(result, outcome), outcome)


def _reference(doc, where: str, found: list[str]):
    """NaN and infinities as None, their places listed: written here independently of the writer."""
    if isinstance(doc, float) and not math.isfinite(doc):
        found.append(where)
        return None
    if isinstance(doc, dict):
        return {k: _reference(v, f"{where}.{k}", found) for k, v in doc.items()}
    if isinstance(doc, (list, tuple)):
        return [_reference(v, f"{where}[{i}]", found) for i, v in enumerate(doc)]
    return doc


def test_streamed_text_is_the_standard_librarys_text_of_the_whole_document(tmp_path):
    res = _result((NodeGroup("heads"), NodeGroup("mlp")), nan_last=2)
    found: list[str] = []
    whole = _reference(json.loads(json.dumps(document(res), default=str)), "$", found)
    whole["non_finite"] = found
    text = dumps(res)
    assert text == json.dumps(whole, indent=1, allow_nan=False)
    last = len(res.result.nodes) - 1
    assert found == [f"$.scores.rows[{i}].{column}[1]" for i in (last - 1, last)
                     for column in ("per_pair", "per_pair_score")] + ["$.extras.gap[1]"]
    write_json(res, tmp_path / "r.json")
    assert (tmp_path / "r.json").read_text(encoding="utf-8") == text
    back, _ = read_result(tmp_path / "r.json")
    assert [n.name for n in back.nodes] == [n.name for n in res.result.nodes]
    assert all(math.isnan(n.per_pair[1]) for n in back.nodes[-2:]) and math.isfinite(back.nodes[0].per_pair[1])


class _Sink(io.StringIO):
    """Records, at each write once rows are being written, how many node records were made beyond the rows
    written so far."""

    def __init__(self, made: list[int]) -> None:
        super().__init__()
        self.made, self.rows, self.ahead = made, 0, []

    def write(self, text: str) -> int:
        self.rows += text.startswith('{\n    "node": ')  # a score row (at its depth in the document)
        if self.rows:
            self.ahead.append(len(self.made) - self.rows)
        return super().write(text)


def test_rows_are_written_as_they_are_made():
    made: list[int] = []
    res = _result((NodeGroup("neurons", per_position=True),), ("named", list(range(100))), made)
    assert res.result.n_pairs == 2 and len(res.result.nodes) == 3 * 96 * 100
    before = len(made)  # the selection and the graph read the few nodes they show
    sink = _Sink(made)
    write_json(res, sink)
    doc = json.loads(sink.getvalue())
    assert len(doc["scores"]["rows"]) == len(res.result.nodes)
    assert len(made) - before >= len(res.result.nodes)  # every row was made ...
    assert max(sink.ahead) - min(sink.ahead) <= 2, (min(sink.ahead), max(sink.ahead))  # ... as it was written
