"""Shared test fixtures: project paths, offline hub access, and the fixture tiers.

Fixture tiers. Some tests need test data that is not in the repository: the stories260K model with its pairs
and specs (`../shared` beside the checkout, as CI has it), the SmolLM2-135M model (`../cache/smollm2`, built by
`../shared/models/smollm2/build.py`), or Graphviz's `dot`. A test belongs to a tier when it

- requests the `shared_dir`, `stories260k_dir` or `smollm2_dir` fixture, or carries `@pytest.mark.needs(...)`;
- or, for the tests written before the tiers, refers (itself, through a helper function or fixture of its
  module, or a module-level value) to engine_support's STORIES / PRONOUN / SHARED / stories_pairs, to a path
  string into `shared/`, or are parametrized over `.atp` examples whose text does (see `_signals`).

Where a fixture is missing, its tests are skipped with one shared reason, so pytest's summary (`-ra`) shows
one line saying what was skipped and how to get it. Under `CI=true` a missing fixture fails its tests instead.
`ATPDSL_TEST_HIDE_FIXTURES=stories260K,graphviz` pretends fixtures are missing (to test the tiers themselves).
"""
from __future__ import annotations

import functools
import os
import re
import shutil
import types
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
SMOLLM2 = ROOT.parent / "cache" / "smollm2"
EXAMPLES = ROOT / "examples"
TESTS = ROOT / "tests"


@dataclass(frozen=True, slots=True)
class Fixture:
    """Test data outside the repository: how to tell it is present, and how to get it."""

    name: str
    where: str
    how: str

    def present(self) -> bool:
        hidden = {h.strip() for h in os.environ.get("ATPDSL_TEST_HIDE_FIXTURES", "").split(",")}
        if self.name in hidden:
            return False
        if self.name == "stories260K":
            return all(p.exists() for p in (SHARED / "models" / "stories260K" / "config.json",
                                            SHARED / "data" / "stories260K-pronoun.jsonl", SHARED / "specs"))
        if self.name == "smollm2":
            return (SMOLLM2 / "config.json").is_file() and (SMOLLM2 / "model.safetensors").is_file()
        return shutil.which("dot") is not None


FIXTURES = {
    "stories260K": Fixture("stories260K", f"{SHARED}",
                           "put the project's shared test data (models/stories260K, data, specs) at ../shared"
                           " beside the checkout"),
    "smollm2": Fixture("smollm2", f"{SMOLLM2}",
                       "run `make fixtures` (builds it from ../shared/models/smollm2/build.py; needs PyPI)"),
    "graphviz": Fixture("graphviz", "`dot` on PATH", "install Graphviz (e.g. apt-get install graphviz)"),
}

EXPLICIT = {"tests/outputs/test_roundtrip.py::test_dot_renders_with_graphviz": ("graphviz",),
            "tests/examples/test_examples.py::test_readme_specs_compile": ("stories260K",),
            "tests/language/test_cli.py::test_plan_shows_the_norm_fix": ("stories260K",)}
"""Tests whose need the signals below cannot see (the README's text, an example named in a test's body, a tool on
PATH), by node id."""

FIXTURE_ARGS = {"shared_dir": "stories260K", "stories260k_dir": "stories260K", "smollm2_dir": "smollm2"}
NAME_SIGNALS = {"STORIES": "stories260K", "PRONOUN": "stories260K", "SHARED": "stories260K",
                "stories_pairs": "stories260K", "SMOLLM2": "smollm2"}


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


_CHECKOUT = str(ROOT).replace("\\", "/") + "/"
_SHARED_PART = re.compile(r"(^|/)shared(/|$)")  # a folder named shared (not `noshared/`, `myshared/`)


@functools.lru_cache(maxsize=4096)
def _text_signals(text: str) -> frozenset[str]:
    """A string that points into the fixtures: a path into shared/ or into the SmolLM2 cache."""
    found = set()
    normal = text.replace("\\", "/")
    if normal.startswith(_CHECKOUT):  # a path inside the checkout (the fixtures are beside it), whatever its
        return frozenset()  # parent folders are called
    if _SHARED_PART.search(normal):
        found.add("stories260K")
    if "cache/smollm2" in normal:
        found.add("smollm2")
    return frozenset(found)


@functools.lru_cache(maxsize=256)
def _example_signals(name: str) -> frozenset[str]:
    """A test parameter naming an example spec that reads the shared test data."""
    example = EXAMPLES / Path(name).name
    if name.endswith(".atp") and example.is_file():
        return _text_signals("shared/") if "shared/" in example.read_text(encoding="utf-8", errors="replace") \
            else frozenset()
    return frozenset()


def _value_signals(value: Any) -> set[str]:
    if isinstance(value, (str, Path)):
        return _text_signals(str(value))
    if isinstance(value, (list, tuple, set, frozenset)) and len(value) < 1000:
        return set().union(*(_value_signals(v) for v in value)) if value else set()
    return set()


def _signals(code: types.CodeType, scope: dict[str, Any], seen: set[types.CodeType]) -> set[str]:
    """The fixtures a function's code refers to, following the same module's helper functions."""
    if code in seen:
        return set()
    seen.add(code)
    found: set[str] = set()
    doc = code.co_consts[0] if code.co_consts and isinstance(code.co_consts[0], str) else None
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            found |= _signals(const, scope, seen)
        elif isinstance(const, str) and const is not doc:
            found |= _text_signals(const)
    for name in code.co_names:
        if name in NAME_SIGNALS:
            found.add(NAME_SIGNALS[name])
        value = scope.get(name)
        if isinstance(value, types.FunctionType) and value.__module__ == scope.get("__name__"):
            found |= _signals(value.__code__, scope, seen)
        else:
            found |= _value_signals(value)
    return found


def _unwrapped(func: Any) -> Any:
    """The test's own function under pytest's and hypothesis' wrappers."""
    inner = getattr(getattr(func, "hypothesis", None), "inner_test", None)
    func = inner if inner is not None else func
    while hasattr(func, "__wrapped__"):
        func = func.__wrapped__
    return func


def _is_test_code(func: Any) -> bool:
    """A function written in this test suite (not pytest's, hypothesis' or this conftest's own fixtures)."""
    if not isinstance(func, types.FunctionType):
        return False
    path = Path(func.__code__.co_filename)
    return path.name != "conftest.py" and TESTS in path.parents


def fixtures_needed(item: pytest.Item) -> set[str]:
    """The fixture tiers a collected test belongs to."""
    needs = set(EXPLICIT.get(item.nodeid.split("[")[0], ()))
    for mark in item.iter_markers("needs"):
        needs |= set(mark.args)
    for name in getattr(item, "fixturenames", ()):
        if name in FIXTURE_ARGS:
            needs.add(FIXTURE_ARGS[name])
    funcs = [getattr(item, "obj", None)]
    info = getattr(item, "_fixtureinfo", None)
    for defs in (info.name2fixturedefs.values() if info is not None else ()):
        funcs.extend(d.func for d in defs)
    for func in map(_unwrapped, funcs):
        if _is_test_code(func):
            needs |= _signals(func.__code__, func.__globals__, set())
    callspec = getattr(item, "callspec", None)
    for value in (callspec.params.values() if callspec is not None else ()):
        needs |= _value_signals(value)
        needs |= _example_signals(str(value)) if isinstance(value, (str, Path)) else set()
    return needs


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "needs(*fixtures): the test needs test data outside the repository "
                                       f"({', '.join(FIXTURES)}); see tests/conftest.py")


_MISSING_REASON: dict[str, str] = {}
_MISSING = pytest.StashKey[list]()


def _reason(counts: Counter[str]) -> str:
    parts = [f"{name} for {n} test(s), not at {FIXTURES[name].where}: {FIXTURES[name].how}"
             for name, n in sorted(counts.items())]
    return ("missing test fixtures, so these tests were skipped: " + "; ".join(parts)
            + " (CI=true makes a missing fixture a failure)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    present = {name: f.present() for name, f in FIXTURES.items()}
    counts: Counter[str] = Counter()
    for item in items:
        missing = sorted(n for n in fixtures_needed(item) if not present[n])
        item.stash[_MISSING] = missing
        counts.update(missing)
    _MISSING_REASON["text"] = _reason(counts)


def pytest_runtest_setup(item: pytest.Item) -> None:
    missing = item.stash.get(_MISSING, [])
    if not missing:
        return
    if _in_ci():
        pytest.fail(f"CI=true and the test fixture(s) {', '.join(missing)} are missing: "
                    + "; ".join(f"{FIXTURES[m].where}: {FIXTURES[m].how}" for m in missing), pytrace=False)
    pytest.skip(_MISSING_REASON["text"])


@pytest.fixture(scope="session")
def project_root() -> Path:
    """The checkout's root folder."""
    return ROOT


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The shared test data beside the checkout (specs, models, data); the stories260K tier."""
    return SHARED


@pytest.fixture(scope="session")
def stories260k_dir() -> Path:
    """The stories260K model folder; the stories260K tier."""
    return SHARED / "models" / "stories260K"


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama saved as a model folder (config, safetensors, tokenizer): copy it before changing it."""
    import tiny_models as tm

    return tm.save_model(tm.make_llama(), tm.make_tokenizer(), tmp_path_factory.mktemp("tiny-llama") / "model")


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The SmolLM2-135M model folder built by ../shared/models/smollm2/build.py; the smollm2 tier."""
    return SMOLLM2
