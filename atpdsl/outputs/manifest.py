"""The run's manifest, `<name>.manifest.json`: which files an export wrote, their sizes and sha256, complete or not.

`write_all` writes it first (complete: false, every planned export listed), rewrites it after each
export, and marks it complete at the end; so an interrupted or failed export leaves a manifest that
says so. `atpdsl show` reads it (`check`) and flags a missing file, a changed one (another run
wrote over it, or it was edited) and an incomplete export. Paths are relative to the manifest's folder.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from atpdsl.errors import DataError
from atpdsl.outputs.atomic import write_text

__all__ = ["FORMAT", "manifest_path", "ManifestWriter", "ManifestCheck", "check", "find_for", "verdict",
           "result_listed"]

FORMAT = "atpdsl-manifest"
VERSION = 1


def manifest_path(json_result: str | Path) -> Path:
    """`out/circuit.json` or `out/circuit.result.json` -> `out/circuit.manifest.json`."""
    p = Path(json_result)
    stem = p.name[: -len(".json")] if p.name.lower().endswith(".json") else p.stem
    if stem.endswith(".result"):
        stem = stem[: -len(".result")]
    return p.with_name(f"{stem}.manifest.json")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("atpdsl")
    except metadata.PackageNotFoundError:  # pragma: no cover - a source checkout without install
        from atpdsl.version import __version__

        return __version__


@dataclass
class ManifestWriter:
    """Builds and rewrites one manifest while `write_all` runs (not thread-safe; one run, one writer)."""

    path: Path
    spec_file: str = ""
    spec_hash: str = ""
    planned: list[dict[str, Any]] = field(default_factory=list)
    files: list[dict[str, Any]] = field(default_factory=list)
    failed: list[dict[str, Any]] = field(default_factory=list)

    def _rel(self, path: str | Path) -> str:
        try:
            return os.path.relpath(os.path.abspath(path), os.path.abspath(self.path.parent))
        except ValueError:  # another drive on Windows
            return os.path.abspath(path)

    def plan(self, exports: list[tuple[str, str]]) -> None:
        """List the exports about to be written and save the manifest as incomplete."""
        self.planned = [{"path": self._rel(p), "format": f} for p, f in exports]
        self.save(complete=False)

    def record(self, export: str, fmt: str, written: list[str], replaced: list[str], error: str | None) -> None:
        """One export's outcome: every file it wrote with size and sha256, or its error; saved at once."""
        for file in written:
            p = Path(file)
            self.files.append({"path": self._rel(p), "export": self._rel(export), "format": fmt,
                               "bytes": p.stat().st_size, "sha256": _sha256(p), "replaced": file in replaced})
        if error is not None:
            self.failed.append({"path": self._rel(export), "format": fmt, "error": error})
        self.save(complete=False)

    def save(self, *, complete: bool) -> None:
        doc = {
            "format": FORMAT,
            "version": VERSION,
            "atpdsl_version": _version(),
            "complete": complete,
            "spec_file": self.spec_file,
            "spec_hash": self.spec_hash,
            "planned": self.planned,
            "files": self.files,
            "failed": self.failed,
        }
        write_text(self.path, json.dumps(doc, indent=1) + "\n")

    def finish(self) -> None:
        """Mark the manifest complete when every planned export was written without error."""
        done = {f["export"] for f in self.files}
        self.save(complete=not self.failed and all(p["path"] in done for p in self.planned))


@dataclass(frozen=True)
class ManifestCheck:
    """What `check` found: the manifest, whether its run completed, and each problem in words."""

    path: Path
    complete: bool
    files: int
    problems: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return self.complete and not self.problems


def _load(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeError, ValueError) as error:
        raise DataError(f"{path}: not a readable manifest ({error})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("files"), list):
        raise DataError(f"{path}: not an atpdsl manifest (expected \"format\": \"{FORMAT}\")")
    return doc


def check(path: str | Path) -> ManifestCheck:
    """Compare a manifest with the files on disk: missing, resized or changed files, an unfinished run."""
    path = Path(path)
    doc = _load(path)
    problems = []
    for entry in doc["files"]:
        file = path.parent / str(entry.get("path", ""))
        if not file.is_file():
            problems.append(f"{entry.get('path')}: missing")
        elif file.stat().st_size != entry.get("bytes") or _sha256(file) != entry.get("sha256"):
            problems.append(f"{entry.get('path')}: changed since the run wrote it (another run or an edit)")
    for entry in doc.get("failed") or []:
        problems.append(f"{entry.get('path')}: failed ({entry.get('error')})")
    complete = bool(doc.get("complete"))
    if not complete:
        done = {f.get("export") for f in doc["files"]}
        missing = [p.get("path") for p in doc.get("planned") or [] if p.get("path") not in done]
        problems.append("the export did not finish (interrupted, or an export failed)"
                        + (f"; never written: {', '.join(map(str, missing))}" if missing else ""))
    return ManifestCheck(path, complete, len(doc["files"]), tuple(problems))


def find_for(result_file: str | Path) -> Path | None:
    """The manifest listing `result_file`: its conventional name first, then any manifest in its folder."""
    result = Path(result_file).resolve()
    candidates = [manifest_path(result)] + sorted(result.parent.glob("*.manifest.json"))
    for candidate in candidates:
        if not candidate.is_file():
            continue
        try:
            doc = _load(candidate)
        except DataError:
            continue
        if any((candidate.parent / str(f.get("path", ""))).resolve() == result for f in doc["files"]) or \
                any((candidate.parent / str(p.get("path", ""))).resolve() == result for p in doc.get("planned") or []):
            return candidate
    return None


def verdict(result_file: str | Path) -> tuple[bool, list[str]]:
    """(fine, lines) for `atpdsl show`: whether the manifest listing `result_file` vouches for its files."""
    found = find_for(result_file)
    if found is None:
        return True, [f"no manifest lists {result_file}: its files are not verified"]
    report = check(found)
    if report.ok:
        return True, [f"manifest {found}: complete, {report.files} file(s) unchanged"]
    return False, [f"manifest {found} flags {len(report.problems)} problem(s):", *(f"  {p}" for p in report.problems)]


def result_listed(path: str | Path) -> str:
    """The JSON result a manifest lists (for `atpdsl show x.manifest.json`); DataError if none."""
    path = Path(path)
    doc = _load(path)
    for entry in list(doc["files"]) + list(doc.get("planned") or []):
        if entry.get("format") == "json":
            return str(path.parent / str(entry["path"]))
    raise DataError(f"{path}: the manifest lists no JSON result")
