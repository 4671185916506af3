"""The front end stays linear and starts fast: checking 4x the pairs takes about 4x the time (ratios only, with
generous slack, so a loaded machine cannot fail it but a quadratic regression does), templates draw as before,
and the parser tables come from a cache that is written atomically and never trusted blindly."""
from __future__ import annotations

import gc
import json
import os
import random
import subprocess
import sys
import time

import pytest

from atpdsl.language import grammar
from atpdsl.language.compiler import check_text
from atpdsl.language.templates import _Pool

RATIO_LIMIT = 10.0  # linear work gives ~4 for 4x the input; quadratic gives ~16


def _best_time(fn, repeats: int = 3) -> float:
    """The least CPU time of a few runs (CPU, not wall clock: other processes on the machine do not count)."""
    best = float("inf")
    for _ in range(repeats):
        gc.collect()
        t0 = time.process_time()
        fn()
        best = min(best, time.process_time() - t0)
    return best


def _ratio(make, small: int, large: int) -> float:
    texts = {n: make(n) for n in (small, large)}
    check_text(texts[small])  # warm caches (grammar, imports)
    ratio = _best_time(lambda: check_text(texts[large])) / _best_time(lambda: check_text(texts[small]))
    print(f"{large}/{small} items: time ratio {ratio:.2f}")
    return ratio


def _inline(n: int) -> str:
    pairs = "\n".join(f'pair {{ clean "the girl {i} said" corrupt "the boy {i} said" answer " she" wrong " he" }}'
                      for i in range(n))
    return f'model "EleutherAI/pythia-70m"\n{pairs}\nmetric logit_diff(answer, wrong\nnodes {{ heads }}\n'


def test_inline_pairs_with_a_syntax_error_stay_linear():
    r = check_text(_inline(50))
    assert [d.code for d in r.errors] == ["E001"] and len(r.pairs) == 50
    assert _ratio(_inline, 1000, 4000) < RATIO_LIMIT


def test_pairs_file_rows_without_prompts_stay_linear(tmp_path):
    def make(n: int) -> str:
        path = tmp_path / f"p{n}.jsonl"
        path.write_text("".join(json.dumps({"clean": "", "corrupt": "x", "answer": " a"}) + "\n" for _ in range(n)))
        return f'model "EleutherAI/pythia-70m"\npairs from "{path}"\nmetric logprob(answer)\n'

    r = check_text(make(20))
    assert r.errors[-1].message.startswith("... and 15 more rows")
    assert _ratio(make, 5000, 20000) < RATIO_LIMIT


def test_templates_stay_linear():
    def make(n: int) -> str:
        names = ", ".join(f'"n{i}"' for i in range(n))
        return (f'model "EleutherAI/pythia-70m"\ntemplate {{ text "{{a}} met {{b}} and {{a}}" slot a [{names}] slot b'
                f' [{names}] corrupt b count {n} answer " {{a}}" }}\nmetric logprob(answer)  method exact\n')

    assert check_text(make(10)).ok
    assert _ratio(make, 1000, 4000) < RATIO_LIMIT


def test_pool_draws_as_the_list_comprehension_did():
    pick, rng_a, rng_b = random.Random(1), random.Random(7), random.Random(7)
    values = [f"v{i}" for i in range(40)]
    pool = _Pool(values)
    for _ in range(2000):
        taken = set(pick.sample(values, pick.randrange(0, 5))) | {"not a value"}
        expected = [v for v in values if v not in taken]
        assert pool.draw(rng_a, taken) == expected[rng_b.randrange(len(expected))]
    assert _Pool(["a"]).draw(random.Random(0), {"a"}) is None


def test_grammar_cache_is_written_and_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("ATPDSL_CACHE_DIR", str(tmp_path / "cache"))
    from atpdsl.language.parser import grammar_path

    text = grammar_path().read_text()
    built = grammar.cached_parser(text)
    path = grammar.cache_file(text)
    assert path.is_file() and path.parent == tmp_path / "cache"
    assert oct(path.parent.stat().st_mode & 0o777) == oct(0o700)
    assert not [p for p in path.parent.iterdir() if p.suffix == ".tmp"]
    loaded = grammar.cached_parser(text)
    assert loaded is not built and loaded.parse('model "m"') == built.parse('model "m"')
    path.write_bytes(b"garbage")  # a corrupt cache is rebuilt, not an error
    assert grammar.cached_parser(text).parse("batch 2") == built.parse("batch 2")
    assert grammar.cache_file(text + "\n// changed") != path


def test_unwritable_or_foreign_cache_falls_back(tmp_path, monkeypatch):
    from atpdsl.language.parser import grammar_path

    text = grammar_path().read_text()
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("ATPDSL_CACHE_DIR", str(blocker / "cache"))  # under a file: cannot be created
    assert grammar.cached_parser(text).parse("batch 3")
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o777)
    os.chmod(shared, 0o777)  # writable by others: a pickle there could be anyone's
    monkeypatch.setenv("ATPDSL_CACHE_DIR", str(shared))
    assert grammar.cached_parser(text).parse("batch 4")
    assert not list(shared.iterdir())


def test_version_does_not_import_rich(project_root):
    code = ("import sys\nfrom atpdsl.cli import main\nrc = main(['--version'])\n"
            "print('RESULT', rc, 'rich' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=project_root)
    assert "RESULT 0 False" in out.stdout and out.stdout.startswith("atpdsl "), out.stdout + out.stderr


@pytest.mark.parametrize("argv", [["--version"], ["check", "--help"]])
def test_cli_entry_points_still_answer(argv, capsys):
    from atpdsl.cli import main

    assert main(argv) == 0
    assert capsys.readouterr().out
