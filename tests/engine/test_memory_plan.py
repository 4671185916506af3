"""The memory plan before a run (atpdsl.memory, atpdsl.language.checker_memory), without torch and without
weights: `atpdsl plan` prints it; `batch auto` picks the largest batch that fits the budget; a spec whose run
does not fit is refused (E901) with the estimate and the batch that would fit; a 12B GPT-NeoX config (Pythia-12B's
public sizes, written by hand) plans from its config alone with a batch that fits an 80 GB GPU."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from atpdsl.errors import SpecError
from atpdsl.language.compiler import compile_text
from atpdsl.memory import estimate, largest_batch, model_sizes, parse_size, shape_for

ROOT = Path(__file__).resolve().parents[2]
SMOLLM2_CONFIG = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "num_hidden_layers": 30,
                  "hidden_size": 576, "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64,
                  "intermediate_size": 1536, "vocab_size": 49152, "max_position_embeddings": 8192,
                  "tie_word_embeddings": True, "rms_norm_eps": 1e-5, "hidden_act": "silu"}
"""SmolLM2-135M's public sizes (its config.json): the memory plan reads only the config and the tokenizer."""
PYTHIA_12B = {"model_type": "gpt_neox", "architectures": ["GPTNeoXForCausalLM"], "num_hidden_layers": 36,
              "hidden_size": 5120, "num_attention_heads": 40, "intermediate_size": 20480, "vocab_size": 50688,
              "max_position_embeddings": 2048, "rotary_pct": 0.25, "use_parallel_residual": True,
              "tie_word_embeddings": False, "layer_norm_eps": 1e-5}


def _spec(model: str, settings: str = "", batch: str = "batch 4", nodes: str = "heads\n neurons", pairs: int = 8,
          words: int = 20) -> str:
    body = " ".join(["the"] * words)
    pair_lines = "".join(f'pair {{ clean "{body} girl said" corrupt "{body} boy said" answer " she" wrong " he" }}\n'
                         for _ in range(pairs))
    return (f'model "{model}" {{ {settings} }}\n{pair_lines}metric logit_diff(answer, wrong)\n'
            f"nodes {{\n {nodes}\n}}\n{batch}\n")


@pytest.fixture
def smollm2_shaped(tmp_path: Path, stories260k_dir: Path) -> Path:
    """A folder with SmolLM2-135M's config and stories260K's tokenizer: enough to plan memory, which loads nothing.
    The weights file is stories260K's, linked only so that the folder passes the check's file test (E205)."""
    folder = tmp_path / "smollm2-shaped"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(SMOLLM2_CONFIG))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((stories260k_dir / name).read_bytes())
    (folder / "model.safetensors").symlink_to(stories260k_dir / "model.safetensors")
    return folder


def _memory(plan) -> dict:
    return dict(plan.extras)["memory"]


def test_parse_size():
    assert parse_size("80GB") == 80 * 10**9 and parse_size("24 GiB") == 24 * 2**30 and parse_size("512MB") == 512e6
    assert parse_size(2) == 2 * 10**9 and parse_size("1.5g") == 15 * 10**8
    for bad in ("eighty", "-1GB", "0", "12 parsecs"):
        with pytest.raises(ValueError):
            parse_size(bad)


def test_bad_memory_setting_is_a_spec_error(tmp_path):
    text = _spec("../golden/check/model", 'memory "lots"')
    with pytest.raises(SpecError) as err:
        compile_text(text, base_dir=ROOT / "tests" / "engine")
    assert [d.code for d in err.value.diagnostics] == ["E104"]


def test_estimate_grows_with_batch_and_tokens_and_auto_batch_fits(smollm2_shaped):
    plan = compile_text(_spec(str(smollm2_shaped), 'memory "4GB"', "batch auto", pairs=16, words=120), base_dir=".")
    mem = _memory(plan)
    assert mem["budget"] == 4 * 10**9 and mem["budget_source"] == "the `memory` setting"
    assert 1 <= plan.batch == mem["largest_batch"] < 16 and mem["peak"] * 1.1 <= 4e9
    assert mem["tokens"] >= 120 and not mem["notes"]  # lengths from SmolLM2's tokenizer, not guessed
    bigger = compile_text(_spec(str(smollm2_shaped), "", f"batch {plan.batch + 1}", pairs=16, words=120), base_dir=".")
    assert _memory(bigger)["peak"] > mem["peak"]
    longer = compile_text(_spec(str(smollm2_shaped), "", f"batch {plan.batch}", pairs=16, words=240), base_dir=".")
    assert _memory(longer)["peak"] > mem["peak"]


def test_run_that_does_not_fit_is_refused_with_the_batch_that_fits(smollm2_shaped):
    with pytest.raises(SpecError) as err:
        compile_text(_spec(str(smollm2_shaped), 'memory "3GB"', "batch 16", pairs=16, words=200), base_dir=".")
    [diag] = err.value.diagnostics
    assert diag.code == "E901" and "more than the budget of 3 GB" in diag.message
    assert any("fits" in h for h in diag.hints), diag.hints


def _per_position_512(model: Path, extra: str = "", budget: str = "8GB") -> str:
    """The case that once ended in exit 3 after 7 minutes: 4 pairs of 512 tokens, per-position heads and neurons
    (30 x (9 + 1536) x 511 = 23.7M nodes), batch 4, an 8 GB budget."""
    return _spec(str(model), f'memory "{budget}"', "batch 4", "heads per position\n neurons per position", pairs=4,
                 words=509) + extra


def test_smollm2_per_position_512_tokens_without_edges_plans_within_one_and_a_half_forward_backward(smollm2_shaped):
    """Scores reduce per layer as the backward passes and node records are columns: atpdsl's own buffers stay under
    half of what one plain forward + backward holds (weights, activations, logits), and the run fits 8 GB. The
    measured peak of this run is in benchmarks/README.md (bench_scale.py --part memory)."""
    mem = _memory(compile_text(_per_position_512(smollm2_shaped, "select edges none\n"), base_dir="."))
    parts = {name: size for name, size, _ in mem["parts"]}
    plain = parts["weights"] + parts["activations"] + parts["logits"]
    assert parts["node records"] < 1.5e9 and mem["largest_batch"] == 4
    assert mem["peak"] <= 1.5 * plain, (mem["peak"], plain)


def test_smollm2_per_position_512_tokens_with_edges_is_refused_up_front_naming_the_edges(smollm2_shaped):
    """With the edges' reads kept for every layer the same run needs more than 7 GB (7.3 GB measured,
    benchmarks/README.md): refused before any loading, with the estimate, and the hint says what the edges take
    (against the sdpa run `select edges none` would make) and how to turn them off."""
    with pytest.raises(SpecError) as err:
        compile_text(_per_position_512(smollm2_shaped, budget="7GB"), base_dir=".")
    [diag] = err.value.diagnostics
    assert diag.code == "E901" and "more than the budget of 7 GB" in diag.message
    assert "select edges none" in diag.hints[0] and "the edges add about" in diag.hints[0], diag.hints
    added = float(re.findall(r"the edges add about ([0-9.]+) GB", diag.hints[0])[0])
    bare = _memory(compile_text(_per_position_512(smollm2_shaped, "select edges none\n", "20GB"), base_dir="."))
    whole = _memory(compile_text(_per_position_512(smollm2_shaped, budget="20GB"), base_dir="."))
    assert bare["attention"] == "sdpa" and abs((whole["peak"] - bare["peak"]) / 1e9 - added) < 0.05


def test_edges_that_make_most_of_the_peak_are_named_with_the_peak_without_them(smollm2_shaped, capsys):
    """Where the run fits but the edges' reads make half or more of its estimate (summed heads and neurons at 1024
    tokens: every layer's pattern kept, and eager attention where `select edges none` runs sdpa), the plan warns
    (W902) with the estimate without them; `check` prints it too. Without edges there is nothing to say."""
    from atpdsl.cli.app import main

    text = _spec(str(smollm2_shaped), 'memory "40GB"', "batch 4", pairs=4, words=1021)
    plan = compile_text(text, base_dir=".")
    [w902] = [w for w in plan.warnings if "W902" in w]
    low, high = (float(x) for x in re.findall(r"from ([0-9.]+) GB to ([0-9.]+) GB", w902)[0])
    assert low < high / 2 and abs(high * 1e9 - _memory(plan)["peak"]) < 0.05e9 and "select edges none" in w902
    bare = compile_text(text + "select edges none\n", base_dir=".")
    assert not [w for w in bare.warnings if "W902" in w] and abs(_memory(bare)["peak"] - low * 1e9) < 0.05e9
    assert not [w for w in compile_text(_per_position_512(smollm2_shaped, budget="20GB"), base_dir=".").warnings
                if "W902" in w]  # at 512 tokens the edges add 2.9 GB to 7.3 GB
    spec = smollm2_shaped / "w902.atp"
    spec.write_text(text)
    assert main(["check", str(spec)]) == 0 and "W902" in capsys.readouterr().out


def test_check_reports_what_plan_refuses_up_front(smollm2_shaped, tmp_path, capsys):
    """`atpdsl check` runs the memory plan too: a spec that `plan` and `run` would refuse is not "ok"."""
    from atpdsl.cli.app import main

    spec = tmp_path / "big.atp"
    spec.write_text(_per_position_512(smollm2_shaped, budget="7GB"))
    assert main(["check", str(spec)]) == 1
    out = capsys.readouterr().out
    assert "E901" in out and f"{spec}:1:1" in out and "ok (" not in out
    spec.write_text(_per_position_512(smollm2_shaped, "select edges none\n"))
    assert main(["check", str(spec)]) == 0 and "ok (4 pairs)" in capsys.readouterr().out


def _fake_cache(root: Path, repo: str, config: dict) -> Path:
    commit = "1" * 40
    base = root / f"models--{repo.replace('/', '--')}"
    (base / "snapshots" / commit).mkdir(parents=True)
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text(commit)
    (base / "snapshots" / commit / "config.json").write_text(json.dumps(config))
    return root


def test_12b_neox_plans_from_its_config_alone_with_a_batch_for_an_80gb_gpu(tmp_path):
    """`atpdsl plan` in a fresh process whose hub cache holds only Pythia-12B's config (no weights, no tokenizer:
    token lengths are estimated, and the plan says so); torch is never imported."""
    cache = _fake_cache(tmp_path / "hub", "EleutherAI/pythia-12b", PYTHIA_12B)
    spec = tmp_path / "big.atp"
    spec.write_text(_spec("EleutherAI/pythia-12b", 'dtype float16 device cuda memory "80GB"', "batch auto",
                          pairs=64, words=100))
    code = ("import sys\nfrom atpdsl.cli.app import main\ncode = main(['plan', sys.argv[1]])\n"
            "print('TORCH', 'torch' in sys.modules)\nsys.exit(code)\n")
    env = dict(os.environ, HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1", COLUMNS="160")
    done = subprocess.run([sys.executable, "-c", code, str(spec)], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    out = done.stdout
    assert "TORCH False" in out
    assert "memory per device: device cuda, budget 80 GB (the `memory` setting)" in out
    assert "23.7 GB   11.8B parameters in float16" in out
    assert "largest batch that fits" in out and "token lengths estimated" in out


def test_12b_estimate_parts():
    """The same plan's numbers: weights 2 bytes per parameter, about 11.8B parameters; activations and logits
    grow with the batch; the batch chosen for 80 GB fits it with the headroom."""
    from atpdsl.plan import ModelRef

    sizes = model_sizes(PYTHIA_12B, "GPT-NeoX", parallel=True)
    assert 11.5e9 < sizes.params < 12.1e9
    plan = compile_text(_spec(str(ROOT / "tests" / "golden" / "check" / "model"), "", "batch 8"), base_dir=".")
    plan = type(plan)(**{**{f: getattr(plan, f) for f in plan.__dataclass_fields__},
                         "model": ModelRef("EleutherAI/pythia-12b", dtype="float16")})
    lengths = [104] * 64
    shape = shape_for(plan, PYTHIA_12B, lengths, attention="eager")
    one, eight = estimate(sizes, shape, 1, lengths), estimate(sizes, shape, 8, lengths)
    assert one.part("weights") == eight.part("weights") == sizes.params * 2
    assert eight.part("activations") == 8 * one.part("activations")
    best = largest_batch(sizes, shape, lengths, 80 * 10**9)
    assert best >= 1 and estimate(sizes, shape, best, lengths).peak * 1.1 <= 80e9
    assert best == shape.pairs or estimate(sizes, shape, best + 1, lengths).peak * 1.1 > 80e9
