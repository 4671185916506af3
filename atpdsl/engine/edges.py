"""Edge attribution (EAP, Syed et al. 2023): how much each upstream node's write reaches the metric through each
downstream node's own input.

Definition (one prompt pair, clean run, the plan's metric M):

    edge(u -> v) = (write_u(x_corrupt) - write_u(x_clean)) . dM/d(v's own input)

`write_u` is what u adds to the residual stream: a head's z slice times its slice of the output projection, a
neuron's activation times its down-projection column, an attention or MLP block's output, the embedding output
(`embed`), the whole residual after a layer (`resid`). v's own input (atpdsl.engine.edge_targets) is, per target:

- a head: its own query, key and value inputs, each a separate edge (`EdgeScore.channel` "q", "k", "v") and
  their sum the head's edge. The gradient at each is the head's share of the q / k / v projection's output
  gradient (atpdsl.engine.edge_attention), taken back through the projection's rows and the block's input norm;
  a per-position head `L1.H0@t` reads its query at t and keys and values at every position up to t, through its
  own query t only, so edges into its key and value come from earlier positions too;
- a neuron: its own rows of the MLP's input projections (gate and up rows of a gated MLP);
- a query, key or value node: its projection columns; `attn`, `mlp`, `logits`: the block's input norm
  (attn at one position: its heads there); `L{m}.resid`: every later block's input (the full gradient there).

The skip path is never a target's input: every gradient is taken through the block's branch. The products are
position by position and summed. Summed over every head and input of one attention block (or every neuron of
one MLP) the rows give back the block's branch gradient, so a node's out-edges into all heads, neurons and
`logits` add up to its node AtP estimate (tests/engine/test_edges*.py, to 1e-5, on GPT-2, parallel GPT-NeoX
and grouped-query Llama).

Queries, keys and values write nothing to the residual stream: each has one out-edge, to its own head (or each
head of its KV group), weighted by its share through that head (through its query only for a per-position head),
or to its layer's `attn` when none of those heads is a target; these shares add up to its node AtP estimate.

Order: an edge runs from u to v only when u writes at or before the point v reads (`read_point`): attention then
MLP in a sequential layer; in a parallel-residual layer (GPT-NeoX) attention and MLP read the same point, so
there is no edge between them. Positions: a per-position source reaches a per-position target at the same
position, and also at a later one through that target's keys and values (a head, or `attn`); a summed node and a
per-position one pair at the per-position node's place.

Edge weight = mean over pairs of the per-pair edge score (signed, the node estimates' convention); with
integrated gradients (atpdsl.engine.edge_ig, EAP-IG of Hanna et al. 2024) the gradient is averaged over steps
between the clean and the corrupt input. With `method atp* { qk_fix on  norm_fix on }` the QK fix and the norm fix
carry over to edges (atpdsl.engine.edge_fixes); GradDrop does not.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from atpdsl.circuit.scores import EdgeScore
from atpdsl.errors import EngineError
from atpdsl.names import NodeId, NodeKind
from atpdsl.plan import NodeGroup
from atpdsl.engine.load import Loaded

__all__ = ["Reader", "TargetRow", "EdgeMatrix", "weighted_edges", "readers", "reader_index", "write_matrix",
           "write_point", "read_point", "node_groups", "target_rows", "linked", "link_matrix", "reach", "ATTN_SIDE_KINDS", "QKV",
           "EMBED_NODE", "LOGITS_NODE", "CHANNELS", "qkv_heads", "wide"]

ATTN_SIDE_KINDS = (NodeKind.HEAD, NodeKind.QUERY, NodeKind.KEY, NodeKind.VALUE, NodeKind.ATTN)
_MLP_SIDE = (NodeKind.NEURON, NodeKind.MLP)
QKV = (NodeKind.QUERY, NodeKind.KEY, NodeKind.VALUE)
CHANNELS = ("q", "k", "v")
_CHANNEL_OF = {NodeKind.QUERY: "q", NodeKind.KEY: "k", NodeKind.VALUE: "v"}
EMBED_NODE = NodeId(-1, NodeKind.EMBED)
LOGITS_NODE = NodeId(10**6, NodeKind.LOGITS)


@dataclass(frozen=True, slots=True)
class Reader:
    """A block that reads the residual stream: `L{m}.attn-in`, `L{m}.mlp-in` or `logits`.

    `point` is the residual point it reads (2m before layer m's attention, 2m+1 after it; 2L at the end);
    `module` is its input norm.
    """

    name: str
    module: str
    layer: int
    point: int


def readers(loaded: Loaded) -> list[Reader]:
    """Every reader block of the model in forward order (EngineError for an architecture without norms listed)."""
    arch = loaded.arch
    if not (arch.attn_norm and arch.mlp_norm):
        raise EngineError(f"edge attribution does not know the block input norms of {arch.name} models "
                          f"(add attn_norm and mlp_norm to its entry in atpdsl/arch.py)")
    norms = (arch.attn_norm, arch.mlp_norm)
    parallel = loaded.parallel
    n = loaded.geom.n_layers
    out = []
    for m in range(n):
        out.append(Reader(f"L{m}.attn-in", norms[0].format(layer=m), m, 2 * m))
        out.append(Reader(f"L{m}.mlp-in", norms[1].format(layer=m), m, 2 * m if parallel else 2 * m + 1))
    out.append(Reader("logits", loaded.arch.final_norm, n, 2 * n))
    return out


def reader_index(blocks: Sequence[Reader], node: NodeId) -> int:
    """The reader block whose input norm a node reads through (attention side, MLP side, or the final norm)."""
    if node.kind is NodeKind.LOGITS:
        return len(blocks) - 1
    side = "attn-in" if node.kind in ATTN_SIDE_KINDS else "mlp-in"
    return 2 * node.layer + (0 if side == "attn-in" else 1)


def write_point(kind: NodeKind | str, layer: int, parallel: bool) -> int:
    """The residual point a node of `kind` in `layer` writes at (q/k/v: their attention's)."""
    kind = NodeKind(kind)
    if kind is NodeKind.EMBED:
        return 0
    if kind in ATTN_SIDE_KINDS:
        return 2 * layer + (2 if parallel else 1)
    return 2 * layer + 2


def read_point(node: NodeId, parallel: bool) -> int:
    """The residual point a target reads (`resid`: the point after its layer; `logits`: after everything)."""
    if node.kind is NodeKind.LOGITS:
        return 10**9
    if node.kind in ATTN_SIDE_KINDS:
        return 2 * node.layer
    if node.kind in _MLP_SIDE:
        return 2 * node.layer + (0 if parallel else 1)
    return 2 * node.layer + 2


@dataclass(frozen=True, slots=True)
class TargetRow:
    """One target input: a node, and for a head one of its inputs ("q", "k", "v"); "" = the node's whole input."""

    node: NodeId
    channel: str = ""


def target_rows(nodes: Iterable[NodeId]) -> list[TargetRow]:
    """The rows of the targets among `nodes` (in order) and `logits`: three per head, one per other node."""
    out = []
    for n in nodes:
        if n.kind is NodeKind.EMBED or n.kind is NodeKind.LOGITS:
            continue
        out.extend(TargetRow(n, c) for c in CHANNELS) if n.kind is NodeKind.HEAD else out.append(TargetRow(n))
    out.append(TargetRow(LOGITS_NODE))
    return out


def reach(row: TargetRow) -> str:
    """Which positions a per-position target reads: "local" (its own) or "upto" (its own and every earlier one,
    through keys and values)."""
    node = row.node
    if node.kind is NodeKind.ATTN or (node.kind is NodeKind.HEAD and row.channel in ("k", "v")):
        return "upto"
    return "local"


def qkv_heads(source: NodeId, group_size: int) -> tuple[int, ...]:
    """The heads a query, key or value node feeds (a KV group feeds each head of its group)."""
    if source.grouped:
        return tuple(range(source.index * group_size, (source.index + 1) * group_size))
    return (source.index,)


def linked(source: NodeId, row: TargetRow, parallel: bool, group_size: int, heads: frozenset[tuple[int, int]]
           ) -> bool:
    """Whether an edge from `source` into `row` can exist, positions aside (see the module docstring).

    `heads`: (layer, head) of every head among the targets (a q/k/v source feeds `attn` only without them)."""
    t = row.node
    if t == source:
        return False
    if source.kind in QKV:
        if t.layer != source.layer:
            return False
        own = qkv_heads(source, group_size)
        if t.kind is NodeKind.HEAD:
            return row.channel == _CHANNEL_OF[source.kind] and t.index in own
        return t.kind is NodeKind.ATTN and not any((t.layer, h) in heads for h in own)
    w = write_point(source.kind, source.layer, parallel)
    if t.kind is NodeKind.RESID:
        return w <= 2 * t.layer + 2 and (source.kind is not NodeKind.RESID or source.layer < t.layer)
    return read_point(t, parallel) >= w


def link_matrix(sources: Sequence[NodeId], rows: Sequence[TargetRow], parallel: bool, group_size: int
                ) -> torch.Tensor:
    """bool [len(sources), len(rows)]: `linked` for every pair (vectorised for sources that write)."""
    heads = frozenset((r.node.layer, r.node.index) for r in rows if r.node.kind is NodeKind.HEAD)
    writes = torch.tensor([write_point(s.kind, s.layer, parallel) if s.kind not in QKV else 0 for s in sources])
    is_resid = torch.tensor([r.node.kind is NodeKind.RESID for r in rows])
    reads = torch.tensor([2 * r.node.layer + 2 if r.node.kind is NodeKind.RESID else min(read_point(r.node, parallel),
                          2**31 - 1) for r in rows])
    out = writes[:, None] <= reads[None, :]
    src_resid = [i for i, s in enumerate(sources) if s.kind is NodeKind.RESID]
    if src_resid:
        layers_s = torch.tensor([sources[i].layer for i in src_resid])
        layers_t = torch.tensor([r.node.layer for r in rows])
        out[src_resid] &= ~is_resid[None, :] | (layers_s[:, None] < layers_t[None, :])
    index = {(r.node, r.channel): j for j, r in enumerate(rows)}
    for i, s in enumerate(sources):
        if (s, "") in index:
            out[i, index[(s, "")]] = False
        if s.kind in QKV:
            out[i] = torch.tensor([linked(s, r, parallel, group_size, heads) for r in rows], dtype=torch.bool)
    return out


def node_groups(nodes: Sequence[NodeId]) -> tuple[NodeGroup, ...]:
    """Node groups that cover exactly the requested (layer, kind, units), per position or summed."""
    wanted: dict[tuple[int, str, bool], set[int]] = {}
    for n in nodes:
        if n.kind in (NodeKind.EMBED, NodeKind.LOGITS):
            continue
        units = wanted.setdefault((n.layer, n.kind.value, n.position is not None), set())
        if n.index is not None:
            units.add(n.index)
    groups = []
    for (layer, kind, per_position), units in sorted(wanted.items()):
        heads = tuple(sorted(units)) if kind not in ("attn", "mlp", "resid") else None
        groups.append(NodeGroup(kind, (layer, layer), heads, per_position))
    return tuple(groups)


def write_matrix(module: torch.nn.Module, cols: torch.Tensor) -> torch.Tensor:
    """[d_model, k]: a linear output projection restricted to its input columns `cols`. It maps a change at those
    inputs to the write into the residual stream, and (transposed) the gradient at the output back to them."""
    weight = module.weight
    if isinstance(module, torch.nn.Linear):
        return wide(weight[:, cols])
    if type(module).__name__ == "Conv1D":  # GPT-2: y = x @ W + b, W [in, out]
        return wide(weight[cols, :].T)
    raise EngineError(f"edge attribution: cannot project through {type(module).__name__} (expected a linear layer)")


def wide(x: torch.Tensor) -> torch.Tensor:
    """At least float32 (half and bfloat16 values are upcast; float64 stays)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


@dataclass(frozen=True)
class EdgeMatrix:
    """Edge scores of every source against every target row.

    `sources`: `embed` then the requested nodes (table order); `rows`: the targets' rows (`target_rows`).
    `total` [n_sources, n_rows]: the per-pair scores summed over the `n_pairs` pairs; `linked` (bool, same shape):
    which edges exist (order and positions; see the module docstring). `per_pair` [n_pairs, n_sources, n_rows]
    and `blocks` [n_pairs, n_sources, n_readers] (each source's products with every reader block's branch
    gradient, 0 before its write) are kept only when asked for (tests and studies).
    """

    sources: tuple[NodeId, ...]
    rows: tuple[TargetRow, ...]
    total: torch.Tensor
    linked: torch.Tensor
    n_pairs: int
    readers: tuple[Reader, ...] = ()
    per_pair: torch.Tensor | None = None
    blocks: torch.Tensor | None = None
    ig_steps: int = 0

    @property
    def mean(self) -> torch.Tensor:
        """[n_sources, n_rows]: the mean score over pairs (0 where no edge exists)."""
        return (self.total / max(self.n_pairs, 1)) * self.linked

    def totals(self) -> torch.Tensor:
        """[n_pairs, n_sources]: each source's products summed over every reader block (= its node AtP)."""
        if self.blocks is None:
            raise EngineError("internal: the edge matrix was built without reader-block products")
        return self.blocks.sum(-1)


def weighted_edges(m: EdgeMatrix) -> list[EdgeScore]:
    """EdgeScores of every existing edge: into a head its q / k / v parts (from a residual-writing source) and
    their sum, into any other target one whole edge."""
    targets: list[NodeId] = []
    column = []  # row -> its target's index
    for row in m.rows:
        if not targets or targets[-1] != row.node:
            targets.append(row.node)
        column.append(len(targets) - 1)
    pick = torch.zeros((len(m.rows), len(targets)), dtype=torch.float64)
    pick[torch.arange(len(m.rows)), torch.tensor(column)] = 1.0
    whole = ((m.mean * m.linked) @ pick).tolist()  # [U, targets]: the sum of each target's rows
    exists = (m.linked.double() @ pick > 0).tolist()
    mean, linked_ = m.mean.tolist(), m.linked.tolist()
    parts = [[j for j, c in enumerate(column) if c == t] if targets[t].kind is NodeKind.HEAD else []
             for t in range(len(targets))]
    names = [t.name for t in targets]
    channels = [r.channel for r in m.rows]
    out: list[EdgeScore] = []
    add = out.append
    for si, s in enumerate(m.sources):
        name, split, weights, links, sums = s.name, s.kind not in QKV, mean[si], linked_[si], whole[si]
        for t, there in enumerate(exists[si]):
            if not there:
                continue
            if split:
                for j in parts[t]:
                    if links[j]:
                        add(EdgeScore(name, names[t], weights[j], None, channels[j]))
            add(EdgeScore(name, names[t], sums[t]))
    return out
