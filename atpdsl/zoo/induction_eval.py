"""Measure the induction circuit of a `<bos> A A` model: copy losses, attention scores, head patching.

Shared by the training script (which prints these numbers) and the tests (which assert them on the
shipped weights). Plain PyTorch hooks on GPT-NeoX modules, independent of the atpdsl engine, so the
engine's AtP / AtP* numbers can be checked against them.
"""
from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from atpdsl.zoo.induction_data import BOS, N_WORDS, InductionPair, random_sequence, token_id

__all__ = [
    "CopyEval",
    "HeadEffects",
    "encode_pairs",
    "evaluate_copying",
    "head_effects",
    "qkv_effect",
    "QKV_KINDS",
    "repeated_batch",
]

Grid = tuple[tuple[float, ...], ...]
"""Values per layer, then per head."""


def repeated_batch(count: int, n: int, seed: int) -> torch.Tensor:
    """`count` sequences `<bos> A A` of n distinct tokens each, as ids of shape (count, 2n+1)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        seq = [token_id(t) for t in random_sequence(rng, n)]
        rows.append([BOS, *seq, *seq])
    return torch.tensor(rows, dtype=torch.long)


@dataclass(frozen=True, slots=True)
class CopyEval:
    """How well a model copies, and which heads do it, on `<bos> A A` with |A| = n.

    Losses are mean next-token cross-entropies (nats). The first copy excludes x_1 (nothing to see yet);
    the second copy excludes its first token (it follows the end of A, which never preceded it).
    `induction[l][h]`: mean attention from a second-copy position q to q-n+1, the token after the first
    occurrence of the current token. `prev_token[l][h]`: mean attention from t to t-1 over both copies.
    """

    n: int
    count: int
    loss_first_copy: float
    loss_second_copy: float
    accuracy_second_copy: float
    induction: Grid
    prev_token: Grid

    @property
    def log_vocab(self) -> float:
        """Chance level for the first copy: log of the 64 ordinary tokens."""
        return math.log(N_WORDS)

    def best(self, scores: Grid, layer: int) -> tuple[int, float]:
        """(head, score) of the highest-scoring head in `layer`."""
        row = scores[layer]
        head = max(range(len(row)), key=row.__getitem__)
        return head, row[head]

    def checks(self) -> dict[str, tuple[bool, str]]:
        """The shipped model's promises, each (holds, what was measured): the canonical circuit is there.

        Low loss alone is not enough (a model can copy with a shifted circuit), hence the attention checks.
        """
        ind_head, ind = self.best(self.induction, 1)
        prev_head, prev = self.best(self.prev_token, 0)
        first, second = self.loss_first_copy, self.loss_second_copy
        return {
            "second-copy loss < 1% of first-copy loss": (
                second < 0.01 * first, f"{second:.4f} vs {first:.3f}"),
            "first-copy loss near chance (log 64)": (
                abs(first - self.log_vocab) < 0.25, f"{first:.3f} vs {self.log_vocab:.3f}"),
            "layer-1 induction head, score > 0.9": (ind > 0.9, f"L1H{ind_head} {ind:.3f}"),
            "layer-0 previous-token head, score > 0.8": (prev > 0.8, f"L0H{prev_head} {prev:.3f}"),
        }

    def as_dict(self) -> dict[str, Any]:
        """JSON-able numbers."""
        return {
            "n": self.n, "count": self.count,
            "loss_first_copy": self.loss_first_copy, "loss_second_copy": self.loss_second_copy,
            "accuracy_second_copy": self.accuracy_second_copy,
            "induction": [list(r) for r in self.induction],
            "prev_token": [list(r) for r in self.prev_token],
        }


@torch.no_grad()
def evaluate_copying(model: torch.nn.Module, *, n: int = 16, count: int = 256, seed: int = 1234) -> CopyEval:
    """Copy losses and attention scores on `count` held-out sequences (one forward pass).

    Needs a model loaded with eager attention: other attention kernels return no attention weights.
    """
    was_training = model.training
    model.eval()
    try:
        ids = repeated_batch(count, n, seed)
        out = model(ids, output_attentions=True)
    finally:
        model.train(was_training)
    if not out.attentions or out.attentions[0] is None:
        raise ValueError("the model returned no attention weights; load it with attn_implementation='eager'")
    logp = F.log_softmax(out.logits.float(), dim=-1)
    # nll[:, t-1] is the loss of predicting the token at position t
    nll = -logp[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]
    first = nll[:, 1:n].mean().item()                   # targets 2..n
    second = nll[:, n + 1:2 * n].mean().item()          # targets n+2..2n
    predicted = out.logits[:, n + 1:2 * n].argmax(-1)   # predictions for targets n+2..2n
    accuracy = (predicted == ids[:, n + 2:]).float().mean().item()
    queries = torch.arange(n + 1, 2 * n + 1)
    later = torch.arange(1, 2 * n + 1)
    induction, prev = [], []
    for att in out.attentions:                          # (batch, heads, query, key)
        induction.append(tuple(att[:, :, queries, queries - n + 1].mean(dim=(0, 2)).tolist()))
        prev.append(tuple(att[:, :, later, later - 1].mean(dim=(0, 2)).tolist()))
    return CopyEval(n=n, count=count, loss_first_copy=first, loss_second_copy=second,
                    accuracy_second_copy=accuracy, induction=tuple(induction), prev_token=tuple(prev))


def encode_pairs(tokenizer: Any, pairs: Sequence[InductionPair | dict[str, str]]
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token ids (clean, corrupt, answer, wrong) of prompt pairs, through the model's own tokenizer.

    Prompts get the tokenizer's special tokens (its `<bos>`); answers must be exactly one token without
    them. All prompts must have one length, so that they batch without padding.
    """
    records = [p.as_json() if isinstance(p, InductionPair) else p for p in pairs]
    if not records:
        raise ValueError("no prompt pairs")

    def one_token(text: str) -> int:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise ValueError(f"answer {text!r} is {len(ids)} tokens, not one")
        return ids[0]

    clean = [tokenizer(r["clean"])["input_ids"] for r in records]
    corrupt = [tokenizer(r["corrupt"])["input_ids"] for r in records]
    lengths = {len(x) for x in clean + corrupt}
    if len(lengths) != 1:
        raise ValueError(f"prompts differ in length ({sorted(lengths)} tokens); expected one length")
    answer = [one_token(r["answer"]) for r in records]
    wrong = [one_token(r["wrong"]) for r in records]
    as_tensor = lambda x: torch.tensor(x, dtype=torch.long)  # noqa: E731
    return as_tensor(clean), as_tensor(corrupt), as_tensor(answer), as_tensor(wrong)


@dataclass(frozen=True, slots=True)
class HeadEffects:
    """Per-head effects on M = logit(answer) - logit(wrong) at the last position, means over pairs.

    `exact[l][h]`: M(clean run with head (l, h)'s output at every position set to its corrupt-run value)
    - M(clean run). `atp[l][h]`: the attribution-patching estimate (z_corrupt - z_clean) . dM/dz at the
    clean run, summed over positions. Head output z = the head's slice of the attention output
    projection's input (atpdsl's `L1.H0`).
    """

    clean_metric: float
    corrupt_metric: float
    exact: Grid
    atp: Grid

    def as_dict(self) -> dict[str, Any]:
        """JSON-able numbers."""
        return {"clean_metric": self.clean_metric, "corrupt_metric": self.corrupt_metric,
                "exact": [list(r) for r in self.exact], "atp": [list(r) for r in self.atp]}


QKV_KINDS = ("q", "k", "v")


def qkv_effect(model: torch.nn.Module, clean: torch.Tensor, corrupt: torch.Tensor, answer: torch.Tensor,
               wrong: torch.Tensor, *, layer: int, head: int, kind: str, position: int) -> tuple[float, float]:
    """(exact, AtP) mean effect of one head's query, key or value at one position (atpdsl's `L1.H0.k@6`).

    Patched at the output of the fused q/k/v projection, before rotary; clean and corrupt positions are
    aligned, so this equals patching after rotation (the rotation is the same orthogonal map in both runs).
    """
    if kind not in QKV_KINDS:
        raise ValueError(f"kind {kind!r} is not one of {QKV_KINDS}")
    try:
        proj = model.gpt_neox.layers[layer].attention.query_key_value
    except (AttributeError, IndexError) as exc:
        raise ValueError(f"no GPT-NeoX attention in layer {layer}") from exc
    n_heads = model.config.num_attention_heads
    head_dim = model.config.hidden_size // n_heads
    # the fused output is viewed as (..., heads, 3 * head_dim): q, k, v for head 0, then head 1, ...
    start = head * 3 * head_dim + QKV_KINDS.index(kind) * head_dim
    cols = slice(start, start + head_dim)
    rows = torch.arange(clean.shape[0])

    def run(ids: torch.Tensor, source: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        seen = []

        def hook(module: torch.nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
            if source is not None:
                out = out.clone()
                out[:, position, cols] = source[:, position, cols]
            seen.append(out)
            return out
        handle = proj.register_forward_hook(hook)
        try:
            last = model(ids).logits[:, -1]
        finally:
            handle.remove()
        return last[rows, answer] - last[rows, wrong], seen[0]

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            _, corrupt_out = run(corrupt)
            patched, _ = run(clean, source=corrupt_out)
        with torch.enable_grad():
            clean_m, clean_out = run(clean)
            (grad,) = torch.autograd.grad(clean_m.sum(), clean_out)
        delta = corrupt_out[:, position, cols] - clean_out.detach()[:, position, cols]
        atp = (delta * grad[:, position, cols]).sum(dim=-1).mean().item()
        exact = (patched - clean_m.detach()).mean().item()
    finally:
        model.train(was_training)
    return exact, atp


def _out_projections(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The attention output projection of every layer of a GPT-NeoX model."""
    try:
        return [layer.attention.dense for layer in model.gpt_neox.layers]
    except AttributeError as exc:
        raise ValueError(f"{type(model).__name__} is not a GPT-NeoX causal LM") from exc


def head_effects(model: torch.nn.Module, clean: torch.Tensor, corrupt: torch.Tensor,
                 answer: torch.Tensor, wrong: torch.Tensor) -> HeadEffects:
    """Exact per-head activation patching and plain AtP for a batch of prompt pairs (see HeadEffects)."""
    if clean.shape != corrupt.shape:
        raise ValueError(f"clean {tuple(clean.shape)} and corrupt {tuple(corrupt.shape)} ids differ in shape")
    projections = _out_projections(model)
    n_heads = model.config.num_attention_heads
    head_dim = model.config.hidden_size // n_heads
    rows = torch.arange(clean.shape[0])

    def metric(logits: torch.Tensor) -> torch.Tensor:
        last = logits[:, -1]
        return last[rows, answer] - last[rows, wrong]            # one value per pair

    def run(ids: torch.Tensor, patch: tuple[int, int] | None = None,
            source: list[torch.Tensor] | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Metric per pair and each layer's head outputs z; optionally one head's z from `source`."""
        seen: list[torch.Tensor] = []
        hooks = []
        for layer, proj in enumerate(projections):
            def pre_hook(module: torch.nn.Module, args: tuple, layer: int = layer) -> tuple:
                z = args[0]
                if patch is not None and patch[0] == layer:
                    cols = slice(patch[1] * head_dim, (patch[1] + 1) * head_dim)
                    z = z.clone()
                    z[..., cols] = source[layer][..., cols]
                seen.append(z)
                return (z, *args[1:])
            hooks.append(proj.register_forward_pre_hook(pre_hook))
        try:
            values = metric(model(ids).logits)
        finally:
            for hook in hooks:
                hook.remove()
        return values, seen

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            corrupt_m, corrupt_z = run(corrupt)
        with torch.enable_grad():
            clean_m, clean_z = run(clean)
            grads = torch.autograd.grad(clean_m.sum(), clean_z)   # per-pair gradients (pairs independent)
        exact, atp = [], []
        with torch.no_grad():
            for layer in range(len(projections)):
                exact_row, atp_row = [], []
                for head in range(n_heads):
                    cols = slice(head * head_dim, (head + 1) * head_dim)
                    delta = corrupt_z[layer][..., cols] - clean_z[layer].detach()[..., cols]
                    atp_row.append((delta * grads[layer][..., cols]).sum(dim=(1, 2)).mean().item())
                    patched_m, _ = run(clean, patch=(layer, head), source=corrupt_z)
                    exact_row.append((patched_m - clean_m.detach()).mean().item())
                exact.append(tuple(exact_row))
                atp.append(tuple(atp_row))
    finally:
        model.train(was_training)
    return HeadEffects(clean_metric=clean_m.mean().item(), corrupt_metric=corrupt_m.mean().item(),
                       exact=tuple(exact), atp=tuple(atp))
