"""The bad-input catalogue of issue 12, fed through the command line.

Every case is something a user can hand atpdsl (a spec, a pairs file, a model folder, a saved result); each
must end in exit 1 with a message that names the input (its file and line, field, tensor or value), never in
exit 3 ("internal error", kept for atpdsl's own bugs), never with a traceback, and never by hanging. Cases that
could block (FIFOs, device files, huge ranges) run in a subprocess with a timeout. `OWNER` says which part of
atpdsl a failing case points at.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from atpdsl.cli.app import main

ZOO_PAIR = 'pair { clean "t1 t2 t3 t4 t1 t2 t3" corrupt "t1 t2 t3 t5 t1 t2 t3" answer "t4" wrong "t5" }\n'
METRIC = "metric logit_diff(answer, wrong) at last\n"
TAIL = "nodes { heads }\nmethod atp\n"
TINY_PAIR = ('pair { clean "the cat sat on the mat and the dog sat on the" '
             'corrupt "the dog sat on the mat and the cat sat on the" answer "mat" wrong "park" }\n')
CLI = "import sys\nfrom atpdsl.cli import main\nsys.exit(main(sys.argv[1:]))\n"


@dataclass(frozen=True)
class Case:
    """One bad input: `build(tmp)` writes it and returns the command line and the words the message must hold."""

    id: str
    owner: str  # front (language/), outputs, engine, reliability (cli/app.py, engine/load.py)
    build: Callable[[Path], tuple[list[str], list[str]]]
    subprocess: bool = False  # may block or hang: run apart, with a timeout


def _spec(tmp: Path, body: str, *, model: str = 'model zoo "induction-2l"\n', name: str = "s.atp",
          encoding: str = "utf-8") -> Path:
    path = tmp / name
    path.write_text(model + body, encoding=encoding, errors="surrogatepass")
    return path


def _check(tmp: Path, body: str, *words: str, line: int | None = None) -> tuple[list[str], list[str]]:
    spec = _spec(tmp, body)
    where = [f"{spec}:{line}:"] if line is not None else []
    return ["check", str(spec)], where + list(words)


def _pairs_file(tmp: Path, name: str, data: bytes, *words: str) -> tuple[list[str], list[str]]:
    (tmp / name).write_bytes(data)
    spec = _spec(tmp, f'pairs from "{name}"\n' + METRIC + TAIL)
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
    spec = _spec(tmp, ZOO_PAIR + METRIC + TAIL + 'export "out/a\\u0000b.json"\n')
    return ["run", str(spec), "--quiet"], [f"{spec}:6:"]


def _top_400_zeros(tmp):
    return _check(tmp, ZOO_PAIR + METRIC + TAIL + "select top 1" + "0" * 400 + "\n", line=6)


def _top_400_zeros_plan(tmp):
    spec = _spec(tmp, ZOO_PAIR + METRIC + TAIL + "select top 1" + "0" * 400 + "\n")
    return ["plan", str(spec)], [f"{spec}:6:"]


def _huge_layers(tmp):
    spec = _spec(tmp, ZOO_PAIR + METRIC + "nodes { heads layers 0..100000000000000000000 }\nmethod atp*\n")
    return ["plan", str(spec)], [f"{spec}:4:"]


def _fifo_pairs(tmp):
    os.mkfifo(tmp / "p.jsonl")
    spec = _spec(tmp, 'pairs from "p.jsonl"\n' + METRIC + TAIL)
    return ["check", str(spec)], ["p.jsonl"]


def _dev_zero_pairs(tmp):
    spec = _spec(tmp, 'pairs from "/dev/zero"\n' + METRIC + TAIL)
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


# ------------------------------------------------------------------ model folders (the loader)

@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny random Llama folder (config, safetensors, tokenizer) for the loader's cases to break."""
    import tiny_models as tm

    return tm.save_model(tm.make_llama(), tm.make_tokenizer(), tmp_path_factory.mktemp("tiny") / "model")


def _model_run(tmp: Path, tiny: Path, break_it: Callable[[Path], None], *words: str) -> tuple[list[str], list[str]]:
    folder = tmp / "model"
    shutil.copytree(tiny, folder)
    break_it(folder)
    spec = _spec(tmp, TINY_PAIR + METRIC + TAIL + 'export "out/r.json"\n', model='model "model"\n')
    return ["run", str(spec), "--out", str(tmp / "o"), "--quiet"], list(words)


def _edit_tensors(edit: Callable[[dict], None]) -> Callable[[Path], None]:
    def apply(folder: Path) -> None:
        from safetensors.torch import load_file, save_file

        tensors = load_file(folder / "model.safetensors")
        edit(tensors)
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})

    return apply


UP = "model.layers.0.mlp.up_proj.weight"


def _set_value(value: float) -> Callable[[Path], None]:
    def edit(tensors: dict) -> None:
        tensors[UP] = tensors[UP].clone()
        tensors[UP][3, 5] = value

    return _edit_tensors(edit)


def _truncate(folder: Path) -> None:
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])


def _garbage(folder: Path) -> None:
    (folder / "model.safetensors").write_bytes(bytes(range(256)) * 40)


def _pickle_only(folder: Path) -> None:
    import decimal

    import torch
    from safetensors.torch import load_file

    tensors = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    # a plain tensor dict plus an object that needs its class to unpickle: weights_only refuses it
    tensors["extra"] = decimal.Decimal("1.5")
    torch.save(tensors, folder / "pytorch_model.bin")


def _config_value(key: str, value) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        config = json.loads((folder / "config.json").read_text())
        config[key] = value
        (folder / "config.json").write_text(json.dumps(config))

    return edit


def _custom_tokenizer(folder: Path) -> None:
    (folder / "tokenizer.json").unlink()
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.update(tokenizer_class="CustomTok", auto_map={"AutoTokenizer": ["custom_tok.CustomTok", None]})
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "custom_tok.py").write_text("from transformers import PreTrainedTokenizer\n\n\n"
                                          "class CustomTok(PreTrainedTokenizer):\n    pass\n")


MODEL_CASES = [
    ("weights-truncated", _truncate, ["model.safetensors"]),
    ("weights-garbage", _garbage, ["model.safetensors"]),
    ("weight-wrong-shape", _edit_tensors(lambda t: t.__setitem__(UP, t[UP][:, :5].contiguous())), [UP, "shape"]),
    ("weight-missing", _edit_tensors(lambda t: t.pop(UP)), [UP]),
    ("weight-nan", _set_value(float("nan")), [UP, "NaN"]),
    ("weight-inf", _set_value(float("inf")), [UP, "infinite"]),
    ("weights-pickle-only", _pickle_only, ["pytorch_model.bin"]),
    ("tokenizer-custom-code", _custom_tokenizer, ["tokenizer", "--trust-remote-code"]),
    ("config-zero-heads", _config_value("num_attention_heads", 0), ["heads", "0"]),
    ("config-negative-layers", _config_value("num_hidden_layers", -2), ["layers", "-2"]),
    ("config-not-json", lambda f: (f / "config.json").write_text('{"model_type": "llama",'), ["config.json"]),
]


# ------------------------------------------------------------------ saved results given to show / export

@pytest.fixture(scope="module")
def saved_result(tmp_path_factory) -> Path:
    """A real result JSON, from `atpdsl run` on the shipped zoo model."""
    tmp = tmp_path_factory.mktemp("result")
    spec = _spec(tmp, ZOO_PAIR + METRIC + TAIL + 'export "out/r.json"\n')
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


# ------------------------------------------------------------------ running the command line

def _run(argv: list[str], capsys, *, apart: bool, env: dict[str, str] | None = None) -> tuple[int, str]:
    if not apart:
        code = main(argv)
        out, err = capsys.readouterr()
        return code, out + err
    try:
        done = subprocess.run([sys.executable, "-c", CLI, *argv], capture_output=True, text=True, timeout=60,
                              env=env, errors="replace")
    except subprocess.TimeoutExpired:
        pytest.fail(f"`atpdsl {' '.join(argv)[:200]}` did not return within 60 s")
    return done.returncode, done.stdout + done.stderr


def _assert_clean_failure(code: int, text: str, words: list[str], what: str) -> None:
    assert "Traceback" not in text, f"{what}: traceback\n{text[-3000:]}"
    assert "internal error" not in text, f"{what}: exit 3 for a user's input\n{text[-2000:]}"
    assert code == 1, f"{what}: exit {code}, wanted 1\n{text[-2000:]}"
    missing = [w for w in words if w not in text]
    assert not missing, f"{what}: the message does not name {missing}\n{text[-2000:]}"


@pytest.mark.parametrize("case", SPEC_CASES, ids=lambda c: f"{c.owner}:{c.id}")
def test_spec_and_pairs_inputs_exit_1_naming_the_input(case, tmp_path, capsys):
    argv, words = case.build(tmp_path)
    code, text = _run(argv, capsys, apart=case.subprocess)
    _assert_clean_failure(code, text, words, case.id)


@pytest.mark.parametrize("name, break_it, words", MODEL_CASES, ids=[c[0] for c in MODEL_CASES])
def test_broken_model_folders_exit_1_naming_the_file_or_tensor(name, break_it, words, tiny_model, tmp_path, capsys):
    argv, words = _model_run(tmp_path, tiny_model, break_it, *words)
    code, text = _run(argv, capsys, apart=False)
    _assert_clean_failure(code, text, words, name)
    assert "weights_only=False" not in text  # never suggest unpickling unsafely
    assert not (tmp_path / "o" / "r.json").exists(), "a result was written from a broken model"


def test_the_intact_tiny_model_runs(tiny_model, tmp_path, capsys):
    """The model cases above fail because of what each breaks: the same folder unbroken runs."""
    argv, _ = _model_run(tmp_path, tiny_model, lambda folder: None)
    code, text = _run(argv, capsys, apart=False)
    assert code == 0, text[-2000:]
    assert json.loads((tmp_path / "o" / "r.json").read_text())["scores"]["rows"]


def test_plain_pickled_state_dict_still_loads(tiny_model, tmp_path, capsys):
    """A `.bin` of plain tensors is safe to read (weights_only) and is read: only code-needing pickles are refused."""
    def to_bin(folder: Path) -> None:
        import torch
        from safetensors.torch import load_file

        tensors = load_file(folder / "model.safetensors")
        (folder / "model.safetensors").unlink()
        torch.save(tensors, folder / "pytorch_model.bin")

    argv, _ = _model_run(tmp_path, tiny_model, to_bin)
    code, text = _run(argv, capsys, apart=False)
    assert code == 0, text[-2000:]


def test_hub_id_without_network_or_cache_says_so_in_one_line(tmp_path):
    spec = _spec(tmp_path, TINY_PAIR + METRIC + TAIL, model='model "nobody-here/no-such-model"\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
    env.update(HF_HOME=str(tmp_path / "hf-empty"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    code, text = _run(["run", str(spec), "--quiet"], None, apart=True, env=env)
    _assert_clean_failure(code, text, ["nobody-here/no-such-model", "HF_HUB_OFFLINE", "hf download"], "hub id")
    errors = [line for line in text.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: "), errors


@pytest.mark.parametrize("name, content", RESULT_CASES, ids=[c[0] for c in RESULT_CASES])
@pytest.mark.parametrize("command", ["show", "export"])
def test_malformed_results_exit_1_naming_the_file(command, name, content, saved_result, tmp_path, capsys):
    bad = tmp_path / f"{name}.json"
    bad.write_text(content(json.loads(saved_result.read_text())), encoding="utf-8")
    argv = [command, str(bad)] + (["--to", "csv", "--out", str(tmp_path / "x.csv")] if command == "export" else [])
    code, text = _run(argv, capsys, apart=False)
    _assert_clean_failure(code, text, [bad.name], f"{command} {name}")


@pytest.mark.parametrize("command", ["show", "export"])
@pytest.mark.parametrize("kind", ["missing", "folder", "not-utf8"])
def test_unreadable_results_exit_1(command, kind, tmp_path, capsys):
    path = tmp_path / "r.json"
    if kind == "folder":
        path.mkdir()
    elif kind == "not-utf8":
        path.write_bytes(b'{"format": "\xff\xfe"}')
    argv = [command, str(path)] + (["--to", "csv", "--out", str(tmp_path / "x.csv")] if command == "export" else [])
    code, text = _run(argv, capsys, apart=False)
    _assert_clean_failure(code, text, ["r.json"], f"{command} {kind}")


def test_a_bom_is_accepted_in_pairs_files(tmp_path, capsys):
    """Excel and Notepad save UTF-8 with a byte-order mark: it is not an error."""
    row = {"clean": "t1 t2 t3 t4 t1 t2 t3", "corrupt": "t1 t2 t3 t5 t1 t2 t3", "answer": "t4", "wrong": "t5"}
    (tmp_path / "p.jsonl").write_bytes(b"\xef\xbb\xbf" + json.dumps(row).encode() + b"\n")
    (tmp_path / "p.csv").write_bytes(b"\xef\xbb\xbfclean,corrupt,answer,wrong\n" + ",".join(row.values()).encode()
                                     + b"\n")
    for name in ("p.jsonl", "p.csv"):
        spec = _spec(tmp_path, f'pairs from "{name}"\n' + METRIC + TAIL, name=f"{name}.atp")
        code, text = _run(["check", str(spec)], capsys, apart=False)
        assert code == 0 and "ok (1 pairs)" in text, text


def test_float64_with_left_padding_never_writes_nan(tiny_model, tmp_path, capsys):
    """dtype float64 with pairs of different lengths (left-padded batches): finite numbers, or a refusal naming NaN."""
    folder = tmp_path / "model"
    shutil.copytree(tiny_model, folder)
    pairs = ('pair { clean "the cat sat on the" corrupt "the dog sat on the" answer "mat" wrong "park" }\n'
             + TINY_PAIR)
    spec = _spec(tmp_path, pairs + METRIC + TAIL + 'export "out/r.json"\n',
                 model='model "model" { dtype float64 }\n')
    code, text = _run(["run", str(spec), "--out", str(tmp_path / "o"), "--quiet"], capsys, apart=False)
    assert "Traceback" not in text and "internal error" not in text, text[-2000:]
    if code == 1:
        assert "NaN" in text or "nan" in text, text[-2000:]
        return
    assert code == 0, text[-2000:]
    doc = json.loads((tmp_path / "o" / "r.json").read_text(),
                     parse_constant=lambda c: pytest.fail(f"bare {c} in the result JSON"))
    assert not doc.get("non_finite"), f"exit 0 with non-finite numbers at {doc.get('non_finite', [])[:4]}"
    assert all(isinstance(r["estimate"], float) for r in doc["scores"]["rows"]), doc["scores"]["rows"][:3]
