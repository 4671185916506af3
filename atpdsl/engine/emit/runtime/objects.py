"""The run's objects: the same names and fields as atpdsl's engine, so that its copied functions run unchanged.

A step function reads `state` (the run: its context, the prepared corrections in `state.parts`, the sums over
batches) and `work` (one batch: both runs' values and gradients, and its estimates).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from atpdsl.engine.context import Accumulator
from atpdsl.engine.node_table import NodeTable
from atpdsl.plan import MethodSpec, MetricSpec


class EngineError(Exception):
    """A check of the run failed (the same checks atpdsl makes, with the same messages)."""


METRIC_FUNCTIONS: dict[str, Any] = {}
"""Metric kind -> its implementation (the program fills it with the copied atpdsl functions)."""


def metric_impl(kind: str):
    """The implementation of a metric kind."""
    fn = METRIC_FUNCTIONS.get(kind)
    if fn is None:
        raise EngineError(f"this program has no implementation of the metric {kind!r}")
    return fn


@dataclass(frozen=True)
class Step:
    """One step of the plan: its kind (which function runs it), name, scope ("batch" or "run") and params."""

    kind: str
    name: str
    scope: str
    params: dict

    def param(self, key: str, default: Any = None) -> Any:
        return self.params.get(key, default)


@dataclass(frozen=True)
class Plan:
    """What the steps read of the plan: the metric, the evaluation metric (verify), the method."""

    metric: MetricSpec
    eval_metric: MetricSpec | None
    method: MethodSpec
    batch: int


@dataclass(frozen=True)
class Site:
    """A node site: the input or output of one module in one layer (`name` = module.attr)."""

    module: str
    attr: str
    layer: int

    @property
    def name(self) -> str:
        return f"{self.module}.{self.attr}"

    @property
    def key(self) -> str:
        return self.name


@dataclass
class Loaded:
    """The loaded model and what the steps read of it."""

    model: Any  # nnsight.TransformersModel
    hf: Any
    tokenizer: Any
    geom: Any  # Geometry
    config: dict  # the model's config.json
    device: torch.device
    dtype: torch.dtype
    parallel: bool


@dataclass
class TraceOut:
    """One run's site values, gradients per backward block, metric rows and logits at the metric position."""

    acts: dict = field(default_factory=dict)
    grads: dict = field(default_factory=dict)
    metric: torch.Tensor | None = None
    last: torch.Tensor | None = None


@dataclass
class BatchWork:
    """What one batch's steps share (atpdsl.engine.state.BatchWork)."""

    batch: Any  # Batch
    corrupt: TraceOut | None = None
    clean: TraceOut | None = None
    est: torch.Tensor | None = None
    magnitude: torch.Tensor | None = None
    clean_rows: torch.Tensor | None = None
    corrupt_rows: torch.Tensor | None = None
    sums: dict = field(default_factory=dict)
    cache: dict = field(default_factory=dict)


@dataclass
class Context:
    """The run's shared inputs: plan, model, node table, node sites, the sites every trace reads, batches."""

    plan: Plan
    loaded: Loaded
    pairs: list  # EncodedPair
    batches: list  # Batch
    table: NodeTable
    sites: list  # node sites, in table order
    reads: list  # (key, module, attr, item) in forward order: every value the corrupt and clean runs keep
    grad_units: list  # keys per tensor, in the order the backward reaches them: the gradients the clean run keeps
    data: dict  # the plan's data for the step kinds (exact patching's sizes, GradDrop's cut writes, ...)

    @property
    def model(self):
        return self.loaded.model


@dataclass
class RunState:
    """The run as its steps advance it (atpdsl.engine.state.RunState)."""

    ctx: Context
    steps: list
    acc: Accumulator
    parts: dict = field(default_factory=dict)
    mean: torch.Tensor | None = None
    score: torch.Tensor | None = None
    order: list | None = None
    verified: dict = field(default_factory=dict)
    sums: dict = field(default_factory=dict)
    extras: dict = field(default_factory=dict)
    runs: dict = field(default_factory=dict)  # step name -> (kind, scope, times run)
    progress: Any = None
    checkpoint: Any = None

    @property
    def plan(self) -> Plan:
        return self.ctx.plan
