"""The JSON result: everything a run produced, enough to rebuild the graph, tables and plots offline.

It is written one score row at a time (atpdsl.outputs.json_chunks): a run may score tens of millions of nodes.

Shape (schema_version 1; fields are added, never renamed):
    format            "atpdsl-result"
    schema_version    int (atpdsl.circuit.scores.SCHEMA_VERSION)
    sign_convention   the sentence defining effect and estimate signs
    spec_file, spec_hash, model_id, model_revision (null when unpinned)
    method, metric, n_pairs, clean_metric, corrupt_metric
    selection         {rule, kind, value, cut, aggregate, value_definition, selected: [names],
                      dropped: [{node, verified, cut}], of_edges, edges / dropped_edges [[source, target, channel]]}
    false_negatives   {bound, confidence, samples, nodes_tested, inclusion, sentence} or null
    diagnostic        the diagnostic's sentence, or null
    non_finite        present only when some number was NaN or infinite: where (it is written as null)
    timings           {engine: {phase: seconds}, pipeline: {phase: seconds}} (pipeline: compile,
                      execute, select, graph, export)
    provenance        {key: value} from the engine
    versions          {package: version} at the time of writing
    scores            {columns, rows}: SCORE_COLUMNS (selection_value and decision among them) plus
                      per_pair, per_pair_score, verified_per_pair (lists or null) and attrs
                      ({key: scalar}); rows in the engine's rank order
    edges             {columns, rows}: source, target, weight (null when unweighted), in_circuit
                      (kept by the graph's edge cut), verified_weight (null unless path-patched), channel (q/k/v)
    extras            the engine's extras (arrays as nested lists)
    plan              the compiled Plan as a dict, or null
    graph             networkx node-link data (`node_link_data(G, edges="edges")`)
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import math
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import networkx as nx

from atpdsl.errors import DataError
from atpdsl.names import NodeNameError, parse_node
from atpdsl.plan import Plan
from atpdsl.circuit.scores import SCHEMA_VERSION, SIGN_CONVENTION, EdgeScore, FalseNegativeBound, NodeScore, RunResult
from atpdsl.circuit.select import DroppedNode, SelectionOutcome
from atpdsl.outputs.json_chunks import Lazy, chunks
from atpdsl.outputs.streams import read_text, text_sink
from atpdsl.outputs.table import EDGE_COLUMNS, SCORE_COLUMNS, edges_table, score_rows

from atpdsl.outputs.result import Result

__all__ = [
    "FORMAT",
    "document",
    "dumps",
    "write_json",
    "export_json",
    "read_document",
    "read_result",
    "load_result",
    "plan_from_dict",
]

FORMAT = "atpdsl-result"
_EXTRA_SCORE_COLUMNS = ("per_pair", "per_pair_score", "verified_per_pair", "attrs")


def _pairs_to_dict(pairs: Any) -> dict[str, Any]:
    """(key, value) pairs as an object; a repeated timing phase adds up rather than overwrites."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out and isinstance(value, (int, float)) and isinstance(out[key], (int, float)):
            out[key] += value
        else:
            out[key] = value
    return out


def _score_row(base: dict[str, Any], score: NodeScore) -> dict[str, Any]:
    row = dict(base)
    row["per_pair"] = None if score.per_pair is None else [float(v) for v in score.per_pair]
    row["per_pair_score"] = None if score.per_pair_score is None else [float(v) for v in score.per_pair_score]
    row["verified_per_pair"] = None if score.verified_per_pair is None else [float(v) for v in score.verified_per_pair]
    row["attrs"] = {k: v for k, v in score.attrs}
    return row


def _bound_document(bound: FalseNegativeBound) -> dict[str, Any]:
    """The diagnostic's numbers; an unbounded result is null (JSON has no infinity)."""
    doc = {**dataclasses.asdict(bound), "sentence": bound.sentence}
    if not math.isfinite(bound.bound):
        doc["bound"] = None
    return doc


def document(res: "Result") -> dict[str, Any]:
    """The JSON document for a result (see the module docstring for its fields), every score row in memory."""
    doc = _document(res)
    doc["scores"] = {**doc["scores"], "rows": list(doc["scores"]["rows"].items)}
    return doc


def _rows(res: "Result") -> Iterator[dict[str, Any]]:
    """Each node's row with its per-pair numbers, in rank order, made one at a time (each record once)."""
    records, again = itertools.tee(res.result.nodes)  # in step: tee holds at most one record
    for row, score in zip(score_rows(res.result, res.selection, records), again):
        yield _score_row(row, score)


def _document(res: "Result") -> dict[str, Any]:
    """The document with its score rows as a `Lazy` list (atpdsl.outputs.json_chunks)."""
    from atpdsl.circuit.graph import package_versions

    result, plan = res.result, res.plan
    bound = result.false_negatives
    plan_dict = plan.to_dict() if plan is not None else res.plan_dict
    revision = plan.model.revision if plan is not None else res.graph.graph.get("model_revision")
    spec_file = plan.spec_file if plan is not None else res.graph.graph.get("spec_file", "")
    return {
        "format": FORMAT,
        "schema_version": SCHEMA_VERSION,
        "sign_convention": SIGN_CONVENTION,
        "spec_file": spec_file,
        "spec_hash": result.spec_hash,
        "model_id": result.model_id,
        "model_revision": revision,
        "method": result.method,
        "metric": result.metric,
        "n_pairs": result.n_pairs,
        "clean_metric": result.clean_metric,
        "corrupt_metric": result.corrupt_metric,
        "selection": {
            "rule": res.selection.rule,
            "kind": res.selection.kind,
            "value": res.selection.value,
            "cut": res.selection.cut,
            "aggregate": res.selection.aggregate,
            "value_definition": res.selection.value_definition,
            "selected": list(res.selection.selected),
            "dropped": [dataclasses.asdict(d) for d in res.selection.dropped],
            "added": list(res.selection.added),
            "of_edges": res.selection.of_edges,
            **{k: [list(e) for e in getattr(res.selection, k)] for k in ("edges", "dropped_edges")},
        },
        "false_negatives": None if bound is None else _bound_document(bound),
        "diagnostic": None if bound is None else bound.sentence,
        "timings": {"engine": _pairs_to_dict(result.timings), "pipeline": _pairs_to_dict(res.timings)},
        "provenance": _pairs_to_dict(result.provenance),
        "versions": package_versions(),
        "scores": {
            "columns": [*SCORE_COLUMNS, *_EXTRA_SCORE_COLUMNS],
            "rows": Lazy(_rows(res)),
        },
        "edges": {"columns": list(EDGE_COLUMNS), "rows": edges_table(result, res.graph.edges).rows},
        "resolved_tokens": result.extras.get("resolved_tokens"),
        "warnings": result.extras.get("warnings"),
        "extras": {k: v for k, v in result.extras.items() if k not in _TOP_LEVEL_EXTRAS},
        "plan": plan_dict,
        "graph": nx.node_link_data(res.graph, edges="edges"),
    }


_TOP_LEVEL_EXTRAS = ("resolved_tokens", "warnings")
"""Engine extras the JSON puts at the top level (what every pair's answers resolved to, the check's warnings)."""


def dumps(res: "Result") -> str:
    """The JSON document as text: standard JSON, so a NaN or infinity is written as null and its place
    listed under `non_finite` (a reader sees that a number was not a number instead of a silent gap)."""
    return "".join(chunks(_document(res)))


def write_json(res: "Result", path: str | Path | IO[str]) -> None:
    """Write the JSON result (atomically when given a path), one score row at a time: the text is what `dumps`
    gives, and the rows are never all in memory (a run may score tens of millions of nodes)."""
    with text_sink(path) as out:
        for piece in chunks(_document(res)):
            out.write(piece)


def export_json(res: "Result", path: str | Path) -> list[Path]:
    """The format registry's writer (see atpdsl.outputs.formats)."""
    write_json(res, path)
    return [Path(path)]


def read_document(path: str | Path | IO[str]) -> dict[str, Any]:
    """Load and check a JSON result document; DataError names the file and what is wrong."""
    name = getattr(path, "name", str(path))
    try:
        text = read_text(path)
    except OSError as error:
        raise DataError(f"cannot read result file {name!r}: {error.strerror or error}") from None
    except UnicodeDecodeError as error:
        raise DataError(f"{name}: not UTF-8 text (byte {error.start})") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(f"{name}: not a JSON file ({error.msg} at line {error.lineno})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise DataError(f"{name}: not an atpdsl result (expected a JSON object with \"format\": \"{FORMAT}\")")
    version = doc.get("schema_version")
    if not isinstance(version, int) or version > SCHEMA_VERSION:
        raise DataError(
            f"{name}: result schema_version {version!r} is newer than this atpdsl reads ({SCHEMA_VERSION}); upgrade atpdsl"
        )
    missing = [k for k in ("scores", "graph", "selection", "model_id") if k not in doc]
    if missing:
        raise DataError(f"{name}: result is missing {', '.join(missing)}")
    return doc


def _tuple_or_none(values: Any) -> tuple[float, ...] | None:
    """Per-pair numbers; null is a number the writer could not write (NaN or infinite: `non_finite`)."""
    return None if values is None else tuple(math.nan if v is None else float(v) for v in values)


def _number(row: dict[str, Any], key: str, optional: bool = False) -> float | None:
    """A row's numeric field (bool and text are not numbers); ValueError naming the field otherwise."""
    value = row.get(key)
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"field {key!r} of node {row.get('node')!r} is {value!r}, not a number")
    return value


def _run_result(doc: dict[str, Any], name: str) -> RunResult:
    """The engine's numbers from a checked document; DataError naming the file for anything malformed."""
    try:
        return _run_result_unchecked(doc, name)
    except DataError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        what = f"missing {error}" if isinstance(error, KeyError) else str(error)
        raise DataError(f"{name}: malformed atpdsl result ({what})") from None


def _run_result_unchecked(doc: dict[str, Any], name: str) -> RunResult:
    nodes = []
    rows = doc["scores"]["rows"]
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise ValueError("scores.rows must be a list of objects")
    for row in rows:
        try:
            node = parse_node(row["node"])
        except NodeNameError as error:
            raise DataError(f"{name}: {error}") from None
        nodes.append(
            NodeScore(
                node=node,
                estimate=_number(row, "estimate", optional=True),
                score=_number(row, "score"),
                method=str(row["method"]),
                rank=int(_number(row, "rank")),
                per_pair=_tuple_or_none(row.get("per_pair")),
                verified_effect=row.get("verified_effect"),
                verified_per_pair=_tuple_or_none(row.get("verified_per_pair")),
                attrs=tuple((row.get("attrs") or {}).items()),
                per_pair_score=_tuple_or_none(row.get("per_pair_score")),
            )
        )
    edge_rows = doc.get("edges", {}).get("rows", [])
    if not isinstance(edge_rows, list) or not all(isinstance(e, dict) for e in edge_rows):
        raise ValueError("edges.rows must be a list of objects")
    edges = tuple(EdgeScore(str(e["source"]), str(e["target"]), e.get("weight"), e.get("verified_weight"),
                            e.get("channel") or "") for e in edge_rows)
    fn = doc.get("false_negatives")
    bound = None
    if fn is not None:
        fields = {f.name for f in dataclasses.fields(FalseNegativeBound)}
        values = {k: v for k, v in fn.items() if k in fields}
        if values.get("bound") is None:  # written as null when the diagnostic could not bound anything
            values["bound"] = math.inf
        bound = FalseNegativeBound(**values)
    return RunResult(
        model_id=doc["model_id"],
        spec_hash=doc.get("spec_hash", ""),
        method=doc.get("method", ""),
        metric=doc.get("metric", ""),
        nodes=tuple(nodes),
        n_pairs=doc.get("n_pairs", 0),
        clean_metric=doc.get("clean_metric", math.nan),
        corrupt_metric=doc.get("corrupt_metric", math.nan),
        edges=edges,
        false_negatives=bound,
        timings=tuple(doc.get("timings", {}).get("engine", {}).items()),
        provenance=tuple(doc.get("provenance", {}).items()),
        extras={**(doc.get("extras") or {}), **{k: doc[k] for k in _TOP_LEVEL_EXTRAS if doc.get(k) is not None}},
    )


def _graph(doc: dict[str, Any]) -> nx.DiGraph:
    G = nx.node_link_graph(doc["graph"], edges="edges")
    return nx.DiGraph(G)


def read_result(path: str | Path | IO[str]) -> tuple[RunResult, nx.DiGraph]:
    """The engine's numbers and the circuit graph from a JSON result."""
    doc = read_document(path)
    name = getattr(path, "name", str(path))
    return _run_result(doc, name), _graph(doc)


def _aggregate(doc: dict[str, Any]) -> str:
    """The aggregate a saved selection used (older results did not store it: the plan's, else mean_abs)."""
    sel, plan, extras = doc["selection"], doc.get("plan") or {}, doc.get("extras") or {}
    return str(sel.get("aggregate") or (plan.get("method") or {}).get("aggregate") or extras.get("aggregate")
               or "mean_abs")


def load_result(path: str | Path | IO[str]) -> Result:
    """A whole Result from a JSON result (plan rebuilt when its shape still matches); DataError naming the file
    when it is not a well-formed atpdsl result."""
    doc = read_document(path)
    name = getattr(path, "name", str(path))
    try:
        return _load(doc, name)
    except DataError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, nx.NetworkXError) as error:
        what = f"missing {error}" if isinstance(error, KeyError) else str(error)
        raise DataError(f"{name}: malformed atpdsl result ({what})") from None


def _load(doc: dict[str, Any], name: str) -> Result:
    run_result = _run_result(doc, name)
    sel = doc["selection"]
    outcome = SelectionOutcome(
        kind=sel["kind"],
        value=float(sel["value"]),
        cut=float(sel["cut"]),
        selected=tuple(sel["selected"]),
        dropped=tuple(DroppedNode(**d) for d in sel.get("dropped", [])),
        added=tuple(sel.get("added", ())),
        aggregate=_aggregate(doc), of_edges=bool(sel.get("of_edges")),
        **{k: tuple(map(tuple, sel.get(k, []))) for k in ("edges", "dropped_edges")},
    )
    plan_dict = doc.get("plan")
    plan = None
    if plan_dict is not None:
        try:
            plan = plan_from_dict(plan_dict)
        except (TypeError, KeyError, ValueError):
            plan = None  # written by another version of the Plan: keep the dict, show what we can
    pipeline_timings = tuple(doc.get("timings", {}).get("pipeline", {}).items())
    return Result(plan, run_result, _graph(doc), outcome, timings=pipeline_timings, plan_dict=plan_dict)


# -- rebuilding a Plan from its dict ------------------------------------------------------------


def _build(tp: Any, value: Any) -> Any:
    """Turn JSON data back into the annotated type: dataclasses, tuples, optionals."""
    if value is None:
        return None
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        for option in options:
            if dataclasses.is_dataclass(option) and isinstance(value, dict):
                return _build(option, value)
            if typing.get_origin(option) is tuple and isinstance(value, list):
                return _build(option, value)
        return value
    if dataclasses.is_dataclass(tp):
        hints = typing.get_type_hints(tp)
        known = {f.name for f in dataclasses.fields(tp)}
        return tp(**{k: _build(hints[k], v) for k, v in value.items() if k in known})
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_build(args[0], v) for v in value)
        return tuple(_build(a, v) for a, v in zip(args, value))
    if tp is Any:
        return _frozen(value)
    if tp is float and isinstance(value, int):
        return float(value)
    return value


def _frozen(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_frozen(v) for v in value)
    return value


def plan_from_dict(data: dict[str, Any]) -> Plan:
    """The Plan that `Plan.to_dict()` produced this dict from (JSON lists back to tuples)."""
    return _build(Plan, data)
