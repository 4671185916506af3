"""Remote execution (atpdsl.engine.remote): the whole pipeline through nnsight's `remote="local"` (the remote
path's serialisation, deserialised with every module not installed on a server hidden, atpdsl included) gives the
local run's numbers; and every way NDIF cannot be used is a clear error. The network is unreachable here, so the
hub-id path is checked up to the first request (a fake hub cache gives the config and tokenizer offline)."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path

import pytest

from engine_support import NodeGroup, Verification, make_plan, max_abs_diff, per_pair, tiny_folder, tm

from atpdsl.engine import execute
from atpdsl.engine.load import load_model
from atpdsl.engine.placement import remote_of
from atpdsl.engine.remote import RemoteRunError, check_ready, remote_errors, simulate
from atpdsl.errors import SpecError
from atpdsl.language.compiler import compile_text
from atpdsl.plan import Diagnosis, MethodSpec, ModelRef

HERE = Path(__file__).resolve().parent
REMOTE_METHOD = MethodSpec("atp*", qk_fix=True, graddrop=False)  # what `remote on` runs of AtP*


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_folder("llama", str(tmp_path_factory.mktemp("remote")), n_layer=2)


def test_atp_star_with_verify_and_diagnose_through_remote_local_equals_local(folder, monkeypatch):
    from nnsight.intervention.backends import local

    shipped = []
    real = local.LocalSimulationBackend.__call__
    monkeypatch.setattr(local.LocalSimulationBackend, "__call__",
                        lambda self, tracer: (shipped.append(1), real(self, tracer))[1])
    nodes = (NodeGroup("heads"), NodeGroup("neurons", (1, 1)), NodeGroup("queries"), NodeGroup("keys"))
    plan = make_plan(folder, tm.TINY_PAIRS, nodes, method_spec=REMOTE_METHOD, write_per_pair=True, batch=2,
                     verification=Verification(5), diagnosis=Diagnosis(samples=12))
    here = execute(plan)
    assert not shipped
    there = execute(plan, loaded=simulate(load_model(plan.model)))
    assert len(shipped) >= 2 * 2 + 2  # corrupt and clean per batch, then verify and diagnose
    assert max_abs_diff(per_pair(here), per_pair(there)) <= 1e-6
    verified = {n.name: n.verified_per_pair for n in here.nodes if n.verified_effect is not None}
    assert verified and _close(verified, {n.name: n.verified_per_pair for n in there.nodes
                                          if n.verified_effect is not None})
    assert here.false_negatives is not None and _close(asdict(here.false_negatives), asdict(there.false_negatives))
    assert abs(here.clean_metric - there.clean_metric) <= 1e-6


def _close(a, b) -> bool:
    """Equal records, floats to 1e-6 (infinities equal)."""
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b))
    if isinstance(a, float):
        return math.isclose(a, b, rel_tol=0, abs_tol=1e-6) or a == b
    return a == b


def test_simulated_model_is_marked_and_others_are_not(folder):
    loaded = load_model(ModelRef(str(folder)))
    assert remote_of(loaded.model) is False
    assert remote_of(simulate(loaded).model) == "local"


def _spec(model: str, method: str = "method atp", settings: str = "remote on") -> str:
    return (f'model "{model}" {{ {settings} }}\npair {{ clean "the girl said" corrupt "the boy said" answer " she" '
            f'wrong " he" }}\nmetric logit_diff(answer, wrong)\n{method}\n')


def _codes(text: str, base: Path) -> list[str]:
    with pytest.raises(SpecError) as err:
        compile_text(text, base_dir=base)
    return [d.code for d in err.value.diagnostics]


def test_remote_refuses_a_local_folder_and_the_corrections_it_cannot_run(folder):
    assert "E207" in _codes(_spec(str(folder)), folder.parent)
    assert _codes(_spec("EleutherAI/pythia-70m", "method atp*"), folder.parent).count("E207") == 1  # GradDrop
    assert _codes(_spec("EleutherAI/pythia-70m", "method atp* { graddrop off norm_fix on }"),
                  folder.parent).count("E207") == 1


def test_remote_plan_has_no_edges(folder):
    plan = compile_text(_spec("EleutherAI/pythia-70m", "method atp* { graddrop off }"), base_dir=folder.parent)
    assert plan.model.remote and not any(s.kind.startswith("edge") for s in plan.steps)


def test_missing_api_key(monkeypatch):
    from nnsight import CONFIG

    monkeypatch.delenv("NDIF_API_KEY", raising=False)
    monkeypatch.setattr(CONFIG.API, "APIKEY", None)
    with pytest.raises(RemoteRunError, match="NDIF_API_KEY"):
        check_ready(ModelRef("EleutherAI/pythia-12b", remote=True), served=lambda repo, rev: True)


def test_model_not_served_and_service_unreachable(monkeypatch):
    monkeypatch.setenv("NDIF_API_KEY", "test-key")
    ref = ModelRef("EleutherAI/pythia-12b", remote=True)
    with pytest.raises(RemoteRunError, match="does not serve 'EleutherAI/pythia-12b'"):
        check_ready(ref, served=lambda repo, rev: False)

    def down(repo, rev):
        raise ConnectionError("Name or service not known")

    with pytest.raises(RemoteRunError, match="cannot reach NDIF"):
        check_ready(ref, served=down)
    with pytest.raises(RemoteRunError, match="local folder"):
        check_ready(replace(ref, source=str(HERE)), served=lambda repo, rev: True)


@pytest.mark.parametrize("raised, expected", [("ReadTimeout", "did not answer in time"),
                                              ("ConnectError", "cannot reach NDIF"),
                                              ("RemoteError", "the NDIF job failed")])
def test_remote_failures_become_clear_errors(raised, expected):
    error = type(raised, (Exception,), {})
    with pytest.raises(RemoteRunError, match=expected):
        with remote_errors(True):
            raise error("boom")
    with pytest.raises(error):
        with remote_errors(False):  # a local trace's own errors pass through untouched
            raise error("boom")


def _fake_hub_cache(root: Path, repo: str, folder: Path) -> Path:
    """A Hugging Face cache holding only `repo`'s config and tokenizer (what a remote run needs here)."""
    commit = "0" * 40
    base = root / f"models--{repo.replace('/', '--')}"
    snapshot = base / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text(commit)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (folder / name).exists():
            (snapshot / name).write_bytes((folder / name).read_bytes())
    return root


def test_hub_id_opens_without_weights_and_fails_clearly_offline(folder, tmp_path):
    """In a fresh process (the hub cache location is read at import): the model opens from the cache with no
    weights, its traces are marked for NDIF, and the first request fails as a RemoteRunError, not a traceback."""
    cache = _fake_hub_cache(tmp_path / "hub", "atpdsl-test/tiny-llama", folder)
    code = (
        "import json, torch\n"
        "from atpdsl.engine.load import load_model\n"
        "from atpdsl.engine.placement import remote_of\n"
        "from atpdsl.engine.remote import RemoteRunError\n"
        "from atpdsl.engine.trace import TraceSite, run_trace\n"
        "from atpdsl.plan import ModelRef\n"
        "import atpdsl.engine.remote as r\n"
        "r.check_ready = lambda ref, served=None: None\n"
        "loaded = load_model(ModelRef('atpdsl-test/tiny-llama', remote=True))\n"
        "out = {'mode': remote_of(loaded.model), 'meta': next(loaded.hf.parameters()).device.type,\n"
        "       'mark': loaded.config.get('_atpdsl_remote')}\n"
        "ids = {'input_ids': torch.tensor([[2, 3, 4]]), 'attention_mask': torch.ones(1, 3, dtype=torch.long)}\n"
        "try:\n"
        "    run_trace(loaded.model, ids, [TraceSite('z', 'model.layers.0.self_attn.o_proj', 'input')])\n"
        "    out['error'] = None\n"
        "except RemoteRunError as e:\n"
        "    out['error'] = str(e)\n"
        "print(json.dumps(out))\n"
    )
    env = dict(os.environ, HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               NDIF_API_KEY="test-key", NDIF_HOST="http://127.0.0.1:9")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["mode"] is True and got["meta"] == "meta" and got["mark"] is True
    assert got["error"] and ("cannot reach NDIF" in got["error"] or "NDIF" in got["error"]), got
