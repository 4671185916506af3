"""Shared helpers for the engine tests: hand-built plans, tiny saved model folders, stories260K pairs."""
from __future__ import annotations

import json
from dataclasses import replace
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

import tiny_models as tm

from atpdsl.plan import (
    MethodSpec,
    MetricArg,
    MetricSpec,
    ModelRef,
    NodeGroup,
    Plan,
    PromptPair,
    SourceRef,
    Verification,
)

STORIES = Path(__file__).resolve().parents[3] / "shared" / "models" / "stories260K"  # ../shared beside the checkout
SHARED = STORIES.parents[1]
PRONOUN = SHARED / "data" / "stories260K-pronoun.jsonl"

LOGIT_DIFF = MetricSpec("logit_diff", (MetricArg("answer"), MetricArg("wrong")), where=SourceRef("t.atp", 3, 8))


def pair(d: dict[str, str], origin: str = "") -> PromptPair:
    """A PromptPair from a dict with clean, corrupt and any further fields."""
    fields = tuple((k, v) for k, v in d.items() if k not in ("clean", "corrupt"))
    return PromptPair(d["clean"], d["corrupt"], fields, origin=origin)


def pearson(a, b) -> float:
    """Pearson correlation of two equal-length sequences, in float64."""
    return float(torch.corrcoef(torch.stack([torch.as_tensor(a, dtype=torch.float64),
                                             torch.as_tensor(b, dtype=torch.float64)]))[0, 1])


def stories_pairs(n: int = 20) -> list[dict[str, str]]:
    rows = [json.loads(line) for line in PRONOUN.read_text().splitlines() if line.strip()]
    return rows[:n]


def make_plan(source: str | Path, pairs: list[dict[str, str]] | list[PromptPair], nodes: tuple[NodeGroup, ...], *,
              method: str = "atp", metric: MetricSpec = LOGIT_DIFF, batch: int = 8, **kw: Any) -> Plan:
    """A Plan built by hand (the compiler's job in production)."""
    pp = tuple(p if isinstance(p, PromptPair) else pair(p, f"pairs.jsonl:{i + 1}") for i, p in enumerate(pairs))
    method_spec = kw.pop("method_spec", MethodSpec(method))
    return Plan(spec_file="test.atp", spec_text="", spec_hash="test", model=ModelRef(str(source)), pairs=pp,
                metric=metric, nodes=nodes, method=method_spec, batch=batch, **kw)


def with_(plan: Plan, **kw: Any) -> Plan:
    """The plan with fields changed and its steps lowered again (atpdsl.lowering.replan)."""
    from atpdsl.lowering import replan

    return replan(plan, **kw)


@lru_cache(maxsize=None)
def tiny_folder(name: str, root: str, **kw: Any) -> Path:
    """A tiny random model of `name` (tiny_models.BUILDERS; "neox_seq" = sequential residual) saved under root."""
    builder = tm.make_neox if name == "neox_seq" else tm.BUILDERS[name]
    extra = {"parallel": False} if name == "neox_seq" else {}
    model = builder(**extra, **kw)
    return tm.save_model(model, tm.make_tokenizer(), Path(root) / name)


def per_pair(result) -> dict[str, tuple[float, ...]]:
    """Node name -> per-pair estimates of a RunResult (write_per_pair=True)."""
    return {n.name: n.per_pair for n in result.nodes}


def max_abs_diff(a: dict[str, Any], b: dict[str, Any]) -> float:
    assert set(a) == set(b), (sorted(set(a) ^ set(b)))[:10]
    return max(float(torch.tensor(a[k], dtype=torch.float64).sub(torch.tensor(b[k], dtype=torch.float64))
                     .abs().max()) for k in a)


__all__ = ["tm", "STORIES", "PRONOUN", "SHARED", "LOGIT_DIFF", "pair", "stories_pairs", "make_plan", "with_",
           "tiny_folder", "per_pair", "max_abs_diff", "NodeGroup", "MetricSpec", "MetricArg", "Verification",
           "SourceRef", "planted_neuron_model", "first_batch"]


def planted_neuron_model():
    """A tiny 2-layer GPT-NeoX with no final norm (every node enters the logits linearly) and one planted neuron,
    L1.N13, whose output weights are x6 (mean effect about -1.44 on TINY_PAIRS; every other |effect| < 0.27)."""
    from atpdsl.engine.load import wrap_model

    model = tm.make_neox(n_layer=2)
    model.gpt_neox.final_layer_norm = torch.nn.Identity()
    with torch.no_grad():
        model.gpt_neox.layers[1].mlp.dense_4h_to_h.weight[:, 13] *= 6.0
    return wrap_model(model, tm.make_tokenizer())


def first_batch(ctx, kinds: set[str] | None = None):
    """Prepare a run of the context's plan and run the first batch's steps (only those of `kinds` when given).
    Returns (state, work); the caller frees the kept graph with `work.clean.live.clear()`."""
    from atpdsl.engine.run import complete_plan
    from atpdsl.engine.steps import new_state, prepare_steps, run_batch

    ctx.plan = complete_plan(ctx.plan, ctx.loaded)
    state = new_state(ctx)
    prepare_steps(state)
    return state, run_batch(state, ctx.batches[0], kinds)
