"""Write exports: one (`write`) or a run's whole list (`write_all`, with the manifest).

Formats come from the registry in atpdsl.outputs.formats; every file is written atomically
(atpdsl.outputs.atomic). `write_all` checks the targets before writing anything: a companion file
(`x-edges.csv`) that would overwrite another export is refused, and so is a symlink leading out
of its folder; an existing file that is replaced is reported in `ExportOutcome.replaced`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable

from atpdsl.errors import AtpError
from atpdsl.outputs.atomic import export_path, path_problem
from atpdsl.outputs.formats import EXPORT_FORMATS, ExportError, clashes, format_of, load_writer, lookup, planned_files
from atpdsl.outputs.manifest import ManifestWriter, manifest_path
from atpdsl.faults import fault_point

if TYPE_CHECKING:  # pragma: no cover
    from atpdsl.outputs.result import Result
    from atpdsl.plan import ExportTarget

__all__ = ["ExportOutcome", "write", "write_all", "default_path", "target_problems", "export_problems"]


@dataclass(frozen=True, slots=True)
class ExportOutcome:
    """What happened to one export: the files written (and which of them replaced a file), or the error.

    `requested` is False for the JSON result written on the user's behalf (see `write_all`).
    """

    path: str
    format: str
    written: tuple[str, ...] = ()
    error: str | None = None
    requested: bool = True
    replaced: tuple[str, ...] = ()


def default_path(source: str | Path, fmt: str) -> Path:
    """Where `atpdsl export result.json --to FMT` writes without --out: beside the source, new extension."""
    return Path(source).with_suffix(f".{lookup(fmt).name}")


def target_problems(path: str | Path, fmt: str) -> list[str]:
    """Why an export's files cannot be written (a symlink out of its folder, a folder in the way); empty if none."""
    return [p for file in planned_files(os.path.expanduser(str(path)), fmt) if (p := path_problem(file))]


def write(res: "Result", path: str | Path, fmt: str | None = None) -> list[Path]:
    """Write one export (creating parent folders, each file atomically); returns every file written."""
    name = lookup(fmt).name if fmt else format_of(path)
    problems = target_problems(path, name)
    if problems:
        raise ExportError("cannot export to " + "; ".join(problems))
    return load_writer(name)(res, export_path(path))


def _message(error: BaseException) -> str:
    if isinstance(error, AtpError):
        return str(error)
    return f"{type(error).__name__}: {error}"


def _fallback_json(first_path: str, spec_file: str) -> Path:
    stem = Path(spec_file).stem
    if not stem or stem.startswith("<"):
        stem = Path(first_path).stem
    return Path(os.path.expanduser(first_path)).parent / f"{stem}.result.json"


def _jobs(targets: list[tuple[str, str]], spec_file: str) -> list[tuple[str, str, bool]]:
    """(path, format, requested) in writing order: the JSON result first (added when not asked for)."""
    jobs = [(path, lookup(fmt).name, True) for path, fmt in targets]
    if not any(fmt == "json" for _, fmt, _ in jobs):
        jobs.append((str(_fallback_json(targets[0][0], spec_file)), "json", False))
    return sorted(jobs, key=lambda job: lookup(job[1]).order)


def export_problems(targets: list[tuple[str, str]], spec_file: str = "") -> list[tuple[int, str]]:
    """Everything `write_all` would refuse, before anything runs: (index into `targets`, why).

    For the checker: pass the resolved (path, format) of every `export` line in spec order. It names
    unknown formats, symlinks leading out of their folder, folders in the way, and files that one
    export (or a companion such as `x-edges.csv`, or the run's manifest) would write over another's.
    Imports nothing heavy.
    """
    problems: list[tuple[int, str]] = []
    for i, (path, fmt) in enumerate(targets):
        try:
            problems += [(i, p) for p in target_problems(path, fmt)]
        except ExportError as error:
            problems.append((i, str(error)))
    known = [(i, (p, f)) for i, (p, f) in enumerate(targets) if f.lower().lstrip(".") in EXPORT_FORMATS]
    if not known:
        return problems
    jobs = _jobs([t for _, t in known], spec_file)
    order = {(os.path.expanduser(p), lookup(f).name): i for i, (p, f) in known}
    manifest = manifest_path(os.path.expanduser(next(p for p, f, _ in jobs if f == "json")))
    for index, why in clashes([(os.path.expanduser(p), f) for p, f, _ in jobs], [manifest]):
        path, fmt, _ = jobs[index]
        problems.append((order.get((os.path.expanduser(path), fmt), 0), why))
    return problems


def _refusals(jobs: list[tuple[str, str, bool]], extra: list[Path]) -> dict[int, str]:
    """Job index -> why it must not be written: one of its files would overwrite another export's."""
    refused: dict[int, str] = {}
    for index, why in clashes([(os.path.expanduser(p), f) for p, f, _ in jobs], extra):
        refused[index] = f"{refused[index]}; {why}" if index in refused else why
    return refused


def _guarded(manifest: ManifestWriter | None, action: Callable[[ManifestWriter], None]) -> ManifestWriter | None:
    """Run a manifest step; a manifest that cannot be written is given up, never the exports."""
    if manifest is None:
        return None
    try:
        action(manifest)
    except (AtpError, OSError):
        return None
    return manifest


def _write_one(res: "Result", path: str, fmt: str, requested: bool, refused: str | None) -> ExportOutcome:
    if refused is not None:
        return ExportOutcome(path, fmt, (), f"not written: {refused}", requested)
    existing = {str(p) for p in planned_files(export_path(path), fmt) if p.exists()} if not target_problems(path, fmt) \
        else set()
    try:
        written = [str(p) for p in write(res, path, fmt)]
    except Exception as error:  # noqa: BLE001 - a failed export must not lose the others
        return ExportOutcome(path, fmt, (), _message(error), requested)
    return ExportOutcome(path, fmt, tuple(written), None, requested, tuple(p for p in written if p in existing))


def write_all(res: "Result", targets: Iterable["ExportTarget"], *, spec_file: str = "") -> tuple[ExportOutcome, ...]:
    """Write every export; one failing never stops the others (its error is recorded instead).

    The JSON result goes first, so whatever fails later can be redone with `atpdsl export`.
    When no `.json` export is asked for, one is written anyway beside the first export, as
    `<spec stem>.result.json` (`requested=False`): a run's numbers are never only in a picture.
    The manifest (`<json name>.manifest.json`, atpdsl.outputs.manifest) is written beside the JSON
    result before the first export and completed after the last.
    """
    items = list(targets)
    if not items:
        return ()
    jobs = _jobs([(t.path, t.format) for t in items], spec_file)
    json_path = next(p for p, f, _ in jobs if f == "json")
    writer = ManifestWriter(manifest_path(os.path.expanduser(json_path)), spec_file, res.result.spec_hash)
    refused = _refusals(jobs, [writer.path])
    manifest = _guarded(writer, lambda m: m.plan([(os.path.expanduser(p), f) for p, f, _ in jobs]))
    outcomes = []
    for i, (path, fmt, requested) in enumerate(jobs):
        outcome = _write_one(res, path, fmt, requested, refused.get(i))
        outcomes.append(outcome)
        manifest = _guarded(manifest, lambda m: m.record(os.path.expanduser(path), fmt, list(outcome.written),
                                                         list(outcome.replaced), outcome.error))
        fault_point("export", i + 1)
    _guarded(manifest, lambda m: m.finish())
    return tuple(outcomes)
