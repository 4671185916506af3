"""What the AtP* corrections share: where a site sits in its layer, per-head views, tolerances, and the check
that the architecture's residual layout is known."""
from __future__ import annotations

from collections.abc import Sequence

import torch

from atpdsl.arch import Layout, support_problems
from atpdsl.errors import EngineError
from atpdsl.engine.context import Context

__all__ = ["ATTN_SIDE", "MLP_SIDE", "PATTERN_TOLERANCE", "PATTERN_STAGE", "MID_STAGE", "NORM_STAGE", "heads_view",
           "side_of", "site_places", "check_supported"]

ATTN_SIDE = frozenset({"queries", "keys", "values", "heads", "attn"})
MLP_SIDE = frozenset({"neurons", "mlp"})
PATTERN_TOLERANCE = {torch.float64: 1e-6, torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}
"""Largest |rebuilt - model| accepted on the first batch for a rebuilt pattern or norm output, per model dtype."""

# Stages (arch.STAGES numbering) of the corrections' extra sites; only their relative order matters.
PATTERN_STAGE, MID_STAGE = 32, 40
NORM_STAGE = {"attn-in": 5, "mlp-in": MID_STAGE, "logits": 0}  # a reader norm's input; its output is + 1

def check_supported(ctx: Context, correction: str, graddrop_mode: str = "layer") -> None:
    """EngineError when the architecture record refuses this AtP* correction for the model's config."""
    loaded = ctx.loaded
    problems = support_problems(loaded.arch, loaded.config, "atp*", corrections=[correction],
                                graddrop_mode=graddrop_mode)
    if problems:
        raise EngineError(f"{problems[0].message}; {problems[0].hint}")


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
