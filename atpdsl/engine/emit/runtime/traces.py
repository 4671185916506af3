"""The nnsight traces: plain `with model.trace(...)` blocks driven by the plan's site lists.

A read is (key, module path, "input" | "output", tuple item or None), in forward order: a module's values are
requested as the model reaches them. Gradients are read inside `with metric.backward():` in the order the
backward reaches the tensors (the plan lists them so: an attention pattern is made before the output projection
although its module returns it after). Setting a gradient to zeros there stops it flowing on (GradDrop).
Only torch, nnsight and functions of this program run inside a trace body.
"""
from __future__ import annotations

import nnsight
import torch

from atpdsl.engine.metrics import pick


def hook_points(reads: list) -> list:
    """Reads grouped by hook point (module, attr), in order: each point is requested once."""
    points: list = []
    for key, module, attr, item in reads:
        if points and points[-1][0] == module and points[-1][1] == attr:
            points[-1][2].append((key, item))
        else:
            points.append((module, attr, [(key, item)]))
    return points


def read_forward(model, inputs: dict, reads: list, last_pos: torch.Tensor) -> tuple:
    """A forward without gradients: every read's value, and the logits at `last_pos` ([b], or [b, K]: K
    positions per row)."""
    points = hook_points(reads)
    with torch.no_grad():
        with model.trace(dict(inputs), use_cache=False):
            acts = nnsight.save({})
            for module, attr, keys in points:
                value = getattr(model.get(module), attr)
                for key, item in keys:
                    acts[key] = value if item is None else value[item]
            last = nnsight.save(pick(model.output.logits, last_pos))
    return dict(acts), last


def forward_backward(model, inputs: dict, reads: list, embed: str, metric, last_pos: torch.Tensor,
                     grad_units: list, zero: frozenset = frozenset()) -> tuple:
    """A forward keeping the graph, then one backward from the sum of `metric(logits)` [b].

    Returns the reads' values (detached), the gradients of every key in `grad_units` (each unit: the keys that
    read one tensor), the metric rows and the logits at `last_pos`. The gradient into each tensor of a unit in
    `zero` is set to zeros, so nothing flows on through it (GradDrop's cut block writes)."""
    points = hook_points(reads)
    with model.trace(dict(inputs), use_cache=False):
        model.get(embed).output.requires_grad_(True)  # the parameters are frozen: the graph starts here
        acts = nnsight.save({})
        for module, attr, keys in points:
            value = getattr(model.get(module), attr)
            for key, item in keys:
                acts[key] = value if item is None else value[item]
        logits = model.output.logits
        out = nnsight.save([None, None])
        values = metric(logits)
        out[0] = values.detach()
        out[1] = pick(logits, last_pos).detach()
        grads = nnsight.save({})
        with values.sum().backward():
            for unit in grad_units:
                head = unit[0]
                if zero.intersection(unit):
                    acts[head].grad = torch.zeros_like(acts[head].grad)
                else:
                    grad = acts[head].grad
                    for key in unit:
                        grads[key] = grad
        for key in list(acts):
            acts[key] = acts[key].detach()
    return dict(acts), dict(grads), out[0], out[1]


def patched_forward(model, inputs: dict, patches: list, last_pos: torch.Tensor) -> torch.Tensor:
    """A forward without gradients in which each (module, attr, mask, source) sets the value to `source` where
    `mask` is True; returns the logits at `last_pos`. Patches come in forward order."""
    with torch.no_grad():
        with model.trace(dict(inputs), use_cache=False):
            for module, attr, mask, source in patches:
                envoy = model.get(module)
                value = getattr(envoy, attr)
                setattr(envoy, attr, torch.where(mask, source.to(value.dtype), value))
            last = nnsight.save(pick(model.output.logits, last_pos))
    return last
