"""The QK fix as a plan step: exact softmax for patched queries and keys (AtP*, Kramár et al. 2024, section 3).

Per layer with query or key nodes, the clean and corrupt post-rotary q / k are rebuilt from the projection
outputs the engine already reads (the rotation is the model's own `apply_rotary_pos_emb` with the clean run's
cos / sin, so a corrupt value lands on its clean position even when template slots shift positions), the pattern
and its gradient G = dM/dA are read at the attention module's output, and the query / key columns are rewritten
with the exact-softmax estimates (engine/qkfix.py). On the first batch the pattern rebuilt from q, k, the scale
and the attention mask is checked against the model's own (EngineError if it differs: an attention variant the
fix does not model). GradDrop's terms call `QkFix.write` again with their own pattern gradients.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from atpdsl.errors import EngineError
from atpdsl.plan import Step
from atpdsl.engine.atp import MAIN
from atpdsl.engine.context import align
from atpdsl.engine.corrections.shared import PATTERN_STAGE, PATTERN_TOLERANCE, check_supported, heads_view
from atpdsl.engine.rotary import rotary_function
from atpdsl.engine.node_table import Block, block_estimates
from atpdsl.engine.qkfix import QKFix, reduce_groups
from atpdsl.engine.state import BatchWork, ExtraSites, RunState

__all__ = ["QkLayer", "QkFix", "prepare_qk_fix", "qk_fix_step"]


@dataclass(slots=True)
class QkLayer:
    """What the QK fix needs for one layer: its q / k / pattern sites, scale and node blocks."""

    layer: int
    q_key: str
    k_key: str
    pattern_key: str
    scale: float
    q_blocks: list[Block]
    k_blocks: list[Block]


@dataclass(slots=True)
class QkFix:
    """The QK fix of one run (built once by `prepare_qk_fix`)."""

    state: RunState
    layers: list[QkLayer] = field(default_factory=list)
    rotary_keys: tuple[str, str] | None = None
    apply_rotary: object = None  # the model's own apply_rotary_pos_emb (rotary models)
    q_layout: object = None
    k_layout: object = None
    checked: bool = False

    def setup(self, extra: ExtraSites) -> None:
        """Find the layers with query / key nodes and add the sites their fix reads."""
        ctx = self.state.ctx
        loaded, table = ctx.loaded, ctx.table
        arch, geom = loaded.arch, loaded.geom
        per_layer: dict[int, tuple[list[Block], list[Block]]] = {}
        for b in table.blocks:
            if b.kind in ("queries", "keys"):
                qs, ks = per_layer.setdefault(table.sites[b.site].layer, ([], []))
                (qs if b.kind == "queries" else ks).append(b)
        qt, kt = arch.template("queries"), arch.template("keys")
        self.q_layout, self.k_layout = qt.resolve(geom), kt.resolve(geom)
        rotary = arch.rotary.module if arch.rotary is not None else None
        if per_layer and rotary is not None:
            self.rotary_keys = (extra.add(f"{rotary}.output.0", rotary, "output", (0, 0), 0, False),
                                extra.add(f"{rotary}.output.1", rotary, "output", (0, 1), 1, False))
            self.apply_rotary = rotary_function(loaded)
        for layer, (qs, ks) in sorted(per_layer.items()):
            attn = arch.template("heads").path(layer).rsplit(".", 1)[0]
            q_key = extra.add(f"{qt.path(layer)}.{qt.attr}", qt.path(layer), qt.attr, (layer, 10), grad=False)
            k_key = extra.add(f"{kt.path(layer)}.{kt.attr}", kt.path(layer), kt.attr, (layer, 11), grad=False)
            p_key = extra.add(f"{attn}.output.1", attn, "output", (layer, PATTERN_STAGE), 1)
            scale = float(getattr(loaded.hf.get_submodule(attn), "scaling", geom.head_dim ** -0.5))
            self.layers.append(QkLayer(layer, q_key, k_key, p_key, scale, qs, ks))

    @property
    def pattern_where(self) -> dict[str, tuple[int, str]]:
        """Pattern site key -> (layer, "attn"): where each pattern's gradient sits for GradDrop."""
        return {q.pattern_key: (q.layer, "attn") for q in self.layers}

    def prepared(self, work: BatchWork) -> dict[int, QKFix]:
        """The batch's prepared fix per layer (built once per batch, shared by the main pass and GradDrop)."""
        got = work.cache.get("qk")
        if got is None:
            got = work.cache["qk"] = {q.layer: self._prepare(work, q) for q in self.layers}
            self.checked = True
        return got

    def _prepare(self, work: BatchWork, q: QkLayer) -> QKFix:
        """The layer's post-rotary q / k (clean, and corrupt on clean positions) and its prepared QK fix."""
        batch = work.batch
        geom = self.state.ctx.loaded.geom
        real = batch.real.unsqueeze(-1)
        pre = {}
        for name, key in (("q", q.q_key), ("k", q.k_key)):
            clean = work.clean.acts[key]
            corrupt = torch.where(real, align(work.corrupt.acts[key], batch), clean)  # no node value: no change
            pre[name] = (clean, corrupt)
        q_clean, q_corrupt = (heads_view(x, self.q_layout) for x in pre["q"])
        k_clean, k_corrupt = (heads_view(x, self.k_layout) for x in pre["k"])
        if self.rotary_keys is not None:
            cos, sin = (work.clean.acts[k] for k in self.rotary_keys)  # clean positions for both runs
            q_clean, k_clean = self.apply_rotary(q_clean, k_clean, cos, sin)
            q_corrupt, k_corrupt = self.apply_rotary(q_corrupt, k_corrupt, cos, sin)
        rep = geom.n_heads // geom.n_kv_heads
        if rep > 1:
            k_clean, k_corrupt = k_clean.repeat_interleave(rep, dim=1), k_corrupt.repeat_interleave(rep, dim=1)
        am = batch.clean["attention_mask"].bool()
        s = am.shape[1]
        visible = torch.ones(s, s, dtype=torch.bool, device=am.device).tril()[None, None] & am[:, None, None, :]
        fix = QKFix(q_clean, k_clean, q.scale, visible,
                    q_corrupt=q_corrupt if q.q_blocks else None,
                    k_corrupt=k_corrupt if q.k_blocks else None,
                    per_key=any(b.per_position for b in q.k_blocks),
                    all_keys=any(not b.per_position for b in q.k_blocks))
        if not self.checked:
            self._check_pattern(work, q, fix)
        return fix

    def _check_pattern(self, work: BatchWork, q: QkLayer, fix: QKFix) -> None:
        """The pattern rebuilt from q, k, scale and mask must be the model's own (first batch only)."""
        tol = PATTERN_TOLERANCE.get(self.state.ctx.loaded.dtype, 1e-4)
        rows = fix.vis.any(-1, keepdim=True)  # query rows that see some key (fully padded rows do not matter)
        model = work.clean.acts[q.pattern_key].double()
        diff = float(((fix.pattern - model) * rows).abs().max())
        if not diff <= tol:
            raise EngineError(
                f"QK fix: the attention pattern rebuilt from q, k, the scale {q.scale:g} and the attention mask "
                f"differs from the model's own at layer {q.layer} (max |diff| {diff:.3g} > {tol:g}); this "
                f"attention variant (e.g. sliding windows, soft-capping, q/k norms) is not modelled: use `qk_fix off`"
            )

    def write(self, work: BatchWork, q: QkLayer, fix: QKFix, grad_pattern: torch.Tensor, est: torch.Tensor) -> None:
        """Overwrite the layer's query / key columns of est [b, N] with QK-fixed estimates for `grad_pattern`."""
        batch = work.batch
        geom = self.state.ctx.loaded.geom
        if q.q_blocks:
            per_unit = fix.queries(grad_pattern).float().transpose(1, 2)  # [B, T, H]
            for b in q.q_blocks:
                est[:, b.first: b.first + b.size] = block_estimates(b, per_unit, batch.real, batch.node_pos)
        per_pos = [b for b in q.k_blocks if b.per_position]
        summed = [b for b in q.k_blocks if not b.per_position]
        if per_pos:
            kf = fix.keys(grad_pattern).float()  # [B, H, S], one head's view of a key
            if geom.grouped:
                kf = reduce_groups(kf, geom.n_kv_heads)  # the KV group's key, seen by all its heads
            per_unit = kf.transpose(1, 2)
            for b in per_pos:
                est[:, b.first: b.first + b.size] = block_estimates(b, per_unit, batch.real, batch.node_pos)
        if summed:
            ak = fix.all_keys(grad_pattern).float()  # [B, H]
            if geom.grouped:
                ak = ak.view(ak.shape[0], geom.n_kv_heads, -1).sum(-1)
            for b in summed:
                est[:, b.first: b.first + b.size] = ak[:, list(b.units)]


def prepare_qk_fix(state: RunState, step: Step) -> None:
    """Build the run's QK fix and add the sites it reads."""
    check_supported(state.ctx, "qk_fix")
    fix = QkFix(state)
    fix.setup(state.extra)
    state.parts["qk"] = fix


def qk_fix_step(state: RunState, step: Step, work: BatchWork) -> None:
    """Rewrite the query / key columns of the batch's estimates with the plain backward's pattern gradients."""
    fix: QkFix = state.parts["qk"]
    prepared = fix.prepared(work)
    main = work.clean.grads[MAIN]
    for q in fix.layers:
        fix.write(work, q, prepared[q.layer], main[q.pattern_key], work.est)
