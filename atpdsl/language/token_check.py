"""What the model's tokens say about the pairs and the metric, at check time (tokenizer file only, no weights).

Errors, at the metric (answers) or the pair (prompts): anything the run's encoding would reject (unequal
prompt lengths outside template slots, multi-token answers without first_token/sequence, a metric position
that is not a slot), an answer with the unknown token or an empty piece, two compared sides that are the same
tokens (`logit_diff` identically 0), a token beyond the model's vocabulary, a row longer than the model's
context. Warning: a token read alone that is only a word boundary (`▁`, `Ġ`): the metric then compares spaces.
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from atpdsl.language.diagnostics import Diagnostic, error, quote, warning
from atpdsl.language.encoding import EncodedPair, ResolvedAnswer, TokenizerLike, encode_pairs, tokens_text
from atpdsl.language.model_check import CONTEXT_KEYS, context_length
from atpdsl.language.span import Span
from atpdsl.plan import MetricSpec, PromptPair
from atpdsl.registry import METRICS

__all__ = ["MetricSite", "check_tokens", "token_diagnostics", "MAX_PER_KIND"]

MAX_PER_KIND = 5  # diagnostics of one kind shown, then one "... and N more pairs"


@dataclass(frozen=True, slots=True)
class MetricSite:
    """A lowered metric and the span of its statement (where answer problems point)."""

    spec: MetricSpec
    span: Span


class _Report:
    """Diagnostics grouped by (code, span): the first few of each, then a count of the rest."""

    def __init__(self) -> None:
        self.groups: dict[tuple[str, int, int], list[Diagnostic]] = defaultdict(list)

    def add(self, d: Diagnostic) -> None:
        key = (d.code, d.span.start if d.span else 0, id(d.span.source) if d.span else 0)
        self.groups[key].append(d)

    def diagnostics(self) -> list[Diagnostic]:
        out: list[Diagnostic] = []
        for items in self.groups.values():
            out.extend(items[:MAX_PER_KIND])
            if len(items) > MAX_PER_KIND:
                first = items[0]
                out.append(Diagnostic(first.code, first.severity, f"... and {len(items) - MAX_PER_KIND} more pairs"
                                      " with this problem", first.span))
        return out


def _shown(tok: TokenizerLike, ids: Sequence[int]) -> str:
    return tokens_text(tok, ids)


def _answer_problems(tok: TokenizerLike, e: EncodedPair, site: MetricSite, resolved: tuple[ResolvedAnswer, ...],
                     vocab: int | None, blank: dict[int, bool], report: _Report) -> None:
    info = METRICS.get(site.spec.kind)
    unk = tok.unk_id
    broken = False
    for r in resolved:
        if unk is not None and unk in r.ids:
            broken = True
            report.add(error("E507", f"answer {r.text!r} of pair {e.origin} is outside the vocabulary: it tokenizes to"
                                     f" {_shown(tok, r.ids)}, with the unknown token", site.span,
                             "pick an answer the tokenizer knows"))
        elif any(not p for p in tok.pieces(r.read)):
            broken = True
            report.add(error("E507", f"answer {r.text!r} of pair {e.origin} tokenizes to an empty piece"
                                     f" {_shown(tok, r.ids)}", site.span))
        if vocab is not None and any(t >= vocab for t in r.ids):
            report.add(error("E509", f"answer {r.text!r} of pair {e.origin} has token id {max(r.ids)}, beyond the"
                                     f" model's vocabulary of {vocab} (config vocab_size)", site.span,
                             "the tokenizer does not belong to this model"))
        if r.use != "sequence":
            t = r.read[0]
            if t not in blank:
                piece = tok.pieces([t])[0]
                blank[t] = bool(piece) and not tok.decode([t]).strip()
            if blank[t]:
                how = f"first_token({r.text!r})" if r.use == "first_token" else f"answer {r.text!r}"
                report.add(warning("W503", f"{how} is the bare word-boundary piece {tok.pieces([t])[0]!r} (pair"
                                           f" {e.origin}: {_shown(tok, r.ids)}): the metric reads a space, not a word",
                                   site.span, "use sequence(...) to score the whole answer"))
    if not broken and info is not None and info.contrast and len(resolved) == 2 and resolved[0].read == resolved[1].read:
        a, b = resolved
        report.add(error("E508", f"both sides of {quote(info.key)} are {_shown(tok, a.read)} for pair {e.origin}"
                                 f" ({a.text!r} vs {b.text!r}): the metric is identically 0", site.span,
                         "write sequence(...) around both answers to compare them whole, or pick answers whose"
                         " tokens differ"))


def _context(e: EncodedPair, span: Span | None, limit: int | None, report: _Report, key: str) -> None:
    if limit is None or span is None:
        return
    longest = max(len(e.clean), len(e.corrupt)) + max(len(t) for t in e.tails)
    if longest > limit:
        report.add(error("E312", f"pair {e.origin} is {longest} tokens long (prompt and answer), but the model reads at"
                                 f" most {limit} ({key} in its config)", span, "shorten the prompts"))


def check_tokens(tok: TokenizerLike, pairs: Sequence[PromptPair], pair_spans: Sequence[Span | None],
                 metric: MetricSite, eval_metric: MetricSite | None, config: Mapping[str, Any] | None
                 ) -> list[Diagnostic]:
    """Encode every pair as a run would and report what it would refuse or silently get wrong."""
    encoded, problems = encode_pairs(tok, pairs, metric.spec, eval_metric.spec if eval_metric else None)
    report = _Report()
    for p in problems:
        if p.kind == "answer":
            site = eval_metric if eval_metric is not None and p.where == eval_metric.spec.where else metric
            report.add(error("E506", p.message, site.span))
        else:
            report.add(error("E311", p.message, pair_spans[p.index]))
    vocab = (config or {}).get("vocab_size")
    vocab = vocab if isinstance(vocab, int) and not isinstance(vocab, bool) and vocab > 0 else None
    limit = context_length(config)
    key = next((k for k in CONTEXT_KEYS if (config or {}).get(k) == limit), "")
    blank: dict[int, bool] = {}
    for e in encoded:
        if e is None:
            continue
        _answer_problems(tok, e, metric, e.resolved, vocab, blank, report)
        if eval_metric is not None:
            _answer_problems(tok, e, eval_metric, e.eval_resolved, vocab, blank, report)
        _context(e, pair_spans[e.index], limit, report, key)
    return report.diagnostics()


def token_diagnostics(spec: Any, model: Any, pairs: Sequence[PromptPair], pair_spans: Sequence[Span | None]
                      ) -> list[Diagnostic]:
    """The token checks of a spec whose pairs and metrics checked clean: the tokenizer file loaded (no weights,
    no transformers), or a warning that says the tokens could not be checked and why."""
    from atpdsl.language import syntax as n
    from atpdsl.language.metric_check import metric_spec
    from atpdsl.language.tokenizer import load_file_tokenizer

    metrics = [m for m in spec.of(n.Metric) if not m.eval][:1]
    evals = [m for m in spec.of(n.Metric) if m.eval][:1]
    if not metrics:
        return []
    stmt = spec.of(n.Model)[0]
    if model.tokenizer_file is None:
        why = "it is not in the local cache" if model.folder is None else "the model folder has no tokenizer.json"
        return [warning("W504", f"answer tokens, prompt lengths and the context length are not checked: {why}",
                        stmt.source.span, "`run` checks them after loading the tokenizer")]
    try:
        tok = load_file_tokenizer(model.tokenizer_file)
    except Exception as e:  # noqa: BLE001 - the tokenizers library raises bare Exceptions for a broken file
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        return [warning("W504", f"answer tokens are not checked: cannot read {model.tokenizer_file.name}: {first}",
                        stmt.source.span)]
    main = MetricSite(metric_spec(metrics[0]), metrics[0].span)
    extra = MetricSite(metric_spec(evals[0]), evals[0].span) if evals else None
    return check_tokens(tok, pairs, pair_spans, main, extra, model.config)
