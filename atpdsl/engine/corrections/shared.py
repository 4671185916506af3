"""What the AtP* corrections share: where a site sits in its layer, per-head views, tolerances, and the check
that the architecture's residual layout is known."""
from __future__ import annotations

from collections.abc import Sequence

import torch

from atpdsl.arch import Layout
from atpdsl.errors import EngineError
from atpdsl.engine.context import Context

__all__ = ["ATTN_SIDE", "MLP_SIDE", "PATTERN_TOLERANCE", "PATTERN_STAGE", "MID_STAGE", "NORM_STAGE", "heads_view",
           "side_of", "site_places", "ROTARY", "check_supported"]

ATTN_SIDE = frozenset({"queries", "keys", "values", "heads", "attn"})
MLP_SIDE = frozenset({"neurons", "mlp"})
PATTERN_TOLERANCE = {torch.float64: 1e-6, torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}
"""Largest |rebuilt - model| accepted on the first batch for a rebuilt pattern or norm output, per model dtype."""

# Stages (arch.STAGES numbering) of the corrections' extra sites; only their relative order matters.
PATTERN_STAGE, MID_STAGE = 32, 40
NORM_STAGE = {"attn-in": 5, "mlp-in": MID_STAGE, "logits": 0}  # a reader norm's input; its output is + 1

# Per architecture (Arch.name): the module whose output is the rotary (cos, sin), None without rotary.
ROTARY = {"GPT-2": None, "GPT-NeoX": "gpt_neox.rotary_emb"}
for _name in ("Llama", "Qwen2", "Mistral", "Gemma"):
    ROTARY[_name] = "model.rotary_emb"


def check_supported(ctx: Context) -> None:
    """EngineError unless the corrections know this architecture's residual layout."""
    arch = ctx.loaded.arch
    if arch.name not in ROTARY or not arch.mlp_norm:
        raise EngineError(f"AtP* (qk_fix / graddrop / norm_fix) does not know the residual layout of {arch.name} "
                          f"models (supported: {', '.join(sorted(ROTARY))}); use `method atp`")


def heads_view(x: torch.Tensor, layout: Layout) -> torch.Tensor:
    """[B, S, W] projection output -> [B, units, S, width] per-head vectors (the layout's unit slices)."""
    seg = x[..., layout.start: layout.start + layout.count * layout.stride].unflatten(-1, (layout.count, layout.stride))
    return seg[..., layout.offset: layout.offset + layout.width].transpose(1, 2)


def side_of(kinds: Sequence[str]) -> str:
    """Which write of its layer a site's nodes belong to: "attn", "mlp", or "out" (the layer's output)."""
    if "resid" in kinds:
        return "out"
    return "attn" if set(kinds) <= ATTN_SIDE else "mlp"


def site_places(ctx: Context) -> dict[int, tuple[int, str]]:
    """Table site index -> (layer, side)."""
    return {si: (site.layer, side_of(site.kinds)) for si, site in enumerate(ctx.table.sites)}
