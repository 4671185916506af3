"""Check `export "path"` statements: a known format, no duplicate target, and a target a run can write.

A run computes for minutes before it writes, so `check` (and `run`, before computing: `export_target_problem`)
refuses a path the operating system would refuse: a NUL, a component over 255 bytes, a folder that cannot be
created, a folder without write permission, an existing folder where the file should be.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from atpdsl.language import syntax as n
from atpdsl.language.diagnostics import Diagnostic, cap_list, did_you_mean, error, quote
from atpdsl.language.files import path_problem
from atpdsl.registry import EXPORT_FORMATS

__all__ = ["export_path", "export_target_problem", "check_exports"]


def export_path(written: str, base_dir: Path, out_dir: Path | None) -> Path:
    """Where `export "written"` writes: DIR/name with --out DIR, else the path against the spec's folder (`~`
    expanded)."""
    if out_dir is not None:
        return out_dir / Path(written).name
    return (base_dir / os.path.expanduser(written)).resolve()


def _probe(folder: Path) -> str | None:
    """Whether a file can be created in an existing folder: by creating (and removing) one, since permission
    bits do not tell (a read-only mount, root, ACLs)."""
    try:
        with tempfile.TemporaryFile(dir=folder, prefix=".atpdsl-probe-"):
            pass
    except OSError as e:
        return e.strerror or str(e)
    return None


def export_target_problem(target: Path) -> str | None:
    """Why a run could not write `target` (None when it can); creates nothing that stays."""
    problem = path_problem(str(target))
    if problem is not None:
        return f"the path {problem}"
    if target.is_dir():
        return "it is an existing folder"
    if target.exists() and not os.access(target, os.W_OK):
        return "the file exists and is read-only"
    ancestor = target.parent
    while not ancestor.exists():
        if ancestor.parent == ancestor:
            break
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        return f"{ancestor} is a file, not a folder"
    why = _probe(ancestor)
    if why is None:
        return None
    if ancestor == target.parent:
        return f"cannot write in folder {ancestor}: {why}"
    return f"cannot create folder {target.parent} (in {ancestor}: {why})"


def _format_problem(stmt: n.Export) -> Diagnostic | None:
    written = stmt.path.value
    name = Path(written).name
    ext = Path(written).suffix.lower().lstrip(".")
    if not written.strip() or not name or written.endswith(("/", "\\")):
        return error("E803", f"export path {quote(written)} names no file", stmt.path.span,
                     'e.g. `export "out/circuit.graphml"`')
    if ext not in EXPORT_FORMATS:
        shown = f"unknown export format {quote('.' + ext)}" if ext else f"export path {quote(written)} has no extension"
        guess = did_you_mean(ext, EXPORT_FORMATS) if ext else None
        return error("E803", shown, stmt.path.span, f"did you mean {quote('.' + guess)}?" if guess else "",
                     f"the extension picks the format: {cap_list([quote('.' + e) for e in EXPORT_FORMATS], 12)}")
    return None


def _clashes(found: list[tuple[n.Export, Path]]) -> list[Diagnostic]:
    """An export whose file or companion (`x.csv` also writes `x-edges.csv`) would overwrite another export's
    file, or the run's manifest (atpdsl.outputs.formats.clashes decides, as the writer does)."""
    from atpdsl.outputs.formats import clashes, format_of
    from atpdsl.outputs.manifest import manifest_path

    targets = [(str(path), format_of(path)) for _, path in found]
    extra = [manifest_path(p) for p, fmt in targets if fmt == "json"]
    return [error("E804", f"{why}", found[index][0].path.span, "give each export its own file name")
            for index, why in clashes(targets, extra)]


def check_exports(statements: list[n.Export], base_dir: Path, out_dir: Path | None) -> list[Diagnostic]:
    """Every problem of the spec's exports, each at its path."""
    out: list[Diagnostic] = []
    seen: dict[str, n.Export] = {}
    good: list[tuple[n.Export, Path]] = []
    for stmt in statements:
        written = stmt.path.value
        problem = path_problem(written)
        if problem is not None:
            out.append(error("E806", f"export path {problem}", stmt.path.span))
            continue
        found = _format_problem(stmt)
        if found is not None:
            out.append(found)
            continue
        target = export_path(written, base_dir, out_dir)
        key = str(target) if out_dir is None else target.name
        if key in seen:
            where = " under --out" if out_dir is not None else ""
            out.append(error("E804", f"{quote(written)} is exported twice{where}", stmt.path.span,
                             f"the first is on line {seen[key].span.line}"))
            continue
        seen[key] = stmt
        why = export_target_problem(target)
        if why is not None:
            out.append(error("E806", f"cannot export to {quote(written)}: {why}", stmt.path.span,
                             "pick a folder you can write, or give --out DIR"))
        else:
            good.append((stmt, target))
    return out + _clashes(good)
