"""Validate a statement's `{ key value ... }` block against its registry table (atpdsl.registry.*_SETTINGS)."""
from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from atpdsl.language import syntax as n
from atpdsl.language.diagnostics import Diagnostic, error, guess_hint, quote
from atpdsl.registry import GRADDROP_MODES, SWITCHES, SettingInfo

__all__ = ["check_settings", "shown_value"]

_DEVICE = re.compile(r"^(cpu|mps|auto|cuda(:[0-9]+)?)$")


def shown_value(v: n.Value) -> str:
    """A setting value as messages show it."""
    if isinstance(v, n.Num):
        return v.shown
    if isinstance(v, n.Str):
        return f'"{v.value}"'
    return quote(v.text)


def _per(info: SettingInfo, s: n.Setting) -> tuple[Any, Diagnostic | None]:
    assert s.per is not None
    if info.kind != "graddrop":
        return None, error("E104", f"{quote(info.key)} takes a value, not `per ...`", s.span)
    if s.per.name not in GRADDROP_MODES:
        return None, error("E104", f"`graddrop per` takes `layer` or `sublayer`, got {quote(s.per.name)}",
                           s.per.span, guess_hint(s.per.name, GRADDROP_MODES, "modes"))
    return (True, s.per.name), None


def _value(info: SettingInfo, s: n.Setting) -> tuple[Any, Diagnostic | None]:
    """A setting's normalized value, or the error saying what it should have been."""
    key = info.key
    if s.per is not None:
        return _per(info, s)
    v = s.value
    assert v is not None  # the grammar gives a setting either a value or `per`
    text = v.text if isinstance(v, n.Word) else v.value if isinstance(v, n.Str) else None
    if info.kind in ("switch", "graddrop"):
        if isinstance(v, n.Word) and v.text in SWITCHES:
            return ((SWITCHES[v.text], "layer") if info.kind == "graddrop" else SWITCHES[v.text]), None
        allowed = "`on`, `off`, `per layer` or `per sublayer`" if info.kind == "graddrop" else "`on` or `off`"
        return None, error("E104", f"{quote(key)} is {allowed}, got {shown_value(v)}", v.span)
    if info.kind == "number":
        assert info.bound is not None
        if not isinstance(v, n.Num) or not info.bound.accepts(v.value):
            return None, error("E106", f"{quote(key)} must be {info.bound.describe(v.value if isinstance(v, n.Num) else None)}, got {shown_value(v)}", v.span)
        return v.value, None
    if text is None:
        return None, error("E104", f"{quote(key)} takes a word or a string, got {shown_value(v)}", v.span)
    if info.kind == "choice" and text not in info.choices:
        return None, error("E104", f"unknown {key} {quote(text)}", v.span,
                           guess_hint(text, info.choices, "expected one of"))
    if info.kind == "device" and not _DEVICE.match(text):
        return None, error("E104", f"unknown device {quote(text)}", v.span,
                           'expected cpu, cuda, cuda:N, mps or auto (quote it: device "cuda:1")')
    if not text:
        return None, error("E104", f"{quote(key)} is empty", v.span)
    return text, None


def check_settings(block: str, settings: tuple[n.Setting, ...], table: Mapping[str, SettingInfo]
                   ) -> tuple[dict[str, Any], list[Diagnostic]]:
    """Validate `{ key value ... }` against a table; returns key -> normalized value, and the diagnostics."""
    out: dict[str, Any] = {}
    diags: list[Diagnostic] = []
    first: dict[str, n.Setting] = {}
    for s in settings:
        key = s.key.name
        info = table.get(key)
        if info is None:
            diags.append(error("E103", f"unknown {block} setting {quote(key)}", s.key.span,
                               guess_hint(key, table, f"{block} settings")))
            continue
        if key in first:
            diags.append(error("E105", f"duplicate setting {quote(key)}", s.key.span,
                               f"the first is on line {first[key].span.line}"))
            continue
        first[key] = s
        value, problem = _value(info, s)
        if problem is not None:
            diags.append(problem)
        else:
            out[key] = value
    return out, diags
