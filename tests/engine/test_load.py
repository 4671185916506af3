"""The model loader (atpdsl/engine/load.py) on broken model folders, through `atpdsl run`, and directly.

Each case breaks one thing in a tiny random Llama folder (a weight missing, mis-shaped, truncated, NaN; a
pickle that needs code; a tokenizer that needs code; an impossible config) and requires exit 1 with a
message naming the file, tensor or field, no traceback and no result written; the intact folder, and the
same weights as a plain pickle, run. Part of issue 12's bad-input catalogue (tests/test_bad_inputs.py).
"""
from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from cli_support import METRIC, TAIL, TINY_PAIR, assert_clean_failure, run_cli, write_spec


def _model_run(tmp: Path, tiny: Path, break_it: Callable[[Path], None], *words: str) -> tuple[list[str], list[str]]:
    folder = tmp / "model"
    shutil.copytree(tiny, folder)
    break_it(folder)
    spec = write_spec(tmp, TINY_PAIR + METRIC + TAIL + 'export "out/r.json"\n', model='model "model"\n')
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


@pytest.mark.parametrize("name, break_it, words", MODEL_CASES, ids=[c[0] for c in MODEL_CASES])
def test_broken_model_folders_exit_1_naming_the_file_or_tensor(name, break_it, words, tiny_llama_dir, tmp_path, capsys):
    argv, words = _model_run(tmp_path, tiny_llama_dir, break_it, *words)
    code, text = run_cli(argv, capsys, apart=False)
    assert_clean_failure(code, text, words, name)
    assert "weights_only=False" not in text  # never suggest unpickling unsafely
    assert not (tmp_path / "o" / "r.json").exists(), "a result was written from a broken model"


def test_the_intact_tiny_llama_dir_runs(tiny_llama_dir, tmp_path, capsys):
    """The model cases above fail because of what each breaks: the same folder unbroken runs."""
    argv, _ = _model_run(tmp_path, tiny_llama_dir, lambda folder: None)
    code, text = run_cli(argv, capsys, apart=False)
    assert code == 0, text[-2000:]
    assert json.loads((tmp_path / "o" / "r.json").read_text())["scores"]["rows"]


def test_plain_pickled_state_dict_still_loads(tiny_llama_dir, tmp_path, capsys):
    """A `.bin` of plain tensors is safe to read (weights_only) and is read: only code-needing pickles are refused."""
    def to_bin(folder: Path) -> None:
        import torch
        from safetensors.torch import load_file

        tensors = load_file(folder / "model.safetensors")
        (folder / "model.safetensors").unlink()
        torch.save(tensors, folder / "pytorch_model.bin")

    argv, _ = _model_run(tmp_path, tiny_llama_dir, to_bin)
    code, text = run_cli(argv, capsys, apart=False)
    assert code == 0, text[-2000:]


def test_hub_id_without_network_or_cache_says_so_in_one_line(tmp_path):
    spec = write_spec(tmp_path, TINY_PAIR + METRIC + TAIL, model='model "nobody-here/no-such-model"\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
    env.update(HF_HOME=str(tmp_path / "hf-empty"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    code, text = run_cli(["run", str(spec), "--quiet"], None, apart=True, env=env)
    assert_clean_failure(code, text, ["nobody-here/no-such-model", "HF_HUB_OFFLINE", "hf download"], "hub id")
    errors = [line for line in text.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: "), errors


def test_float64_with_left_padding_never_writes_nan(tiny_llama_dir, tmp_path, capsys):
    """dtype float64 with pairs of different lengths (left-padded batches): finite numbers, or a refusal naming NaN."""
    folder = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, folder)
    pairs = ('pair { clean "the cat sat on the" corrupt "the dog sat on the" answer "mat" wrong "park" }\n'
             + TINY_PAIR)
    spec = write_spec(tmp_path, pairs + METRIC + TAIL + 'export "out/r.json"\n',
                 model='model "model" { dtype float64 }\n')
    code, text = run_cli(["run", str(spec), "--out", str(tmp_path / "o"), "--quiet"], capsys, apart=False)
    assert "Traceback" not in text and "internal error" not in text, text[-2000:]
    if code == 1:
        assert "NaN" in text or "nan" in text, text[-2000:]
        return
    assert code == 0, text[-2000:]
    doc = json.loads((tmp_path / "o" / "r.json").read_text(),
                     parse_constant=lambda c: pytest.fail(f"bare {c} in the result JSON"))
    assert not doc.get("non_finite"), f"exit 0 with non-finite numbers at {doc.get('non_finite', [])[:4]}"
    assert all(isinstance(r["estimate"], float) for r in doc["scores"]["rows"]), doc["scores"]["rows"][:3]


@pytest.mark.parametrize("name, break_it, words", [
    ("zero-heads", _config_value("num_attention_heads", 0), ["config.json", "`num_attention_heads` is 0"]),
    ("fractional-width", _config_value("hidden_size", 31.5), ["config.json", "`hidden_size` is 31.5"]),
    ("not-json", lambda f: (f / "config.json").write_text('{"model_type": "llama",'), ["config.json:1:", "JSON"]),
    ("not-utf8", lambda f: (f / "config.json").write_bytes(b'{"model_type": "\xff"}'), ["config.json", "UTF-8"]),
])
def test_the_loader_checks_the_config_itself(name, break_it, words, tiny_llama_dir, tmp_path):
    """The checker reads config.json too, but the loader must not rely on it (the Python API loads plans directly)."""
    from atpdsl.engine.load import load_model
    from atpdsl.errors import ModelError
    from atpdsl.plan import ModelRef, SourceRef

    folder = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, folder)
    break_it(folder)
    with pytest.raises(ModelError) as err:
        load_model(ModelRef(str(folder), where=SourceRef("s.atp", 1, 7)))
    message = str(err.value)
    assert message.startswith("s.atp:1:7: ") and all(w in message for w in words), message
