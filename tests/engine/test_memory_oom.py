"""Running out of memory anyway is a clear error with the numbers (MemoryPlanError, exit 1), never exit 3; and a
plan whose estimate exceeds its CUDA device stops before loading (simulated here: no GPU on this machine)."""
from __future__ import annotations

import pytest
import torch

from engine_support import NodeGroup, make_plan, tiny_folder, tm

from atpdsl.cli.app import main
from atpdsl.engine import execute
from atpdsl.engine import placement
from atpdsl.engine.load import wrap_model
from atpdsl.engine.placement import MemoryPlanError, check_fits


@pytest.mark.parametrize("error", [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                                   MemoryError()])
def test_out_of_memory_during_the_run_is_a_memory_plan_error(error):
    model = tm.make_llama()

    def hook(mod, args, out):
        raise error

    handle = model.model.layers[1].mlp.register_forward_hook(hook)
    plan = make_plan("tiny", tm.TINY_PAIRS, (NodeGroup("heads"),), batch=3)
    plan = type(plan)(**{**{f: getattr(plan, f) for f in plan.__dataclass_fields__},
                         "extras": (("memory", {"peak": 5 * 10**9, "batch": 3, "largest_batch": 1}),)})
    try:
        with pytest.raises(MemoryPlanError, match=r"out of memory during the run \(.* at the peak; the plan estimated "
                                                  r"5 GB for batch 3\).*batch 1 fits"):
            execute(plan, loaded=wrap_model(model, tm.make_tokenizer()))
    finally:
        handle.remove()


def test_cli_run_out_of_memory_exits_1(tmp_path, monkeypatch, capsys):
    folder = tiny_folder("llama", str(tmp_path))
    spec = tmp_path / "s.atp"
    spec.write_text(f'model "{folder}"\npair {{ clean "the cat sat on the" corrupt "the dog sat on the" answer "mat" '
                    f'wrong "park" }}\nmetric logit_diff(answer, wrong)\nnodes {{ heads }}\n')
    import atpdsl.engine.atp as atp

    def boom(*args, **kwargs):
        raise MemoryError()

    monkeypatch.setattr(atp, "run_streamed", boom)
    monkeypatch.setattr(atp, "run_trace", boom)
    assert main(["run", str(spec), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "out of memory during the run" in err and "internal error" not in err


def test_plan_larger_than_the_cuda_device_stops_before_loading(monkeypatch):
    plan = make_plan("never-loaded", tm.TINY_PAIRS, (NodeGroup("heads"),))
    plan = type(plan)(**{**{f: getattr(plan, f) for f in plan.__dataclass_fields__},
                         "model": type(plan.model)("never-loaded", device="cuda:0"),
                         "extras": (("memory", {"peak": 90 * 10**9, "batch": 8, "largest_batch": 2,
                                                "phase": "clean forward + backward"}),)})
    monkeypatch.setattr(placement, "_planned_device", lambda ref: torch.device("cuda:0"))
    monkeypatch.setattr(placement, "device_memory", lambda device: 80 * 10**9)
    with pytest.raises(MemoryPlanError, match=r"needs about 90 GB on cuda:0 .* has 80 GB.*batch 2 fits"):
        check_fits(plan)
    with pytest.raises(MemoryPlanError):
        execute(plan)  # refused before load_model could fail on the missing folder
