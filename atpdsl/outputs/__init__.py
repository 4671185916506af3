"""Write a result in the format its file extension names; one module per format, each with a reader.

| extension | writer | reader | what |
| --- | --- | --- | --- |
| .json | jsonio.write_json(res, p) | jsonio.read_result(p) -> (RunResult, graph) | everything: rebuilds the rest |
| .csv | csvio.write_csv(res, p) | csvio.read_csv(p) -> Table | scores table (+ `-edges.csv`, `-pairs.csv`) |
| .graphml | graphml.write_graphml(G, p) | graphml.read_graphml(p) | circuit graph |
| .gexf | gexf.write_gexf(G, p) | gexf.read_gexf(p) | circuit graph (Gephi layout hints) |
| .dot / .gv | dot.write_dot(G, p) | dot.read_dot(p) | circuit graph, layered drawing |
| .png / .svg | atpdsl.outputs.plots.write_figures(res, p) | - | circuit diagram (+ `-heads`, `-neurons`) |
| .html | atpdsl.outputs.report.write_html(res, p) | - | self-contained report |

`res` is an atpdsl.pipeline.Result. Formats import their dependencies only when used.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

from atpdsl.errors import AtpError

if TYPE_CHECKING:  # pragma: no cover
    from atpdsl.pipeline import Result
    from atpdsl.plan import ExportTarget

__all__ = [
    "FORMATS",
    "EXTENSIONS",
    "ExportOutcome",
    "ExportError",
    "format_of",
    "default_path",
    "write",
    "write_all",
]

FORMATS: tuple[str, ...] = ("json", "csv", "graphml", "gexf", "dot", "svg", "png", "html")
"""Every export format, in the order `write_all` writes them: the JSON result first, plots last."""

EXTENSIONS: dict[str, str] = {
    ".json": "json",
    ".csv": "csv",
    ".graphml": "graphml",
    ".gexf": "gexf",
    ".dot": "dot",
    ".gv": "dot",
    ".png": "png",
    ".svg": "svg",
    ".html": "html",
    ".htm": "html",
}


class ExportError(AtpError):
    """An export could not be written (names the file and the cause)."""


@dataclass(frozen=True, slots=True)
class ExportOutcome:
    """What happened to one export: the files written, or the error that stopped it.

    `requested` is False for the JSON result written on the user's behalf (see `write_all`).
    """

    path: str
    format: str
    written: tuple[str, ...] = ()
    error: str | None = None
    requested: bool = True


def format_of(path: str | Path) -> str:
    """The export format a file name asks for, from its extension."""
    suffix = Path(path).suffix.lower()
    if suffix not in EXTENSIONS:
        known = ", ".join(sorted(EXTENSIONS))
        raise ExportError(f"cannot export to {str(path)!r}: unknown extension {suffix or '(none)'!r} (known: {known})")
    return EXTENSIONS[suffix]


def default_path(source: str | Path, fmt: str) -> Path:
    """Where `atpdsl export result.json --to FMT` writes without --out: beside the source, new extension."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r} (known: {', '.join(FORMATS)})")
    return Path(source).with_suffix(f".{fmt}")


def write(res: "Result", path: str | Path, fmt: str | None = None) -> list[Path]:
    """Write one export (creating parent folders); returns every file written."""
    fmt = fmt or format_of(path)
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r} (known: {', '.join(FORMATS)})")
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "json":
        from atpdsl.outputs.jsonio import write_json

        write_json(res, target)
        return [target]
    if fmt == "csv":
        from atpdsl.outputs.csvio import write_csv

        return write_csv(res, target)
    if fmt == "graphml":
        from atpdsl.outputs.graphml import write_graphml

        write_graphml(res.graph, target)
        return [target]
    if fmt == "gexf":
        from atpdsl.outputs.gexf import write_gexf

        write_gexf(res.graph, target)
        return [target]
    if fmt == "dot":
        from atpdsl.outputs.dot import write_dot

        write_dot(res.graph, target)
        return [target]
    if fmt in ("png", "svg"):
        from atpdsl.outputs.plots import write_figures

        return write_figures(res, target, fmt)
    from atpdsl.outputs.report import write_html

    write_html(res, target)
    return [target]


def _message(error: BaseException) -> str:
    if isinstance(error, AtpError):
        return str(error)
    return f"{type(error).__name__}: {error}"


def _fallback_json(targets: list["ExportTarget"], spec_file: str) -> Path:
    stem = Path(spec_file).stem
    if not stem or stem.startswith("<"):
        stem = Path(targets[0].path).stem
    return Path(targets[0].path).parent / f"{stem}.result.json"


def write_all(res: "Result", targets: Iterable["ExportTarget"], *, spec_file: str = "") -> tuple[ExportOutcome, ...]:
    """Write every export; one failing never stops the others (its error is recorded instead).

    The JSON result goes first, so whatever fails later can be redone with `atpdsl export`.
    When no `.json` export is asked for, one is written anyway beside the first export, as
    `<spec stem>.result.json` (`requested=False`): a run's numbers are never only in a picture.
    """
    items = list(targets)
    if not items:
        return ()
    order = {fmt: i for i, fmt in enumerate(FORMATS)}
    jobs: list[tuple[str, str, bool]] = [(t.path, t.format, True) for t in items]
    if not any(fmt == "json" for _, fmt, _ in jobs):
        jobs.append((str(_fallback_json(items, spec_file)), "json", False))
    jobs.sort(key=lambda job: order.get(job[1], len(order)))
    outcomes = []
    for path, fmt, requested in jobs:
        try:
            written = write(res, path, fmt)
            outcomes.append(ExportOutcome(path, fmt, tuple(str(p) for p in written), None, requested))
        except Exception as error:  # noqa: BLE001 - a failed export must not lose the others
            outcomes.append(ExportOutcome(path, fmt, (), _message(error), requested))
    return tuple(outcomes)
