"""AtP* QK fix (pure torch): exact softmax for a patched query or key, linearised after the attention pattern.

Notation (one pair batch, per head): a_ts = scale * q_t . k_s + mask_ts, A = softmax_s(a), G = dM/dA at the clean
run, `~` = corrupt-run value. Shapes: B batch, H query heads, Hkv KV groups, T query positions, S key positions,
d head dim. Keys and values must already be expanded per query head (repeat_kv) when passed here.

    query_fix(q, q_corrupt, k, grad_pattern, scale, mask=None) -> [B, H, T]
        estimate for patching query q_t alone: sum_s (A'_ts - A_ts) G_ts, A'_t = softmax_s(a with ~q_t).
    key_fix(q, k, k_corrupt, grad_pattern, scale, mask=None) -> [B, H, S]
        estimate for patching key k_s alone (one head's view of it), closed form of atp-star.md section 3:
        delta_ts = scale q_t.(~k_s - k_s), A'_ts = sigmoid(logit(A_ts) + delta_ts),
        e_ts = (A'_ts - A_ts) (G_ts - sum_{r!=s} A_tr G_tr / (1 - A_ts)), estimate(k_s) = sum_t e_ts.
        O(T S d + T S) per head instead of O(T S^2) for a re-softmax per key.
    all_keys_fix(q, k, k_corrupt, grad_pattern, scale, mask=None) -> [B, H]
        estimate for patching a head's keys at EVERY position at once (a key node summed over positions):
        sum_ts (softmax(q ~k^T)_ts - A_ts) G_ts. This is not the sum of key_fix over positions (the softmax
        couples the keys); queries do not couple, so a summed query node's estimate is query_fix(...).sum(-1).
        Under GQA reduce with .view(B, Hkv, H // Hkv).sum(-1).
    reduce_groups(x [B, H, T], n_kv_heads) -> [B, Hkv, T]
        sums the query heads that share a KV group (head h reads group h // (H / Hkv), as repeat_kv does):
        the estimate for patching a group's key is the sum of its heads' key estimates, because after the
        pattern everything is linear and each head's pattern only sees its own view of the key.
    visible_mask(mask, t, s) -> bool [B|1, H|1, T, S]   which entries of an additive mask are attended

mask: additive [B|1, 1|H, T, S] with 0 for visible entries and -inf or a very negative value (finfo.min) for
hidden ones; None means causal. Entries below HIDDEN_BELOW (-3e4) count as hidden: their gradient is
ignored (eager attention can give non-zero dM/dA there) and they contribute nothing. Rows with no visible key
(fully padded query rows) contribute nothing. A row with a single visible key cannot change: its terms are 0.

All arithmetic is float64 inside (saturated rows need it); results come back in q's dtype.
The baseline pattern is recomputed from the clean q and k, so a query or key equal to its corrupt value gives
exactly 0; pass the same q, k, scale and mask as the model used (post-rotary q / k).
"""
from __future__ import annotations

import torch

__all__ = ["query_fix", "key_fix", "all_keys_fix", "reduce_groups", "visible_mask", "HIDDEN_BELOW"]

_F = torch.float64
HIDDEN_BELOW = -3.0e4
"""Additive-mask entries below this are hidden: covers -inf and finfo.min of float16 / bfloat16 / float32 /
float64 even after a dtype cast (a float32 finfo.min mask upcast to float64 is not float64's finfo.min)."""


def visible_mask(mask: torch.Tensor | None, t: int, s: int, device: torch.device | None = None) -> torch.Tensor:
    """Boolean [B|1, H|1, T, S]: True where the additive mask lets the query see the key."""
    if mask is None:
        return torch.ones(t, s, dtype=torch.bool, device=device).tril(s - t)[None, None]
    if mask.dtype == torch.bool:
        return mask
    return mask > HIDDEN_BELOW


def _logits(q: torch.Tensor, k: torch.Tensor, scale: float, mask: torch.Tensor | None,
            vis: torch.Tensor) -> torch.Tensor:
    """scale q k^T + mask in float64, -inf where hidden."""
    a = torch.matmul(q.to(_F), k.to(_F).transpose(-1, -2)) * scale
    if mask is not None and mask.dtype != torch.bool:
        a = a + torch.where(vis, mask.to(_F), torch.zeros((), dtype=_F, device=a.device))
    return a.masked_fill(~vis, float("-inf"))


def _softmax(a: torch.Tensor) -> torch.Tensor:
    """Row softmax that returns zeros (not NaN) for rows with no visible entry."""
    empty = torch.isinf(a).all(-1, keepdim=True) & (a < 0).all(-1, keepdim=True)
    return torch.softmax(a.masked_fill(empty, 0.0), dim=-1).masked_fill(empty, 0.0)


def _check(name: str, x: torch.Tensor, ndim: int = 4) -> None:
    if x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(x.shape)}")


def query_fix(q: torch.Tensor, q_corrupt: torch.Tensor, k: torch.Tensor, grad_pattern: torch.Tensor,
              scale: float, mask: torch.Tensor | None = None) -> torch.Tensor:
    """QK-fixed estimate for every query node: [B, H, T] from q, q_corrupt [B,H,T,d], k [B,H,S,d], G [B,H,T,S]."""
    for name, x in (("q", q), ("q_corrupt", q_corrupt), ("k", k), ("grad_pattern", grad_pattern)):
        _check(name, x)
    if q.shape != q_corrupt.shape:
        raise ValueError(f"q and q_corrupt differ in shape: {tuple(q.shape)} vs {tuple(q_corrupt.shape)}")
    t, s = q.shape[-2], k.shape[-2]
    vis = visible_mask(mask, t, s, q.device)
    g = grad_pattern.to(_F).masked_fill(~vis, 0.0)
    a_clean = _softmax(_logits(q, k, scale, mask, vis))
    a_new = _softmax(_logits(q_corrupt, k, scale, mask, vis))
    return ((a_new - a_clean) * g).sum(-1).to(q.dtype)


def _sigmoid_diff(x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """sigmoid(x + delta) - sigmoid(x), computed from the small side so saturated entries keep their precision."""
    hi = torch.sigmoid(-x) - torch.sigmoid(-x - delta)
    lo = torch.sigmoid(x + delta) - torch.sigmoid(x)
    out = torch.where(x > 0, hi, lo)
    return torch.where(torch.isinf(x), torch.zeros_like(out), out)


def key_fix(q: torch.Tensor, k: torch.Tensor, k_corrupt: torch.Tensor, grad_pattern: torch.Tensor,
            scale: float, mask: torch.Tensor | None = None) -> torch.Tensor:
    """QK-fixed estimate for every key node (per query head's view): [B, H, S].

    Stability: for each (t, s) the weights over r != s are taken relative to a shift that is the row maximum
    when s is not the row's arg-max, and the second largest logit when it is, so neither 1 - A_ts nor
    sum_{r!=s} A_tr G_tr is formed by cancellation.
    """
    for name, x in (("q", q), ("k", k), ("k_corrupt", k_corrupt), ("grad_pattern", grad_pattern)):
        _check(name, x)
    if k.shape != k_corrupt.shape:
        raise ValueError(f"k and k_corrupt differ in shape: {tuple(k.shape)} vs {tuple(k_corrupt.shape)}")
    t, s = q.shape[-2], k.shape[-2]
    vis = visible_mask(mask, t, s, q.device)
    a = _logits(q, k, scale, mask, vis)  # [B,H,T,S], -inf where hidden
    vis = torch.broadcast_to(vis, a.shape)
    g = grad_pattern.to(_F).masked_fill(~vis, 0.0)
    delta = torch.matmul(q.to(_F), (k_corrupt.to(_F) - k.to(_F)).transpose(-1, -2)) * scale

    ninf = torch.tensor(float("-inf"), dtype=_F, device=a.device)
    top = a.max(-1, keepdim=True)
    m1, arg = top.values, top.indices  # row max and its position
    is_arg = torch.zeros_like(vis).scatter_(-1, arg, True) & vis
    m2 = a.scatter(-1, arg, ninf.expand(arg.shape)).max(-1, keepdim=True).values  # second largest (-inf if a single key)
    safe = lambda m: torch.where(torch.isinf(m), torch.zeros_like(m), m)  # noqa: E731
    m1s, m2s = safe(m1), safe(m2)

    # Non-arg-max columns: shift by m1. D_ts = sum_{r!=s} e^{a_tr - m1} >= 1, so no cancellation.
    w1 = torch.exp(a - m1s)  # 0 where hidden
    tot_w1 = w1.sum(-1, keepdim=True)
    tot_wg1 = (w1 * g).sum(-1, keepdim=True)
    d_non = tot_w1 - w1
    n_non = tot_wg1 - w1 * g
    # Arg-max column: shift by m2 and drop the arg-max entry explicitly.
    w2 = torch.exp(a - m2s).masked_fill(is_arg, 0.0)
    d_arg = w2.sum(-1, keepdim=True).expand_as(a)
    n_arg = (w2 * g).sum(-1, keepdim=True).expand_as(a)

    d = torch.where(is_arg, d_arg, d_non)
    n = torch.where(is_arg, n_arg, n_non)
    shift = torch.where(is_arg, m2s.expand_as(a), m1s.expand_as(a))
    has_rest = d > 0
    d_safe = torch.where(has_rest, d, torch.ones_like(d))
    # logit(A_ts) = a_ts - log sum_{r!=s} e^{a_tr}; +inf when s is the only visible key.
    logit = torch.where(has_rest, a - (torch.log(d_safe) + shift), torch.full_like(a, float("inf")))
    g_rest = torch.where(has_rest, n / d_safe, torch.zeros_like(n))  # sum_{r!=s} A_tr G_tr / (1 - A_ts)
    diff = _sigmoid_diff(logit, delta)  # A'_ts - A_ts
    e = diff * (g - g_rest)
    e = torch.where(vis & has_rest, e, torch.zeros_like(e))
    return e.sum(-2).to(q.dtype)


def all_keys_fix(q: torch.Tensor, k: torch.Tensor, k_corrupt: torch.Tensor, grad_pattern: torch.Tensor,
                 scale: float, mask: torch.Tensor | None = None) -> torch.Tensor:
    """QK-fixed estimate for patching all of a head's keys at once (summed key node): [B, H]."""
    for name, x in (("q", q), ("k", k), ("k_corrupt", k_corrupt), ("grad_pattern", grad_pattern)):
        _check(name, x)
    if k.shape != k_corrupt.shape:
        raise ValueError(f"k and k_corrupt differ in shape: {tuple(k.shape)} vs {tuple(k_corrupt.shape)}")
    t, s = q.shape[-2], k.shape[-2]
    vis = visible_mask(mask, t, s, q.device)
    g = grad_pattern.to(_F).masked_fill(~vis, 0.0)
    a_clean = _softmax(_logits(q, k, scale, mask, vis))
    a_new = _softmax(_logits(q, k_corrupt, scale, mask, vis))
    return ((a_new - a_clean) * g).sum((-1, -2)).to(q.dtype)


def reduce_groups(x: torch.Tensor, n_kv_heads: int) -> torch.Tensor:
    """Sum per-query-head estimates [B, H, T] over the heads sharing each KV group: [B, Hkv, T]."""
    if x.dim() != 3:
        raise ValueError(f"reduce_groups expects [B, H, T], got shape {tuple(x.shape)}")
    b, h, t = x.shape
    if n_kv_heads <= 0 or h % n_kv_heads:
        raise ValueError(f"{h} query heads cannot be split into {n_kv_heads} KV groups")
    return x.reshape(b, n_kv_heads, h // n_kv_heads, t).sum(2)
