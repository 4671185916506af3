"""What each plan step costs, in forward-equivalents of one batch (no torch).

The unit is one forward pass of the batch through the whole model. A backward pass through the whole model
costs BACKWARD forwards; a GradDrop term recomputes only the layers below its cut (gradients above the cut are
the plain backward's), so it costs that fraction of a backward. The constants are calibrated against measured
step times on a tiny and a 30-layer model (`benchmarks/bench_plan_costs.py` prints predicted against measured).
"""
from __future__ import annotations

__all__ = [
    "FORWARD", "BACKWARD", "QK_FIX_PER_LAYER", "NORM_FIX_PAIR", "EDGE_READS", "EDGE_PRODUCTS",
    "graddrop_term_cost", "norm_fix_cost", "norm_fix_term_cost", "norm_reader_pairs",
]

FORWARD = 1.0
"""One forward pass of a batch (the unit)."""

BACKWARD = 2.0
"""A backward pass through the whole model, keeping the forward's graph."""

QK_FIX_PER_LAYER = 0.05
"""One layer's attention-pattern recomputation with corrupt queries or keys (small next to a forward)."""

NORM_FIX_PAIR = 0.5
"""The norm fix per (MLP layer, later norm) pair, divided by the layer count: two [tokens, d] x [d, neurons]
matmuls against a forward's ~(3 d neurons + 4 d^2) per layer with neurons ~ 4 d."""

EDGE_READS = 0.05
"""Keeping one batch's reader-block gradients and node-site differences for the edges (a copy, no pass)."""

EDGE_PRODUCTS = 0.1
"""Products of the selected nodes' writes with the kept reader gradients, per batch."""


def graddrop_term_cost(layer: int, side: str, n_layers: int) -> float:
    """A GradDrop term cutting `side` ("layer", "attn" or "mlp") of `layer`: a backward through the layers
    below the cut only (per sublayer, the MLP cut also recomputes its own layer's attention)."""
    depth = layer + (0.5 if side == "mlp" else 0.0)
    return BACKWARD * depth / n_layers


def _writes_and_readers(n_layers: int) -> tuple[list[int], list[int]]:
    """Residual points of the MLP writes (2m + 2) and of the norms that read the stream (2m, 2m + 1, 2L)."""
    readers = sorted([2 * m for m in range(n_layers)] + [2 * m + 1 for m in range(n_layers)] + [2 * n_layers])
    writes = [2 * m + 2 for m in range(n_layers)]
    return writes, readers


def norm_reader_pairs(n_layers: int, below: int | None = None) -> int:
    """(MLP write, later norm) pairs, all of them or only those below residual point `below`."""
    writes, readers = _writes_and_readers(n_layers)
    if below is None:
        return sum(1 for w in writes for r in readers if r >= w)
    return sum(1 for w in writes if w < below for r in readers if w <= r < below)


def norm_fix_cost(n_layers: int) -> float:
    """The norm fix of the plain pass, dominated by the neurons: each MLP layer's writes against every later norm."""
    return NORM_FIX_PAIR * norm_reader_pairs(n_layers) / n_layers


def norm_fix_term_cost(layer: int, side: str, n_layers: int) -> float:
    """The norm fix inside one GradDrop term: only the norms below the cut are redone (those above it reuse the
    plain pass's contributions)."""
    cut = 2 * layer + (2 if side in ("layer", "mlp") else 1)
    return NORM_FIX_PAIR * norm_reader_pairs(n_layers, below=cut) / n_layers
