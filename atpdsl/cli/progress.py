"""A run's progress as the engine reports it: `progress(phase, done, total)`, counted in work units.

On a terminal each phase gets a rich bar, in the order the phases start, with its units done (nodes patched,
samples drawn, GradDrop terms, batches), the time spent and an ETA from the first unit on. When stderr is not
a terminal (piped to a file, CI, a notebook) the same facts come as plain lines: at a phase's first report,
at its first unit done, at most every `every` seconds after that, and when it ends. `--log FILE` receives those plain lines whatever
stderr is, so a long run can be followed with `tail -f`. A display problem never reaches the engine.
"""
from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from atpdsl.errors import AtpError

if TYPE_CHECKING:  # pragma: no cover
    from rich.console import Console

__all__ = ["PhaseInfo", "PHASES", "phase_info", "eta_seconds", "clock_text", "progress_line", "ProgressBars",
           "progress_for"]


@dataclass(frozen=True, slots=True)
class PhaseInfo:
    """How a phase is shown: its label and the unit its counts are in."""

    label: str
    unit: str


PHASES: dict[str, PhaseInfo] = {
    "load": PhaseInfo("loading the model", "steps"),
    "resumed": PhaseInfo("resumed from the run's checkpoint", "batches"),
    "score": PhaseInfo("scoring (forward, backward, corrections, GradDrop terms)", "steps"),
    "forward": PhaseInfo("forward passes", "batches"),
    "backward": PhaseInfo("backward passes", "batches"),
    "qk_fix": PhaseInfo("QK fix", "batches"),
    "graddrop": PhaseInfo("GradDrop terms", "terms"),
    "norm_fix": PhaseInfo("norm fix", "batches"),
    "edges": PhaseInfo("edges", "batches"),
    "verify": PhaseInfo("verifying (exact patching)", "nodes"),
    "diagnose": PhaseInfo("false-negative diagnostic", "samples"),
    "suspects": PhaseInfo("diagnostic: suspects patched alone", "nodes"),
    "additivity": PhaseInfo("diagnostic: additivity checks", "subsets"),
    "exact": PhaseInfo("exact patching", "nodes"),
    "exports": PhaseInfo("writing exports", "files"),
}
"""The phases the engine reports; any other name is shown as it is, counted in units."""


def phase_info(phase: str) -> PhaseInfo:
    return PHASES.get(phase, PhaseInfo(phase, "units"))


def eta_seconds(elapsed: float, done: int, total: int) -> float | None:
    """Time left at the rate so far (elapsed per unit done); None until the first unit is done."""
    if done <= 0:
        return None
    return max(0.0, elapsed / done * max(total - done, 0))


def clock_text(seconds: float | None) -> str:
    """`m:ss` or `h:mm:ss`; `-:--` when unknown."""
    if seconds is None:
        return "-:--"
    whole = int(round(seconds))
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def progress_line(phase: str, done: int, total: int, elapsed: float) -> str:
    """One plain progress line, e.g. `verifying (exact patching): 5/20 nodes, 0:12 spent, eta 0:36`."""
    info = phase_info(phase)
    eta = eta_seconds(elapsed, done, total)
    tail = "done" if total and done >= total else f"eta {clock_text(eta)}"
    return f"{info.label}: {done}/{total} {info.unit}, {clock_text(elapsed)} spent, {tail}"


@dataclass(slots=True)
class _PhaseClock:
    start: float
    last_line: float | None = None
    first_unit_shown: bool = False
    ended: bool = False


@dataclass(slots=True)
class _Lines:
    """Plain progress lines through `write`: a phase's first report, its first unit done (the first ETA), then
    at most one line every `every` seconds, and its end."""

    write: Callable[[str], None]
    clock: Callable[[], float]
    every: float
    started: float
    phases: dict[str, _PhaseClock] = field(default_factory=dict)

    def show(self, phase: str, done: int, total: int, start: float) -> None:
        now = self.clock()
        state = self.phases.setdefault(phase, _PhaseClock(start))
        end = total > 0 and done >= total
        resumed = state.ended and not end  # e.g. adaptive verification adds nodes after a round: news
        first_unit = done >= 1 and not state.first_unit_shown
        due = (state.last_line is None or first_unit or resumed or now - state.last_line >= self.every
               or (end and not state.ended))
        if not due or (end and state.ended):  # an end is said once
            return
        state.last_line, state.ended = now, end
        state.first_unit_shown = state.first_unit_shown or done >= 1
        self.write(f"[{clock_text(now - self.started):>7}] {progress_line(phase, done, total, now - state.start)}")


class ProgressBars:
    """The engine's progress(phase, done, total) callback: bars on a terminal, plain lines elsewhere, and a log.

    `enabled=False` shows nothing (the log, when given, is still written). `plain` forces lines (True) or
    bars (False); by default bars only when the console is a terminal.
    """

    def __init__(self, console: "Console", enabled: bool = True, *, log: str | Path | None = None,
                 plain: bool | None = None, every: float = 10.0, clock: Callable[[], float] = time.monotonic,
                 header: str | None = None) -> None:
        self.console = console
        self.header = header
        self.enabled = enabled
        self.plain = (not console.is_terminal) if plain is None else plain
        self.every = every
        self.clock = clock
        self.log_path = None if log is None else Path(log).expanduser()
        self._progress: Any = None
        self._tasks: dict[str, Any] = {}
        self._starts: dict[str, float] = {}
        self._last_event = clock()
        self._log_file: IO[str] | None = None
        self._log_lines: _Lines | None = None

    def __enter__(self) -> "ProgressBars":
        self._last_event = started = self.clock()
        if self.log_path is not None:
            try:
                self._log_file = open(self.log_path, "w", encoding="utf-8")  # noqa: SIM115 - closed in __exit__
            except OSError as err:
                raise AtpError(f"cannot write the log file {str(self.log_path)!r}: {err.strerror or err}") from None
            self._log_lines = _Lines(self._write_log, self.clock, self.every, started)
        if self.enabled:
            self._progress = _LineDisplay(self.console, self.clock, self.every, started) if self.plain else _bars(
                self.console, self.clock)
            self._progress.start()
        if self.header:
            self.message(self.header)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            try:
                self._progress.stop()
            except Exception:  # noqa: BLE001 - a broken display must not turn a finished run into a failure
                pass
            finally:
                self._progress = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def _write_log(self, line: str) -> None:
        if self._log_file is not None:
            self._log_file.write(line + "\n")
            self._log_file.flush()

    def message(self, text: str) -> None:
        """A line about the run (e.g. the thread count) in the log and, when showing lines, on the console."""
        try:
            self._write_log(text)
            if self._progress is not None and self.plain:
                self.console.print(text, markup=False, highlight=False, soft_wrap=True)
        except Exception:  # noqa: BLE001 - reporting must never break a run
            pass

    def __call__(self, phase: str, done: int, total: int) -> None:
        now = self.clock()
        if phase not in self._starts:  # a phase starts at its first report of 0 units, else when the last one ended
            self._starts[phase] = now if done <= 0 else self._last_event
        self._last_event = now
        start = self._starts[phase]
        try:
            if self._log_lines is not None:
                self._log_lines.show(phase, done, total, start)
        except Exception:  # noqa: BLE001 - a full disk must not stop the computation
            pass
        if self._progress is None:
            return
        try:
            fields = {"count": f"{done}/{max(total, 0)} {phase_info(phase).unit}"}
            task = self._tasks.get(phase)
            if task is None:
                task = self._progress.add_task(phase_info(phase).label, total=max(total, 0), phase=phase,
                                               began=start, **fields)
                self._tasks[phase] = task
            self._progress.update(task, completed=done, total=max(total, 0), **fields)
        except Exception:  # noqa: BLE001 - a progress bar must never break a run
            pass


class _LineDisplay:
    """The plain-lines display with the two calls ProgressBars makes of a rich Progress."""

    def __init__(self, console: "Console", clock: Callable[[], float], every: float, started: float) -> None:
        self._lines = _Lines(self._write, clock, every, started)
        self._console = console
        self._tasks: list[tuple[str, float]] = []

    def _write(self, line: str) -> None:
        self._console.print(line, markup=False, highlight=False, soft_wrap=True)

    def start(self) -> None:
        return None

    def stop(self) -> None:
        return None

    def add_task(self, description: str, *, total: int, phase: str, began: float, **fields: Any) -> int:
        self._tasks.append((phase, began))
        return len(self._tasks) - 1

    def update(self, task: int, *, completed: int, total: int, **fields: Any) -> None:
        phase, start = self._tasks[task]
        self._lines.show(phase, completed, total, start)


def _bars(console: "Console", clock: Callable[[], float]) -> Any:
    """A rich Progress whose time and ETA columns count from each phase's own start, refreshed as they run."""
    from rich.progress import BarColumn, Progress, ProgressColumn, TextColumn
    from rich.text import Text

    class _Clock(ProgressColumn):
        def render(self, task: Any) -> Text:
            spent = clock() - task.fields["began"]
            done = int(task.completed)
            left = "done" if task.total and done >= task.total else f"eta {clock_text(eta_seconds(spent, done, int(task.total or 0)))}"
            return Text(f"{clock_text(spent)} {left}")

    return Progress(TextColumn("{task.description:<28}"), BarColumn(), TextColumn("{task.fields[count]}"), _Clock(),
                    console=console)


def progress_for(args: argparse.Namespace, console: "Console") -> ProgressBars:
    """The progress display `atpdsl run` uses: off under --quiet (the log still written), --log FILE if given,
    opening with the line app.py left in `args.threads_note` (the thread count and why)."""
    return ProgressBars(console, enabled=not getattr(args, "quiet", False), log=getattr(args, "log", None),
                        header=getattr(args, "threads_note", None))
