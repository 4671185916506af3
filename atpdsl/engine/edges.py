"""Edge attribution (EAP): how much each upstream node's write reaches the metric through each downstream reader.

Definition (one prompt pair, clean run, the plan's metric M):

    edge(u -> v) = (write_u(x_corrupt) - write_u(x_clean)) . dM/d(input of v, through v's block only)

`write_u` is what u adds to the residual stream: a head's z slice times its slice of the output projection,
a neuron's activation times its down-projection column, an attention or MLP block's output, the embedding
output (`embed`), the whole residual after a layer (`resid`). The input of v is the residual stream entering
v's block, taken only through that block's branch (its input norm), never through the skip path: the
attention block's input norm for attention-side nodes (heads, queries, keys, values, attn), the MLP block's
input norm for neurons and `mlp`, the final norm for `logits`. These are the "reader blocks"
`L{m}.attn-in`, `L{m}.mlp-in` and `logits`. The branch-only gradient is the norm's output gradient (the output
has one consumer, the block) pulled back through the norm module itself at its clean input.

The residual stream is a sum and position-wise, so the product is taken position by position and summed
(a write at position p reaches later positions only through attention inside a reader block, which the
block's branch gradient at p already carries, to first order), and because the
gradient at a write point is the sum of the branch gradients of every later reader, a node's products over
all later reader blocks add up to its node AtP estimate (`EdgeMatrix.totals`; tests/engine/test_edges.py
checks this to 1e-5 on GPT-2, parallel GPT-NeoX and grouped-query Llama).

Targets get block-level weights: every node reading one block (all heads, queries, keys, values and `attn`
of layer m; all neurons and `mlp` of layer m) shares that block's input gradient, so edges into them carry
the same weight. `L{m}.resid` reads everything downstream of its point: its in-edge weight is the sum over
the reader blocks after layer m (= u's write times the full gradient there). Queries, keys and values write
nothing to the residual stream: each has one out-edge, to its own head (or the heads of its KV group, each
edge carrying the group's whole estimate), or to its layer's `attn` when none of those heads is in the node
set, weighted by its plain AtP estimate.

Order: an edge runs from u to v only when u writes at or before the point v reads (`Reader.point`):
attention then MLP inside a sequential layer; in a parallel-residual layer (GPT-NeoX) the attention and the
MLP read the same point, so there is no edge between them; never from later to earlier. Positions: a
per-position node counts only its own position; between two per-position nodes an edge exists only at the
same position; a summed node pairs with a per-position one at that node's position. A per-position target
gets its block's input gradient at its position (block-level, like every target).

Cost: nothing of its own in the passes. The run's clean forward + backward also reads each reader norm's input
and output gradient (`edge_reads` step, atpdsl.engine.edge_reads); after ranking and selection, the `edges` step
does, per kept batch and source site, one matmul of the stacked reader gradients [2L+1, b, S, d] onto the
selected sources' columns.
Edge weight = mean over pairs of the per-pair edge score (signed, same convention as node estimates).
The weights are plain first-order products: AtP*'s QK fix and GradDrop, and the norm fix, do not apply to edges.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from atpdsl.circuit.graph import EDGE_SEMANTICS
from atpdsl.circuit.scores import EdgeScore
from atpdsl.errors import EngineError
from atpdsl.names import NodeId, NodeKind
from atpdsl.plan import NodeGroup
from atpdsl.engine.load import Loaded

__all__ = ["Reader", "EdgeMatrix", "weighted_edges", "readers", "write_matrix", "write_point", "node_groups",
           "per_position", "EDGE_SEMANTICS", "ATTN_SIDE", "QKV", "EMBED"]

ATTN_SIDE = (NodeKind.HEAD, NodeKind.QUERY, NodeKind.KEY, NodeKind.VALUE, NodeKind.ATTN)
_MLP_SIDE = (NodeKind.NEURON, NodeKind.MLP)
QKV = (NodeKind.QUERY, NodeKind.KEY, NodeKind.VALUE)
EMBED = NodeId(-1, NodeKind.EMBED)
_STAGE_ATTN_IN, _STAGE_MLP_IN = 5, 40  # between the arch.STAGES of the layer's sites


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


def write_point(kind: NodeKind | str, layer: int, parallel: bool) -> int:
    """The residual point a node of `kind` in `layer` writes at (q/k/v: their attention's)."""
    kind = NodeKind(kind)
    if kind is NodeKind.EMBED:
        return 0
    if kind in ATTN_SIDE:
        return 2 * layer + (2 if parallel else 1)
    return 2 * layer + 2


def _write_point(node: NodeId, parallel: bool) -> int:
    return write_point(node.kind, node.layer, parallel)


def _read_point(node: NodeId, parallel: bool) -> int:
    if node.kind is NodeKind.LOGITS:
        return 10**9  # after everything
    if node.kind in ATTN_SIDE:
        return 2 * node.layer
    if node.kind in _MLP_SIDE:
        return 2 * node.layer + (0 if parallel else 1)
    return 2 * node.layer + 2  # resid


@dataclass(frozen=True)
class EdgeMatrix:
    """Per-pair products of every source's write with every reader block's branch gradient.

    `sources`: `embed` then the requested nodes (table order). `per_pair` [n_pairs, n_sources, n_readers]:
    summed over the source's positions (its own when per position), 0 where the reader is not after the
    source and for q/k/v (no residual write). `at` [n_sources, n_readers, P]: the mean over pairs at each
    per-position node position (None without per-position nodes). `qkv` [n_pairs, n_sources]: plain AtP
    estimates of the q/k/v sources (0 elsewhere).
    """

    sources: tuple[NodeId, ...]
    readers: tuple[Reader, ...]
    per_pair: torch.Tensor
    qkv: torch.Tensor
    at: torch.Tensor | None
    positions: tuple[int | str, ...]
    parallel: bool
    group_size: int
    seconds: float = 0.0

    @property
    def mean(self) -> torch.Tensor:
        """[n_sources, n_readers]: mean over pairs."""
        return self.per_pair.mean(0)

    def totals(self) -> torch.Tensor:
        """[n_pairs, n_sources]: each source's products summed over every reader block (= its node AtP)."""
        return self.per_pair.sum(-1)


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
        return _f(weight[:, cols])
    if type(module).__name__ == "Conv1D":  # GPT-2: y = x @ W + b, W [in, out]
        return _f(weight[cols, :].T)
    raise EngineError(f"edge attribution: cannot project through {type(module).__name__} (expected a linear layer)")


def _f(x: torch.Tensor) -> torch.Tensor:
    """At least float32 (half and bfloat16 values are upcast; float64 stays)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def per_position(vals: torch.Tensor, node_pos: torch.Tensor | None) -> torch.Tensor | None:
    """[R, b, S, u] -> [R, b, P, u] at the batch's node positions."""
    if node_pos is None:
        return None
    R, b, _, u = vals.shape
    idx = node_pos.view(1, b, -1, 1).expand(R, b, node_pos.shape[1], u)
    return vals.gather(2, idx)


def _reads_of(m: EdgeMatrix, target: NodeId) -> list[int]:
    """The reader blocks whose products make up an edge into `target`."""
    names = [r.name for r in m.readers]
    if target.kind is NodeKind.LOGITS:
        return [names.index("logits")]
    if target.kind in ATTN_SIDE:
        return [names.index(f"L{target.layer}.attn-in")]
    if target.kind in _MLP_SIDE:
        return [names.index(f"L{target.layer}.mlp-in")]
    return [i for i, r in enumerate(m.readers) if r.point >= 2 * target.layer + 2]  # resid: all downstream


def _qkv_heads(source: NodeId, group_size: int) -> tuple[int, ...]:
    if source.grouped:
        return tuple(range(source.index * group_size, (source.index + 1) * group_size))
    return (source.index,)


def _same_place(a: NodeId, b: NodeId) -> bool:
    return a.position is None or b.position is None or a.position == b.position


def weighted_edges(m: EdgeMatrix, targets: Sequence[NodeId]) -> list[EdgeScore]:
    """EdgeScores between the matrix's sources and `targets` (+ logits), by the rules of the module docstring."""
    logits = NodeId(10**6, NodeKind.LOGITS)
    wanted = set(targets)
    tgts = [t for t in m.sources if t in wanted] + [logits]  # table (forward) order
    # reader blocks making up each target's input: one matmul gives every (source, target) weight
    pick = torch.zeros((len(m.readers), len(tgts)), dtype=torch.float64)
    for k, t in enumerate(tgts):
        pick[_reads_of(m, t), k] = 1.0
    summed = (m.mean @ pick).tolist()  # [n_src, n_tgt]
    at_pos: list[list[float]] | None = None
    if m.at is not None:
        pos_index = {p: j for j, p in enumerate(m.positions)}
        cols = torch.tensor([pos_index.get(t.position, 0) for t in tgts])
        at_pos = (m.at[:, :, cols] * pick).sum(1).tolist()  # a summed source at each per-position target's place
    qkv_mean = m.qkv.mean(0).tolist()
    out: list[EdgeScore] = []
    for si, s in enumerate(m.sources):
        if s.kind in QKV:
            heads = [t for t in tgts if t.kind is NodeKind.HEAD and t.layer == s.layer
                     and t.index in _qkv_heads(s, m.group_size) and _same_place(s, t)]
            if not heads:
                heads = [t for t in tgts if t.kind is NodeKind.ATTN and t.layer == s.layer and _same_place(s, t)]
            out.extend(EdgeScore(s.name, t.name, qkv_mean[si]) for t in heads)
            continue
        w_src = _write_point(s, m.parallel)
        for k, t in enumerate(tgts):
            if t == s or not _same_place(s, t):
                continue
            if t.kind is NodeKind.RESID:
                if not (w_src <= 2 * t.layer + 2 and (s.kind is not NodeKind.RESID or s.layer < t.layer)):
                    continue
            elif t.kind is not NodeKind.LOGITS and _read_point(t, m.parallel) < w_src:
                continue
            if t.position is not None and s.position is None:
                weight = at_pos[si][k]
            else:
                weight = summed[si][k]
            out.append(EdgeScore(s.name, t.name, weight))
    return out
