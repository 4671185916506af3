"""Prompt pairs to token tensors: lengths, slot alignment, answer tokens, left-padded batches."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from atpdsl.errors import DataError, EngineError
from atpdsl.plan import MetricSpec, PromptPair, SourceRef

__all__ = ["EncodedPair", "Batch", "encode_pairs", "make_batches", "node_positions", "where_text"]


def where_text(where: SourceRef | None) -> str:
    """`file:line:col: ` for a message, or nothing when the item has no source position."""
    if where is None:
        return ""
    return f"{where.file}:{where.line}:{where.column}: "


@dataclass(frozen=True, slots=True)
class EncodedPair:
    """One pair as token ids, with the clean-to-corrupt position map and resolved metric tokens.

    `cmap[t]` is the corrupt-prompt position aligned with clean position t, or -1 when the clean token
    has no partner (only inside a template slot whose two values tokenize to different lengths).
    `answers` holds the metric's argument tokens; `eval_answers` those of the evaluation metric.
    """

    index: int
    origin: str
    clean: tuple[int, ...]
    corrupt: tuple[int, ...]
    cmap: tuple[int, ...]
    metric_pos: int  # clean position the metric reads
    corrupt_metric_pos: int
    eval_pos: int
    corrupt_eval_pos: int
    answers: tuple[int, ...]
    eval_answers: tuple[int, ...]
    slot_last: tuple[tuple[str, int], ...]  # slot name -> last clean token of the slot

    @property
    def identity(self) -> bool:
        """Whether clean and corrupt positions align one to one."""
        return len(self.clean) == len(self.corrupt)


def _ids(tok, text: str, special: bool = True) -> list[int]:
    return list(tok(text, add_special_tokens=special)["input_ids"])


def _token_span(offsets: Sequence[tuple[int, int]], start: int, end: int) -> tuple[int, int] | None:
    """First and last token overlapping the character range [start, end)."""
    hit = [i for i, (a, b) in enumerate(offsets) if b > a and a < end and b > start]
    return (hit[0], hit[-1]) if hit else None


def _tokens_text(tok, ids: Sequence[int]) -> str:
    return "[" + ", ".join(repr(t) for t in tok.convert_ids_to_tokens(list(ids))) + "]"


def _answer_tokens(tok, pair: PromptPair, spec: MetricSpec, clean_ids: list[int], at_last: bool) -> tuple[int, ...]:
    """One token per metric argument: the tokens the text adds after the clean prompt."""
    out: list[int] = []
    args = spec.args
    if spec.kind == "loss" and not args:
        from atpdsl.plan import MetricArg

        args = (MetricArg(field="answer"),)
    for arg in args:
        try:
            text = arg.text(pair)
        except KeyError:
            raise DataError(
                f"{where_text(spec.where)}pair {pair.origin or '?'} has no field {arg.field!r} "
                f"(fields: {', '.join(k for k, _ in pair.fields) or 'none'})"
            ) from None
        ids: list[int] = []
        if at_last:
            # The answer as the model would continue the clean prompt (tokenizers that fold a
            # leading space into the next word need the context).
            full = _ids(tok, pair.clean + text)
            if full[: len(clean_ids)] == clean_ids:
                ids = full[len(clean_ids):]
        if not ids:
            ids = _ids(tok, text, special=False)
        if not ids:
            raise DataError(f"{where_text(spec.where)}answer {text!r} of pair {pair.origin or '?'} has no tokens")
        if len(ids) > 1 and not arg.first_token:
            raise DataError(
                f"{where_text(spec.where)}answer {text!r} of pair {pair.origin or '?'} is {len(ids)} tokens "
                f"{_tokens_text(tok, ids)}; a metric needs one token: write first_token({arg.field or repr(text)}) "
                f"to use the first, or pick a single-token answer"
            )
        out.append(ids[0])
    return tuple(out)


def _slot_spans(tok, pair: PromptPair, clean_ids: list[int], corrupt_ids: list[int]):
    """Per slot: (name, clean token span, corrupt token span), in prompt order."""
    if not pair.slots:
        return []
    co = tok(pair.clean, return_offsets_mapping=True)["offset_mapping"]
    ko = tok(pair.corrupt, return_offsets_mapping=True)["offset_mapping"]
    spans = []
    for slot in pair.slots:
        cs = _token_span(co, slot.clean.start, slot.clean.end)
        ks = _token_span(ko, slot.corrupt.start, slot.corrupt.end)
        if cs is None or ks is None:
            raise DataError(f"pair {pair.origin or '?'}: template slot {slot.name!r} covers no token")
        spans.append((slot.name, cs, ks))
    spans.sort(key=lambda s: s[1][0])
    return spans


def _align(pair: PromptPair, tok, clean_ids: list[int], corrupt_ids: list[int], spans) -> tuple[int, ...]:
    """Clean position -> corrupt position; text outside slots must tokenize alike in both prompts."""
    if len(clean_ids) == len(corrupt_ids):
        return tuple(range(len(clean_ids)))
    if not spans:
        raise DataError(
            f"pair {pair.origin or '?'}: clean and corrupt prompts tokenize to different lengths "
            f"({len(clean_ids)} vs {len(corrupt_ids)} tokens); clean {_tokens_text(tok, clean_ids)}, "
            f"corrupt {_tokens_text(tok, corrupt_ids)}. Make them the same length, or write the pair as a "
            f"template whose named slots mark the words that differ"
        )
    cmap = [-1] * len(clean_ids)
    c_prev = k_prev = 0
    for name, (cf, cl), (kf, kl) in spans + [("", (len(clean_ids), -1), (len(corrupt_ids), -1))]:
        if cf - c_prev != kf - k_prev:
            raise DataError(
                f"pair {pair.origin or '?'}: the text before slot {name or '(end)'!r} tokenizes to "
                f"{cf - c_prev} tokens in the clean prompt but {kf - k_prev} in the corrupt one; clean "
                f"{_tokens_text(tok, clean_ids)}, corrupt {_tokens_text(tok, corrupt_ids)}"
            )
        for i in range(cf - c_prev):
            cmap[c_prev + i] = k_prev + i
        if cl < 0:
            break
        # inside a slot: align from the slot's last token backwards
        n = min(cl - cf, kl - kf) + 1
        for i in range(n):
            cmap[cl - i] = kl - i
        c_prev, k_prev = cl + 1, kl + 1
    return tuple(cmap)


def _position(spec: MetricSpec, n_tokens: int, slots: dict[str, int], pair: PromptPair) -> int:
    if spec.position == "last":
        return n_tokens - 1
    if spec.position in slots:
        return slots[spec.position]
    raise DataError(
        f"{where_text(spec.where)}metric reads at {spec.position!r} but pair {pair.origin or '?'} has no such "
        f"slot (slots: {', '.join(slots) or 'none'}); use `at last` or a template slot name"
    )


def encode_pairs(tok, pairs: Sequence[PromptPair], metric: MetricSpec, eval_metric: MetricSpec | None,
                 ) -> list[EncodedPair]:
    """Tokenize every pair, check lengths and answers, and align positions (DataError on bad input)."""
    out = []
    for i, pair in enumerate(pairs):
        clean = _ids(tok, pair.clean)
        corrupt = _ids(tok, pair.corrupt)
        spans = _slot_spans(tok, pair, clean, corrupt)
        cmap = _align(pair, tok, clean, corrupt, spans)
        c_slots = {name: cs[1] for name, cs, _ in spans}
        k_slots = {name: ks[1] for name, _, ks in spans}
        em = eval_metric or metric
        out.append(EncodedPair(
            index=i,
            origin=pair.origin or f"pair {i}",
            clean=tuple(clean),
            corrupt=tuple(corrupt),
            cmap=cmap,
            metric_pos=_position(metric, len(clean), c_slots, pair),
            corrupt_metric_pos=_position(metric, len(corrupt), k_slots, pair),
            eval_pos=_position(em, len(clean), c_slots, pair),
            corrupt_eval_pos=_position(em, len(corrupt), k_slots, pair),
            answers=_answer_tokens(tok, pair, metric, clean, metric.position == "last"),
            eval_answers=_answer_tokens(tok, pair, em, clean, em.position == "last"),
            slot_last=tuple(sorted(c_slots.items())),
        ))
    return out


def node_positions(pairs: Sequence[EncodedPair]) -> tuple[str, list[int | str]]:
    """How per-position nodes are named across the dataset, so that one name means one place in every pair.

    - ("index", [0..T-1]) when every clean prompt has T tokens;
    - ("slots", names) when lengths differ and every pair has the same template slots (a slot's last token);
    - ("end", [-m..-1]) when lengths differ, there are no shared slots, and the prompts end alike (same last
      token): positions count from the end, m = the shortest prompt's length; earlier tokens of longer
      prompts are not nodes.
    Otherwise EngineError: a position index would point at different words in different pairs.
    """
    lengths = {len(p.clean) for p in pairs}
    if len(lengths) == 1:
        return "index", list(range(lengths.pop()))
    names = [tuple(n for n, _ in p.slot_last) for p in pairs]
    if names[0] and all(n == names[0] for n in names):
        return "slots", list(names[0])
    if all(p.clean[-1] == pairs[0].clean[-1] for p in pairs):
        m = min(lengths)
        return "end", list(range(-m, 0))
    short = min(pairs, key=lambda p: len(p.clean))
    long = max(pairs, key=lambda p: len(p.clean))
    raise EngineError(
        f"per-position nodes need pairs whose positions mean the same token, but {short.origin} has "
        f"{len(short.clean)} tokens and {long.origin} has {len(long.clean)}, and the prompts neither share "
        f"template slots nor end with the same token, so a position would point at different words. Fix: make "
        f"every prompt the same token length, write the pairs as a template with named slots (positions become "
        f"@slot), end every prompt alike (positions then count from the end, @-1 = last token), or drop "
        f"`per position` to sum over positions"
    )


@dataclass(frozen=True, slots=True)
class Batch:
    """A left-padded batch: model inputs for both prompts plus index tensors in padded coordinates."""

    pairs: tuple[EncodedPair, ...]
    clean: dict[str, torch.Tensor]  # input_ids, attention_mask, position_ids
    corrupt: dict[str, torch.Tensor]
    cmap: torch.Tensor | None  # [b, S] padded corrupt position per clean position (-1 none); None = identity
    real: torch.Tensor  # [b, S] bool: clean positions that carry a node value (real and aligned)
    metric_pos: torch.Tensor  # [b]
    corrupt_metric_pos: torch.Tensor
    eval_pos: torch.Tensor
    corrupt_eval_pos: torch.Tensor
    answers: torch.Tensor  # [b, n_args]
    eval_answers: torch.Tensor
    node_pos: torch.Tensor | None  # [b, P] padded clean position of each per-position node position

    @property
    def size(self) -> int:
        return len(self.pairs)

    @property
    def indices(self) -> list[int]:
        return [p.index for p in self.pairs]


def _pad(seqs: Sequence[Sequence[int]], width: int, pad_id: int, device) -> dict[str, torch.Tensor]:
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s):] = torch.tensor(list(s), dtype=torch.long)
            mask[i, width - len(s):] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "position_ids": pos.to(device)}


def make_batches(pairs: Sequence[EncodedPair], size: int, pad_id: int, device,
                 positions: tuple[str, list[int | str]] | None = None) -> list[Batch]:
    """Split pairs into left-padded batches of at most `size` (clean and corrupt padded to one width)."""
    batches = []
    size = max(1, int(size))
    for lo in range(0, len(pairs), size):
        chunk = pairs[lo: lo + size]
        width = max(max(len(p.clean), len(p.corrupt)) for p in chunk)
        clean = _pad([p.clean for p in chunk], width, pad_id, device)
        corrupt = _pad([p.corrupt for p in chunk], width, pad_id, device)
        real = torch.zeros((len(chunk), width), dtype=torch.bool)
        identity = all(p.identity for p in chunk)
        cmap = None if identity else torch.full((len(chunk), width), -1, dtype=torch.long)
        for i, p in enumerate(chunk):
            c_off = width - len(p.clean)
            k_off = width - len(p.corrupt)
            for t, k in enumerate(p.cmap):
                if k >= 0:
                    real[i, c_off + t] = True
                    if cmap is not None:
                        cmap[i, c_off + t] = k_off + k

        def padded(attr: str, corrupt_side: bool = False) -> torch.Tensor:
            vals = []
            for p in chunk:
                n = len(p.corrupt) if corrupt_side else len(p.clean)
                vals.append(width - n + getattr(p, attr))
            return torch.tensor(vals, dtype=torch.long, device=device)

        node_pos = None
        if positions is not None:
            mode, names = positions
            rows = []
            for p in chunk:
                off = width - len(p.clean)
                slots = dict(p.slot_last)
                if mode == "index":
                    rows.append([off + int(n) for n in names])
                elif mode == "end":
                    rows.append([width + int(n) for n in names])
                else:
                    rows.append([off + slots[str(n)] for n in names])
            node_pos = torch.tensor(rows, dtype=torch.long, device=device).reshape(len(chunk), len(names))
        batches.append(Batch(
            pairs=tuple(chunk),
            clean=clean,
            corrupt=corrupt,
            cmap=None if cmap is None else cmap.to(device),
            real=real.to(device),
            metric_pos=padded("metric_pos"),
            corrupt_metric_pos=padded("corrupt_metric_pos", True),
            eval_pos=padded("eval_pos"),
            corrupt_eval_pos=padded("corrupt_eval_pos", True),
            answers=torch.tensor([p.answers for p in chunk], dtype=torch.long, device=device).reshape(len(chunk), -1),
            eval_answers=torch.tensor([p.eval_answers for p in chunk], dtype=torch.long,
                                      device=device).reshape(len(chunk), -1),
            node_pos=node_pos,
        ))
    return batches
