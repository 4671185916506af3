"""The first-batch site check (engine/site_check.py): a record that does not describe its model is an EngineError
naming the site, the expected and the actual shape, before any estimate is formed; correct records pass, node
sites and block norms alike."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from engine_support import NodeGroup, make_plan, tm

from atpdsl.arch import SiteTemplate
from atpdsl.engine.context import make_context
from atpdsl.engine.load import wrap_model
from atpdsl.engine.site_check import check_site_values, expected_shapes
from atpdsl.engine.trace import TraceSite, run_trace
from atpdsl.errors import EngineError

NODES = tuple(NodeGroup(k) for k in ("heads", "queries", "keys", "values", "neurons", "attn", "mlp", "resid"))


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)


def _first_values(loaded, norms: bool = False):
    """The node sites' (and, with `norms`, every block norm's) values on the first batch's corrupt prompts."""
    ctx = make_context(make_plan("tiny", tm.TINY_PAIRS, NODES, batch=2), loaded)
    sites = list(ctx.sites)
    if norms:
        arch = loaded.arch
        paths = {arch.final_norm} | {t.format(layer=l) for t in (arch.attn_norm, arch.mlp_norm)
                                     for l in range(loaded.geom.n_layers)}
        for i, path in enumerate(sorted(paths)):
            for attr in ("input", "output"):
                sites.append(TraceSite(f"{path}.{attr}", path, attr, grad=False, order=(99, i),
                                       flat=arch.is_flat(path)))
    batch = ctx.batches[0]
    with torch.no_grad():
        out = run_trace(ctx.model, batch.corrupt, sites)
    rows, positions = batch.corrupt["input_ids"].shape
    return ctx, out.acts, rows, positions


@pytest.mark.parametrize("name", ["gpt2", "neox", "llama", "qwen2", "opt", "gptj", "phi3"])
def test_correct_records_pass(name):
    loaded = wrap_model(tm.BUILDERS[name](n_layer=2), tm.make_tokenizer())
    ctx, values, rows, positions = _first_values(loaded, norms=True)
    expected = expected_shapes(loaded.arch, loaded.geom, ctx.table, rows, positions)
    checked = [k for k in values if k in expected]
    assert len(checked) == len(values) and len(checked) >= len(ctx.table.sites) + 2  # nodes and norms all checked
    check_site_values(loaded.arch, loaded.geom, ctx.table, values, rows, positions, run="corrupt")


def test_a_flattening_module_missing_from_the_record_is_named():
    """OPT's record without its flat modules: the MLP sites are [batch * positions, width] tensors."""
    model = tm.make_opt(n_layer=2)
    loaded = wrap_model(model, tm.make_tokenizer())
    loaded = replace(loaded, arch=replace(loaded.arch, flat_modules=()))
    ctx, values, rows, positions = _first_values(loaded)
    with pytest.raises(EngineError) as err:
        check_site_values(loaded.arch, loaded.geom, ctx.table, values, rows, positions, run="corrupt")
    msg = str(err.value)
    assert "OPT site model.decoder.layers.0.fc2 (input) in the corrupt run" in msg
    assert f"[{rows}, {positions}, 48]" in msg and f"[{rows * positions}, 48]" in msg
    assert "flattened" in msg and "is not listed in the record's flat_modules" in msg


def test_a_layout_that_does_not_fit_its_module_is_named():
    """A Llama record whose keys claim one slice per query head: k_proj has only the KV heads' width."""
    loaded = wrap_model(tm.make_llama(n_layer=2, kv_heads=2), tm.make_tokenizer())
    arch = loaded.arch
    wrong = tuple(SiteTemplate(t.kind, t.module, t.attr, "q") if t.kind == "keys" else t for t in arch.templates)
    loaded = replace(loaded, arch=replace(arch, templates=wrong))
    ctx, values, rows, positions = _first_values(loaded)
    with pytest.raises(EngineError) as err:
        check_site_values(loaded.arch, loaded.geom, ctx.table, values, rows, positions)
    msg = str(err.value)
    assert "site model.layers.0.self_attn.k_proj (output) in the clean run" in msg
    assert f"[{rows}, {positions}, 32]" in msg and f"[{rows}, {positions}, 16]" in msg
    assert "keys nodes (layout q)" in msg and "last dimension is 16 wide" in msg


def test_a_module_path_that_names_the_wrong_tensor_is_named():
    """GPT-2's neurons pointed at the MLP's output (the residual width, not the 4 * d neurons)."""
    loaded = wrap_model(tm.make_gpt2(n_layer=1), tm.make_tokenizer())
    arch = loaded.arch
    wrong = tuple(SiteTemplate(t.kind, "transformer.h.{layer}.mlp.c_proj", t.attr, t.layout) if t.kind == "neurons"
                  else t for t in arch.templates)
    loaded = replace(loaded, arch=replace(arch, templates=wrong))
    ctx, values, rows, positions = _first_values(loaded)
    with pytest.raises(EngineError, match=r"mlp\.c_proj \(output\).*\[2, 13, 128\].*\[2, 13, 32\]"):
        check_site_values(loaded.arch, loaded.geom, ctx.table, values, rows, positions)


def test_execute_reports_a_wrong_record_as_an_engine_error():
    from atpdsl.engine import execute
    from atpdsl.engine.run import complete_plan

    loaded = wrap_model(tm.make_opt(n_layer=2), tm.make_tokenizer())
    loaded = replace(loaded, arch=replace(loaded.arch, flat_modules=()))
    plan = complete_plan(make_plan("tiny", tm.TINY_PAIRS, NODES, batch=2), loaded)
    # the first flattened site read (a block norm or fc2, by the plan's step order) is named, with the record at fault
    with pytest.raises(EngineError, match=r"OPT site model\.decoder\.layers\.0\.(final_layer_norm|fc2) \(input\)"
                                          r".*not listed in the record's flat_modules.*the spec is not at fault"):
        execute(plan, loaded=loaded)
