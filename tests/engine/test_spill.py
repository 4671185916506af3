"""Kept per-batch reads beyond the memory limit go to a temporary folder and come back unchanged; the last
batch's stay in memory (the run steps read them next); the folder is gone after the run."""
from __future__ import annotations

import os
import tempfile

import pytest
import torch

from engine_support import NodeGroup, make_plan, tm

import atpdsl.engine.state as state_module
from atpdsl.engine import execute
from atpdsl.engine.load import wrap_model
from atpdsl.engine.state import SpillList


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


class _Item:
    """A kept item as SpillList takes it (the edges' reads have the same four members)."""

    def __init__(self, batch: int, values: torch.Tensor) -> None:
        self.batch, self.values = batch, values

    @property
    def nbytes(self) -> int:
        return self.values.numel() * self.values.element_size()

    def to_record(self) -> dict:
        return {"values": self.values}

    @classmethod
    def from_record(cls, batch: int, record: dict) -> "_Item":
        return cls(batch, record["values"])


def test_items_past_the_limit_go_to_disk_and_come_back_equal():
    kept = SpillList(limit=100)
    items = [_Item(i, torch.randn(4, 5, dtype=torch.float64)) for i in range(4)]  # 160 bytes each
    for i, item in enumerate(items):
        kept.append(item, in_memory=i == len(items) - 1)
    assert [isinstance(x, tuple) for x in kept.items] == [True, True, True, False]
    folder = kept.folder
    assert folder is not None and len(list(folder.iterdir())) == 3
    back = list(kept)
    assert [b.batch for b in back] == [0, 1, 2, 3] and back[3] is items[3]
    assert all(torch.equal(b.values, a.values) for a, b in zip(items, back))
    kept.close()
    assert not folder.exists() and len(kept) == 0


def test_edges_from_reads_on_disk_equal_edges_from_reads_in_memory(monkeypatch):
    """Three batches with a limit of 0 bytes: the first two batches' reads go through the disk, and every edge score
    is the same float as in a run that kept them in memory."""
    model = tm.BUILDERS["llama"]()
    loaded = wrap_model(model, tm.make_tokenizer())
    plan = make_plan("tiny", tm.TINY_PAIRS * 2, (NodeGroup("heads"), NodeGroup("mlp")), batch=2)
    assert len(plan.pairs) >= 5  # three batches or more
    in_memory = execute(plan, loaded=loaded)
    made: list[str] = []
    mkdtemp = tempfile.mkdtemp

    def spy(*args, **kwargs):
        made.append(mkdtemp(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(state_module, "KEPT_MEMORY_LIMIT", 0)
    monkeypatch.setattr(state_module.tempfile, "mkdtemp", spy)
    on_disk = execute(plan, loaded=loaded)
    assert len(made) == 1 and not os.path.exists(made[0])  # used, then removed
    assert len(in_memory.edges) > 10
    assert [(e.source, e.target, e.channel, e.weight) for e in on_disk.edges] == \
        [(e.source, e.target, e.channel, e.weight) for e in in_memory.edges]
