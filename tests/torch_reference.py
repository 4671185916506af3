"""Independent plain-PyTorch reference (module hooks + a registered attention function, no nnsight) for AtP,
exact activation patching, the QK fix and GradDrop on HF causal LMs; tests check the nnsight engine against it.

Supported: Llama / Qwen2 / Mistral / Phi-3-style (GQA), GPT-NeoX, GPT-2, GPT-J, OPT. One prompt pair at a time, no
padding.
Every public function installs the reference for the duration of the call and restores the model afterwards
(attention implementation and hooks), so the same model object can then be used by nnsight.

How sites are read: a custom attention function is registered with transformers' `AttentionInterface`
(name "atp_reference") and computes eager attention itself, exposing post-rotary q / k / v, the repeated
(per query head) k / v, the additive mask and the pattern; forward (pre-)hooks expose the head outputs (input of
o_proj / dense / c_proj / out_proj), the neurons (input of down_proj or OPT's fc2, or the output of mlp.act for
GPT-NeoX / GPT-2 / GPT-J) and the attention / MLP block writes (OPT's MLP runs on [T, width] tensors without a
batch dimension: its sites are recorded as [1, T, width]). Gradients come from `torch.autograd.grad(metric, recorded tensors)`.

API (`pair` is a dict with "clean", "corrupt" and any fields the metric reads; shapes are for one pair, T tokens):

    load_model(folder, dtype=torch.float32) -> (model, tok)      eval mode, eager attention, offline
    encode_pair(tok, pair) -> (clean_ids [1,T], corrupt_ids [1,T])  raises ValueError if lengths differ
    first_token(tok, text) -> int                                  first id of `text` without special tokens
    logit_diff(tok, answer="answer", wrong="wrong") -> metric_fn   logits[0,-1,a] - logits[0,-1,b] (a, b = first
                                                                   tokens of the pair's fields)
    metric_fn(logits [1,T,V], pair) -> 0-d tensor                  the metric convention used everywhere here
    dims(model) -> Dims(n_layers, n_heads, n_kv_heads, head_dim, n_neurons)

    pair_cache(model, tok, pair, metric_fn) -> PairCache           clean + corrupt activations, clean gradients
        .clean / .corrupt / .grad: dict[(layer, site)] -> Tensor   sites below, batch dim 1 kept
        .mask[layer] [1,1,T,T] additive, .scale[layer] float, .clean_metric, .corrupt_metric
    sites: "z" [1,T,H*dh]  "neuron" [1,T,N]  "q" [1,H,T,dh]  "k" "v" [1,Hkv,T,dh] (post-rotary k)
           "k_rep" "v_rep" [1,H,T,dh] (k / v as seen by each query head)  "pattern" [1,H,T,T]
           "attn_out" "mlp_out" [1,T,D] (block writes to the residual stream)

    KINDS = ("heads", "neurons", "queries", "keys", "values", "group_keys", "group_values", "attn", "mlp")
        units per kind: heads/queries/keys/values H (per query head), group_keys/group_values Hkv, neurons N,
        attn/mlp 1. "keys"/"values" patch one head's view of its KV group; "group_*" patch the KV group
        (every query head sharing it).
    atp_from_cache(cache, kinds=KINDS, grad=None) -> dict kind -> Tensor [L, T, units]   plain AtP, per position
    atp_scores(model, tok, pairs, metric_fn, kinds=KINDS) -> list[PairAtP]
        PairAtP.per_position[kind] [L,T,U], .summed[kind] [L,U] (sum over positions), .clean_metric, .corrupt_metric

    exact_patch(model, tok, pair, metric_fn, node: NodeId) -> float
        M(clean run with `node` set to its corrupt-run value) - M(clean run). NodeId kinds: heads, neurons,
        queries (H), keys / values (H, or KV group when node.grouped), attn, mlp; position None = all positions.
    exact_patches(model, tok, pair, metric_fn, nodes, together=False, alpha=1.0) -> list[float] (one per node)
        or [float] (all nodes patched at once when together=True); alpha != 1 sets the node to
        clean + alpha * (corrupt - clean), so the derivative in alpha at 0 is the AtP estimate

    qk_fix_reference(cache, layer) -> dict "queries" [T,H], "keys" [T,H], "group_keys" [T,Hkv] (one position
        patched), "queries_all" [H], "keys_all" [H], "group_keys_all" [Hkv] (every position patched at once:
        the summed node)
        brute force in float64: recompute the pattern with the patched query rows / keys (whole
        re-softmax), then linearise after the pattern: sum (A' - A) * G, G = dM/dA at the clean run.
        Pass `grad=` (a dict like cache.grad) to use GradDrop gradients.

    graddrop_grads(model, tok, pair, metric_fn, mode="layer"|"sublayer", method="hook"|"function")
        -> (cache, list[dict[(layer, site)] -> grad])  one gradient dict per term: mode "layer" has L terms
        (term l zeroes the gradient into attn_out_l and mlp_out_l), "sublayer" 2L terms (term 2l: attn_out_l,
        term 2l+1: mlp_out_l). A cut write is a constant: its own gradient (the attn / mlp node's) is 0. method "hook": one forward, register_hook(zeros) per term and autograd.grad with
        retain_graph; method "function": a fresh forward per term with an identity autograd.Function whose
        backward returns zeros (atpdsl.engine.graddrop.DropGradient) inserted after the block write.
    graddrop_reference(model, tok, pair, metric_fn, mode="layer", qk_fix=False, kinds=KINDS)
        -> (terms: dict kind -> Tensor [n_terms, L, T, U], score: dict kind -> [L, T, U])
        score = sum_terms |estimate| / (n_terms - 1); queries / keys / group_keys QK-fixed when qk_fix.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch
from transformers import AttentionInterface, AutoModelForCausalLM, AutoTokenizer
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from atpdsl.names import NodeId, NodeKind

__all__ = [
    "KINDS",
    "Dims",
    "PairCache",
    "PairAtP",
    "load_model",
    "encode_pair",
    "first_token",
    "logit_diff",
    "dims",
    "pair_cache",
    "atp_from_cache",
    "atp_scores",
    "exact_patch",
    "exact_patches",
    "qk_fix_reference",
    "graddrop_grads",
    "graddrop_reference",
]

ATTN_NAME = "atp_reference"
KINDS = ("heads", "neurons", "queries", "keys", "values", "group_keys", "group_values", "attn", "mlp")
MetricFn = Callable[[torch.Tensor, dict], torch.Tensor]


# ----------------------------------------------------------------------------------------------- model facts
@dataclass(frozen=True)
class Dims:
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    n_neurons: int


def dims(model: torch.nn.Module) -> Dims:
    """Layer / head / neuron counts read from the config."""
    cfg = model.config
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    neurons = (getattr(cfg, "intermediate_size", None) or getattr(cfg, "n_inner", None)
               or getattr(cfg, "ffn_dim", None) or 4 * cfg.hidden_size)
    return Dims(cfg.num_hidden_layers, heads, kv, hd, neurons)


def _modules(model: torch.nn.Module, layer: int) -> dict[str, Any]:
    """The hooked modules of one layer: attention, its output projection, the MLP and the neuron site."""
    mt = model.config.model_type
    if mt == "gpt_neox":
        blk = model.gpt_neox.layers[layer]
        return {"attn": blk.attention, "o": blk.attention.dense, "mlp": blk.mlp, "act": blk.mlp.act}
    if mt == "gpt2":
        blk = model.transformer.h[layer]
        return {"attn": blk.attn, "o": blk.attn.c_proj, "mlp": blk.mlp, "act": blk.mlp.act}
    if mt == "gptj":
        blk = model.transformer.h[layer]
        return {"attn": blk.attn, "o": blk.attn.out_proj, "mlp": blk.mlp, "act": blk.mlp.act}
    if mt == "opt":  # no MLP module: fc2's input holds the neurons, its output is the MLP write; both [T, width]
        blk = model.model.decoder.layers[layer]
        return {"attn": blk.self_attn, "o": blk.self_attn.out_proj, "mlp": blk.fc2, "down": blk.fc2, "flat": True}
    blk = model.model.layers[layer]  # llama, qwen2, mistral, ...
    return {"attn": blk.self_attn, "o": blk.self_attn.o_proj, "mlp": blk.mlp, "down": blk.mlp.down_proj}


# --------------------------------------------------------------------------------------- the hooked model
def _reference_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Eager attention computed here, with every intermediate passed through the reference's site hook."""
    ref, layer = module._atp_reference
    b, h, t, d = query.shape
    s = key.shape[2]
    if scaling is None:
        scaling = d ** -0.5
    q = ref.site(layer, "q", query)
    k = ref.site(layer, "k", key)
    v = ref.site(layer, "v", value)
    rep = h // k.shape[1]
    k_rep = ref.site(layer, "k_rep", k.repeat_interleave(rep, dim=1))
    v_rep = ref.site(layer, "v_rep", v.repeat_interleave(rep, dim=1))
    if attention_mask is None:
        causal = torch.ones(t, s, dtype=torch.bool, device=q.device).tril(s - t)
        mask = torch.zeros(1, 1, t, s, dtype=q.dtype, device=q.device).masked_fill(~causal, torch.finfo(q.dtype).min)
    elif attention_mask.dtype == torch.bool:
        mask = torch.zeros(attention_mask.shape, dtype=q.dtype, device=q.device).masked_fill(
            ~attention_mask, torch.finfo(q.dtype).min)
    else:
        mask = attention_mask
    mask = mask[:, :, :, :s]
    ref.note(layer, mask, scaling)
    scores = torch.matmul(q, k_rep.transpose(2, 3)) * scaling + mask
    pattern = torch.softmax(scores, dim=-1, dtype=torch.promote_types(q.dtype, torch.float32)).to(q.dtype)
    pattern = ref.site(layer, "pattern", pattern)
    out = torch.matmul(pattern, v_rep).transpose(1, 2).contiguous()
    return out, pattern


AttentionInterface.register(ATTN_NAME, _reference_attention)
AttentionMaskInterface.register(ATTN_NAME, eager_mask)


class _Ref:
    """The reference's state while installed: patches, GradDrop identities, recorded tensors."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.dims = dims(model)
        self.patches: dict[tuple[int, str], list[Callable[[torch.Tensor], torch.Tensor]]] = {}
        self.drops: set[tuple[int, str]] = set()
        self.record: dict[tuple[int, str], torch.Tensor] | None = None
        self.mask: dict[int, torch.Tensor] = {}
        self.scale: dict[int, float] = {}

    def site(self, layer: int, name: str, value: torch.Tensor) -> torch.Tensor:
        """Apply patches, record (before any GradDrop identity), then insert the identity if asked."""
        for fn in self.patches.get((layer, name), ()):
            value = fn(value)
        if self.record is not None:
            self.record[(layer, name)] = value
        if (layer, name) in self.drops:
            from atpdsl.engine.graddrop import DropGradient

            value = DropGradient.apply(value)
        return value

    def note(self, layer: int, mask: torch.Tensor, scale: float) -> None:
        self.mask[layer] = mask.detach()
        self.scale[layer] = float(scale)


def _flat_site(ref: _Ref, layer: int, name: str, value: torch.Tensor) -> torch.Tensor:
    """A [T, width] value (one pair, batch flattened away) seen as [1, T, width] by the site, returned flat."""
    return ref.site(layer, name, value.view(1, -1, value.shape[-1])).reshape(value.shape)


@contextmanager
def _installed(model: torch.nn.Module) -> Iterator[_Ref]:
    """Install the reference attention and hooks; restore the model on exit."""
    ref = _Ref(model)
    previous = model.config._attn_implementation
    model.set_attn_implementation(ATTN_NAME)
    if model.config._attn_implementation != ATTN_NAME:
        raise RuntimeError(f"could not install the reference attention on {type(model).__name__}")
    handles = []
    attn_modules = []
    try:
        for layer in range(ref.dims.n_layers):
            mods = _modules(model, layer)
            mods["attn"]._atp_reference = (ref, layer)
            attn_modules.append(mods["attn"])
            handles.append(mods["o"].register_forward_pre_hook(
                lambda m, args, l=layer: (ref.site(l, "z", args[0]), *args[1:])))
            if mods.get("flat"):
                handles.append(mods["down"].register_forward_pre_hook(
                    lambda m, args, l=layer: (_flat_site(ref, l, "neuron", args[0]), *args[1:])))
            elif "down" in mods:
                handles.append(mods["down"].register_forward_pre_hook(
                    lambda m, args, l=layer: (ref.site(l, "neuron", args[0]), *args[1:])))
            else:
                handles.append(mods["act"].register_forward_hook(
                    lambda m, args, out, l=layer: ref.site(l, "neuron", out)))
            handles.append(mods["attn"].register_forward_hook(
                lambda m, args, out, l=layer: (ref.site(l, "attn_out", out[0]), *out[1:])
                if isinstance(out, tuple) else ref.site(l, "attn_out", out)))
            site = _flat_site if mods.get("flat") else _Ref.site
            handles.append(mods["mlp"].register_forward_hook(
                lambda m, args, out, l=layer, site=site: site(ref, l, "mlp_out", out)))

        def embed_hook(m, args, out):  # frozen parameters: make the graph start at the embeddings
            if torch.is_grad_enabled() and not out.requires_grad:
                return out.detach().requires_grad_(True)
            return out

        handles.append(model.get_input_embeddings().register_forward_hook(embed_hook))
        yield ref
    finally:
        for hd in handles:
            hd.remove()
        for mod in attn_modules:
            del mod._atp_reference
        model.set_attn_implementation(previous)


def _run(ref: _Ref, ids: torch.Tensor, record: bool) -> torch.Tensor:
    ref.record = {} if record else None
    out = ref.model(input_ids=ids, use_cache=False)
    return out.logits


# ------------------------------------------------------------------------------------------ inputs, metric
def load_model(folder: str | Path, dtype: torch.dtype = torch.float32):
    """Load a local model folder (offline) with eager attention, in eval mode."""
    tok = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, attn_implementation="eager")
    return model.eval(), tok


def encode_pair(tok, pair: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids [1, T] of the clean and corrupt prompts; they must have the same length."""
    clean = tok(pair["clean"], return_tensors="pt").input_ids
    corrupt = tok(pair["corrupt"], return_tensors="pt").input_ids
    if clean.shape != corrupt.shape:
        raise ValueError(f"clean and corrupt prompts tokenize to different lengths: {clean.shape[1]} vs "
                         f"{corrupt.shape[1]} ({pair['clean']!r} / {pair['corrupt']!r})")
    return clean, corrupt


def first_token(tok, text: str) -> int:
    """The first token id of `text`, without special tokens."""
    return tok(text, add_special_tokens=False).input_ids[0]


def logit_diff(tok, answer: str = "answer", wrong: str = "wrong") -> MetricFn:
    """metric(logits, pair) = logit of the answer's first token minus the wrong one's, at the last position."""

    def metric(logits: torch.Tensor, pair: dict) -> torch.Tensor:
        return logits[0, -1, first_token(tok, pair[answer])] - logits[0, -1, first_token(tok, pair[wrong])]

    return metric


# ----------------------------------------------------------------------------------------------- AtP
@dataclass
class PairCache:
    """Clean and corrupt activations and clean-run gradients of one pair (all detached)."""

    clean: dict[tuple[int, str], torch.Tensor]
    corrupt: dict[tuple[int, str], torch.Tensor]
    grad: dict[tuple[int, str], torch.Tensor]
    mask: dict[int, torch.Tensor]
    scale: dict[int, float]
    clean_metric: float
    corrupt_metric: float
    dims: Dims
    n_tokens: int


def _corrupt_and_clean(ref: _Ref, model, tok, pair, metric_fn):
    clean_ids, corrupt_ids = encode_pair(tok, pair)
    with torch.no_grad():
        corrupt_metric = float(metric_fn(_run(ref, corrupt_ids, True), pair))
        corrupt = {k: v.detach() for k, v in ref.record.items()}
    with torch.enable_grad():
        metric = metric_fn(_run(ref, clean_ids, True), pair)
    acts = dict(ref.record)
    return clean_ids, corrupt, corrupt_metric, acts, metric


def _grads(metric: torch.Tensor, acts: dict, retain: bool) -> dict:
    keys = list(acts)
    gs = torch.autograd.grad(metric, [acts[k] for k in keys], retain_graph=retain, allow_unused=True)
    return {k: (torch.zeros_like(acts[k]) if g is None else g.detach()) for k, g in zip(keys, gs)}


def pair_cache(model, tok, pair: dict, metric_fn: MetricFn) -> PairCache:
    """One corrupt forward, one clean forward and one backward, with every site recorded."""
    with _installed(model) as ref:
        clean_ids, corrupt, corrupt_metric, acts, metric = _corrupt_and_clean(ref, model, tok, pair, metric_fn)
        grad = _grads(metric, acts, retain=False)
        return PairCache({k: v.detach() for k, v in acts.items()}, corrupt, grad, dict(ref.mask), dict(ref.scale),
                         float(metric.detach()), corrupt_metric, ref.dims, clean_ids.shape[1])


def atp_from_cache(cache: PairCache, kinds: Sequence[str] = KINDS,
                   grad: dict | None = None) -> dict[str, torch.Tensor]:
    """Plain AtP per position: (corrupt - clean) . gradient, as [L, T, units] per kind."""
    g = cache.grad if grad is None else grad
    dm = cache.dims
    out: dict[str, list[torch.Tensor]] = {k: [] for k in kinds}

    def est(layer: int, site: str) -> torch.Tensor:
        return (cache.corrupt[(layer, site)] - cache.clean[(layer, site)]) * g[(layer, site)]

    for l in range(dm.n_layers):
        for kind in kinds:
            if kind == "heads":
                e = est(l, "z")[0].view(cache.n_tokens, dm.n_heads, dm.head_dim).sum(-1)
            elif kind == "neurons":
                e = est(l, "neuron")[0]
            elif kind in ("queries", "keys", "values", "group_keys", "group_values"):
                site = {"queries": "q", "keys": "k_rep", "values": "v_rep", "group_keys": "k",
                        "group_values": "v"}[kind]
                e = est(l, site)[0].sum(-1).transpose(0, 1)  # [T, heads]
            elif kind in ("attn", "mlp"):
                e = est(l, kind + "_out")[0].sum(-1, keepdim=True)
            else:
                raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")
            out[kind].append(e)
    return {k: torch.stack(v) for k, v in out.items()}


@dataclass
class PairAtP:
    per_position: dict[str, torch.Tensor]  # kind -> [L, T, U]
    clean_metric: float
    corrupt_metric: float
    summed: dict[str, torch.Tensor] = field(default_factory=dict)  # kind -> [L, U]

    def __post_init__(self) -> None:
        self.summed = {k: v.sum(1) for k, v in self.per_position.items()}


def atp_scores(model, tok, pairs: Sequence[dict], metric_fn: MetricFn,
               kinds: Sequence[str] = KINDS) -> list[PairAtP]:
    """Plain AtP for each pair separately."""
    res = []
    for pair in pairs:
        c = pair_cache(model, tok, pair, metric_fn)
        res.append(PairAtP(atp_from_cache(c, kinds), c.clean_metric, c.corrupt_metric))
    return res


# ---------------------------------------------------------------------------------------- exact patching
def _node_site(node: NodeId, dm: Dims) -> tuple[str, Callable[[torch.Tensor, Any], tuple]]:
    """Where a node lives and how to index it: returns (site, index(tensor, pos) -> index tuple)."""
    k = node.kind
    if k is NodeKind.HEAD:
        return "z", lambda t, p: (0, p, slice(node.index * dm.head_dim, (node.index + 1) * dm.head_dim))
    if k is NodeKind.NEURON:
        return "neuron", lambda t, p: (0, p, node.index)
    if k is NodeKind.QUERY:
        return "q", lambda t, p: (0, node.index, p)
    if k in (NodeKind.KEY, NodeKind.VALUE):
        base = "k" if k is NodeKind.KEY else "v"
        return (base if node.grouped else base + "_rep"), lambda t, p: (0, node.index, p)
    if k in (NodeKind.ATTN, NodeKind.MLP):
        return k.value + "_out", lambda t, p: (0, p)
    raise ValueError(f"exact_patch: unsupported node kind {k.value!r} ({node.name})")


def _add_patch(ref: _Ref, node: NodeId, corrupt: dict, clean: dict, alpha: float = 1.0) -> None:
    site, index = _node_site(node, ref.dims)
    src = corrupt[(node.layer, site)]
    base = clean[(node.layer, site)]
    pos = slice(None) if node.position is None else node.position
    if isinstance(pos, str):
        raise ValueError(f"exact_patch: named positions are not supported here ({node.name})")
    idx = index(src, pos)
    new = src[idx] if alpha == 1.0 else base[idx] + alpha * (src[idx] - base[idx])

    def patch(t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        t[idx] = new
        return t

    ref.patches.setdefault((node.layer, site), []).append(patch)


def exact_patches(model, tok, pair: dict, metric_fn: MetricFn, nodes: Sequence[NodeId],
                  together: bool = False, alpha: float = 1.0) -> list[float]:
    """Patch effects M(clean | node <- corrupt) - M(clean), one per node (or one for all nodes at once).

    alpha != 1 sets the node to clean + alpha * (corrupt - clean) instead (its clean-run value as the base), so
    d/d alpha at 0 is the AtP estimate.
    """
    clean_ids, corrupt_ids = encode_pair(tok, pair)
    with _installed(model) as ref, torch.no_grad():
        _run(ref, corrupt_ids, True)
        corrupt = dict(ref.record)
        base = float(metric_fn(_run(ref, clean_ids, True), pair))
        clean = dict(ref.record)
        ref.record = None
        groups = [list(nodes)] if together else [[n] for n in nodes]
        effects = []
        for group in groups:
            ref.patches = {}
            for n in group:
                _add_patch(ref, n, corrupt, clean, alpha)
            effects.append(float(metric_fn(_run(ref, clean_ids, False), pair)) - base)
            ref.patches = {}
        return effects


def exact_patch(model, tok, pair: dict, metric_fn: MetricFn, node: NodeId) -> float:
    """The exact patch effect of one node: M(clean | node <- corrupt) - M(clean)."""
    return exact_patches(model, tok, pair, metric_fn, [node])[0]


# ---------------------------------------------------------------------------------------------- QK fix
def qk_fix_reference(cache: PairCache, layer: int, grad: dict | None = None) -> dict[str, torch.Tensor]:
    """Brute-force QK fix in float64: exact new pattern for one patched query / key, linear after the pattern."""
    g = cache.grad if grad is None else grad
    dm = cache.dims
    f = torch.float64
    q = cache.clean[(layer, "q")][0].to(f)
    qn = cache.corrupt[(layer, "q")][0].to(f)
    kr = cache.clean[(layer, "k_rep")][0].to(f)
    krn = cache.corrupt[(layer, "k_rep")][0].to(f)
    kg = cache.clean[(layer, "k")][0].to(f)
    kgn = cache.corrupt[(layer, "k")][0].to(f)
    mask = cache.mask[layer][0].to(f)  # [1|H, T, T]
    scale = cache.scale[layer]
    gp = g[(layer, "pattern")][0].to(f)  # [H, T, T]
    rep = dm.n_heads // dm.n_kv_heads
    t_len = cache.n_tokens

    def pattern(qh: torch.Tensor, kh: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        return torch.softmax(qh @ kh.transpose(-1, -2) * scale + m, dim=-1)

    m_h = [mask[min(h, mask.shape[0] - 1)] for h in range(dm.n_heads)]
    base = [pattern(q[h], kr[h], m_h[h]) for h in range(dm.n_heads)]
    queries = torch.zeros(t_len, dm.n_heads, dtype=f)
    keys = torch.zeros(t_len, dm.n_heads, dtype=f)
    group_keys = torch.zeros(t_len, dm.n_kv_heads, dtype=f)
    for h in range(dm.n_heads):
        for t in range(t_len):  # one query node at a time: only row t changes
            row = pattern(qn[h, t:t + 1], kr[h], m_h[h][t:t + 1])[0]
            queries[t, h] = ((row - base[h][t]) * gp[h, t]).sum()
        for s in range(t_len):  # one key node at a time: whole re-softmax
            k_mod = kr[h].clone()
            k_mod[s] = krn[h, s]
            keys[s, h] = ((pattern(q[h], k_mod, m_h[h]) - base[h]) * gp[h]).sum()
    queries_all = torch.stack([((pattern(qn[h], kr[h], m_h[h]) - base[h]) * gp[h]).sum()
                               for h in range(dm.n_heads)])
    keys_all = torch.stack([((pattern(q[h], krn[h], m_h[h]) - base[h]) * gp[h]).sum() for h in range(dm.n_heads)])
    group_keys_all = torch.stack([
        sum(((pattern(q[h], kgn[grp], m_h[h]) - base[h]) * gp[h]).sum() for h in range(grp * rep, (grp + 1) * rep))
        for grp in range(dm.n_kv_heads)])
    for grp in range(dm.n_kv_heads):
        for s in range(t_len):
            k_mod = kg[grp].clone()
            k_mod[s] = kgn[grp, s]
            tot = torch.zeros((), dtype=f)
            for h in range(grp * rep, (grp + 1) * rep):
                tot = tot + ((pattern(q[h], k_mod, m_h[h]) - base[h]) * gp[h]).sum()
            group_keys[s, grp] = tot
    return {"queries": queries, "keys": keys, "group_keys": group_keys, "queries_all": queries_all,
            "keys_all": keys_all, "group_keys_all": group_keys_all}


# ---------------------------------------------------------------------------------------------- GradDrop
def _terms(mode: str, n_layers: int) -> list[list[tuple[int, str]]]:
    if mode == "layer":
        return [[(l, "attn_out"), (l, "mlp_out")] for l in range(n_layers)]
    if mode == "sublayer":
        return [[(l, s)] for l in range(n_layers) for s in ("attn_out", "mlp_out")]
    raise ValueError(f"GradDrop mode must be 'layer' or 'sublayer', not {mode!r}")


def graddrop_grads(model, tok, pair: dict, metric_fn: MetricFn, mode: str = "layer",
                   method: str = "hook") -> tuple[PairCache, list[dict]]:
    """Clean-run gradients of every site with one GradDrop term's block writes cut, for every term."""
    terms = _terms(mode, dims(model).n_layers)
    with _installed(model) as ref:
        clean_ids, corrupt, corrupt_metric, acts, metric = _corrupt_and_clean(ref, model, tok, pair, metric_fn)
        grads = []
        if method == "hook":
            for term in terms:
                hs = [acts[key].register_hook(lambda g: torch.zeros_like(g)) for key in term]
                g = _grads(metric, acts, retain=True)
                for key in term:  # autograd.grad captures a tensor's own gradient before its hook runs
                    g[key] = torch.zeros_like(g[key])
                grads.append(g)
                for hd in hs:
                    hd.remove()
        elif method == "function":
            for term in terms:
                ref.drops = set(term)
                with torch.enable_grad():
                    m = metric_fn(_run(ref, clean_ids, True), pair)
                grads.append(_grads(m, dict(ref.record), retain=False))
                ref.drops = set()
        else:
            raise ValueError(f"method must be 'hook' or 'function', not {method!r}")
        plain = _grads(metric, acts, retain=False)
        cache = PairCache({k: v.detach() for k, v in acts.items()}, corrupt, plain, dict(ref.mask),
                          dict(ref.scale), float(metric.detach()), corrupt_metric, ref.dims, clean_ids.shape[1])
    return cache, grads


def graddrop_reference(model, tok, pair: dict, metric_fn: MetricFn, mode: str = "layer", qk_fix: bool = False,
                       kinds: Sequence[str] = KINDS) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Per-term GradDrop estimates [n_terms, L, T, U] and the score sum_terms |estimate| / (n_terms - 1)."""
    cache, grads = graddrop_grads(model, tok, pair, metric_fn, mode, "hook")
    per_term: dict[str, list[torch.Tensor]] = {k: [] for k in kinds}
    for g in grads:
        est = atp_from_cache(cache, kinds, grad=g)
        if qk_fix:
            fixed = [qk_fix_reference(cache, l, grad=g) for l in range(cache.dims.n_layers)]
            for kind in ("queries", "keys", "group_keys"):
                if kind in est:
                    est[kind] = torch.stack([fx[kind] for fx in fixed]).to(est[kind].dtype)
        for k in kinds:
            per_term[k].append(est[k])
    terms = {k: torch.stack(v) for k, v in per_term.items()}
    n = len(grads)
    score = {k: v.abs().sum(0) / (n - 1) for k, v in terms.items()}
    return terms, score
