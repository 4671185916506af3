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
    QKFix(q, k, scale, mask, q_corrupt=, k_corrupt=)     the gradient-independent part, built once per layer
        .queries(G) / .keys(G) / .all_keys(G)          = the three fixes above for one G (GradDrop: one per term)
        .query_outputs(v) / .key_outputs(v, keys) / .all_keys_outputs(v)
                                                       the exact change of each head's output z = A v for the
                                                       same patches (the norm fix turns them into writes)

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

__all__ = ["QKFix", "query_fix", "key_fix", "all_keys_fix", "reduce_groups", "visible_mask", "HIDDEN_BELOW"]

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


class QKFix:
    """The gradient-independent part of the QK fix for one layer and batch, in float64.

    Everything but G = dM/dA is fixed per layer and batch: the clean and patched patterns, and for single keys
    the sigmoid step and the stable weights over the other keys. Build it once, then each gradient (the plain
    one and every GradDrop term's) costs a few elementwise products: `queries(G)`, `keys(G)` and
    `all_keys(G)` return exactly what `query_fix`, `key_fix` and `all_keys_fix` return for that G.
    Pass `q_corrupt` for the query fix and `k_corrupt` for the key fixes; `per_key` / `all_keys` choose which
    key fixes to prepare.
    """

    def __init__(self, q: torch.Tensor, k: torch.Tensor, scale: float, mask: torch.Tensor | None = None, *,
                 q_corrupt: torch.Tensor | None = None, k_corrupt: torch.Tensor | None = None,
                 per_key: bool = True, all_keys: bool = True) -> None:
        for name, x in (("q", q), ("k", k), ("q_corrupt", q_corrupt), ("k_corrupt", k_corrupt)):
            if x is not None:
                _check(name, x)
        if q_corrupt is not None and q.shape != q_corrupt.shape:
            raise ValueError(f"q and q_corrupt differ in shape: {tuple(q.shape)} vs {tuple(q_corrupt.shape)}")
        if k_corrupt is not None and k.shape != k_corrupt.shape:
            raise ValueError(f"k and k_corrupt differ in shape: {tuple(k.shape)} vs {tuple(k_corrupt.shape)}")
        self.dtype = q.dtype
        t, s = q.shape[-2], k.shape[-2]
        self.vis = vis = visible_mask(mask, t, s, q.device)
        hidden = ~vis
        self._empty = ~vis.any(-1, keepdim=True)  # query rows that see no key
        a = _logits(q, k, scale, mask, vis)  # [B,H,T,S], -inf where hidden
        top = a.max(-1, keepdim=True)
        m1 = top.values.masked_fill(self._empty, 0.0)  # row max (0 for empty rows)
        w1 = torch.exp(a - m1)  # 0 where hidden
        tot_w1 = w1.sum(-1, keepdim=True)
        self.pattern = self._normalise(w1, tot_w1)  # the clean pattern A
        self.d_query = self.d_all_keys = self.key = None
        if q_corrupt is not None:
            self.d_query = self._softmax(_logits(q_corrupt, k, scale, mask, vis)) - self.pattern
        if k_corrupt is not None and all_keys:
            self.d_all_keys = self._softmax(_logits(q, k_corrupt, scale, mask, vis)) - self.pattern
        if k_corrupt is not None and per_key:
            self.key = self._prepare_keys(q, k, k_corrupt, scale, a, vis, hidden, top.indices, m1, w1, tot_w1)

    def _normalise(self, w: torch.Tensor, tot: torch.Tensor) -> torch.Tensor:
        return (w / tot.masked_fill(self._empty, 1.0)).masked_fill(self._empty, 0.0)

    def _softmax(self, a: torch.Tensor) -> torch.Tensor:
        """Row softmax with zeros (not NaN) for rows that see no key."""
        w = torch.exp(a - a.max(-1, keepdim=True).values.masked_fill(self._empty, 0.0))
        return self._normalise(w, w.sum(-1, keepdim=True))

    @staticmethod
    def _prepare_keys(q, k, k_corrupt, scale, a, vis, hidden, arg, m1, w1, tot_w1):
        """Stability: for each (t, s) the weights over r != s are taken relative to a shift that is the row
        maximum when s is not the row's arg-max, and the second largest logit when it is, so neither 1 - A_ts
        nor sum_{r!=s} A_tr G_tr is formed by cancellation."""
        delta = torch.matmul(q.to(_F), (k_corrupt.to(_F) - k.to(_F)).transpose(-1, -2)) * scale
        vis = torch.broadcast_to(vis, a.shape)
        is_arg = torch.zeros_like(vis).scatter_(-1, arg, True) & vis
        m2 = a.masked_fill(is_arg, float("-inf")).max(-1, keepdim=True).values  # second largest (-inf if alone)
        m2 = m2.masked_fill(torch.isinf(m2), 0.0)
        # Non-arg-max columns: shift by m1 (the row max). D_ts = sum_{r!=s} e^{a_tr - m1} >= 1: no cancellation.
        # Arg-max column: shift by m2 and drop the arg-max entry explicitly.
        w2 = torch.exp(a - m2).masked_fill(is_arg, 0.0)
        d = torch.where(is_arg, w2.sum(-1, keepdim=True), tot_w1 - w1)
        shift = torch.where(is_arg, m2, m1)
        no_rest = d <= 0  # s is the row's only visible key (or hidden)
        d_safe = d.masked_fill(no_rest, 1.0)
        # logit(A_ts) = a_ts - log sum_{r!=s} e^{a_tr}
        logit = a - (torch.log(d_safe) + shift)
        diff = _sigmoid_diff(logit, delta).masked_fill(no_rest | hidden, 0.0)  # A'_ts - A_ts
        inv_d = d_safe.reciprocal().masked_fill(no_rest, 0.0)
        return w1, w2, is_arg, inv_d, diff

    def _grad(self, grad_pattern: torch.Tensor) -> torch.Tensor:
        _check("grad_pattern", grad_pattern)
        return grad_pattern.to(_F).masked_fill(~self.vis, 0.0)

    def queries(self, grad_pattern: torch.Tensor) -> torch.Tensor:
        """= query_fix: [B, H, T]."""
        if self.d_query is None:
            raise ValueError("QKFix was built without q_corrupt")
        return (self.d_query * self._grad(grad_pattern)).sum(-1).to(self.dtype)

    def keys(self, grad_pattern: torch.Tensor) -> torch.Tensor:
        """= key_fix: [B, H, S]."""
        if self.key is None:
            raise ValueError("QKFix was built without k_corrupt (or with per_key=False)")
        w1, w2, is_arg, inv_d, diff = self.key
        g = self._grad(grad_pattern)
        wg = w1 * g
        n_non = wg.sum(-1, keepdim=True) - wg
        n_arg = (w2 * g).sum(-1, keepdim=True)
        g_rest = torch.where(is_arg, n_arg, n_non) * inv_d  # sum_{r!=s} A_tr G_tr / (1 - A_ts)
        return (diff * (g - g_rest)).sum(-2).to(self.dtype)

    def all_keys(self, grad_pattern: torch.Tensor) -> torch.Tensor:
        """= all_keys_fix: [B, H]."""
        if self.d_all_keys is None:
            raise ValueError("QKFix was built without k_corrupt (or with all_keys=False)")
        return (self.d_all_keys * self._grad(grad_pattern)).sum((-1, -2)).to(self.dtype)

    # ------------------------------------------------------------ head-output changes (for the norm fix)
    def query_outputs(self, v: torch.Tensor) -> torch.Tensor:
        """Change of each head's output z_t = sum_s A_ts v_s when query q_t alone is patched: [B, H, T, d]
        (rows do not couple, so this is also every row's change when all queries are patched at once)."""
        if self.d_query is None:
            raise ValueError("QKFix was built without q_corrupt")
        return torch.matmul(self.d_query, v.to(_F)).to(self.dtype)

    def all_keys_outputs(self, v: torch.Tensor) -> torch.Tensor:
        """Change of z_t when every key of the head is patched at once: [B, H, T, d]."""
        if self.d_all_keys is None:
            raise ValueError("QKFix was built without k_corrupt (or with all_keys=False)")
        return torch.matmul(self.d_all_keys, v.to(_F)).to(self.dtype)

    def key_outputs(self, v: torch.Tensor, keys: torch.Tensor, first_row: int = 0) -> torch.Tensor:
        """Change of z_t when key k_s alone is patched, for the key positions `keys` and the query rows from
        `first_row` on (earlier rows cannot see them): [B, H, T - first_row, len(keys), d].

        Patching k_s moves A_ts by diff_ts and rescales the rest of row t, so
        z'_t - z_t = diff_ts (v_s - sum_{r!=s} A_tr v_r / (1 - A_ts)), with the same stable weights as `keys`."""
        if self.key is None:
            raise ValueError("QKFix was built without k_corrupt (or with per_key=False)")
        w1_all, w2_all, is_arg, inv_d, diff = (x[:, :, first_row:] for x in self.key)
        w1, is_arg, inv_d, diff = (x[..., keys] for x in (w1_all, is_arg, inv_d, diff))
        v = v.to(_F)
        vs = v[:, :, keys].unsqueeze(2)  # [B, H, 1, S', d]
        n_non = torch.matmul(w1_all, v).unsqueeze(3) - w1.unsqueeze(-1) * vs  # sum_{r!=s} w1_tr v_r
        n_arg = torch.matmul(w2_all, v).unsqueeze(3)  # sum_r w2_tr v_r (the arg-max column is 0 in w2)
        rest = torch.where(is_arg.unsqueeze(-1), n_arg, n_non) * inv_d.unsqueeze(-1)
        return (diff.unsqueeze(-1) * (vs - rest)).to(self.dtype)


def query_fix(q: torch.Tensor, q_corrupt: torch.Tensor, k: torch.Tensor, grad_pattern: torch.Tensor,
              scale: float, mask: torch.Tensor | None = None) -> torch.Tensor:
    """QK-fixed estimate for every query node: [B, H, T] from q, q_corrupt [B,H,T,d], k [B,H,S,d], G [B,H,T,S]."""
    _check("grad_pattern", grad_pattern)
    return QKFix(q, k, scale, mask, q_corrupt=q_corrupt).queries(grad_pattern)


def _sigmoid_diff(x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """sigmoid(x + delta) - sigmoid(x), computed from the small side so saturated entries keep their precision."""
    hi = torch.sigmoid(-x) - torch.sigmoid(-x - delta)
    lo = torch.sigmoid(x + delta) - torch.sigmoid(x)
    out = torch.where(x > 0, hi, lo)
    return torch.where(torch.isinf(x), torch.zeros_like(out), out)


def key_fix(q: torch.Tensor, k: torch.Tensor, k_corrupt: torch.Tensor, grad_pattern: torch.Tensor,
            scale: float, mask: torch.Tensor | None = None) -> torch.Tensor:
    """QK-fixed estimate for every key node (per query head's view): [B, H, S] (see QKFix._prepare_keys)."""
    _check("grad_pattern", grad_pattern)
    return QKFix(q, k, scale, mask, k_corrupt=k_corrupt, all_keys=False).keys(grad_pattern)


def all_keys_fix(q: torch.Tensor, k: torch.Tensor, k_corrupt: torch.Tensor, grad_pattern: torch.Tensor,
                 scale: float, mask: torch.Tensor | None = None) -> torch.Tensor:
    """QK-fixed estimate for patching all of a head's keys at once (summed key node): [B, H]."""
    _check("grad_pattern", grad_pattern)
    return QKFix(q, k, scale, mask, k_corrupt=k_corrupt, per_key=False).all_keys(grad_pattern)


def reduce_groups(x: torch.Tensor, n_kv_heads: int) -> torch.Tensor:
    """Sum per-query-head estimates [B, H, T] over the heads sharing each KV group: [B, Hkv, T]."""
    if x.dim() != 3:
        raise ValueError(f"reduce_groups expects [B, H, T], got shape {tuple(x.shape)}")
    b, h, t = x.shape
    if n_kv_heads <= 0 or h % n_kv_heads:
        raise ValueError(f"{h} query heads cannot be split into {n_kv_heads} KV groups")
    return x.reshape(b, n_kv_heads, h // n_kv_heads, t).sum(2)
