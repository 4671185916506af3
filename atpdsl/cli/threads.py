"""How many intra-op threads `atpdsl run` gives torch: `--threads N`, or a default that does not oversubscribe.

torch starts with one thread per physical core. When other processes already use those cores, its worker
threads wait on each other at every operation: on a busy 2-core machine a run with torch's default of 2
threads took 969 s, the same spec with 1 thread 213 s (issue 11). So the default takes one thread on a
machine with at most 2 usable cores, and otherwise one per idle core (usable cores minus the 1-minute
load average), never more than torch's own default. An explicit OMP_NUM_THREADS is left as the user set it.
"""
from __future__ import annotations

import argparse
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["ThreadChoice", "choose_threads", "usable_cores", "parse_threads"]


@dataclass(frozen=True, slots=True)
class ThreadChoice:
    """The thread count to set (None: leave torch as it is) and why, for the run's log."""

    threads: int | None
    why: str


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity where the OS says, else every core)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def choose_threads(requested: int | None, *, torch_default: int, cores: int | None = None,
                   load: float | None = None, environ: Mapping[str, str] = os.environ) -> ThreadChoice:
    """The thread count for a run: the request, else the default described in the module docstring."""
    if requested is not None:
        return ThreadChoice(requested, f"{requested} thread(s), as --threads asked")
    if environ.get("OMP_NUM_THREADS", "").strip():
        return ThreadChoice(None, f"{torch_default} thread(s), from OMP_NUM_THREADS")
    cores = usable_cores() if cores is None else cores
    if cores <= 2:
        return ThreadChoice(1, f"1 thread: {cores} usable core(s), where more threads mostly wait on each other"
                               " (--threads N to change)")
    load = _load_average() if load is None else load
    busy = 0 if load is None else math.floor(load + 0.5)
    threads = max(1, min(torch_default, cores - busy))
    return ThreadChoice(threads, f"{threads} thread(s): {cores} usable cores, load {0.0 if load is None else load:.1f}"
                                 " (--threads N to change)")


def parse_threads(text: str) -> int:
    """`--threads` values: a whole number from 1 to 1024 (argparse reports anything else as a usage error)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"takes a whole number of threads, not {text!r}") from None
    if not 1 <= value <= 1024:
        raise argparse.ArgumentTypeError(f"must be between 1 and 1024, not {value}")
    return value
