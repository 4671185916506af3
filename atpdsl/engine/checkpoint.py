"""Checkpoints: a killed run resumes where it stopped and gives exactly the numbers an uninterrupted run gives.

State lives in `<output folder>/.atpdsl-run/<key>/`, where the key hashes everything the numbers depend on: the
plan (spec text, pairs, settings), the model (its location, config and weight files' sizes and times), the thread
count and the versions of atpdsl, torch and transformers. Two kinds of records, each written atomically
(temporary name, fsync, rename), so a kill leaves either the whole record or none of it:

- one file per finished batch of the scoring steps: what the batch adds to the run (per-pair numbers, ranking
  magnitudes, metric rows, extra sums such as GradDrop's per-term sums, the edges' kept reads). A resumed run
  adds them back in the same order, so its sums are bit-identical.
- memos of exact patching (verification per batch, the diagnostic's patch calls): keyed by what was patched, so
  the resumed run's checks ask the same questions in the same order and get the stored answers until they reach
  one that was never answered.

A run without an output folder (no exports) keeps no state. The state is removed when the run's outputs are
complete; `--fresh` removes it before the run.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from atpdsl.version import __version__
from atpdsl.faults import fault_point
from atpdsl.plan import Plan

__all__ = ["STATE_FOLDER", "Checkpoint", "state_folder", "run_key", "discard"]

STATE_FOLDER = ".atpdsl-run"
def state_folder(plan: Plan) -> Path | None:
    """Where a plan's run keeps its state: beside its first export, or None when it writes nothing."""
    if not plan.exports:
        return None
    return Path(os.path.expanduser(plan.exports[0].path)).parent / STATE_FOLDER


def _model_identity(location: str) -> list[Any]:
    folder = Path(location)
    if not folder.is_dir():
        return [location]
    out: list[Any] = [str(folder.resolve())]
    for f in sorted(folder.iterdir()):
        if f.is_file() and (f.suffix in (".json", ".safetensors", ".bin", ".model") or f.name == "tokenizer.json"):
            st = f.stat()
            out.append([f.name, st.st_size, int(st.st_mtime)])
    return out


def run_key(plan: Plan, model_location: str) -> str:
    """The hash that names a run's state: a state is reused only by a run that would compute the same numbers."""
    import transformers

    plan_dict = plan.to_dict()
    plan_dict.pop("exports", None)  # where the outputs go does not change a number
    blob = json.dumps({"plan": plan_dict, "model": _model_identity(model_location), "threads": torch.get_num_threads(),
                       "versions": [__version__, torch.__version__, transformers.__version__]},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:24]


def _atomic_save(obj: Any, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@dataclass
class Checkpoint:
    """One run's state folder (None: checkpoints off)."""

    folder: Path | None
    resumed_batches: int = 0
    memo_hits: int = 0

    @classmethod
    def open(cls, plan: Plan, model_location: str, *, fresh: bool = False) -> "Checkpoint":
        """The run's state; `fresh` discards any earlier state of the same run first."""
        root = state_folder(plan)
        if root is None:
            return cls(None)
        folder = root / run_key(plan, model_location)
        if fresh and folder.exists():
            shutil.rmtree(folder, ignore_errors=True)
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError:
            return cls(None)  # an unwritable output folder is reported by the exports; run without state
        return cls(folder)

    @property
    def enabled(self) -> bool:
        return self.folder is not None

    # ---------------------------------------------------------------------------------------- batches
    def _batch_path(self, index: int) -> Path:
        return self.folder / f"batch-{index:06d}.pt"

    def saved_batches(self) -> int:
        """How many leading batches have a complete record."""
        if self.folder is None:
            return 0
        n = 0
        while self._batch_path(n).is_file():
            n += 1
        return n

    def load_batch(self, index: int) -> dict[str, Any]:
        return torch.load(self._batch_path(index), weights_only=True)

    def save_batch(self, index: int, record: dict[str, Any]) -> None:
        if self.folder is None:
            return
        _atomic_save(record, self._batch_path(index))
        fault_point("score", index + 1)

    # ------------------------------------------------------------------------------------------ memos
    def memo(self, name: str, key_parts: Any, compute: Callable[[], Any]) -> Any:
        """The stored answer to a patching call (a tensor or a numpy array), or compute and store it atomically."""
        if self.folder is None:
            return compute()
        digest = hashlib.sha256(repr(key_parts).encode("utf-8")).hexdigest()[:32]
        path = self.folder / "memo" / name / f"{digest}.pt"
        if path.is_file():
            self.memo_hits += 1
            stored = torch.load(path, weights_only=True)
            return stored["value"].numpy() if stored["numpy"] else stored["value"]
        value = compute()
        path.parent.mkdir(parents=True, exist_ok=True)
        is_numpy = not isinstance(value, torch.Tensor)
        _atomic_save({"numpy": is_numpy, "value": torch.from_numpy(value) if is_numpy else value}, path)
        count = sum(1 for _ in path.parent.iterdir() if _.suffix == ".pt")
        fault_point(name, count)
        return value

    def finish(self) -> None:
        """Remove the state once the run's outputs are complete."""
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            parent = self.folder.parent
            if parent.name == STATE_FOLDER and not any(parent.iterdir()):
                parent.rmdir()


def discard(plan: Plan, model_location: str) -> None:
    """Remove a finished run's state (the pipeline calls this once every output is written)."""
    Checkpoint.open(plan, model_location).finish()
