"""What each plan step costs, in forward-equivalents of one batch (no torch).

A step's time is modelled from counts of its work: matrix-product flops F, elements E written by the other
(elementwise, memory-bound) operations, operations O (each with a fixed launch, dispatch, Python and nnsight
overhead), and for the QK fix float64 elements D of its exp / sigmoid passes:

    time = F * (1 + matmul_half / d) + E * elem * d + O * op + D * double_elem

in units of one peak matrix-product flop, with the device's constants (`DEVICES`). A product whose inner size is
the hidden width d runs at d / (d + matmul_half) of the peak (tiny models' products are slow per flop), and an
element costs more on wide models, whose tensors no longer stay in cache. A step's cost is its time over that of
the batch's corrupt forward (the unit: one forward reading the node sites), so on a tiny model, where the overhead
dominates, costs follow operation counts, and on a large one arithmetic. F, E, O and D per step are counted from
the shapes (`Workload`); the counting rules were checked against the operations the engine dispatches (every aten
call and its matrix-product flops, counted with a TorchDispatchMode on stories260K and SmolLM2-135M), and the four
CPU constants were fitted once to the measured step times of both models together (no per-model constant;
`benchmarks/bench_plan_costs.py` prints predicted against measured). Without the model's sizes or the prompts'
lengths the costs fall back to their large-model limits.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from atpdsl.arch import Geometry

__all__ = [
    "Workload", "Device", "DEVICES", "FORWARD", "BACKWARD", "forward_cost", "clean_backward_cost", "qk_fix_cost",
    "norm_fix_cost", "graddrop_term_cost", "patched_cost", "edge_reads_cost", "edge_products_cost", "rank_cost",
    "norm_reader_pairs", "norm_units", "NORM_UNITS", "patch_rows", "DIAGNOSE_EXTRA", "CALIBRATED", "cost_basis",
]

FORWARD = 1.0
"""One forward pass of a batch (the unit)."""

BACKWARD = 1.0
"""A backward pass through the whole model with frozen parameters (input gradients only: the same products as
the forward, so about one forward)."""


@dataclass(frozen=True, slots=True)
class Device:
    """A device kind's constants, in units of one peak matrix-product flop."""

    matmul_half: float  # inner size at which a matrix product runs at half its peak rate
    elem: float  # one element written by an elementwise operation, per unit of hidden width
    op: float  # the fixed overhead of one operation (launch, dispatch, Python, nnsight hooks)
    double_elem: float  # one element of a float64 elementwise operation with a transcendental (exp, sigmoid)


DEVICES = {
    # one CPU thread (torch 2.13 eager), fitted to 140 step times of stories260K and SmolLM2-135M against their
    # dispatched operations: a peak-flop unit of 5.7 ps, 6.1 us per operation, 0.56 ns per float64 element
    "cpu": Device(matmul_half=640.0, elem=0.073, op=1.07e6, double_elem=98.0),
    # not calibrated: a GPU's launch overhead is worth far more flops; products and elements are cheap
    "cuda": Device(matmul_half=256.0, elem=0.02, op=5.0e7, double_elem=4.0),
    "mps": Device(matmul_half=256.0, elem=0.05, op=2.0e7, double_elem=8.0),
}

CALIBRATED = frozenset({"cpu"})
"""Device kinds whose constants were fitted to measured step times (the others are guesses)."""


def cost_basis(device: str, shaped: bool) -> str:
    """What a plan's costs rest on, for its printout: fitted or guessed constants, the batch shape or not."""
    kind = device.split(":")[0]
    basis = "fitted on one CPU thread" if kind in CALIBRATED else f"{kind}: constants not calibrated, a rough guide"
    return basis if shaped else basis + "; model sizes or prompt lengths unknown: large-model limits"


LAYER_OPS = 100  # operations of one transformer layer's forward (norms, projections, rotary, attention, MLP)
HEAD_OPS = 100  # embedding, final norm, unembedding, the metric
SITE_OPS = 4  # reading (saving) one node site in a trace
LAYER_ELEMS = (16, 6, 6)  # elements written per token and layer: x hidden, x MLP width, x heads x positions
VOCAB_ELEMS = 40  # elements per token and vocabulary entry (logits, their float copy, log-softmax, the metric)
BACKWARD_OPS = 2.4  # a clean forward + backward's operations, in forwards' (the graph, the autograd nodes)
BACKWARD_ELEMS = 2.1
STREAM_SITE_OPS = 15  # the streamed backward's hook per site (reduce to estimates as the gradient passes)
NORM_IN_TERM = 0.5  # a GradDrop term's norm fix: counted products are about half the (write, norm) pairs' below the cut
MLP_CUT_OPS = 300  # a cut MLP write also reruns its layer's attention output and the MLP's input norm
EDGE_FIX_REPEAT = 2.0
"""The edges' QK and norm fixes against the steps of the same name (per reader pair, on the selected nodes)."""
DIAGNOSE_EXTRA = 2.5
"""Patched copies the diagnostic adds per sample: suspects alone and the additivity checks (measured 2.2 to 3.5 per
sample with 40 samples on SmolLM2-135M and stories260K; the real number depends on the scores)."""


@dataclass(frozen=True, slots=True)
class Workload:
    """One batch's shape for costing: the model's sizes, model rows per batch, positions per row, vocabulary."""

    geom: Geometry
    rows: int
    positions: int
    vocab: int
    device: str = "cpu"
    sites: int = 0  # node sites a forward reads (the unit is the corrupt forward reading them)

    @property
    def constants(self) -> Device:
        return DEVICES.get(self.device.split(":")[0], DEVICES["cpu"])

    @property
    def tokens(self) -> int:
        return self.rows * self.positions

    def layer_flops(self) -> float:
        """One layer's forward products: projections, attention scores and mixing, a gated MLP."""
        g, tokens = self.geom, self.tokens
        proj = 2 * tokens * g.hidden * g.head_dim * (2 * g.n_heads + 2 * g.n_kv_heads)
        attn = 4 * self.rows * g.n_heads * self.positions ** 2 * g.head_dim
        mlp = 2 * tokens * 3 * g.hidden * g.mlp
        return float(proj + attn + mlp)

    def head_flops(self) -> float:
        return 2.0 * self.tokens * self.geom.hidden * self.vocab

    def forward_flops(self) -> float:
        return self.geom.n_layers * self.layer_flops() + self.head_flops()

    def layer_elems(self) -> float:
        g = self.geom
        a, b, c = LAYER_ELEMS
        return float(self.tokens * (a * g.hidden + b * g.mlp + c * g.n_heads * self.positions))

    def forward_elems(self) -> float:
        return self.geom.n_layers * self.layer_elems() + VOCAB_ELEMS * self.tokens * self.vocab

    def forward_ops(self, sites: int = 0) -> float:
        return self.geom.n_layers * LAYER_OPS + HEAD_OPS + SITE_OPS * sites

    def time(self, flops: float, elems: float, ops: float, double_elems: float = 0.0) -> float:
        """Work in peak-flop units (see the module docstring); `double_elems`: float64 transcendental elements."""
        c, d = self.constants, self.geom.hidden
        return flops * (1 + c.matmul_half / d) + elems * c.elem * d + ops * c.op + double_elems * c.double_elem

    def cost(self, flops: float, elems: float, ops: float, double_elems: float = 0.0) -> float:
        """Forward-equivalents of work with these counts."""
        unit = self.time(self.forward_flops(), self.forward_elems(), self.forward_ops(self.sites))
        return self.time(flops, elems, ops, double_elems) / unit


def forward_cost(w: Workload | None, sites: int = 0) -> float:
    """One forward of the batch reading `sites` node sites (the unit, plus reading)."""
    if w is None:
        return FORWARD
    return w.cost(w.forward_flops(), w.forward_elems(), w.forward_ops(sites))


def clean_backward_cost(w: Workload | None, sites: int = 0, streamed: bool = False) -> float:
    """The clean forward keeping the graph, one backward (input gradients only), and the AtP estimates at `sites`
    sites; `streamed`: each site reduced to its estimates by a hook as the gradient passes."""
    if w is None:
        return FORWARD + BACKWARD
    ops = w.forward_ops(sites) * BACKWARD_OPS + (STREAM_SITE_OPS * sites if streamed else 0)
    return w.cost(w.forward_flops() * (1 + BACKWARD), w.forward_elems() * BACKWARD_ELEMS, ops)


def qk_fix_cost(w: Workload | None, layers: int) -> float:
    """The QK fix in `layers` layers: q and k rebuilt and rotated for both runs, the clean pattern, and every
    query's and key's exact softmax change ([rows, heads, positions, positions] per key position for keys)."""
    if w is None:
        return 0.05 * layers
    g, s = w.geom, w.positions
    heads = w.rows * g.n_heads
    flops = layers * 6.0 * heads * s * s * g.head_dim
    elems = layers * (3.2 * heads * s ** 3 + 66.0 * heads * s * g.head_dim)
    # in float64, per (row, head, query, key, key): exp, sigmoid and masked fills, about 6 passes
    return w.cost(flops, elems, layers * 212, double_elems=layers * 6.0 * heads * s ** 3)


def norm_reader_pairs(n_layers: int, below: int | None = None, side: str = "mlp") -> int:
    """(block write, later norm) pairs of the MLP (or attention, `side="attn"`) writes, all of them or only those
    below residual point `below`. Residual point 2l is layer l's attention input, 2l + 1 its MLP input."""
    readers = sorted([2 * m for m in range(n_layers)] + [2 * m + 1 for m in range(n_layers)] + [2 * n_layers])
    writes = [2 * m + (2 if side == "mlp" else 1) for m in range(n_layers)]
    if below is None:
        return sum(1 for wp in writes for r in readers if r >= wp)
    return sum(1 for wp in writes if wp < below for r in readers if wp <= r < below)


NORM_UNITS = {"heads": "n_heads", "queries": "n_heads", "keys": "n_kv_heads", "values": "n_kv_heads",
              "neurons": "mlp", "attn": 1, "mlp": 1, "resid": 1}
"""Per node kind, the writes per layer the norm fix pulls through each norm (queries and keys count twice: their
change is rebuilt through the pattern before it is a write)."""


def norm_units(kinds: Iterable[str], geom: Geometry) -> tuple[int, int]:
    """Writes per layer the norm fix handles on the attention side and on the MLP side, for these node kinds."""
    attn = mlp = 0
    for kind in kinds:
        unit = NORM_UNITS.get(kind)
        if unit is None:
            continue
        count = unit if isinstance(unit, int) else getattr(geom, unit)
        count *= 2 if kind in ("queries", "keys") else 1
        if kind in ("neurons", "mlp", "resid"):
            mlp += count
        else:
            attn += count
    return attn, mlp


def norm_fix_cost(w: Workload | None, n_layers: int, below: int | None = None,
                  kinds: Iterable[str] = ("neurons",)) -> float:
    """The norm fix: each node's write against every later norm (those below `below` only, in a GradDrop term),
    a [tokens, d] product and the closed form per write and norm."""
    pairs = norm_reader_pairs(n_layers, below)
    if w is None:
        return 0.5 * pairs / n_layers
    attn, mlp = norm_units(kinds, w.geom)
    writes = mlp * pairs + attn * norm_reader_pairs(n_layers, below, "attn")
    share = pairs / max(1, norm_reader_pairs(n_layers))
    td = w.tokens * w.geom.hidden * (1.0 if below is None else NORM_IN_TERM)
    ops = 445 * n_layers if below is None else 265 * n_layers * share
    return w.cost(4.0 * td * writes, 1.15 * td * writes, ops)


def graddrop_term_cost(w: Workload | None, layer: int, side: str, n_layers: int, sites_below: int = 0) -> float:
    """A GradDrop term cutting `side` ("layer", "attn" or "mlp") of `layer`: a backward through the layers below
    the cut only (per sublayer the MLP cut also passes its own layer's attention), then the estimates there."""
    depth = layer + (0.3 if side == "mlp" else 0.0)
    if w is None:
        return BACKWARD * depth / n_layers
    flops = BACKWARD * w.layer_flops() * depth
    ops = 210 * depth + 40 + 2 * sites_below + (MLP_CUT_OPS if side == "mlp" else 0)
    return w.cost(flops, 4.0 * w.layer_elems() * depth, ops)


def patch_rows(w: Workload) -> int:
    """Patched copies (model rows) one forward holds: the engine's rule (atpdsl.engine.exact.chunk_rows, sized as
    atpdsl.memory.patch_rows: 250M floats of its per-row count), at least one batch, at most 1024."""
    g, s = w.geom, w.positions
    per_row = s * (g.hidden * 16 + g.mlp * 3 + g.n_heads * s * 2) * g.n_layers + s * w.vocab
    return int(max(w.rows, min(1024, 250_000_000 // max(per_row, 1))))


def patched_cost(w: Workload | None, copies: int, references: int = 2) -> float:
    """`copies` patched copies of the batch (exact patching), many per forward: arithmetic and elements grow with
    the copies, operations with the forwards; plus `references` unpatched copies (corrupt values, clean metric)."""
    if w is None:
        return copies + references * FORWARD
    per_forward = max(1, patch_rows(w) // max(w.rows, 1))
    forwards = -(-copies // per_forward) if copies else 0
    rows = copies + references  # the reference forwards ride in the same batched forwards
    return w.cost(w.forward_flops() * rows, w.forward_elems() * rows, w.forward_ops() * max(forwards, 1) + 8 * rows)


def edge_reads_cost(w: Workload | None, readers: int) -> float:
    """Keeping one batch's reader gradients: each reader norm pulled back at its clean input."""
    if w is None:
        return 0.05
    return w.cost(0.0, readers * 17.0 * w.tokens * w.geom.hidden, readers * 15)


def edge_products_cost(w: Workload | None, readers: int, sources: int = 20, qk_layers: int = 0,
                       norm_kinds: frozenset[str] | None = None) -> float:
    """The selected nodes' writes against the kept reader gradients, per batch: `sources` nodes (the selection's
    top K; which kinds they are is only known after ranking). Under `atp*` the edges redo the QK fix in
    `qk_layers` layers and the norm fix for `norm_kinds` per reader: measured about EDGE_FIX_REPEAT times the
    corresponding step on stories260K and SmolLM2-135M."""
    if w is None:
        return 0.1
    td = w.tokens * w.geom.hidden
    # per source and reader a [tokens, d] product; each operation here carries Python bookkeeping, ~3 ops' worth
    plain = w.cost(2.2 * sources * readers * td, 0.9 * sources * readers * td, 3 * (58 * sources + 13 * readers))
    qk = EDGE_FIX_REPEAT * qk_fix_cost(w, qk_layers) if qk_layers else 0.0
    norm = EDGE_FIX_REPEAT * norm_fix_cost(w, w.geom.n_layers, kinds=norm_kinds) if norm_kinds else 0.0
    return plain + qk + norm


def rank_cost(w: Workload | None, nodes: int) -> float:
    """Combining the batches' scores and sorting `nodes` nodes (per-position nodes counted per position): a few
    tensor operations and one stable sort; the nodes' records are made only when read."""
    if w is None:
        return 0.0
    return w.cost(0.0, 8.0 * nodes, 40)
