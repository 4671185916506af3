"""A metric is one registry record plus its function: register one here (not shipped), and `check`, the compiler
and a run on a tiny model use it with no other change; its values and exact effects equal a hand computation."""
from __future__ import annotations

import pytest
import torch

import tiny_models as T
from atpdsl import registry
from atpdsl.engine import execute
from atpdsl.engine.metrics import MetricInput
from atpdsl.language.compiler import check_text, compile_text


def logit_sum(x: MetricInput) -> torch.Tensor:
    """logit[a] + logit[b]: a metric only this test knows."""
    return x.logit(0) + x.logit(1)


RECORD = registry.MetricInfo("logit_sum", (2,), "two answers", "logit(a) + logit(b) at the position",
                             "test_metric_registry:logit_sum", "logit_sum(answer, wrong)")


@pytest.fixture
def registered():
    registry.register_metric(RECORD)
    yield RECORD
    del registry.METRICS[RECORD.key]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return T.save_model(T.make_llama(seed=5), T.make_tokenizer(), tmp_path_factory.mktemp("m") / "llama")


def spec(folder, method: str) -> str:
    pairs = "\n".join(f'pair {{ clean "{p["clean"]}" corrupt "{p["corrupt"]}" answer " {p["answer"]}"'
                      f' wrong " {p["wrong"]}" }}' for p in T.TINY_PAIRS)
    return (f'model "{folder}"\n{pairs}\nmetric logit_sum(answer, wrong)\nnodes {{ heads layers 1 }}\n'
            f"method {method}\nbatch 2\nkeep per_pair\n")


def test_unregistered_metric_is_refused_by_check(folder):
    r = check_text(spec(folder, "atp"))
    assert [d.code for d in r.errors] == ["E501"]


def test_registered_metric_runs_end_to_end(folder, registered):
    r = check_text(spec(folder, "atp"))
    assert r.ok, r.diagnostics
    model, tok = T.make_llama(seed=5), T.make_tokenizer()
    want_clean, want_corrupt = [], []
    with torch.no_grad():
        for p in T.TINY_PAIRS:
            a, b = (tok(" " + p[k], add_special_tokens=False).input_ids[0] for k in ("answer", "wrong"))
            for prompt, out in ((p["clean"], want_clean), (p["corrupt"], want_corrupt)):
                logits = model(input_ids=torch.tensor([tok(prompt).input_ids])).logits[0, -1]
                out.append(float(logits[a] + logits[b]))
    atp = execute(compile_text(spec(folder, "atp")))
    assert atp.metric == "logit_sum(answer, wrong) at last"
    assert atp.clean_metric == pytest.approx(sum(want_clean) / 3, abs=1e-4)
    assert atp.corrupt_metric == pytest.approx(sum(want_corrupt) / 3, abs=1e-4)
    exact = execute(compile_text(spec(folder, "exact"))).by_name()
    o_proj = model.model.layers[1].self_attn.o_proj
    for head in range(4):
        for i, p in enumerate(T.TINY_PAIRS):
            a, b = (tok(" " + p[k], add_special_tokens=False).input_ids[0] for k in ("answer", "wrong"))
            seen = {}
            h = o_proj.register_forward_pre_hook(lambda m, args: seen.__setitem__("z", args[0].clone()))
            with torch.no_grad():
                model(input_ids=torch.tensor([tok(p["corrupt"]).input_ids]))
            h.remove()
            cols = slice(8 * head, 8 * head + 8)

            def patch(m, args):
                z = args[0].clone()
                z[..., cols] = seen["z"][..., cols]
                return (z,)

            h = o_proj.register_forward_pre_hook(patch)
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([tok(p["clean"]).input_ids])).logits[0, -1]
            h.remove()
            effect = float(logits[a] + logits[b]) - want_clean[i]
            assert exact[f"L1.H{head}"].per_pair[i] == pytest.approx(effect, abs=1e-4)
