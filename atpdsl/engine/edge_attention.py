"""One layer's attention, per head and per query, for the edges: how the metric's gradient at a head's output
splits over that head's own query, key and value inputs, and the head's output recomputed from patched inputs.

Notation (one batch row, one head h; post-rotary q, k; A the clean pattern, z_t = sum_s A_ts v_s the head's
output, g_t = dM/dz_t read at the output projection's input, `scale` the attention's own scaling):

    dM/dA_ts   = g_t . v_s                                  (A feeds only z)
    dM/da_ts   = A_ts (dM/dA_ts - sum_r A_tr dM/dA_tr)       (softmax backward; a_ts = scale q_t . k_s + mask)
    value share of query t at key s:  A_ts g_t
    key share of query t at key s:    scale dM/da_ts q_t      (then rotated back to the projection's output)

Summed over queries t these are the gradients at head h's own view of v_s and k_s (under grouped-query attention
the group's gradient is the sum over its heads), so an edge into one head's key or value can be read from one
backward pass. A query t's own share keeps only row t, which is what a per-position head node `L1.H0@t` reads
from earlier positions. Queries need no split: q_t feeds only head h at query t.
"""
from __future__ import annotations

import torch

from atpdsl.engine.corrections.shared import heads_view
from atpdsl.engine.rotary import Rotate

__all__ = ["Rotate", "expand_groups", "unrotate", "rotate_queries", "AttnSplit", "visible", "head_outputs",
           "pick_rows"]



def expand_groups(x: torch.Tensor, rep: int) -> torch.Tensor:
    """[b, Hkv, S, d] -> [b, H, S, d]: each KV group's vectors repeated for its heads (as repeat_kv does)."""
    return x if rep == 1 else x.repeat_interleave(rep, dim=1)


def rotate_queries(rotate: Rotate | None, q: torch.Tensor, tables: tuple[torch.Tensor, torch.Tensor] | None
                   ) -> torch.Tensor:
    """Pre-rotary per-head vectors [b, n, S, d] rotated as the model rotates its queries (identity without rotary)."""
    if rotate is None or tables is None:
        return q
    return rotate(q, q, *tables)[0]


def unrotate(rotate: Rotate | None, grad: torch.Tensor, tables: tuple[torch.Tensor, torch.Tensor] | None
             ) -> torch.Tensor:
    """A gradient at post-rotary keys [b, n, S, d] taken back to the key projection's output: the rotation's
    transpose, which is the rotation by the opposite angles (the model's own rotation with the second table
    negated) when that inverts it on this gradient, else autograd through the model's own rotation."""
    if rotate is None or tables is None:
        return grad
    first, second = tables
    back = rotate(grad, grad, first, -second)[0]
    if torch.allclose(rotate(back, back, first, second)[0], grad, rtol=1e-5, atol=1e-6 * float(grad.abs().max())):
        return back
    k = torch.zeros_like(grad, requires_grad=True)
    with torch.enable_grad():
        _, rotated = rotate(k.detach(), k, *tables)
        (back,) = torch.autograd.grad(rotated, k, grad)
    return back


def pick_rows(x: torch.Tensor, heads: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """x [b, H, S, ...] at (head heads[i], position rows[:, i]) for each i: [b, n, ...]."""
    b = x.shape[0]
    bi = torch.arange(b, device=x.device).unsqueeze(1)
    return x[bi, heads.unsqueeze(0).expand(b, -1), rows]


class AttnSplit:
    """The gradient shares of one layer's heads (see the module docstring), for one batch and gradient pass.

    `pattern` [b, H, S, S] is the model's own attention pattern, `v` [b, H, S, d] each head's values,
    `grad_z` [b, H, S, d] the gradient at each head's output, `q_post` [b, H, S, d] the rotated queries.
    Arithmetic in float64 (saturated rows keep their precision); results in float32 or wider.
    """

    def __init__(self, pattern: torch.Tensor, v: torch.Tensor, grad_z: torch.Tensor, q_post: torch.Tensor,
                 scale: float, rotate: Rotate | None, tables: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        f = torch.float64
        self.out_dtype = torch.promote_types(pattern.dtype, torch.float32)
        self.pattern = pattern.to(f)
        self.grad_z = grad_z.to(f)
        self.q = q_post.to(f)
        d_pattern = self.grad_z @ v.to(f).transpose(-1, -2)
        self.d_logits = self.pattern * (d_pattern - (self.pattern * d_pattern).sum(-1, keepdim=True))
        self.scale = float(scale)
        self.rotate, self.tables = rotate, tables

    def _keys_back(self, grad_post: torch.Tensor) -> torch.Tensor:
        tables = None if self.tables is None else tuple(t.to(torch.float64) for t in self.tables)
        return unrotate(self.rotate, grad_post, tables).to(self.out_dtype)

    def values(self) -> torch.Tensor:
        """[b, H, S, d]: each head's gradient at its own values, summed over its queries."""
        return (self.pattern.transpose(-1, -2) @ self.grad_z).to(self.out_dtype)

    def keys(self) -> torch.Tensor:
        """[b, H, S, d]: each head's gradient at its own keys (pre-rotary), summed over its queries."""
        return self._keys_back(self.scale * (self.d_logits.transpose(-1, -2) @ self.q))

    def values_at(self, heads: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """[b, n, S, d]: head heads[i]'s gradient at its values through query rows[:, i] only."""
        a = pick_rows(self.pattern, heads, rows)  # [b, n, S]
        g = pick_rows(self.grad_z, heads, rows)  # [b, n, d]
        return (a.unsqueeze(-1) * g.unsqueeze(-2)).to(self.out_dtype)

    def keys_at(self, heads: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """[b, n, S, d]: head heads[i]'s gradient at its keys (pre-rotary) through query rows[:, i] only."""
        da = pick_rows(self.d_logits, heads, rows)  # [b, n, S]
        q = pick_rows(self.q, heads, rows)  # [b, n, d]
        return self._keys_back(self.scale * da.unsqueeze(-1) * q.unsqueeze(-2))


def visible(attention_mask: torch.Tensor) -> torch.Tensor:
    """Bool [b, 1, S, S]: causal and not padding (the batch's left-padding mask)."""
    am = attention_mask.bool()
    s = am.shape[1]
    causal = torch.ones(s, s, dtype=torch.bool, device=am.device).tril()
    return causal[None, None] & am[:, None, None, :]


def head_outputs(q_post: torch.Tensor, k_post: torch.Tensor, v: torch.Tensor, scale: float,
                 seen: torch.Tensor) -> torch.Tensor:
    """Eager attention recomputed in float64: z [b, n, S, d] from per-head q, k, v [b, n, S, d] and the visibility
    mask [b, 1, S, S] (query rows that see nothing give 0)."""
    f = torch.float64
    logits = (q_post.to(f) @ k_post.to(f).transpose(-1, -2)) * scale
    logits = logits.masked_fill(~seen, float("-inf"))
    empty = ~seen.any(-1, keepdim=True)
    pattern = torch.softmax(logits.masked_fill(empty, 0.0), dim=-1).masked_fill(empty, 0.0)
    return pattern @ v.to(f)


def per_head(x: torch.Tensor, layout) -> torch.Tensor:
    """[b, S, W] projection output -> [b, units, S, d] (the layout's per-head slices)."""
    return heads_view(x, layout)
