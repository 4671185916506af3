"""Where each node kind lives in a model's module tree, per architecture: one table entry per model_type.

Pure Python (no torch), so `atpdsl plan` can list sites without loading a model.

Every node-bearing site is the input or the output of a named module, a tensor whose last dimension
holds the nodes' units: a head's slice, a neuron's column, or the whole vector. `Layout` says where
unit `u` sits in that last dimension, so one generic engine function reads, differentiates and patches
every architecture. Queries, keys and values are read at the projection outputs (before rotary
embeddings): the rotation is a fixed linear map per position, so AtP estimates and exact patches are
the same as at the post-rotary vectors. Adding an architecture = adding one `Arch` to `ARCHS`.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from atpdsl.errors import ModelError

__all__ = [
    "Arch",
    "ARCHS",
    "Geometry",
    "Layout",
    "SiteTemplate",
    "Site",
    "STAGES",
    "arch_for_config",
    "geometry",
    "num_layers",
    "num_heads",
    "num_kv_heads",
    "head_dim",
    "hidden_size",
    "mlp_width",
    "supported_model_types",
]


def _first(config: Mapping[str, Any], keys: Sequence[str]) -> Any:
    for key in keys:
        value = config.get(key)
        if value is not None:
            return value
    return None


def _need(config: Mapping[str, Any], keys: Sequence[str], what: str) -> int:
    value = _first(config, keys)
    if value is None:
        raise ModelError(
            f"model config has no {what} (looked for {', '.join(keys)}; model_type "
            f"{config.get('model_type')!r})"
        )
    return int(value)


def num_layers(config: Mapping[str, Any]) -> int:
    """Number of transformer layers."""
    return _need(config, ("num_hidden_layers", "n_layer", "num_layers"), "layer count")


def num_heads(config: Mapping[str, Any]) -> int:
    """Number of attention (query) heads."""
    return _need(config, ("num_attention_heads", "n_head", "num_heads"), "head count")


def num_kv_heads(config: Mapping[str, Any]) -> int:
    """Number of key/value heads (= query heads unless the model uses grouped-query attention)."""
    value = _first(config, ("num_key_value_heads", "n_kv_heads", "num_kv_heads"))
    return int(value) if value is not None else num_heads(config)


def hidden_size(config: Mapping[str, Any]) -> int:
    """Width of the residual stream."""
    return _need(config, ("hidden_size", "n_embd", "d_model"), "hidden size")


def head_dim(config: Mapping[str, Any]) -> int:
    """Per-head width; configs without `head_dim` (GPT-2, GPT-NeoX, Qwen2) use hidden // heads."""
    value = config.get("head_dim")
    return int(value) if value is not None else hidden_size(config) // num_heads(config)


def mlp_width(config: Mapping[str, Any]) -> int:
    """Number of MLP neurons per layer (GPT-2 stores None for the default 4 * hidden)."""
    value = _first(config, ("intermediate_size", "n_inner", "ffn_dim"))
    return int(value) if value is not None else 4 * hidden_size(config)


@dataclass(frozen=True, slots=True)
class Geometry:
    """The sizes the site layouts depend on, read once from a config."""

    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden: int
    mlp: int

    @property
    def group_size(self) -> int:
        """Query heads per KV head (1 without grouped-query attention)."""
        return self.n_heads // self.n_kv_heads

    @property
    def grouped(self) -> bool:
        """Whether keys and values belong to KV groups shared by several heads."""
        return self.n_kv_heads != self.n_heads


def geometry(config: Mapping[str, Any]) -> Geometry:
    """The Geometry of a config dict."""
    return Geometry(
        n_layers=num_layers(config),
        n_heads=num_heads(config),
        n_kv_heads=num_kv_heads(config),
        head_dim=head_dim(config),
        hidden=hidden_size(config),
        mlp=mlp_width(config),
    )


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


# How a site's last dimension is laid out; resolved against a Geometry by `SiteTemplate.layout`.
#   heads        per-head slices, contiguous (o-proj input)
#   q|k|v        separate projections, contiguous per head (k, v per KV head)
#   gpt2_q|k|v   GPT-2's fused c_attn output [q | k | v], each contiguous per head
#   neox_q|k|v   GPT-NeoX's fused query_key_value output, per head [q k v] interleaved
#   neurons      one column per neuron
#   whole        the full vector as one unit
_LAYOUTS = (
    "heads", "q", "k", "v", "gpt2_q", "gpt2_k", "gpt2_v", "neox_q", "neox_k", "neox_v", "neurons", "whole",
)


@dataclass(frozen=True, slots=True)
class SiteTemplate:
    """One node kind's site in every layer: `module` (with `{layer}`), its "input" or "output"."""

    kind: str  # a NodeKind value
    module: str
    attr: str
    layout: str

    def path(self, layer: int) -> str:
        """The module path in one layer."""
        return self.module.format(layer=layer)

    def resolve(self, geom: Geometry) -> Layout:
        """The unit layout of this site for a model of these sizes."""
        h, kv, dh, d = geom.n_heads, geom.n_kv_heads, geom.head_dim, geom.hidden
        lay = self.layout
        if lay == "heads" or lay == "q":
            return Layout(h, dh, 0, dh)
        if lay in ("k", "v"):
            return Layout(kv, dh, 0, dh)
        if lay.startswith("gpt2_"):
            part = "qkv".index(lay[-1])
            return Layout(h, dh, part * d, dh)
        if lay.startswith("neox_"):
            part = "qkv".index(lay[-1])
            return Layout(h, dh, 0, 3 * dh, part * dh)
        if lay == "neurons":
            return Layout(geom.mlp, 1, 0, 1)
        if lay == "whole":
            return Layout(1, d, 0, d)
        raise ValueError(f"unknown layout {lay!r}")


# Forward order of the kinds' hook points inside one layer. Hook points added by others (post-rotary
# q/k at 20, attention scores/pattern at 25, ...) slot in between by number.
STAGES: dict[str, int] = {
    "queries": 10, "keys": 11, "values": 12, "heads": 30, "attn": 31, "neurons": 50, "mlp": 51, "resid": 60,
}


@dataclass(frozen=True, slots=True)
class Site:
    """One concrete hook point: a module's input or output in one layer, with the kinds read there."""

    layer: int
    module: str
    attr: str
    kinds: tuple[str, ...]

    @property
    def order(self) -> tuple[int, int]:
        """Sort key in forward order: (layer, stage within the layer)."""
        return self.layer, min(STAGES[k] for k in self.kinds)

    @property
    def name(self) -> str:
        """`module.attr`, e.g. `gpt_neox.layers.0.attention.dense.input`."""
        return f"{self.module}.{self.attr}"


@dataclass(frozen=True, slots=True)
class Arch:
    """One architecture: its model types and, per node kind, where the node lives.

    `templates` are listed in forward order within a layer (reads follow it, gradients reverse it).
    `embed` is the token-embedding module (its output is made to require grad when params are frozen).
    """

    name: str
    model_types: tuple[str, ...]
    layers: str  # path of the layer list, e.g. "model.layers"
    embed: str
    final_norm: str
    templates: tuple[SiteTemplate, ...]
    attn_norm: str = ""  # input norm of the attention block (edge attribution reads its input's gradient)
    mlp_norm: str = ""  # input norm of the MLP block
    neuron_proj: str = ""  # the down projection, where the neuron site is an activation output instead of its input
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

    def site_list(self, kinds_by_layer: Mapping[int, set[str]]) -> list[Site]:
        """Concrete hook points in forward order for the given kinds per layer.

        Kinds sharing a hook point (GPT-2's fused q/k/v) share one Site; an input comes before the
        output of the same module.
        """
        out: list[Site] = []
        for layer in sorted(kinds_by_layer):
            wanted = kinds_by_layer[layer]
            merged: dict[tuple[str, str], list[str]] = {}
            for t in self.templates:
                if t.kind in wanted:
                    merged.setdefault((t.path(layer), t.attr), []).append(t.kind)
            for (module, attr), kinds in merged.items():
                out.append(Site(layer, module, attr, tuple(kinds)))
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


def _templates(rows: Sequence[tuple[str, str, str, str]]) -> tuple[SiteTemplate, ...]:
    return tuple(SiteTemplate(kind, module, attr, layout) for kind, module, attr, layout in rows)


_GPT2 = Arch(
    name="GPT-2",
    model_types=("gpt2",),
    layers="transformer.h",
    embed="transformer.wte",
    final_norm="transformer.ln_f",
    attn_norm="transformer.h.{layer}.ln_1",
    mlp_norm="transformer.h.{layer}.ln_2",
    neuron_proj="transformer.h.{layer}.mlp.c_proj",
    templates=_templates([
        ("queries", "transformer.h.{layer}.attn.c_attn", "output", "gpt2_q"),
        ("keys", "transformer.h.{layer}.attn.c_attn", "output", "gpt2_k"),
        ("values", "transformer.h.{layer}.attn.c_attn", "output", "gpt2_v"),
        ("heads", "transformer.h.{layer}.attn.c_proj", "input", "heads"),
        ("attn", "transformer.h.{layer}.attn.c_proj", "output", "whole"),
        ("neurons", "transformer.h.{layer}.mlp.act", "output", "neurons"),
        ("mlp", "transformer.h.{layer}.mlp", "output", "whole"),
        ("resid", "transformer.h.{layer}", "output", "whole"),
    ]),
)

_NEOX = Arch(
    name="GPT-NeoX",
    model_types=("gpt_neox",),
    layers="gpt_neox.layers",
    embed="gpt_neox.embed_in",
    final_norm="gpt_neox.final_layer_norm",
    attn_norm="gpt_neox.layers.{layer}.input_layernorm",
    mlp_norm="gpt_neox.layers.{layer}.post_attention_layernorm",
    neuron_proj="gpt_neox.layers.{layer}.mlp.dense_4h_to_h",
    templates=_templates([
        ("queries", "gpt_neox.layers.{layer}.attention.query_key_value", "output", "neox_q"),
        ("keys", "gpt_neox.layers.{layer}.attention.query_key_value", "output", "neox_k"),
        ("values", "gpt_neox.layers.{layer}.attention.query_key_value", "output", "neox_v"),
        ("heads", "gpt_neox.layers.{layer}.attention.dense", "input", "heads"),
        ("attn", "gpt_neox.layers.{layer}.attention.dense", "output", "whole"),
        ("neurons", "gpt_neox.layers.{layer}.mlp.act", "output", "neurons"),
        ("mlp", "gpt_neox.layers.{layer}.mlp", "output", "whole"),
        ("resid", "gpt_neox.layers.{layer}", "output", "whole"),
    ]),
    notes="parallel or sequential residual: attention runs before the MLP either way",
)

_LLAMA_ROWS = [
    ("queries", "model.layers.{layer}.self_attn.q_proj", "output", "q"),
    ("keys", "model.layers.{layer}.self_attn.k_proj", "output", "k"),
    ("values", "model.layers.{layer}.self_attn.v_proj", "output", "v"),
    ("heads", "model.layers.{layer}.self_attn.o_proj", "input", "heads"),
    ("attn", "model.layers.{layer}.self_attn.o_proj", "output", "whole"),
    # act_fn(gate) * up has no module of its own: the down projection's input is the neuron vector.
    ("neurons", "model.layers.{layer}.mlp.down_proj", "input", "neurons"),
    ("mlp", "model.layers.{layer}.mlp.down_proj", "output", "whole"),
    ("resid", "model.layers.{layer}", "output", "whole"),
]


def _llama_like(name: str, model_types: tuple[str, ...], notes: str = "") -> Arch:
    return Arch(
        name=name,
        model_types=model_types,
        layers="model.layers",
        embed="model.embed_tokens",
        final_norm="model.norm",
        templates=_templates(_LLAMA_ROWS),
        attn_norm="model.layers.{layer}.input_layernorm",
        mlp_norm="model.layers.{layer}.post_attention_layernorm",
        notes=notes,
    )


ARCHS: tuple[Arch, ...] = (
    _GPT2,
    _NEOX,
    _llama_like("Llama", ("llama",), "grouped-query attention: keys/values per KV group"),
    _llama_like("Qwen2", ("qwen2",), "Llama layout plus q/k/v biases"),
    _llama_like("Mistral", ("mistral",), "Llama layout"),
    _llama_like("Gemma", ("gemma",), "Llama layout; embeddings scaled inside embed_tokens"),
)

_BY_TYPE: dict[str, Arch] = {t: a for a in ARCHS for t in a.model_types}


def supported_model_types() -> list[str]:
    """Every model_type with a site table."""
    return sorted(_BY_TYPE)


def arch_for_config(config: Mapping[str, Any]) -> Arch:
    """The Arch of a config dict (a config.json); ModelError naming the supported model types."""
    model_type = config.get("model_type")
    arch = _BY_TYPE.get(str(model_type)) if model_type is not None else None
    if arch is None:
        raise ModelError(
            f"unsupported model_type {model_type!r}: atpdsl knows where nodes live for "
            f"{', '.join(supported_model_types())} (add an entry to atpdsl/arch.py ARCHS for others)"
        )
    return arch
