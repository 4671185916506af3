"""The tokens every pair's metric arguments resolved to, for the results JSON and the report (no torch): a reader
can see that `first_token(" Jack")` read `▁` and not a name."""
from __future__ import annotations

from typing import Any

from atpdsl.language.encoding import EncodedPair, ResolvedAnswer, TokenizerLike, as_tokenizer, encode_pairs
from atpdsl.plan import MetricArg, Plan

__all__ = ["resolved_tokens", "resolved_rows"]


def _arg_name(arg: MetricArg) -> str:
    inner = arg.field if arg.field is not None else repr(arg.literal)
    return f"first_token({inner})" if arg.first_token else f"sequence({inner})" if arg.sequence else inner


def _answers(tok: TokenizerLike, args: tuple[MetricArg, ...], resolved: tuple[ResolvedAnswer, ...]) -> list[dict]:
    out = []
    for r in resolved:
        arg = args[r.arg] if r.arg < len(args) else MetricArg(field="answer")
        out.append({"arg": _arg_name(arg), "text": r.text, "ids": list(r.ids), "pieces": tok.pieces(r.ids),
                    "use": r.use, "read_ids": list(r.read), "read_pieces": tok.pieces(r.read)})
    return out


def resolved_rows(tok: TokenizerLike, plan: Plan, encoded: list[EncodedPair | None]) -> list[dict[str, Any]]:
    """One dict per pair from already encoded pairs (None: the pair could not be encoded)."""
    from atpdsl.language.encoding import metric_args

    args = metric_args(plan.metric)
    eval_args = metric_args(plan.eval_metric) if plan.eval_metric is not None else None
    rows: list[dict[str, Any]] = []
    for pair, e in zip(plan.pairs, encoded):
        row: dict[str, Any] = {"pair": pair.origin}
        if e is None:
            row["error"] = "not encodable (see `atpdsl check`)"
        else:
            row.update({"clean_tokens": len(e.clean), "corrupt_tokens": len(e.corrupt),
                        "metric": _answers(tok, args, e.resolved)})
            if eval_args is not None:
                row["eval_metric"] = _answers(tok, eval_args, e.eval_resolved)
        rows.append(row)
    return rows


def resolved_tokens(tokenizer: Any, plan: Plan) -> list[dict[str, Any]]:
    """Per pair: its origin, prompt token counts, and for each metric argument the answer text, all its token
    ids and pieces, how the metric uses them (`token`, `first_token`, `sequence`) and the ids it reads.

    `tokenizer`: a loaded Hugging Face tokenizer or anything speaking atpdsl.language.encoding.TokenizerLike.
    """
    tok = as_tokenizer(tokenizer)
    encoded, _ = encode_pairs(tok, plan.pairs, plan.metric, plan.eval_metric)
    return resolved_rows(tok, plan, encoded)
