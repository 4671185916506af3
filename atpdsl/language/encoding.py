"""Prompt pairs to token ids, one rule for `check` and `run` (no torch): lengths, slot alignment, answer tokens,
the rows a sequence metric needs and the positions every metric reads.

`check` runs it with the tokenizer file alone (language/tokenizer.py), the engine with the loaded tokenizer
(engine/data.py turns the result into tensors), so whatever `run` would reject over the tokens `check` rejects.

Rows: a pair is one model row, or one row per `sequence(...)` argument of the metrics (teacher forcing: row r is
the prompt followed by all but the last token of its answer, and the answer's tokens are read one per position).
Nodes live on the prompt positions only; a row's answer tokens are inputs, never patched.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from atpdsl.plan import MetricArg, MetricSpec, PromptPair, SourceRef

__all__ = ["TokenizerLike", "TokenRead", "ResolvedAnswer", "EncodedPair", "EncodingProblem", "metric_args",
           "sequence_rows", "encode_pairs", "tokens_text", "where_prefix", "HFTokenizer", "as_tokenizer"]


class TokenizerLike(Protocol):
    """What encoding needs from a tokenizer (adapters: language.tokenizer, engine.data)."""

    unk_id: int | None

    def encode(self, texts: Sequence[str], special: bool) -> list[list[int]]:
        """Token ids of each text (`special`: with the tokenizer's BOS/EOS as a model input gets them)."""

    def offsets(self, texts: Sequence[str]) -> list[list[tuple[int, int]]]:
        """Character range of each token of each text, encoded with special tokens."""

    def pieces(self, ids: Sequence[int]) -> list[str]:
        """The vocabulary entry of each id (`▁S`, `Ġthe`, `<0xE2>`)."""

    def decode(self, ids: Sequence[int]) -> str:
        """The text of some ids."""


@dataclass(frozen=True, slots=True)
class TokenRead:
    """A metric reads token `token`'s logit at `clean_pos` of row `row` (its corrupt-prompt twin at
    `corrupt_pos`), for argument `arg` of the metric."""

    row: int
    clean_pos: int
    corrupt_pos: int
    token: int
    arg: int


@dataclass(frozen=True, slots=True)
class ResolvedAnswer:
    """One metric argument for one pair: its text, every token it is, and how the metric uses them."""

    arg: int
    text: str
    ids: tuple[int, ...]
    use: str  # "token" (a one-token answer), "first_token", or "sequence"

    @property
    def read(self) -> tuple[int, ...]:
        """The tokens the metric reads."""
        return self.ids if self.use == "sequence" else self.ids[:1]


@dataclass(frozen=True, slots=True)
class EncodedPair:
    """One pair as token ids, with the clean-to-corrupt position map and resolved metric tokens.

    `cmap[t]` is the corrupt-prompt position aligned with clean position t, or -1 when the clean token
    has no partner (only inside a template slot whose two values tokenize to different lengths).
    `answers` holds the first token of each metric argument; `eval_answers` those of the evaluation metric.
    `tails[r]` is what row r appends to both prompts; `reads`/`eval_reads` what each metric reads, in row
    coordinates (row r's clean input is `clean + tails[r]`).
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
    tails: tuple[tuple[int, ...], ...] = ((),)
    reads: tuple[TokenRead, ...] = ()
    eval_reads: tuple[TokenRead, ...] = ()
    resolved: tuple[ResolvedAnswer, ...] = ()
    eval_resolved: tuple[ResolvedAnswer, ...] = ()

    @property
    def identity(self) -> bool:
        """Whether clean and corrupt positions align one to one."""
        return len(self.clean) == len(self.corrupt)


class EncodingProblem(Exception):
    """Why one pair cannot be encoded. `kind`: "answer" (about the metric at `where`), "length" or "slot"."""

    def __init__(self, kind: str, message: str, index: int, where: SourceRef | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.index = index
        self.where = where


def tokens_text(tok: TokenizerLike, ids: Sequence[int]) -> str:
    """`['▁g', 'ir', 'l']`: the pieces of some ids, for messages."""
    return "[" + ", ".join(repr(t) for t in tok.pieces(list(ids))) + "]"


def metric_args(spec: MetricSpec) -> tuple[MetricArg, ...]:
    """A metric's answer arguments, with the registry's defaults (`loss` alone reads the field `answer`)."""
    if spec.args:
        return spec.args
    from atpdsl.registry import METRICS

    info = METRICS.get(spec.kind)
    return tuple(MetricArg(field=f) for f in (info.default_args if info else ()))


def _arg_key(arg: MetricArg) -> tuple[str | None, str | None]:
    return arg.field, arg.literal


def sequence_rows(metric: MetricSpec, eval_metric: MetricSpec | None) -> tuple[MetricArg, ...]:
    """The distinct `sequence(...)` arguments of both metrics, in order: one model row each (none: one row)."""
    rows: list[MetricArg] = []
    seen: set[tuple[str | None, str | None]] = set()
    for spec in (metric, eval_metric):
        for arg in metric_args(spec) if spec is not None else ():
            if arg.sequence and _arg_key(arg) not in seen:
                seen.add(_arg_key(arg))
                rows.append(arg)
    return tuple(rows)


def where_prefix(where: SourceRef | None) -> str:
    """`file:line:col: ` for a message, or nothing when the item has no source position."""
    return "" if where is None else f"{where.file}:{where.line}:{where.column}: "


class _Tokens:
    """Every tokenization encoding needs, done in a few batched calls (per-text calls made `check` of 10,000
    pairs slow): prompts, prompt + answer (the answer as the model would continue the prompt), answers alone."""

    def __init__(self, tok: TokenizerLike, pairs: Sequence[PromptPair], texts: list[dict[int, str]],
                 at_last: list[bool]) -> None:
        self.tok = tok
        self.clean = tok.encode([p.clean for p in pairs], True)
        self.corrupt = tok.encode([p.corrupt for p in pairs], True)
        joined = sorted({pairs[i].clean + t for i, ts in enumerate(texts) for t in ts.values()}) if any(at_last) \
            else []
        self.joined = dict(zip(joined, tok.encode(joined, True))) if joined else {}
        alone = sorted({t for ts in texts for t in ts.values()})
        self.alone = dict(zip(alone, tok.encode(alone, False))) if alone else {}

    def answer(self, pair: PromptPair, index: int, text: str, at_last: bool) -> list[int]:
        """The tokens an answer adds after the clean prompt (tokenizers that fold a leading space into the next
        word need the context); the answer alone when the prompt's own tokens change or at a slot."""
        ids: list[int] = []
        if at_last:
            clean = self.clean[index]
            full = self.joined.get(pair.clean + text, [])
            if full[: len(clean)] == clean:
                ids = full[len(clean):]
        return ids or list(self.alone.get(text, []))


def _resolve(tokens: _Tokens, pair: PromptPair, index: int, spec: MetricSpec, at_last: bool
             ) -> tuple[ResolvedAnswer, ...]:
    out = []
    origin = pair.origin or "?"
    for k, arg in enumerate(metric_args(spec)):
        try:
            text = arg.text(pair)
        except KeyError:
            raise EncodingProblem("answer", f"pair {origin} has no field {arg.field!r} "
                                  f"(fields: {', '.join(k_ for k_, _ in pair.fields) or 'none'})", index,
                                  spec.where) from None
        ids = tokens.answer(pair, index, text, at_last)
        if not ids:
            raise EncodingProblem("answer", f"answer {text!r} of pair {origin} has no tokens", index, spec.where)
        use = "sequence" if arg.sequence else "first_token" if arg.first_token else "token"
        if len(ids) > 1 and use == "token":
            name = arg.field or repr(text)
            raise EncodingProblem(
                "answer", f"answer {text!r} of pair {origin} is {len(ids)} tokens {tokens_text(tokens.tok, ids)}; a "
                f"metric needs one token: write first_token({name}) to use the first, sequence({name}) to score the "
                f"whole answer (teacher-forced log-probability), or pick a single-token answer", index, spec.where)
        if use == "sequence" and not at_last:
            raise EncodingProblem("answer", f"sequence({arg.field or repr(text)}) continues the prompt, so the metric"
                                  f" must read `at last`, not at {spec.position!r}", index, spec.where)
        out.append(ResolvedAnswer(k, text, tuple(ids), use))
    return tuple(out)


def _token_span(offsets: Sequence[tuple[int, int]], start: int, end: int) -> tuple[int, int] | None:
    """First and last token overlapping the character range [start, end)."""
    hit = [i for i, (a, b) in enumerate(offsets) if b > a and a < end and b > start]
    return (hit[0], hit[-1]) if hit else None


def _slot_spans(tok: TokenizerLike, pair: PromptPair, index: int):
    """Per slot: (name, clean token span, corrupt token span), in prompt order."""
    if not pair.slots:
        return []
    co, ko = tok.offsets([pair.clean, pair.corrupt])
    spans = []
    for slot in pair.slots:
        cs = _token_span(co, slot.clean.start, slot.clean.end)
        ks = _token_span(ko, slot.corrupt.start, slot.corrupt.end)
        if cs is None or ks is None:
            raise EncodingProblem("slot", f"pair {pair.origin or '?'}: template slot {slot.name!r} covers no token",
                                  index)
        spans.append((slot.name, cs, ks))
    spans.sort(key=lambda s: s[1][0])
    return spans


def _align(tok: TokenizerLike, pair: PromptPair, index: int, clean_ids: list[int], corrupt_ids: list[int],
           spans) -> tuple[int, ...]:
    """Clean position -> corrupt position; text outside slots must tokenize alike in both prompts."""
    if len(clean_ids) == len(corrupt_ids):
        return tuple(range(len(clean_ids)))
    origin = pair.origin or "?"
    if not spans:
        raise EncodingProblem(
            "length", f"pair {origin}: clean and corrupt prompts tokenize to different lengths "
            f"({len(clean_ids)} vs {len(corrupt_ids)} tokens); clean {tokens_text(tok, clean_ids)}, "
            f"corrupt {tokens_text(tok, corrupt_ids)}. Make them the same length, or write the pair as a "
            f"template whose named slots mark the words that differ", index)
    cmap = [-1] * len(clean_ids)
    c_prev = k_prev = 0
    for name, (cf, cl), (kf, kl) in spans + [("", (len(clean_ids), -1), (len(corrupt_ids), -1))]:
        if cf - c_prev != kf - k_prev:
            raise EncodingProblem(
                "length", f"pair {origin}: the text before slot {name or '(end)'!r} tokenizes to "
                f"{cf - c_prev} tokens in the clean prompt but {kf - k_prev} in the corrupt one; clean "
                f"{tokens_text(tok, clean_ids)}, corrupt {tokens_text(tok, corrupt_ids)}", index)
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


def _position(spec: MetricSpec, n_tokens: int, slots: dict[str, int], pair: PromptPair, index: int) -> int:
    if spec.position == "last":
        return n_tokens - 1
    if spec.position in slots:
        return slots[spec.position]
    raise EncodingProblem(
        "answer", f"metric reads at {spec.position!r} but pair {pair.origin or '?'} has no such slot (slots: "
        f"{', '.join(slots) or 'none'}); use `at last` or a template slot name", index, spec.where)


def _reads(resolved: tuple[ResolvedAnswer, ...], args: tuple[MetricArg, ...], rows: tuple[MetricArg, ...],
           pos: int, kpos: int) -> tuple[TokenRead, ...]:
    """What one metric reads: one-token arguments at the metric position of row 0, a sequence argument's tokens
    one per position of its own row (token j predicted at the position of the prompt's last token + j)."""
    out: list[TokenRead] = []
    keys = [_arg_key(r) for r in rows]
    for answer, arg in zip(resolved, args):
        if answer.use == "sequence":
            row = keys.index(_arg_key(arg))
            out.extend(TokenRead(row, pos + j, kpos + j, t, answer.arg) for j, t in enumerate(answer.ids))
        else:
            out.append(TokenRead(0, pos, kpos, answer.ids[0], answer.arg))
    if not out:  # `kl`: no tokens, but the position is read
        out.append(TokenRead(0, pos, kpos, 0, -1))
    return tuple(out)


def _encode_one(tok: TokenizerLike, tokens: _Tokens, pair: PromptPair, index: int, metric: MetricSpec,
                eval_metric: MetricSpec | None, rows: tuple[MetricArg, ...]) -> EncodedPair:
    clean, corrupt = tokens.clean[index], tokens.corrupt[index]
    spans = _slot_spans(tok, pair, index)
    cmap = _align(tok, pair, index, clean, corrupt, spans)
    c_slots = {name: cs[1] for name, cs, _ in spans}
    k_slots = {name: ks[1] for name, _, ks in spans}
    em = eval_metric or metric
    pos, kpos = _position(metric, len(clean), c_slots, pair, index), _position(metric, len(corrupt), k_slots, pair,
                                                                                index)
    epos, ekpos = _position(em, len(clean), c_slots, pair, index), _position(em, len(corrupt), k_slots, pair, index)
    resolved = _resolve(tokens, pair, index, metric, metric.position == "last")
    eval_resolved = _resolve(tokens, pair, index, em, em.position == "last")
    tails: list[tuple[int, ...]] = []
    by_key = {_arg_key(a): r for a, r in zip(metric_args(metric), resolved)}
    by_key.update({_arg_key(a): r for a, r in zip(metric_args(em), eval_resolved)})
    for row in rows:
        tails.append(by_key[_arg_key(row)].ids[:-1])
    return EncodedPair(
        index=index, origin=pair.origin or f"pair {index}", clean=tuple(clean), corrupt=tuple(corrupt), cmap=cmap,
        metric_pos=pos, corrupt_metric_pos=kpos, eval_pos=epos, corrupt_eval_pos=ekpos,
        answers=tuple(r.ids[0] for r in resolved), eval_answers=tuple(r.ids[0] for r in eval_resolved),
        slot_last=tuple(sorted(c_slots.items())), tails=tuple(tails) or ((),),
        reads=_reads(resolved, metric_args(metric), rows, pos, kpos),
        eval_reads=_reads(eval_resolved, metric_args(em), rows, epos, ekpos),
        resolved=resolved, eval_resolved=eval_resolved)


def encode_pairs(tok: TokenizerLike, pairs: Sequence[PromptPair], metric: MetricSpec,
                 eval_metric: MetricSpec | None = None) -> tuple[list[EncodedPair | None], list[EncodingProblem]]:
    """Tokenize every pair, align positions and resolve answers. Returns one EncodedPair per pair (None where it
    has a problem) and the problems, in pair order."""
    rows = sequence_rows(metric, eval_metric)
    specs = [metric] + ([eval_metric] if eval_metric is not None else [])
    texts: list[dict[int, str]] = []
    for pair in pairs:
        found: dict[int, str] = {}
        for spec in specs:
            for arg in metric_args(spec):
                try:
                    found[len(found)] = arg.text(pair)
                except KeyError:
                    pass
        texts.append(found)
    tokens = _Tokens(tok, pairs, texts, [s.position == "last" for s in specs])
    out: list[EncodedPair | None] = []
    problems: list[EncodingProblem] = []
    for index, pair in enumerate(pairs):
        try:
            out.append(_encode_one(tok, tokens, pair, index, metric, eval_metric, rows))
        except EncodingProblem as problem:
            out.append(None)
            problems.append(problem)
    return out, problems


class HFTokenizer:
    """A loaded Hugging Face tokenizer behind the encoding protocol (duck-typed: no transformers import here)."""

    def __init__(self, tok) -> None:
        self.tok = tok
        self.unk_id = getattr(tok, "unk_token_id", None)

    def encode(self, texts: Sequence[str], special: bool) -> list[list[int]]:
        if not texts:
            return []
        return [list(ids) for ids in self.tok(list(texts), add_special_tokens=special)["input_ids"]]

    def offsets(self, texts: Sequence[str]) -> list[list[tuple[int, int]]]:
        found = self.tok(list(texts), return_offsets_mapping=True)["offset_mapping"]
        return [[(int(a), int(b)) for a, b in row] for row in found]

    def pieces(self, ids: Sequence[int]) -> list[str]:
        return [p or "" for p in self.tok.convert_ids_to_tokens(list(ids))]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids))


def as_tokenizer(tok) -> TokenizerLike:
    """The encoding protocol for a tokenizer: as it is when it already speaks it, else a Hugging Face adapter."""
    return tok if hasattr(tok, "pieces") and hasattr(tok, "offsets") else HFTokenizer(tok)
