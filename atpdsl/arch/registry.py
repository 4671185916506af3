"""The architecture registry: model_type -> Arch record (the built-ins, plus any record `register`ed)."""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from atpdsl.arch.known import BUILTIN
from atpdsl.arch.record import Arch
from atpdsl.errors import ModelError

__all__ = ["ARCHS", "register", "unregister", "registered", "all_archs", "arch_for_config", "supported_model_types"]

ARCHS: tuple[Arch, ...] = BUILTIN
"""The architectures atpdsl ships."""

_BY_TYPE: dict[str, Arch] = {}


def register(arch: Arch) -> Arch:
    """Make `arch` the record of its model types (ValueError if another record already claims one)."""
    taken = [t for t in arch.model_types if t in _BY_TYPE and _BY_TYPE[t] is not arch]
    if taken:
        raise ValueError(f"model_type {', '.join(map(repr, taken))} already has a record "
                         f"({_BY_TYPE[taken[0]].name}); unregister it first")
    for t in arch.model_types:
        _BY_TYPE[t] = arch
    return arch


def unregister(arch: Arch) -> None:
    """Forget `arch` (its model types become unsupported unless another record is registered)."""
    for t in arch.model_types:
        if _BY_TYPE.get(t) is arch:
            del _BY_TYPE[t]


@contextmanager
def registered(arch: Arch) -> Iterator[Arch]:
    """`register(arch)` for the duration of a with block."""
    register(arch)
    try:
        yield arch
    finally:
        unregister(arch)


def all_archs() -> list[Arch]:
    """Every registered record, each once."""
    out: list[Arch] = []
    for arch in _BY_TYPE.values():
        if arch not in out:
            out.append(arch)
    return out


def supported_model_types() -> list[str]:
    """Every model_type with a record."""
    return sorted(_BY_TYPE)


def arch_for_config(config: Mapping[str, Any]) -> Arch:
    """The Arch of a config dict (a config.json); ModelError naming the supported model types."""
    model_type = config.get("model_type")
    arch = _BY_TYPE.get(str(model_type)) if model_type is not None else None
    if arch is None:
        raise ModelError(
            f"unsupported model_type {model_type!r}: atpdsl knows where nodes live for "
            f"{', '.join(supported_model_types())} (an architecture is one `Arch` record: see atpdsl/arch/known.py, "
            f"and atpdsl.arch.register for records defined elsewhere)"
        )
    return arch


for _arch in BUILTIN:
    register(_arch)
