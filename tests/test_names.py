"""Node names: every kind formats to the documented short name and parses back to the same NodeId."""
import pytest
from hypothesis import given, strategies as st

from atpdsl.names import NodeId, NodeKind, NodeNameError, format_node, parse_node

CASES = [
    (NodeId(3, NodeKind.HEAD, 5), "L3.H5"),
    (NodeId(3, NodeKind.QUERY, 5), "L3.H5.q"),
    (NodeId(3, NodeKind.KEY, 5), "L3.H5.k"),
    (NodeId(3, NodeKind.VALUE, 5, 7), "L3.H5.v@7"),
    (NodeId(3, NodeKind.KEY, 1, None, True), "L3.G1.k"),
    (NodeId(3, NodeKind.VALUE, 1, -1, True), "L3.G1.v@-1"),
    (NodeId(3, NodeKind.NEURON, 117), "L3.N117"),
    (NodeId(0, NodeKind.NEURON, 2, "name"), "L0.N2@name"),
    (NodeId(2, NodeKind.ATTN), "L2.attn"),
    (NodeId(2, NodeKind.MLP, None, 4), "L2.mlp@4"),
    (NodeId(4, NodeKind.RESID), "L4.resid"),
]


@pytest.mark.parametrize("node,name", CASES)
def test_format_and_parse_round_trip(node, name):
    assert format_node(node) == name
    assert node.name == name
    assert parse_node(name) == node


@pytest.mark.parametrize("bad", ["", "L3", "H5", "L3.G1", "L3.G1.q", "L3.X5", "L3.H5.z", "L3.H5@", "L-1.H2", "L3.H5@1x"])
def test_bad_names_raise_node_name_error(bad):
    with pytest.raises(NodeNameError):
        parse_node(bad)


def test_endpoints_parse():
    assert parse_node("embed").kind is NodeKind.EMBED
    assert parse_node("logits").kind is NodeKind.LOGITS


kinds = st.sampled_from([k for k in NodeKind if k not in (NodeKind.EMBED, NodeKind.LOGITS)])
positions = st.one_of(st.none(), st.integers(-50, 500), st.from_regex(r"[a-z_][a-z0-9_]{0,8}", fullmatch=True))


@given(layer=st.integers(0, 200), kind=kinds, index=st.integers(0, 10_000), position=positions, grouped=st.booleans())
def test_any_node_round_trips(layer, kind, index, position, grouped):
    whole = kind in (NodeKind.ATTN, NodeKind.MLP, NodeKind.RESID)
    node = NodeId(layer, kind, None if whole else index, position,
                  grouped and kind in (NodeKind.KEY, NodeKind.VALUE))
    assert parse_node(format_node(node)) == node
