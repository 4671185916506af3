"""A JSON document written piece by piece, so that a list of millions of rows is never held whole.

The text is what `json.dumps(doc, indent=1, allow_nan=False)` gives for the document with every value made
plain (arrays and tensors as lists, dataclasses as objects) and every NaN or infinity written as null, its place
listed under a last top-level key `non_finite` (standard JSON has neither). A `Lazy` value is a list whose items
are made, made plain and written one at a time.
"""
from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

__all__ = ["Lazy", "chunks", "plain", "NON_FINITE"]

NON_FINITE = "non_finite"


@dataclasses.dataclass(frozen=True)
class Lazy:
    """A list written item by item (score rows: a run may score tens of millions of nodes)."""

    items: Iterable[Any]


def _default(value: Any) -> Any:
    """JSON-able form of what json does not know: arrays and tensors become lists, dataclasses objects."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, (set, frozenset)):
        return sorted(value, key=str)
    if isinstance(value, Path):
        return str(value)
    return str(value)


def _finite(value: Any, where: str, found: list[str]) -> Any:
    """The value with NaN and infinities replaced by null; `found` lists where (JSONPath-like)."""
    if isinstance(value, float) and not math.isfinite(value):
        found.append(where)
        return None
    if isinstance(value, dict):
        return {k: _finite(v, f"{where}.{k}", found) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v, f"{where}[{i}]", found) for i, v in enumerate(value)]
    return value


def plain(value: Any, where: str, found: list[str]) -> Any:
    """`value` as plain JSON data (lists, objects, numbers, text, null), non-finite numbers null and listed."""
    return _finite(json.loads(json.dumps(value, default=_default)), where, found)


def _holds_lazy(value: Any) -> bool:
    return isinstance(value, Lazy) or (isinstance(value, dict) and any(_holds_lazy(v) for v in value.values()))


def _value(value: Any, where: str, depth: int, found: list[str]) -> Iterator[str]:
    if isinstance(value, Lazy):
        yield from _list(value.items, where, depth, found)
    elif isinstance(value, dict) and _holds_lazy(value):
        yield from _object(value.items(), where, depth, found)
    else:
        text = json.dumps(plain(value, where, found), indent=1, allow_nan=False)
        yield text.replace("\n", "\n" + " " * depth)


def _list(items: Iterable[Any], where: str, depth: int, found: list[str]) -> Iterator[str]:
    yield "["
    count = 0
    for i, item in enumerate(items):
        yield ("," if i else "") + "\n" + " " * (depth + 1)
        yield from _value(item, f"{where}[{i}]", depth + 1, found)
        count += 1
    yield "]" if not count else "\n" + " " * depth + "]"


def _object(items: Iterable[tuple[str, Any]], where: str, depth: int, found: list[str],
            top: bool = False) -> Iterator[str]:
    yield "{"
    count = 0
    for key, value in items:
        yield ("," if count else "") + "\n" + " " * (depth + 1) + json.dumps(str(key)) + ": "
        yield from _value(value, f"{where}.{key}", depth + 1, found)
        count += 1
    if top and found:  # every value is written by now: the places of its non-finite numbers are known
        yield ("," if count else "") + "\n " + json.dumps(NON_FINITE) + ": "
        yield json.dumps(list(found), indent=1).replace("\n", "\n ")
        count += 1
    yield "}" if not count else "\n" + " " * depth + "}"


def chunks(doc: dict[str, Any]) -> Iterator[str]:
    """The document's JSON text in pieces (see the module docstring); joined, they are the whole text."""
    yield from _object(doc.items(), "$", 0, [], top=True)
