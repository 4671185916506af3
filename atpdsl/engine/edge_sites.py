"""What the clean pass reads for per-target edges, and the reads themselves.

Per layer: the attention's query, key and value projection outputs (values and gradients), its pattern, the
gradient at its output projection's input (each head's z), and the gradients at the MLP's input projections
(a neuron's own input: its gate and up rows, or its single input row). Per reader block (`L{m}.attn-in`,
`L{m}.mlp-in`, `logits`): its norm's input and its branch gradient (atpdsl.engine.edges).

A gradient pass (`PassReads`) is the clean run's, or one integrated-gradients step's (atpdsl.engine.edge_ig):
the deltas of the node sites are shared, everything the gradient touches is per pass.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from atpdsl.engine.edges import Reader, readers, wide
from atpdsl.engine.load import Loaded
from atpdsl.engine.state import ExtraSites

__all__ = ["KEPT", "NEURON_INPUTS", "AttnSites", "MlpSites", "EdgeSites", "PassReads", "add_edge_sites", "branch_gradients",
           "pass_reads"]

KEPT = "edge_reads"
"""The name of the edges' per-batch reads among the run's kept items (BatchWork.kept, RunState.kept)."""

NEURON_INPUTS: dict[str, tuple[str, ...]] = {
    "GPT-2": ("mlp.c_fc",),
    "GPT-NeoX": ("mlp.dense_h_to_4h",),
    "Llama": ("mlp.gate_proj", "mlp.up_proj"),
    "Qwen2": ("mlp.gate_proj", "mlp.up_proj"),
    "Mistral": ("mlp.gate_proj", "mlp.up_proj"),
    "Gemma": ("mlp.gate_proj", "mlp.up_proj"),
    "Phi-3": ("mlp.gate_up_proj",),
    "OPT": ("fc1",),
}
"""Per architecture: the MLP's input projections below the layer's module (the input of neuron n is column n of
each, and column n + i * width of a fused one holding i pieces). An architecture not listed gives neurons the MLP
block's input gradient (block-level, shared by all neurons of the layer)."""

_STAGE = {"attn-in": 5, "mlp-in": 40}  # reader norms' input stage inside a layer (arch.STAGES numbering)


@dataclass(frozen=True, slots=True)
class AttnSites:
    """One layer's attention sites: q / k / v projection outputs (one key when fused), pattern, heads input."""

    layer: int
    q: str
    k: str
    v: str
    pattern: str
    z: str
    scale: float


@dataclass(frozen=True, slots=True)
class MlpSites:
    """One layer's MLP input projections (empty: the architecture's neurons have no known input rows)."""

    layer: int
    pieces: tuple[str, ...]
    modules: tuple[str, ...]


@dataclass(slots=True)
class EdgeSites:
    """Every site the edges read, by layer, and the reader blocks."""

    blocks: list[Reader]
    in_keys: list[str]
    out_keys: list[str]
    embed_key: str
    attn: dict[int, AttnSites] = field(default_factory=dict)
    mlp: dict[int, MlpSites] = field(default_factory=dict)
    rotary: tuple[str, str] | None = None
    whole: frozenset[int] | None = None  # readers whose branch gradient a target takes whole (None: every one)


def _attn_sites(loaded: Loaded, extra: ExtraSites, layer: int) -> AttnSites:
    arch = loaded.arch
    keys = []
    for kind, stage in (("queries", 10), ("keys", 11), ("values", 12)):
        t = arch.template(kind)
        keys.append(extra.add(f"{t.path(layer)}.{t.attr}", t.path(layer), t.attr, (layer, stage), corrupt=False))
    heads = arch.template("heads")
    z = extra.add(f"{heads.path(layer)}.{heads.attr}", heads.path(layer), heads.attr, (layer, 30), corrupt=False)
    attn = heads.path(layer).rsplit(".", 1)[0]
    pattern = extra.add(f"{attn}.output.1", attn, "output", (layer, 32), 1, grad=False, corrupt=False)
    scale = float(getattr(loaded.hf.get_submodule(attn), "scaling", loaded.geom.head_dim ** -0.5))
    return AttnSites(layer, keys[0], keys[1], keys[2], pattern, z, scale)


def _mlp_sites(loaded: Loaded, extra: ExtraSites, layer: int) -> MlpSites:
    rel = NEURON_INPUTS.get(loaded.arch.name, ())
    pieces, modules = [], []
    for name in rel:
        module = f"{loaded.arch.layers}.{layer}.{name}"
        try:
            mod = loaded.hf.get_submodule(module)
        except AttributeError:
            return MlpSites(layer, (), ())
        out = mod.weight.shape[1] if type(mod).__name__ == "Conv1D" else mod.weight.shape[0]
        if out % loaded.geom.mlp:
            return MlpSites(layer, (), ())
        pieces.append(extra.add(f"{module}.output", module, "output", (layer, 45), corrupt=False))
        modules.append(module)
    return MlpSites(layer, tuple(pieces), tuple(modules))


def add_edge_sites(loaded: Loaded, extra: ExtraSites, table=None) -> EdgeSites:
    """Add every site the edges read to the run's extra sites (once each; all but the embedding on the clean prompt
    only, so the corrupt run does not read them): the attention reads only in the layers
    where `table` (a NodeTable: the run's nodes, every possible target) has attention-side nodes, the MLP input
    projections only where it has neurons (every layer without a table)."""
    blocks = readers(loaded)
    n_layers = loaded.geom.n_layers
    in_keys, out_keys = [], []
    for r in blocks:
        stage = 0 if r.layer == n_layers else _STAGE[r.name.rsplit(".", 1)[-1]]
        in_keys.append(extra.add(f"{r.module}.input", r.module, "input", (r.layer, stage), grad=False, corrupt=False))
        out_keys.append(extra.add(f"{r.module}.output", r.module, "output", (r.layer, stage + 1), corrupt=False))
    embed = loaded.arch.embed
    sites = EdgeSites(blocks, in_keys, out_keys, extra.add(f"{embed}.output", embed, "output", (-1, 0), grad=False))
    rotary = loaded.arch.rotary
    if rotary is not None:
        sites.rotary = tuple(extra.add(f"{rotary.module}.output.{i}", rotary.module, "output", (0, i), i, False,
                                       corrupt=False) for i in (0, 1))
    attn, mlp = _target_layers(table, n_layers)
    for layer in range(n_layers):
        if layer in attn:
            sites.attn[layer] = _attn_sites(loaded, extra, layer)
        sites.mlp[layer] = _mlp_sites(loaded, extra, layer) if layer in mlp else MlpSites(layer, (), ())
    if table is not None:
        sites.whole = _whole_readers(table, sites)
    return sites


def _whole_readers(table, sites: EdgeSites) -> frozenset[int]:
    """The readers some possible target takes whole: `logits`, an `attn` / `mlp` node's block, every reader after an
    `L{m}.resid`, the MLP of neurons without known input rows."""
    out = {len(sites.blocks) - 1}
    for b in table.blocks:
        layer = table.sites[b.site].layer
        if b.kind == "attn":
            out.add(2 * layer)
        elif b.kind == "mlp" or (b.kind == "neurons" and not sites.mlp[layer].pieces):
            out.add(2 * layer + 1)
        elif b.kind == "resid":
            out.update(i for i, r in enumerate(sites.blocks) if r.point >= 2 * layer + 2)
    return frozenset(out)


def _target_layers(table, n_layers: int) -> tuple[set[int], set[int]]:
    """Layers with attention-side nodes, and layers with neurons (all of them without a table)."""
    if table is None:
        return set(range(n_layers)), set(range(n_layers))
    attn, mlp = set(), set()
    for b in table.blocks:
        layer = table.sites[b.site].layer
        if b.kind in ("heads", "queries", "keys", "values", "attn"):
            attn.add(layer)
        elif b.kind == "neurons":
            mlp.add(layer)
    return attn, mlp


def branch_gradients(loaded: Loaded, sites: EdgeSites, acts: dict, grads: dict) -> torch.Tensor:
    """[R, b, S, d]: each reader norm's output gradient pulled back through the norm at its input (0 for the
    readers no target takes whole: `sites.whole`)."""
    outs, ins, wanted = [], [], []
    for i, (r, in_key) in enumerate(zip(sites.blocks, sites.in_keys)):
        x = acts[in_key].detach()
        if sites.whole is None or i in sites.whole:
            x = x.requires_grad_(True)
            with torch.enable_grad():
                outs.append(loaded.hf.get_submodule(r.module)(x))
            wanted.append(i)
        ins.append(x)
    got = torch.autograd.grad(outs, [ins[i] for i in wanted], [grads[sites.out_keys[i]] for i in wanted],
                              allow_unused=True)
    back = dict(zip(wanted, got))
    return torch.stack([wide(back[i] if back.get(i) is not None else torch.zeros_like(x)) for i, x in enumerate(ins)])


@dataclass(slots=True)
class PassReads:
    """One gradient pass: reader branch gradients G, norm inputs X and norm output gradients H [R, b, S, d],
    attention and projection values (`values`, by site key) and gradients (`grads`, by site key)."""

    G: torch.Tensor
    X: torch.Tensor
    H: torch.Tensor
    values: dict[str, torch.Tensor]
    grads: dict[str, torch.Tensor]

    def to_record(self) -> dict[str, Any]:
        return {"G": self.G, "X": self.X, "H": self.H, "values": self.values, "grads": self.grads}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> "PassReads":
        return cls(record["G"], record["X"], record["H"], record["values"], record["grads"])

    @property
    def nbytes(self) -> int:
        tensors = [self.G, self.X, self.H, *self.values.values(), *self.grads.values()]
        return sum(t.numel() * t.element_size() for t in tensors)


def pass_reads(loaded: Loaded, sites: EdgeSites, acts: dict, grads: dict) -> PassReads:
    """The reads of one gradient pass from its site values and gradients."""
    values, kept = {}, {}
    for a in sites.attn.values():
        for key in {a.q, a.k, a.v, a.pattern}:
            values[key] = acts[key].detach()
        for key in {a.q, a.k, a.v, a.z}:
            kept[key] = grads[key].detach()
    for m in sites.mlp.values():
        for key in m.pieces:
            kept[key] = grads[key].detach()
    G = branch_gradients(loaded, sites, acts, grads)
    X = torch.stack([wide(acts[k].detach()) for k in sites.in_keys])
    H = torch.stack([wide(grads[k].detach()) for k in sites.out_keys])
    return PassReads(G, X, H, values, kept)
