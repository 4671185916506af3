"""Everything one run shares: the loaded model, encoded pairs, batches, node table and trace sites."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from atpdsl.errors import EngineError
from atpdsl.plan import MetricSpec, Plan
from atpdsl.engine.data import Batch, EncodedPair, encode_pairs, make_batches, node_positions, where_text
from atpdsl.engine.load import Loaded
from atpdsl.engine.metrics import MetricReads, metric_values, pick
from atpdsl.engine.node_table import NodeTable, build_table
from atpdsl.engine.trace import TraceSite

__all__ = ["Context", "make_context", "merge_sites", "align", "Accumulator", "metric_reads"]


@dataclass(slots=True)
class Context:
    """One run's shared state (built once by `make_context`)."""

    plan: Plan
    loaded: Loaded
    pairs: list[EncodedPair]
    batches: list[Batch]
    table: NodeTable
    sites: list[TraceSite]  # node sites in forward order, keyed by Site.name
    timings: dict[str, float] = field(default_factory=dict)
    memo: Callable | None = None  # memo(name, key, compute): a checkpoint's stored answers to patching calls

    @property
    def model(self):
        return self.loaded.model

    @property
    def embed(self) -> str:
        return self.loaded.arch.embed

    def metric_fn(self, batch: Batch, spec: MetricSpec | None = None, *, eval_: bool = False,
                  clean_logprobs: torch.Tensor | None = None, repeat: int = 1) -> Callable[[torch.Tensor], torch.Tensor]:
        """logits [rows, S, V] -> per-pair metric values, read where the batch's metric (or evaluation metric) reads
        (atpdsl.engine.metrics.MetricReads: one position, or a whole answer's tokens)."""
        spec = spec or self.plan.metric
        reads = metric_reads(batch, eval_).repeat(repeat)
        ref = None if clean_logprobs is None else clean_logprobs.repeat(repeat, 1)

        def fn(logits: torch.Tensor) -> torch.Tensor:
            return metric_values(spec, pick(logits, reads.pos), reads, ref)

        return fn

    def add_time(self, name: str, seconds: float) -> None:
        self.timings[name] = self.timings.get(name, 0.0) + seconds


def metric_reads(batch: Batch, eval_: bool = False) -> MetricReads:
    """What the batch's metric (or evaluation metric) reads."""
    return batch.eval_reads if eval_ else batch.reads


def align(corrupt: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Corrupt-run values moved to the clean prompt's positions ([b, S, ...]); unaligned positions copy
    position 0 and must be masked by `batch.real`."""
    if batch.cmap is None:
        return corrupt
    idx = batch.cmap.clamp(min=0)
    shape = idx.shape + (1,) * (corrupt.dim() - 2)
    return corrupt.gather(1, idx.view(shape).expand(*idx.shape, *corrupt.shape[2:]))


def _check_metric(spec: MetricSpec, what: str) -> None:
    from atpdsl.registry import metric_problem  # the metric's record decides (front: registry.METRICS)

    problem = metric_problem(spec.kind, len(spec.args))
    if problem is not None:
        raise EngineError(f"{where_text(spec.where)}{what}: {problem}")


def make_context(plan: Plan, loaded: Loaded) -> Context:
    """Encode the plan's pairs, batch them and build the node table (DataError/EngineError/ModelError)."""
    if not plan.pairs:
        raise EngineError("the plan has no prompt pairs")
    _check_metric(plan.metric, "metric")
    if plan.eval_metric is not None:
        _check_metric(plan.eval_metric, "eval metric")
    pairs = encode_pairs(loaded.tokenizer, plan.pairs, plan.metric, plan.eval_metric)
    positions = node_positions(pairs) if any(g.per_position for g in plan.nodes) else None
    table = build_table(loaded.arch, loaded.geom, plan.nodes, positions)
    if table.size == 0:
        raise EngineError("the plan asks for no nodes (add a `nodes { ... }` block)")
    batches = make_batches(pairs, plan.batch, loaded.pad_id, loaded.device, positions)
    sites = [TraceSite(key=s.name, module=s.module, attr=s.attr, order=s.order, flat=s.flat) for s in table.sites]
    return Context(plan=plan, loaded=loaded, pairs=pairs, batches=batches, table=table, sites=sites)


def merge_sites(base: Sequence[TraceSite], extra: Sequence[TraceSite]) -> list[TraceSite]:
    """Base and extra sites in forward order (stable; extras after base sites of equal order)."""
    tagged = [(s.order, 0, i, s) for i, s in enumerate(base)] + [(s.order, 1, i, s) for i, s in enumerate(extra)]
    return [t[-1] for t in sorted(tagged, key=lambda t: t[:3])]


FOLD_COLUMNS = 1 << 20
"""Nodes whose batch sums are taken at once: a batch's float64 temporaries stay near 8 bytes x rows x this many,
not 8 bytes x rows x every node (23.7M per-position nodes in 4 rows: 0.76 GB each)."""


@dataclass(slots=True)
class Accumulator:
    """Streaming per-node sums over pairs; per-pair rows only when asked for."""

    n_nodes: int
    keep_rows: bool
    n: int = 0
    sum_est: torch.Tensor | None = None
    sum_abs: torch.Tensor | None = None
    rows: list[torch.Tensor] = field(default_factory=list)
    mag_rows: list[torch.Tensor] = field(default_factory=list)  # per-pair ranking magnitudes, when they differ
    clean_sum: float = 0.0
    corrupt_sum: float = 0.0
    largest_gap: float = 0.0  # max over pairs of |clean metric - corrupt metric|
    largest_metric: float = 0.0  # max over pairs of |clean metric| and |corrupt metric|

    def add(self, est: torch.Tensor, magnitude: torch.Tensor | None = None) -> None:
        """Add a batch of per-pair estimates [b, N] (`magnitude` [b, N] overrides |est| for the score)."""
        if self.sum_est is None:
            self.sum_est = torch.zeros(self.n_nodes, dtype=torch.float64)
            self.sum_abs = torch.zeros(self.n_nodes, dtype=torch.float64)
        self.n += est.shape[0]
        if not self.keep_rows and magnitude is None:  # sums only: no float64 copy of the batch (it may be GBs)
            est = est.detach()
            for lo in range(0, est.shape[1], FOLD_COLUMNS):  # column by column: each column's sum is unchanged
                part = est[:, lo: lo + FOLD_COLUMNS]
                self.sum_est[lo: lo + FOLD_COLUMNS] += part.sum(0, dtype=torch.float64).cpu()
                self.sum_abs[lo: lo + FOLD_COLUMNS] += part.abs().sum(0, dtype=torch.float64).cpu()
            return
        est64 = est.detach().double().cpu()
        mag = est64.abs() if magnitude is None else magnitude.detach().double().cpu()
        self.sum_est += est64.sum(0)
        self.sum_abs += mag.sum(0)
        if self.keep_rows:
            self.rows.append(est64)
            if magnitude is not None:
                self.mag_rows.append(mag)

    def add_metrics(self, clean: torch.Tensor, corrupt: torch.Tensor) -> None:
        clean, corrupt = clean.detach().double(), corrupt.detach().double()
        self.clean_sum += float(clean.sum())
        self.corrupt_sum += float(corrupt.sum())
        self.largest_gap = max(self.largest_gap, float((clean - corrupt).abs().max()))
        self.largest_metric = max(self.largest_metric, float(clean.abs().max()), float(corrupt.abs().max()))

    def per_pair(self) -> torch.Tensor | None:
        return torch.cat(self.rows) if self.rows else None

    def per_pair_magnitude(self) -> torch.Tensor | None:
        """Per-pair ranking magnitudes [n_pairs, N] (|estimate| unless a correction supplied its own)."""
        if self.mag_rows:
            return torch.cat(self.mag_rows)
        rows = self.per_pair()
        return None if rows is None else rows.abs()
