"""Figures of a result: the circuit diagram, a layer x head heatmap and per-layer neuron scores.

One export path gives up to three files (the same extension, .png or .svg):
    x.png          the circuit diagram (always)
    x-heads.png    layer x head heatmaps of score and signed estimate, one row per kind among
                   heads, queries, keys, values (when the run scored any of them)
    x-neurons.png  per-layer neuron scores (when the run scored neurons)
Colours follow every other output: blue = patching the node raises the metric, red = lowers it; a
verified node is drawn with its measured (exact) effect, the estimate printed beside it.
matplotlib's Agg canvas draws off screen; pyplot is never imported, so no global state changes.
"""
from __future__ import annotations

import io
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable

import networkx as nx

from atpdsl.names import NodeKind
from atpdsl.circuit.scores import NodeScore, RunResult

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

    from atpdsl.outputs.result import Result

__all__ = [
    "circuit_figure",
    "heads_figure",
    "neurons_figure",
    "figures",
    "figure_builders",
    "figure_paths",
    "figure_bytes",
    "write_figures",
    "export_png",
    "export_svg",
]

_HEAD_KINDS = (NodeKind.HEAD, NodeKind.QUERY, NodeKind.KEY, NodeKind.VALUE)
_KIND_TITLES = {
    NodeKind.HEAD: "heads (output)",
    NodeKind.QUERY: "queries",
    NodeKind.KEY: "keys",
    NodeKind.VALUE: "values",
}
_BLUE = "#2166ac"
_RED = "#b2182b"


def _new_figure(width: float, height: float) -> "Figure":
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _node_label(node: str, data: dict) -> str:
    """Name, then the exact effect with the estimate beside it (verified nodes) or the estimate."""
    label = str(data.get("name", node))
    if "verified_effect" in data:
        return label + f"\nexact {data['verified_effect']:+.3g} (est {data['estimate']:+.3g})"
    if "estimate" in data:
        label += f"\nest {data['estimate']:+.3g}"
    return label


def _draw_edges(ax: Any, G: nx.DiGraph, positions: dict[str, tuple[float, float]]) -> None:
    """Edges as arrows: colour by the sign of the weight (verified where measured), width by |weight|."""
    from matplotlib.patches import FancyArrowPatch

    def weight(data: dict) -> float:
        return float(data.get("verified_weight", data["weight"]))

    weights = [abs(weight(d)) for *_, d in G.edges(data=True) if "weight" in d]
    top_weight = max(weights, default=0.0) or 1.0
    edges = list(G.edges(data=True))
    # residual-stream edges say little one by one: the more there are, the fainter they are drawn
    alpha = 0.6 if weights else max(0.06, min(0.5, 2.5 / max(1, len(edges)) ** 0.5))
    for a, b, data in edges:
        if "weight" in data:
            w = weight(data)
            colour, lw = (_BLUE if w >= 0 else _RED), 0.5 + 3.5 * abs(w) / top_weight
        else:
            colour, lw = "#8c8c8c", 0.7
        (xa, ya), (xb, yb) = positions[a], positions[b]
        # an edge that skips rows bends, so it does not run straight through the nodes between
        bend = 0.0 if abs(yb - ya) <= 1 else (0.35 if xa == xb else 0.15)
        ax.add_patch(FancyArrowPatch((xa, ya), (xb, yb), arrowstyle="-|>", mutation_scale=7 + 2 * lw,
                                     connectionstyle=f"arc3,rad={bend}", color=colour, linewidth=lw,
                                     alpha=alpha, zorder=1, shrinkA=12, shrinkB=12))


def _decorate(fig: "Figure", ax: Any, G: nx.DiGraph, rows: dict[int, list[str]], half: float, width: float) -> None:
    """Row labels, limits, the title (selection, dropped nodes, edge cut) and the colour legend."""
    from matplotlib.patches import Patch

    from atpdsl.circuit.graph import describe_edges
    from atpdsl.outputs.style import row_label

    n_layers = int(G.graph.get("n_layers", 0))
    ax.set_yticks(range(len(rows)), [row_label(s, n_layers) for s in rows])
    ax.set_xticks([])
    ax.set_xlim(-half, half)
    ax.set_ylim(-0.6, len(rows) - 0.4)
    for side in ("top", "right", "bottom"):
        ax.spines[side].set_visible(False)
    title = f"Circuit: {G.graph.get('model_id', '')}, {G.graph.get('metric', '')}"
    detail = f"{G.number_of_nodes() - 2} node(s), select {G.graph.get('selection', '')}"
    if G.graph.get("dropped_verified"):
        detail += f"; dropped after verification: {G.graph['dropped_verified'].replace(',', ', ')}"
    detail += f"; edges: {describe_edges(G)}"
    chars = int(width * 11)
    ax.set_title(textwrap.fill(title, chars) + "\n" + textwrap.fill(detail, int(chars * 1.15)), fontsize=9)
    handles = [
        Patch(facecolor=_BLUE, label="patching raises the metric"),
        Patch(facecolor=_RED, label="patching lowers the metric"),
        Patch(facecolor="white", edgecolor="black", linewidth=2.4, label="verified: coloured by the exact effect"),
    ]
    fig.legend(handles=handles, loc="outside lower center", ncols=3, fontsize=8, frameon=False)


def circuit_figure(G: nx.DiGraph) -> "Figure":
    """The circuit, bottom (embed) to top (logits), one row per stage; node colour = sign, size = score."""
    from atpdsl.outputs.style import effect_of, layered_positions, node_rgb, row_order, top_abs, top_effect

    rows = row_order(G)
    positions = layered_positions(G)
    widest = max((len(r) for r in rows.values()), default=1)
    labels = {node: _node_label(node, data) for node, data in G.nodes(data=True)}
    chars = max((len(line) for text in labels.values() for line in text.splitlines()), default=8)
    font = max(5.5, min(9.0, 100.0 / widest))
    per_node = max(1.4, 0.078 * chars * font / 9.0 + 0.6)  # inches: the longest label, plus its box
    width = min(48.0, max(7.0, per_node * widest + 2.0))
    height = min(30.0, max(4.5, 0.9 * len(rows) + 1.5))
    fig = _new_figure(width, height)
    ax = fig.add_subplot()
    top_est, top_score = top_effect(G), top_abs(G, "score")
    _draw_edges(ax, G, positions)
    for node, data in G.nodes(data=True):
        x, y = positions[node]
        rgb = tuple(c / 255 for c in node_rgb(effect_of(data), top_est))
        label = labels[node]
        pad = 0.3 + 0.9 * abs(float(data.get("score", 0.0))) / top_score
        box = {
            "boxstyle": f"round,pad={pad:.2f}",
            "facecolor": rgb,
            "edgecolor": "black",
            "linewidth": 2.4 if data.get("verified") else 0.8,
        }
        dark = sum(rgb) < 1.5
        ax.text(x, y, label, ha="center", va="center", fontsize=font, color="white" if dark else "black",
                bbox=box, zorder=3)
    _decorate(fig, ax, G, rows, (widest - 1) / 2.0 + 0.8, width)
    return fig


def _effect(n: NodeScore) -> float:
    """The signed number a node is drawn with: exact where verified, else the estimate."""
    return float(n.estimate if n.verified_effect is None else n.verified_effect)


def _summed(nodes: Iterable[NodeScore]) -> dict[tuple[int, int], tuple[float, float]]:
    """(layer, index) -> (score, effect), summed over positions for per-position nodes; the effect is the
    exact one for verified nodes and the estimate otherwise (see `_effect`)."""
    out: dict[tuple[int, int], tuple[float, float]] = {}
    for n in nodes:
        key = (n.node.layer, int(n.node.index or 0))
        score, est = out.get(key, (0.0, 0.0))
        out[key] = (score + float(n.score), est + _effect(n))
    return out


def heads_figure(result: RunResult, in_circuit: Iterable[str] = ()) -> "Figure | None":
    """Layer x head heatmaps (score and signed estimate) for each head-like kind scored; None if none.

    Per-position nodes are summed over positions (AtP is linear, so summed estimates are the
    whole head's estimate). Boxed cells hold nodes in the circuit; grey cells were not scored.
    """
    import numpy as np
    from matplotlib import colormaps
    from matplotlib.patches import Rectangle

    members = set(in_circuit)
    kinds = [k for k in _HEAD_KINDS if any(n.node.kind is k for n in result.nodes)]
    if not kinds:
        return None
    layers = max(n.node.layer for n in result.nodes if n.node.kind in kinds) + 1
    heads = max(int(n.node.index or 0) for n in result.nodes if n.node.kind in kinds) + 1
    cell = 0.45 if heads <= 16 else 0.25
    fig = _new_figure(2 * max(3.6, cell * heads + 1.8), max(2.8, (cell * layers + 1.2)) * len(kinds) + 0.4)
    axes = fig.subplots(len(kinds), 2, squeeze=False)
    annotate = layers * heads <= 144
    for row, kind in enumerate(kinds):
        nodes = [n for n in result.nodes if n.node.kind is kind]
        cells = _summed(nodes)
        chosen = {(n.node.layer, int(n.node.index or 0)) for n in nodes if n.name in members}
        score = np.full((layers, heads), np.nan)
        est = np.full((layers, heads), np.nan)
        for (layer, index), (s, e) in cells.items():
            score[layer, index], est[layer, index] = s, e
        finite_est = np.abs(est[np.isfinite(est)])
        bound = float(finite_est.max()) if finite_est.size and finite_est.max() > 0 else 1.0
        panels = (
            (score, "score (mean |estimate|)", colormaps["Purples"].with_extremes(bad="#e6e6e6"), 0.0, None),
            (est, "effect (exact where verified, else estimate)", colormaps["RdBu"].with_extremes(bad="#e6e6e6"), -bound, bound),
        )
        for col, (values, label, cmap, vmin, vmax) in enumerate(panels):
            ax = axes[row][col]
            image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
            fig.colorbar(image, ax=ax, shrink=0.9)
            summed = " (summed over positions)" if any(n.node.position is not None for n in nodes) else ""
            ax.set_title(textwrap.fill(f"{_KIND_TITLES[kind]}: {label}{summed}", 40), fontsize=9)
            ax.set_xlabel("head" if not any(n.node.grouped for n in nodes) else "head / KV group")
            ax.set_ylabel("layer")
            ax.set_xticks(range(heads) if heads <= 32 else range(0, heads, max(1, heads // 16)))
            ax.set_yticks(range(layers))
            for layer, index in chosen:
                ax.add_patch(Rectangle((index - 0.5, layer - 0.5), 1, 1, fill=False, edgecolor="black", linewidth=2))
            if annotate:
                top = float(np.nanmax(np.abs(values))) or 1.0
                for (layer, index), (s, e) in cells.items():
                    value = s if col == 0 else e
                    colour = "white" if abs(value) / top > 0.55 else "black"
                    ax.text(index, layer, f"{value:.2g}", ha="center", va="center", fontsize=6, color=colour)
    fig.suptitle(f"Head scores: {result.model_id}, {result.metric} (boxed: in the circuit)", fontsize=10)
    return fig


def neurons_figure(result: RunResult, in_circuit: Iterable[str] = ()) -> "Figure | None":
    """Per-layer neuron scores (stems coloured by the sign of the effect, exact where verified); None if none."""
    members = set(in_circuit)
    neurons = [n for n in result.nodes if n.node.kind is NodeKind.NEURON]
    if not neurons:
        return None
    layers = sorted({n.node.layer for n in neurons})
    fig = _new_figure(10.0, 1.9 * len(layers) + 1.0)
    axes = fig.subplots(len(layers), 1, squeeze=False, sharex=True)
    labelled_in = {n.node.summed().name for n in neurons if n.name in members}
    for ax, layer in zip((row[0] for row in axes), layers):
        cells = _summed(n for n in neurons if n.node.layer == layer)
        xs = sorted(i for (_, i) in cells)
        scores = [cells[(layer, i)][0] for i in xs]
        colours = [_BLUE if cells[(layer, i)][1] >= 0 else _RED for i in xs]
        ax.vlines(xs, 0, scores, colors=colours, linewidth=0.9)
        top = sorted(xs, key=lambda i: -cells[(layer, i)][0])[:3]
        for i in xs:
            name = f"L{layer}.N{i}"
            if name in labelled_in or i in top:
                ax.plot([i], [cells[(layer, i)][0]], "o", color="black" if name in labelled_in else "grey", markersize=3)
                ax.annotate(name, (i, cells[(layer, i)][0]), fontsize=7, xytext=(2, 2), textcoords="offset points")
        ax.set_ylabel(f"L{layer}\nscore", fontsize=8)
        ax.margins(x=0.04, y=0.15)
        ax.set_ylim(bottom=0)
    axes[-1][0].set_xlabel("neuron index (black dots: in the circuit; blue raises, red lowers the metric)")
    fig.suptitle(f"Neuron scores per layer: {result.model_id}, {result.metric}", fontsize=10)
    return fig


def figure_builders(res: "Result") -> dict[str, Callable[[], "Figure | None"]]:
    """Suffix ("" for the circuit diagram, "heads", "neurons") -> a function drawing that figure or None."""
    members = res.selection.selected
    return {
        "": lambda: circuit_figure(res.graph),
        "heads": lambda: heads_figure(res.result, members),
        "neurons": lambda: neurons_figure(res.result, members),
    }


def figures(res: "Result") -> dict[str, "Figure"]:
    """The figures for a result, keyed by file-name suffix ("" for the circuit diagram)."""
    made = {suffix: build() for suffix, build in figure_builders(res).items()}
    return {suffix: fig for suffix, fig in made.items() if fig is not None}


def figure_paths(path: str | Path, suffixes: Iterable[str]) -> dict[str, Path]:
    """`x.png` -> {"": x.png, "heads": x-heads.png, "neurons": x-neurons.png} for the given suffixes."""
    p = Path(path)
    return {s: p if not s else p.with_name(f"{p.stem}-{s}{p.suffix}") for s in suffixes}


def figure_bytes(fig: "Figure", fmt: str = "png", dpi: int = 120) -> bytes:
    """A figure rendered to PNG or SVG bytes (SVG text stays text; output is reproducible)."""
    import matplotlib

    buffer = io.BytesIO()
    with matplotlib.rc_context({"svg.hashsalt": "atpdsl", "svg.fonttype": "none"}):
        metadata = {"Date": None} if fmt == "svg" else {"Software": None}
        fig.savefig(buffer, format=fmt, dpi=dpi, metadata=metadata)
    return buffer.getvalue()


def write_figures(res: "Result", path: str | Path, fmt: str | None = None) -> list[Path]:
    """Write every figure for `path` (see the module docstring); returns the files written.

    A figure that fails does not stop the others; the failure is raised after they are written.
    Each file is written atomically.
    """
    from atpdsl.outputs.atomic import write_bytes
    from atpdsl.outputs.formats import ExportError

    fmt = fmt or Path(path).suffix.lstrip(".").lower()
    if fmt not in ("png", "svg"):
        raise ExportError(f"cannot draw {str(path)!r} as {fmt!r}: figures are .png or .svg")
    written: list[Path] = []
    errors: list[str] = []
    for suffix, build in figure_builders(res).items():
        target = figure_paths(path, [suffix])[suffix]
        try:
            fig = build()
            if fig is None:
                continue
            write_bytes(target, figure_bytes(fig, fmt))
            written.append(target)
        except Exception as error:  # noqa: BLE001 - the other figures are still written
            errors.append(f"{target}: {type(error).__name__}: {error}")
    if errors:
        raise ExportError("could not write " + "; ".join(errors))
    return written



def export_png(res: "Result", path: str | Path) -> list[Path]:
    """The format registry's writer for `.png` (see atpdsl.outputs.formats)."""
    return write_figures(res, path, "png")


def export_svg(res: "Result", path: str | Path) -> list[Path]:
    """The format registry's writer for `.svg` (see atpdsl.outputs.formats)."""
    return write_figures(res, path, "svg")
