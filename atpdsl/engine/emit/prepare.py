"""What `execute` would run for a plan, worked out without weights: the engine's own preparation (its steps for
this model, the node table, the trace sites, the corrections' setup) on the model built on the meta device.
The emitted program gets its data from here, so it reads the sites and runs the terms `execute` does.

What the program cannot reproduce is refused here with an EngineError naming it and why; the steps it leaves
out (they add to a run but change no node's numbers: the diagnostic, edges) are listed with the reason.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from atpdsl.arch import Arch, arch_for_config, geometry, support_problems
from atpdsl.errors import EngineError, ModelError
from atpdsl.plan import MetricSpec, Plan, Step
from atpdsl.engine.context import make_context
from atpdsl.engine.load import DTYPES, Loaded, _load_tokenizer, _location, _read_config
from atpdsl.engine.run import complete_plan
from atpdsl.engine.state import RunState
from atpdsl.engine.steps import new_state, prepare_steps

__all__ = ["Prepared", "prepare", "LEFT_OUT", "EMITTED"]

LEFT_OUT = {
    "diagnose": "the false-negative diagnostic is not emitted (it is being rewritten); run the spec with atpdsl "
                "for its bound",
    "edge_reads": "edge attribution is not emitted; run the spec with atpdsl for the circuit's edges",
    "edges": "edge attribution is not emitted; run the spec with atpdsl for the circuit's edges",
    "edge_ig": "edge attribution is not emitted; run the spec with atpdsl for the circuit's edges",
    "verify_edges": "edge attribution is not emitted; run the spec with atpdsl for the circuit's edges",
}
"""Step kinds the program leaves out, with the reason it prints: none of them changes a node's numbers."""

EMITTED = ("corrupt_forward", "clean_forward", "clean_backward", "qk_fix", "norm_fix", "graddrop_term", "exact_patch",
           "rank", "verify")
"""Step kinds the program runs (a new kind is refused until the program knows it)."""

DEFAULT_ROTARY = "atpdsl.engine.rotary:beside_attention"


@dataclass
class Prepared:
    """A plan's run as the engine prepares it, on a model without weights."""

    plan: Plan  # with its steps lowered for this model
    state: RunState  # after every kept step kind's `prepare`
    loaded: Loaded  # `hf` on the meta device; `model` is None
    location: str  # the folder or hub id the program loads
    local: bool
    kept: tuple[Step, ...]  # the steps the program runs
    left_out: tuple[Step, ...]


def _meta_model(plan: Plan, location: str, kw: dict):
    """The model's module tree with no weights (meta device): module names, shapes and attributes only."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(location, **kw)
        with torch.device("meta"):
            hf = AutoModelForCausalLM.from_config(config, trust_remote_code=kw["trust_remote_code"],
                                                  attn_implementation="eager")
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as err:
        raise ModelError(f"cannot build the module tree of {plan.model.source!r} to emit a program: {err}") from None
    hf.set_attn_implementation("eager")
    return hf.to(DTYPES[plan.model.dtype]).eval()


def _load(plan: Plan) -> tuple[Loaded, bool]:
    if plan.model.dtype not in DTYPES:
        raise ModelError(f"unknown dtype {plan.model.dtype!r} (known: {', '.join(DTYPES)})")
    location, local = _location(plan.model)
    kw = {"trust_remote_code": bool(plan.model.trust_remote_code)}
    if plan.model.revision and not local:
        kw["revision"] = plan.model.revision
    cfg = _read_config(plan.model, location, local, kw)
    arch = arch_for_config(cfg)
    tok = _load_tokenizer(plan.model, location, local, kw)
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    hf = _meta_model(plan, location, kw)
    loaded = Loaded(model=None, hf=hf, tokenizer=tok, config=cfg, arch=arch, geom=geometry(cfg),
                    device=torch.device("cpu"), dtype=DTYPES[plan.model.dtype], location=location,
                    revision=plan.model.revision, pad_id=int(pad))
    return loaded, local


def _refuse_metric(spec: MetricSpec | None, what: str) -> None:
    from atpdsl.registry import METRICS

    if spec is None:
        return
    impl = METRICS[spec.kind].impl if spec.kind in METRICS else ""
    if not impl.startswith("atpdsl.engine.metrics:"):
        raise EngineError(f"emit python: the {what} {spec.kind!r} is implemented outside atpdsl.engine.metrics "
                          f"({impl or 'no implementation'}), which the emitted program cannot copy")


def _refuse(plan: Plan, arch: Arch, config: dict, steps: tuple[Step, ...]) -> None:
    """EngineError for what the emitted program cannot reproduce."""
    method = plan.method
    if method.name not in ("atp", "atp*", "exact"):
        raise EngineError(f"emit python covers methods atp, atp* and exact, not {method.name!r} (its gradient rules "
                          f"are not plain nnsight): run this spec with atpdsl")
    if method.name != "exact" and plan.metric.kind == "kl":
        raise EngineError("emit python: metric kl has zero gradient at the clean run, so AtP cannot use it; "
                          "attribute with logit_diff, logprob, prob or loss and use kl as `eval metric`")
    problems = support_problems(arch, config, method.name, features=("emit",))
    if problems:
        raise EngineError(f"emit python: {problems[0].message}")
    _refuse_metric(plan.metric, "metric")
    _refuse_metric(plan.eval_metric, "eval metric")
    unknown = [s for s in steps if s.kind not in EMITTED and s.kind not in LEFT_OUT and s.kind != "verify_adaptive"]
    if unknown:
        raise EngineError(f"emit python does not know the step kind {unknown[0].kind!r} ({unknown[0].name}): run this "
                          f"spec with atpdsl")
    if any(s.kind == "verify_adaptive" for s in steps):
        raise EngineError("emit python: `verify until confident` alternates verification with the false-negative "
                          "diagnostic, which is not emitted; use `verify top K` or run this spec with atpdsl")
    if any(s.kind == "qk_fix" for s in steps) and arch.rotary is not None and arch.rotary.rotate != DEFAULT_ROTARY:
        raise EngineError(f"emit python: the QK fix on {arch.name} rotates q and k with {arch.rotary.rotate}, which "
                          f"the emitted program does not copy; use `qk_fix off` or run this spec with atpdsl")


def prepare(plan: Plan) -> Prepared:
    """The plan's run as the engine prepares it (ModelError, DataError or EngineError when it cannot be)."""
    loaded, local = _load(plan)
    plan = complete_plan(plan, loaded)
    _refuse(plan, loaded.arch, loaded.config, plan.steps)
    kept = tuple(s for s in plan.steps if s.kind not in LEFT_OUT)
    left_out = tuple(s for s in plan.steps if s.kind in LEFT_OUT)
    ctx = make_context(plan, loaded)
    flat = [s.name for s in ctx.sites if s.flat]
    if flat:
        raise EngineError(f"emit python: the site {flat[0]} sees [batch * positions, width] tensors, which the "
                          f"emitted program does not reshape: run this spec with atpdsl")
    state = new_state(ctx)
    state.steps = kept
    prepare_steps(state)
    return Prepared(plan, state, loaded, loaded.location, local, kept, left_out)
