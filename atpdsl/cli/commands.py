"""The `run`, `show` and `export` commands: progress bars, the summary, profile tables, exit codes.

atpdsl/cli.py parses arguments and calls `cmd_run(args)`, `cmd_show(args)`, `cmd_export(args)`;
each returns the exit code (0 ok, 1 error). Machine output (`--json`) goes to stdout alone;
progress, errors and, under `--json`, the profile go to stderr.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from atpdsl.cli.progress import ProgressBars, progress_for
from atpdsl.errors import AtpError, SpecError

if TYPE_CHECKING:  # pragma: no cover
    from rich.console import Console

    from atpdsl.outputs.result import Result

__all__ = ["cmd_run", "cmd_show", "cmd_export", "print_summary", "print_profile", "ProgressBars", "SUMMARY_ROWS"]

SUMMARY_ROWS = 25
"""The summary table lists at most this many circuit nodes."""


def _consoles() -> tuple["Console", "Console"]:
    from rich.console import Console

    return Console(), Console(stderr=True)


def _error(console: "Console", message: str, output_format: str = "full") -> None:
    """An error line on stderr; under `--output-format json`, a JSON diagnostic on stdout as the CLI does."""
    if output_format == "json":
        import json

        fields = {"code": "error", "severity": "error", "message": message, "file": None, "line": None,
                  "column": None, "end_line": None, "end_column": None, "hints": []}
        print(json.dumps([fields], indent=2))
        return
    from rich.markup import escape

    console.print(f"[bold red]error[/]: {escape(message)}", highlight=False, soft_wrap=True)


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:+.4g}"


def _score_meaning(res: "Result") -> str:
    plan = res.plan
    if plan is not None and plan.method.name == "atp*" and plan.method.graddrop:
        return "AtP* ranking score (GradDrop)"
    aggregate = plan.method.aggregate if plan is not None else "mean_abs"
    return {"abs_mean": "|mean estimate|", "per_pair": "mean |estimate| per pair (per-pair values in the exports)"}.get(
        aggregate, "mean |estimate| per pair"
    )


def print_summary(res: "Result", console: "Console") -> None:
    """The run's summary: metric, top circuit nodes, dropped nodes, diagnostic, where exports went."""
    from rich.markup import escape
    from rich.table import Table

    from atpdsl.outputs.table import shown_rows

    result, sel = res.result, res.selection
    console.print(
        f"[bold]Circuit[/]: {len(sel.selected)} node(s) by [bold]{escape(sel.rule)}[/] "
        f"from {len(result.nodes)} scored - model {escape(result.model_id)}, method {escape(result.method)}, "
        f"{result.n_pairs} pair(s)",
        highlight=False,
        soft_wrap=True,
    )
    console.print(
        f"metric {escape(result.metric)}: clean {_fmt(result.clean_metric)}, corrupt {_fmt(result.corrupt_metric)}",
        highlight=False,
        soft_wrap=True,
    )
    for warning in (result.extras.get("warnings") or []) if isinstance(result.extras, dict) else []:
        console.print(f"[yellow]warning[/]: {escape(warning)}", highlight=False, soft_wrap=True)
    rows = shown_rows(result, sel, 10)  # the circuit's rows and the top 10, not every scored node's
    shown = [r for r in rows if r["in_circuit"]] or rows[: min(10, len(rows))]
    title = "circuit nodes" if any(r["in_circuit"] for r in rows) else "top nodes (none selected)"
    table = Table(title=title, title_justify="left")
    for name, justify in (("rank", "right"), ("node", "left"), ("estimate", "right"), ("score", "right"), ("verified", "right")):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for r in shown[:SUMMARY_ROWS]:
        table.add_row(str(r["rank"]), r["node"], _fmt(r["estimate"]), f"{r['score']:.4g}", _fmt(r["verified_effect"]))
    if len(shown) > SUMMARY_ROWS:
        table.caption = f"... and {len(shown) - SUMMARY_ROWS} more (see the exports)"
    console.print(table)
    console.print(f"[dim]estimate: effect = metric(clean, node set to corrupt) - metric(clean); "
                  f"score: {_score_meaning(res)}[/]", highlight=False, soft_wrap=True)
    _print_checks(res, console)
    _print_edges_and_exports(res, console)


def _print_checks(res: "Result", console: "Console") -> None:
    """What exact patching changed in the circuit, the verification summary and the diagnostic's sentence."""
    from rich.markup import escape

    result, sel = res.result, res.selection
    if sel.dropped:
        names = ", ".join(f"{d.node} (measured {d.verified:.3g})" for d in sel.dropped)
        console.print(f"dropped after verification (below the cut {sel.cut:.3g}): {escape(names)}", highlight=False, soft_wrap=True)
    if sel.added:
        by = result.by_name()
        names = ", ".join(f"{n} (measured {by[n].verified_effect:+.3g}, estimate {by[n].estimate:+.3g})" for n in sel.added)
        console.print(f"added after verification (measured effect reaches the cut {sel.cut:.3g}, the estimate did "
                      f"not): {escape(names)}", highlight=False, soft_wrap=True)
    positions = result.extras.get("positions") if isinstance(result.extras, dict) else None
    if positions and positions.get("mode") == "end":
        console.print("[yellow]note[/]: the prompts differ in length, so per-position nodes count from the end "
                      "(@-1 = last token); @-k names the same word in every pair only where the prompts share "
                      "their last k tokens. Equal-length prompts or template slots (@slot) align exactly.",
                      highlight=False, soft_wrap=True)
    ver = result.extras.get("verification") if isinstance(result.extras, dict) else None
    if ver:
        ranks = ", ".join(str(r) for r in ver.get("exceeding_ranks", []))
        console.print(f"[bold]verification[/]: {ver['exceeding']} of {ver['top']} verified node(s) reach the cut "
                      f"{ver['cut']:.3g} ({escape(str(ver['rule']))}) with their measured effect"
                      + (f", at rank(s) {ranks}" if ranks else ""), highlight=False, soft_wrap=True)
    if result.false_negatives is not None:
        console.print(f"[bold]diagnostic[/]: {escape(result.false_negatives.sentence)}", highlight=False,
                      soft_wrap=True)
    adaptive = (result.extras.get("diagnosis") or {}).get("adaptive") if isinstance(result.extras, dict) else None
    if adaptive:
        console.print(f"[bold]verify until confident[/]: stopped ({escape(str(adaptive.get('stop')))}) after "
                      f"{adaptive.get('exact_patches')} exact patches in {len(adaptive.get('rounds', []))} round(s)",
                      highlight=False, soft_wrap=True)


def _print_edges_and_exports(res: "Result", console: "Console") -> None:
    """The edge cut's line, then each export: written (and whether it replaced a file) or failed."""
    from rich.markup import escape

    from atpdsl.circuit.graph import describe_edges
    from atpdsl.outputs.manifest import manifest_path

    if res.result.edges:
        console.print(f"edges: {escape(describe_edges(res.graph))}", highlight=False, soft_wrap=True)
    for outcome in res.exports:
        if outcome.error is None:
            note = "" if outcome.requested else "  (result, for `atpdsl show` / `atpdsl export`)"
            for path in outcome.written:
                again = " (replaced the existing file)" if path in outcome.replaced else ""
                console.print(f"wrote {escape(path)}{again}{note}", highlight=False, soft_wrap=True)
        else:
            console.print(f"[red]failed[/] {escape(outcome.path)}", highlight=False, soft_wrap=True)
    json_out = [o for o in res.exports if o.format == "json"]
    if json_out:
        console.print(f"manifest {escape(str(manifest_path(json_out[0].path)))}", highlight=False, soft_wrap=True)


def print_profile(res: "Result", console: "Console") -> None:
    """Phase timings: the pipeline's phases, with the engine's inside `execute`."""
    from rich.table import Table

    table = Table(title="timings", title_justify="left")
    table.add_column("phase")
    table.add_column("seconds", justify="right")
    table.add_column("share", justify="right")
    engine = [(k, v) for k, v in res.result.timings if k != "total"]  # `execute` already is the total
    total = sum(v for _, v in res.timings) or sum(v for _, v in engine) or 1.0
    for phase, seconds in res.timings:
        table.add_row(phase, f"{seconds:.3f}", f"{seconds / total:.0%}")
        if phase == "execute":
            for sub, sub_s in engine:
                table.add_row(f"  {sub}", f"{sub_s:.3f}", f"{sub_s / total:.0%}")
    if not any(k == "execute" for k, _ in res.timings):
        for sub, sub_s in engine:
            table.add_row(f"engine {sub}", f"{sub_s:.3f}", f"{sub_s / total:.0%}")
    console.print(table)


def _report_failures(res: "Result", console: "Console") -> int:
    for outcome in res.failed:
        _error(console, f"export {outcome.path} failed: {outcome.error}")
    if res.failed:
        saved = [p for o in res.exports if o.format == "json" and o.error is None for p in o.written]
        if saved:
            console.print(f"the other exports were written; redo the failed ones with "
                          f"`atpdsl export {saved[0]} --to FMT`", highlight=False, soft_wrap=True, markup=False)
        return 1
    return 0


def _spec_error(error: SpecError, output_format: str) -> int:
    from atpdsl.language.diagnostics import render, summary

    if output_format == "json":
        print(render(error.diagnostics, "json"))
        return 1
    text = render(error.diagnostics, output_format)
    sys.stderr.write(text if text.endswith("\n") else text + "\n")
    sys.stderr.write(summary(error.diagnostics) + "\n")
    return 1


def cmd_run(args: argparse.Namespace) -> int:
    """`atpdsl run SPEC [--out DIR] [--quiet] [--json] [--profile] [--trust-remote-code]`."""
    from atpdsl import pipeline

    out, err = _consoles()
    quiet = bool(getattr(args, "quiet", False))
    as_json = bool(getattr(args, "json", False))
    profile = bool(getattr(args, "profile", False))
    output_format = getattr(args, "output_format", None) or "full"
    try:
        t0 = time.perf_counter()
        plan = pipeline.compile_spec(args.spec, out_dir=getattr(args, "out", None))
        if getattr(args, "trust_remote_code", False):
            plan = replace(plan, model=replace(plan.model, trust_remote_code=True))
        t1 = time.perf_counter()
        with progress_for(args, err) as bars:
            run_result = pipeline.execute_plan(plan, bars, fresh=bool(getattr(args, "fresh", False)))
        t2 = time.perf_counter()
        res = pipeline.finish(plan, run_result, timings=(("compile", t1 - t0), ("execute", t2 - t1)))
    except SpecError as error:
        return _spec_error(error, output_format)
    except AtpError as error:
        _error(err, str(error), output_format)
        return 1
    except KeyboardInterrupt:
        _error(err, "interrupted")
        return 130
    if as_json:
        sys.stdout.write(res.to_json() + "\n")
        sys.stdout.flush()
    elif not quiet:
        print_summary(res, out)
    if profile:
        print_profile(res, err if as_json else out)
    return _report_failures(res, err)


def _manifest_note(result_file: str, console: "Console") -> None:
    """Say whether the manifest beside a result vouches for its files (missing, changed, incomplete)."""
    from rich.markup import escape

    from atpdsl.outputs.manifest import verdict

    fine, lines = verdict(result_file)
    head = "[dim]" if fine else "[yellow]warning[/]: "
    console.print(head + escape(lines[0]) + ("[/]" if fine else ""), highlight=False, soft_wrap=True)
    for line in lines[1:]:
        console.print(escape(line), highlight=False, soft_wrap=True)


def cmd_show(args: argparse.Namespace) -> int:
    """`atpdsl show result.json` (or `x.manifest.json`): the run's summary again, and the manifest's verdict."""
    from atpdsl.pipeline import load

    out, err = _consoles()
    source = str(args.result)
    try:
        if source.endswith(".manifest.json"):
            from atpdsl.outputs.manifest import result_listed

            source = result_listed(source)
        res = load(source)
    except AtpError as error:
        _error(err, str(error), getattr(args, "output_format", None) or "full")
        return 1
    if getattr(args, "json", False):
        from atpdsl.outputs.jsonio import dumps

        sys.stdout.write(dumps(res) + "\n")
        _manifest_note(source, err)
        return 0
    print_summary(res, out)
    _manifest_note(source, out)
    if getattr(args, "profile", False):
        print_profile(res, out)
    return 0


def _export_target(source: str, fmt: str | None, out_arg: str | None) -> tuple[Path, str]:
    """The file and format for `atpdsl export`: the same registry (and aliases) as the checker's."""
    from atpdsl.outputs.formats import EXPORT_FORMATS, ExportError, format_of, known_words, lookup
    from atpdsl.outputs.writer import default_path

    if fmt is not None:
        fmt = lookup(fmt).name
    if out_arg is None:
        if fmt is None:
            raise ExportError(f"say which format: --to FMT ({known_words()}) or --out FILE")
        return default_path(source, fmt), fmt
    out = Path(out_arg).expanduser()
    if out.is_dir() or out_arg.endswith(("/", "\\")):
        if fmt is None:
            raise ExportError(f"--out {out_arg!r} is a folder: say which format with --to FMT")
        return out / default_path(Path(source).name, fmt), fmt
    if fmt is None:
        return out, format_of(out)
    suffix = out.suffix.lower().lstrip(".")
    if not suffix:
        return out.with_suffix(f".{fmt}"), fmt  # `--out circuit --to gexf` -> circuit.gexf
    if suffix in EXPORT_FORMATS and EXPORT_FORMATS[suffix].name != fmt:
        raise ExportError(f"--to {fmt} does not match --out {out_arg!r} (a {EXPORT_FORMATS[suffix].name} file name)")
    return out, fmt


def cmd_export(args: argparse.Namespace) -> int:
    """`atpdsl export result.json --to FMT [--out PATH]`: convert a saved result without rerunning."""
    from atpdsl.outputs.formats import planned_files
    from atpdsl.outputs.writer import target_problems, write
    from atpdsl.pipeline import load

    out, err = _consoles()
    output_format = getattr(args, "output_format", None) or "full"
    path: Path | str = "?"
    try:
        path, fmt = _export_target(str(args.result), getattr(args, "to", None), getattr(args, "out", None))
        res = load(args.result)
        existing = set() if target_problems(path, fmt) else {str(p) for p in planned_files(path, fmt) if p.exists()}
        written = write(res, path, fmt)
    except AtpError as error:
        _error(err, str(error), output_format)
        return 1
    except OSError as error:  # the file system refused: say which file (anything else is a bug: exit 3)
        _error(err, f"export {path} failed: {error.strerror or error}", output_format)
        return 1
    if not getattr(args, "quiet", False):
        for p in written:
            again = " (replaced the existing file)" if str(p) in existing else ""
            out.print(f"wrote {p}{again}", highlight=False, soft_wrap=True, markup=False)
    return 0

