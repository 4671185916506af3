"""One run's working state as its steps fill it: each batch's shared work, the running sums, and what the
run-scope steps (rank, verify, diagnose, edges) produce."""
from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from atpdsl.circuit.scores import EdgeScore, FalseNegativeBound
from atpdsl.engine.context import Accumulator, Context
from atpdsl.engine.data import Batch
from atpdsl.engine.trace import TraceOut, TraceSite
from atpdsl.plan import Step

__all__ = ["BatchWork", "StepRecord", "RunState", "ExtraSites", "Progress", "SpillList", "KEPT_MEMORY_LIMIT"]

Progress = Callable[[str, int, int], None]
"""progress(phase, done, total): the engine reports work units (batch steps, nodes patched, samples drawn)."""


@dataclass(slots=True)
class BatchWork:
    """What the batch-scope steps of one batch share; folded into the run's sums when the batch is done.

    `est` [b, N] holds the per-pair numbers the batch adds to the run: AtP estimates (rewritten in place by the
    corrections) or, for `method exact`, exact effects. `magnitude` [b, N] replaces |est| as the per-pair
    ranking score when a correction supplies one (GradDrop). `sums` and `kept` are the rest of what the batch
    adds to the run (all of it is what a checkpoint stores). `cache` holds values several steps of this batch
    reuse (the node sites' differences, the QK fix's prepared patterns) and is dropped with it.
    """

    batch: Batch
    corrupt: TraceOut | None = None
    clean: TraceOut | None = None
    est: torch.Tensor | None = None
    magnitude: torch.Tensor | None = None
    clean_rows: torch.Tensor | None = None
    corrupt_rows: torch.Tensor | None = None
    sums: dict[str, torch.Tensor] = field(default_factory=dict)  # added into RunState.sums (e.g. GradDrop's terms)
    kept: dict[str, Any] = field(default_factory=dict)  # handed to run-scope steps (e.g. the edges' reads)
    cache: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class StepRecord:
    """A step the engine ran: how often (once per batch for batch-scope steps) and for how long in all."""

    kind: str
    name: str
    scope: str
    runs: int
    seconds: float


KEPT_MEMORY_LIMIT = 1 << 30
"""Bytes of kept per-batch items held in memory before later ones are written to a temporary folder."""


class SpillList:
    """Per-batch items kept for run-scope steps (each with `to_record()`, `nbytes` and a `from_record(batch,
    record)` class method): in memory up to KEPT_MEMORY_LIMIT bytes, then in a temporary folder."""

    def __init__(self, limit: int | None = None):
        self.limit = KEPT_MEMORY_LIMIT if limit is None else limit
        self.items: list[Any] = []
        self.bytes_in_memory = 0
        self.folder: Path | None = None

    def append(self, item: Any, in_memory: bool = False) -> None:
        """Keep `item`: in memory while under the limit (or when `in_memory`), else in the temporary folder."""
        size = item.nbytes
        if in_memory or self.bytes_in_memory + size <= self.limit:
            self.items.append(item)
            self.bytes_in_memory += size
            return
        if self.folder is None:
            self.folder = Path(tempfile.mkdtemp(prefix="atpdsl-kept-"))
        path = self.folder / f"item-{len(self.items)}.pt"
        torch.save(item.to_record(), path)
        self.items.append((type(item), item.batch, path))

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self):
        for item in self.items:
            if isinstance(item, tuple):
                cls, batch, path = item
                yield cls.from_record(batch, torch.load(path, weights_only=True))
            else:
                yield item

    def close(self) -> None:
        """Drop every item and the temporary folder."""
        self.items.clear()
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None


class ExtraSites:
    """Trace sites the steps add to the plan's node sites (each key once), read in the clean run and, unless every
    step that asked for a site said it reads only the clean value (`clean_only`), in the corrupt run too."""

    def __init__(self, have: set[str]):
        self.have = have
        self.sites: dict[str, TraceSite] = {}
        self.shared: set[str] = set()  # node sites a step asked for too (their values and gradients are kept)
        self.clean_only: set[str] = set()  # added sites no step reads in the corrupt run

    def add(self, key: str, module: str, attr: str, order: tuple[int, int], item: int | None = None,
            grad: bool = True, corrupt: bool = True) -> str:
        """Add a site unless the plan or an earlier step has it (then only ask for its gradient too, if `grad`, and
        its corrupt value, if `corrupt`); returns its key."""
        if key in self.have:
            self.shared.add(key)
            return key
        old = self.sites.get(key)
        if old is None:
            self.sites[key] = TraceSite(key=key, module=module, attr=attr, item=item, grad=grad, order=order)
            if not corrupt:
                self.clean_only.add(key)
        else:
            if grad and not old.grad:
                self.sites[key] = replace(old, grad=True)
            if corrupt:
                self.clean_only.discard(key)
        return key


@dataclass(slots=True)
class RunState:
    """The run as the steps advance it (see atpdsl.engine.steps)."""

    ctx: Context
    steps: tuple[Step, ...]
    acc: Accumulator
    progress: Progress | None = None
    extra: ExtraSites | None = None
    keep_graph: bool = False
    parts: dict[str, Any] = field(default_factory=dict)  # step helpers built once: "qk", "norm", "graddrop", ...
    mean: torch.Tensor | None = None  # [N] mean signed estimate (or exact effect)
    score: torch.Tensor | None = None  # [N] ranking score
    order: Any = None  # columns by descending score (an int64 numpy array, see ranking.rank)
    verified: dict[int, torch.Tensor] = field(default_factory=dict)  # column -> per-pair exact effects
    sums: dict[str, torch.Tensor] = field(default_factory=dict)  # run-level sums the batches add to
    kept: dict[str, SpillList] = field(default_factory=dict)  # per-batch items kept for run-scope steps
    checkpoint: Any = None  # atpdsl.engine.checkpoint.Checkpoint, or None
    diagnosis: tuple[FalseNegativeBound, dict] | None = None
    edges: tuple[EdgeScore, ...] = ()
    extras: dict[str, Any] = field(default_factory=dict)
    records: dict[str, StepRecord] = field(default_factory=dict)

    @property
    def plan(self):
        return self.ctx.plan

    def record(self, step: Step, seconds: float) -> None:
        """Count one run of `step` and its wall time."""
        old = self.records.get(step.name)
        runs, total = (old.runs, old.seconds) if old else (0, 0.0)
        self.records[step.name] = StepRecord(step.kind, step.name, step.scope, runs + 1, total + seconds)

    def report(self, phase: str, done: int, total: int) -> None:
        if self.progress is not None:
            self.progress(phase, done, total)
