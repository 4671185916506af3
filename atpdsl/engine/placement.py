"""Where and how a model is placed: dtype, attention implementation, one device or a device map (accelerate),
and the memory checks around a run (the estimate before loading, a clear error when memory runs out anyway).

The loader (atpdsl.engine.load) asks `load_options` what to pass to `from_pretrained` and `dispatched` whether
accelerate placed the model itself (then the engine must not move it).

Attention: `eager` materialises the pattern (the QK fix, the norm fix for values and the edges read it); `sdpa`
does not, and is faster and smaller for a forward + backward (benchmarks/bench_scale.py). The compiler resolves
`attention auto` from the plan's steps (atpdsl.memory.reads_pattern); `auto` reaching the loader means eager.
"""
from __future__ import annotations

import weakref
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch

from atpdsl.errors import AtpError, ModelError
from atpdsl.memory import format_bytes
from atpdsl.plan import ModelRef, Plan

__all__ = ["MemoryPlanError", "set_remote", "remote_of", "attention_for", "load_options", "dispatched", "device_map_for", "check_fits",
           "memory_guard", "check_attention", "device_memory", "input_device",
           "offloaded", "readable_weights", "named_weights"]


class MemoryPlanError(AtpError):
    """A run that does not fit its memory, before it starts or when the device runs out (exit 1, never a bug)."""


_REMOTE: dict[int, tuple[weakref.ref, bool | str]] = {}


def set_remote(model: Any, mode: bool | str) -> None:
    """Run every trace of this nnsight model remotely: True on NDIF, "local" through nnsight's simulation of the
    remote path here (atpdsl.engine.remote); False: here, as usual."""
    if mode:
        _REMOTE[id(model)] = (weakref.ref(model), mode)
    else:
        _REMOTE.pop(id(model), None)


def remote_of(model: Any) -> bool | str:
    """How this nnsight model's traces run (see `set_remote`)."""
    entry = _REMOTE.get(id(model))
    return entry[1] if entry is not None and entry[0]() is model else False


def attention_for(ref: ModelRef) -> str:
    """The attention implementation to load: the spec's choice; `auto` unresolved (a hand-built plan) is eager."""
    return ref.attention if ref.attention in ("eager", "sdpa") else "eager"


def _gpu_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def device_map_for(ref: ModelRef) -> str | dict | None:
    """accelerate's device map: `device auto` over several GPUs, or any device with an `offload` folder or a
    `memory` budget that the weights may exceed; None for a model on one device (moved there whole)."""
    if ref.remote or ref.device != "auto":
        return None
    if _gpu_count() > 1 or ref.offload is not None:
        return "auto"
    return None


def _max_memory(ref: ModelRef) -> dict[Any, int] | None:
    """accelerate's per-device limits from the `memory` budget (every GPU, or the CPU when there is none)."""
    if ref.memory is None:
        return None
    gpus = _gpu_count()
    limits: dict[Any, int] = {i: ref.memory for i in range(gpus)}
    limits["cpu"] = ref.memory if not gpus else max(ref.memory, 1 << 30)
    return limits


def load_options(ref: ModelRef, dtype: torch.dtype) -> dict[str, Any]:
    """Keyword arguments for `from_pretrained`: dtype, attention, and a device map when accelerate places it."""
    kw: dict[str, Any] = {"dtype": dtype, "attn_implementation": attention_for(ref)}
    device_map = device_map_for(ref)
    if device_map is not None:
        _need_accelerate()
        kw["device_map"] = device_map
        limits = _max_memory(ref)
        if limits is not None:
            kw["max_memory"] = limits
        if ref.offload is not None:
            kw["offload_folder"] = ref.offload
    return kw


def _need_accelerate() -> None:
    try:
        import accelerate  # noqa: F401 - only its presence is checked here
    except ModuleNotFoundError:
        raise ModelError("`device auto` over several devices or with `offload` needs accelerate: "
                         "pip install 'atpdsl[scale]' (or pip install accelerate)") from None


def dispatched(hf: Any) -> bool:
    """Whether accelerate placed the model over devices (its `hf_device_map`): the engine must not move it."""
    device_map = getattr(hf, "hf_device_map", None)
    return bool(device_map) and len(set(map(str, device_map.values()))) > 1


def offloaded(hf: Any) -> bool:
    """Whether accelerate keeps some weights off the devices (on disk, loaded for each forward)."""
    return any(str(w) in ("disk", "meta") for w in (getattr(hf, "hf_device_map", None) or {}).values())


def _materialize(module: Any) -> Any:
    """Load a module's offloaded weights onto its execution device (accelerate offloads them again after the
    module's next forward), so that steps reading weights outside a forward (the norm fix, the edges) see them."""
    from accelerate.utils import has_offloaded_params

    for sub in module.modules():
        if has_offloaded_params(sub) and any(t.device.type == "meta" for t in sub.parameters(recurse=False)):
            sub._hf_hook.pre_forward(sub)
    return module


def readable_weights(hf: Any) -> None:
    """For an offloaded model: `hf.get_submodule(path)` (how the engine reads weights) loads that module's weights
    first. Only the modules asked for are loaded, so memory stays near the offloaded model's."""
    if not offloaded(hf):
        return
    find = hf.get_submodule
    hf.get_submodule = lambda target: _materialize(find(target))


def named_weights(hf: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """Every parameter with its values: offloaded ones read from accelerate's offload store one at a time."""
    for module_name, module in hf.named_modules():
        hook = getattr(module, "_hf_hook", None)
        store = getattr(hook, "weights_map", None)
        for name, param in module.named_parameters(recurse=False):
            full = f"{module_name}.{name}" if module_name else name
            if param.device.type == "meta" and store is not None and name in store:
                yield full, store[name]
            elif param.device.type != "meta":
                yield full, param


def input_device(hf: Any) -> torch.device:
    """Where inputs go: the first device of accelerate's map that computes (not `disk` or `meta`), else the
    device of the first parameter."""
    for where in (getattr(hf, "hf_device_map", None) or {}).values():
        if str(where) not in ("disk", "meta"):
            return torch.device(f"cuda:{where}" if isinstance(where, int) else str(where))
    return next(hf.parameters()).device


def device_memory(device: torch.device) -> int | None:
    """Total memory of a CUDA device (None elsewhere: the CPU's budget was checked when the spec compiled)."""
    if device.type == "cuda" and torch.cuda.is_available():
        return int(torch.cuda.get_device_properties(device).total_memory)
    return None


def _estimate(plan: Plan) -> Mapping[str, Any] | None:
    return dict(plan.extras).get("memory")


def _planned_device(ref: ModelRef) -> torch.device | None:
    name = ref.device
    if name == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else None
    return torch.device(name) if name.startswith("cuda") and torch.cuda.is_available() else None


def check_fits(plan: Plan) -> None:
    """Before loading: MemoryPlanError when the plan's estimate exceeds its CUDA device's memory (known only
    here; budgets known at compile time were checked there, atpdsl.language.checker_memory)."""
    device = _planned_device(plan.model)
    mem = _estimate(plan)
    total = device_memory(device) if device is not None else None
    if mem is None or total is None or plan.model.memory is not None or plan.model.remote:
        return
    from atpdsl.memory import RESERVE

    if mem["peak"] * RESERVE > total:
        fit = mem.get("largest_batch")
        raise MemoryPlanError(
            f"the run needs about {format_bytes(mem['peak'])} on {device} (peak in the {mem['phase']}) but the device "
            f"has {format_bytes(total)}; give the model `memory \"{format_bytes(total).replace(' ', '')}\"` and "
            f"`batch auto` to pick a batch that fits" + (f" (batch {fit} fits)" if fit else ""))


def check_attention(plan: Plan, hf: Any) -> None:
    """ModelError when the model runs fused attention but a step of the plan reads the attention pattern."""
    from atpdsl.memory import reads_pattern

    implementation = getattr(hf.config, "_attn_implementation", "eager")
    kinds = [s.kind for s in plan.steps]
    if implementation != "eager" and (reads_pattern(kinds) or plan.method.name == "relp"):
        readers = sorted({s.name for s in plan.steps if reads_pattern([s.kind])})
        raise ModelError(f"the model runs {implementation} attention, but {', '.join(readers) or 'RelP'} read(s) the "
                         f"attention pattern, which only eager attention makes: use `attention eager` or `auto`")


def _used(device: torch.device | None) -> str:
    if device is not None and device.type == "cuda" and torch.cuda.is_available():
        return f"{format_bytes(torch.cuda.max_memory_allocated(device))} allocated at the peak"
    try:
        import resource

        return f"{format_bytes(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)} resident at the peak"
    except (ImportError, OSError):
        return "usage unknown"


@contextmanager
def memory_guard(plan: Plan, device: torch.device | None = None) -> Iterator[None]:
    """Turn running out of memory (torch.OutOfMemoryError, MemoryError) into a MemoryPlanError with the numbers."""
    try:
        yield
    except (torch.OutOfMemoryError, MemoryError) as err:
        mem = _estimate(plan)
        planned = (f"; the plan estimated {format_bytes(mem['peak'])} for batch {mem['batch']}" if mem else "")
        fit = mem.get("largest_batch") if mem else None
        hint = (f"; batch {fit} fits the budget" if fit and fit < plan.batch else
                "; lower `batch`, set `memory \"…\"` to the memory really free and use `batch auto`")
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise MemoryPlanError(f"out of memory during the run ({_used(device)}{planned}): {first}{hint}") from None
