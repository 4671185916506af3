"""Atomic exports and the manifest: an interrupted writer or a full disk leaves the old file; paths are safe."""
from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
from synthetic_circuits import finished, make_plan, mixed_result

import atpdsl.outputs.atomic
from atpdsl.outputs import ExportError, write, write_all
from atpdsl.outputs.formats import collisions
from atpdsl.outputs.manifest import check, find_for, manifest_path
from atpdsl.plan import ExportTarget


@pytest.fixture
def res(tmp_path):
    return finished(make_plan(tmp_path), mixed_result(edges=True))


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".part"))


def test_a_writer_that_fails_midway_leaves_the_old_file(res, tmp_path, monkeypatch):
    import atpdsl.outputs.gexf as gexf

    target = tmp_path / "r.gexf"
    write(res, target)
    old = target.read_bytes()

    def half_then_interrupt(self, fh):
        fh.write(b"<?xml version='1.0'?><gexf")  # a truncated file, as Ctrl-C mid-write left it
        raise KeyboardInterrupt

    monkeypatch.setattr(gexf.GEXFWriter, "write", half_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        write(res, target)
    assert target.read_bytes() == old
    assert leftovers(tmp_path) == []


class FullDisk:
    """A file object that accepts `room` bytes, then fails as a full disk does."""

    def __init__(self, real, room: int) -> None:
        self.real, self.room = real, room

    def write(self, data):
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.real.write(data)

    def __getattr__(self, name):
        return getattr(self.real, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.real.close()


def test_a_full_disk_leaves_every_old_file_and_no_partial_file(res, tmp_path, monkeypatch):
    formats = ("json", "csv", "graphml", "gexf", "cyjs", "dot", "html")
    targets = [ExportTarget(str(tmp_path / f"r.{f}"), f) for f in formats]
    first = write_all(res, targets)
    assert all(o.error is None for o in first)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    real_fdopen = os.fdopen
    monkeypatch.setattr(atpdsl.outputs.atomic.os, "fdopen", lambda fd, mode: FullDisk(real_fdopen(fd, mode), 100))
    second = write_all(res, targets)
    assert all(o.error is not None and "No space left on device" in o.error for o in second)
    assert all("previous file (if any) is unchanged" in o.error for o in second)
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    assert after == before  # every file as it was, the manifest included (it could not be rewritten either)
    assert leftovers(tmp_path) == []


def test_the_manifest_lists_every_file_with_its_hash_and_show_flags_changes(res, tmp_path, capsys):
    from atpdsl.cli.app import main

    targets = [ExportTarget(str(tmp_path / f"r.{f}"), f) for f in ("json", "csv", "png")]
    outcomes = write_all(res, targets, spec_file=str(tmp_path / "r.atp"))
    manifest = manifest_path(tmp_path / "r.json")
    doc = json.loads(manifest.read_text())
    assert doc["format"] == "atpdsl-manifest" and doc["complete"] is True and doc["atpdsl_version"]
    written = sorted(p for o in outcomes for p in o.written)
    assert sorted(str(tmp_path / f["path"]) for f in doc["files"]) == written
    import hashlib

    for entry in doc["files"]:
        data = (tmp_path / entry["path"]).read_bytes()
        assert entry["bytes"] == len(data) and entry["sha256"] == hashlib.sha256(data).hexdigest()
    assert check(manifest).ok and find_for(tmp_path / "r.json") == manifest
    assert main(["show", str(tmp_path / "r.json")]) == 0
    assert "complete, 6 file(s) unchanged" in " ".join(capsys.readouterr().out.split())
    (tmp_path / "r-edges.csv").write_text("edited\n")
    (tmp_path / "r-heads.png").unlink()
    report = check(manifest)
    assert not report.ok and len(report.problems) == 2
    assert main(["show", str(manifest)]) == 0  # a manifest can be shown too: it names its result
    out = " ".join(capsys.readouterr().out.split())
    assert "warning" in out and "r-edges.csv: changed since the run wrote it" in out and "r-heads.png: missing" in out


def test_an_interrupted_export_leaves_a_manifest_that_says_so(res, tmp_path, monkeypatch, capsys):
    import atpdsl.outputs.report
    from atpdsl.cli.app import main

    def interrupted(res):
        raise KeyboardInterrupt

    monkeypatch.setattr(atpdsl.outputs.report, "render_html", interrupted)
    targets = [ExportTarget(str(tmp_path / f"r.{f}"), f) for f in ("json", "graphml", "html")]
    with pytest.raises(KeyboardInterrupt):
        write_all(res, targets)
    report = check(manifest_path(tmp_path / "r.json"))
    assert not report.complete and report.files == 2
    assert any("did not finish" in p and "r.html" in p for p in report.problems)
    assert main(["show", str(tmp_path / "r.json")]) == 0
    assert "did not finish" in capsys.readouterr().out


def test_companion_files_never_overwrite_an_explicit_export(res, tmp_path):
    explicit = tmp_path / "r-edges.csv"
    problems = collisions([(str(tmp_path / "r.csv"), "csv"), (str(explicit), "csv")])
    assert problems == [f"export {str(explicit)!r} would overwrite the companion 'r-edges.csv' of export "
                        f"{str(tmp_path / 'r.csv')!r}"]
    outcomes = {o.path: o for o in write_all(res, [ExportTarget(str(tmp_path / "r.csv"), "csv"),
                                                   ExportTarget(str(explicit), "csv")])}
    assert outcomes[str(tmp_path / "r.csv")].error is None
    assert outcomes[str(explicit)].error.startswith("not written: ") and "would overwrite" in outcomes[str(explicit)].error
    assert explicit.read_text().startswith("source,target,weight")  # the companion, never clobbered
    assert collisions([(str(tmp_path / "a.png"), "png"), (str(tmp_path / "b.json"), "json")],
                      [tmp_path / "a-heads.png"]) != []


def test_existing_files_are_reported_as_replaced(res, tmp_path):
    targets = [ExportTarget(str(tmp_path / "r.json"), "json"), ExportTarget(str(tmp_path / "r.csv"), "csv")]
    assert all(o.replaced == () for o in write_all(res, targets))
    again = write_all(res, targets)
    assert [set(o.replaced) for o in again] == [set(o.written) for o in again]


def test_symlinks_out_of_the_folder_are_refused_and_inside_ones_followed(res, tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    victim = outside / "precious.txt"
    victim.write_text("keep me")
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "r.graphml").symlink_to(victim)
    with pytest.raises(ExportError, match="symlink to .*precious.txt.*outside its folder"):
        write(res, folder / "r.graphml")
    assert victim.read_text() == "keep me"
    (folder / "r-edges.csv").symlink_to(victim)  # a companion planted as a link: refused too
    with pytest.raises(ExportError, match="outside its folder"):
        write(res, folder / "r.csv")
    assert victim.read_text() == "keep me" and not (folder / "r.csv").exists()
    (folder / "real.gexf").write_text("old")
    (folder / "link.gexf").symlink_to("real.gexf")
    write(res, folder / "link.gexf")
    assert (folder / "link.gexf").is_symlink() and (folder / "real.gexf").read_text().startswith("<?xml")


def test_tilde_is_expanded_in_export_paths(res, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    outcomes = write_all(res, [ExportTarget("~/deep/r.json", "json")])
    assert outcomes[0].error is None and (tmp_path / "deep" / "r.json").is_file()
    assert (tmp_path / "deep" / "r.manifest.json").is_file() and not Path("~").exists()


def test_bad_paths_are_export_errors_naming_the_file(res, tmp_path):
    with pytest.raises(ExportError, match=r"cannot (write|export to) .*a\\x00b.json"):
        write(res, str(tmp_path / "a\0b.json"))
    with pytest.raises(ExportError, match="cannot (write|export to) .*File name too long"):
        write(res, tmp_path / ("x" * 300 + ".json"))
