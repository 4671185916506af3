"""The `atpdsl` command line: check, plan, run, show, export; user errors never end in a traceback.

Nothing heavy is imported at module level: `--version` and `--help` answer without rich, `check` and `plan`
without torch. Exit codes: 0 ok, 1 a problem with the spec or its inputs, 2 a bad command line (argparse's
own code, also for a bad `--to` or `--threads`), 3 a bug in atpdsl.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from atpdsl.version import __version__
from atpdsl.cli.threads import parse_threads
from atpdsl.language.diagnostics import OUTPUT_FORMATS, Diagnostic, render, summary
from atpdsl.errors import AtpError, SpecError

if TYPE_CHECKING:  # pragma: no cover
    from rich.console import Console
    from rich.text import Text

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


def _add_check(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("check", parents=[common], formatter_class=_Formatter,
                       help="check specs and report every problem",
                       description="Parse and check .atp specs (reads pairs files and the model's config.json,"
                                   " never the weights).",
                       epilog="example:\n  atpdsl check spec.atp other.atp --output-format concise")
    p.add_argument("specs", nargs="+", metavar="SPEC", help=".atp spec files")
    p.add_argument("--out", metavar="DIR", help="check exports as if written under DIR")
    _diag_option(p)


def _add_plan(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("plan", parents=[common], formatter_class=_Formatter,
                       help="compile a spec and print its plan and cost",
                       description="Compile a spec into its plan: pairs, nodes, module sites in forward order and"
                                   " the steps the engine runs with their cost. Loads no weights and no torch.",
                       epilog="examples:\n  atpdsl plan spec.atp\n  atpdsl plan spec.atp --json\n"
                              "  atpdsl plan spec.atp --emit python > run_atp.py")
    p.add_argument("spec", metavar="SPEC", help=".atp spec file")
    p.add_argument("--out", metavar="DIR", help="write exports under DIR instead of the spec's folder")
    p.add_argument("--emit", choices=("python",), help="print the equivalent program instead of the plan")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    _diag_option(p)


def _add_run(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("run", parents=[common], formatter_class=_Formatter,
                       help="run a spec: score nodes, select the circuit, write exports",
                       epilog="examples:\n  atpdsl run examples/induction.atp --out out/demo\n"
                              "  atpdsl run spec.atp --out out/s --threads 4 --log out/s/run.log")
    p.add_argument("spec", metavar="SPEC", help=".atp spec file")
    p.add_argument("--out", metavar="DIR", help="write every export under DIR (keeping file names)")
    p.add_argument("--quiet", action="store_true", help="print nothing but errors")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--profile", action="store_true", help="print the time of each phase")
    p.add_argument("--threads", type=parse_threads, metavar="N",
                   help="torch threads for the run (default: 1 on a machine with at most 2 cores, else one per"
                        " idle core; OMP_NUM_THREADS, when set, is kept)")
    p.add_argument("--log", metavar="FILE",
                   help="also write progress as plain lines to FILE (follow a long run with `tail -f FILE`)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="let transformers run model code from the hub (only for models you trust)")
    p.add_argument("--fresh", action="store_true",
                   help="ignore the state an interrupted run of this spec left in the output folder and start over")
    _diag_option(p)


def _add_show_export(sub: Any, common: argparse.ArgumentParser) -> None:
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
    for add in (_add_check, _add_plan, _add_run, _add_show_export):
        add(sub, common)
    return parser


def _subparser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    """The parser of one subcommand (to report a usage error with that command's usage line)."""
    for action in parser._actions:  # argparse keeps subparsers only here
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[command]
    return parser


def export_usage_problem(to: str | None, out: str | None) -> str | None:
    """What is wrong with `export`'s --to/--out as a command line (exit 2), or None: an unknown format, no
    format at all, or a --to that contradicts --out's extension. Whether the files can be written is not
    a command-line question (exit 1, in atpdsl.cli.commands)."""
    from atpdsl.outputs.formats import EXPORT_FORMATS, ExportError, format_of, lookup

    try:
        fmt = lookup(to).name if to is not None else None
        if out is None or out.endswith(("/", "\\")) or Path(out).expanduser().is_dir():
            return None if fmt is not None else "say which format: --to FMT, or --out FILE with a known extension"
        suffix = Path(out).suffix.lower().lstrip(".")
        if fmt is None:
            format_of(out)
        elif suffix in EXPORT_FORMATS and EXPORT_FORMATS[suffix].name != fmt:
            return f"--to {to} does not match --out {out!r} (a {EXPORT_FORMATS[suffix].name} file name)"
    except ExportError as err:
        return str(err)
    return None


# ------------------------------------------------------------------ output

def _console(stderr: bool = False) -> "Console":
    from rich.console import Console

    return Console(stderr=stderr, highlight=False, soft_wrap=True)


def _text(message: str, style: str = "") -> "Text":
    from rich.text import Text

    return Text(message, style=style)


def _styled(rendered: str) -> "Text":
    text = _text(rendered)
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


# ------------------------------------------------------------------ commands

def cmd_check(args: argparse.Namespace) -> int:
    """`atpdsl check`: every diagnostic of every spec; exit 1 if any is an error."""
    from atpdsl.language.compiler import build_plan, check_file

    all_diags: list[Diagnostic] = []
    oks: list[tuple[str, str]] = []  # lines after the diagnostics: memory warnings, then "ok"
    for spec in args.specs:
        result = check_file(spec, out_dir=args.out)
        all_diags.extend(result.diagnostics)
        if not result.ok:
            continue
        try:  # what `plan` and `run` refuse up front (the memory plan) is a check error too
            plan = build_plan(result)
        except SpecError as refused:  # the check found no error, so these are all new
            all_diags.extend(refused.diagnostics)
            continue
        oks.extend((line, "yellow") for line in memory_warnings(plan))
        oks.append((f"{spec}: ok ({len(result.pairs)} pairs)", "green"))
    if args.output_format == "json":
        print(render(all_diags, "json"))
    else:
        _print_diagnostics(all_diags, args.output_format, stderr=False)
        for line, style in oks:
            _console().print(_text(line, style))
    return EXIT_ERRORS if any(d.is_error for d in all_diags) else EXIT_OK


def memory_warnings(plan) -> list[str]:
    """The memory plan's warnings (`batch auto` without a budget, edges that make most of the peak): they come from
    compiling, so the checker's diagnostics do not hold them."""
    return list((dict(plan.extras).get("memory") or {}).get("warnings", ()))


def cmd_plan(args: argparse.Namespace) -> int:
    """`atpdsl plan`: compile and print the plan (or its JSON, or the emitted program)."""
    from atpdsl.language.compiler import build_plan, check_file

    result = check_file(args.spec, out_dir=args.out)
    if not result.ok:
        raise SpecError(list(result.diagnostics))
    warnings = [d for d in result.diagnostics if not d.is_error]
    _print_diagnostics(warnings, args.output_format, stderr=True)
    plan = build_plan(result)
    if args.output_format != "json":
        for line in memory_warnings(plan):
            _console(True).print(_text(line, "yellow"))
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
    from atpdsl.cli.plan_view import print_plan

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


_run_command = _delegate("cmd_run")


def cmd_run(args: argparse.Namespace) -> int:
    """`atpdsl run`: the engine's command with torch's thread count set first (and restored after, for callers
    that run several specs in one process); the choice and its reason open the run's log."""
    import torch  # a run loads a model with torch anyway; check and plan never come here

    from atpdsl.cli.threads import choose_threads

    choice = choose_threads(getattr(args, "threads", None), torch_default=torch.get_num_threads())
    args.threads_note = f"threads: {choice.why}"
    before = torch.get_num_threads()
    if choice.threads is not None:
        torch.set_num_threads(choice.threads)
    try:
        return _run_command(args)
    finally:
        torch.set_num_threads(before)


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "check": cmd_check,
    "plan": cmd_plan,
    "run": cmd_run,
    "show": _delegate("cmd_show"),
    "export": _delegate("cmd_export"),
}


def _parse(argv: list[str] | None) -> argparse.Namespace | int:
    """The parsed command line, or the exit code argparse chose (0 for --help/--version, 2 for usage errors)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.command == "export":
            problem = export_usage_problem(args.to, args.out)
            if problem is not None:
                _subparser(parser, "export").error(problem)
    except SystemExit as e:  # argparse exits for --help, --version and usage errors
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    return args


def _report_atp_error(e: AtpError, fmt: str) -> None:
    if isinstance(e, SpecError) and e.diagnostics:
        _print_diagnostics(e.diagnostics, fmt, stderr=fmt != "json")
    elif fmt == "json":
        print(json.dumps([{"code": type(e).__name__, "severity": "error", "message": str(e), "file": None,
                           "line": None, "column": None, "end_line": None, "end_column": None,
                           "hints": []}], indent=2))
    else:
        _console(True).print(_text(f"error: {e}", "bold red"))


def _report_bug(e: Exception, debug: bool) -> None:
    if debug:
        traceback.print_exc()
    first = str(e).splitlines()[0] if str(e) else ""
    _console(True).print(_text(f"internal error: {type(e).__name__}{': ' + first if first else ''}", "bold red"))
    if not debug:
        _console(True).print("this is a bug in atpdsl; rerun with --debug for the traceback and report it")


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code (0 ok, 1 errors, 2 usage, 3 internal error)."""
    args = _parse(argv)
    if isinstance(args, int):
        return args
    fmt = getattr(args, "output_format", "full")
    try:
        return COMMANDS[args.command](args)
    except AtpError as e:
        _report_atp_error(e, fmt)
        return EXIT_ERRORS
    except KeyboardInterrupt:
        _console(True).print("interrupted")
        return 130
    except MemoryError as e:  # out of memory outside the engine's guard (atpdsl.engine.placement): not a bug
        _report_atp_error(AtpError(f"out of memory: {e or 'MemoryError'}; lower `batch` or give the model a "
                                   f"`memory \"...\"` budget and `batch auto`"), fmt)
        return EXIT_ERRORS
    except Exception as e:  # noqa: BLE001 - the last line of defence: a bug, reported without a wall of text
        _report_bug(e, bool(getattr(args, "debug", False)))
        return EXIT_INTERNAL


def __getattr__(name: str) -> Any:
    """`print_plan` and `plan_text` live in atpdsl.cli.plan_view (rich); imported when first asked for."""
    if name in ("print_plan", "plan_text"):
        from atpdsl.cli import plan_view

        return getattr(plan_view, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
