"""Shared test fixtures: project paths, and offline hub access for every test."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"


@pytest.fixture(scope="session")
def project_root() -> Path:
    """The checkout's root folder."""
    return ROOT


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The shared read-only folder beside the checkout (specs, models, data); fails loudly if absent."""
    assert (SHARED / "specs").is_dir(), f"shared folder missing: {SHARED}"
    return SHARED
