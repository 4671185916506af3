"""A plain-PyTorch reference for per-target edges and path patching, independent of the engine (module hooks and
the custom attention function of tests/torch_reference.py, no nnsight), and tests of the reference itself.

For an edge u -> (target v, input c) and one pair, the model runs on two rows that are both the clean prompt;
row 1's input norm of v's block reads x + e * dw_u (u's corrupt - clean write; only at u's position when u is
per position), and row 0's v takes input c from row 1 (a head: its own query / key / value rows, through every
query, or through its query at position p only; a neuron: its own pre-activations, at every position or at p).
Everything else in row 0 is clean, so M_row0(e) is the metric with u's change reaching v's input c only:

    score  = dM/de at e = 0   (the edge's first-order estimate: what the engine computes)
    patch  = M(1) - M(0)      (exact path patching: what `verify edges` measures)
"""
from __future__ import annotations

import pytest
import torch

import torch_reference as tr
import tiny_models as tm

from atpdsl.names import NodeId, NodeKind, parse_node

__all__ = ["EdgeReference"]

_NORMS = {"gpt2": ("transformer.h.{}.ln_1", "transformer.h.{}.ln_2", "transformer.ln_f"),
          "gpt_neox": ("gpt_neox.layers.{}.input_layernorm", "gpt_neox.layers.{}.post_attention_layernorm",
                       "gpt_neox.final_layer_norm"),
          "llama": ("model.layers.{}.input_layernorm", "model.layers.{}.post_attention_layernorm", "model.norm")}

_QKV_SITE = {NodeKind.QUERY: "q", NodeKind.KEY: "k", NodeKind.VALUE: "v"}


class EdgeReference:
    """Edge scores and path-patching effects of one pair (see the module docstring)."""

    def __init__(self, model, tok, pair: dict):
        self.model, self.pair = model, pair
        self.mt = model.config.model_type
        self.dims = tr.dims(model)
        self.metric = tr.logit_diff(tok)
        self.clean, self.corrupt = tr.encode_pair(tok, pair)
        emb = {}
        hook = model.get_input_embeddings().register_forward_hook(lambda m, a, o: emb.__setitem__("e", o.detach()))
        try:
            with tr._installed(model) as ref, torch.no_grad():
                self.vals = {}
                for name, ids in (("clean", self.clean), ("corrupt", self.corrupt)):
                    tr._run(ref, ids, True)
                    self.vals[name] = {k: v.detach() for k, v in ref.record.items()} | {"embed": emb["e"]}
        finally:
            hook.remove()
        with torch.no_grad():
            self.base = float(self._forward(None, None, None))

    # ------------------------------------------------------------------------------------------- writes
    def write(self, source: NodeId) -> torch.Tensor:
        """[1, T, d]: u's corrupt - clean write into the residual stream (at its position only if per position)."""
        c, k, dm = self.vals["clean"], self.vals["corrupt"], self.dims
        mods = tr._modules(self.model, max(source.layer, 0))
        if source.kind is NodeKind.EMBED:
            w = k["embed"] - c["embed"]
        elif source.kind is NodeKind.HEAD:
            cols = slice(source.index * dm.head_dim, (source.index + 1) * dm.head_dim)
            dz = (k[(source.layer, "z")] - c[(source.layer, "z")])[..., cols]
            o = mods["o"]
            w = dz @ (o.weight[cols, :] if self.mt == "gpt2" else o.weight[:, cols].T)
        elif source.kind is NodeKind.NEURON:
            da = (k[(source.layer, "neuron")] - c[(source.layer, "neuron")])[..., source.index: source.index + 1]
            down = mods["mlp"].c_proj if self.mt == "gpt2" else (mods["mlp"].dense_4h_to_h if self.mt == "gpt_neox"
                                                                  else mods["down"])
            w = da * (down.weight[source.index] if self.mt == "gpt2" else down.weight[:, source.index])
        else:
            site = {NodeKind.ATTN: "attn_out", NodeKind.MLP: "mlp_out"}[source.kind]
            w = k[(source.layer, site)] - c[(source.layer, site)]
        if source.position is not None:
            keep = torch.zeros_like(w)
            keep[:, source.position] = 1.0
            w = w * keep
        return w.detach()

    # -------------------------------------------------------------------------------------------- runs
    def _norm(self, target: NodeId):
        attn, mlp, final = _NORMS[self.mt]
        if target.kind is NodeKind.LOGITS:
            return self.model.get_submodule(final)
        side = mlp if target.kind in (NodeKind.NEURON, NodeKind.MLP) else attn
        return self.model.get_submodule(side.format(target.layer))

    def _patches(self, ref, target: NodeId, channel: str) -> None:
        """Row 0's target takes input `channel` from row 1 (see the module docstring)."""
        m, h, p = target.layer, target.index, target.position
        if target.kind in _QKV_SITE:  # a query / key / value node: its own vector (a KV group's for grouped keys)
            def node(v):
                v = v.clone()
                at = slice(None) if p is None else p
                v[0, h, at] = v[1, h, at]
                return v
            ref.patches.setdefault((m, _QKV_SITE[target.kind]), []).append(node)
            return
        if target.kind is NodeKind.NEURON:
            def neuron(v):
                v = v.clone()
                sl = (slice(None) if p is None else p, h)
                v[(0, *sl)] = v[(1, *sl)]
                return v
            ref.patches[(m, "neuron")] = [neuron]
            return
        if channel == "":  # every input: the head's whole output comes from row 1 (at p only, per position)
            def output(v):
                v = v.clone()
                cols = slice(h * self.dims.head_dim, (h + 1) * self.dims.head_dim)
                at = slice(None) if p is None else p
                v[0, at, cols] = v[1, at, cols]
                return v
            ref.patches[(m, "z")] = [output]
            return
        if p is None:
            site = {"q": "q", "k": "k_rep", "v": "v_rep"}[channel]

            def whole(v):
                v = v.clone()
                v[0, h] = v[1, h]
                return v
            ref.patches[(m, site)] = [whole]
            return
        if channel in ("q", "k"):
            def pattern(a):
                q, k = ref.record[(m, "q")], ref.record[(m, "k_rep")]
                rq, rk = (1, 0) if channel == "q" else (0, 1)
                logits = (q[rq, h, p] @ k[rk, h].T) * ref.scale[m] + ref.mask[m][0, 0, p]
                a = a.clone()
                a[0, h, p] = torch.softmax(logits, -1)
                return a
            ref.patches[(m, "pattern")] = [pattern]
            return

        def z(v):
            a, vr = ref.record[(m, "pattern")], ref.record[(m, "v_rep")]
            v = v.clone()
            dh = self.dims.head_dim
            v[0, p, h * dh:(h + 1) * dh] = a[0, h, p] @ vr[1, h]
            return v
        ref.patches[(m, "z")] = [z]

    def _node_source(self, ref, source: NodeId, eps: torch.Tensor) -> None:
        """Row 1's query / key / value node (post-rotary; a KV group's or a head's) at e of its corrupt change."""
        site = _QKV_SITE[source.kind]
        m, u = source.layer, source.index
        change = self.vals["corrupt"][(m, site)][0, u] - self.vals["clean"][(m, site)][0, u]  # [T, d]
        if source.position is not None:
            keep = torch.zeros_like(change)
            keep[source.position] = 1.0
            change = change * keep

        def move(v):
            v = v.clone()
            v[1, u] = v[1, u] + eps * change
            return v
        ref.patches.setdefault((m, site), []).append(move)

    def _forward(self, source: NodeId | None, target: NodeId | None, channel: str | None,
                 eps: torch.Tensor | None = None, alpha: float = 0.0) -> torch.Tensor:
        ids = torch.cat([self.clean, self.clean])
        hooks = []
        if alpha:  # both rows' input embeddings moved a fraction alpha toward the corrupt ones (integrated gradients)
            move = alpha * (self.vals["corrupt"]["embed"] - self.vals["clean"]["embed"])
            hooks.append(self.model.get_input_embeddings().register_forward_hook(lambda m, a, o: o + move))
        with tr._installed(self.model) as ref:
            if source is not None and source.kind in (NodeKind.QUERY, NodeKind.KEY, NodeKind.VALUE):
                self._node_source(ref, source, eps)  # row 1 has the node moved toward its corrupt value
                self._patches(ref, target, channel)
            elif source is not None:
                dw = self.write(source)

                def shift(mod, args):
                    x = args[0].clone()
                    x[1] = x[1] + eps * dw[0]
                    return (x, *args[1:])
                hooks.append(self._norm(target).register_forward_pre_hook(shift))
                if target.kind in (NodeKind.HEAD, NodeKind.NEURON, *_QKV_SITE):
                    self._patches(ref, target, channel)
                else:  # a whole block (logits): row 0's own norm input takes the change
                    hooks[-1].remove()
                    hooks[-1] = self._norm(target).register_forward_pre_hook(
                        lambda mod, args: ((args[0] + eps * dw * torch.tensor([1.0, 0.0]).view(2, 1, 1)),
                                           *args[1:]))
            try:
                ref.record = {}
                logits = self.model(input_ids=ids, use_cache=False).logits
            finally:
                for hk in hooks:
                    hk.remove()
                ref.record = None
        return self.metric(logits[:1], self.pair)

    def score(self, source: str, target: str, channel: str = "", alpha: float = 0.0) -> float:
        """dM/de at 0: the edge's first-order score (at inputs moved a fraction alpha toward the corrupt ones)."""
        eps = torch.zeros((), dtype=self.vals["clean"]["embed"].dtype, requires_grad=True)
        with torch.enable_grad():
            m = self._forward(parse_node(source), parse_node(target), channel, eps, alpha)
            (g,) = torch.autograd.grad(m, eps, allow_unused=True)
        return 0.0 if g is None else float(g)

    def patch(self, source: str, target: str, channel: str = "") -> float:
        """M(1) - M(0): exact path patching of the edge."""
        with torch.no_grad():
            one = torch.ones((), dtype=self.vals["clean"]["embed"].dtype)
            return float(self._forward(parse_node(source), parse_node(target), channel, one)) - self.base


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_reference_score_is_the_derivative_of_its_path_patch(name, monkeypatch):
    """float64: the reference's autograd score equals central differences of M(e), and M(0) is the clean metric."""
    model = tm.to_float64(tm.BUILDERS[name]())
    ref = EdgeReference(model, tm.make_tokenizer(), tm.TINY_PAIRS[0])
    checked = 0
    for source, target, channel in (("L0.H1", "L1.H2", "k"), ("embed", "L0.H3", "v"), ("L0.N5", "L1.H0", "q"),
                                    ("L0.H2", "L1.H1@12", "k"), ("embed", "L0.N3", ""), ("L0.mlp", "logits", "")):
        score = ref.score(source, target, channel)
        h = 1e-5
        up, down = (ref._forward(parse_node(source), parse_node(target), channel,
                                 torch.tensor(e, dtype=torch.float64)) for e in (h, -h))
        fd = float((up - down).detach()) / (2 * h)
        assert abs(score - fd) < 1e-7 * max(1.0, abs(fd)), (source, target, channel, score, fd)
        checked += abs(score) > 1e-6
    assert checked >= 4
    with torch.no_grad():
        assert float(ref._forward(None, None, None)) == pytest.approx(ref.base)
