"""The batch shape a plan's step costs follow, measured on the loaded model (atpdsl.costs, atpdsl.lowering).

A compiled plan carries its shape (`workload` in the extras: positions per batch from the prompts' token lengths,
model rows per pair, vocabulary). A plan built by hand, or compiled without a tokenizer file, gets it here from
the loaded tokenizer and config, so that the steps the engine runs and records carry costs for the real model.
"""
from __future__ import annotations

from dataclasses import replace

from atpdsl.lowering import plan_workload, vocab_size
from atpdsl.plan import Plan

__all__ = ["with_workload"]


def _lengths(plan: Plan, tokenizer) -> list[int]:
    """Each pair's token count: the longer prompt (answer tails aside: they add a token or two)."""
    out = []
    for pair in plan.pairs:
        ids = [tokenizer(text, add_special_tokens=True)["input_ids"] for text in (pair.clean, pair.corrupt)]
        out.append(max(len(i) for i in ids))
    return out


def with_workload(plan: Plan, loaded) -> Plan:
    """The plan with a `workload` extra for the loaded model (the compiler's positions kept when it had them)."""
    vocab = vocab_size(loaded.config)
    if vocab is None or not plan.pairs:
        return plan
    shape = dict(plan.extras).get("workload")
    if shape:
        shape = {**shape, "vocab": vocab}
    else:
        try:
            lengths = _lengths(plan, loaded.tokenizer)
        except Exception:  # noqa: BLE001 - costs only: an unusual tokenizer leaves them at their large-model limits
            return plan
        shape = plan_workload(plan, lengths, loaded.config)
    kept = tuple((k, v) for k, v in plan.extras if k != "workload")
    return replace(plan, extras=kept + (("workload", shape),))
