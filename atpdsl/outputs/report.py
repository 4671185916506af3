"""The HTML report: one self-contained page (images inlined) with the spec, top nodes, plots and provenance."""
from __future__ import annotations

import base64
import html
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

from atpdsl.circuit.graph import describe_edges
from atpdsl.circuit.scores import SIGN_CONVENTION
from atpdsl.outputs.table import shown_rows

if TYPE_CHECKING:  # pragma: no cover
    from atpdsl.outputs.result import Result

__all__ = ["render_html", "write_html", "export_html", "TOP_ROWS"]

TOP_ROWS = 40
"""How many best-ranked nodes the report's table lists (verified and circuit nodes are always listed)."""

_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1100px;color:#222;padding:0 1em}
h1{font-size:1.5em;margin-bottom:.2em} h2{font-size:1.15em;margin-top:1.8em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:.85em;margin:.5em 0} td,th{border:1px solid #ddd;padding:.25em .6em;text-align:right}
th{background:#f3f3f3} td.l,th.l{text-align:left} tr.in td{background:#f5f9ff} .pos{color:#2166ac} .neg{color:#b2182b}
pre{background:#f7f7f7;border:1px solid #e3e3e3;padding:.8em;overflow-x:auto;font-size:.85em}
.note{color:#555;font-size:.9em} .bad{color:#b2182b} figure{margin:1em 0} img{max-width:100%;border:1px solid #eee}
figcaption{font-size:.85em;color:#555}
"""

_FIGURE_CAPTIONS = {
    "": "Circuit diagram: embed at the bottom, logits at the top, one row per stage; colour is the sign of "
    "the effect (blue raises the metric, red lowers it): the exact effect for verified nodes (thick outline), "
    "else the estimate; size is the score.",
    "heads": "Layer x head heatmaps of score (left) and signed effect, exact where verified (right); boxed cells "
    "are in the circuit.",
    "neurons": "Neuron scores per layer; stems coloured by the sign of the effect (exact where verified), black "
    "dots are in the circuit.",
}


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _num(value: Any, digits: int = 4) -> str:
    """A signed number, coloured by sign as in the plots (blue raises the metric, red lowers it)."""
    if value is None:
        return ""
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        css = "pos" if value > 0 else "neg" if value < 0 else ""
        return f'<span class="{css}">{value:+.{digits}g}</span>'
    return _e(value)


def _mag(value: Any, digits: int = 4) -> str:
    """An unsigned number (a score, a magnitude, a cut)."""
    return "" if value is None else f"{float(value):.{digits}g}"


def _table(headers: Iterable[str], rows: Iterable[Iterable[str]], left: int = 1, classes: Iterable[str] = ()) -> str:
    """An HTML table; the first `left` columns are left-aligned. No header row when `headers` is empty."""
    head = "".join(f'<th class="l">{_e(h)}</th>' if i < left else f"<th>{_e(h)}</th>" for i, h in enumerate(headers))
    head = f"<thead><tr>{head}</tr></thead>" if head else ""
    body = []
    for row, css in zip(rows, list(classes) or _repeat("")):
        cells = "".join(f'<td class="l">{c}</td>' if i < left else f"<td>{c}</td>" for i, c in enumerate(row))
        body.append(f'<tr class="{css}">{cells}</tr>')
    return f"<table>{head}<tbody>{''.join(body)}</tbody></table>"


def _repeat(value: str) -> Iterable[str]:
    while True:
        yield value


def _images(res: "Result") -> list[tuple[str, str]]:
    """(caption, <img> tag) per figure, PNG inlined as base64; a figure that fails becomes a note."""
    from atpdsl.outputs.plots import figure_builders, figure_bytes

    out = []
    for suffix, build in figure_builders(res).items():
        try:
            fig = build()
            if fig is None:
                continue
            data = base64.b64encode(figure_bytes(fig, "png", dpi=100)).decode("ascii")
            tag = f'<img alt="{_e(suffix or "circuit")}" src="data:image/png;base64,{data}">'
        except Exception as error:  # noqa: BLE001 - the report still shows everything else
            tag = f'<p class="bad">figure could not be drawn: {_e(type(error).__name__)}: {_e(error)}</p>'
        out.append((_FIGURE_CAPTIONS[suffix], tag))
    return out


def _summary(res: "Result") -> list[str]:
    result, sel = res.result, res.selection
    rows = [
        ["metric", _e(result.metric)],
        ["clean metric (mean)", _num(float(result.clean_metric))],
        ["corrupt metric (mean)", _num(float(result.corrupt_metric))],
        ["selection", _e(sel.rule) + f" (cut {_mag(sel.cut)} on selection value)"],
        ["selection value", _e(sel.value_definition)],
        ["nodes in the circuit", _e(len(sel.selected))],
        ["edges", _e(describe_edges(res.graph))],
        ["sign convention", _e(SIGN_CONVENTION)],
    ]
    parts = ["<h2>Summary</h2>", _table([], rows, left=2)]
    if result.false_negatives is not None:
        parts.append(f"<p><strong>Diagnostic:</strong> {_e(result.false_negatives.sentence)}.</p>")
    else:
        parts.append('<p class="note">No false-negative diagnostic was run (add <code>diagnose false_negatives</code>).</p>')
    if sel.dropped:
        dropped = [[_e(d.node), _mag(d.verified), _mag(d.cut)] for d in sel.dropped]
        parts += [
            "<h2>Dropped after verification</h2>",
            '<p class="note">Selected by estimate, but exact patching measured a selection value below the cut.</p>',
            _table(["node", "measured selection value", "cut"], dropped),
        ]
    return parts


def _nodes_section(res: "Result") -> list[str]:
    scores = shown_rows(res.result, res.selection, TOP_ROWS, verified=True)  # not every scored node's row
    selected = set(res.selection.selected)
    shown = [r for r in scores if r["rank"] <= TOP_ROWS or r["in_circuit"] or r["verified_effect"] is not None]
    headers = ["rank", "node", "kind", "verified effect", "estimate", "score", "selection value", "decision"]
    rows = [[_e(r["rank"]), _e(r["node"]), _e(r["kind"]), _num(r["verified_effect"]), _num(r["estimate"]),
             _mag(r["score"]), _mag(r["selection_value"]), _e(r["decision"].replace("_", " "))] for r in shown]
    return [
        "<h2>Top nodes: verified effect vs estimate</h2>",
        f'<p class="note">{len(scores)} node(s) scored; the {min(TOP_ROWS, len(scores))} best and every verified '
        "or circuit node are listed. Shaded rows are in the circuit. The selection cut "
        f"({_mag(res.selection.cut)}) is applied to the selection value.</p>",
        _table(headers, rows, left=3, classes=["in" if r["node"] in selected else "" for r in shown]),
    ]


def _edges_section(res: "Result") -> list[str]:
    G = res.graph
    weighted = [(a, b, d) for a, b, d in G.edges(data=True) if "weight" in d]
    if not weighted:
        return []
    weighted.sort(key=lambda e: (-abs(e[2].get("verified_weight", e[2]["weight"])), e[0], e[1]))
    rows = [[_e(a), _e(b), _num(d.get("verified_weight")), _num(d["weight"])] for a, b, d in weighted[:TOP_ROWS]]
    more = f" ({len(weighted) - TOP_ROWS} more in the -edges.csv / JSON exports)" if len(weighted) > TOP_ROWS else ""
    return [
        "<h2>Strongest edges in the circuit</h2>",
        f'<p class="note">{_e(describe_edges(G))}. Each edge once, strongest first{_e(more)}; '
        "verified = measured by path patching where it was run.</p>",
        _table(["source", "target", "verified", "weight (estimate)"], rows, left=2),
    ]


def _tokens_section(res: "Result") -> list[str]:
    """The check's warnings, and every pair's answers as the metric reads them (ids and pieces)."""
    extras = res.result.extras if isinstance(res.result.extras, dict) else {}
    parts: list[str] = []
    warnings = extras.get("warnings") or []
    if warnings:
        parts += ["<h2>Warnings</h2>", "<ul>" + "".join(f"<li>{_e(w)}</li>" for w in warnings) + "</ul>"]
    rows = []
    for r in extras.get("resolved_tokens") or []:
        for a in r.get("metric", []):
            rows.append([_e(r.get("pair", "")), _e(a.get("arg", "")), _e(repr(a.get("text", ""))),
                         _e(" ".join(map(str, a.get("read_ids", [])))), _e(" ".join(map(repr, a.get("read_pieces", [])))),
                         _e(a.get("use", ""))])
    if rows:
        parts += ["<h2>Answer tokens</h2>", '<p class="note">what each pair\'s metric arguments resolved to</p>',
                  _table(["pair", "argument", "text", "token ids read", "pieces", "use"], rows, left=5)]
    return parts


def render_html(res: "Result") -> str:
    """The report as one HTML string: no scripts, no external files, no network."""
    result, attrs = res.result, res.graph.graph
    spec_text = attrs.get("spec_text") or (res.plan.spec_text if res.plan is not None else "")
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>atpdsl report: {_e(attrs.get('spec_file') or result.model_id)}</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>atpdsl circuit report</h1>",
        f'<p class="note">{_e(attrs.get("spec_file", ""))} &middot; model {_e(result.model_id)} &middot; '
        f"method {_e(result.method)} &middot; {result.n_pairs} pair(s)</p>",
        *_summary(res),
        *_nodes_section(res),
        *_edges_section(res),
        *_tokens_section(res),
        "<h2>Plots</h2>",
    ]
    for caption, tag in _images(res):
        parts.append(f"<figure>{tag}<figcaption>{_e(caption)}</figcaption></figure>")
    parts += ["<h2>Spec</h2>", f"<pre>{_e(spec_text)}</pre>"]
    timings = list(res.all_timings)
    if timings:
        parts += ["<h2>Timings</h2>", _table(["phase", "seconds"], [[_e(k), f"{v:.3f}"] for k, v in timings])]
    provenance = [[_e(k), _e(v)] for k, v in sorted(attrs.items()) if k != "spec_text"]
    parts += ["<h2>Provenance</h2>", _table(["key", "value"], provenance, left=2), "</body></html>"]
    return "\n".join(parts) + "\n"


def write_html(res: "Result", path: str | Path) -> None:
    """Write the report atomically (self-contained: open it anywhere, offline)."""
    from atpdsl.outputs.atomic import write_text

    write_text(path, render_html(res))


def export_html(res: "Result", path: str | Path) -> list[Path]:
    """The format registry's writer (see atpdsl.outputs.formats)."""
    write_html(res, path)
    return [Path(path)]
