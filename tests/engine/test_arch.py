"""atpdsl.arch: the per-architecture records resolve in real models, their layouts slice the right units, their rotary
functions rotate as the models do, and what they declare (residual layout, support) is read from the config."""
from __future__ import annotations

import json

import pytest
import torch

from engine_support import STORIES, NodeGroup, tm

from atpdsl.arch import (
    ARCHS,
    arch_for_config,
    geometry,
    head_dim,
    mlp_width,
    num_heads,
    num_kv_heads,
    num_layers,
    supported_model_types,
)
from atpdsl.errors import ModelError


def test_config_helpers_on_each_layout():
    stories = json.loads((STORIES / "config.json").read_text())
    assert (num_layers(stories), num_heads(stories), num_kv_heads(stories), head_dim(stories), mlp_width(stories)) \
        == (5, 8, 4, 8, 172)
    gpt2 = {"model_type": "gpt2", "n_layer": 3, "n_head": 4, "n_embd": 32, "n_inner": None}
    assert (num_layers(gpt2), num_heads(gpt2), num_kv_heads(gpt2), head_dim(gpt2), mlp_width(gpt2)) == (3, 4, 4, 8, 128)
    qwen2 = tm.make_qwen2().config.to_dict()  # Qwen2Config has no head_dim: hidden // heads
    qwen2.pop("head_dim", None)
    assert head_dim(qwen2) == 32 // 4 and num_kv_heads(qwen2) == 2


def test_unknown_model_type_lists_supported():
    with pytest.raises(ModelError) as err:
        arch_for_config({"model_type": "bert"})
    msg = str(err.value)
    assert "'bert'" in msg
    for t in ("gpt2", "gpt_neox", "llama", "qwen2"):
        assert t in msg
    assert set(supported_model_types()) >= {"gpt2", "gpt_neox", "llama", "qwen2", "mistral", "gemma"}


def test_sites_in_forward_order_for_plan():
    arch = arch_for_config({"model_type": "llama"})
    groups = [NodeGroup("neurons", (1, 1)), NodeGroup("heads", (0, 1)), NodeGroup("keys", (1, 1)),
              NodeGroup("resid", (0, 0))]
    assert arch.sites(groups, 2) == [
        "model.layers.0.self_attn.o_proj.input",
        "model.layers.0.output",
        "model.layers.1.self_attn.k_proj.output",
        "model.layers.1.self_attn.o_proj.input",
        "model.layers.1.mlp.down_proj.input",
    ]
    gpt2 = arch_for_config({"model_type": "gpt2"})  # q, k, v share the fused c_attn output: one site
    assert gpt2.sites([NodeGroup("queries"), NodeGroup("values")], 1) == ["transformer.h.0.attn.c_attn.output"]


@pytest.mark.parametrize("name", ["gpt2", "neox", "llama", "qwen2", "opt", "gptj", "phi3"])
def test_every_template_is_a_real_module_and_layouts_fit(name):
    """Each site resolves in a real model; each layout's units are disjoint and inside the tensor's width."""
    model = tm.BUILDERS[name](n_layer=1)
    cfg = model.config.to_dict()
    arch, geom = arch_for_config(cfg), geometry(cfg)
    seen = {}
    hooks = []
    for t in arch.templates:
        mod = model.get_submodule(t.path(0) if t.path(0) else "")
        if t.attr == "input":
            hooks.append(mod.register_forward_pre_hook(lambda m, a, k=t.kind: seen.__setitem__(k, a[0])))
        else:
            hooks.append(mod.register_forward_hook(
                lambda m, a, o, k=t.kind: seen.__setitem__(k, o[0] if isinstance(o, tuple) else o)))
    with torch.no_grad():
        model(input_ids=torch.tensor([[2, 3, 4, 5]]))
    for h in hooks:
        h.remove()
    assert set(seen) == set(arch.kinds)
    for t in arch.templates:
        lay = t.resolve(geom)
        width = seen[t.kind].shape[-1]
        assert width == t.tensor_width(geom), t
        cols = [c for u in range(lay.count) for c in range(*lay.columns(u))]
        assert len(cols) == len(set(cols)) and max(cols) < width and min(cols) >= 0, t
        # a flat module sees [positions, width] (batch 1 flattened away), every other site [1, positions, width]
        assert seen[t.kind].dim() == (2 if arch.is_flat(t.path(0)) else 3), t
    for norm in (arch.attn_norm, arch.mlp_norm, arch.final_norm):
        assert isinstance(model.get_submodule(norm.format(layer=0)), torch.nn.Module)
    if arch.rotary is not None:
        model.get_submodule(arch.rotary.module)


def test_neox_qkv_layout_matches_the_models_split():
    """GPT-NeoX packs q, k, v per head: the k layout of head h equals the model's own key_states[:, h]."""
    model = tm.make_neox(n_layer=1)
    cfg = model.config.to_dict()
    arch, geom = arch_for_config(cfg), geometry(cfg)
    att = model.gpt_neox.layers[0].attention
    x = torch.randn(1, 5, cfg["hidden_size"])
    qkv = att.query_key_value(x)
    q, k, v = qkv.view(1, 5, geom.n_heads, 3 * geom.head_dim).transpose(1, 2).chunk(3, dim=-1)
    for kind, ref in (("queries", q), ("keys", k), ("values", v)):
        lay = arch.template(kind).resolve(geom)
        for h in range(geom.n_heads):
            lo, hi = lay.columns(h)
            assert torch.equal(qkv[..., lo:hi], ref[0, h].unsqueeze(0)), (kind, h)


def test_gpt2_qkv_layout_matches_the_models_split():
    model = tm.make_gpt2(n_layer=1)
    cfg = model.config.to_dict()
    arch, geom = arch_for_config(cfg), geometry(cfg)
    out = model.transformer.h[0].attn.c_attn(torch.randn(1, 5, 32))
    q, k, v = out.split(32, dim=2)
    for kind, ref in (("queries", q), ("keys", k), ("values", v)):
        lay = arch.template(kind).resolve(geom)
        for h in range(geom.n_heads):
            lo, hi = lay.columns(h)
            assert torch.equal(out[..., lo:hi], ref[..., h * 8:(h + 1) * 8])


def test_arch_table_is_one_entry_per_architecture():
    types = [t for a in ARCHS for t in a.model_types]
    assert len(types) == len(set(types))


def test_phi3_fused_qkv_layout_matches_the_models_split():
    """Phi-3 packs [q | k | v] with grouped-query attention: k and v have n_kv_heads slices after all q heads."""
    model = tm.make_phi3(n_layer=1)
    cfg = model.config.to_dict()
    arch, geom = arch_for_config(cfg), geometry(cfg)
    assert geom.grouped
    qkv = model.model.layers[0].self_attn.qkv_proj(torch.randn(1, 5, cfg["hidden_size"]))
    q, k, v = qkv.split([geom.n_heads * geom.head_dim, geom.n_kv_heads * geom.head_dim,
                         geom.n_kv_heads * geom.head_dim], dim=-1)
    parts = (("queries", q, geom.n_heads), ("keys", k, geom.n_kv_heads), ("values", v, geom.n_kv_heads))
    for kind, ref, count in parts:
        lay = arch.template(kind).resolve(geom)
        assert lay.count == count
        for h in range(count):
            lo, hi = lay.columns(h)
            assert torch.equal(qkv[..., lo:hi], ref[..., h * geom.head_dim:(h + 1) * geom.head_dim]), (kind, h)


def test_opt_mlp_modules_see_flattened_positions_and_nothing_else_does():
    """OPT's decoder layer reshapes to [batch * positions, d] before its MLP: exactly the modules its record lists as
    flat see 2-D tensors, and their rows are (batch, position) in batch-major order."""
    model = tm.make_opt(n_layer=1)
    arch = arch_for_config(model.config.to_dict())
    shapes = {}
    hooks = [m.register_forward_hook(lambda mod, a, o, name=name: shapes.__setitem__(
        name, (o[0] if isinstance(o, tuple) else o).shape))
             for name, m in model.named_modules()
             if name.startswith("model.decoder.layers.0.") and name.count(".") == 4]
    ids = torch.tensor([[2, 3, 4, 5, 6], [6, 5, 4, 3, 2]])
    with torch.no_grad():
        model(input_ids=ids)
    for h in hooks:
        h.remove()
    flat = {name for name, shape in shapes.items() if len(shape) == 2}
    assert flat == {name for name in shapes if arch.is_flat(name)} and len(flat) == 4
    assert all(shapes[name][0] == 10 for name in flat)


# ------------------------------------------------------------------------------------------- rotary
@pytest.mark.parametrize("name", ["neox", "llama", "phi3", "gptj"])
def test_rotary_function_rotates_as_the_model_does(name):
    """The record's rotary function applied to the projection outputs gives the post-rotary q and k the model's
    attention function receives (read by the plain-PyTorch reference)."""
    import torch_reference as R

    from atpdsl.engine.load import wrap_model
    from atpdsl.engine.rotary import rotary_function

    model, tok = tm.BUILDERS[name](n_layer=1), tm.make_tokenizer()
    loaded = wrap_model(model, tok)
    arch, geom = loaded.arch, loaded.geom
    got = {}
    hooks = [model.get_submodule(arch.template(k).path(0)).register_forward_hook(
        lambda m, a, o, k=k: got.__setitem__(k, o.detach())) for k in ("queries", "keys")]
    hooks.append(model.get_submodule(arch.rotary.module).register_forward_hook(
        lambda m, a, o: got.__setitem__("tables", tuple(t.detach() for t in o))))
    cache = R.pair_cache(model, tok, tm.TINY_PAIRS[0], R.logit_diff(tok))
    for h in hooks:
        h.remove()
    rotate = rotary_function(loaded)

    def heads(x, kind):
        lay = arch.template(kind).resolve(geom)
        seg = x[..., lay.start: lay.start + lay.count * lay.stride].unflatten(-1, (lay.count, lay.stride))
        return seg[..., lay.offset: lay.offset + lay.width].transpose(1, 2)

    q, k = rotate(heads(got["queries"], "queries"), heads(got["keys"], "keys"), *got["tables"])
    ref_q, ref_k = cache.clean[(0, "q")], cache.clean[(0, "k")]
    assert float((q - ref_q).abs().max()) < 1e-5 and float((k - ref_k).abs().max()) < 1e-5
    moved = float((q - heads(got["queries"], "queries")).abs().max())
    assert moved > 1e-2  # the rotation really did something at later positions


def test_gptj_rotary_outputs_sin_before_cos():
    """GPT-J's rotary module returns (sin, cos), the others (cos, sin): the record names a function that knows."""
    assert arch_for_config({"model_type": "gptj"}).rotary.rotate.endswith(":gptj")
    assert arch_for_config({"model_type": "llama"}).rotary.rotate.endswith(":beside_attention")
    assert arch_for_config({"model_type": "gpt2"}).rotary is None
    assert arch_for_config({"model_type": "opt"}).rotary is None


# --------------------------------------------------------------------------------- residual layout, support
def test_parallel_residual_is_read_from_the_config():
    neox, gptj, phi3, llama = (arch_for_config({"model_type": t}) for t in ("gpt_neox", "gptj", "phi3", "llama"))
    assert neox.is_parallel({"use_parallel_residual": True}) and not neox.is_parallel({"use_parallel_residual": False})
    assert neox.is_parallel({})  # GPT-NeoX's default is parallel (Pythia)
    assert gptj.is_parallel({"use_parallel_residual": False})  # GPT-J has no such key: always parallel
    assert not phi3.is_parallel({}) and not llama.is_parallel({"use_parallel_residual": True})
    assert gptj.shared_block_norm and not neox.shared_block_norm


def test_loaded_parallel_follows_the_record():
    from atpdsl.engine.load import wrap_model

    tok = tm.make_tokenizer()
    assert wrap_model(tm.make_gptj(n_layer=1), tok).parallel
    assert wrap_model(tm.make_neox(n_layer=1), tok).parallel
    assert not wrap_model(tm.make_neox(n_layer=1, parallel=False), tok).parallel
    assert not wrap_model(tm.make_phi3(n_layer=1), tok).parallel


def test_support_problems_name_the_reason():
    from atpdsl.arch import support_problems

    opt, gptj, llama = (arch_for_config({"model_type": t}) for t in ("opt", "gptj", "llama"))
    assert support_problems(llama, {}, "atp*", ["heads", "keys"], corrections=["qk_fix", "graddrop", "norm_fix"],
                            graddrop_mode="sublayer", features=["edges", "emit"]) == []
    post = {"do_layer_norm_before": False}
    got = {p.subject: p for p in support_problems(opt, post, "atp*", corrections=["qk_fix", "graddrop"],
                                                  features=["edges"])}
    assert set(got) == {"graddrop", "edges"}
    assert "do_layer_norm_before is false" in got["graddrop"].message
    assert got["graddrop"].hint == "turn it off: `graddrop off`"
    assert support_problems(opt, {"do_layer_norm_before": True}, "atp*", corrections=["qk_fix", "graddrop"]) == []
    got = {p.subject: p for p in support_problems(gptj, {}, "atp*", ["heads", "embeddings"],
                                                  corrections=["norm_fix"], features=["edges"])}
    assert set(got) == {"embeddings", "norm_fix", "edges"}
    assert "shared norm" in got["norm_fix"].message
    assert "GPT-J models have no `embeddings` nodes" in got["embeddings"].message
    relp = support_problems(gptj, {}, "relp")
    assert [p.subject for p in relp] == ["relp"] and "not implemented" in relp[0].message
    assert support_problems(gptj, {}, "atp", corrections=["norm_fix"]) == []  # corrections only matter for atp*


def test_records_and_check_stay_free_of_torch():
    import subprocess
    import sys

    code = ("import sys; import atpdsl.arch as a; a.support_problems(a.arch_for_config({'model_type': 'opt'}), {}, "
            "'atp*', corrections=['graddrop']); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_every_record_names_layouts_and_kinds_that_exist():
    from atpdsl.arch import CORRECTION_NAMES, FEATURE_NAMES, LAYOUTS, METHOD_NAMES, all_archs
    from atpdsl.registry import NODE_KINDS

    for arch in all_archs():
        for t in arch.templates:
            assert t.layout in LAYOUTS and t.kind in NODE_KINDS, (arch.name, t)
        assert set(arch.methods) <= set(METHOD_NAMES) and set(arch.corrections) <= set(CORRECTION_NAMES)
        assert set(arch.features) <= set(FEATURE_NAMES)
        for name, why in arch.why_not:  # a reason only for what the record leaves out
            assert why and name not in arch.methods + arch.corrections + arch.features, (arch.name, name)
