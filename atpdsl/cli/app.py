"""The `atpdsl` command line: check, plan, run, show, export; user errors never end in a traceback."""
from __future__ import annotations

import argparse
import importlib
import io
import json
import os
import sys
import traceback
from collections import Counter
from collections.abc import Callable, Sequence

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from atpdsl import __version__
from atpdsl.language.diagnostics import OUTPUT_FORMATS, Diagnostic, render, summary
from atpdsl.errors import AtpError, SpecError
from atpdsl.plan import Plan

__all__ = ["main", "build_parser", "plan_text", "print_plan", "EXIT_OK", "EXIT_ERRORS", "EXIT_USAGE",
           "EXIT_INTERNAL"]

EXIT_OK = 0
EXIT_ERRORS = 1  # spec diagnostics or any other AtpError
EXIT_USAGE = 2  # argparse's own code for bad command lines
EXIT_INTERNAL = 3  # a bug in atpdsl

EXAMPLES = """\
examples:
  atpdsl check spec.atp                      report every problem in a spec, with line:col
  atpdsl check --output-format concise *.atp one line per problem (ruff style)
  atpdsl plan spec.atp                       show what a run would do and cost, without loading weights
  atpdsl plan spec.atp --emit python         print the equivalent nnsight program
  atpdsl run examples/induction.atp --out out/demo
  atpdsl show out/demo/induction.json        summarize a saved result
  atpdsl export out/demo/induction.json --to graphml --out circuit.graphml

exit codes: 0 ok, 1 errors in the spec or its inputs, 2 bad command line, 3 internal error
"""


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Show defaults and keep the examples' layout."""


def _common() -> argparse.ArgumentParser:
    """Options every subcommand takes (SUPPRESS so `atpdsl --debug check` and `atpdsl check --debug` agree)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the traceback of internal errors")
    return common


def _diag_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output-format", choices=OUTPUT_FORMATS, default="full",
                   help="how to print diagnostics: one line each, with source and carets, or JSON")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser: `atpdsl COMMAND ...`."""
    common = _common()
    parser = argparse.ArgumentParser(
        prog="atpdsl",
        description="A declarative circuit-discovery language for language models: AtP, AtP* and exact"
                    " activation patching from a .atp spec.",
        epilog=EXAMPLES,
        formatter_class=_Formatter,
    )
    parser.add_argument("--version", action="version", version=f"atpdsl {__version__}")
    parser.add_argument("--debug", action="store_true", default=False, help="show the traceback of internal errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("check", parents=[common], formatter_class=_Formatter,
                       help="check specs and report every problem",
                       description="Parse and check .atp specs (reads pairs files and the model's config.json,"
                                   " never the weights).",
                       epilog="example:\n  atpdsl check spec.atp other.atp --output-format concise")
    p.add_argument("specs", nargs="+", metavar="SPEC", help=".atp spec files")
    p.add_argument("--out", metavar="DIR", help="check exports as if written under DIR")
    _diag_option(p)

    p = sub.add_parser("plan", parents=[common], formatter_class=_Formatter,
                       help="compile a spec and print its plan and cost",
                       description="Compile a spec into its plan: pairs, nodes, module sites in forward order and"
                                   " the passes per batch with their cost. Loads no weights and no torch.",
                       epilog="examples:\n  atpdsl plan spec.atp\n  atpdsl plan spec.atp --json\n"
                              "  atpdsl plan spec.atp --emit python > run_atp.py")
    p.add_argument("spec", metavar="SPEC", help=".atp spec file")
    p.add_argument("--out", metavar="DIR", help="write exports under DIR instead of the spec's folder")
    p.add_argument("--emit", choices=("python",), help="print the equivalent program instead of the plan")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    _diag_option(p)

    p = sub.add_parser("run", parents=[common], formatter_class=_Formatter,
                       help="run a spec: score nodes, select the circuit, write exports",
                       epilog="example:\n  atpdsl run examples/induction.atp --out out/demo")
    p.add_argument("spec", metavar="SPEC", help=".atp spec file")
    p.add_argument("--out", metavar="DIR", help="write every export under DIR (keeping file names)")
    p.add_argument("--quiet", action="store_true", help="print nothing but errors")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--profile", action="store_true", help="print the time of each phase")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="let transformers run model code from the hub (only for models you trust)")
    _diag_option(p)

    p = sub.add_parser("show", parents=[common], formatter_class=_Formatter, help="summarize a saved result",
                       epilog="example:\n  atpdsl show out/demo/induction.json")
    p.add_argument("result", metavar="RESULT", help="a result .json written by `atpdsl run`")
    _diag_option(p)

    p = sub.add_parser("export", parents=[common], formatter_class=_Formatter,
                       help="convert a saved result to another format",
                       epilog="example:\n  atpdsl export out/demo/induction.json --to gexf --out circuit.gexf")
    p.add_argument("result", metavar="RESULT", help="a result .json written by `atpdsl run`")
    p.add_argument("--to", metavar="FMT", help="format (default: from --out's extension)")
    p.add_argument("--out", metavar="PATH", help="file to write")
    _diag_option(p)
    return parser


# ------------------------------------------------------------------ output

def _console(stderr: bool = False) -> Console:
    return Console(stderr=stderr, highlight=False, soft_wrap=True)


def _styled(rendered: str) -> Text:
    text = Text(rendered)
    text.highlight_regex(r"(?m)^error\[\w+\]", "bold red")
    text.highlight_regex(r"(?m)^warning\[\w+\]", "bold yellow")
    text.highlight_regex(r"(?m)^\s*\|\s*\^+$", "red")
    text.highlight_regex(r"(?m)= help:", "cyan")
    return text


def _print_diagnostics(diagnostics: Sequence[Diagnostic], fmt: str, stderr: bool) -> None:
    if not diagnostics:
        return
    if fmt == "json":
        print(render(diagnostics, "json"))
        return
    console = _console(stderr)
    console.print(_styled(render(diagnostics, fmt)))
    if fmt == "full":
        console.print()
    console.print(summary(diagnostics), style="bold")


def _fmt_cost(x: float) -> str:
    return f"{x:g}"


def _origins(plan: Plan) -> str:
    """Where the pairs came from, e.g. `20 from data.jsonl, 2 inline, 16 from the template at spec.atp:9`."""
    counts: Counter[str] = Counter()
    for p in plan.pairs:
        if "#" in p.origin:
            counts["from the template at " + p.origin.split("#")[0]] += 1
        elif p.origin.rsplit(":", 1)[0].endswith(".atp") or p.origin.rsplit(":", 1)[0] == plan.spec_file:
            counts["inline"] += 1
        else:
            counts["from " + p.origin.rsplit(":", 1)[0]] += 1
    return ", ".join(f"{v} {k}" for k, v in counts.items())


def _metric_text(m) -> str:
    if m is None:
        return "-"
    args = []
    for a in m.args:
        inner = a.field if a.field is not None else json.dumps(a.literal)
        args.append(f"first_token({inner})" if a.first_token else inner)
    call = f"{m.kind}({', '.join(args)})" if args else m.kind
    return f"{call} at {m.position}"


def _shown(path: str) -> str:
    """A path as the plan shows it: relative to the working folder when inside it."""
    try:
        rel = os.path.relpath(path)
    except ValueError:  # another drive on Windows
        return path
    return rel if not rel.startswith("..") and os.path.isabs(path) else path


def print_plan(plan: Plan, console: Console) -> None:
    """Print a plan as readable tables: what is scored, how, and what it costs."""
    extras = dict(plan.extras)
    console.print(Text(f"Plan for {_shown(plan.spec_file)}", style="bold"))
    console.print(f"spec sha256 {plan.spec_hash[:16]}…")
    about = Table(box=box.SIMPLE, show_header=False, pad_edge=False)
    about.add_column(style="bold")
    about.add_column()
    model = plan.model
    facts = []
    if "model_type" in extras:
        facts.append(str(extras["model_type"]))
    if "n_layers" in extras:
        facts.append(f"{extras['n_layers']} layers")
    desc = f"zoo {model.source}" if model.is_zoo else _shown(model.source)
    if facts:
        desc += f" ({', '.join(facts)})"
    about.add_row("model", desc)
    settings = f"dtype {model.dtype}, device {model.device}, attention {model.attention}"
    if model.revision:
        settings += f", revision {model.revision}"
    about.add_row("", settings)
    batches = extras.get("batches", 0)
    about.add_row("pairs", f"{len(plan.pairs)} ({_origins(plan)}); batch {plan.batch} -> {batches} batch"
                           f"{'es' if batches != 1 else ''}")
    about.add_row("metric", _metric_text(plan.metric))
    if plan.eval_metric is not None:
        about.add_row("eval metric", _metric_text(plan.eval_metric))
    method = plan.method
    how = method.name
    if method.name == "atp*":
        parts = [f"qk_fix {'on' if method.qk_fix else 'off'}",
                 f"graddrop {'per ' + method.graddrop_mode if method.graddrop else 'off'}"]
        if method.norm_fix:
            parts.append("norm_fix on")
        how += f" ({', '.join(parts)})"
    how += f", aggregate {method.aggregate}"
    if plan.write_per_pair:
        how += ", keep per_pair"
    about.add_row("method", how)
    about.add_row("seed", str(plan.seed))
    if plan.selection is not None:
        about.add_row("select", f"{plan.selection.kind} {plan.selection.value:g}")
    if plan.verification is not None:
        about.add_row("verify", f"top {plan.verification.top}")
    if plan.diagnosis is not None:
        d = plan.diagnosis
        about.add_row("diagnose", f"false_negatives: {d.samples} samples, confidence {d.confidence:g},"
                                  f" inclusion {d.inclusion:g}")
    console.print(about)

    groups = Table(title="nodes", box=box.SIMPLE_HEAD, title_justify="left", pad_edge=False)
    for col in ("kind", "layers", "indices", "positions", "line"):
        groups.add_column(col)
    for g in plan.nodes:
        if g.layers is None:
            layers = "all"
        else:
            layers = str(g.layers[0]) if g.layers[0] == g.layers[1] else f"{g.layers[0]}..{g.layers[1]}"
        if g.heads is None:
            idx = "all"
        else:
            idx = ", ".join(str(i) for i in g.heads[:8]) + (f", … ({len(g.heads)})" if len(g.heads) > 8 else "")
        groups.add_row(g.kind, layers, idx, "per position" if g.per_position else "summed",
                       str(g.where.line) if g.where else "")
    console.print(groups)
    if "node_count" in extras:
        console.print(f"{extras['node_count']} nodes (per-position groups count once per token position)")

    passes = Table(title="passes per batch (cost in forward-equivalents)", box=box.SIMPLE_HEAD,
                   title_justify="left", pad_edge=False, show_footer=True)
    passes.add_column("step", footer="total")
    total = sum(p.cost for p in plan.passes)
    passes.add_column("cost", justify="right", footer=_fmt_cost(total))
    passes.add_column("what", footer=f"x {batches} batch{'es' if batches != 1 else ''} ="
                                     f" {_fmt_cost(total * batches)} forward-equivalents")
    for p in plan.passes:
        passes.add_row(p.name, _fmt_cost(p.cost), p.description)
    console.print(passes)

    if plan.sites:
        shown = list(plan.sites[:12])
        console.print(Text(f"sites in forward order ({len(plan.sites)})", style="bold"))
        for s in shown:
            console.print(f"  {s}")
        if len(plan.sites) > len(shown):
            console.print(f"  … and {len(plan.sites) - len(shown)} more")
    else:
        console.print("sites: unknown until the model's config.json can be read")
    if plan.exports:
        exports = Table(title="exports", box=box.SIMPLE_HEAD, title_justify="left", pad_edge=False)
        exports.add_column("format")
        exports.add_column("path")
        for e in plan.exports:
            exports.add_row(e.format, _shown(e.path))
        console.print(exports)


def plan_text(plan: Plan, width: int = 100) -> str:
    """The plan as `atpdsl plan` prints it, without colour (for tests and logs)."""
    buf = io.StringIO()
    console = Console(file=buf, width=width, color_system=None, highlight=False, force_terminal=False,
                      soft_wrap=False)
    print_plan(plan, console)
    return "".join(line.rstrip() + "\n" for line in buf.getvalue().splitlines())


# ------------------------------------------------------------------ commands

def cmd_check(args: argparse.Namespace) -> int:
    """`atpdsl check`: every diagnostic of every spec; exit 1 if any is an error."""
    from atpdsl.language.compiler import check_file

    all_diags: list[Diagnostic] = []
    oks: list[str] = []
    for spec in args.specs:
        result = check_file(spec, out_dir=args.out)
        all_diags.extend(result.diagnostics)
        if result.ok:
            oks.append(f"{spec}: ok ({len(result.pairs)} pairs)")
    if args.output_format == "json":
        print(render(all_diags, "json"))
    else:
        _print_diagnostics(all_diags, args.output_format, stderr=False)
        for line in oks:
            _console().print(Text(line, style="green"))
    return EXIT_ERRORS if any(d.is_error for d in all_diags) else EXIT_OK


def cmd_plan(args: argparse.Namespace) -> int:
    """`atpdsl plan`: compile and print the plan (or its JSON, or the emitted program)."""
    from atpdsl.language.compiler import build_plan, check_file

    result = check_file(args.spec, out_dir=args.out)
    if not result.ok:
        raise SpecError(list(result.diagnostics))
    warnings = [d for d in result.diagnostics if not d.is_error]
    _print_diagnostics(warnings, args.output_format, stderr=True)
    plan = build_plan(result)
    if args.emit == "python":
        try:
            emit = importlib.import_module("atpdsl.engine.emit")
        except ModuleNotFoundError as e:
            if e.name not in ("atpdsl.engine.emit", "atpdsl.engine"):
                raise
            raise AtpError("`--emit python` is not available: atpdsl.engine.emit is not built yet") from None
        print(emit.emit_python(plan), end="")
        return EXIT_OK
    if args.json:
        print(json.dumps(plan.to_dict(), indent=2))
        return EXIT_OK
    print_plan(plan, _console())
    return EXIT_OK


def _delegate(name: str) -> Callable[[argparse.Namespace], int]:
    """A command implemented in atpdsl.cli.commands (the engine side), imported only when run."""

    def command(args: argparse.Namespace) -> int:
        try:
            module = importlib.import_module("atpdsl.cli.commands")
        except ModuleNotFoundError as e:
            if e.name != "atpdsl.cli.commands":
                raise
            raise AtpError(f"`atpdsl {args.command}` is not available: the engine is not built yet"
                           " (atpdsl.cli.commands is missing)") from None
        return int(getattr(module, name)(args))

    command.__name__ = name
    return command


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "check": cmd_check,
    "plan": cmd_plan,
    "run": _delegate("cmd_run"),
    "show": _delegate("cmd_show"),
    "export": _delegate("cmd_export"),
}


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code (0 ok, 1 errors, 2 usage, 3 internal error)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse exits for --help, --version and usage errors
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    fmt = getattr(args, "output_format", "full")
    try:
        return COMMANDS[args.command](args)
    except SpecError as e:
        if e.diagnostics:
            _print_diagnostics(e.diagnostics, fmt, stderr=fmt != "json")
        else:
            _console(True).print(Text(f"error: {e}", style="bold red"))
        return EXIT_ERRORS
    except AtpError as e:
        if fmt == "json":
            print(json.dumps([{"code": type(e).__name__, "severity": "error", "message": str(e), "file": None,
                               "line": None, "column": None, "end_line": None, "end_column": None,
                               "hints": []}], indent=2))
        else:
            _console(True).print(Text(f"error: {e}", style="bold red"))
        return EXIT_ERRORS
    except KeyboardInterrupt:
        _console(True).print("interrupted")
        return 130
    except Exception as e:  # noqa: BLE001 - the last line of defence: a bug, reported without a wall of text
        if getattr(args, "debug", False):
            traceback.print_exc()
        first = str(e).splitlines()[0] if str(e) else ""
        _console(True).print(Text(f"internal error: {type(e).__name__}{': ' + first if first else ''}",
                                  style="bold red"))
        if not getattr(args, "debug", False):
            _console(True).print("this is a bug in atpdsl; rerun with --debug for the traceback and report it")
        return EXIT_INTERNAL


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
