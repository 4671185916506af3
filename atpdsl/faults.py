"""Fault injection for the resume tests: ATPDSL_FAULT=`phase:n` kills the process (SIGKILL) right after the n-th
record of that phase is safely written (phases: score, verify, diagnose, export). Read from the environment only,
so no spec can set it; without the variable it does nothing."""
from __future__ import annotations

import os
import signal

__all__ = ["FAULT_ENV", "fault_point"]

FAULT_ENV = "ATPDSL_FAULT"


def fault_point(phase: str, count: int) -> None:
    """Kill this process if the fault-injection variable names this point."""
    want = os.environ.get(FAULT_ENV, "")
    if want and want == f"{phase}:{count}":
        os.kill(os.getpid(), signal.SIGKILL)
