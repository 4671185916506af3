"""One architecture as one record: where its nodes live, its rotary embedding, its residual layout, and which
methods, AtP* corrections and pipeline features it supports.

Pure Python (no torch). Implementations the record needs at run time (the rotary function) are named by a
lazily imported path ("package.module:function"), so `check` and `plan` read records without torch.
"""
from __future__ import annotations

import importlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from atpdsl.arch.sites import Site, SiteTemplate
from atpdsl.errors import ModelError

__all__ = ["Arch", "Rotary", "METHOD_NAMES", "CORRECTION_NAMES", "FEATURE_NAMES", "load_object"]

METHOD_NAMES = ("atp", "atp*", "exact", "relp")
"""Every scoring method an architecture may declare (relp: no engine implementation yet)."""
CORRECTION_NAMES = ("qk_fix", "graddrop", "norm_fix")
"""The AtP* corrections (`method atp* { ... }`)."""
FEATURE_NAMES = ("edges", "emit")
"""Pipeline features beside the scoring method: edge attribution, `plan --emit python`."""


def load_object(path: str) -> Any:
    """The object a "package.module:name" path names (imported now, so only the engine calls this)."""
    module, _, name = path.partition(":")
    if not module or not name:
        raise ValueError(f"expected 'package.module:name', got {path!r}")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise ModelError(f"cannot load {path!r} named by an architecture record: {err}") from None


@dataclass(frozen=True, slots=True)
class Rotary:
    """Where a model's rotary position embedding lives (the QK fix re-rotates patched q and k with it).

    `module`: the module whose output is the two rotation tables, read in the clean run. `rotate`: a factory
    `(hf_model, arch, config) -> fn(q, k, table0, table1) -> (q, k)` taking q / k as [batch, heads, positions,
    head_dim] and the tables in the order the module returns them.
    """

    module: str
    rotate: str = "atpdsl.engine.rotary:beside_attention"


@dataclass(frozen=True, slots=True)
class Arch:
    """One architecture: its model types, where each node kind lives, and what it supports.

    `templates` are listed in forward order within a layer (reads follow it, gradients reverse it).
    `embed` is the token-embedding module (its output is made to require grad when params are frozen).
    `attn_norm` / `mlp_norm` are the input norms of the attention and MLP blocks (the same module when both
    blocks read one norm, as GPT-J's ln_1). `flat_modules` are module templates that see [batch * positions,
    width] tensors (inputs and outputs). Residual layout: `parallel` (attention and MLP read the same point)
    unless the config's `parallel_key` says otherwise; a config whose `pre_norm_key` is false normalises after
    the residual add (post-norm). `methods`, `corrections` and `features` list what works; `support_problems`
    adds what the config rules out. `why_not` gives the reason for each name left out, for messages.
    """

    name: str
    model_types: tuple[str, ...]
    layers: str  # path of the layer list, e.g. "model.layers"
    embed: str
    final_norm: str
    templates: tuple[SiteTemplate, ...]
    attn_norm: str = ""
    mlp_norm: str = ""
    neuron_proj: str = ""  # the down projection, where the neuron site is an activation output instead of its input
    rotary: Rotary | None = None
    parallel: bool = False
    parallel_key: str = ""
    pre_norm_key: str = ""
    flat_modules: tuple[str, ...] = ()
    methods: tuple[str, ...] = ("atp", "atp*", "exact")
    corrections: tuple[str, ...] = CORRECTION_NAMES
    features: tuple[str, ...] = FEATURE_NAMES
    why_not: tuple[tuple[str, str], ...] = ()  # (method, correction or feature left out, the reason)
    notes: str = ""

    def template(self, kind: str) -> SiteTemplate:
        """The site template of a node kind; ModelError when this architecture has none."""
        for t in self.templates:
            if t.kind == kind:
                return t
        raise ModelError(f"{self.name} models have no {kind!r} nodes (kinds: {', '.join(self.kinds)})")

    @property
    def kinds(self) -> tuple[str, ...]:
        """Node kinds this architecture supports."""
        return tuple(t.kind for t in self.templates)

    def reason(self, name: str) -> str:
        """Why a method, correction or feature is left out of this record ("" when no reason is given)."""
        return dict(self.why_not).get(name, "")

    def is_parallel(self, config: Mapping[str, Any]) -> bool:
        """Whether attention and MLP of a layer read the same residual point (from the config, not the name)."""
        if self.parallel_key:
            value = config.get(self.parallel_key)
            return self.parallel if value is None else bool(value)
        return self.parallel

    def is_pre_norm(self, config: Mapping[str, Any]) -> bool:
        """Whether each block normalises its input (False: norms after the residual add, e.g. OPT-350m)."""
        if self.pre_norm_key:
            value = config.get(self.pre_norm_key)
            return True if value is None else bool(value)
        return True

    @property
    def shared_block_norm(self) -> bool:
        """Whether attention and MLP read one norm (GPT-J's ln_1): their inputs cannot be told apart."""
        return bool(self.attn_norm) and self.attn_norm == self.mlp_norm

    def is_flat(self, module: str) -> bool:
        """Whether a concrete module path sees [batch * positions, width] tensors."""
        return any(_pattern(t).fullmatch(module) for t in self.flat_modules)

    def site_list(self, kinds_by_layer: Mapping[int, set[str]]) -> list[Site]:
        """Concrete hook points in forward order for the given kinds per layer.

        Kinds sharing a hook point (fused q/k/v) share one Site; an input comes before the output of the
        same module.
        """
        out: list[Site] = []
        for layer in sorted(kinds_by_layer):
            wanted = kinds_by_layer[layer]
            merged: dict[tuple[str, str], list[str]] = {}
            for t in self.templates:
                if t.kind in wanted:
                    merged.setdefault((t.path(layer), t.attr), []).append(t.kind)
            for (module, attr), kinds in merged.items():
                out.append(Site(layer, module, attr, tuple(kinds), self.is_flat(module)))
        return out

    def sites(self, groups: Sequence[Any], n_layers: int) -> list[str]:
        """Module sites (`path.input|output`) in forward order for a plan's node groups.

        `groups` are `NodeGroup`s (anything with `.kind` and `.layers`); layers outside
        0..n_layers-1 are ignored (the checker reports them).
        """
        by_layer: dict[int, set[str]] = {}
        for g in groups:
            lo, hi = g.layers if g.layers is not None else (0, n_layers - 1)
            for layer in range(max(lo, 0), min(hi, n_layers - 1) + 1):
                by_layer.setdefault(layer, set()).add(g.kind)
        return [s.name for s in self.site_list(by_layer)]


_PATTERNS: dict[str, re.Pattern[str]] = {}


def _pattern(template: str) -> re.Pattern[str]:
    """A module template ("a.layers.{layer}.fc2") as a regular expression over concrete paths."""
    got = _PATTERNS.get(template)
    if got is None:
        got = _PATTERNS[template] = re.compile(re.escape(template).replace(re.escape("{layer}"), r"\d+"))
    return got
