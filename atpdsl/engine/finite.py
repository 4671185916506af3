"""Numbers that cannot be trusted stop the run: a NaN or an infinity in a metric, a node's value or a gradient is
reported with the pair, the run (corrupt, clean, backward) and the first site where it appears, never averaged
into a circuit of NaN scores.

Only the positions that hold tokens are checked: left padding is the model's business as long as it does not
leak into real positions (when it does, the real positions show it and the message says so).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from atpdsl.errors import EngineError
from atpdsl.engine.context import Context
from atpdsl.engine.data import Batch

__all__ = ["check_rows", "check_values"]


def _pair(ctx: Context, batch: Batch, row: int, model_row: bool = False) -> str:
    """The pair of a per-pair row, or (`model_row`) of a model row (a pair has `per_pair` of them)."""
    index = batch.indices[row // batch.per_pair if model_row else row]
    return ctx.pairs[index].origin or f"pair {index + 1}"


def _hint(ctx: Context, batch: Batch) -> str:
    padded = not bool(batch.real.all())
    if padded and ctx.loaded.dtype == torch.float64:
        return ("; with float64 some models' eager attention turns fully masked padding rows into NaN that reaches the "
                "real positions: use `dtype float32` or `batch 1` (no padding)")
    if padded:
        return "; the batch is left-padded: try `batch 1` to see whether padding is the cause"
    return "; check the model's weights and the dtype (float16 overflows easily: try bfloat16 or float32)"


def check_rows(ctx: Context, batch: Batch, values: torch.Tensor | None, what: str) -> None:
    """Per-pair numbers [b, ...] (metric rows, estimates, exact effects) must be finite."""
    if values is None:
        return
    bad = ~torch.isfinite(values.reshape(values.shape[0], -1)).all(-1)
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        raise EngineError(f"{_pair(ctx, batch, row)}: {what} is not finite ({float(values[row].flatten()[0]):g} "
                          f"or worse){_hint(ctx, batch)}")


def check_values(ctx: Context, batch: Batch, values: Mapping[str, torch.Tensor], order: Sequence[str],
                 run: str) -> None:
    """Site values (or gradients) must be finite at real positions; `order` is the order in which they were
    computed (forward order for values, reverse for gradients), so the first bad one is where it appeared."""
    present = [values[k] for k in order if values.get(k) is not None]
    if not present:
        return
    # one sum per tensor and one synchronisation: a NaN or infinity anywhere makes its sum non-finite (a float32
    # sum of finite activations does not overflow); only then look where, position by position
    if bool(torch.isfinite(torch.stack([v.sum(dtype=torch.float32) for v in present])).all()):
        return
    real = batch.real
    for key in order:
        v = values.get(key)
        if v is None or bool(torch.isfinite(v).all()):
            continue
        if v.dim() >= 2 and v.shape[:2] == real.shape:  # [b, S, ...]
            at_real = ~torch.isfinite(v).reshape(*real.shape, -1).all(-1) & real
        elif v.dim() == 4 and v.shape[0] == real.shape[0] and v.shape[2] == real.shape[1]:  # [b, heads, S, ...]
            at_real = ~torch.isfinite(v).transpose(1, 2).reshape(*real.shape, -1).all(-1) & real
        else:
            at_real = ~torch.isfinite(v).reshape(v.shape[0], -1).all(-1, keepdim=True)
        if not bool(at_real.any()):
            continue  # NaN only at padding, which no node value or metric reads
        row = int(at_real.nonzero()[0, 0])
        raise EngineError(f"{_pair(ctx, batch, row, model_row=True)}: the {run} has a NaN or infinity first at {key}"
                          f"{_hint(ctx, batch)}")
