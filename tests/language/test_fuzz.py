"""Property-based fuzzing: no spec, however broken, raises anything but AtpError or reaches the user as a traceback."""
import contextlib
import io
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from atpdsl.cli import app as cli
from atpdsl.language.compiler import check_text, compile_text
from atpdsl.errors import SpecError
from atpdsl.registry import METRICS, NODE_KINDS, STATEMENTS

ROOT = Path(__file__).resolve().parents[2]
SPECS = sorted((ROOT.parent / "shared" / "specs").glob("*.atp")) + sorted((ROOT / "examples").glob("*.atp"))
SEEDS = [(p.parent, p.read_text()) for p in SPECS]
TEMPLATE_SPEC = ('model "../../shared/models/stories260K"\ntemplate {\n  text "When {a} met {b}, {s2:b} said"\n'
                 '  slot a ["Mary", "Anna"]\n  slot b ["Tom", "Bob", "Sam"]\n  corrupt b\n  count 3\n'
                 '  answer " {a}"\n  wrong " {b.corrupt}"\n}\nmetric logit_diff(answer, wrong) at s2\n'
                 'nodes { heads 0, 3 layers 1..2 per position }\nmethod exact\n')
SEEDS.append((ROOT / "examples", TEMPLATE_SPEC))

WORDS = sorted({w for k in STATEMENTS for w in k.split()} | set(METRICS) | set(NODE_KINDS) | {
    "zoo", "from", "at", "last", "layers", "per", "position", "top", "threshold", "cumulative", "text", "slot",
    "corrupt", "count", "seed", "first_token", "atp", "exact", "qk_fix", "graddrop", "norm_fix", "on", "off", "sublayer",
    "false_negatives", "samples", "confidence", "inclusion", "dtype", "device", "embed", "answer", "wrong"})
PIECES = WORDS + ["{", "}", "(", ")", "[", "]", ",", ";", "..", "...", "*", "=", ":", "#", '"', "\n", " ", "\t",
                  "0", "1", "-1", "4..0", "0.5", "1e9", "99999999999999999999", '"x"', '""', '"{a}"', '"{"',
                  '"out/x.csv"', '"data/x.jsonl"', '"\\u12"', "é", "\x00", "\r\n"]
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def compile_or_spec_error(text: str, base_dir: Path) -> None:
    check_text(text, filename="f.atp", base_dir=base_dir)  # never raises for a bad spec
    try:
        compile_text(text, filename="f.atp", base_dir=base_dir)
    except SpecError as e:
        assert e.diagnostics and all(d.span is not None for d in e.diagnostics)


@st.composite
def mutated(draw):
    base_dir, text = draw(st.sampled_from(SEEDS))
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(text)))
        j = draw(st.integers(i, min(len(text), i + 12)))
        op = draw(st.sampled_from(["delete", "insert", "replace", "duplicate"]))
        if op == "delete":
            text = text[:i] + text[j:]
        elif op == "insert":
            text = text[:i] + draw(st.sampled_from(PIECES)) + text[i:]
        elif op == "replace":
            text = text[:i] + draw(st.sampled_from(PIECES)) + text[j:]
        else:
            text = text[:i] + text[i:j] * 2 + text[j:]
    return base_dir, text


@FAST
@given(mutated())
def test_mutated_specs_raise_only_spec_errors(case):
    base_dir, text = case
    compile_or_spec_error(text, base_dir)


@FAST
@given(st.lists(st.sampled_from(PIECES), max_size=40).map(" ".join))
def test_token_soup_raises_only_spec_errors(text):
    compile_or_spec_error(text, ROOT / "examples")


@settings(max_examples=40, deadline=None)
@given(st.text(max_size=200))
def test_arbitrary_text_raises_only_spec_errors(text):
    compile_or_spec_error(text, ROOT / "examples")


@pytest.fixture(scope="module")
def mirror(tmp_path_factory):
    """Folders where a fuzzed spec finds what its seed spec referred to, without writing into the checkout."""
    top = tmp_path_factory.mktemp("fuzz")
    (top / "main" / "examples").mkdir(parents=True)
    (top / "main" / "examples" / "data").symlink_to(ROOT / "examples" / "data")
    (top / "shared").symlink_to(ROOT.parent / "shared")
    (top / "s" / "specs").mkdir(parents=True)
    for name in ("models", "data"):
        (top / "s" / name).symlink_to(ROOT.parent / "shared" / name)
    return {ROOT / "examples": top / "main" / "examples", ROOT.parent / "shared" / "specs": top / "s" / "specs"}


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=mutated())
def test_cli_never_shows_a_traceback(mirror, case):
    base_dir, text = case
    folder = mirror[base_dir]
    with tempfile.NamedTemporaryFile("w", suffix=".atp", dir=folder, delete=False, encoding="utf-8",
                                     errors="surrogatepass") as f:
        f.write(text)
        name = f.name
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            codes = [cli.main(["check", name]), cli.main(["check", name, "--output-format", "concise"]),
                     cli.main(["plan", name, "--json"])]
    finally:
        Path(name).unlink()
    assert set(codes) <= {0, 1}, (codes, out.getvalue(), err.getvalue())
    assert "Traceback" not in out.getvalue() + err.getvalue()
    assert "internal error" not in out.getvalue() + err.getvalue()


def test_mirror_resolves_like_the_originals(mirror):
    for original, copy in mirror.items():
        for spec in original.glob("*.atp"):
            result = check_text(spec.read_text(), filename=spec.name, base_dir=copy)
            assert result.ok, (spec, result.diagnostics)
