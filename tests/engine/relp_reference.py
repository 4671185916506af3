"""Independent plain-PyTorch reference for Relevance Patching (Jafari, Eberle, Khakzar, Nanda 2025,
arXiv:2508.21258): an explicit forward of a Hugging Face Llama / Qwen2 / GPT-2 / GPT-NeoX model written out from
its weights (no module calls, no hooks, no nnsight), with each LRP rule written into the forward as a detached
coefficient, so that autograd's gradient is the RelP coefficient:

    LN-rule        norm(x) = gain * C x * r.detach() + bias, r = 1 / sqrt(mean((C x)^2) + eps)
    identity rule  act(x) = x * (act(x) / x).detach()          (ratio 0 where x == 0)
    half rule      a * b  = 0.5 * (a * b.detach() + a.detach() * b)
    AH-rule        pattern = softmax(scores).detach()

Written separately from atpdsl.engine.relp (which keeps the model's own forward and edits the graph with hooks);
tests compare the two. Only the rotary cos/sin tables (constants) come from the model's rotary module.

API (one pair at a time, no padding; `pair` has "clean", "corrupt", "answer", "wrong"):

    Rules(norm=True, activation=True, gate=True, attention=False)      which rules are on (all off: plain AtP)
    forward_logits(model, ids [1,T], rules) -> logits [1,T,V]          the explicit forward (for checking it)
    relp_pair(model, tok, pair, rules) -> PairRelp
        .per_position[kind] [L, T, U] estimates (corrupt - clean) . coefficient, summed over a unit's columns
        .summed[kind] [L, U]  (sum over positions), .clean_metric, .corrupt_metric
        kinds: heads, queries, keys, values (per KV group under grouped-query attention), neurons,
        attn, mlp, resid (U = 1 for the last three)
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
import torch_reference as R

__all__ = ["PairRelp", "Rules", "forward_logits", "relp_pair"]


@dataclass(frozen=True)
class Rules:
    norm: bool = True
    activation: bool = True
    gate: bool = True
    attention: bool = False


@dataclass
class PairRelp:
    per_position: dict[str, torch.Tensor]
    summed: dict[str, torch.Tensor]
    clean_metric: float
    corrupt_metric: float


# ------------------------------------------------------------------------------------------- the rules
def _norm(x, weight, bias, eps, rule: bool, centre: bool):
    h = x.float()
    if centre:
        h = h - h.mean(-1, keepdim=True)
    r = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    if rule:
        r = r.detach()
    y = (h * r).to(x.dtype)
    if weight is not None:
        y = y * weight
    return y + bias if bias is not None else y


def _activation(x, name: str, rule: bool):
    if name == "silu":
        y = x * torch.sigmoid(x)
    elif name == "gelu_new":
        y = 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))
    elif name == "gelu":
        y = 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))
    else:
        raise ValueError(f"relp_reference: activation {name!r} not written out")
    if not rule:
        return y
    ratio = torch.where(x == 0, torch.zeros_like(x), y / torch.where(x == 0, torch.ones_like(x), x))
    return x * ratio.detach()


def _product(a, b, rule: bool):
    return 0.5 * (a * b.detach() + a.detach() * b) if rule else a * b


def _attend(q, k, v, scale: float, rule: bool):
    """q [T,H,d], k/v [T,Hkv,d] -> z [T,H,d]; causal softmax (float32), pattern detached under the AH-rule."""
    t, h, _ = q.shape
    rep = h // k.shape[1]
    k = k.repeat_interleave(rep, dim=1)
    v = v.repeat_interleave(rep, dim=1)
    scores = torch.einsum("thd,shd->hts", q, k) * scale
    future = torch.ones(t, t, dtype=torch.bool).triu(1)
    scores = scores.masked_fill(future, torch.finfo(scores.dtype).min)
    pattern = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    if rule:
        pattern = pattern.detach()
    return torch.einsum("hts,shd->thd", pattern, v)


def _rotate(x, cos, sin):
    """Rotary embedding on the first cos.shape[-1] dims of x [T,H,d] (cos/sin [T, rd])."""
    rd = cos.shape[-1]
    xr, xp = x[..., :rd], x[..., rd:]
    half = rd // 2
    rotated = torch.cat([-xr[..., half:], xr[..., :half]], dim=-1)
    return torch.cat([xr * cos[:, None] + rotated * sin[:, None], xp], dim=-1)


# --------------------------------------------------------------------------------------- the forwards
@dataclass
class _Run:
    rules: Rules
    sites: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)

    def site(self, layer: int, name: str, value: torch.Tensor) -> torch.Tensor:
        self.sites[(layer, name)] = value
        return value


def _w(mod):
    return mod.weight.detach(), (mod.bias.detach() if getattr(mod, "bias", None) is not None else None)


def _llama(model, ids, run: _Run):
    cfg, rules = model.config, run.rules
    h_, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // h_
    t = ids.shape[1]
    x = model.model.embed_tokens.weight.detach()[ids[0]].requires_grad_(True)
    cos, sin = model.model.rotary_emb(x[None], torch.arange(t)[None])
    cos, sin = cos[0].detach(), sin[0].detach()
    eps = cfg.rms_norm_eps
    for i, blk in enumerate(model.model.layers):
        at = blk.self_attn
        n = _norm(x, blk.input_layernorm.weight.detach(), None, eps, rules.norm, centre=False)
        q = run.site(i, "queries", F.linear(n, *_w(at.q_proj)).view(t, h_, d))
        k = run.site(i, "keys", F.linear(n, *_w(at.k_proj)).view(t, kv, d))
        v = run.site(i, "values", F.linear(n, *_w(at.v_proj)).view(t, kv, d))
        z = _attend(_rotate(q, cos, sin), _rotate(k, cos, sin), v, d ** -0.5, rules.attention)
        z = run.site(i, "heads", z)
        x = x + run.site(i, "attn", F.linear(z.reshape(t, h_ * d), *_w(at.o_proj)))
        mlp = blk.mlp
        n = _norm(x, blk.post_attention_layernorm.weight.detach(), None, eps, rules.norm, centre=False)
        gate = _activation(F.linear(n, *_w(mlp.gate_proj)), cfg.hidden_act, rules.activation)
        neurons = run.site(i, "neurons", _product(gate, F.linear(n, *_w(mlp.up_proj)), rules.gate))
        x = run.site(i, "resid", x + run.site(i, "mlp", F.linear(neurons, *_w(mlp.down_proj))))
    x = _norm(x, model.model.norm.weight.detach(), None, eps, rules.norm, centre=False)
    return F.linear(x, model.lm_head.weight.detach())


def _gpt2(model, ids, run: _Run):
    cfg, rules, tr = model.config, run.rules, model.transformer
    h_, d = cfg.n_head, cfg.n_embd // cfg.n_head
    t = ids.shape[1]
    x = (tr.wte.weight.detach()[ids[0]] + tr.wpe.weight.detach()[:t]).requires_grad_(True)
    eps = cfg.layer_norm_epsilon
    for i, blk in enumerate(tr.h):
        n = _norm(x, *_w(blk.ln_1), eps, rules.norm, centre=True)
        qkv = n @ blk.attn.c_attn.weight.detach() + blk.attn.c_attn.bias.detach()
        q, k, v = (run.site(i, name, part.view(t, h_, d))
                   for name, part in zip(("queries", "keys", "values"), qkv.split(cfg.n_embd, dim=-1)))
        scale = (d ** -0.5 if cfg.scale_attn_weights else 1.0) / ((i + 1) if cfg.scale_attn_by_inverse_layer_idx else 1)
        z = run.site(i, "heads", _attend(q, k, v, scale, rules.attention))
        x = x + run.site(i, "attn", z.reshape(t, -1) @ blk.attn.c_proj.weight.detach() + blk.attn.c_proj.bias.detach())
        n = _norm(x, *_w(blk.ln_2), eps, rules.norm, centre=True)
        pre = n @ blk.mlp.c_fc.weight.detach() + blk.mlp.c_fc.bias.detach()
        neurons = run.site(i, "neurons", _activation(pre, cfg.activation_function, rules.activation))
        m = neurons @ blk.mlp.c_proj.weight.detach() + blk.mlp.c_proj.bias.detach()
        x = run.site(i, "resid", x + run.site(i, "mlp", m))
    x = _norm(x, *_w(tr.ln_f), eps, rules.norm, centre=True)
    return x @ model.lm_head.weight.detach().T


def _neox_mlp(blk, n, i, cfg, run):
    pre = F.linear(n, *_w(blk.mlp.dense_h_to_4h))
    neurons = run.site(i, "neurons", _activation(pre, cfg.hidden_act, run.rules.activation))
    return run.site(i, "mlp", F.linear(neurons, *_w(blk.mlp.dense_4h_to_h)))


def _neox(model, ids, run: _Run):
    cfg, rules, nx = model.config, run.rules, model.gpt_neox
    h_, d = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
    t = ids.shape[1]
    x = nx.embed_in.weight.detach()[ids[0]].requires_grad_(True)
    cos, sin = nx.rotary_emb(x[None], torch.arange(t)[None])
    cos, sin = cos[0].detach(), sin[0].detach()
    eps = cfg.layer_norm_eps
    for i, blk in enumerate(nx.layers):
        n = _norm(x, *_w(blk.input_layernorm), eps, rules.norm, centre=True)
        qkv = F.linear(n, *_w(blk.attention.query_key_value)).view(t, h_, 3 * d)
        q, k, v = (run.site(i, name, qkv[..., j * d:(j + 1) * d])
                   for j, name in enumerate(("queries", "keys", "values")))
        z = run.site(i, "heads", _attend(_rotate(q, cos, sin), _rotate(k, cos, sin), v, d ** -0.5, rules.attention))
        attn = run.site(i, "attn", F.linear(z.reshape(t, -1), *_w(blk.attention.dense)))
        if cfg.use_parallel_residual:
            m = _neox_mlp(blk, _norm(x, *_w(blk.post_attention_layernorm), eps, rules.norm, centre=True), i, cfg, run)
            x = run.site(i, "resid", x + attn + m)
        else:
            h = x + attn
            m = _neox_mlp(blk, _norm(h, *_w(blk.post_attention_layernorm), eps, rules.norm, centre=True), i, cfg, run)
            x = run.site(i, "resid", h + m)
    x = _norm(x, *_w(nx.final_layer_norm), eps, rules.norm, centre=True)
    return F.linear(x, model.get_output_embeddings().weight.detach())


FORWARDS = {"llama": _llama, "qwen2": _llama, "mistral": _llama, "gpt2": _gpt2, "gpt_neox": _neox}


def _forward(model, ids, rules: Rules) -> tuple[torch.Tensor, _Run]:
    run = _Run(rules)
    return FORWARDS[model.config.model_type](model, ids, run)[None], run


def forward_logits(model, ids: torch.Tensor, rules: Rules = Rules()) -> torch.Tensor:
    """The explicit forward's logits [1, T, V]."""
    return _forward(model, ids, rules)[0]


# ------------------------------------------------------------------------------------------ estimates
def _unit_sum(prod: torch.Tensor) -> torch.Tensor:
    """[T, U, d] -> [T, U]; [T, N] neurons stay; [T, D] whole vectors -> [T, 1]."""
    return prod.sum(-1) if prod.dim() == 3 else prod


def relp_pair(model, tok, pair: dict, rules: Rules = Rules()) -> PairRelp:
    """RelP (AtP when every rule is off) estimates of every node of one pair, from the explicit forward."""
    clean_ids, corrupt_ids = R.encode_pair(tok, pair)
    a, b = R.first_token(tok, pair["answer"]), R.first_token(tok, pair["wrong"])
    with torch.no_grad():
        logits_c, corrupt = _forward(model, corrupt_ids, rules)
    logits, clean = _forward(model, clean_ids, rules)
    metric = logits[0, -1, a] - logits[0, -1, b]
    keys = list(clean.sites)
    grads = torch.autograd.grad(metric, [clean.sites[k] for k in keys], allow_unused=True)
    n_layers = model.config.num_hidden_layers
    per: dict[str, list] = {}
    for key, g in zip(keys, grads):
        layer, kind = key
        value = clean.sites[key].detach()
        g = torch.zeros_like(value) if g is None else g
        prod = (corrupt.sites[key] - value) * g
        if kind in ("attn", "mlp", "resid"):
            prod = prod.sum(-1, keepdim=True)
        per.setdefault(kind, [None] * n_layers)[layer] = _unit_sum(prod)
    per_position = {k: torch.stack(v).double() for k, v in per.items()}
    return PairRelp(per_position, {k: v.sum(1) for k, v in per_position.items()}, float(metric.detach()),
                    float(logits_c[0, -1, a] - logits_c[0, -1, b]))
