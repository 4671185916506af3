"""Brute-force reference for the norm fix (plain PyTorch hooks, no nnsight, no closed form).

For one prompt pair and a node at position t with write D (computed by running the model's own output
projection on the patched and clean inputs, or as the change of a block's output), the norm-fixed estimate is

    sum over reader norms j after the write of  h_j[t] . (norm_j(r_j[t] + D) - norm_j(r_j[t]))

where norm_j is the model's norm module itself, r_j its clean input and h_j the gradient of the metric at its
output (optionally with GradDrop cuts: the gradient into the listed block writes set to zero).

Reader points (residual stream positions, 0 = embeddings): layer m's attention norm reads point 2m, its MLP norm
2m + 1 (2m with GPT-NeoX's parallel residual), the final norm 2L. A write of layer m's attention lands at 2m + 1
(2m + 2 parallel), of its MLP and of the layer output at 2m + 2.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from atpdsl.engine.graddrop import DropGradient
from atpdsl.names import NodeId

import torch_reference as R


def _parts(model):
    """(layers, per-layer module dict, final norm, parallel)."""
    mt = model.config.model_type
    if mt == "gpt_neox":
        layers = model.gpt_neox.layers
        mods = [{"attn_norm": b.input_layernorm, "mlp_norm": b.post_attention_layernorm, "attn": b.attention,
                 "o": b.attention.dense, "mlp": b.mlp, "act": b.mlp.act, "down": b.mlp.dense_4h_to_h} for b in layers]
        return layers, mods, model.gpt_neox.final_layer_norm, bool(model.config.use_parallel_residual)
    if mt == "gpt2":
        layers = model.transformer.h
        mods = [{"attn_norm": b.ln_1, "mlp_norm": b.ln_2, "attn": b.attn, "o": b.attn.c_proj, "mlp": b.mlp,
                 "act": b.mlp.act, "down": b.mlp.c_proj} for b in layers]
        return layers, mods, model.transformer.ln_f, False
    layers = model.model.layers
    mods = [{"attn_norm": b.input_layernorm, "mlp_norm": b.post_attention_layernorm, "attn": b.self_attn,
             "o": b.self_attn.o_proj, "mlp": b.mlp, "down": b.mlp.down_proj} for b in layers]
    return layers, mods, model.model.norm, False


def _first(x):
    return x[0] if isinstance(x, tuple) else x


def _record(model, store: dict, drops: Sequence[tuple[int, str]] = ()):
    """Hooks recording node sites, norm inputs and outputs; GradDrop identities on the cut block writes."""
    layers, mods, final, _ = _parts(model)
    handles = []

    def keep(key):
        def hook(mod, args, out=None):
            store[key] = args[0] if out is None else _first(out)
        return hook

    for m, md in enumerate(mods):
        handles.append(md["o"].register_forward_pre_hook(keep((m, "z"))))
        if "act" in md:
            handles.append(md["act"].register_forward_hook(keep((m, "neuron"))))
        else:
            handles.append(md["down"].register_forward_pre_hook(keep((m, "neuron"))))
        for name in ("attn_norm", "mlp_norm"):
            handles.append(md[name].register_forward_hook(
                lambda mod, args, out, m=m, name=name: store.update({(m, name + "_in"): args[0], (m, name): out})))
        for side in ("attn", "mlp"):
            def write(mod, args, out, m=m, side=side):
                value = _first(out)
                store[(m, side + "_out")] = value
                if (m, side) in drops:
                    value = DropGradient.apply(value)
                    return (value, *out[1:]) if isinstance(out, tuple) else value
                return None
            handles.append(md[side].register_forward_hook(write))
        handles.append(layers[m].register_forward_hook(keep((m, "resid"))))
    handles.append(final.register_forward_hook(
        lambda mod, args, out: store.update({("final", "norm_in"): args[0], ("final", "norm"): out})))
    return handles


def _readers(model):
    """[(point, norm module, input key, output key)] in forward order."""
    _, mods, final, parallel = _parts(model)
    out = []
    for m, md in enumerate(mods):
        out.append((2 * m, md["attn_norm"], (m, "attn_norm_in"), (m, "attn_norm")))
        out.append((2 * m + (0 if parallel else 1), md["mlp_norm"], (m, "mlp_norm_in"), (m, "mlp_norm")))
    out.append((2 * len(mods), final, ("final", "norm_in"), ("final", "norm")))
    return out


def norm_fixed(model, tok, pair: dict, metric_fn, nodes: Sequence[NodeId],
               drops: Sequence[tuple[int, str]] = ()) -> list[float]:
    """The norm-fixed estimate of each node (heads, queries and keys as the QK fix sees them, values, neurons,
    attn, mlp, resid; per position, or summed: every position patched at once) for one pair; with
    `drops` [(layer, "attn" | "mlp")], a GradDrop term's (0 for a node whose own block write is cut)."""
    _, mods, _, parallel = _parts(model)
    clean_ids, corrupt_ids = R.encode_pair(tok, pair)
    corrupt: dict = {}
    handles = _record(model, corrupt)
    try:
        with torch.no_grad():
            model(input_ids=corrupt_ids, use_cache=False)
    finally:
        for hd in handles:
            hd.remove()
    clean: dict = {}
    handles = _record(model, clean, drops)
    emb = model.get_input_embeddings().register_forward_hook(lambda m, a, o: o.detach().requires_grad_(True))
    try:
        with torch.enable_grad():
            metric = metric_fn(model(input_ids=clean_ids, use_cache=False).logits, pair)
    finally:
        emb.remove()
        for hd in handles:
            hd.remove()
    readers = _readers(model)
    outs = [clean[o] for _, _, _, o in readers]
    grads = torch.autograd.grad(metric, outs, allow_unused=True)
    grads = [torch.zeros_like(o) if g is None else g for o, g in zip(outs, grads)]
    dm = R.dims(model)
    hd = dm.head_dim
    cache = (R.pair_cache(model, tok, pair, metric_fn)
             if any(n.kind.value in ("values", "queries", "keys") for n in nodes) else None)
    results = []
    with torch.no_grad():
        for node in nodes:
            m, t, kind = node.layer, node.position, node.kind.value
            side = {"neurons": "mlp", "mlp": "mlp", "resid": None}.get(kind, "attn")
            if (m, side) in drops:  # the node's own write is cut: nothing of it reaches the metric in this term
                results.append(0.0)
                continue
            at = slice(None) if t is None else t  # a summed node: every position patched at once
            if kind == "neurons":
                x = clean[(m, "neuron")]
                xp = x.clone()
                xp[0, at, node.index] = corrupt[(m, "neuron")][0, at, node.index]
                write = (mods[m]["down"](xp) - mods[m]["down"](x))[0]
            elif kind == "heads":
                z = clean[(m, "z")]
                zp = z.clone()
                cols = slice(node.index * hd, (node.index + 1) * hd)
                zp[0, at, cols] = corrupt[(m, "z")][0, at, cols]
                write = (mods[m]["o"](zp) - mods[m]["o"](z))[0]
            elif kind == "values":  # a value at s reaches every query q >= s through the clean pattern
                rep = dm.n_heads // dm.n_kv_heads if node.grouped else 1
                group = node.index if node.grouped else node.index // (dm.n_heads // dm.n_kv_heads)
                dv = (cache.corrupt[(m, "v")] - cache.clean[(m, "v")])[0, group]  # [T, hd]
                keep = torch.zeros(dv.shape[0], 1, dtype=dv.dtype)
                keep[at] = 1.0
                z = clean[(m, "z")]
                zp = z.clone()
                heads = range(node.index * rep, node.index * rep + rep) if node.grouped else [node.index]
                for hh in heads:
                    zp[0, :, hh * hd:(hh + 1) * hd] += cache.clean[(m, "pattern")][0, hh] @ (keep * dv)
                write = (mods[m]["o"](zp) - mods[m]["o"](z))[0]
            elif kind in ("queries", "keys"):  # the exact pattern with the patched query / key, through the values
                rep = dm.n_heads // dm.n_kv_heads
                heads = range(node.index * rep, node.index * rep + rep) if node.grouped else [node.index]
                mask, scale = cache.mask[m][0, 0], cache.scale[m]
                z = clean[(m, "z")]
                zp = z.clone()
                for hh in heads:
                    q0, k0 = cache.clean[(m, "q")][0, hh], cache.clean[(m, "k_rep")][0, hh]
                    q1, k1 = q0.clone(), k0.clone()
                    if kind == "queries":
                        q1[at] = cache.corrupt[(m, "q")][0, hh, at]
                    else:
                        k1[at] = cache.corrupt[(m, "k_rep")][0, hh, at]
                    a0 = torch.softmax(q0 @ k0.T * scale + mask, -1)
                    a1 = torch.softmax(q1 @ k1.T * scale + mask, -1)
                    zp[0, :, hh * hd:(hh + 1) * hd] += (a1 - a0) @ cache.clean[(m, "v_rep")][0, hh]
                write = (mods[m]["o"](zp) - mods[m]["o"](z))[0]
            else:
                key = {"attn": "attn_out", "mlp": "mlp_out", "resid": "resid"}[kind]
                write = (corrupt[(m, key)] - clean[(m, key)])[0]
                if t is not None:
                    only = torch.zeros_like(write)
                    only[t] = write[t]
                    write = only
            point = 2 * m + (2 if parallel else 1) if side == "attn" else 2 * m + 2
            total = 0.0
            for (p, norm, in_key, _), g in zip(readers, grads):
                if p < point:
                    continue
                r = clean[in_key][0].detach()  # [T, d]: the norm acts on each position alone
                total += float((g[0] * (norm(r + write) - norm(r))).sum())
            results.append(total)
    return results
