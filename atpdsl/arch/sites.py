"""Where a node kind's units sit in the tensor of its site: layouts, site templates and concrete sites.

Every node-bearing site is the input or the output of a named module, a tensor [batch, positions, width]
whose last dimension holds the nodes' units: a head's slice, a neuron's column, or the whole vector. A
`Layout` says where unit `u` sits in that last dimension, so one generic engine function reads,
differentiates and patches every architecture. Some modules see batch and positions flattened into one
dimension ([batch * positions, width], OPT's MLP): their sites are marked `flat` and the engine views them
as [batch, positions, width].
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from atpdsl.arch.config import Geometry

__all__ = ["Layout", "LayoutRule", "LAYOUTS", "SiteTemplate", "Site", "STAGES"]


@dataclass(frozen=True, slots=True)
class Layout:
    """Where the units of a site sit in its tensor's last dimension.

    Unit u occupies `[start + u*stride + offset, start + u*stride + offset + width)`; `count` units.
    A whole-vector site is one unit of the full width.
    """

    count: int
    width: int
    start: int = 0
    stride: int = 0
    offset: int = 0

    def columns(self, unit: int) -> tuple[int, int]:
        """The half-open column range of one unit."""
        lo = self.start + unit * self.stride + self.offset
        return lo, lo + self.width


@dataclass(frozen=True, slots=True)
class LayoutRule:
    """A named way to lay units out in a site's last dimension, and the full width of that dimension."""

    name: str
    doc: str
    units: Callable[[Geometry], Layout]
    tensor_width: Callable[[Geometry], int]


def _fused(part: str) -> LayoutRule:
    """[q | k | v] concatenated, each contiguous per head (GPT-2's c_attn, Phi-3's qkv_proj with GQA)."""
    def units(g: Geometry) -> Layout:
        q, kv = g.n_heads * g.head_dim, g.n_kv_heads * g.head_dim
        if part == "q":
            return Layout(g.n_heads, g.head_dim, 0, g.head_dim)
        return Layout(g.n_kv_heads, g.head_dim, q if part == "k" else q + kv, g.head_dim)

    return LayoutRule(f"fused_{part}", f"the {part} part of a fused [q | k | v] projection output", units,
                      lambda g: (g.n_heads + 2 * g.n_kv_heads) * g.head_dim)


def _neox(part: str) -> LayoutRule:
    """GPT-NeoX's query_key_value output: per head [q k v] interleaved."""
    index = "qkv".index(part)
    return LayoutRule(f"neox_{part}", f"the {part} slices of GPT-NeoX's per-head interleaved [q k v]",
                      lambda g: Layout(g.n_heads, g.head_dim, 0, 3 * g.head_dim, index * g.head_dim),
                      lambda g: 3 * g.n_heads * g.head_dim)


LAYOUTS: dict[str, LayoutRule] = {
    r.name: r
    for r in (
        LayoutRule("heads", "per-head slices, contiguous (output projection input)",
                   lambda g: Layout(g.n_heads, g.head_dim, 0, g.head_dim), lambda g: g.n_heads * g.head_dim),
        LayoutRule("q", "a separate query projection, contiguous per head",
                   lambda g: Layout(g.n_heads, g.head_dim, 0, g.head_dim), lambda g: g.n_heads * g.head_dim),
        LayoutRule("k", "a separate key projection, contiguous per KV head",
                   lambda g: Layout(g.n_kv_heads, g.head_dim, 0, g.head_dim), lambda g: g.n_kv_heads * g.head_dim),
        LayoutRule("v", "a separate value projection, contiguous per KV head",
                   lambda g: Layout(g.n_kv_heads, g.head_dim, 0, g.head_dim), lambda g: g.n_kv_heads * g.head_dim),
        _fused("q"), _fused("k"), _fused("v"),
        _neox("q"), _neox("k"), _neox("v"),
        LayoutRule("neurons", "one column per MLP neuron", lambda g: Layout(g.mlp, 1, 0, 1), lambda g: g.mlp),
        LayoutRule("whole", "the full residual-width vector as one unit", lambda g: Layout(1, g.hidden, 0, g.hidden),
                   lambda g: g.hidden),
    )
}


@dataclass(frozen=True, slots=True)
class SiteTemplate:
    """One node kind's site in every layer: `module` (with `{layer}`), its "input" or "output", a LAYOUTS name."""

    kind: str  # a NodeKind value
    module: str
    attr: str
    layout: str

    def path(self, layer: int) -> str:
        """The module path in one layer."""
        return self.module.format(layer=layer)

    def rule(self) -> LayoutRule:
        """The layout rule (ValueError for a name LAYOUTS does not know)."""
        rule = LAYOUTS.get(self.layout)
        if rule is None:
            raise ValueError(f"unknown layout {self.layout!r} (known: {', '.join(LAYOUTS)})")
        return rule

    def resolve(self, geom: Geometry) -> Layout:
        """The unit layout of this site for a model of these sizes."""
        return self.rule().units(geom)

    def tensor_width(self, geom: Geometry) -> int:
        """The width of the site tensor's last dimension for a model of these sizes."""
        return self.rule().tensor_width(geom)


# Forward order of the kinds' hook points inside one layer. Hook points added by others (post-rotary
# q/k at 20, attention scores/pattern at 25, ...) slot in between by number.
STAGES: dict[str, int] = {
    "queries": 10, "keys": 11, "values": 12, "heads": 30, "attn": 31, "neurons": 50, "mlp": 51, "resid": 60,
}


@dataclass(frozen=True, slots=True)
class Site:
    """One concrete hook point: a module's input or output in one layer, with the kinds read there.

    `flat`: the module sees batch and positions flattened into one dimension ([batch * positions, width]);
    the engine views the value as [batch, positions, width].
    """

    layer: int
    module: str
    attr: str
    kinds: tuple[str, ...]
    flat: bool = False

    @property
    def order(self) -> tuple[int, int]:
        """Sort key in forward order: (layer, stage within the layer)."""
        return self.layer, min(STAGES[k] for k in self.kinds)

    @property
    def name(self) -> str:
        """`module.attr`, e.g. `gpt_neox.layers.0.attention.dense.input`."""
        return f"{self.module}.{self.attr}"
