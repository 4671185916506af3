"""Scored nodes kept as columns: the node table names its columns from its blocks, and a run's ScoredNodes makes the
same NodeScore records a tuple would hold, without a record per node in memory."""
from __future__ import annotations

import csv
import io

import numpy as np
import pytest

from atpdsl.arch import arch_for_config, geometry
from atpdsl.circuit.scored_nodes import NodeColumns, ScoredNodes
from atpdsl.circuit.scores import NodeScore, RunResult
from atpdsl.circuit.select import ranked, verified_nodes
from atpdsl.engine.node_table import build_table
from atpdsl.names import NodeId, NodeKind, parse_node
from atpdsl.outputs.table import SCORE_COLUMNS, Table, score_rows, write_rows_csv
from atpdsl.plan import NodeGroup

GQA = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "num_hidden_layers": 3,
       "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 96, "vocab_size": 100}
POSITIONS = ("named", [0, 3, "S1", 7])
GROUPS = (NodeGroup("heads"), NodeGroup("keys", per_position=True), NodeGroup("neurons", layers=(1, 2),
          heads=(5, 0, 17)), NodeGroup("mlp"), NodeGroup("values", per_position=True, layers=(2, 2)))


def _expected_names() -> set[str]:
    """Every node the groups ask for, written out by hand from the naming rules (README, node names)."""
    names = {f"L{l}.H{h}" for l in range(3) for h in range(4)} | {f"L{l}.mlp" for l in range(3)}
    names |= {f"L{l}.G{g}.k@{p}" for l in range(3) for g in range(2) for p in POSITIONS[1]}
    names |= {f"L2.G{g}.v@{p}" for g in range(2) for p in POSITIONS[1]}
    names |= {f"L{l}.N{n}" for l in (1, 2) for n in (0, 5, 17)}
    return names


@pytest.fixture(scope="module")
def table():
    return build_table(arch_for_config(GQA), geometry(GQA), GROUPS, POSITIONS)


def test_table_names_every_node_once_and_finds_each_column_back(table):
    names = [n.name for n in table.nodes]
    assert len(names) == table.size == len(set(names)) and set(names) == _expected_names()
    for column in range(table.size):
        node = table.node(column)
        assert table.column_of(node) == column and table.column_of(parse_node(node.name)) == column
        block = table.block_of(column)
        assert block.first <= column < block.first + block.size and node.kind.value == block.kind
    assert table.nodes[-1] == table.node(table.size - 1) and table.nodes[1:3] == [table.node(1), table.node(2)]
    for missing in ("L0.N3", "L0.G0.k@5", "L2.H9", "L0.attn", "L1.G1.v@3"):
        assert table.column_of(parse_node(missing)) is None


def test_key_and_value_groups_carry_their_heads(table):
    attrs = {table.node(c).name: dict(table.attrs(c)) for c in range(table.size)}
    assert attrs["L1.G1.k@S1"]["heads"] == "2,3" and attrs["L2.G0.v@0"]["heads"] == "0,1"
    assert "heads" not in attrs["L0.H2"] and attrs["L0.H2"]["site"].endswith("o_proj.input")
    assert table.node(table.column_of(parse_node("L1.G1.k@S1"))).grouped


def _columns(table, verified=None, pairs: int = 0) -> tuple[NodeColumns, np.ndarray]:
    rng = np.random.default_rng(0)
    n = table.size
    score = np.round(rng.random(n), 1)  # ties on purpose
    score[::5] = 0.0
    estimate = score * np.where(rng.random(n) < 0.5, -1.0, 1.0)
    per_pair = rng.normal(size=(pairs, n)) if pairs else None
    order = np.array(sorted(range(n), key=lambda c: (-score[c], c)))  # the engine's rule: ties in table order
    cols = NodeColumns(estimate=estimate, score=score, method="atp", node=table.node, attrs=table.attrs,
                       column_of=table.column_of, per_pair=per_pair,
                       per_pair_score=None if per_pair is None else np.abs(per_pair), verified=verified)
    return cols, order


def _plain(cols: NodeColumns, order: np.ndarray) -> tuple[NodeScore, ...]:
    """The records written out one by one, as a tuple-holding result would have them."""
    out = []
    for r, c in enumerate(order, start=1):
        ns = NodeScore(cols.node(c), float(cols.estimate[c]), float(cols.score[c]), "atp", r,
                       per_pair=None if cols.per_pair is None else tuple(float(v) for v in cols.per_pair[:, c]),
                       attrs=cols.attrs(c),
                       per_pair_score=None if cols.per_pair is None
                       else tuple(abs(float(v)) for v in cols.per_pair[:, c]))
        if cols.verified and c in cols.verified:
            ns = ns.with_verification(*cols.verified[c])
        out.append(ns)
    return tuple(out)


def test_scored_nodes_equal_the_records_written_out(table):
    cols, order = _columns(table, verified={3: (0.25, (0.2, 0.3)), 11: (-1.0, (-1.0, -1.0))}, pairs=2)
    lazy, plain = ScoredNodes(cols, order), _plain(cols, order)
    assert len(lazy) == len(plain) and lazy == plain and list(lazy) == list(plain)
    assert lazy[0] == plain[0] and lazy[-1] == plain[-1] and lazy[2:9] == list(plain[2:9])
    with pytest.raises(IndexError):
        lazy[len(plain)]
    by_name = RunResult("m", "h", "atp", "logit_diff", lazy, 2, 1.0, 0.0).by_name()
    for node in plain[::7]:
        assert by_name[node.name] == node and node.name in by_name
    assert "L0.N3" not in by_name and by_name.get("not a node") is None
    assert verified_nodes(lazy) == [n for n in plain if n.verified_effect is not None]


def test_ranked_keeps_the_engine_order_and_breaks_ties_by_rank(table):
    cols, order = _columns(table)
    lazy, plain = ScoredNodes(cols, order), _plain(cols, order)
    assert ranked(lazy) is lazy
    assert ranked(list(reversed(plain))) == list(plain)  # ties (equal scores) come back in rank order


def test_scores_csv_streams_the_same_text_the_table_writes(table, tmp_path):
    cols, order = _columns(table, verified={0: (0.5, (0.5,))}, pairs=1)
    result = RunResult("m", "h", "atp", "logit_diff", ScoredNodes(cols, order), 1, 1.0, 0.0)
    picked = [result.nodes[0].name, result.nodes[4].name]
    path = write_rows_csv(tmp_path / "s.csv", SCORE_COLUMNS, score_rows(result, picked), extra={"c": "x"})
    text = Table(SCORE_COLUMNS, score_rows(result, picked)).to_csv(extra={"c": "x"})
    assert path.read_text(encoding="utf-8") == text
    rows = list(csv.DictReader(io.StringIO(text)))
    assert [r["node"] for r in rows] == [n.name for n in result.nodes]
    assert [r["in_circuit"] for r in rows[:5]] == ["true", "false", "false", "false", "true"]


def test_selection_graph_and_summary_read_only_the_nodes_they_show():
    """A run with 150k per-position nodes: selecting, drawing the graph and printing the summary make records only
    for the nodes they show (making every node's record once took a 23.7M-node run from 27 s to 9 minutes and 19 GB)."""
    from rich.console import Console

    from atpdsl.circuit.graph import build_graph
    from atpdsl.circuit.select import select
    from atpdsl.cli.commands import print_summary
    from atpdsl.outputs.result import Result
    from atpdsl.plan import Selection

    positions = ("named", list(range(500)))
    big = build_table(arch_for_config(GQA), geometry(GQA), (NodeGroup("neurons", per_position=True),), positions)
    made = []

    def counted(column: int) -> NodeId:
        made.append(column)
        return big.node(column)

    cols, order = _columns(big)
    cols = NodeColumns(cols.estimate, cols.score, "atp", counted, big.attrs, big.column_of)
    result = RunResult("m", "h", "atp", "logit_diff", ScoredNodes(cols, order), 1, 1.0, 0.0,
                       provenance=(("n_layers", 3),))
    assert big.size == 3 * 96 * 500
    outcome = select(result, Selection("top", 20))
    graph = build_graph(result, outcome)
    out = io.StringIO()
    print_summary(Result(None, result, graph, outcome), Console(file=out, width=120))
    assert len(outcome.selected) == 20 and set(outcome.selected) <= set(graph)
    assert "circuit nodes" in out.getvalue() and outcome.selected[0] in out.getvalue()
    assert len(made) < 500, len(made)
