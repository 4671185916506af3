"""Half-precision models (`dtype bfloat16` / `float16`): the model runs in its dtype, the attribution arithmetic
(differences, products, sums over positions, the QK fix's softmax, the norm fix) in float32.

Two checks on a tiny Llama: (1) against the same bfloat16 model's own activations and gradients, taken with plain
hooks (tests/torch_reference.py) and combined in float32, the engine agrees to float32 rounding (combining them in
bfloat16 instead misses by far more: the test could tell); (2) against the float32 model, estimates stay within a
stated tolerance: max |difference| <= 12% (bfloat16) / 4% (float16) of the largest |estimate|, correlation >= 0.995
(the model's own rounding: bfloat16 keeps 8 significant bits)."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from engine_support import NodeGroup, first_batch, make_plan, tiny_folder, tm
import torch_reference as R  # noqa: I001  (tests/ is on sys.path once engine_support is imported)

from atpdsl.engine.context import make_context
from atpdsl.engine.load import load_model
from atpdsl.plan import MethodSpec

KINDS = {"corrupt_forward", "clean_backward", "qk_fix", "norm_fix", "graddrop_term"}
NODES = (NodeGroup("heads"), NodeGroup("neurons"), NodeGroup("queries"), NodeGroup("keys"), NodeGroup("values"))
TOLERANCE = {"bfloat16": 0.12, "float16": 0.04}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_folder("llama", str(tmp_path_factory.mktemp("dtype")), n_layer=3)


def _estimates(plan, kinds=KINDS) -> tuple[torch.Tensor, list]:
    """The first batch's per-pair estimates (every node), and the node names."""
    ctx = make_context(plan, load_model(plan.model))
    state, work = first_batch(ctx, kinds)
    work.clean.live.clear()
    assert work.est.dtype == torch.float32
    return work.est.double(), ctx.table.nodes


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("method", [MethodSpec("atp"), MethodSpec("atp*", qk_fix=True, graddrop=True,
                                                                   norm_fix=True)], ids=["atp", "atp*"])
def test_half_precision_within_tolerance_of_float32(folder, dtype, method):
    plan = make_plan(folder, tm.TINY_PAIRS, NODES, method_spec=method)
    full, _ = _estimates(plan)
    half, _ = _estimates(replace(plan, model=replace(plan.model, dtype=dtype)))
    gap = float((half - full).abs().max() / full.abs().max())
    corr = float(torch.corrcoef(torch.stack([half.flatten(), full.flatten()]))[0, 1])
    assert gap <= TOLERANCE[dtype] and corr >= 0.995, (gap, corr)


def _reference(folder, dtype: torch.dtype, arithmetic: torch.dtype) -> dict[str, float]:
    """Per node (pair 0): AtP from the half-precision model's hooked values, combined in `arithmetic`."""
    model, tok = R.load_model(folder, dtype)
    cache = R.pair_cache(model, tok, tm.TINY_PAIRS[0], R.logit_diff(tok))
    dm = cache.dims
    out = {}
    for layer in range(dm.n_layers):
        for site, name, width in (("z", "H", dm.head_dim), ("neuron", "N", 1)):
            delta = cache.corrupt[(layer, site)].to(arithmetic) - cache.clean[(layer, site)].to(arithmetic)
            prod = (delta * cache.grad[(layer, site)].to(arithmetic))[0]
            per_unit = prod.view(prod.shape[0], -1, width).sum(-1).sum(0)
            out.update({f"L{layer}.{name}{u}": float(v) for u, v in enumerate(per_unit)})
    return out


def test_bfloat16_arithmetic_is_float32(folder):
    plan = make_plan(folder, tm.TINY_PAIRS[:1], (NodeGroup("heads"), NodeGroup("neurons")), batch=1)
    plan = replace(plan, model=replace(plan.model, dtype="bfloat16"))
    est, nodes = _estimates(plan, {"corrupt_forward", "clean_backward"})
    ours = {n.name: float(v) for n, v in zip(nodes, est[0])}
    in_fp32 = _reference(folder, torch.bfloat16, torch.float32)
    in_bf16 = _reference(folder, torch.bfloat16, torch.bfloat16)
    scale = max(abs(v) for v in in_fp32.values())
    gap32 = max(abs(ours[k] - in_fp32[k]) for k in ours) / scale
    gap16 = max(abs(ours[k] - in_bf16[k]) for k in ours) / scale
    print(f"bfloat16 model: engine vs float32 arithmetic {gap32:.1e}, vs bfloat16 arithmetic {gap16:.1e}")
    assert gap32 <= 1e-5, gap32
    assert gap16 > 10 * max(gap32, 1e-7), (gap16, gap32)
