"""Norm fix (an atpdsl extension to AtP*, not in the paper): exact normalisation of a node's own write.

Why: in a pre-norm transformer every block reads the residual stream through a LayerNorm / RMSNorm, which
divides by the stream's scale. When one node's write is a large part of the stream at its position, patching
it changes that scale, and the norm's local slope is a poor guide: on stories260K the layer-0 neuron L0.N64 at
the changed word writes a vector nearly opposite to the stream there (cosine about -0.95); AtP estimates -0.03 for a patch whose exact effect is -0.63, and GradDrop cannot help because
this is curvature, not cancellation (benchmarks/bench_atp_star.py, section 5, prints the curve and the cosine).

What: as the QK fix makes the softmax exact and linearises only what comes after the pattern, the norm fix
makes every norm that reads the node's write exact and linearises only what comes after the norm. A node
writes D[t] (a d-vector) into the residual stream at position t; reader j (a block's input norm, or the
final norm) reads the clean stream r_j[t] there and its output has gradient h_j[t] = dM/d(norm_j output).

    plain AtP:  sum_j sum_t h_j[t] . J_j(r_j[t]) D[t]            (J = the norm's Jacobian; equals D . dM/dD)
    norm fix:   sum_j sum_t h_j[t] . (norm_j(r_j[t] + D[t]) - norm_j(r_j[t]))

Both sum over the readers after the write, in forward order. The two agree as D -> 0; the norm fix is exact
for a node whose write reaches the metric only through the final norm (e.g. a last-layer neuron: the logits
are linear in the final norm's output). Writes (linear in the node's change, so exact): a neuron's change
times its down-projection column, a head's z change through its slice of the output projection, a value's
change through the clean pattern and the output projection of each head that reads it (at every later query
position), the whole change for `attn`, `mlp` and `resid` nodes; with the QK fix, a query's or key's exact
change of its heads' outputs (the patched pattern times the clean values) through the output projection.
Without the QK fix, queries and keys keep their plain estimates.

Closed form, per norm: with c(x) = x - mean(x) (LayerNorm) or x (RMSNorm), g the gain, eps the epsilon,
n(x) = g * c(x) / sqrt(mean(c(x)^2) + eps) + bias. For a write D:

    h . (n(r + D) - n(r)) = A_r (s1 - s0) + A_D s1,    A_r = (h*g).c(r),  A_D = (h*g).c(D),
    s = (mean(c(.)^2) + eps)^-1/2 before (s0) and after (s1),  s1 - s0 = (m0 - m1) s0 s1 / (1/s0 + 1/s1)

with m1 - m0 = (2 c(r).c(D) + |c(D)|^2) / d, which stays accurate when D is small. For neurons D = delta * w
with a fixed column w per neuron, so every dot product is one matmul against the down-projection: the fix
costs a few matmuls per (neuron layer, later reader) and never builds a [neurons, d] tensor.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from atpdsl.errors import EngineError
from atpdsl.engine.node_table import Block
from atpdsl.engine.qkfix import QKFix

__all__ = ["NormMap", "NormReader", "NormBlock", "norm_map", "stack_norms", "write_change", "center_columns",
           "rank1_change", "norm_inputs"]


@dataclass(frozen=True, slots=True)
class NormMap:
    """Norms in closed form: centered (LayerNorm) or not (RMSNorm), gain, bias, epsilon. One norm has gain [d] and
    a float eps; `stack_norms` gives several readers at once (gain [R, 1, 1, d], eps [R, 1, 1, 1])."""

    centered: bool
    gain: torch.Tensor
    bias: torch.Tensor | None
    eps: float | torch.Tensor

    def center(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        return x - x.mean(dim, keepdim=True) if self.centered else x

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The norm's output (to check against the model's own on the first batch)."""
        c = self.center(x)
        out = self.gain * c * torch.rsqrt(c.pow(2).mean(-1, keepdim=True) + self.eps)
        return out + self.bias if self.bias is not None else out


def norm_map(module: torch.nn.Module, dtype: torch.dtype = torch.float32) -> NormMap:
    """The closed form of a norm module: torch LayerNorm, Llama-style RMSNorm (`variance_epsilon`), or Gemma's
    RMSNorm (gain 1 + weight). Anything else is an EngineError that names the class."""
    name = type(module).__name__
    if isinstance(module, torch.nn.LayerNorm):
        if module.weight is None:
            gain = torch.ones(module.normalized_shape, dtype=dtype)
        else:
            gain = module.weight.detach().to(dtype)
        bias = module.bias.detach().to(dtype) if module.bias is not None else None
        return NormMap(True, gain, bias, float(module.eps))
    weight = getattr(module, "weight", None)
    if weight is not None and hasattr(module, "variance_epsilon"):
        return NormMap(False, weight.detach().to(dtype), None, float(module.variance_epsilon))
    if weight is not None and name.startswith("Gemma") and hasattr(module, "eps"):
        return NormMap(False, 1.0 + weight.detach().to(dtype), None, float(module.eps))
    raise EngineError(f"norm fix: cannot model the norm {name} (supported: LayerNorm, RMSNorm); use `norm_fix off`")


def stack_norms(norms: list[NormMap]) -> NormMap:
    """Several readers' norms, to broadcast against [R, b, S, d] stacks (all centered or none)."""
    if len({n.centered for n in norms}) > 1:
        raise EngineError("norm fix: a model mixes LayerNorm and RMSNorm readers; use `norm_fix off`")
    gain = torch.stack([n.gain for n in norms])[:, None, None, :]
    eps = torch.tensor([float(n.eps) for n in norms], dtype=gain.dtype, device=gain.device)[:, None, None, None]
    return NormMap(norms[0].centered, gain, None, eps)


def _combine(norm: NormMap, rr: torch.Tensor, a_r: torch.Tensor, r_d: torch.Tensor, dd: torch.Tensor,
             a_d: torch.Tensor, d: int) -> torch.Tensor:
    """h . (n(r + D) - n(r)) from the dot products (shapes broadcast: rr, a_r [..., 1]; the rest [..., U]).

    With q = m1 - m0 and roots R0, R1 of m0 + eps, m1 + eps:
    A_r (s1 - s0) + A_D s1 = (A_D - A_r q / (R0 (R0 + R1))) / R1, computed in place on the [..., U] tensors."""
    root0 = torch.sqrt(rr / d + norm.eps)  # [..., 1]
    q = r_d.mul_(2.0).add_(dd).div_(d)  # m1 - m0 (reuses r_d)
    root1 = (q + root0.square()).clamp_min_(1e-30).sqrt_()
    denom = (root1 + root0).mul_(root0)
    return q.mul_(a_r).div_(denom).neg_().add_(a_d).div_(root1)


def write_change(norm: NormMap, r: torch.Tensor, h: torch.Tensor, writes: torch.Tensor,
                 sum_readers: bool = True) -> torch.Tensor:
    """Per-unit h . (n(r + D_u) - n(r)) for explicit writes, summed over the leading reader dimension if any
    (kept, [R, b, S, U], when not `sum_readers`).

    r, h: [b, S, d] or [R, b, S, d] (each reader's clean input and output gradient); writes: [b, S, U, d]
    -> [b, S, U].
    """
    d = r.shape[-1]
    cr = norm.center(r)
    cw = norm.center(writes)
    hg = h * norm.gain
    rr = cr.pow(2).sum(-1, keepdim=True)  # [..., b, S, 1]
    a_r = (hg * cr).sum(-1, keepdim=True)
    r_d = torch.einsum("...bsd,bsud->...bsu", cr, cw)
    dd = cw.pow(2).sum(-1)
    a_d = torch.einsum("...bsd,bsud->...bsu", hg, cw)
    out = _combine(norm, rr, a_r, r_d, dd, a_d, d)
    return out if out.dim() == 3 or not sum_readers else out.sum(0)


def center_columns(norm: NormMap, columns: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(c(w_u) as columns [d, U], |c(w_u)|^2 [U]): what `rank1_change` needs of the fixed write directions."""
    cw = columns - columns.mean(0, keepdim=True) if norm.centered else columns
    return cw, cw.pow(2).sum(0)


def rank1_change(norm: NormMap, r: torch.Tensor, h: torch.Tensor, cw: torch.Tensor, ww: torch.Tensor,
                 delta: torch.Tensor, sum_readers: bool = True) -> torch.Tensor:
    """Per-unit h . (n(r + delta_u w_u) - n(r)) for writes along fixed columns (neurons), summed over the leading
    reader dimension if any (kept, [R, b, S, U], when not `sum_readers`).

    r, h: [b, S, d] or [R, b, S, d]; cw, ww: `center_columns` of the columns w_u [d, U]; delta: [b, S, U]
    -> [b, S, U].
    """
    d = r.shape[-1]
    cr = norm.center(r)
    hg = h * norm.gain
    rr = cr.pow(2).sum(-1, keepdim=True)
    a_r = (hg * cr).sum(-1, keepdim=True)
    both = torch.cat([cr, hg], dim=-3) @ cw  # one matmul for c(r).w and (h g).w: [..., 2b, S, U]
    r_w, a_w = both.split(r.shape[-3], dim=-3)
    out = _combine(norm, rr, a_r, delta * r_w, delta.pow(2) * ww, delta * a_w, d)
    return out if out.dim() == 3 or not sum_readers else out.sum(0)


# ------------------------------------------------------------------------------ what the engine feeds in
@dataclass(slots=True)
class NormReader:
    """A norm that reads the residual stream (a block's input norm or the final norm), for the norm fix."""

    name: str
    point: int  # residual point read (edges.Reader.point)
    in_key: str
    out_key: str
    where: tuple[int, str]  # (layer, side) for GradDrop placement
    norm: NormMap


@dataclass(slots=True)
class NormBlock:
    """A node block the norm fix rewrites: its site, how its change becomes a write, the readers after it."""

    block: Block
    key: str
    cols: torch.Tensor | None  # the units' columns in the site tensor (heads, neurons, values)
    columns: torch.Tensor | None  # [d, U * width] write matrix (heads, neurons; values: every head's); None: identity
    centered: tuple[torch.Tensor, torch.Tensor] | None  # neurons: center_columns of `columns`
    first_reader: int  # the readers after the block's write: readers[first_reader:] (forward order)
    pattern_key: str | None = None  # values: the clean attention pattern, which carries a value to every query
    unit_heads: torch.Tensor | None = None  # values, queries, keys: [U, rep] the query heads of each unit
    qk_layer: int | None = None  # queries, keys: the layer whose QKFix gives the head-output changes
    v_key: str | None = None  # queries, keys: the clean values (the site's key)


def norm_inputs(nb: NormBlock, delta: torch.Tensor, pattern: torch.Tensor | None = None, fix: QKFix | None = None,
                v: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """What the norm fix reads for one block: (positions of the readers to use, the writes there, and how to turn
    the per-write changes [b, P, U'] into per-unit values [b, S, U] for `block_estimates`).

    delta: the block's change at its units' columns [b, S, U * width]. Heads, attn, mlp, resid and neurons write
    at their own position; a value at position s writes at every query position t through the clean pattern:
    D_t = sum over the heads h reading it of A_h[t, s] W_O,h (change of v_s). Queries and keys (with the QK fix:
    `fix`, and the clean per-head values `v` [b, H, S, w]) write the exact change of their heads' outputs:
    a query at t only at t, a key at s at every query position t >= s."""
    b = nb.block
    bsz, seq = delta.shape[:2]
    units = len(b.units)
    live = delta.ne(0).any(-1).any(0).nonzero().squeeze(-1)  # positions where some pair's node changes

    def at_live(change: torch.Tensor) -> torch.Tensor:
        out = change.new_zeros((bsz, seq, change.shape[-1]))
        out[:, live] = change
        return out

    if nb.centered is not None:  # neurons: the payload is the change along each unit's fixed column
        return live, delta[:, live], at_live
    if b.kind in ("attn", "mlp", "resid"):  # the change is the write
        return live, delta[:, live].unsqueeze(-2), at_live
    if b.kind in ("queries", "keys"):
        return _qk_inputs(nb, live, fix, v, bsz, seq, at_live)
    width = b.layout.width
    dz = delta[:, live].unflatten(-1, (units, width))  # [b, P, U, w]
    if b.kind == "heads":  # through the head's columns of the output projection
        return live, torch.einsum("bsuw,duw->bsud", dz, nb.columns.unflatten(-1, (units, width))), at_live
    # values: unit u (a KV group, or a head) is read by the query heads nb.unit_heads[u]
    heads = nb.unit_heads  # [U, rep]
    w_o = nb.columns.unflatten(-1, (-1, width))[:, heads]  # [d, U, rep, w]
    y = torch.einsum("bsuw,durw->bsurd", dz, w_o)  # each reading head's write per unit of pattern weight
    first, reads, finish = _later_queries(b, live, bsz, seq, at_live)
    a = pattern[:, heads][:, :, :, first:][..., live]  # [b, U, rep, T', P]
    if not b.per_position:  # every position patched at once: one write per query position
        return reads, torch.einsum("burtp,bpurd->btud", a, y), finish
    return reads, torch.einsum("burtp,bpurd->btupd", a, y).flatten(2, 3), finish  # [b, T', U * P, d]


def _later_queries(b: Block, live: torch.Tensor, bsz: int, seq: int, at_live: Callable[[torch.Tensor], torch.Tensor]
                   ) -> tuple[int, torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """For a value or key, which writes at every query position from the first changed one on: (that position,
    the query positions read, and the finish that turns the changes there into per-unit values [b, S, U]).
    Summed: one write per query position [b, T', U]. Per position: one per (unit, changed source position)
    [b, T', U * P], summed over the queries and put at the source position."""
    units = len(b.units)
    first = int(live.min()) if live.numel() else seq
    reads = torch.arange(first, seq, device=live.device)  # causal: only queries at or after a changed source

    def summed(change: torch.Tensor) -> torch.Tensor:
        out = change.new_zeros((bsz, seq, units))
        out[:, reads] = change
        return out

    def per_source(change: torch.Tensor) -> torch.Tensor:
        return at_live(change.sum(1).unflatten(-1, (units, -1)).transpose(1, 2))

    return first, reads, per_source if b.per_position else summed


def _qk_inputs(nb: NormBlock, live: torch.Tensor, fix: QKFix, v: torch.Tensor, bsz: int, seq: int,
               at_live: Callable[[torch.Tensor], torch.Tensor]):
    """norm_inputs for queries and keys: the QK fix's exact head-output changes through W_O, per unit's heads."""
    b = nb.block
    heads = nb.unit_heads  # [U, rep]
    width = v.shape[-1]
    w_o = nb.columns.unflatten(-1, (-1, width))[:, heads]  # [d, U, rep, w]
    dtype = nb.columns.dtype
    if b.kind == "queries":  # a query at t changes its head's output at t only (also when all are patched)
        dz = fix.query_outputs(v)[:, heads][:, :, :, live].to(dtype)  # [b, U, rep, P, w]
        return live, torch.einsum("burpw,durw->bpud", dz, w_o), at_live
    first, reads, finish = _later_queries(b, live, bsz, seq, at_live)
    if not b.per_position:  # every key of the unit patched at once
        dz = fix.all_keys_outputs(v)[:, heads][:, :, :, first:].to(dtype)  # [b, U, rep, T', w]
        return reads, torch.einsum("burtw,durw->btud", dz, w_o), finish
    dz = fix.key_outputs(v, live, first)[:, heads].to(dtype)  # [b, U, rep, T', P, w]
    return reads, torch.einsum("burtpw,durw->btupd", dz, w_o).flatten(2, 3), finish  # [b, T', U * P, d]
