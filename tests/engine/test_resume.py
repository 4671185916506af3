"""Kill a run at every phase and rerun it: the resumed run writes exactly what an uninterrupted run writes.

Each run is a subprocess (`atpdsl run`, one thread) killed by SIGKILL through the fault-injection variable
ATPDSL_FAULT (atpdsl.faults) right after a record of the named phase is safely on disk: a batch of the scoring
steps (with GradDrop), a batch of verification, a diagnostic patch call, an export file. The rerun must resume
(say so), and every output must equal the uninterrupted run's byte for byte, apart from the JSON's separate
timings section (and the manifest's hashes of that JSON).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.needs("stories260K")

SPEC = """
model "{model}"
pairs from "{pairs}"
metric logit_diff(answer, wrong) at last
nodes {{ heads ; neurons layers 4..4 }}
method atp* {{ graddrop on }}
batch 2
select top 6
verify top 4
diagnose false_negatives {{ samples 40 inclusion 0.25 }}
export "r.json"
export "r.csv"
export "r.graphml"
export "r.gexf"
"""
FAULTS = ["score:1", "score:2", "verify:1", "diagnose:1", "export:2"]


def _spec(tmp: Path, shared_dir: Path) -> Path:
    rows = (shared_dir / "data" / "stories260K-pronoun.jsonl").read_text().splitlines()[:5]
    pairs = tmp / "pairs.jsonl"
    pairs.write_text("\n".join(rows) + "\n")
    spec = tmp / "resume.atp"
    spec.write_text(SPEC.format(model=shared_dir / "models" / "stories260K", pairs=pairs))
    return spec


def _run(spec: Path, out: Path, fault: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.pop("ATPDSL_FAULT", None)
    if fault:
        env["ATPDSL_FAULT"] = fault
    return subprocess.run([sys.executable, "-m", "atpdsl.cli", "run", str(spec), "--out", str(out), "--threads", "1",
                           "--log", str(out.parent / f"{out.name}.log")],
                          capture_output=True, text=True, env=env, timeout=600)


def _outputs(out: Path) -> dict[str, object]:
    """Every output file, the output folder's own path replaced by `<out>` (the runs write to different folders)."""
    files = {}
    for f in sorted(out.iterdir()):
        if f.name.startswith(".") or not f.is_file():
            continue
        text = f.read_bytes().replace(str(out).encode(), b"<out>")
        if f.suffix == ".json" and not f.name.endswith(".manifest.json"):
            doc = json.loads(text)
            doc.pop("timings")
            files[f.name] = doc
        elif f.name.endswith(".manifest.json"):
            doc = json.loads(text)
            files[f.name] = sorted((e["path"].rsplit("/", 1)[-1], e.get("complete", True)) for e in doc["files"])
        else:
            files[f.name] = text
    return files


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, shared_dir):
    tmp = tmp_path_factory.mktemp("resume")
    spec = _spec(tmp, shared_dir)
    done = _run(spec, tmp / "plain")
    assert done.returncode == 0, done.stderr[-3000:]
    assert not (tmp / "plain" / ".atpdsl-run").exists()  # a finished run leaves no state behind
    return spec, _outputs(tmp / "plain")


@pytest.mark.parametrize("fault", FAULTS)
def test_killed_run_resumes_and_writes_the_same_outputs(baseline, fault, tmp_path):
    spec, expected = baseline
    out = tmp_path / "out"
    killed = _run(spec, out, fault)
    assert killed.returncode in (-9, 137), (fault, killed.returncode, killed.stderr[-3000:])
    assert (out / ".atpdsl-run").is_dir()
    again = _run(spec, out)
    assert again.returncode == 0, again.stderr[-3000:]
    log = (tmp_path / "out.log").read_text()
    if fault.startswith("score"):
        assert "resumed" in log
    got = _outputs(out)
    assert sorted(got) == sorted(expected)
    for name in expected:
        assert got[name] == expected[name], (fault, name)
    assert not (out / ".atpdsl-run").exists()
