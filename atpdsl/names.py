"""Node identities and their stable short names (`L3.H5`, `L3.G1.k@7`): one formatter, one parser."""
from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

__all__ = ["NodeKind", "NodeId", "format_node", "parse_node", "NodeNameError"]


class NodeKind(str, Enum):
    """What a node is. The value is the word users write in a `nodes { ... }` block."""

    HEAD = "heads"
    """Per-head attention output: the input of the output projection, one head's slice."""
    QUERY = "queries"
    """Query vector of one head (post-rotary where the model rotates)."""
    KEY = "keys"
    """Key vector of one head, or of one KV group under grouped-query attention."""
    VALUE = "values"
    """Value vector of one head, or of one KV group under grouped-query attention."""
    NEURON = "neurons"
    """One MLP neuron after its nonlinearity: the input of the down projection."""
    ATTN = "attn"
    """The whole attention block's write to the residual stream."""
    MLP = "mlp"
    """The whole MLP block's write to the residual stream."""
    RESID = "resid"
    """The residual stream after a layer."""
    EMBED = "embed"
    """Graph endpoint: the token embeddings."""
    LOGITS = "logits"
    """Graph endpoint: the output logits."""


_QKV_SUFFIX = {NodeKind.QUERY: "q", NodeKind.KEY: "k", NodeKind.VALUE: "v"}
_SUFFIX_QKV = {v: k for k, v in _QKV_SUFFIX.items()}
_WHOLE = {NodeKind.ATTN: "attn", NodeKind.MLP: "mlp", NodeKind.RESID: "resid"}
_WHOLE_BACK = {v: k for k, v in _WHOLE.items()}


class NodeNameError(ValueError):
    """A string that is not a node name."""


@dataclass(frozen=True, slots=True, order=True)
class NodeId:
    """One scored component.

    `index` is the head (or KV group when `grouped`), or the neuron; None for whole-block nodes.
    `position` is None when summed over positions, an int token index (negative counts from the
    end of the prompt, as `@-1`), or the name of a template slot.
    """

    layer: int
    kind: NodeKind
    index: int | None = None
    position: int | str | None = None
    grouped: bool = False

    @property
    def name(self) -> str:
        """The stable short name, e.g. `L3.H5.q@7`."""
        return format_node(self)

    def summed(self) -> "NodeId":
        """The same node with positions summed."""
        return NodeId(self.layer, self.kind, self.index, None, self.grouped)

    def __str__(self) -> str:
        return self.name


def format_node(node: NodeId) -> str:
    """Format a node as its short name; the inverse of `parse_node`."""
    kind = node.kind
    if kind is NodeKind.EMBED or kind is NodeKind.LOGITS:
        base = kind.value
    elif kind is NodeKind.HEAD:
        base = f"L{node.layer}.H{node.index}"
    elif kind in _QKV_SUFFIX:
        unit = "G" if node.grouped else "H"
        base = f"L{node.layer}.{unit}{node.index}.{_QKV_SUFFIX[kind]}"
    elif kind is NodeKind.NEURON:
        base = f"L{node.layer}.N{node.index}"
    else:
        base = f"L{node.layer}.{_WHOLE[kind]}"
    if node.position is None:
        return base
    return f"{base}@{node.position}"


_NAME = re.compile(
    r"^(?:(?P<end>embed|logits)"
    r"|L(?P<layer>\d+)\.(?:(?P<unit>[HG])(?P<head>\d+)(?:\.(?P<qkv>[qkv]))?"
    r"|N(?P<neuron>\d+)|(?P<whole>attn|mlp|resid)))"
    r"(?:@(?P<pos>-?\d+|[A-Za-z_][A-Za-z0-9_]*))?$"
)


def parse_node(text: str) -> NodeId:
    """Parse a short node name such as `L3.H5`, `L2.G1.k@-1` or `L0.N17@name`."""
    m = _NAME.match(text.strip())
    if m is None:
        raise NodeNameError(f"not a node name: {text!r} (expected e.g. L3.H5, L3.H5.q@7, L3.N117, L3.mlp)")
    pos_text = m.group("pos")
    position: int | str | None
    if pos_text is None:
        position = None
    elif pos_text.lstrip("-").isdigit():
        position = int(pos_text)
    else:
        position = pos_text
    if m.group("end"):
        kind = NodeKind(m.group("end"))
        return NodeId(-1 if kind is NodeKind.EMBED else 10**6, kind, None, position)
    layer = int(m.group("layer"))
    if m.group("unit"):
        index = int(m.group("head"))
        qkv = m.group("qkv")
        if qkv is None:
            if m.group("unit") == "G":
                raise NodeNameError(f"not a node name: {text!r} (a KV group G names keys or values: .k or .v)")
            return NodeId(layer, NodeKind.HEAD, index, position)
        grouped = m.group("unit") == "G"
        if grouped and qkv == "q":
            raise NodeNameError(f"not a node name: {text!r} (queries belong to heads, not KV groups)")
        return NodeId(layer, _SUFFIX_QKV[qkv], index, position, grouped)
    if m.group("neuron"):
        return NodeId(layer, NodeKind.NEURON, int(m.group("neuron")), position)
    return NodeId(layer, _WHOLE_BACK[m.group("whole")], None, position)
