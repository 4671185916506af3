"""Which of atpdsl's definitions the emitted program copies: everything its runtime imports from atpdsl, and,
transitively, everything those definitions use, each copied verbatim from its module. So the program runs
atpdsl's own code (one implementation) and follows it when it changes.

A definition is a top-level function, class or constant; a class may leave out methods (`omit`, as
"Class.method": those that read atpdsl's architecture records, which the program gets as data). Names the
runtime defines itself (`provided`) are never copied. Imports from outside atpdsl are collected per name.
"""
from __future__ import annotations

import ast
import builtins
import importlib
import inspect
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field

from atpdsl.engine.emit.source import free_names

__all__ = ["Definition", "Closure", "collect", "parsed", "import_statement", "is_stdlib"]


@dataclass(frozen=True, slots=True)
class Definition:
    """One copied top-level definition: its module, name and source text."""

    module: str
    name: str
    text: str


@dataclass(slots=True)
class Closure:
    """The definitions to copy (in module order, then source order) and the imports they need."""

    definitions: list[Definition] = field(default_factory=list)
    imports: dict[str, str] = field(default_factory=dict)  # bound name -> import statement


@dataclass(slots=True)
class _Module:
    tree: ast.Module
    lines: list[str]
    defs: dict[str, ast.stmt]
    imports: dict[str, tuple[str, str]]  # bound name -> (module, original name; "" for `import x`)


_MODULES: dict[str, _Module] = {}


def parsed(name: str) -> _Module:
    """A module's syntax tree, lines, top-level definitions and imports (parsed once)."""
    got = _MODULES.get(name)
    if got is None:
        text = inspect.getsource(importlib.import_module(name))
        tree = ast.parse(text)
        defs: dict[str, ast.stmt] = {}
        imports: dict[str, tuple[str, str]] = {}
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                defs[node.name] = node
            elif isinstance(node, ast.Assign):
                defs.update({t.id: node for t in node.targets if isinstance(t, ast.Name)})
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                defs[node.target.id] = node
            elif isinstance(node, ast.Import):
                imports.update({(a.asname or a.name).split(".")[0]: (a.name, "") for a in node.names})
            elif isinstance(node, ast.ImportFrom) and node.module != "__future__":
                imports.update({a.asname or a.name: (node.module or "", a.name) for a in node.names})
        got = _MODULES[name] = _Module(tree, text.splitlines(), defs, imports)
    return got


def _span(node: ast.stmt) -> tuple[int, int]:
    first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
    return first, node.end_lineno or node.lineno


def _text(mod: _Module, node: ast.stmt, omit: set[str]) -> str:
    """A definition's source, with omitted methods cut out and a constant's docstring kept."""
    first, last = _span(node)
    index = mod.tree.body.index(node)
    if isinstance(node, (ast.Assign, ast.AnnAssign)) and index + 1 < len(mod.tree.body):
        nxt = mod.tree.body[index + 1]
        if isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
            last = nxt.end_lineno or last
    cut = []
    for child in node.body if isinstance(node, ast.ClassDef) else ():
        if isinstance(child, ast.FunctionDef) and f"{node.name}.{child.name}" in omit:
            a, b = _span(child)
            while b < last and not mod.lines[b].strip():  # and the blank lines after it
                b += 1
            cut.append((a, b))
    return "\n".join(mod.lines[i - 1] for i in range(first, last + 1) if not any(a <= i <= b for a, b in cut))


def import_statement(module: str, original: str, bound: str) -> str:
    if not original:
        return f"import {module}"
    return f"from {module} import {original}" + (f" as {bound}" if bound != original else "")


def collect(roots: Iterable[tuple[str, str]], provided: set[str], omit: Iterable[str] = ()) -> Closure:
    """The closure of `roots` ((module, name) pairs) over the names their definitions use."""
    omit = set(omit)
    out = Closure()
    seen: dict[str, str] = {}  # copied name -> its module
    todo = list(roots)
    found: dict[str, dict[str, ast.stmt]] = {}
    while todo:
        module, name = todo.pop()
        if name in provided or seen.get(name) == module:
            continue
        if name in seen:
            raise LookupError(f"emit: {name!r} is defined in both {seen[name]} and {module}; copying both would clash")
        mod = parsed(module)
        node = mod.defs.get(name)
        if node is None:
            raise LookupError(f"emit: {module} defines no {name!r}")
        seen[name] = module
        found.setdefault(module, {})[name] = node
        for used in free_names(_text(mod, node, omit)):
            if used in provided or used == name or hasattr(builtins, used):
                continue
            if used in mod.defs:
                todo.append((module, used))
            elif used in mod.imports:
                source, original = mod.imports[used]
                if source.startswith("atpdsl"):
                    if original != used:
                        raise LookupError(f"emit: {module} imports {original} as {used}; copy it under its own name")
                    todo.append((source, original))
                else:
                    out.imports[used] = import_statement(source, original, used)
            else:
                raise LookupError(f"emit: {module}.{name} uses {used!r}, which the program cannot provide")
    for module in sorted(found, key=_depth):
        mod = parsed(module)
        for name, node in sorted(found[module].items(), key=lambda item: item[1].lineno):
            out.definitions.append(Definition(module, name, _text(mod, node, omit)))
    return out


def _depth(module: str) -> tuple[int, str]:
    """Modules that others build on first (names, arch, plan, language), then the engine's."""
    order = ("atpdsl.names", "atpdsl.arch", "atpdsl.plan", "atpdsl.language", "atpdsl.engine.metrics",
             "atpdsl.engine.data", "atpdsl.engine.node_table", "atpdsl.engine.context")
    for i, prefix in enumerate(order):
        if module.startswith(prefix):
            return i, module
    return len(order), module


def is_stdlib(statement: str) -> bool:
    """Whether an import statement imports from Python's standard library."""
    name = statement.split()[1].split(".")[0]
    return name in sys.stdlib_module_names
