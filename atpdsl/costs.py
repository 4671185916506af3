"""What each plan step costs, in forward-equivalents of one batch (no torch).

A step's time is modelled as arithmetic plus a fixed price per kernel launch: `flops + OP_FLOPS * ops`, where
OP_FLOPS is how many flops the device does in the time one operation's overhead takes (on a CPU thread about
a tenth of a megaflop's worth; far more on a GPU). A step's cost is that time over the same for one forward pass
of the batch (the unit), so on a tiny model, where the overhead dominates, costs follow operation counts, and on
a large one they follow arithmetic. Without the model's sizes or the prompts' lengths the costs fall back to
their large-model limits. The per-step counts are calibrated against measured step times on stories260K (5
layers) and SmolLM2-135M (30 layers): `benchmarks/bench_plan_costs.py` prints predicted against measured.
"""
from __future__ import annotations

from dataclasses import dataclass

from atpdsl.arch import Geometry

__all__ = [
    "Workload", "FORWARD", "BACKWARD", "OP_FLOPS", "forward_cost", "clean_backward_cost", "qk_fix_cost",
    "norm_fix_cost", "graddrop_term_cost", "patched_cost", "edge_reads_cost", "edge_products_cost",
    "norm_reader_pairs",
]

FORWARD = 1.0
"""One forward pass of a batch (the unit)."""

BACKWARD = 1.0
"""A backward pass through the whole model with frozen parameters (input gradients only: about one forward)."""

OP_FLOPS = {"cpu": 2.0e5, "cuda": 5.0e8, "mps": 1.0e8}
"""Flops a device does in the overhead time of one operation (eager PyTorch + nnsight), per device kind."""

OPS_PER_LAYER = 32  # kernel launches of one transformer layer's forward (norms, projections, rotary, attention, MLP)
OPS_HEAD = 12  # embedding, final norm, unembedding, the metric


@dataclass(frozen=True, slots=True)
class Workload:
    """One batch's shape for costing: the model's sizes, model rows per batch, positions per row, vocabulary."""

    geom: Geometry
    rows: int
    positions: int
    vocab: int
    device: str = "cpu"

    @property
    def op_flops(self) -> float:
        return OP_FLOPS.get(self.device.split(":")[0], OP_FLOPS["cpu"])

    def layer_flops(self) -> float:
        """One layer's forward: projections, attention scores and mixing, a gated MLP."""
        g, tokens = self.geom, self.rows * self.positions
        proj = 2 * tokens * g.hidden * g.head_dim * (2 * g.n_heads + 2 * g.n_kv_heads)
        attn = 4 * self.rows * g.n_heads * self.positions ** 2 * g.head_dim
        mlp = 2 * tokens * 3 * g.hidden * g.mlp
        return float(proj + attn + mlp)

    def forward_flops(self) -> float:
        return self.geom.n_layers * self.layer_flops() + 2.0 * self.rows * self.positions * self.geom.hidden * self.vocab

    def forward_ops(self) -> float:
        return self.geom.n_layers * OPS_PER_LAYER + OPS_HEAD

    def cost(self, flops: float, ops: float) -> float:
        """Forward-equivalents of work with these flops and operations."""
        unit = self.forward_flops() + self.op_flops * self.forward_ops()
        return (flops + self.op_flops * ops) / unit


def forward_cost(w: Workload | None, sites: int = 0) -> float:
    """One forward of the batch reading `sites` values (the unit, plus reading)."""
    if w is None:
        return FORWARD
    return w.cost(w.forward_flops(), w.forward_ops() + 2 * sites)


def clean_backward_cost(w: Workload | None, sites: int = 0) -> float:
    """The clean forward keeping the graph, one backward, and the AtP estimates at `sites` sites."""
    if w is None:
        return FORWARD + BACKWARD
    flops = w.forward_flops() * (1 + BACKWARD)
    return w.cost(flops, w.forward_ops() * 3 + 6 * sites)


def qk_fix_cost(w: Workload | None, layers: int) -> float:
    """The QK fix in `layers` layers: corrupt and clean patterns rebuilt, every query's and key's exact change."""
    if w is None:
        return 0.05 * layers
    g = w.geom
    flops = layers * 12.0 * w.rows * g.n_heads * w.positions ** 2 * g.head_dim
    return w.cost(flops, layers * 60)


def norm_reader_pairs(n_layers: int, below: int | None = None) -> int:
    """(MLP write, later norm) pairs, all of them or only those below residual point `below`."""
    readers = sorted([2 * m for m in range(n_layers)] + [2 * m + 1 for m in range(n_layers)] + [2 * n_layers])
    writes = [2 * m + 2 for m in range(n_layers)]
    if below is None:
        return sum(1 for wp in writes for r in readers if r >= wp)
    return sum(1 for wp in writes if wp < below for r in readers if wp <= r < below)


def norm_fix_cost(w: Workload | None, n_layers: int, below: int | None = None) -> float:
    """The norm fix: each MLP layer's writes against every later norm (those below `below` only, in a GradDrop
    term), two [tokens, d] x [d, neurons] products per pair."""
    pairs = norm_reader_pairs(n_layers, below)
    if w is None:
        return 0.5 * pairs / n_layers
    g = w.geom
    return w.cost(pairs * 4.0 * w.rows * w.positions * g.hidden * g.mlp, pairs * 16)


def graddrop_term_cost(w: Workload | None, layer: int, side: str, n_layers: int, sites_below: int = 0) -> float:
    """A GradDrop term cutting `side` ("layer", "attn" or "mlp") of `layer`: a backward through the layers below
    the cut only (per sublayer the MLP cut also redoes its own layer's attention), then the estimates there."""
    depth = layer + (0.5 if side == "mlp" else 0.0)
    if w is None:
        return BACKWARD * depth / n_layers
    flops = BACKWARD * w.forward_flops() * depth / n_layers
    return w.cost(flops, 2 * OPS_PER_LAYER * depth + 10 + 6 * sites_below)


def patched_cost(w: Workload | None, copies: int, chunk_rows: int | None = None) -> float:
    """`copies` patched copies of the batch (exact patching), many per forward: arithmetic grows with the copies,
    operations with the forwards; plus the two reference forwards (corrupt values, clean metric)."""
    if w is None:
        return copies + 2.0 * FORWARD
    per_forward = max(1, (chunk_rows or 1024) // max(w.rows, 1))
    forwards = -(-copies // per_forward) if copies else 0
    return w.cost(w.forward_flops() * (copies + 2), w.forward_ops() * (forwards + 2) + 8 * copies)


def edge_reads_cost(w: Workload | None, readers: int) -> float:
    """Keeping one batch's reader gradients: each reader norm pulled back at its clean input."""
    if w is None:
        return 0.05
    return w.cost(readers * 12.0 * w.rows * w.positions * w.geom.hidden, readers * 14)


def edge_products_cost(w: Workload | None, readers: int, sources: int = 200) -> float:
    """The selected nodes' writes against the kept reader gradients, per batch."""
    if w is None:
        return 0.1
    return w.cost(2.0 * sources * readers * w.rows * w.positions * w.geom.hidden, sources * 4 + readers * 4)
