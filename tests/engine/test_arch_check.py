"""`atpdsl check` refuses what a model's architecture record cannot run (E705), pointing at the setting that asks
for it, and accepts the same spec for an architecture that can; nothing is loaded but config.json (and the
tokenizer, for the answer checks)."""
from __future__ import annotations

import json

import pytest

from engine_support import tiny_folder

from atpdsl.language.compiler import check_text

PAIR = 'pair { clean "the cat sat on the mat" corrupt "the dog sat on the mat" answer "mat" wrong "park" }'


def _check(folder, method: str):
    text = f'model "{folder}"\n{PAIR}\nmetric logit_diff(answer, wrong)\nnodes {{ heads }}\n{method}\n'
    return check_text(text, filename="t.atp", base_dir=str(folder.parent))


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("arch-check"))


def _errors(result):
    return [(d.code, d.message, d.span.line, d.span.column, d.hints) for d in result.errors]


def test_gptj_norm_fix_is_refused_at_the_setting(root):
    folder = tiny_folder("gptj", root, n_layer=1)
    r = _check(folder, "method atp* { qk_fix on  norm_fix on }")
    errors = _errors(r)
    assert len(errors) == 1, errors
    code, message, line, column, hints = errors[0]
    assert code == "E705" and "GPT-J models do not support `norm_fix`" in message and "shared norm" in message
    assert (line, column) == (5, 26) and hints == ("turn it off: `norm_fix off`",)
    assert _check(folder, "method atp* { norm_fix off }").ok
    assert _check(folder, "method exact").ok


def test_post_norm_opt_refuses_graddrop_by_default(root, tmp_path):
    """GradDrop is on by default in `method atp*`: refused (at the method name) for OPT-350m's post-norm layout,
    read from config.json; the pre-norm config of the same architecture is accepted."""
    folder = tiny_folder("opt", root, n_layer=1)
    assert _check(folder, "method atp*").ok
    post = tmp_path / "opt-post"
    post.mkdir()
    for f in folder.iterdir():
        (post / f.name).write_bytes(f.read_bytes())
    config = json.loads((post / "config.json").read_text())
    config["do_layer_norm_before"] = False
    (post / "config.json").write_text(json.dumps(config))
    errors = _errors(_check(post, "method atp*"))
    assert [e[0] for e in errors] == ["E705"] and "do_layer_norm_before is false" in errors[0][1]
    assert errors[0][2:4] == (5, 8)  # the method's name
    assert _check(post, "method atp* { graddrop off }").ok


def test_records_without_relp_refuse_it(root):
    from atpdsl.registry import METHODS

    if "relp" not in METHODS:
        pytest.fail("method relp is not in the registry: this test expects it (engine/relp.py exists)")
    r = _check(tiny_folder("phi3", root, n_layer=1), "method relp")
    assert [e[0] for e in _errors(r)] == ["E705"] and "Phi-3 models do not support `method relp`" in r.errors[0].message
    assert _check(tiny_folder("llama", root, n_layer=1), "method relp").ok
