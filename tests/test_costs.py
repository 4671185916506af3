"""The step cost model (atpdsl/costs.py): its arithmetic against hand counts, and properties that could fail.

Timings are not tested here: `benchmarks/bench_plan_costs.py` compares predicted with measured step costs."""
from dataclasses import replace

import pytest

from atpdsl import costs
from atpdsl.arch import Geometry
from atpdsl.lowering import same_program, steps_for, workload_extra, workload_of

TINY = Geometry(n_layers=2, n_heads=2, n_kv_heads=1, head_dim=4, hidden=8, mlp=16)


def tiny(positions=5, layers=2, rows=3, device="cpu") -> costs.Workload:
    return costs.Workload(replace(TINY, n_layers=layers), rows=rows, positions=positions, vocab=11, device=device)


def test_forward_flops_by_hand():
    w = tiny()
    tokens = 3 * 5
    proj = 2 * tokens * 8 * 4 * (2 * 2 + 2 * 1)  # q, k, v, o products: 5760
    attn = 4 * 3 * 2 * 5 * 5 * 4  # scores and mixing per row and head: 2400
    mlp = 2 * tokens * 3 * 8 * 16  # gate, up, down: 11520
    assert w.layer_flops() == proj + attn + mlp == 19680
    assert w.head_flops() == 2 * tokens * 8 * 11
    assert w.forward_flops() == 2 * 19680 + 2640 == 42000
    assert w.layer_elems() == tokens * (16 * 8 + 6 * 16 + 6 * 2 * 5)
    assert w.forward_ops(sites=3) == 2 * costs.LAYER_OPS + costs.HEAD_OPS + 3 * costs.SITE_OPS


def test_time_is_the_three_terms():
    w = tiny()
    c = w.constants
    assert w.time(100.0, 0, 0) == pytest.approx(100 * (1 + c.matmul_half / 8))
    assert w.time(0, 10.0, 0) == pytest.approx(10 * c.elem * 8)
    assert w.time(0, 0, 2.0) == pytest.approx(2 * c.op)
    assert costs.forward_cost(w) == pytest.approx(1.0)  # the unit
    assert costs.forward_cost(replace(w, sites=4), 4) == pytest.approx(1.0)


def test_norm_reader_pairs_by_hand():
    # 2 layers: residual points 0..4; MLP writes at 2 and 4, attention writes at 1 and 3
    assert costs.norm_reader_pairs(2) == 3 + 1
    assert costs.norm_reader_pairs(2, side="attn") == 4 + 2
    assert costs.norm_reader_pairs(2, below=3) == 1
    assert costs.norm_units({"heads", "neurons", "keys"}, TINY) == (2 + 2 * 1, 16)


def test_costs_grow_with_positions_and_layers():
    big = [costs.Workload(replace(TINY, n_layers=n, hidden=512, mlp=2048, head_dim=64), 8, 64, 1000)
           for n in (4, 8)]
    assert costs.norm_fix_cost(big[1], 8) > costs.norm_fix_cost(big[0], 4)  # pairs grow as layers squared
    terms = [costs.graddrop_term_cost(big[1], layer, "layer", 8) for layer in range(8)]
    # a backward below the cut: more the higher the cut, less than the clean forward + backward of the whole model
    assert terms == sorted(terms) and terms[0] < terms[-1] < costs.clean_backward_cost(big[1])
    # the QK fix's work grows as positions cubed (every key's change at every query), a forward's about linearly
    short, long = replace(big[0], positions=16), replace(big[0], positions=256)
    assert costs.qk_fix_cost(long, 4) > 4 * costs.qk_fix_cost(short, 4)
    # in absolute work every step grows with positions
    for step in (lambda w: w.time(w.forward_flops(), w.forward_elems(), w.forward_ops()),):
        assert step(long) > step(short)


def test_patched_copies_share_forwards():
    w = tiny()
    one, many = costs.patched_cost(w, 1, references=0), costs.patched_cost(w, 100, references=0)
    assert many < 100 * one  # the per-forward overhead is paid once per forward, not per copy
    assert many > 100 * (w.time(w.forward_flops(), w.forward_elems(), 0) / w.time(
        w.forward_flops(), w.forward_elems(), w.forward_ops()))  # arithmetic still grows with the copies
    assert costs.patch_rows(w) == 1024  # tiny rows: the engine's cap


def test_overhead_dominates_tiny_models_and_arithmetic_large_ones():
    small = tiny()
    large = costs.Workload(replace(TINY, n_layers=30, hidden=2048, mlp=8192, head_dim=128, n_heads=16,
                                   n_kv_heads=16), 8, 128, 50000)
    # the whole forward's arithmetic against its operations' overhead
    for w, arithmetic_share in ((small, False), (large, True)):
        f = w.time(w.forward_flops(), w.forward_elems(), 0)
        o = w.time(0, 0, w.forward_ops())
        assert (f > o) == arithmetic_share
    # a backward of the whole model costs about one forward on a large model (input gradients only)
    assert costs.clean_backward_cost(large) == pytest.approx(2.0, rel=0.15)


def test_without_workload_costs_are_large_model_limits():
    assert costs.forward_cost(None) == 1 and costs.clean_backward_cost(None) == 2
    assert costs.patched_cost(None, 10) == 12 and costs.rank_cost(None, 100) == 0
    assert costs.graddrop_term_cost(None, 3, "layer", 6) == 0.5


def test_workload_extra_and_plan(tmp_path):
    assert workload_extra([3, 5, 4, 9, 2], 2, 1, 11) == {"positions": 5, "rows_per_pair": 1, "vocab": 11}
    assert workload_extra([], 4, 0, 11)["rows_per_pair"] == 1


def test_compiled_plan_costs_follow_the_model_and_never_make_it_stale(shared_dir):
    from atpdsl.language.compiler import compile_file

    plan = compile_file(shared_dir / "specs" / "pronoun.atp")
    shape = dict(plan.extras)["workload"]
    assert shape["vocab"] == 512 and shape["rows_per_pair"] == 1 and shape["positions"] > 3
    w = workload_of(plan)
    assert w is not None and w.rows == min(plan.batch, len(plan.pairs))
    by_name = {s.name: s.cost for s in plan.steps}
    assert by_name["corrupt forward"] == 1.0
    assert 1.5 < by_name["clean forward + backward"] < 4
    bare = replace(plan, extras=tuple((k, v) for k, v in plan.extras if k != "workload"))
    limits = steps_for(bare)
    assert [s.cost for s in limits] != [s.cost for s in plan.steps]
    assert same_program(plan.steps, limits)  # costs aside, the same program


def test_the_plan_says_what_its_costs_rest_on():
    from atpdsl.costs import cost_basis

    assert cost_basis("cpu", True) == "fitted on one CPU thread"
    assert "not calibrated" in cost_basis("cuda:1", True) and "not calibrated" in cost_basis("mps", True)
    assert "large-model limits" in cost_basis("cpu", False)
