"""Prompt pairs to token tensors: the encoding rule of language/encoding.py (shared with `check`) turned into
left-padded batches with the positions and tokens each metric reads.

A batch holds `per_pair` model rows per pair, pair-major: one row, or one per `sequence(...)` argument (the
prompt followed by that answer's tokens but the last, teacher-forced). Answer positions are never nodes
(`real` is False there). Per-row tensors (estimates) become per-pair ones with `pair_sum`.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from atpdsl.engine.metrics import MetricReads
from atpdsl.errors import DataError, EngineError
from atpdsl.language.encoding import EncodedPair, TokenRead, as_tokenizer, where_prefix
from atpdsl.language.encoding import encode_pairs as _encode
from atpdsl.plan import MetricSpec, PromptPair, SourceRef

__all__ = ["EncodedPair", "Batch", "encode_pairs", "make_batches", "node_positions", "where_text", "pair_sum"]


def where_text(where: SourceRef | None) -> str:
    """`file:line:col: ` for a message, or nothing when the item has no source position."""
    return where_prefix(where)


def encode_pairs(tok, pairs: Sequence[PromptPair], metric: MetricSpec, eval_metric: MetricSpec | None,
                 ) -> list[EncodedPair]:
    """Tokenize every pair, check lengths and answers, and align positions (DataError on the first bad pair)."""
    encoded, problems = _encode(as_tokenizer(tok), pairs, metric, eval_metric)
    if problems:
        p = problems[0]
        more = f" (and {len(problems) - 1} more pairs with problems; `atpdsl check` lists them)" if len(problems) > 1 \
            else ""
        raise DataError(f"{where_prefix(p.where)}{p.message}{more}")
    return [e for e in encoded if e is not None]


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
    """A left-padded batch: model inputs for both prompts plus index tensors in padded coordinates.

    Inputs, `cmap`, `real` and `node_pos` have one row per model row (`pairs * per_pair`); `metric_pos`,
    `answers` and their eval twins one per pair (row 0's: the one-position metric call); `reads`/`eval_reads`
    what each metric reads (atpdsl.engine.metrics.MetricReads).
    """

    pairs: tuple[EncodedPair, ...]
    clean: dict[str, torch.Tensor]  # input_ids, attention_mask, position_ids
    corrupt: dict[str, torch.Tensor]
    cmap: torch.Tensor | None  # [rows, S] padded corrupt position per clean position (-1 none); None = identity
    real: torch.Tensor  # [rows, S] bool: clean positions that carry a node value (real and aligned)
    metric_pos: torch.Tensor  # [b]
    corrupt_metric_pos: torch.Tensor
    eval_pos: torch.Tensor
    corrupt_eval_pos: torch.Tensor
    answers: torch.Tensor  # [b, n_args]
    eval_answers: torch.Tensor
    node_pos: torch.Tensor | None  # [rows, P] padded clean position of each per-position node position
    reads: MetricReads | None = None
    eval_reads: MetricReads | None = None
    per_pair: int = 1

    @property
    def size(self) -> int:
        return len(self.pairs)

    @property
    def n_rows(self) -> int:
        """Model rows: pairs times rows per pair."""
        return len(self.pairs) * self.per_pair

    @property
    def indices(self) -> list[int]:
        return [p.index for p in self.pairs]


def pair_sum(batch: Batch, rows: torch.Tensor) -> torch.Tensor:
    """A per-row tensor [rows, ...] as per-pair sums [pairs, ...] (identity with one row per pair): the AtP
    estimate of a pair is the sum of its rows' estimates, since a node is patched in all of them."""
    if batch.per_pair == 1:
        return rows
    return rows.view(batch.size, batch.per_pair, *rows.shape[1:]).sum(1)


def _pad(seqs: Sequence[Sequence[int]], width: int, pad_id: int, device) -> dict[str, torch.Tensor]:
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s):] = torch.tensor(list(s), dtype=torch.long)
            mask[i, width - len(s):] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "position_ids": pos.to(device)}


def _own_reads(p: EncodedPair, attr: str) -> tuple[TokenRead, ...]:
    """A pair's reads of one metric; for a pair built by hand without them, its one-token answers."""
    mine: tuple[TokenRead, ...] = getattr(p, attr)
    if mine:
        return mine
    eval_ = attr == "eval_reads"
    pos, kpos = (p.eval_pos, p.corrupt_eval_pos) if eval_ else (p.metric_pos, p.corrupt_metric_pos)
    return tuple(TokenRead(0, pos, kpos, t, k) for k, t in enumerate(p.eval_answers if eval_ else p.answers))


def _reads(chunk: Sequence[EncodedPair], attr: str, width: int, per_pair: int, sequence: tuple[bool, ...],
           device) -> MetricReads:
    """MetricReads of one metric (`attr`: "reads" or "eval_reads") in padded coordinates."""
    rows: list[list[TokenRead]] = []
    offsets: list[tuple[int, int]] = []
    firsts: list[tuple[int, int]] = []
    for p in chunk:
        mine = _own_reads(p, attr)
        pos = p.metric_pos if attr == "reads" else p.eval_pos
        kpos = p.corrupt_metric_pos if attr == "reads" else p.corrupt_eval_pos
        for r, tail in enumerate(p.tails):
            rows.append(sorted((t for t in mine if t.row == r), key=lambda t: t.clean_pos))
            offsets.append((width - len(p.clean) - len(tail), width - len(p.corrupt) - len(tail)))
            firsts.append((pos, kpos))
    k = max(1, max(len(r) for r in rows))
    shape = (len(rows), k)
    pos_t, kpos_t = torch.zeros(shape, dtype=torch.long), torch.zeros(shape, dtype=torch.long)
    tok_t, arg_t = torch.zeros(shape, dtype=torch.long), torch.full(shape, -1, dtype=torch.long)
    for i, (reads, (c_off, k_off), (pos, kpos)) in enumerate(zip(rows, offsets, firsts)):
        pos_t[i], kpos_t[i] = c_off + pos, k_off + kpos  # padding reads sit at the metric position
        for j, t in enumerate(reads):
            pos_t[i, j], kpos_t[i, j] = c_off + t.clean_pos, k_off + t.corrupt_pos
            tok_t[i, j], arg_t[i, j] = t.token, t.arg
    return MetricReads(pos_t.to(device), kpos_t.to(device), tok_t.to(device), arg_t.to(device), per_pair, sequence)


def _node_rows(p: EncodedPair, off: int, positions: tuple[str, list[int | str]]) -> list[int]:
    mode, names = positions
    if mode == "index":
        return [off + int(n) for n in names]
    if mode == "end":
        return [off + len(p.clean) + int(n) for n in names]
    slots = dict(p.slot_last)
    return [off + slots[str(n)] for n in names]


def _row_maps(chunk: Sequence[EncodedPair], width: int, identity: bool):
    """Per model row: `real` (prompt positions with a partner) and the padded clean -> corrupt map."""
    n_rows = sum(len(p.tails) for p in chunk)
    real = torch.zeros((n_rows, width), dtype=torch.bool)
    cmap = None if identity else torch.full((n_rows, width), -1, dtype=torch.long)
    i = 0
    for p in chunk:
        for tail in p.tails:
            c_off = width - len(p.clean) - len(tail)
            k_off = width - len(p.corrupt) - len(tail)
            for t, k in enumerate(p.cmap):
                if k >= 0:
                    real[i, c_off + t] = True
                    if cmap is not None:
                        cmap[i, c_off + t] = k_off + k
            if cmap is not None:
                for j in range(len(tail)):  # answer positions align with each other (never nodes)
                    cmap[i, c_off + len(p.clean) + j] = k_off + len(p.corrupt) + j
            i += 1
    return real, cmap


def _batch(chunk: Sequence[EncodedPair], pad_id: int, device, positions, metric_sequence: tuple[bool, ...],
           eval_sequence: tuple[bool, ...]) -> Batch:
    per_pair = len(chunk[0].tails)
    width = max(max(len(p.clean), len(p.corrupt)) + len(t) for p in chunk for t in p.tails)
    clean = _pad([p.clean + t for p in chunk for t in p.tails], width, pad_id, device)
    corrupt = _pad([p.corrupt + t for p in chunk for t in p.tails], width, pad_id, device)
    real, cmap = _row_maps(chunk, width, all(p.identity for p in chunk))

    def padded(attr: str, corrupt_side: bool = False) -> torch.Tensor:
        vals = [width - (len(p.corrupt) if corrupt_side else len(p.clean)) - len(p.tails[0]) + getattr(p, attr)
                for p in chunk]
        return torch.tensor(vals, dtype=torch.long, device=device)

    node_pos = None
    if positions is not None:
        rows = [_node_rows(p, width - len(p.clean) - len(t), positions) for p in chunk for t in p.tails]
        node_pos = torch.tensor(rows, dtype=torch.long, device=device).reshape(len(rows), len(positions[1]))
    return Batch(
        pairs=tuple(chunk), clean=clean, corrupt=corrupt, cmap=None if cmap is None else cmap.to(device),
        real=real.to(device), metric_pos=padded("metric_pos"), corrupt_metric_pos=padded("corrupt_metric_pos", True),
        eval_pos=padded("eval_pos"), corrupt_eval_pos=padded("corrupt_eval_pos", True),
        answers=torch.tensor([p.answers for p in chunk], dtype=torch.long, device=device).reshape(len(chunk), -1),
        eval_answers=torch.tensor([p.eval_answers for p in chunk], dtype=torch.long,
                                  device=device).reshape(len(chunk), -1),
        node_pos=node_pos,
        reads=_reads(chunk, "reads", width, per_pair, metric_sequence, device),
        eval_reads=_reads(chunk, "eval_reads", width, per_pair, eval_sequence, device),
        per_pair=per_pair,
    )


def _sequence_flags(pairs: Sequence[EncodedPair], attr: str) -> tuple[bool, ...]:
    """Which arguments of a metric are whole answers (none for pairs built by hand without resolved answers)."""
    if not pairs:
        return ()
    resolved = getattr(pairs[0], attr)
    if resolved:
        return tuple(r.use == "sequence" for r in resolved)
    return (False,) * len(pairs[0].eval_answers if attr == "eval_resolved" else pairs[0].answers)


def make_batches(pairs: Sequence[EncodedPair], size: int, pad_id: int, device,
                 positions: tuple[str, list[int | str]] | None = None) -> list[Batch]:
    """Split pairs into left-padded batches of at most `size` pairs (clean and corrupt padded to one width)."""
    size = max(1, int(size))
    metric_seq, eval_seq = _sequence_flags(pairs, "resolved"), _sequence_flags(pairs, "eval_resolved")
    return [_batch(pairs[lo: lo + size], pad_id, device, positions, metric_seq, eval_seq)
            for lo in range(0, len(pairs), size)]
