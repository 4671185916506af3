"""A model spread over devices by accelerate (atpdsl.engine.placement): on this CPU-only machine, a `memory` budget
smaller than the weights with an `offload` folder puts some layers on disk (loaded for each forward, and for the
steps that read weights outside a forward); every score must equal the single-device run's."""
from __future__ import annotations

from dataclasses import replace

import pytest

from engine_support import NodeGroup, Verification, make_plan, max_abs_diff, per_pair, tiny_folder, tm

from atpdsl.engine import execute
from atpdsl.engine.load import load_model
from atpdsl.engine.placement import dispatched, offloaded
from atpdsl.plan import Diagnosis, MethodSpec, ModelRef


def _offloaded_ref(folder, tmp_path) -> ModelRef:
    weights = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    return ModelRef(str(folder), device="auto", memory=weights // 3, offload=str(tmp_path / "offload"))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_folder("llama", str(tmp_path_factory.mktemp("dm")), n_layer=4)


def test_budget_below_the_weights_offloads_layers(folder, tmp_path):
    loaded = load_model(_offloaded_ref(folder, tmp_path))
    placed = set(map(str, loaded.hf.hf_device_map.values()))
    assert dispatched(loaded.hf) and offloaded(loaded.hf) and {"cpu", "disk"} <= placed, placed
    assert str(loaded.device) == "cpu"


@pytest.mark.parametrize("method", [MethodSpec("atp"), MethodSpec("atp*", qk_fix=True, graddrop=True, norm_fix=True)])
def test_offloaded_scores_equal_single_device(folder, tmp_path, method):
    """AtP (with the edges, which read output-projection weights) and AtP* with every correction."""
    nodes = (NodeGroup("heads"), NodeGroup("neurons"), NodeGroup("queries"))
    plan = make_plan(folder, tm.TINY_PAIRS, nodes, method_spec=method, write_per_pair=True,
                     verification=Verification(4), diagnosis=Diagnosis(samples=8))
    single = execute(plan)
    spread = execute(replace(plan, model=_offloaded_ref(folder, tmp_path)))
    assert max_abs_diff(per_pair(single), per_pair(spread)) == 0.0
    assert single.edges and [(e.source, e.target, e.channel, e.weight) for e in single.edges] == [
        (e.source, e.target, e.channel, e.weight) for e in spread.edges]
    assert single.false_negatives == spread.false_negatives
