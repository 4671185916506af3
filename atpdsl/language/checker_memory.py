"""The model statement's scale settings (`memory`, `remote`, `offload`) and the memory plan a compiled spec
gets: token lengths from the tokenizer file when there is one, the budget, `batch auto`, and the refusal of a
run whose estimate does not fit (no torch: atpdsl.memory does the arithmetic)."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Mapping
from typing import Any

from atpdsl.language import syntax as n
from atpdsl.language.diagnostics import Diagnostic, error, quote, warning
from atpdsl.memory import (
    RESERVE, MemoryEstimate, estimate, format_bytes, largest_batch, model_sizes, parse_size, reads_pattern,
    shape_for,
)

__all__ = ["model_setting_problems", "remote_method_problems", "resolve_attention", "pair_lengths", "device_budget", "memory_summary", "MEMORY_CODE"]

MEMORY_CODE = "E901"
"""The diagnostic of a run whose memory estimate does not fit its budget."""

_CHARS_PER_TOKEN = 4  # a rough English rate, used only when no tokenizer file is at hand (and then said)


def model_setting_problems(stmt: n.Model, values: Mapping[str, Any], model: Any) -> list[Diagnostic]:
    """`memory` must be a size; `remote on` needs a hub id (NDIF serves hub models, not local folders)."""
    spans = {s.key.name: (s.value.span if s.value is not None else s.key.span) for s in stmt.settings}
    out: list[Diagnostic] = []
    if "memory" in values:
        try:
            parse_size(values["memory"])
        except ValueError as e:
            out.append(error("E104", str(e), spans["memory"], 'write a size such as "80GB", "24GiB" or "512MB"'))
    if values.get("remote") is True:
        if stmt.zoo:
            out.append(error("E207", "`remote on` needs a hub id: NDIF cannot run a zoo model", spans["remote"]))
        elif model is not None and model.folder is not None:
            out.append(error("E207", f"`remote on` needs a hub id, but {quote(stmt.source.value)} is a local folder",
                             spans["remote"], "NDIF runs models it hosts, named like `EleutherAI/pythia-70m`;"
                                              " drop `remote on` to run the folder here"))
        if "offload" in values:
            out.append(error("E207", "`offload` is for local runs; NDIF places the model itself", spans["offload"]))
    return out


def remote_method_problems(model_stmt: n.Model | None, method_stmt: n.Method | None) -> list[Diagnostic]:
    """`remote on` with an AtP* correction that needs the model here (atpdsl.engine.remote.NOT_REMOTE)."""
    if model_stmt is None or method_stmt is None or method_stmt.full_name != "atp*":
        return []
    remote = next((s for s in model_stmt.settings if s.key.name == "remote"), None)
    if remote is None or not (isinstance(remote.value, n.Word) and remote.value.text in ("on", "true", "yes")):
        return []
    why = {"graddrop": "GradDrop's terms take vector-Jacobian products on the clean graph kept between steps, "
                       "which on NDIF stays on the server",
           "norm_fix": "the norm fix reads the model's weights outside a trace; a remote model's weights are not here"}
    values = {s.key.name: s for s in method_stmt.settings}
    out = []
    for key, reason in why.items():
        setting = values.get(key)
        off = setting is not None and isinstance(setting.value, n.Word) and setting.value.text in ("off", "false", "no")
        if (key == "graddrop" and not off) or (key == "norm_fix" and setting is not None and not off):
            span = setting.key.span if setting is not None else method_stmt.name.span
            out.append(error("E207", f"`remote on` cannot run {key}: {reason}", span,
                             f"write `{key} off` in the method block, or run the model here"))
    return out


def pair_lengths(result: Any) -> tuple[list[int], str | None]:
    """Each pair's token count (the longer prompt plus its longest answer tail), and a note when they are only
    estimated from characters (no tokenizer file at check time)."""
    from atpdsl.language.encoding import encode_pairs

    pairs = list(result.pairs)
    model = result.model
    tok_file = getattr(model, "tokenizer_file", None)
    if tok_file is not None:
        try:
            from atpdsl.language.tokenizer import load_file_tokenizer

            tok = load_file_tokenizer(tok_file)
            metric = _metric(result)
            encoded, _ = encode_pairs(tok, pairs, metric[0], metric[1])
            if all(e is not None for e in encoded):
                return [max(len(e.clean), len(e.corrupt)) + max(len(t) for t in e.tails) for e in encoded], None
        except Exception:  # noqa: BLE001 - the token checks report tokenizer problems; here we only estimate
            pass
    rough = [max(len(p.clean), len(p.corrupt)) // _CHARS_PER_TOKEN + 2 for p in pairs]
    return rough, f"token lengths estimated from characters ({_CHARS_PER_TOKEN} per token): no tokenizer file"


def _metric(result: Any):
    from atpdsl.language.metric_check import metric_spec

    metrics = result.spec.of(n.Metric)
    main = next(m for m in metrics if not m.eval)
    return metric_spec(main), metric_spec(next((m for m in metrics if m.eval), None))


def _meminfo_total() -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _gpu_totals() -> list[int]:
    """Each visible NVIDIA GPU's memory, from nvidia-smi (empty when there is none or it does not answer)."""
    tool = shutil.which("nvidia-smi")
    if tool is None:
        return []
    try:
        out = subprocess.run([tool, "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    totals = [int(x) * 2**20 for x in re.findall(r"\d+", out)]
    if visible is not None and visible.strip() not in ("", "all"):
        keep = [int(i) for i in re.findall(r"\d+", visible) if int(i) < len(totals)]
        totals = [totals[i] for i in keep]
    return totals


def device_budget(device: str, memory: str | None, remote: bool) -> tuple[int | None, str, int]:
    """(bytes per device or None, where that figure comes from, device count) for a model statement's settings."""
    if memory is not None:
        return parse_size(memory), "the `memory` setting", 1
    if remote:
        return None, "NDIF's (not known here)", 1
    if device == "cpu":
        total = _meminfo_total()
        return total, "this machine's memory" if total else "unknown", 1
    if device.startswith("cuda") or device == "auto":
        totals = _gpu_totals()
        if totals:
            index = int(device.split(":")[1]) if ":" in device else 0
            if device == "auto":
                return min(totals), f"{len(totals)} GPU(s), {format_bytes(min(totals))} each", len(totals)
            if index < len(totals):
                return totals[index], f"GPU {index}", 1
        if device == "auto":
            total = _meminfo_total()
            return total, "this machine's memory (no GPU found)" if total else "unknown", 1
    return None, "unknown at plan time (the run checks the device)", 1


def resolve_attention(plan: Any) -> str:
    """`attention auto`: eager where a step reads the attention pattern (the QK fix, the norm fix, the edges) or the
    method changes how gradients flow through it (RelP), else sdpa (faster and smaller for a forward + backward:
    benchmarks/bench_scale.py). An explicit choice stays."""
    if plan.model.attention != "auto":
        return plan.model.attention
    kinds = [s.kind for s in plan.steps]
    return "eager" if reads_pattern(kinds) or plan.method.name == "relp" else "sdpa"


EDGE_NOTICE = 10**9
"""W902 says when the edges make half or more of an estimated peak of at least this many bytes (smaller runs fit
almost anywhere)."""


def _without_edges(plan: Any, attention: str) -> Any:
    """The plan lowered as if its edges were off (`select edges none`), with the attention that would then run
    (`attention`: the spec's setting; `auto` picks sdpa when nothing else reads the pattern); None when that
    changes no step."""
    from dataclasses import replace

    from atpdsl.lowering import steps_for

    steps = steps_for(plan, edges_ok=False)
    if [s.kind for s in steps] == [s.kind for s in plan.steps]:
        return None
    bare = replace(plan, steps=steps, model=replace(plan.model, attention=attention))
    return replace(bare, model=replace(bare.model, attention=resolve_attention(bare)))


def _fits_text(est: MemoryEstimate, budget: int) -> str:
    top = sorted(est.parts, key=lambda p: -p.bytes)[:3]
    parts = ", ".join(f"{p.name} {format_bytes(p.bytes)}" for p in top)
    return (f"the run needs about {format_bytes(est.peak)} per device ({parts}; peak in the "
            f"{est.phase}), more than the budget of {format_bytes(budget)}")


def memory_summary(result: Any, plan: Any, batch_auto: bool, spoken_attention: str
                   ) -> tuple[dict[str, Any] | None, int, list[Diagnostic]]:
    """The memory plan as plain data for the plan's extras, the batch to run (`batch auto` resolved), and an
    error when the estimate does not fit the budget. None when the model's config is not on disk.
    `spoken_attention`: the spec's attention setting before it was resolved (what `select edges none` would run
    with is resolved from it)."""
    info = result.model
    if info is None or info.config is None or info.arch is None or not plan.pairs:
        return None, plan.batch, []
    model = plan.model
    budget, source, devices = device_budget(model.device, _setting(result, "memory"), model.remote)
    attention = model.attention
    lengths, note = pair_lengths(result)
    shape = shape_for(plan, info.config, lengths, attention=attention, devices=devices)
    sizes = model_sizes(info.config, info.arch.name, info.arch.is_parallel(info.config))
    diags: list[Diagnostic] = []
    span = _model_span(result)
    fit = largest_batch(sizes, shape, lengths, budget) if budget is not None else None
    batch = plan.batch
    if batch_auto:
        batch = fit or 1
        if fit is None:
            diags.append(warning("W901", f"`batch auto` has no memory budget ({source}): batch 1", span,
                                 'give the model a `memory "…"` setting'))
    est = estimate(sizes, shape, batch, lengths)
    bare = _without_edges(plan, spoken_attention)  # the same run without edges
    edge_bytes = 0 if bare is None else est.peak - estimate(
        sizes, shape_for(bare, info.config, lengths, attention=bare.model.attention, devices=devices), batch,
        lengths).peak
    if budget is not None and est.peak * RESERVE > budget and not model.remote:
        hint = (f"batch {fit} fits (`batch {fit}` or `batch auto`)" if fit else
                "no batch fits: score fewer nodes (per-position groups, layers) or use a smaller dtype")
        if edge_bytes * 4 >= est.peak:
            hint += f"; the edges add about {format_bytes(edge_bytes)} to it: `select edges none` computes none"
        diags.append(error(MEMORY_CODE, _fits_text(est, budget), span, hint))
    elif edge_bytes * 2 >= est.peak and est.peak >= EDGE_NOTICE:
        diags.append(warning("W902", f"the edges' kept reads raise the run's estimated peak from "
                             f"{format_bytes(est.peak - edge_bytes)} to {format_bytes(est.peak)} per device", span,
                             "`select edges none` computes no edges (the nodes' scores are the same)"))
    summary = {"device": model.device, "budget": budget, "budget_source": source, "devices": devices,
               "attention": attention, "batch": batch, "largest_batch": fit, "tokens": est.tokens,
               "peak": est.peak, "phase": est.phase, "parts": [[p.name, p.bytes, p.what] for p in est.parts],
               "notes": [x for x in (note, None if sizes.known else
                                     f"{sizes.arch}: activations estimated with Llama's factors") if x]}
    return summary, batch, diags


def _setting(result: Any, key: str) -> str | None:
    stmt = next(iter(result.spec.of(n.Model)), None)
    for s in stmt.settings if stmt is not None else ():
        if s.key.name == key and s.value is not None:
            return getattr(s.value, "value", None) if not isinstance(s.value, n.Word) else s.value.text
    return None


def _model_span(result: Any):
    stmt = next(iter(result.spec.of(n.Model)), None)
    return stmt.span if stmt is not None else None


def with_memory_plan(result: Any, plan: Any) -> Any:
    """The plan with its memory plan in the extras (`memory`) and `batch auto` resolved; SpecError (E901) when the
    estimate does not fit the budget, naming the batch that would."""
    import math
    from dataclasses import replace

    from atpdsl.errors import SpecError
    from atpdsl.language.diagnostics import render_concise

    batch_auto = any(isinstance(s.value, n.Ident) for s in result.spec.of(n.Batch)[:1])

    spoken = plan.model.attention
    plan = replace(plan, model=replace(plan.model, attention=resolve_attention(plan)))
    summary, batch, diags = memory_summary(result, plan, batch_auto, spoken)
    errors = [d for d in diags if d.is_error]
    if errors:
        raise SpecError(errors, render_concise(errors))
    if summary is None:
        if batch_auto:
            note = "`batch auto`: the model's config is not on disk, so no memory estimate: batch 8"
            plan = replace(plan, warnings=plan.warnings + (note,))
        return plan
    extras = [(k, v) for k, v in plan.extras if k != "batches"]
    extras.append(("batches", math.ceil(len(plan.pairs) / batch)))
    said = tuple(render_concise([d]) for d in diags)
    extras.append(("memory", {**summary, "warnings": list(said)}))  # `check` and `plan` print them from here
    warnings = plan.warnings + said
    return replace(plan, batch=batch, extras=tuple(extras), warnings=warnings)
