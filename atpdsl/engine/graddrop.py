"""GradDrop for AtP* (pure torch): which gradients to cut per term, the cutting identity, and the scoring rule.

What the engine must do (per batch of pairs, after the clean forward with the graph kept):

* Terms. mode "layer": L terms; term l cuts the gradient into BOTH block writes of layer l, the attention
  output (o_proj / dense / c_proj output, i.e. the tensor added to the residual stream) and the MLP output
  (down_proj / dense_4h_to_h / c_proj output of the MLP). mode "sublayer": 2L terms in forward order; term 2l cuts
  layer l's attention write only, term 2l+1 its MLP write only (`term_sites`).
* Cutting = the gradient arriving at that block write is replaced by zeros before it flows into the block;
  the residual skip path around the block keeps its gradient. In nnsight: inside `with metric.backward(
  retain_graph=True):` set `<write>.grad = torch.zeros_like(<write>.grad)` when the backward reaches it (reverse
  order: MLP write before attention write in a layer); in plain torch: `write.register_hook(lambda g:
  torch.zeros_like(g))` on the recorded write, or pass the write through `DropGradient.apply` in the forward.
  These agree to float rounding (tests/engine/test_graddrop_math.py, max |diff| ~1e-7 or 0).
  The cut write is a constant for that term, so its own gradient (used by whole-block `attn` / `mlp` nodes) is
  0: nnsight gives that when `.grad` is read after the assignment; `torch.autograd.grad(metric, [write])`
  captures the gradient before the tensor's hook runs, so zero it yourself there.
* For each term, read the gradients of every node site (z, neurons, q, k, v and the pattern for the QK fix) and
  form the estimate exactly as plain AtP does, `(corrupt - clean) . grad_term` (QK-fixed for queries / keys with
  grad_pattern from the same term). One forward, n_terms backward passes with retain_graph=True.
* Score per pair: `graddrop_score(estimates [n_terms, ...])` = sum_terms |estimate| / (n_terms - 1); the dataset
  score is the mean over pairs of the per-pair scores (abs inside the expectation). The signed `estimate` reported
  for a node stays the plain AtP (or QK-fixed) estimate.

Facts that follow (and that tests check): a node in layer m has a zero term l = m (its own block write is cut)
and terms l < m equal to plain AtP (cutting a lower layer leaves every gradient above it unchanged). So a node
whose effect is only direct (nothing downstream in later blocks), e.g. every node in the last layer (per
sublayer: in the last MLP, or the whole last layer with parallel blocks), scores exactly |AtP|; this is why
the divisor is n_terms - 1. Per sublayer with sequential blocks (Llama, GPT-2): an
attention-side node of layer m (head output, q, k, v, attn write) has zero term 2m and terms j < 2m equal to AtP;
an MLP-side node (neuron, mlp write) has zero term 2m+1 and terms j <= 2m equal to AtP. With parallel blocks
(GPT-NeoX use_parallel_residual, Pythia) the attention and MLP of one layer read the same input, so in addition
term 2m+1 equals AtP for attention-side nodes (and term 2m for MLP-side nodes, already covered).
"""
from __future__ import annotations

import torch

__all__ = [
    "DropGradient",
    "n_terms",
    "term_sites",
    "graddrop_score",
    "zero_and_atp_terms",
]


class DropGradient(torch.autograd.Function):
    """Identity in the forward pass; the backward pass sends no gradient into its input (a cut block write)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return torch.zeros_like(grad)


def _check_mode(mode: str) -> None:
    if mode not in ("layer", "sublayer"):
        raise ValueError(f"GradDrop mode must be 'layer' or 'sublayer', not {mode!r}")


def n_terms(n_layers: int, mode: str = "layer") -> int:
    """Number of backward passes / terms: L per layer, 2L per sublayer."""
    _check_mode(mode)
    if n_layers < 1:
        raise ValueError(f"GradDrop needs at least one layer, got {n_layers}")
    return n_layers if mode == "layer" else 2 * n_layers


def term_sites(n_layers: int, mode: str = "layer") -> list[tuple[tuple[int, str], ...]]:
    """For each term, the block writes whose incoming gradient is zeroed: ((layer, "attn"|"mlp"), ...)."""
    _check_mode(mode)
    if mode == "layer":
        return [((l, "attn"), (l, "mlp")) for l in range(n_layers)]
    return [((l, s),) for l in range(n_layers) for s in ("attn", "mlp")]


def graddrop_score(estimates: torch.Tensor) -> torch.Tensor:
    """Per-pair GradDrop score from per-term estimates [n_terms, ...]: sum_terms |estimate| / (n_terms - 1)."""
    n = estimates.shape[0]
    if n < 2:
        raise ValueError(f"GradDrop needs at least 2 terms (a model with 2+ layers, or per sublayer); got {n}")
    return estimates.abs().sum(0) / (n - 1)


def zero_and_atp_terms(layer: int, side: str, n_layers: int, mode: str = "layer",
                       parallel: bool = False) -> tuple[int, list[int]]:
    """For a node of `layer` on `side` ("attn" or "mlp"): the term that is exactly 0 and the terms equal to AtP."""
    _check_mode(mode)
    if side not in ("attn", "mlp"):
        raise ValueError(f"side must be 'attn' or 'mlp', not {side!r}")
    if not 0 <= layer < n_layers:
        raise ValueError(f"layer {layer} outside 0..{n_layers - 1}")
    if mode == "layer":
        return layer, list(range(layer))
    own = 2 * layer + (0 if side == "attn" else 1)
    same = [2 * layer + 1] if (parallel and side == "attn") else []
    return own, list(range(2 * layer)) + ([2 * layer] if side == "mlp" else []) + same
