"""The memory a run needs, per device, from the model's config and the plan alone (no torch, no weights).

`atpdsl plan` prints it; `batch auto` picks the largest batch whose estimate fits the budget; a run whose
estimate does not fit stops before loading the model. Every figure is bytes, split into named parts:

- weights: parameters counted from the config, in the model's dtype;
- activations: what autograd keeps from the clean forward for the backward (parameters are frozen, so a
  linear layer keeps nothing: per layer the MLP's nonlinearity inputs, the norm inputs, q, k, v and, with eager
  attention, the [heads, positions, positions] pattern). The per-architecture factors (SAVED) were counted with
  `torch.autograd.graph.saved_tensors_hooks` on every architecture (tests/engine/test_memory_saved.py checks
  them against that count for float32 and bfloat16, eager and sdpa);
- logits: the [rows, positions, vocab] logits and their gradient;
- atpdsl's own buffers: the node sites' corrupt values (and, on the path that keeps them, clean values and
  gradients), the estimates, the corrections' extra sites, the edges' kept reads;
- node bookkeeping: ranking the nodes, NODE_BYTES per scored node beside the running sums (a phase of its own,
  after the last backward: the nodes' names and records are made only when read);
- patching: verify, diagnose and exact patching run `rows` patched copies of a batch per forward without a
  graph (`patch_rows`: as many as the engine puts in one forward).

The peak is the largest phase (corrupt forward, clean forward + backward, patching) plus what stays resident.
Calibrated on CPU against measured peak resident memory (tests/engine/test_memory_measured.py); on a GPU the
allocator's caching adds some slack, which RESERVE covers.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from atpdsl.lowering import edge_sources, rows_per_pair, streams
from atpdsl.memory_sizes import (
    ELEMENT_BYTES, GATED, ModelSizes, forward_transient_per_token, format_bytes, model_sizes, parse_size,
    saved_per_token,
)

__all__ = ["RunShape", "MemoryPart", "MemoryEstimate", "estimate", "largest_batch", "patch_rows", "shape_for",
           "NODE_BYTES", "RESERVE", "PATTERN_FREE_KINDS", "reads_pattern",
           "ModelSizes", "model_sizes", "parse_size", "format_bytes", "rows_per_patch"]

NODE_BYTES = 48
"""Bytes per scored node while the nodes are ranked, beside the running sums ("estimates"): the mean and the
ranking score (float64 each) and the stable sort's key, values and order (int64), 8 bytes each; the result keeps
them as columns and makes a node's record only when it is read (atpdsl.circuit.scored_nodes). Ranking runs after
the last backward, so these bytes add to the peak only when they exceed what the backward held."""

RESERVE = 1.10
"""Headroom on top of the estimate when it is compared with a budget (allocator caching and fragmentation)."""

KEPT_LIMIT = 1 << 30
"""Kept per-batch items (the edges' reads) held in memory before later ones go to disk (engine.state)."""

PATCH_FLOATS = 250_000_000
"""The engine's budget for one patched forward, in floats of its per-row count (atpdsl.engine.exact.chunk_rows)."""

PATTERN_FREE_KINDS = frozenset({"corrupt_forward", "clean_backward", "clean_forward", "exact_patch", "graddrop_term",
                                "rank", "verify", "verify_adaptive", "diagnose"})
"""Step kinds that never read the attention pattern: with only these, the model may use fused (sdpa) attention."""


@dataclass(frozen=True, slots=True)
class RunShape:
    """What the run does, as memory sees it.

    `site_widths`: the width of every node site (one entry per site and layer); `extra_widths`: sites the
    corrections add, whose values and gradients they hold; `edge_widths`: sites the edges read, whose gradients
    they hold (their values are tensors the forward keeps for the backward anyway, in eager attention); `nodes`:
    scored nodes; `kinds`: the plan's step kinds; `kept_per_token`: bytes the edges keep per token and batch
    beside the node deltas.
    """

    dtype: str
    attention: str
    site_widths: tuple[int, ...]
    extra_widths: tuple[int, ...]
    extra_patterns: int  # [heads, S, S] patterns the steps read (one per layer read)
    nodes: int
    kinds: frozenset[str]
    pairs: int
    rows_per_pair: int = 1
    kept_per_token: int = 0
    edge_widths: tuple[int, ...] = ()
    edge_sources: int = 0  # nodes the edges are computed among (lowering.edge_sources), the embedding aside
    patched: int = 0  # nodes patched one by one per batch (verify top K, exact)
    devices: int = 1
    keep_pairs: bool = False  # per-pair rows kept (exports, aggregate per_pair) or a correction's own magnitudes


@dataclass(frozen=True, slots=True)
class MemoryPart:
    """One named part of a device's peak."""

    name: str
    bytes: int
    what: str


@dataclass(frozen=True, slots=True)
class MemoryEstimate:
    """The estimated peak of one device for one batch size, with its parts and the phase that sets it."""

    device: str
    batch: int
    tokens: int  # positions of the longest batch
    parts: tuple[MemoryPart, ...]
    peak: int
    phase: str

    def part(self, name: str) -> int:
        """Bytes of one part (0 when absent)."""
        return next((p.bytes for p in self.parts if p.name == name), 0)


def _site_widths(arch, geom, groups: Sequence, n_layers: int) -> tuple[int, ...]:
    """The width of every node site of the plan (fused q/k/v count once per layer)."""
    by_layer: dict[int, set[str]] = {}
    for g in groups:
        lo, hi = g.layers if g.layers is not None else (0, n_layers - 1)
        for layer in range(max(lo, 0), min(hi, n_layers - 1) + 1):
            by_layer.setdefault(layer, set()).add(g.kind)
    return tuple(arch.template(site.kinds[0]).tensor_width(geom) for site in arch.site_list(by_layer))


def _nodes(groups: Sequence, geom, positions: int) -> int:
    """Scored nodes: per-position groups once per position."""
    from atpdsl.lowering import node_count

    summed = node_count([g for g in groups if not g.per_position], geom) or 0
    per_position = node_count([g for g in groups if g.per_position], geom) or 0
    return summed + per_position * positions


def _step_sites(m: ModelSizes, kinds: frozenset[str], groups: Sequence, gated: bool
                ) -> tuple[list[int], int, list[int], int]:
    """Widths of the sites the corrections add per layer (values with gradients), patterns they read, widths of
    the sites the edges add (gradients: their values are the forward's own), and the bytes per token the edges
    keep beside the node deltas (without the patterns)."""
    q, kv, d, layers = m.n_heads * m.head_dim, m.n_kv_heads * m.head_dim, m.hidden, m.n_layers
    widths: list[int] = []
    edges: list[int] = []
    patterns = 0
    kept = 0
    node_kinds = {g.kind for g in groups}
    if "qk_fix" in kinds:
        widths += [q, kv] * layers
        patterns += layers
    if "norm_fix" in kinds:
        widths += [2 * d] * (2 * layers)
        patterns += layers if node_kinds & {"values", "queries", "keys"} else 0
    if "graddrop_term" in kinds:
        widths += [4 * d] * layers
    if "edge_reads" in kinds or "edge_ig" in kinds:
        pieces = (2 if gated else 1) * m.mlp
        edges += [q + 2 * kv + q + pieces + 4 * d] * layers
        kept = layers * ((2 * q + 4 * kv + q + pieces) * ELEMENT_BYTES["float32"] + 6 * d * 4)
    return widths, patterns, edges, kept


def shape_for(plan, config: Mapping, lengths: Sequence[int], *, attention: str, devices: int = 1) -> RunShape:
    """The RunShape of a plan on a model with this config (`lengths`: each pair's token count, in order)."""
    from atpdsl.arch import arch_for_config, geometry

    arch = arch_for_config(config)
    geom = geometry(config)
    m = model_sizes(config, arch.name, arch.is_parallel(config))
    kinds = frozenset(s.kind for s in plan.steps)
    positions = lengths[0] if lengths and len(set(lengths)) == 1 else min(lengths, default=1)
    extra, patterns, edges, kept = _step_sites(m, kinds, plan.nodes, arch.name in GATED)
    top = plan.verification.top if plan.verification is not None else 0
    patched = _nodes(plan.nodes, geom, positions) if plan.method.name == "exact" else top
    rows = rows_per_pair(plan)
    keep = plan.write_per_pair or plan.method.aggregate == "per_pair" or "graddrop_term" in kinds
    return RunShape(dtype=plan.model.dtype, attention=attention,
                    site_widths=_site_widths(arch, geom, plan.nodes, geom.n_layers), extra_widths=tuple(extra),
                    extra_patterns=patterns, nodes=_nodes(plan.nodes, geom, positions), kinds=kinds,
                    pairs=len(plan.pairs), rows_per_pair=rows, kept_per_token=kept, edge_widths=tuple(edges),
                    edge_sources=edge_sources(plan), patched=patched, devices=devices, keep_pairs=keep)


def reads_pattern(kinds: Sequence[str] | frozenset[str]) -> bool:
    """Whether a step of these kinds reads the attention pattern (then attention must be eager)."""
    return not set(kinds) <= PATTERN_FREE_KINDS


def rows_per_patch(hidden: int, mlp: int, n_heads: int, n_layers: int, vocab: int, seq: int, rows: int) -> int:
    """Patched copies (model rows) one forward holds: as many as fit PATCH_FLOATS by a per-row count of the
    forward's activations and logits, at least one batch (`rows`), at most 1024. The engine's patching
    (atpdsl.engine.exact.chunk_rows) and the memory plan (patch_rows) both call this."""
    per_row = seq * (hidden * 16 + mlp * 3 + n_heads * seq * 2) * n_layers + seq * vocab
    return int(max(rows, min(1024, PATCH_FLOATS // max(per_row, 1))))


def patch_rows(m: ModelSizes, seq: int, rows: int) -> int:
    """rows_per_patch for the model's sizes."""
    return rows_per_patch(m.hidden, m.mlp, m.n_heads, m.n_layers, m.vocab, seq, rows)


def _count(n: int) -> str:
    """11.8B, 135M, 23.1k: a parameter count as model cards write it."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(n)


def _parts(m: ModelSizes, shape: RunShape, batch: int, seq: int) -> dict[str, tuple[int, str]]:
    """Every part for one batch size: bytes and a short description."""
    e = ELEMENT_BYTES.get(shape.dtype, 4)
    f = max(4, e)  # attribution arithmetic in float32 (float64 models: float64)
    rows = batch * shape.rows_per_pair
    tokens = rows * seq
    sites = sum(shape.site_widths)
    extra = sum(shape.extra_widths)
    stream = streams(shape.kinds)
    out: dict[str, tuple[int, str]] = {
        "weights": (m.params * e, f"{_count(m.params)} parameters in {shape.dtype}"),
        "activations": (int(saved_per_token(m, shape.dtype, shape.attention, seq) * tokens),
                        f"kept for the backward: {rows} rows x {seq} positions, {shape.attention} attention"),
        "logits": (2 * tokens * m.vocab * e, f"logits and their gradient, vocabulary {m.vocab:,}"),
        "node values": (tokens * sites * (f if stream else 3 * e),
                        "corrupt - clean per node site" + (" (reduced as the backward passes)" if stream else
                                                           ", clean values and gradients of every node site")),
        "estimates": ((3 if shape.keep_pairs else 1) * rows * shape.nodes * 4 + 2 * shape.nodes * 8,
                      "per-pair estimates and the running sums" if shape.keep_pairs else
                      "the batch's estimates and the running sums"),
    }
    edges = sum(shape.edge_widths)
    if extra or shape.extra_patterns or edges:
        patterns = shape.extra_patterns * rows * m.n_heads * seq * seq * 2 * e
        out["step sites"] = (tokens * (2 * extra + edges) * e + patterns,
                             "what the corrections read (values, gradients) and the edges (gradients)")
    if "edge_reads" in shape.kinds:
        per_batch, batches = _edge_reads(m, shape, batch, seq)
        out["edge reads"] = (min(per_batch * batches, KEPT_LIMIT + per_batch),
                             f"the edges' kept reads ({batches} batch(es); beyond 1 GiB on disk)")
    out["node records"] = (shape.nodes * NODE_BYTES, f"ranking {shape.nodes:,} scored nodes (after the backward)")
    if shape.patched or "diagnose" in shape.kinds or "verify_adaptive" in shape.kinds:
        out["patching"] = (0, "")  # sized by patch_rows from what is left (see estimate)
    return out


def _edge_reads(m: ModelSizes, shape: RunShape, batch: int, seq: int) -> tuple[int, int]:
    """Bytes one batch's kept edge reads hold, and the number of batches: the clean values and gradients of the
    sites they read (`kept_per_token`), the node sites' differences, the stacked norm inputs and gradients, every
    layer's pattern."""
    e = ELEMENT_BYTES.get(shape.dtype, 4)
    rows = batch * shape.rows_per_pair
    patterns = m.n_layers * rows * m.n_heads * seq * seq * e
    copies = rows * seq * (sum(shape.site_widths) * max(4, e) + shape.kept_per_token) + patterns
    return copies, max(1, math.ceil(shape.pairs / max(batch, 1)))


def _phases(parts: dict[str, tuple[int, str]], m: ModelSizes, shape: RunShape, batch: int, seq: int) -> dict[str, int]:
    """Peak bytes of each phase beside the resident parts (weights, the earlier batches' kept edge reads)."""
    e = ELEMENT_BYTES.get(shape.dtype, 4)
    tokens = batch * shape.rows_per_pair * seq
    get = lambda name: parts.get(name, (0, ""))[0]  # noqa: E731 - local shorthand
    corrupt = (tokens * (forward_transient_per_token(m, shape.dtype, shape.attention, seq) / max(1, m.n_layers)
                         + m.vocab * e) + tokens * sum(shape.site_widths) * e)
    backward = sum(get(n) for n in ("activations", "logits", "node values", "estimates", "step sites"))
    folding = batch * shape.rows_per_pair * shape.nodes * 4  # |estimate| while the batch is added to the sums
    ranking = get("estimates") + get("node records") + folding
    out = {"corrupt forward": int(corrupt), "clean forward + backward": int(backward),
           "patching": get("patching"), "ranking": int(ranking)}
    if "edge reads" in parts:  # after the backward: the batch's reads taken from its step sites
        per_batch, _ = _edge_reads(m, shape, batch, seq)
        out["keeping the edge reads"] = int(per_batch + get("node values"))
        out["edge scores"] = int(per_batch + _edge_arithmetic(m, batch * shape.rows_per_pair, seq,
                                                               shape.edge_sources + 1))
    return out


def _edge_arithmetic(m: ModelSizes, rows: int, seq: int, sources: int) -> int:
    """Bytes the edge step's arithmetic holds at once for one batch (atpdsl.engine.edge_products): a layer's
    attention split in float64 (pattern, its gradient and two products), the `sources`' writes and their
    flattened copy, and a layer's head inputs pulled back to the residual stream (q, k, v per head, a few
    temporaries)."""
    split = 4 * rows * m.n_heads * seq * seq * 8
    sources = 2 * rows * sources * seq * m.hidden * 4
    targets = 4 * 3 * m.n_heads * rows * seq * m.hidden * 4
    return split + sources + targets


def estimate(m: ModelSizes, shape: RunShape, batch: int, lengths: Sequence[int]) -> MemoryEstimate:
    """The peak of a run with `batch` pairs per forward over prompts of these token lengths (in pair order)."""
    batch = max(1, int(batch))
    seq = max((max(lengths[i: i + batch]) for i in range(0, len(lengths), batch)), default=1)
    parts = _parts(m, shape, batch, seq)
    if shape.devices > 1:  # accelerate splits the layers evenly: per-layer parts shrink, the logits stay whole
        for name in ("weights", "activations", "node values", "step sites"):
            if name in parts:
                size, what = parts[name]
                parts[name] = (math.ceil(size / shape.devices), f"{what} (1/{shape.devices} on each device)")
    resident = parts["weights"][0]
    if "edge reads" in parts:  # the earlier batches' reads, up to KEPT_LIMIT in memory (the rest on disk)
        per_batch, batches = _edge_reads(m, shape, batch, seq)
        resident += min(per_batch * (batches - 1), KEPT_LIMIT)
    if "patching" in parts:
        rows = patch_rows(m, seq, batch * shape.rows_per_pair)
        e = ELEMENT_BYTES.get(shape.dtype, 4)
        per_row = seq * (forward_transient_per_token(m, shape.dtype, shape.attention, seq) + m.vocab * e)
        refs = 2 * batch * shape.rows_per_pair * seq * sum(shape.site_widths) * e
        parts["patching"] = (int(rows * per_row + refs), f"{rows} patched rows per forward, no graph")
    phases = _phases(parts, m, shape, batch, seq)
    phase = max(phases, key=lambda k: phases[k])
    total = resident + phases[phase]
    shown = tuple(MemoryPart(k, int(v), w) for k, (v, w) in parts.items() if v)
    return MemoryEstimate(_device_name(shape), batch, seq, shown, int(total), phase)


def _device_name(shape: RunShape) -> str:
    return "each device" if shape.devices > 1 else "device"


def largest_batch(m: ModelSizes, shape: RunShape, lengths: Sequence[int], budget: int) -> int:
    """The largest batch (1 .. pairs) whose estimate, with RESERVE headroom, fits `budget`; 0 when none does."""
    fits = lambda b: estimate(m, shape, b, lengths).peak * RESERVE <= budget  # noqa: E731
    hi = max(1, shape.pairs)
    if not fits(1):
        return 0
    lo = 1
    while lo < hi:  # the estimate grows with the batch: bisect for the last one that fits
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


