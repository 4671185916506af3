"""Metrics on the logits at one position per row: logit_diff, logprob, prob, kl, loss.

Definitions (per pair, at the metric position p, answer tokens from the metric's arguments):
- logit_diff(a, b) = logit[a] - logit[b]
- logprob(a) = log softmax(logits)[a];  prob(a) = softmax(logits)[a]
- loss(a) = cross-entropy of token a = -logprob(a); `loss` without arguments uses the field `answer`
- kl = KL(clean output distribution || this run's distribution) at p; 0 on the clean run, and its
  gradient there is 0 too, so it is an evaluation metric (exact patching, `eval metric`), not an
  attribution metric for AtP.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from atpdsl.errors import EngineError
from atpdsl.plan import MetricSpec

__all__ = ["METRIC_KINDS", "pick", "metric_rows", "describe"]

METRIC_KINDS = ("logit_diff", "logprob", "prob", "kl", "loss")


def pick(logits: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """The logits of row i at position pos[i]: [b, V] from [b, S, V]."""
    rows = torch.arange(logits.shape[0], device=logits.device)
    return logits[rows, pos]


def metric_rows(spec: MetricSpec, last: torch.Tensor, answers: torch.Tensor,
                clean_logprobs: torch.Tensor | None = None) -> torch.Tensor:
    """Per-row metric values [b] from the position logits `last` [b, V] (float32 math)."""
    x = last.float()
    kind = spec.kind
    if kind == "logit_diff":
        if answers.shape[1] != 2:
            raise EngineError(f"logit_diff needs two answer tokens, got {answers.shape[1]}")
        return x.gather(1, answers[:, :1]).squeeze(1) - x.gather(1, answers[:, 1:2]).squeeze(1)
    if kind in ("logprob", "prob", "loss"):
        lp = torch.log_softmax(x, -1).gather(1, answers[:, :1]).squeeze(1)
        return lp if kind == "logprob" else lp.exp() if kind == "prob" else -lp
    if kind == "kl":
        if clean_logprobs is None:
            raise EngineError("the kl metric needs the clean run's output distribution")
        lp = torch.log_softmax(x, -1)
        return (clean_logprobs.exp() * (clean_logprobs - lp)).sum(-1)
    raise EngineError(f"unknown metric {kind!r} (known: {', '.join(METRIC_KINDS)})")


def describe(spec: MetricSpec) -> str:
    """The metric as a spec would write it, e.g. `logit_diff(answer, wrong) at last`."""
    args = []
    for a in spec.args:
        text = a.field if a.field is not None else repr(a.literal)
        args.append(f"first_token({text})" if a.first_token else str(text))
    call = f"{spec.kind}({', '.join(args)})" if args else spec.kind
    return f"{call} at {spec.position}"


MetricFn = Callable[[torch.Tensor], torch.Tensor]
