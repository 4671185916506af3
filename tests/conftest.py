"""Shared test fixtures: project paths, and offline hub access for every test."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import settings

# CI runs the property tests with a fixed seed so a green run stays green; locally they explore
# (HYPOTHESIS_PROFILE=explore) and any failure they find becomes a fixed example.
settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
settings.register_profile("explore", deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

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
