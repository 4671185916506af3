"""Adaptive verification, `verify until confident { budget B }`: verify until the diagnostic rules out the rest.

Round r: exactly patch the next `step` nodes of the ranking (round 1: `first`); cut = cut_fn(verified effects);
diagnose the unverified rest (engine/diagnose.py) with the suspects chosen among nodes whose limit reaches the cut;
every node the diagnosis patched alone joins the verified set. Stop when the bound over what is still unverified
is below the cut ("bound below cut"), when B nodes have been patched alone ("budget spent"), when nothing is left
unverified ("all verified") or only nodes whose activation does not change ("all changed nodes verified": their
effect is exactly 0), or when the diagnostic refused and the round could patch nothing new ("refused").

The budget counts single-node exact patches (verification, suspects, exhaustive diagnoses); random-subset patches
are reported beside it. Repeated looks would inflate the error rate, so round r diagnoses at level alpha / 2^r:
the levels sum to less than alpha, and whichever round's bound is reported holds at the stated confidence
(under the diagnostic's additivity assumption, as in a single diagnosis).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch

from atpdsl.errors import EngineError
from atpdsl.plan import Diagnosis
from atpdsl.circuit.scores import FalseNegativeBound
from atpdsl.engine.context import Context
from atpdsl.engine.diagnose import DiagnosisRun, Settings, engine_patcher, run_diagnosis

__all__ = ["Round", "AdaptiveOutcome", "adaptive_verify", "STOP_REASONS"]

Progress = Callable[[str, int, int], None]
CutFn = Callable[[dict[int, torch.Tensor]], float]

STOP_REASONS = ("bound below cut", "budget spent", "all verified", "all changed nodes verified", "refused")


@dataclass(frozen=True, slots=True)
class Round:
    """One round: nodes verified in ranking order, nodes the diagnosis patched alone, the cut, the bound over
    what was still unverified afterwards, and the diagnosis's status."""

    number: int
    ranked: int
    alone: int
    cut: float
    bound: float
    status: str
    confidence: float  # the level this round's diagnosis ran at (alpha / 2^r)


@dataclass(frozen=True)
class AdaptiveOutcome:
    """What adaptive verification did. `verified`: table column -> per-pair exact effects [n_pairs]; `bound`: the
    final statement about the nodes still unverified (None when all are verified)."""

    verified: dict[int, torch.Tensor]
    rounds: tuple[Round, ...]
    exact_patches: int
    subset_patches: int
    budget: int
    stop: str
    cut: float
    bound: FalseNegativeBound | None
    diagnosis: dict = field(default_factory=dict)  # the last diagnosis's summary

    def to_dict(self) -> dict:
        """JSON-able record (extras["adaptive"]): rounds, patches spent, and why it stopped."""
        return {"stop": self.stop, "exact_patches": self.exact_patches, "subset_patches": self.subset_patches,
                "budget": self.budget, "cut": self.cut, "verified": len(self.verified),
                "rounds": [asdict(r) for r in self.rounds],
                "bound": None if self.bound is None or not self.bound.bounded else self.bound.bound,
                "sentence": None if self.bound is None else self.bound.sentence}


def _verify(ctx: Context, columns: list[int], progress: Progress | None) -> dict[int, torch.Tensor]:
    """Exact effects of each column alone, per pair (the evaluation metric when the plan has one)."""
    if not columns:
        return {}

    def tick(done: int, total: int) -> None:
        if progress:
            progress("verify", done, total)

    effects = engine_patcher(ctx, columns).alone(list(range(len(columns))), tick)
    return {c: torch.from_numpy(np.asarray(effects[:, j], dtype=np.float64)) for j, c in enumerate(columns)}


def _diagnose(ctx: Context, rest: list[int], d: Diagnosis, *, number: int, cut: float, budget_left: int,
              step: int, seed: int, quantity: str, exhaustive_up_to: int | None,
              progress: Progress | None) -> DiagnosisRun:
    alpha = (1.0 - d.confidence) / 2 ** number
    settings = Settings(samples=d.samples, confidence=1.0 - alpha, inclusion=d.inclusion, seed=seed + number,
                        quantity=quantity, suspects=min(step, budget_left), floor=cut, budget=budget_left,
                        exhaustive_up_to=exhaustive_up_to)
    return run_diagnosis(ctx, rest, settings, progress=progress)


def adaptive_verify(ctx: Context, order: Sequence[int], *, cut_fn: CutFn, budget: int, first: int,
                    diagnosis: Diagnosis | None = None, seed: int = 0, quantity: str = "abs_mean",
                    step: int | None = None, exhaustive_up_to: int | None = None,
                    progress: Progress | None = None) -> AdaptiveOutcome:
    """Verify `order` (ranked table columns) adaptively; see the module docstring. `step`: nodes verified in
    ranking order per later round (default `first`); `exhaustive_up_to`: as diagnose.Settings."""
    if budget < 1 or first < 0:
        raise EngineError(f"verify until confident: budget must be >= 1 and the first round >= 0, got budget "
                          f"{budget}, first {first}")
    d = diagnosis or Diagnosis()
    step = max(1, step or first or 1)
    verified: dict[int, torch.Tensor] = {}
    rounds: list[Round] = []
    spent = subsets = 0
    stop, bound, cut, summary = "budget spent", None, 0.0, {}
    for number in range(1, budget + 2):
        take = [c for c in order if c not in verified][: min(first if number == 1 else step, budget - spent)]
        verified.update(_verify(ctx, take, progress))
        spent += len(take)
        cut = float(cut_fn(verified))
        rest = [c for c in order if c not in verified]
        if not rest:
            stop, bound = "all verified", None
            rounds.append(Round(number, len(take), 0, cut, 0.0, "all verified", 1.0))
            break
        run = _diagnose(ctx, rest, d, number=number, cut=cut, budget_left=budget - spent, step=step, seed=seed,
                        quantity=quantity, exhaustive_up_to=exhaustive_up_to, progress=progress)
        verified.update(run.measured)
        spent += len(run.measured)
        subsets += run.bound.subset_patches
        bound, summary = run.without_measured(), run.summary
        bound = _stated(bound, d.confidence)
        rounds.append(Round(number, len(take), len(run.measured), cut, bound.bound, run.bound.status,
                            run.bound.confidence))
        if bound.bounded and bound.bound < cut:
            stop = "bound below cut"
            break
        if run.bound.status == "exhaustive":
            stop = "all changed nodes verified"
            break
        if spent >= budget:
            stop = "budget spent"
            break
        if not take and not run.measured:
            stop = "refused" if not run.bound.bounded else "budget spent"
            break
    return AdaptiveOutcome(verified, tuple(rounds), spent, subsets, budget, stop, cut, bound, summary)


def _stated(bound: FalseNegativeBound, confidence: float) -> FalseNegativeBound:
    """A round's bound stated at the run's overall confidence (each round ran at a stricter level)."""
    return replace(bound, confidence=confidence)
