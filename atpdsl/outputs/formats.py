"""Every export format as one record, keyed by what users type (the file extension or an alias).

This module imports nothing heavy (no networkx, matplotlib or torch), so the checker can ask it which
extensions exist and which files an export will write without slowing `atpdsl check` down. A
record names its writer and reader by a lazily imported `module:function` path.

Writers take `(res, path)` and return the list of files they wrote; `res` is an
`atpdsl.outputs.result.Result`. Readers take a path and return what the format holds.
Adding a format is one `register(ExportFormat(...))` plus its writer.
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from atpdsl.errors import AtpError

__all__ = [
    "ExportError",
    "ExportFormat",
    "EXPORT_FORMATS",
    "register",
    "unregister",
    "lookup",
    "format_of",
    "formats",
    "known_words",
    "companion_paths",
    "planned_files",
    "collisions",
    "clashes",
    "load_writer",
    "load_reader",
]


class ExportError(AtpError):
    """An export could not be written (names the file and the cause)."""


@dataclass(frozen=True, slots=True)
class ExportFormat:
    """One export format.

    `name` is the canonical word (also its main extension); `aliases` are other extensions that
    mean it (`gv` for `dot`). `writer`/`reader` are `module:function` paths, imported on first use;
    `reader` is None when the format does not read back (pictures, the report, DOT).
    `companions` are the suffixes of the extra files one export may write beside its path
    (`x.csv` -> `x-edges.csv`). `order` sorts `write_all`: the JSON result first, pictures last.
    """

    name: str
    doc: str
    writer: str
    reader: str | None = None
    aliases: tuple[str, ...] = ()
    companions: tuple[str, ...] = ()
    order: int = 50

    @property
    def extensions(self) -> tuple[str, ...]:
        return (self.name, *self.aliases)


_RECORDS: dict[str, ExportFormat] = {}
EXPORT_FORMATS: dict[str, ExportFormat] = {}
"""Every word a user may type (extension or alias, lower case, no dot) -> its record. Kept live:
`register` adds to this very dict, so importers that hold it see new formats."""


def register(fmt: ExportFormat) -> ExportFormat:
    """Add a format (all its words must be new); returns it."""
    taken = [w for w in fmt.extensions if w in EXPORT_FORMATS]
    if taken:
        raise ValueError(f"export format {fmt.name!r}: {', '.join(taken)} already taken")
    _RECORDS[fmt.name] = fmt
    for word in fmt.extensions:
        EXPORT_FORMATS[word] = fmt
    return fmt


def unregister(name: str) -> None:
    """Remove a format and all its words (tests use it to clean up)."""
    fmt = _RECORDS.pop(name)
    for word in fmt.extensions:
        EXPORT_FORMATS.pop(word, None)


def formats() -> list[ExportFormat]:
    """Every record, in writing order."""
    return sorted(_RECORDS.values(), key=lambda f: (f.order, f.name))


def known_words() -> str:
    """`csv, cyjs, dot, ...` for error messages."""
    return ", ".join(sorted(EXPORT_FORMATS))


def lookup(word: str) -> ExportFormat:
    """The format a user's word names (`gv`, `.GV`, `dot` -> dot)."""
    key = word.lower().lstrip(".")
    if key not in EXPORT_FORMATS:
        raise ExportError(f"unknown export format {word!r} (known: {known_words()})")
    return EXPORT_FORMATS[key]


def format_of(path: str | Path) -> str:
    """The canonical format name a file name asks for, from its extension."""
    suffix = Path(str(path)).suffix.lower().lstrip(".")
    if suffix not in EXPORT_FORMATS:
        raise ExportError(f"cannot export to {str(path)!r}: unknown extension {('.' + suffix) if suffix else '(none)'!r} "
                          f"(known: {', '.join('.' + w for w in sorted(EXPORT_FORMATS))})")
    return EXPORT_FORMATS[suffix].name


def companion_paths(path: str | Path, fmt: str) -> list[Path]:
    """Every extra file an export of `fmt` to `path` may write (`x.csv` -> `x-edges.csv`, `x-pairs.csv`)."""
    p = Path(path)
    return [p.with_name(f"{p.stem}-{suffix}{p.suffix}") for suffix in lookup(fmt).companions]


def planned_files(path: str | Path, fmt: str) -> list[Path]:
    """The export's own path and every companion it may write."""
    return [Path(path), *companion_paths(path, fmt)]


def _key(path: str | Path) -> str:
    return os.path.normcase(os.path.normpath(os.path.abspath(os.path.expanduser(str(path)))))


def clashes(targets: Sequence[tuple[str, str]], extra: Iterable[str | Path] = ()) -> list[tuple[int, str]]:
    """(index of the export that must not be written, why) for each clash: one export's file (its path
    or a companion) would overwrite an earlier export's file, or a file in `extra` (e.g. the run's
    manifest) would overwrite an export's file."""
    owner: dict[str, tuple[int, str]] = {}
    found = []
    for index, (path, fmt) in enumerate(targets):
        for i, file in enumerate(planned_files(path, fmt)):
            key = _key(file)
            what = f"export {str(path)!r}" if i == 0 else f"the companion {file.name!r} of export {str(path)!r}"
            if key in owner:
                found.append((index, f"{what} would overwrite {owner[key][1]}"))
            else:
                owner[key] = (index, what)
    for file in extra:
        key = _key(file)
        if key in owner:
            found.append((owner[key][0], f"{owner[key][1]} would be overwritten by the run's {Path(file).name!r}"))
    return found


def collisions(targets: Sequence[tuple[str, str]], extra: Iterable[str | Path] = ()) -> list[str]:
    """One sentence per clash between export files (see `clashes`); empty when none.

    The checker calls this with the resolved (path, format) of every `export` line and, as `extra`,
    the manifest path (`atpdsl.outputs.manifest.manifest_path` of the JSON result); `write_all`
    checks again at run start and refuses the clashing export.
    """
    return [message for _, message in clashes(targets, extra)]


def _load(spec: str) -> Callable[..., Any]:
    module, _, attr = spec.partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as error:
        raise ExportError(f"cannot load {spec!r}: {error}") from None


def load_writer(fmt: str) -> Callable[..., list[Path]]:
    """The writer function of a format (imported now)."""
    return _load(lookup(fmt).writer)


def load_reader(fmt: str) -> Callable[..., Any]:
    """The reader function of a format; ExportError when the format does not read back."""
    record = lookup(fmt)
    if record.reader is None:
        raise ExportError(f"{record.name} files are not read back (use the JSON result: it rebuilds everything)")
    return _load(record.reader)


_P = "atpdsl.outputs."
for _fmt in (
    ExportFormat("json", "the whole result (schema version, plan, scores, graph); rebuilds every other export",
                 _P + "jsonio:export_json", _P + "jsonio:read_result", order=0),
    ExportFormat("csv", "scores table (+ -edges.csv with edge attributions, -pairs.csv with per-pair numbers)",
                 _P + "csvio:export_csv", _P + "csvio:read_csv", companions=("edges", "pairs"), order=10),
    ExportFormat("graphml", "GraphML circuit graph (Gephi, Cytoscape, yEd)", _P + "graphml:export_graphml",
                 _P + "graphml:read_graphml", order=20),
    ExportFormat("gexf", "GEXF 1.3 circuit graph with layout and colours (Gephi)", _P + "gexf:export_gexf",
                 _P + "gexf:read_gexf", order=21),
    ExportFormat("cyjs", "Cytoscape.js JSON circuit graph (Cytoscape, cytoscape.js)", _P + "cyjs:export_cyjs",
                 _P + "cyjs:read_cyjs", order=22),
    ExportFormat("dot", "Graphviz DOT drawing, one row per layer stage", _P + "dot:export_dot", aliases=("gv",),
                 order=30),
    ExportFormat("svg", "circuit diagram (+ -heads and -neurons figures)", _P + "plots:export_svg",
                 companions=("heads", "neurons"), order=80),
    ExportFormat("png", "circuit diagram (+ -heads and -neurons figures)", _P + "plots:export_png",
                 companions=("heads", "neurons"), order=81),
    ExportFormat("html", "self-contained report", _P + "report:export_html", aliases=("htm",), order=90),
):
    register(_fmt)
