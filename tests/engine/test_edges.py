"""Edge attribution, block side and pipeline: the reader blocks' branch-only gradients and the write vectors equal a
plain-PyTorch computation with hooks; a source's product with a block is the derivative of the metric when its
change is added to that block's input only (finite differences); the position rules of per-position edges; and a
pipeline run on the zoo model exports per-head edges that add up to the block edges and the node estimates.
(tests/engine/test_edges_targets.py checks each head's and neuron's own input against a plain-PyTorch reference.)"""
from __future__ import annotations

import csv

import pytest
import torch

from engine_support import NodeGroup, make_plan, per_pair, tm

from atpdsl.engine import execute
from atpdsl.engine.edge_reads import edge_matrix
from atpdsl.engine.edges import readers, weighted_edges
from atpdsl.engine.load import wrap_model
from atpdsl.names import NodeKind, parse_node



@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _loaded(name: str, dtype=torch.float32):
    builder = tm.make_neox if name == "neox_seq" else tm.BUILDERS[name]
    model = builder(**({"parallel": False} if name == "neox_seq" else {}))
    if dtype == torch.float64:
        model = tm.to_float64(model)
    return wrap_model(model, tm.make_tokenizer())


def test_per_position_nodes_and_position_rules():
    """Per-position sources and targets (two 12-token pairs): summed sources reach per-position targets, a
    per-position source reaches a head at a later position only through its key and value, an MLP or a query only
    at its own position, never backwards; a KV group's key with no layer-0 head among the targets feeds `attn`
    with its estimate."""
    loaded = _loaded("llama")
    groups = (NodeGroup("heads", (1, 1), (0, 3), True), NodeGroup("mlp", (0, 0), None, True), NodeGroup("attn"),
              NodeGroup("neurons", (0, 0), (2, 9)), NodeGroup("keys", (0, 0), (1,), True))
    plan = make_plan("tiny", tm.TINY_PAIRS[1:], groups, batch=2, write_per_pair=True)
    res = execute(plan, loaded=loaded)
    m = edge_matrix(plan, [n.node for n in res.nodes], loaded=loaded)
    edges = {(e.source, e.target, e.channel): e.weight for e in weighted_edges(m)}
    pairs = {(a, b) for a, b, _ in edges}
    assert ("L0.mlp@3", "L1.H0@3") in pairs and ("L0.mlp@3", "L1.H0@4") in pairs  # through L1.H0@4's key / value
    assert ("L0.mlp@3", "L1.H0@4", "q") not in edges and ("L0.mlp@3", "L1.H0@4", "k") in edges
    assert ("L0.mlp@3", "L1.H0@3", "q") in edges
    assert ("L0.mlp@5", "L1.H0@3") not in pairs and ("L1.attn", "L0.mlp@3") not in pairs  # never backwards
    assert ("L0.N2", "L1.H3@3") in pairs and ("L0.mlp@3", "L1.attn") in pairs
    assert ("L0.mlp@3", "L0.mlp@4") not in pairs
    key = parse_node("L0.G1.k@8")
    assert key.grouped and not [t for (s, t) in pairs if s == key.name and ".H" in t]
    estimate = sum(per_pair(res)["L0.G1.k@8"]) / 2
    assert edges[("L0.G1.k@8", "L0.attn", "")] == pytest.approx(estimate, abs=1e-6)
    assert abs(estimate) > 1e-4



def _reference_products(model, tok, pair, sources):
    """Plain PyTorch: clone every block-input norm's argument in forward pre-hooks, take autograd.grad of the
    metric at the clones, build each source's write vector explicitly from captured activations and weights,
    and return {(source, reader): (corrupt - clean write) . branch gradient}."""
    mt = model.config.model_type
    layers = model.transformer.h if mt == "gpt2" else model.model.layers
    attn_norm, mlp_norm = ("ln_1", "ln_2") if mt == "gpt2" else ("input_layernorm", "post_attention_layernorm")
    final = model.transformer.ln_f if mt == "gpt2" else model.model.norm
    embed = model.get_input_embeddings()
    clones, caught, hooks = {}, {}, []

    def clone_hook(name):
        def pre(mod, args):
            x = args[0].clone()
            clones[name] = x
            return (x,) + tuple(args[1:])
        return pre

    def catch_in(name):
        return lambda mod, args: caught.__setitem__(name, args[0])

    for m_, layer in enumerate(layers):
        hooks.append(getattr(layer, attn_norm).register_forward_pre_hook(clone_hook(f"L{m_}.attn-in")))
        hooks.append(getattr(layer, mlp_norm).register_forward_pre_hook(clone_hook(f"L{m_}.mlp-in")))
        o = layer.attn.c_proj if mt == "gpt2" else layer.self_attn.o_proj
        down = layer.mlp.c_proj if mt == "gpt2" else layer.mlp.down_proj
        hooks.append(o.register_forward_pre_hook(catch_in(f"z{m_}")))
        hooks.append(down.register_forward_pre_hook(catch_in(f"act{m_}")))
    hooks.append(final.register_forward_pre_hook(clone_hook("logits")))

    def emb_hook(mod, args, out):
        out = out.clone().requires_grad_(True)
        caught["embed"] = out
        return out

    hooks.append(embed.register_forward_hook(emb_hook))
    ids = {k: tok(pair[k], return_tensors="pt").input_ids for k in ("clean", "corrupt")}
    answer, wrong = (tok(pair[k], add_special_tokens=False).input_ids[0] for k in ("answer", "wrong"))
    try:
        with torch.no_grad():
            model(input_ids=ids["corrupt"])
        corrupt = {k: v.detach().clone() for k, v in caught.items()}
        logits = model(input_ids=ids["clean"]).logits
        metric = logits[0, -1, answer] - logits[0, -1, wrong]
        names = list(clones)
        grads = dict(zip(names, torch.autograd.grad(metric, [clones[n] for n in names])))
    finally:
        for h in hooks:
            h.remove()
    clean = {k: v.detach() for k, v in caught.items()}
    out = {}
    for src in sources:
        write = _reference_write(model, layers, parse_node(src), clean, corrupt)
        for r, g in grads.items():
            out[(src, r)] = float((write * g).sum())
    return out


def _reference_write(model, layers, node, clean: dict, corrupt: dict) -> torch.Tensor:
    """A source's corrupt - clean write into the residual stream, from captured values and the weights."""
    mt = model.config.model_type
    if node.kind is NodeKind.EMBED:
        return corrupt["embed"] - clean["embed"]
    layer = layers[node.layer]
    if node.kind is NodeKind.HEAD:
        dh = model.config.hidden_size // model.config.num_attention_heads
        cols = slice(node.index * dh, (node.index + 1) * dh)
        dz = (corrupt[f"z{node.layer}"] - clean[f"z{node.layer}"])[..., cols]
        return dz @ (layer.attn.c_proj.weight[cols, :] if mt == "gpt2" else layer.self_attn.o_proj.weight[:, cols].T)
    da = (corrupt[f"act{node.layer}"] - clean[f"act{node.layer}"])[..., node.index: node.index + 1]
    return da * (layer.mlp.c_proj.weight[node.index] if mt == "gpt2" else layer.mlp.down_proj.weight[:, node.index])


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_branch_gradients_and_writes_equal_plain_pytorch(name):
    """GPT-2 (Conv1D projections) and GQA Llama (Linear): every (source, reader) product of one pair equals the
    hooks reference, where a reader's gradient is taken at a clone of its norm's input."""
    loaded = _loaded(name)
    pair = tm.TINY_PAIRS[0]
    sources = ["embed", "L0.H1", "L0.H3", "L1.H2", "L0.N5", "L1.N7"]
    nodes = [parse_node(s) for s in sources[1:]]
    plan = make_plan("tiny", [pair], (NodeGroup("heads"),), batch=1)
    m = edge_matrix(plan, nodes, loaded=loaded)
    ref = _reference_products(loaded.hf, loaded.tokenizer, pair, sources)
    worst, biggest = 0.0, 0.0
    for i, s in enumerate(m.sources):
        # sequential blocks: embed writes at point 0, a layer-l head at 2l+1, a neuron at 2l+2
        write = 0 if s.kind is NodeKind.EMBED else 2 * s.layer + (1 if s.kind is NodeKind.HEAD else 2)
        for j, r in enumerate(m.readers):
            got = float(m.blocks[0, i, j])
            if r.point < write:  # a reader before the source: masked out on purpose
                assert got == 0.0
                continue
            worst = max(worst, abs(got - ref[(s.name, r.name)]))
            biggest = max(biggest, abs(got))
    assert biggest > 1e-2 and worst < 1e-5, (worst, biggest)


@pytest.mark.parametrize("name", ["gpt2", "neox"])
def test_edge_is_derivative_through_one_block_input(name, monkeypatch):
    """float64: edge(u -> block r) = d/da M(clean run with a * (u's corrupt - clean write) added to the input of
    r's norm only), by central differences; the skip path is untouched."""
    softmax = torch.nn.functional.softmax

    def softmax64(x, dim=None, _stacklevel=3, dtype=None):  # GPT-NeoX takes the softmax in float32: keep float64
        return softmax(x, dim=dim) if x.dtype == torch.float64 else softmax(x, dim=dim, dtype=dtype)

    monkeypatch.setattr(torch.nn.functional, "softmax", softmax64)
    loaded = _loaded(name, torch.float64)
    model, tok = loaded.hf, loaded.tokenizer
    pair = tm.TINY_PAIRS[0]
    nodes = [parse_node(s) for s in ("L0.H1", "L0.N5", "L0.mlp")]
    plan = make_plan("tiny", [pair], (NodeGroup("heads"),), batch=1)
    m = edge_matrix(plan, nodes, loaded=loaded)
    # the write vectors, from the hooks reference's captured values (heads, neurons) or the block output (mlp)
    mt = model.config.model_type
    layer0 = model.transformer.h[0] if mt == "gpt2" else model.gpt_neox.layers[0]
    attn_o = layer0.attn.c_proj if mt == "gpt2" else layer0.attention.dense
    down = layer0.mlp.c_proj if mt == "gpt2" else layer0.mlp.dense_4h_to_h
    ids = {k: tok(pair[k], return_tensors="pt").input_ids for k in ("clean", "corrupt")}
    answer, wrong = (tok(pair[k], add_special_tokens=False).input_ids[0] for k in ("answer", "wrong"))
    caught = {}
    hooks = [attn_o.register_forward_pre_hook(lambda mod, a: caught.__setitem__("z", a[0])),
             down.register_forward_pre_hook(lambda mod, a: caught.__setitem__("act", a[0])),
             layer0.mlp.register_forward_hook(lambda mod, a, o: caught.__setitem__("mlp", o))]
    vals = {}
    with torch.no_grad():
        for k in ("clean", "corrupt"):
            model(input_ids=ids[k])
            vals[k] = dict(caught)
    for h in hooks:
        h.remove()
    dh = model.config.hidden_size // model.config.num_attention_heads
    dz = (vals["corrupt"]["z"] - vals["clean"]["z"])[..., dh: 2 * dh]
    w_o = attn_o.weight[dh: 2 * dh, :] if mt == "gpt2" else attn_o.weight[:, dh: 2 * dh].T
    da = (vals["corrupt"]["act"] - vals["clean"]["act"])[..., 5:6]
    w_d = down.weight[5] if mt == "gpt2" else down.weight[:, 5]
    writes = {"L0.H1": dz @ w_o, "L0.N5": da * w_d, "L0.mlp": vals["corrupt"]["mlp"] - vals["clean"]["mlp"]}
    norm_of = {r.name: loaded.hf.get_submodule(r.module) for r in readers(loaded)}

    def metric_with(reader: str, shift: torch.Tensor) -> float:
        h = norm_of[reader].register_forward_pre_hook(lambda mod, a: (a[0] + shift,) + tuple(a[1:]))
        try:
            with torch.no_grad():
                logits = model(input_ids=ids["clean"]).logits
        finally:
            h.remove()
        return float(logits[0, -1, answer] - logits[0, -1, wrong])

    eps, checked, worst = 1e-4, 0, 0.0
    for i, s in enumerate(m.sources[1:], start=1):
        for j, r in enumerate(m.readers):
            if float(m.blocks[0, i, j]) == 0.0:  # a reader before the source
                continue
            fd = (metric_with(r.name, eps * writes[s.name]) - metric_with(r.name, -eps * writes[s.name])) / (2 * eps)
            worst = max(worst, abs(fd - float(m.blocks[0, i, j])))
            checked += 1
    assert checked >= 5 and worst < 1e-6, (checked, worst)


def test_pipeline_exports_weighted_edges_that_sum_to_node_estimates(tmp_path, monkeypatch):
    """`atpdsl.run` on the zoo model (parallel GPT-NeoX): every attention and MLP block is a node, so each
    node's out-edges cover every later reader and add up to its estimate; graphml and the edge CSV carry them."""
    import atpdsl
    from atpdsl.engine import edge_reads
    from atpdsl.outputs.graphml import read_graphml

    spec = (
        'model zoo "induction-2l"\n'
        'pair { clean "t1 t2 t3 t4 t5 t6 t7 t8 t1 t2 t3" corrupt "t1 t2 t9 t4 t5 t6 t7 t8 t1 t2 t3" '
        'answer " t4" wrong " t9" }\n'
        'pair { clean "t10 t11 t12 t13 t14 t15 t10 t11 t12" corrupt "t10 t11 t20 t13 t14 t15 t10 t11 t12" '
        'answer " t13" wrong " t20" }\n'
        "metric logit_diff(answer, wrong) at last\n"
        "nodes { attn ; mlp ; heads layers 1..1 }\nmethod atp\nselect top 6\n"
        'export "e.csv"\nexport "e.graphml"\n'
    )
    res = atpdsl.run(text=spec, out_dir=tmp_path)
    G = res.graph
    assert G.graph["edge_rule"] == "attribution" and "edge_semantics" in G.graph
    assert res.result.edges and all(e.weight is not None for e in res.result.edges)
    assert "edges" in dict(res.result.timings)
    weights = {(e.source, e.target): e.weight for e in res.result.edges if not e.channel}  # whole edges
    parts = {(e.source, e.target, e.channel): e.weight for e in res.result.edges if e.channel}
    kind = {n.name: n.node.kind.value for n in res.result.nodes}
    assert ("L0.attn", "L0.mlp") not in weights  # parallel residual
    for u in ("L0.attn", "L0.mlp", "L1.attn", "L1.mlp"):
        total = sum(w for (a, b), w in weights.items() if a == u and kind.get(b, "logits") in ("attn", "mlp", "logits"))
        assert total == pytest.approx(res.result.by_name()[u].estimate, abs=1e-5)
    heads = sorted(b for (a, b) in weights if a == "L0.attn" and kind.get(b) == "heads")
    assert heads == ["L1.H0", "L1.H1"]  # per-head edges: they differ and add up to the block edge
    assert weights["L0.attn", "L1.H0"] != pytest.approx(weights["L0.attn", "L1.H1"], rel=1e-3)
    assert sum(weights["L0.attn", v] for v in heads) == pytest.approx(weights["L0.attn", "L1.attn"], abs=1e-5)
    for v in heads:
        assert weights["L0.attn", v] == pytest.approx(sum(parts["L0.attn", v, c] for c in "qkv"), abs=1e-9)
    assert abs(weights["L1.attn", "logits"]) > 1e-2  # the corrupted token matters
    H = read_graphml(tmp_path / "e.graphml")
    assert {(a, b): round(d["weight"], 9) for a, b, d in H.edges(data=True)} == {
        (a, b): round(d["weight"], 9) for a, b, d in G.edges(data=True)}
    with open(tmp_path / "e-edges.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(res.result.edges) and all(r["weight"] not in ("", None) for r in rows)
    # the edges come from the AtP passes themselves: no step runs the model again
    steps = [s["kind"] for s in res.result.extras["steps"]]
    assert steps == [s.kind for s in res.plan.steps] and steps.count("corrupt_forward") == 1
    # no edges for method exact (no edge steps in its plan) or for more than EDGE_LIMIT selected nodes
    exact = atpdsl.run(text=spec.replace("method atp", "method exact"), out_dir=tmp_path / "x")
    assert exact.result.edges == () and "edges" not in [s.kind for s in exact.plan.steps]
    monkeypatch.setattr(edge_reads, "EDGE_LIMIT", 3)
    few = atpdsl.run(text=spec, out_dir=tmp_path / "y")
    assert few.result.edges == () and "6 nodes selected" in few.result.extras["edges_skipped"]
