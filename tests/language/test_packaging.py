"""The grammar ships inside the wheel and is found both there and in a checkout (pyproject force-include)."""
import os
import shutil
import subprocess
import sys
import tomllib

import pytest

from atpdsl.language import parser
from atpdsl.errors import AtpError


def test_pyproject_force_includes_the_grammar(project_root):
    conf = tomllib.loads((project_root / "pyproject.toml").read_text())
    wheel = conf["tool"]["hatch"]["build"]["targets"]["wheel"]
    assert wheel["force-include"]["grammar/atp.lark"] == "atpdsl/grammar/atp.lark"
    assert "atpdsl" in wheel["packages"]


def test_installed_layout_finds_the_packaged_grammar(project_root, tmp_path):
    """Lay the package out as the wheel does (package + force-included files) and import it from there."""
    conf = tomllib.loads((project_root / "pyproject.toml").read_text())
    site = tmp_path / "site"
    shutil.copytree(project_root / "atpdsl", site / "atpdsl",
                    ignore=shutil.ignore_patterns("__pycache__", "*.safetensors", "*.bin"))
    for src, dst in conf["tool"]["hatch"]["build"]["targets"]["wheel"]["force-include"].items():
        (site / dst).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(project_root / src, site / dst)
    code = ("import atpdsl, atpdsl.language.parser as p\n"
            "print(atpdsl.__file__)\nprint(p.grammar_path())\n"
            "tree, diags = p.parse('model \"m\"\\nbatch 2')\nprint(len(tree.statements), diags)\n")
    env = {**os.environ, "PYTHONPATH": str(site)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == str(site / "atpdsl" / "__init__.py")
    assert lines[1] == str(site / "atpdsl" / "grammar" / "atp.lark")
    assert lines[2] == "2 []"


def test_missing_grammar_is_an_atp_error(monkeypatch, tmp_path):
    monkeypatch.setattr(parser, "grammar_candidates", lambda: (tmp_path / "a.lark", tmp_path / "b.lark"))
    with pytest.raises(AtpError, match="grammar is missing"):
        parser.grammar_path()
