"""The HTML report: one self-contained page (images inlined) with the spec, top nodes, plots and provenance."""
from __future__ import annotations

import base64
import html
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

from atpdsl.circuit.scores import SIGN_CONVENTION

if TYPE_CHECKING:  # pragma: no cover
    from atpdsl.pipeline import Result

__all__ = ["render_html", "write_html", "TOP_ROWS"]

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
    "the estimate (blue raises the metric, red lowers it), size is the score; thick outline = verified.",
    "heads": "Layer x head heatmaps of score (left) and signed estimate (right); boxed cells are in the circuit.",
    "neurons": "Neuron scores per layer; stems coloured by the sign of the estimate, black dots are in the circuit.",
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
    from atpdsl.outputs.plots import _builders, figure_bytes

    out = []
    for suffix, build in _builders(res).items():
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


def render_html(res: "Result") -> str:
    """The report as one HTML string: no scripts, no external files, no network."""
    result, G = res.result, res.graph
    attrs = G.graph
    selected = set(res.selection.selected)
    dropped = {d.node for d in res.selection.dropped}
    scores = res.scores.rows
    shown = [r for i, r in enumerate(scores) if i < TOP_ROWS or r["in_circuit"] or r["verified_effect"] is not None]
    spec_text = attrs.get("spec_text") or (res.plan.spec_text if res.plan is not None else "")
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>atpdsl report: {_e(attrs.get('spec_file') or result.model_id)}</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>atpdsl circuit report</h1>",
        f'<p class="note">{_e(attrs.get("spec_file", ""))} &middot; model {_e(result.model_id)} &middot; '
        f"method {_e(result.method)} &middot; {result.n_pairs} pair(s)</p>",
        "<h2>Summary</h2>",
        _table(
            [],
            [
                ["metric", _e(result.metric)],
                ["clean metric (mean)", _num(float(result.clean_metric))],
                ["corrupt metric (mean)", _num(float(result.corrupt_metric))],
                ["selection", _e(res.selection.rule)],
                ["nodes in the circuit", _e(len(res.selection.selected))],
                ["edges", _e("edge attribution" if result.edges else "residual stream, unweighted")],
                ["sign convention", _e(SIGN_CONVENTION)],
            ],
            left=2,
        ),
    ]
    if result.false_negatives is not None:
        parts.append(f"<p><strong>Diagnostic:</strong> {_e(result.false_negatives.sentence)}.</p>")
    else:
        parts.append('<p class="note">No false-negative diagnostic was run (add <code>diagnose false_negatives</code>).</p>')
    if res.selection.dropped:
        rows = [[_e(d.node), _mag(d.verified), _mag(d.cut)] for d in res.selection.dropped]
        parts += [
            "<h2>Dropped after verification</h2>",
            '<p class="note">Selected by estimate, but exact patching measured a smaller effect than the cut.</p>',
            _table(["node", "measured |effect|", "cut"], rows),
        ]
    parts.append("<h2>Top nodes: estimate vs verified</h2>")
    parts.append(
        f'<p class="note">{len(scores)} node(s) scored; the {min(TOP_ROWS, len(scores))} best and every verified '
        "or circuit node are listed. Shaded rows are in the circuit.</p>"
    )
    parts.append(
        _table(
            ["rank", "node", "kind", "estimate", "score", "verified effect", "in circuit"],
            [
                [
                    _e(r["rank"]),
                    _e(r["node"]),
                    _e(r["kind"]),
                    _num(r["estimate"]),
                    _mag(r["score"]),
                    _num(r["verified_effect"]),
                    "yes" if r["in_circuit"] else "dropped (verified)" if r["node"] in dropped else "",
                ]
                for r in shown
            ],
            left=3,
            classes=["in" if r["node"] in selected else "" for r in shown],
        )
    )
    if result.edges:
        weighted = sorted(
            (e for e in result.edges if e.weight is not None and G.has_edge(e.source, e.target)),
            key=lambda e: -abs(e.weight or 0.0),
        )[:TOP_ROWS]
        parts += [
            "<h2>Strongest edges in the circuit</h2>",
            _table(["source", "target", "weight"], [[_e(e.source), _e(e.target), _num(e.weight)] for e in weighted], left=2),
        ]
    parts.append("<h2>Plots</h2>")
    for caption, tag in _images(res):
        parts.append(f"<figure>{tag}<figcaption>{_e(caption)}</figcaption></figure>")
    parts += ["<h2>Spec</h2>", f"<pre>{_e(spec_text)}</pre>"]
    timings = list(res.all_timings)
    if timings:
        parts += ["<h2>Timings</h2>", _table(["phase", "seconds"], [[_e(k), f"{v:.3f}"] for k, v in timings])]
    provenance = [[_e(k), _e(v)] for k, v in sorted(attrs.items()) if k != "spec_text"]
    parts += ["<h2>Provenance</h2>", _table(["key", "value"], provenance, left=2)]
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def write_html(res: "Result", path: str | Path) -> None:
    """Write the report (self-contained: open it anywhere, offline)."""
    Path(path).write_text(render_html(res), encoding="utf-8")
