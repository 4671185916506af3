"""Source text for the emitted program: atpdsl's own definitions copied verbatim (one implementation), the
runtime modules without their imports, Python literals for the plan's data, and a check that every name the
program uses is defined in it.

Everything embedded from a plan goes through `literal`, which writes only `repr()` of strings and numbers: a
folder or prompt holding quotes, newlines or `\"\"\"` stays data and never becomes code.
"""
from __future__ import annotations

import ast
import builtins
import inspect
import math
import symtable
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from types import ModuleType

__all__ = ["runtime_source", "literal", "free_names", "defined_names", "undefined_names", "IntRange"]


def runtime_source(module: ModuleType) -> str:
    """A runtime module's body without its docstring and imports (the program has one import block, and copies
    what the module imports from atpdsl), headed by the first line of its docstring."""
    text = inspect.getsource(module)
    tree = ast.parse(text)
    drop: set[int] = set()
    for node in tree.body:
        is_doc = node is tree.body[0] and isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
        if is_doc or isinstance(node, (ast.Import, ast.ImportFrom)):
            drop.update(range(node.lineno, (node.end_lineno or node.lineno) + 1))
    body = [line for i, line in enumerate(text.splitlines(), start=1) if i not in drop]
    while body and not body[0].strip():
        body.pop(0)
    doc = (ast.get_docstring(tree) or module.__name__).splitlines()[0]
    return f"# --- {doc}\n\n\n" + "\n".join(body).rstrip() + "\n"


@dataclass(frozen=True, slots=True)
class IntRange:
    """A run of consecutive integers, written `list(range(start, stop))` instead of every number."""

    start: int
    stop: int


def _scalar(value: object) -> str:
    if value is None or isinstance(value, (bool, int, str)):
        return repr(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "float('nan')"
        return repr(value) if math.isfinite(value) else ("-1e999" if value < 0 else "1e999")
    if isinstance(value, IntRange):
        return f"list(range({int(value.start)}, {int(value.stop)}))"
    raise TypeError(f"cannot embed a {type(value).__name__} in the emitted program")


def literal(value: object, indent: int = 0, width: int = 116, lead: int = 0) -> str:
    """`value` (dicts, lists, tuples, str, int, float, bool, None, IntRange) as Python source: one line when it
    fits in `width` (after `indent` spaces and `lead` characters already on the line), else one item per line.
    Strings are `repr()`s, so no embedded text can become code."""
    flat = _flat(value)
    if indent + lead + len(flat) + 1 <= width or not isinstance(value, (dict, list, tuple)):
        return flat
    pad = " " * (indent + 4)
    if isinstance(value, dict):
        items = [f"{pad}{_scalar(k)}: {literal(v, indent + 4, width, len(_scalar(k)) + 2)}," for k, v in value.items()]
        return "{\n" + "\n".join(items) + "\n" + " " * indent + "}"
    if all(not isinstance(v, (dict, list, tuple)) for v in value):
        return _wrapped(value, indent, width)
    items = [f"{pad}{literal(v, indent + 4, width)}," for v in value]
    opening, closing = ("[", "]") if isinstance(value, list) else ("(", ")")
    return opening + "\n" + "\n".join(items) + "\n" + " " * indent + closing


def _flat(value: object) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_scalar(k)}: {_flat(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_flat(v) for v in value) + "]"
    if isinstance(value, tuple):
        inner = ", ".join(_flat(v) for v in value)
        return "(" + inner + ("," if len(value) == 1 else "") + ")"
    return _scalar(value)


def _wrapped(values: Sequence[object], indent: int, width: int) -> str:
    """A list of scalars filled into lines of at most `width` characters."""
    opening, closing = ("[", "]") if isinstance(values, list) else ("(", ")")
    pad = " " * (indent + 4)
    lines, line = [], pad
    for v in values:
        item = _scalar(v) + ","
        if len(line) + len(item) + 1 > width and line.strip():
            lines.append(line.rstrip())
            line = pad
        line += item + " "
    lines.append(line.rstrip())
    return opening + "\n" + "\n".join(lines) + "\n" + " " * indent + closing


class _DropAnnotations(ast.NodeTransformer):
    """Annotations are never evaluated in the program (`from __future__ import annotations`)."""

    def visit_arg(self, node: ast.arg) -> ast.arg:
        node.annotation = None
        return node

    def visit_FunctionDef(self, node: ast.FunctionDef) -> ast.FunctionDef:
        node.returns = None
        self.generic_visit(node)
        return node

    def visit_AnnAssign(self, node: ast.AnnAssign) -> ast.stmt:
        if node.value is None:
            return ast.Pass()
        return ast.Assign(targets=[node.target], value=node.value, lineno=node.lineno)


def _scopes(table: symtable.SymbolTable) -> Iterable[symtable.SymbolTable]:
    yield table
    for child in table.get_children():
        yield from _scopes(child)


def _table(source: str) -> symtable.SymbolTable:
    tree = ast.fix_missing_locations(_DropAnnotations().visit(ast.parse(source)))
    return symtable.symtable(ast.unparse(tree), "<emitted>", "exec")


def _globals_used(table: symtable.SymbolTable) -> set[str]:
    used: set[str] = set()
    for scope in _scopes(table):
        for sym in scope.get_symbols():
            if sym.is_referenced() and (sym.is_global() or scope is table):
                used.add(sym.get_name())
    return used


def _defined(table: symtable.SymbolTable) -> set[str]:
    defined = {s.get_name() for s in table.get_symbols() if s.is_assigned() or s.is_imported()}
    return defined | {c.get_name() for c in table.get_children() if c.get_type() in ("function", "class")}


def free_names(source: str) -> set[str]:
    """Global names a piece of top-level source reads but does not define (annotations aside)."""
    table = _table(source)
    return _globals_used(table) - _defined(table)


def undefined_names(source: str) -> list[str]:
    """Global names the program reads but never defines (annotations aside): a copied definition that depends
    on something the program lacks shows up here at emit time, not as a NameError halfway through a run."""
    return sorted(free_names(source) - set(dir(builtins)))


def defined_names(source: str) -> set[str]:
    """The names a piece of top-level source defines (functions, classes, assignments)."""
    out: set[str] = set()
    for node in ast.parse(source).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            out.add(node.name)
        elif isinstance(node, ast.Assign):
            out |= {t.id for t in node.targets if isinstance(t, ast.Name)}
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            out.add(node.target.id)
    return out
