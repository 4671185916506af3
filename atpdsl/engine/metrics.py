"""Metrics on the logits a batch's rows read, dispatched through the registry's records (registry.METRICS).

Definitions (per pair, at the metric position p, answer tokens from the metric's arguments):
- logit_diff(a, b) = logit[a] - logit[b]
- logprob(a) = log softmax(logits)[a];  prob(a) = softmax(logits)[a]
- loss(a) = cross-entropy of token a = -logprob(a); `loss` without arguments uses the field `answer`
- kl = KL(clean output distribution || this run's distribution) at p; 0 on the clean run, and its
  gradient there is 0 too, so it is an evaluation metric (exact patching, `eval metric`), not an
  attribution metric for AtP.
With `sequence(a)` an argument is a whole answer a_1..a_m, teacher-forced: log P(a) = sum_j
log softmax(logits at p + j - 1 of a's row)[a_j], each token read at its own position after the prompt and
a's earlier tokens. logprob/prob/loss of a sequence use log P(a); logit_diff(sequence(a), sequence(b)) =
log P(a) - log P(b) (for one token each it equals logit[a] - logit[b]: the normalisers cancel).

Each record's implementation takes a MetricInput and returns one value per pair, differentiably.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from atpdsl.errors import EngineError
from atpdsl.plan import MetricSpec
from atpdsl.registry import METRICS

__all__ = ["METRIC_KINDS", "MetricReads", "MetricInput", "pick", "metric_values", "metric_rows", "describe",
           "metric_impl", "logit_diff", "logprob", "prob", "loss", "kl"]


class _Kinds:
    """The registered metric names, read live from the registry (a metric registered later is known too)."""

    def __contains__(self, kind: object) -> bool:
        return kind in METRICS

    def __iter__(self):
        return iter(METRICS)


METRIC_KINDS = _Kinds()


@dataclass(frozen=True)
class MetricReads:
    """What a metric reads in one batch, in padded coordinates of its model rows.

    A batch has `pairs * per_pair` rows, pair-major (pair i's rows are i*per_pair ... i*per_pair+per_pair-1).
    Read k of row r is token `tokens[r, k]` at clean position `pos[r, k]` (corrupt twin `corrupt_pos`) for metric
    argument `arg[r, k]` (-1: padding, read nothing). Read 0 of every row is at the metric position.
    `sequence[a]`: argument a is a whole answer (`sequence(...)`) rather than one token.
    """

    pos: torch.Tensor  # [rows, K] long
    corrupt_pos: torch.Tensor  # [rows, K] long
    tokens: torch.Tensor  # [rows, K] long
    arg: torch.Tensor  # [rows, K] long
    per_pair: int
    sequence: tuple[bool, ...]

    @property
    def rows(self) -> int:
        return int(self.pos.shape[0])

    @property
    def pairs(self) -> int:
        return self.rows // self.per_pair

    def repeat(self, copies: int) -> "MetricReads":
        """The reads of `copies` stacked copies of the batch (exact patching runs many at once)."""
        if copies == 1:
            return self
        return MetricReads(self.pos.repeat(copies, 1), self.corrupt_pos.repeat(copies, 1),
                           self.tokens.repeat(copies, 1), self.arg.repeat(copies, 1), self.per_pair, self.sequence)

    def corrupt(self) -> "MetricReads":
        """The same reads on the corrupt prompts."""
        return MetricReads(self.corrupt_pos, self.pos, self.tokens, self.arg, self.per_pair, self.sequence)


class MetricInput:
    """What a metric implementation reads: per pair, an argument's logit or log-probability (summed over a
    sequence argument's tokens), the logits at the metric position, and the clean run's log-probabilities."""

    def __init__(self, picked: torch.Tensor, reads: MetricReads, clean_logprobs: torch.Tensor | None = None) -> None:
        self.picked = picked.float()  # [rows, K, V]: the logits at each read's position
        self.reads = reads
        self.clean_logprobs = clean_logprobs  # [pairs, V] at the metric position, or None
        self._logprobs: torch.Tensor | None = None

    def _per_pair(self, values: torch.Tensor, arg: int) -> torch.Tensor:
        """Sum a [rows, K] table over the reads of argument `arg`, then over each pair's rows: [pairs]."""
        mask = (self.reads.arg == arg).to(values.dtype)
        rows = (values * mask).sum(1)
        return rows.view(self.reads.pairs, self.reads.per_pair).sum(1)

    def _gather(self, table: torch.Tensor) -> torch.Tensor:
        return table.gather(2, self.reads.tokens.clamp(min=0).unsqueeze(-1)).squeeze(-1)

    def is_sequence(self, arg: int) -> bool:
        """Whether argument `arg` is a whole answer (`sequence(...)`)."""
        return self.reads.sequence[arg]

    def logit(self, arg: int) -> torch.Tensor:
        """The logit of argument `arg`'s token at the metric position, per pair (one-token arguments only)."""
        if self.is_sequence(arg):
            raise EngineError("the logit of a whole answer is not defined: use logprob(...) of it")
        return self._per_pair(self._gather(self.picked), arg)

    def logprob(self, arg: int) -> torch.Tensor:
        """The log-probability of argument `arg`, per pair (of its whole answer for a sequence argument)."""
        if self._logprobs is None:
            self._logprobs = torch.log_softmax(self.picked, -1)
        return self._per_pair(self._gather(self._logprobs), arg)

    def position_logits(self) -> torch.Tensor:
        """The logits at the metric position, per pair [pairs, V] (read 0 of each pair's first row)."""
        r = self.reads
        return self.picked[:, 0].view(r.pairs, r.per_pair, -1)[:, 0]


def logit_diff(x: MetricInput) -> torch.Tensor:
    """logit[a] - logit[b]; for sequence(a), sequence(b): log P(a) - log P(b)."""
    if x.is_sequence(0) or x.is_sequence(1):
        return x.logprob(0) - x.logprob(1)
    return x.logit(0) - x.logit(1)


def logprob(x: MetricInput) -> torch.Tensor:
    """log P(a) (the whole answer's for sequence(a))."""
    return x.logprob(0)


def prob(x: MetricInput) -> torch.Tensor:
    """P(a) = exp(log P(a))."""
    return x.logprob(0).exp()


def loss(x: MetricInput) -> torch.Tensor:
    """Cross-entropy of the answer: -log P(a)."""
    return -x.logprob(0)


def kl(x: MetricInput) -> torch.Tensor:
    """KL(clean distribution || this run's) at the metric position."""
    if x.clean_logprobs is None:
        raise EngineError("the kl metric needs the clean run's output distribution")
    lp = torch.log_softmax(x.position_logits(), -1)
    ref = x.clean_logprobs.float()
    return (ref.exp() * (ref - lp)).sum(-1)


_IMPLS: dict[str, Callable[[MetricInput], torch.Tensor]] = {}  # by implementation path


def metric_impl(kind: str) -> Callable[[MetricInput], torch.Tensor]:
    """The implementation a metric record names (`module:function`), imported on first use."""
    info = METRICS.get(kind)
    if info is None:
        raise EngineError(f"unknown metric {kind!r} (known: {', '.join(METRICS)})")
    fn = _IMPLS.get(info.impl)
    if fn is None:
        module, _, name = info.impl.partition(":")
        try:
            fn = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as e:
            raise EngineError(f"metric {kind!r}: cannot import its implementation {info.impl!r}: {e}") from None
        _IMPLS[info.impl] = fn
    return fn


def pick(logits: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """The logits of row i at position pos[i] ([b, V] from [b, S, V]), or at each pos[i, k] ([b, K, V])."""
    rows = torch.arange(logits.shape[0], device=logits.device)
    return logits[rows, pos] if pos.dim() == 1 else logits[rows.unsqueeze(1), pos]


def metric_values(spec: MetricSpec, picked: torch.Tensor, reads: MetricReads,
                  clean_logprobs: torch.Tensor | None = None) -> torch.Tensor:
    """Per-pair metric values [pairs] (float32) from the logits at the reads, `picked = pick(logits, reads.pos)`
    [rows, K, V]; `clean_logprobs` [pairs, V]: the clean run's log-probabilities at the metric position (kl)."""
    out = metric_impl(spec.kind)(MetricInput(picked, reads, clean_logprobs))
    if out.shape != (reads.pairs,):
        raise EngineError(f"metric {spec.kind!r} returned shape {tuple(out.shape)}, expected ({reads.pairs},)")
    return out


def metric_rows(spec: MetricSpec, last: torch.Tensor, answers: torch.Tensor,
                clean_logprobs: torch.Tensor | None = None) -> torch.Tensor:
    """Per-row metric values [b] from the position logits `last` [b, V] and one answer token per argument
    [b, n_args]: the one-position call (one row per pair, no sequence arguments)."""
    if any(a.sequence for a in spec.args):
        raise EngineError(f"metric {describe(spec)} reads whole answers: call metric_values with the batch's reads")
    b, n = answers.shape[0], answers.shape[1]
    k = max(n, 1)
    device = last.device
    tokens = answers if n else torch.zeros((b, 1), dtype=torch.long, device=device)
    arg = torch.arange(n, device=device).expand(b, n) if n else torch.full((b, 1), -1, device=device)
    pos = torch.zeros((b, k), dtype=torch.long, device=device)
    reads = MetricReads(pos, pos, tokens, arg, 1, (False,) * n)
    return metric_values(spec, last.unsqueeze(1).expand(b, k, last.shape[-1]), reads, clean_logprobs)


def describe(spec: MetricSpec) -> str:
    """The metric as a spec would write it, e.g. `logit_diff(answer, wrong) at last`."""
    args = []
    for a in spec.args:
        text = a.field if a.field is not None else repr(a.literal)
        args.append(f"first_token({text})" if a.first_token else f"sequence({text})" if a.sequence else str(text))
    call = f"{spec.kind}({', '.join(args)})" if args else spec.kind
    return f"{call} at {spec.position}"
