"""Security stays as it is, and is tested: no spec can run code.

- A model folder's own Python code (config, model or tokenizer classes) runs only under `--trust-remote-code`:
  the code here would write a marker file the moment it is imported.
- Pickled weights (`pytorch_model.bin`) are read with torch's weights_only loader: a `__reduce__` that would
  write a marker never runs, with or without the flag, and the error does not suggest `weights_only=False`.
- `plan --emit python` escapes the spec's path: a folder named to break out of the generated program's
  docstring does not run its command when the program runs.
Each case runs `atpdsl` in a subprocess with its own empty Hugging Face cache, so no imported module lingers.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path


CLI = "import sys\nfrom atpdsl.cli import main\nsys.exit(main(sys.argv[1:]))\n"
SPEC_BODY = ('pair { clean "the cat sat on the mat and the dog sat on the" '
             'corrupt "the dog sat on the mat and the cat sat on the" answer "mat" wrong "park" }\n'
             "metric logit_diff(answer, wrong) at last\nnodes { heads }\nmethod atp\nexport \"out/r.json\"\n")


def _atpdsl(argv: list[str], tmp: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
    env.update(HF_HOME=str(tmp / "hf"), HF_MODULES_CACHE=str(tmp / "hf-modules"), HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1")
    done = subprocess.run([sys.executable, "-c", CLI, *argv], capture_output=True, text=True, timeout=300, env=env)
    assert "Traceback" not in done.stdout + done.stderr, done.stderr[-3000:]
    return done


def _folder_with_custom_code(tmp: Path, tiny: Path, marker: Path) -> Path:
    """A Llama whose folder declares its own config and model classes (auto_map), each writing `marker` on import.
    Without the flag transformers uses its own Llama classes; with it, the folder's."""
    folder = tmp / "model"
    shutil.copytree(tiny, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(auto_map={"AutoConfig": "configuration_marker.MarkerConfig",
                            "AutoModelForCausalLM": "modeling_marker.MarkerForCausalLM"})
    (folder / "config.json").write_text(json.dumps(config))
    touch = f"open({str(marker)!r}, 'a').write('ran\\n')\n"
    (folder / "configuration_marker.py").write_text(
        touch + "from transformers import LlamaConfig\n\n\nclass MarkerConfig(LlamaConfig):\n"
                "    pass\n")
    (folder / "modeling_marker.py").write_text(
        touch + "from transformers import LlamaForCausalLM\n\nfrom .configuration_marker import MarkerConfig\n\n\n"
                "class MarkerForCausalLM(LlamaForCausalLM):\n    config_class = MarkerConfig\n")
    return folder


def _spec(tmp: Path) -> Path:
    spec = tmp / "s.atp"
    spec.write_text('model "model"\n' + SPEC_BODY)
    return spec


def test_model_code_in_the_folder_runs_only_with_the_flag(tiny_llama_dir, tmp_path):
    marker = tmp_path / "custom-code-ran"
    _folder_with_custom_code(tmp_path, tiny_llama_dir, marker)
    spec = _spec(tmp_path)
    for argv in (["check", str(spec)], ["plan", str(spec)], ["run", str(spec), "--out", str(tmp_path / "o"), "--quiet"]):
        done = _atpdsl(argv, tmp_path)
        assert done.returncode == 0, done.stderr
        assert not marker.exists(), f"`atpdsl {argv[0]}` ran the folder's code without --trust-remote-code"
    done = _atpdsl(["run", str(spec), "--out", str(tmp_path / "o2"), "--quiet", "--trust-remote-code"], tmp_path)
    assert marker.exists(), "with --trust-remote-code the folder's code should have been imported"
    assert done.returncode == 0, done.stderr


def test_tokenizer_code_in_the_folder_runs_only_with_the_flag(tiny_llama_dir, tmp_path):
    marker = tmp_path / "tokenizer-code-ran"
    folder = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.update(tokenizer_class="MarkerTokenizer", auto_map={"AutoTokenizer": [None, "marker_tok.MarkerTokenizer"]})
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "marker_tok.py").write_text(f"open({str(marker)!r}, 'a').write('ran\\n')\n"
                                          "from transformers import PreTrainedTokenizerFast\n\n\n"
                                          "class MarkerTokenizer(PreTrainedTokenizerFast):\n    pass\n")
    spec = _spec(tmp_path)
    done = _atpdsl(["run", str(spec), "--out", str(tmp_path / "o"), "--quiet"], tmp_path)
    assert not marker.exists(), "the tokenizer's code ran without --trust-remote-code"
    assert done.returncode in (0, 1), done.stderr
    done = _atpdsl(["run", str(spec), "--out", str(tmp_path / "o2"), "--quiet", "--trust-remote-code"], tmp_path)
    assert marker.exists(), "with --trust-remote-code the tokenizer's code should have been imported"
    assert done.returncode == 0, done.stderr


class _Marker:
    """Unpickling this object calls open(path, "w"): a stand-in for any code a pickle can smuggle in."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_pickle_that_would_run_code_is_never_unpickled(tiny_llama_dir, tmp_path):
    import torch
    from safetensors.torch import load_file

    marker = tmp_path / "pickle-code-ran"
    folder = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, folder)
    tensors = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    tensors["model.embed_tokens.weight"] = _Marker(str(marker))
    torch.save(tensors, folder / "pytorch_model.bin")
    spec = _spec(tmp_path)
    for flags in ([], ["--trust-remote-code"]):
        done = _atpdsl(["run", str(spec), "--quiet", *flags], tmp_path)
        assert not marker.exists(), f"the pickle's code ran ({flags})"
        assert done.returncode == 1 and "pytorch_model.bin" in done.stderr, done.stderr
        assert "weights_only=False" not in done.stderr


def test_no_spec_can_ask_for_remote_code(tmp_path):
    """Only the command-line flag turns remote code on: the language has no word for it."""
    from atpdsl.language.compiler import compile_text

    grammar = (Path(__file__).resolve().parent.parent / "grammar" / "atp.lark").read_text()
    assert "trust" not in grammar.lower()
    plan = compile_text('model zoo "induction-2l"\n'
                        'pair { clean "t1 t2 t3" corrupt "t1 t2 t4" answer "t5" wrong "t6" }\n'
                        "metric logit_diff(answer, wrong)\n", base_dir=tmp_path)
    assert plan.model.trust_remote_code is False


def test_emitted_program_escapes_the_spec_path(tmp_path):
    marker = tmp_path / "injected-command-ran"  # the program runs in tmp_path: a relative name, no slash
    folder = tmp_path / f'x"""+__import__("os").system("touch {marker.name}")+"""'
    folder.mkdir()
    spec = folder / "s.atp"
    spec.write_text('model zoo "induction-2l"\n'
                    'pair { clean "t1 t2 t3 t4 t1 t2 t3" corrupt "t1 t2 t3 t5 t1 t2 t3" answer "t4" wrong "t5" }\n'
                    "metric logit_diff(answer, wrong) at last\nnodes { heads }\nmethod atp\n")
    done = _atpdsl(["plan", str(spec), "--emit", "python"], tmp_path)
    assert done.returncode == 0, done.stderr
    program = tmp_path / "program.py"
    program.write_text(done.stdout)
    compile(done.stdout, str(program), "exec")  # still valid Python
    subprocess.run([sys.executable, str(program)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert not marker.exists(), "the folder name's command ran when the emitted program ran"
