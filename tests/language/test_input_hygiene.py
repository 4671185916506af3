"""Bad input reaches `atpdsl check` and `plan` as exit 1 with a message naming it, never exit 3 and never a
command that does not return: encodings, non-string fields, malformed CSV, special files, impossible paths,
numbers that overflow, absurd ranges, impossible model sizes."""
from __future__ import annotations

import json
import os
import shutil

import pytest

from atpdsl.cli import main

GOLDEN_MODEL = "tests/golden/check/model"
PAIR = '{"clean": "the girl said", "corrupt": "the boy said", "answer": " she", "wrong": " he"}\n'


@pytest.fixture
def folder(tmp_path, project_root):
    shutil.copytree(project_root / GOLDEN_MODEL, tmp_path / "model")
    (tmp_path / "pairs.jsonl").write_text(PAIR)
    return tmp_path


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err and "internal error" not in out + err
    return code, out + err


def spec(folder, body: str, pairs: str = 'pairs from "pairs.jsonl"', metric: str = "logit_diff(answer, wrong)") -> str:
    path = folder / "s.atp"
    path.write_text(f'model "model"\n{pairs}\nmetric {metric}\n{body}', encoding="utf-8")
    return str(path)


def check_and_plan(capsys, path: str) -> str:
    code, text = run_cli(capsys, "check", "--output-format", "concise", path)
    assert code == 1, text
    code2, text2 = run_cli(capsys, "plan", path)
    assert code2 == 1, text2
    return text


def test_bom_pairs_file_is_accepted(folder, capsys):
    (folder / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + PAIR.encode())
    (folder / "bom.csv").write_bytes(b"\xef\xbb\xbfclean,corrupt,answer,wrong\nthe girl said,the boy said, she, he\n")
    for name in ("bom.jsonl", "bom.csv"):
        code, text = run_cli(capsys, "check", spec(folder, "", f'pairs from "{name}"'))
        assert code == 0, text


def test_non_utf8_names_line_and_byte(folder, capsys):
    (folder / "bad.jsonl").write_bytes(PAIR.encode() + b'{"clean": "caf\xe9"}\n')
    text = check_and_plan(capsys, spec(folder, "", 'pairs from "bad.jsonl"'))
    # `{"clean": "caf` is 14 bytes: the bad byte is the 15th of line 2
    assert "bad.jsonl:2:15: E303" in text and "byte 0xe9 at line 2, byte 15 of the line" in text


@pytest.mark.parametrize("value, shown", [(7, "a number (7)"), (True, "a boolean (true)"), (None, None),
                                          (["a"], 'a list (["a"])')])
def test_non_string_answer_names_row_and_field(folder, capsys, value, shown):
    row = dict(json.loads(PAIR), answer=value)
    (folder / "p.jsonl").write_text(PAIR + json.dumps(row) + "\n")
    path = spec(folder, "", 'pairs from "p.jsonl"')
    if value is None:  # null is a missing field
        text = check_and_plan(capsys, path)
        assert "E503 no field `answer` in 1 of 2 pairs (first: " in text and "p.jsonl:2)" in text
        return
    text = check_and_plan(capsys, path)
    assert f"p.jsonl:2:1: E310 field `answer` is {shown}, not a string" in text


def test_unused_numeric_field_is_kept_as_text(folder, capsys):
    (folder / "p.jsonl").write_text(json.dumps(dict(json.loads(PAIR), id=3)) + "\n")
    code, text = run_cli(capsys, "check", spec(folder, "", 'pairs from "p.jsonl"'))
    assert code == 0, text


@pytest.mark.parametrize("csv_text, message", [
    ("clean,corrupt,answer,wrong\nthe girl, said,the boy said, she, he\n", "row has 5 values, more than the header's 4"),
    ("clean,corrupt,answer,wrong\nthe girl said,the boy said, she\n", "row has 3 values, fewer than the header's 4"),
    ("clean,corrupt,answer,answer\nthe girl said,the boy said, she, he\n", "names column `answer` twice"),
])
def test_malformed_csv(folder, capsys, csv_text, message):
    (folder / "p.csv").write_text(csv_text)
    text = check_and_plan(capsys, spec(folder, "", 'pairs from "p.csv"'))
    assert message in text and "p.csv:" in text


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this system")
def test_special_files_never_block(folder, capsys):
    os.mkfifo(folder / "fifo.jsonl")
    os.mkfifo(folder / "fifo.atp")
    text = check_and_plan(capsys, spec(folder, "", 'pairs from "fifo.jsonl"'))
    assert "is a FIFO (named pipe), not a regular file" in text
    text = check_and_plan(capsys, spec(folder, "", 'pairs from "/dev/zero.jsonl"'))
    assert "E301" in text
    os.symlink("/dev/zero", folder / "zero.jsonl")
    text = check_and_plan(capsys, spec(folder, "", 'pairs from "zero.jsonl"'))
    assert "is a device, not a regular file" in text
    for path in (str(folder / "fifo.atp"), "/dev/zero"):
        code, text = run_cli(capsys, "check", path)
        assert code == 1 and "not a regular file" in text


@pytest.mark.parametrize("where", ["pairs", "export", "answer", "model"])
def test_lone_surrogates(folder, capsys, where):
    bad = "\\ud800"
    body, pairs, metric = "", 'pairs from "pairs.jsonl"', "logit_diff(answer, wrong)"
    if where == "pairs":
        pairs = f'pairs from "p{bad}.jsonl"'
    elif where == "export":
        body = f'export "out/c{bad}.csv"\n'
    elif where == "answer":
        metric = f'logit_diff(answer, " x{bad}")'
    path = spec(folder, body, pairs, metric)
    if where == "model":
        text = (folder / "s.atp").read_text().replace('model "model"', f'model "m{bad}"')
        (folder / "s.atp").write_text(text)
    text = check_and_plan(capsys, path)
    assert "E005 string holds a lone surrogate \\ud800" in text


def test_json_answer_with_a_lone_surrogate(folder, capsys):
    (folder / "p.jsonl").write_text(PAIR.replace('" she"', '" s\\ud800"'))
    text = check_and_plan(capsys, spec(folder, "", 'pairs from "p.jsonl"'))
    assert "E310 field `answer` contains a lone surrogate \\ud800" in text


@pytest.mark.parametrize("path, message", [
    ("out/a\\u0000b.csv", "export path contains a NUL character"),
    ("out/" + "x" * 300 + ".csv", "export path has a component of 304 bytes"),
    ("/proc/no-such-folder/c.csv", "cannot create folder /proc/no-such-folder"),
])
def test_unwritable_exports(folder, capsys, path, message):
    text = check_and_plan(capsys, spec(folder, f'export "{path}"\n'))
    assert "E806" in text and message in text


def test_export_onto_a_folder(folder, capsys):
    (folder / "out.csv").mkdir()
    text = check_and_plan(capsys, spec(folder, 'export "out.csv"\n'))
    assert "cannot export to `out.csv`: it is an existing folder" in text


def test_long_path_component_in_pairs_and_model(folder, capsys):
    long = "y" * 300
    text = check_and_plan(capsys, spec(folder, "", f'pairs from "{long}.jsonl"'))
    assert "pairs file path has a component of 306 bytes" in text
    (folder / "s.atp").write_text((folder / "s.atp").read_text().replace('pairs from', 'pairs from').replace(
        f'pairs from "{long}.jsonl"', 'pairs from "pairs.jsonl"').replace('model "model"', f'model "./{long}"'))
    text = check_and_plan(capsys, str(folder / "s.atp"))
    assert "model path has a component of 300 bytes" in text


@pytest.mark.parametrize("body, message", [
    ("select top 1" + "0" * 400 + "\n", "`select top` needs a positive integer (at most 1000000000)"),
    ("select threshold 1" + "0" * 400 + "\n", "`select threshold` needs a number >= 0"),
    ("batch 1" + "0" * 400 + "\n", "`batch` must be a positive integer (at most 1000000000)"),
    ("verify top 1" + "0" * 30 + "\n", "`verify top` needs a positive integer (at most 1000000000)"),
    ("diagnose false_negatives { samples 1" + "0" * 400 + " }\n", "`samples` must be an integer from 1 to 1000000"),
])
def test_numbers_that_overflow(folder, capsys, body, message):
    text = check_and_plan(capsys, spec(folder, body))
    assert message in text and "characters)" in text or message in text


def test_absurd_layer_range_without_a_model_does_not_hang_plan(folder, capsys, tmp_path):
    path = spec(folder, "nodes { heads layers 0..100000000000000000000 }\nmethod atp*\n")
    (folder / "s.atp").write_text((folder / "s.atp").read_text().replace('model "model"',
                                                                       'model "EleutherAI/pythia-70m"'))
    text = check_and_plan(capsys, path)
    assert "layer 100000000000000000000 is out of range: no model has more than 100000 layers" in text


@pytest.mark.parametrize("key, value", [("num_attention_heads", 0), ("num_hidden_layers", -1),
                                        ("hidden_size", "16"), ("intermediate_size", 2.5)])
def test_config_sizes_that_are_not_positive_integers(folder, capsys, key, value):
    config = json.loads((folder / "model" / "config.json").read_text())
    config[key] = value
    (folder / "model" / "config.json").write_text(json.dumps(config))
    text = check_and_plan(capsys, spec(folder, ""))
    assert f"E204 model config has unusable sizes: {key}: {json.dumps(value)}" in text
