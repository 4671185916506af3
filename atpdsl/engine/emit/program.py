"""`emit_python(plan)`: the text of the standalone program (see the package docstring).

Layout of the program: a docstring (fixed text: nothing from the spec), one import block, the plan's data as
constants (every string written by `repr`), atpdsl's own definitions it runs (copied verbatim, each under the
file it comes from), the program's runtime (loading, traces, the steps atpdsl runs through its own tracer), and
the table of step functions the plan's step kinds name.
"""
from __future__ import annotations

import ast
import inspect
import textwrap
from types import ModuleType

from atpdsl.lowering import STEP_KINDS
from atpdsl.plan import Plan
from atpdsl.engine.emit import closure
from atpdsl.engine.emit.data import program_data
from atpdsl.engine.emit.prepare import prepare
from atpdsl.engine.emit.runtime import atp_steps, corrections, exact_steps, loading, objects, run, traces
from atpdsl.engine.emit.source import defined_names, free_names, literal, runtime_source, undefined_names

__all__ = ["emit_python"]

RUNTIME_STEPS = {"corrupt_forward": "corrupt_forward", "clean_backward": "clean_forward_backward",
                 "clean_forward": "clean_forward", "exact_patch": "exact_patch_step"}
"""Step kinds the program runs with its own functions (atpdsl runs them through its tracer); every other kind's
function is atpdsl's own, copied."""

PREPARE = {"qk_fix": "prepare_qk_fix", "norm_fix": "prepare_norm_fix", "graddrop_term": "prepare_graddrop"}

OMIT = ("QkFix.setup", "NormFix.setup", "NormFix._block", "GradDrop.setup", "GradDrop.gradients")
"""Methods left out of copied classes: their setup reads architecture records (the program gets the result as
data), and GradDrop's gradients come from the program's own traced backward."""

DOCSTRING = '''"""An attribution run emitted by atpdsl (`atpdsl plan SPEC --emit python`): plain nnsight.

Run it with `python THIS_FILE`: it needs torch, transformers and nnsight, not atpdsl. It loads the model in
MODEL, checks that its tokenizer gives the token ids in PAIRS, and runs the plan's STEPS in order, as atpdsl's
engine does: each step kind's preparation once, the batch-scope steps once per batch of BATCH_SIZE pairs, then
the run-scope steps. Each step kind is one function (STEP_FUNCTIONS at the end). The model runs in plain
`with model.trace(...)` blocks (section "The nnsight traces"); AtP*'s corrections, exact patching's
bookkeeping, the metrics, batching and ranking are atpdsl's own code, copied below under the file each comes
from.

Output: one JSON line per node in rank order, {"node", "rank", "estimate", "score"}, with "verified_effect"
for verified nodes. estimate = the mean over pairs of the node's signed estimate (AtP: (corrupt - clean) .
dM/dnode at the clean run, corrected by the AtP* steps; exact: the patching effect M(patched) - M(clean));
score = the ranking score (mean |estimate|, or GradDrop's score); verified_effect = the mean exact effect.
Then one line with the number of pairs, the mean clean and corrupt metric, the steps that ran and the steps
left out.

Not emitted: the false-negative diagnostic (`diagnose`) and edge attribution. When the plan has them they are
listed in LEFT_OUT, the program says so on stderr and in its last line, and atpdsl runs them (`atpdsl run`).
"""'''

_COMMENTS = {
    "SPEC_FILE": "The spec this program was emitted from.",
    "MODEL": "Where the model comes from and how it runs.",
    "GEOMETRY": "The model's sizes (from its config).",
    "METHOD": "The scoring method and its AtP* corrections.",
    "METRIC": "The metric the estimates differentiate; EVAL_METRIC: the one verification measures (None: METRIC).",
    "PAIRS": "The prompt pairs as atpdsl encoded them: token ids, the clean->corrupt position map (cmap), where each "
             "metric reads (reads: row, clean position, corrupt position, token, argument) and the answers.",
    "POSITIONS": "How per-position nodes name positions (None: every node sums over positions).",
    "NODE_SITES": "The module inputs and outputs that hold nodes, in forward order.",
    "BLOCKS": "Nodes per site: a kind, its units' columns (layout: count, width, start, stride, offset), summed or "
              "per position; `first` is the block's first column in the table of all nodes.",
    "READS": "What the corrupt and clean runs keep: (key, module, input|output, tuple item), in forward order.",
    "GRAD_UNITS": "Gradients the clean run keeps, per tensor, in the order the backward reaches them.",
    "STEPS": "The plan's steps, in order: what this program runs.",
    "LEFT_OUT": "The plan's steps this program does not run, and why.",
    "STEP_DATA": "What the steps' setup found (embedding module, vocabulary size, the QK fix's layers, the norm "
                 "fix's reader norms and write matrices, GradDrop's terms and their cut block writes).",
}
_FIELDS = {"SPEC_FILE": "spec_file", "MODEL": "model", "GEOMETRY": "geometry", "METHOD": "method",
           "METRIC": "metric", "EVAL_METRIC": "eval_metric", "BATCH_SIZE": "batch", "SEED": "seed",
           "PAD_ID": "pad_id", "KEEP_ROWS": "keep_rows", "PAIRS": "pairs", "POSITIONS": "positions",
           "NODE_SITES": "node_sites", "BLOCKS": "blocks", "READS": "reads", "GRAD_UNITS": "grad_units",
           "STEPS": "steps", "LEFT_OUT": "left_out", "STEP_DATA": "data"}


def _constants(data: dict) -> str:
    out = []
    for const, key in _FIELDS.items():
        if const in _COMMENTS:
            out.append("\n" + "\n".join(textwrap.wrap(_COMMENTS[const], 116, initial_indent="# ",
                                                     subsequent_indent="# ")))
        out.append(f"{const} = {literal(data[key], 0, lead=len(const) + 3)}")
    return "\n".join(out).lstrip() + "\n"


def _copied(copied: closure.Closure) -> list[str]:
    """The copied definitions, one section per atpdsl file."""
    by_module: dict[str, list[str]] = {}
    for d in copied.definitions:
        by_module.setdefault(d.module, []).append(d.text)
    return [f"# --- copied from atpdsl/{'/'.join(module.split('.')[1:])}.py\n" + "\n\n\n".join(texts)
            for module, texts in by_module.items()]


def _runtime_modules(kinds: set[str]) -> list[ModuleType]:
    mods = [objects, loading, traces, atp_steps]
    if kinds & {"clean_forward", "exact_patch", "verify"}:
        mods.append(exact_steps)
    if kinds & set(PREPARE):
        mods.append(corrections)
    return mods + [run]


def _step_functions(kinds: list[str]) -> tuple[dict[str, str], list[tuple[str, str]]]:
    """Step kind -> function name, and the atpdsl functions to copy for them."""
    names, roots = {}, []
    for kind in kinds:
        if kind in RUNTIME_STEPS:
            names[kind] = RUNTIME_STEPS[kind]
        else:
            module, _, name = STEP_KINDS[kind].impl.partition(":")
            names[kind] = name
            roots.append((module, name))
    return names, roots


def _metric_functions(data: dict) -> tuple[dict[str, str], list[tuple[str, str]]]:
    from atpdsl.registry import METRICS

    names, roots = {}, []
    for spec in (data["metric"], data["eval_metric"]):
        if spec is not None and spec["kind"] not in names:
            module, _, name = METRICS[spec["kind"]].impl.partition(":")
            names[spec["kind"]] = name
            roots.append((module, name))
    return names, roots


def _atpdsl_roots(mod: ModuleType) -> list[tuple[str, str]]:
    """What a runtime module imports from atpdsl outside the runtime: the definitions the program copies."""
    tree = ast.parse(inspect.getsource(mod))
    return [(node.module, a.name) for node in tree.body if isinstance(node, ast.ImportFrom)
            and (node.module or "").startswith("atpdsl") and not node.module.startswith("atpdsl.engine.emit")
            for a in node.names]


def _imports(program_body: str, mods: list[ModuleType], copied: closure.Closure) -> str:
    """One import block: every import statement whose name the program uses."""
    bound = dict(copied.imports)
    for mod in mods:
        for name, (source, original) in closure.parsed(mod.__name__).imports.items():
            if not source.startswith("atpdsl"):
                bound.setdefault(name, closure.import_statement(source, original, name))
    wanted = {bound[n] for n in free_names(program_body) if n in bound}
    plain = {s for s in wanted if s.startswith("import ")}
    froms: dict[str, list[str]] = {}
    for statement in wanted - plain:
        _, module, _, names = statement.split(" ", 3)
        froms.setdefault(module, []).append(names)
    lines = sorted(plain | {f"from {m} import {', '.join(sorted(n))}" for m, n in froms.items()},
                   key=lambda line: line.split()[1])
    std = [line for line in lines if closure.is_stdlib(line)]
    rest = [line for line in lines if not closure.is_stdlib(line)]
    return "\n".join(["from __future__ import annotations", ""] + std + [""] + rest) + "\n"


def _table(pairs: dict[str, str]) -> str:
    """A dict from string keys to names in the program, one entry per line."""
    return "{\n" + "".join(f"    {literal(k)}: {v},\n" for k, v in pairs.items()) + "}"


def _tail(steps: dict[str, str], prepare_fns: dict[str, str], metrics: dict[str, str]) -> str:
    plan = {key: const for const, key in _FIELDS.items()}
    return ("# --- The function of each step kind, each kind's preparation, the metrics' implementations\n\n"
            f"STEP_FUNCTIONS = {_table(steps)}\nPREPARE = {_table(prepare_fns)}\n"
            f"METRIC_FUNCTIONS.update({_table(metrics)})\nPLAN = {_table(plan)}\n\n"
            "if __name__ == \"__main__\":\n    main(PLAN, STEP_FUNCTIONS, PREPARE)\n")


def emit_python(plan: Plan) -> str:
    """Source of a standalone nnsight program that reproduces the plan's node numbers (EngineError, ModelError
    or DataError for a plan it cannot)."""
    data = program_data(prepare(plan))
    kinds = list(dict.fromkeys(s["kind"] for s in data["steps"]))
    mods = _runtime_modules(set(kinds))
    runtime = [runtime_source(m) for m in mods]
    provided = set().union(*(defined_names(text) for text in runtime))
    steps, step_roots = _step_functions(kinds)
    metrics, metric_roots = _metric_functions(data)
    roots = [r for m in mods for r in _atpdsl_roots(m)] + step_roots + metric_roots
    try:
        copied = closure.collect(roots, provided, OMIT)
    except LookupError as err:
        raise RuntimeError(f"internal: {err}; this is a bug in atpdsl") from None
    sections = ["# === The plan, as data", _constants(data), "# === atpdsl's own definitions, copied"]
    sections += _copied(copied)
    sections += ["# === The program's runtime"] + runtime
    sections.append(_tail(steps, {k: v for k, v in PREPARE.items() if k in kinds}, metrics))
    body = "\n\n\n".join(s.strip("\n") for s in sections) + "\n"
    src = DOCSTRING + "\n" + _imports(body, mods, copied) + "\n\n" + body
    missing = undefined_names(src)
    if missing:
        raise RuntimeError(f"internal: the emitted program uses undefined names {', '.join(missing)}; this is a bug in "
                          f"atpdsl")
    compile(src, "<emitted program>", "exec")
    return src

