"""atpdsl.arch: the per-architecture site table resolves in real models and its layouts slice the right units."""
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


@pytest.mark.parametrize("name", ["gpt2", "neox", "llama", "qwen2"])
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
        cols = [c for u in range(lay.count) for c in range(*lay.columns(u))]
        assert len(cols) == len(set(cols)) and max(cols) < width and min(cols) >= 0, t


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
