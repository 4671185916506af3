"""`atpdsl plan SPEC --emit python`: a plan as a standalone nnsight program, to leave the DSL with the work.

The program holds the plan's steps as data and runs one function per step kind in the plan's order, as
`atpdsl.engine.steps` does (batch-scope steps per batch, then run-scope steps). It needs only torch,
transformers and nnsight, and reproduces `execute()`'s node numbers for methods atp, atp* (QK fix, GradDrop per
layer or sublayer, norm fix), exact, and `verify top K`.

- `prepare.py`  the engine's own preparation of the run on a model without weights; refusals
- `data.py`     the plan's data for the program (pairs as token ids, node table, trace sites, corrections)
- `closure.py`  which of atpdsl's definitions the program copies (everything its runtime uses, transitively)
- `source.py`   runtime source without imports, escaped literals, the undefined-name check
- `program.py`  the program's text
- `runtime/`    the program's own code (traces, steps, loading, the run), copied into it without imports
"""
from __future__ import annotations

from atpdsl.engine.emit.program import emit_python

__all__ = ["emit_python"]
