"""The bad-input catalogue of issue 12, fed through the command line: spec and pairs files, saved results.

Every case is something a user can hand atpdsl; each must end in exit 1 with a message that names the input
(its file and line, field or value), never in exit 3 ("internal error", kept for atpdsl's own bugs), never
with a traceback, and never by hanging. Cases that could block (FIFOs, device files, huge ranges) run in a
subprocess with a timeout. `owner` says which part of atpdsl a failing case points at. The model-folder
part of the catalogue (weights, configs, tokenizers, the hub) is in tests/engine/test_load.py.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from cli_support import METRIC, TAIL, ZOO_PAIR, assert_clean_failure, run_cli, write_spec

from atpdsl.cli.app import main


@dataclass(frozen=True)
class Case:
    """One bad input: `build(tmp)` writes it and returns the command line and the words the message must hold."""

    id: str
    owner: str  # front (language/), outputs, engine, reliability (cli/app.py, engine/load.py)
    build: Callable[[Path], tuple[list[str], list[str]]]
    subprocess: bool = False  # may block or hang: run apart, with a timeout


def _check(tmp: Path, body: str, *words: str, line: int | None = None) -> tuple[list[str], list[str]]:
    spec = write_spec(tmp, body)
    where = [f"{spec}:{line}:"] if line is not None else []
    return ["check", str(spec)], where + list(words)


def _pairs_file(tmp: Path, name: str, data: bytes, *words: str) -> tuple[list[str], list[str]]:
    (tmp / name).write_bytes(data)
    spec = write_spec(tmp, f'pairs from "{name}"\n' + METRIC + TAIL)
    return ["check", str(spec)], [name, *words]


# ------------------------------------------------------------------ spec and pairs files (the front end)

def _non_utf8(tmp):
    good = json.dumps({"clean": "t1 t2", "corrupt": "t1 t3", "answer": "t4", "wrong": "t5"}).encode()
    return _pairs_file(tmp, "p.jsonl", good + b"\n" + good[:10] + b"\xff\xfe" + good[10:] + b"\n", "p.jsonl:2")


def _number_answer(tmp):
    row = {"clean": "t1 t2", "corrupt": "t1 t3", "answer": 7, "wrong": "t5"}
    return _pairs_file(tmp, "p.jsonl", (json.dumps(row) + "\n").encode(), "p.jsonl:1", "answer")


def _csv(text: str, *words: str):
    return lambda tmp: _pairs_file(tmp, "p.csv", text.encode(), *words)


def _surrogate_answer(tmp):
    return _check(tmp, 'pair { clean "t1 t2" corrupt "t1 t3" answer "\\ud800" wrong "t5" }\n' + METRIC + TAIL,
                  line=2)


def _surrogate_path(tmp):
    return _check(tmp, 'pairs from "p\\ud800.jsonl"\n' + METRIC + TAIL, line=2)


def _long_component(tmp):
    return _check(tmp, f'pairs from "{"a" * 300}.jsonl"\n' + METRIC + TAIL, line=2)


def _nul_in_export(tmp):
    return _check(tmp, ZOO_PAIR + METRIC + TAIL + 'export "out/a\\u0000b.json"\n', line=6)


def _nul_in_export_run(tmp):
    spec = write_spec(tmp, ZOO_PAIR + METRIC + TAIL + 'export "out/a\\u0000b.json"\n')
    return ["run", str(spec), "--quiet"], [f"{spec}:6:"]


def _top_400_zeros(tmp):
    return _check(tmp, ZOO_PAIR + METRIC + TAIL + "select top 1" + "0" * 400 + "\n", line=6)


def _top_400_zeros_plan(tmp):
    spec = write_spec(tmp, ZOO_PAIR + METRIC + TAIL + "select top 1" + "0" * 400 + "\n")
    return ["plan", str(spec)], [f"{spec}:6:"]


def _huge_layers(tmp):
    spec = write_spec(tmp, ZOO_PAIR + METRIC + "nodes { heads layers 0..100000000000000000000 }\nmethod atp*\n")
    return ["plan", str(spec)], [f"{spec}:4:"]


def _fifo_pairs(tmp):
    os.mkfifo(tmp / "p.jsonl")
    spec = write_spec(tmp, 'pairs from "p.jsonl"\n' + METRIC + TAIL)
    return ["check", str(spec)], ["p.jsonl"]


def _dev_zero_pairs(tmp):
    spec = write_spec(tmp, 'pairs from "/dev/zero"\n' + METRIC + TAIL)
    return ["check", str(spec)], ["/dev/zero"]


def _dev_zero_spec(tmp):
    return ["check", "/dev/zero"], ["/dev/zero"]


def _fifo_spec(tmp):
    os.mkfifo(tmp / "f.atp")
    return ["check", str(tmp / "f.atp")], ["f.atp"]


def _prompt_too_long(tmp):
    long = " ".join(f"t{i % 60}" for i in range(80))  # induction-2l has 49 positions
    body = f'pair {{ clean "{long} t1" corrupt "{long} t2" answer "t4" wrong "t5" }}\n' + METRIC + TAIL
    return _check(tmp, body, "49", line=2)


def _companion_overwrite(tmp):
    return _check(tmp, ZOO_PAIR + METRIC + TAIL + 'export "out/r.csv"\nexport "out/r-edges.csv"\n', "r-edges.csv")


SPEC_CASES = [
    Case("pairs-not-utf8", "front", _non_utf8),
    Case("pairs-number-answer", "front", _number_answer),
    Case("csv-unquoted-comma", "front", _csv("clean,corrupt,answer,wrong\nt1, t2,t1 t3,t4,t5\n", "p.csv:2")),
    Case("csv-extra-values", "front", _csv("clean,corrupt,answer,wrong\nt1 t2,t1 t3,t4,t5,t6\n", "p.csv:2")),
    Case("csv-duplicate-header", "front", _csv("clean,clean,corrupt,answer,wrong\na,b,c,d,e\n", "p.csv:1", "clean")),
    Case("surrogate-in-answer", "front", _surrogate_answer),
    Case("surrogate-in-path", "front", _surrogate_path),
    Case("path-component-over-255", "front", _long_component),
    Case("nul-in-export-path", "front", _nul_in_export),
    Case("nul-in-export-path-run", "front", _nul_in_export_run),
    Case("select-top-400-zeros", "front", _top_400_zeros),
    Case("select-top-400-zeros-plan", "front", _top_400_zeros_plan, subprocess=True),
    Case("huge-layer-range-atp-star", "front", _huge_layers, subprocess=True),
    Case("pairs-file-is-a-fifo", "front", _fifo_pairs, subprocess=True),
    Case("pairs-file-is-dev-zero", "front", _dev_zero_pairs, subprocess=True),
    Case("spec-is-dev-zero", "front", _dev_zero_spec, subprocess=True),
    Case("spec-is-a-fifo", "front", _fifo_spec, subprocess=True),
    Case("prompt-longer-than-context", "front", _prompt_too_long),
    Case("companion-overwrites-export", "outputs", _companion_overwrite),
]


# ------------------------------------------------------------------ saved results given to show / export

@pytest.fixture(scope="module")
def saved_result(tmp_path_factory) -> Path:
    """A real result JSON, from `atpdsl run` on the shipped zoo model."""
    tmp = tmp_path_factory.mktemp("result")
    spec = write_spec(tmp, ZOO_PAIR + METRIC + TAIL + 'export "out/r.json"\n')
    assert main(["run", str(spec), "--out", str(tmp / "o"), "--quiet"]) == 0
    return tmp / "o" / "r.json"


def _mutate(edit: Callable[[dict], None]) -> Callable[[dict], str]:
    def text(doc: dict) -> str:
        edit(doc)
        return json.dumps(doc)

    return text


RESULT_CASES = [
    ("empty-file", lambda doc: ""),
    ("not-json", lambda doc: "this is not JSON"),
    ("truncated", lambda doc: json.dumps(doc)[: len(json.dumps(doc)) // 2]),
    ("json-array", lambda doc: "[]"),
    ("json-null", lambda doc: "null"),
    ("empty-object", lambda doc: "{}"),
    ("future-schema", _mutate(lambda d: d.__setitem__("schema_version", 999))),
    ("no-scores", _mutate(lambda d: d.pop("scores"))),
    ("rows-not-a-list", _mutate(lambda d: d["scores"].__setitem__("rows", "x"))),
    ("row-not-an-object", _mutate(lambda d: d["scores"].__setitem__("rows", [1, 2]))),
    ("estimate-not-a-number", _mutate(lambda d: d["scores"]["rows"][0].__setitem__("estimate", "abc"))),
    ("bad-node-name", _mutate(lambda d: d["scores"]["rows"][0].__setitem__("node", "not a node"))),
    ("no-model-id", _mutate(lambda d: d.pop("model_id"))),
    ("edges-not-objects", _mutate(lambda d: d.__setitem__("edges", {"rows": [1]}))),
]


@pytest.mark.parametrize("case", SPEC_CASES, ids=lambda c: f"{c.owner}:{c.id}")
def test_spec_and_pairs_inputs_exit_1_naming_the_input(case, tmp_path, capsys):
    argv, words = case.build(tmp_path)
    code, text = run_cli(argv, capsys, apart=case.subprocess)
    assert_clean_failure(code, text, words, case.id)


@pytest.mark.parametrize("name, content", RESULT_CASES, ids=[c[0] for c in RESULT_CASES])
@pytest.mark.parametrize("command", ["show", "export"])
def test_malformed_results_exit_1_naming_the_file(command, name, content, saved_result, tmp_path, capsys):
    bad = tmp_path / f"{name}.json"
    bad.write_text(content(json.loads(saved_result.read_text())), encoding="utf-8")
    argv = [command, str(bad)] + (["--to", "csv", "--out", str(tmp_path / "x.csv")] if command == "export" else [])
    code, text = run_cli(argv, capsys, apart=False)
    assert_clean_failure(code, text, [bad.name], f"{command} {name}")


@pytest.mark.parametrize("command", ["show", "export"])
@pytest.mark.parametrize("kind", ["missing", "folder", "not-utf8"])
def test_unreadable_results_exit_1(command, kind, tmp_path, capsys):
    path = tmp_path / "r.json"
    if kind == "folder":
        path.mkdir()
    elif kind == "not-utf8":
        path.write_bytes(b'{"format": "\xff\xfe"}')
    argv = [command, str(path)] + (["--to", "csv", "--out", str(tmp_path / "x.csv")] if command == "export" else [])
    code, text = run_cli(argv, capsys, apart=False)
    assert_clean_failure(code, text, ["r.json"], f"{command} {kind}")


def test_a_bom_is_accepted_in_pairs_files(tmp_path, capsys):
    """Excel and Notepad save UTF-8 with a byte-order mark: it is not an error."""
    row = {"clean": "t1 t2 t3 t4 t1 t2 t3", "corrupt": "t1 t2 t3 t5 t1 t2 t3", "answer": "t4", "wrong": "t5"}
    (tmp_path / "p.jsonl").write_bytes(b"\xef\xbb\xbf" + json.dumps(row).encode() + b"\n")
    (tmp_path / "p.csv").write_bytes(b"\xef\xbb\xbfclean,corrupt,answer,wrong\n" + ",".join(row.values()).encode()
                                     + b"\n")
    for name in ("p.jsonl", "p.csv"):
        spec = write_spec(tmp_path, f'pairs from "{name}"\n' + METRIC + TAIL, name=f"{name}.atp")
        code, text = run_cli(["check", str(spec)], capsys, apart=False)
        assert code == 0 and "ok (1 pairs)" in text, text
