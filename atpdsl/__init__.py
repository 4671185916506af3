"""atpdsl: a declarative circuit-discovery language and compiler for language models."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from atpdsl.pipeline import Result

from atpdsl.version import __version__
__all__ = ["__version__", "run"]


def run(spec: Any = None, *, text: str | None = None, out_dir: Any = None, progress: Any = None,
        write_exports: bool = True) -> "Result":
    """Run a spec (`atpdsl.run("spec.atp")` or `atpdsl.run(text=...)`) and return its Result.

    The Result has `.graph` (networkx.DiGraph), `.scores` (a Table), `.plan` and `.result`
    (the engine's RunResult); see atpdsl.pipeline.run. Importing atpdsl stays light: the
    pipeline, and torch with it, load on the first call.
    """
    from atpdsl.pipeline import run as _run

    return _run(spec, text=text, out_dir=out_dir, progress=progress, write_exports=write_exports)
