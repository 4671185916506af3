"""A clean forward + backward whose sites are reduced as they come (atpdsl.engine.atp's streamed AtP): each
site's value is handed over as the forward makes it and its gradient as the backward reaches it (a tensor hook),
so that nothing holds every site's value and gradient at once (atpdsl.memory)."""
from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence

import torch

from atpdsl.engine.metrics import pick
from atpdsl.engine.trace import TraceOut, TraceSite, _as_bsw, _hook_points, resolve

__all__ = ["run_streamed"]


def _stream_point(group: list[TraceSite], value, rows: torch.Tensor, keep: frozenset[str], held: dict, grads: dict,
                  on_value: Callable, on_grad: Callable) -> None:
    """Inside a trace: hand one hook point's sites to `on_value` and hook their tensors' gradients (one hook per
    tensor; the hook sees the whole gradient once the backward has added up every use of the tensor)."""
    hooked: dict[int, list[TraceSite]] = {}
    tensors: dict[int, torch.Tensor] = {}
    for s in group:
        v = value[s.item] if s.item is not None else value
        shaped = _as_bsw(s, v, rows).detach()
        if s.key in keep:
            held[s.key] = shaped
        on_value(s.key, shaped)
        if isinstance(v, torch.Tensor) and v.requires_grad:
            hooked.setdefault(id(v), []).append(s)
            tensors[id(v)] = v
    for tid, members in hooked.items():
        def hook(g: torch.Tensor, members: list[TraceSite] = members) -> None:
            for s in members:
                shaped = _as_bsw(s, g, rows)
                if s.key in keep and s.grad:
                    grads[s.key] = shaped
                on_grad(s.key, shaped)

        tensors[tid].register_hook(hook)


def run_streamed(model, inputs: Mapping[str, torch.Tensor], sites: Sequence[TraceSite], *, embed: str,
                 metric: Callable[[torch.Tensor], torch.Tensor], last_pos: torch.Tensor | None,
                 on_value: Callable[[str, torch.Tensor], None], on_grad: Callable[[str, torch.Tensor], None],
                 keep: frozenset[str] = frozenset(), before_backward: Callable[[dict], None] | None = None,
                 block: str = "main") -> TraceOut:
    """One forward + backward from the metric that hands each site's value to `on_value` as the forward makes it
    and its gradient to `on_grad` as the backward reaches it, so that no caller holds every site's value and
    gradient at once (the memory of a run then stays near one forward + backward: atpdsl.memory). Sites in
    `keep` also come back as `run_trace` returns them (values, and gradients in block `block`). Flat sites are
    seen as [b, S, W]. `before_backward(kept values)` runs between the two (the value checks)."""
    rows = torch.arange(len(next(iter(inputs.values()))), device=next(iter(inputs.values())).device)
    points, _ = _hook_points(sites)
    held: dict[str, torch.Tensor] = {}
    grads: dict[str, torch.Tensor] = {}
    out: list = [None, None, None]  # metric rows (graph attached), logits at last_pos, embedding output
    with model.trace(dict(inputs), use_cache=False):
        out[2] = model.get(embed).output.requires_grad_(True)
        for point, group in points:
            _stream_point(group, resolve(model, *point), rows, keep, held, grads, on_value, on_grad)
        logits = model.output.logits
        out[0] = metric(logits)
        if last_pos is not None:
            out[1] = pick(logits, last_pos).detach()
    if before_backward is not None:
        before_backward(held)
    t0 = time.perf_counter()
    torch.autograd.grad(out[0].sum(), [out[2]])  # the hooks do the work; the embedding's gradient is dropped
    backward_s = time.perf_counter() - t0
    for s in sites:  # a kept site the gradient never reached has gradient zero (as `allow_unused` gives)
        if s.key in keep and s.grad and s.key not in grads:
            grads[s.key] = torch.zeros_like(held[s.key])
    return TraceOut(acts=held, grads={block: grads}, metric=out[0].detach(), last=out[1], backward_s=backward_s)
