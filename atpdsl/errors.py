"""The project's one error hierarchy: every failure a user can cause is an AtpError."""
from __future__ import annotations

__all__ = ["AtpError", "SpecError", "ModelError", "DataError", "EngineError"]


class AtpError(Exception):
    """Root of every error atpdsl reports to a user (the CLI prints these without a traceback)."""


class SpecError(AtpError):
    """A spec has errors; `diagnostics` holds every one of them (see atpdsl.diagnostics)."""

    def __init__(self, diagnostics: list, message: str | None = None) -> None:
        self.diagnostics = list(diagnostics)
        super().__init__(message or f"{len(self.diagnostics)} error(s) in spec")


class ModelError(AtpError):
    """The model could not be loaded or does not fit the spec (names the model and what to do)."""


class DataError(AtpError):
    """Prompt pairs or answers that the model cannot use as written (names the pair and tokens)."""


class EngineError(AtpError):
    """The engine met a state it cannot compute honestly (e.g. unaligned per-position nodes)."""
