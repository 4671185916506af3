"""Compiling specs into Plans (atpdsl/compiler.py)."""
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from atpdsl.language.compiler import compile_file, compile_text, node_count
from atpdsl.errors import AtpError, SpecError
from atpdsl.plan import Plan

GOLDEN = Path(__file__).resolve().parent.parent / "golden" / "check"
HEAD = 'model "model"\npairs from "data/pairs.jsonl"\nmetric logit_diff(answer, wrong)\n'


def plan_of(body="", **kw) -> Plan:
    return compile_text(HEAD + body, filename="t.atp", base_dir=GOLDEN, **kw)


def at_limits(plan: Plan) -> Plan:
    """The plan costed without its batch shape (the `workload` extra): every cost at its large-model limit."""
    from dataclasses import replace

    from atpdsl.lowering import steps_for

    bare = replace(plan, extras=tuple((k, v) for k, v in plan.extras if k != "workload"))
    return replace(bare, steps=steps_for(bare))


def all_specs(project_root, shared_dir):
    specs = sorted((shared_dir / "specs").glob("*.atp")) + sorted((project_root / "examples").glob("*.atp"))
    assert len(specs) >= 4
    return specs


def test_every_shared_and_example_spec_compiles(project_root, shared_dir):
    for spec in all_specs(project_root, shared_dir):
        plan = compile_file(spec)
        assert plan.pairs, spec
        # Sites come from the model's config.json: known for local folders and zoo models; a hub id
        # that is not cached (offline here) has none, and the plan says so instead of guessing.
        local = plan.model.is_zoo or Path(plan.model.source).is_absolute()
        assert bool(plan.sites) == local, spec
        assert plan.spec_hash == hashlib.sha256(spec.read_bytes()).hexdigest()
        assert plan.spec_file == str(spec.resolve())
        json.dumps(plan.to_dict())  # JSON-able


def test_pronoun_spec_plan(shared_dir):
    plan = at_limits(compile_file(shared_dir / "specs" / "pronoun.atp"))
    assert plan.model.source == str((shared_dir / "models" / "stories260K").resolve())
    assert not plan.model.is_zoo and plan.model.dtype == "float32" and plan.model.attention == "eager"
    assert len(plan.pairs) == 20 and plan.pairs[0].origin.endswith("stories260K-pronoun.jsonl:1")
    assert plan.pairs[0].field("answer") == " she"
    assert (plan.metric.kind, plan.metric.position) == ("logit_diff", "last")
    assert [a.field for a in plan.metric.args] == ["answer", "wrong"]
    assert [(g.kind, g.layers) for g in plan.nodes] == [("heads", (0, 4)), ("neurons", (0, 4))]
    assert (plan.method.name, plan.method.qk_fix, plan.method.graddrop, plan.method.graddrop_mode) == (
        "atp*", True, True, "layer")
    assert (plan.batch, plan.seed, plan.selection.kind, plan.selection.value, plan.verification.top) == (
        8, 0, "top", 20, 30)
    assert [e.format for e in plan.exports] == ["csv", "graphml", "json"]
    assert plan.exports[0].path == str(shared_dir.resolve() / "specs" / "out" / "pronoun.csv")
    # no query/key nodes: no QK-fix step; graddrop: term l recomputes layers < l, (0+1+2+3+4)/5 = 2 backwards in all
    # (without the prompts' token lengths the plan costs steps at their large-model limits: a backward with frozen
    # parameters is about one forward)
    assert [s.name for s in plan.steps] == [
        "corrupt forward", "clean forward + backward", "graddrop L0", "graddrop L1", "graddrop L2", "graddrop L3",
        "graddrop L4", "edge reads", "rank", "verify", "edges"]
    assert [s.scope for s in plan.steps] == ["batch"] * 8 + ["run"] * 3
    costs = {s.name: s.cost for s in plan.steps}
    assert (costs["corrupt forward"], costs["clean forward + backward"], costs["verify"]) == (1, 2, 32)
    assert sum(s.cost for s in plan.steps if s.kind == "graddrop_term") == pytest.approx(2)
    assert [s.param("layer") for s in plan.steps if s.kind == "graddrop_term"] == [0, 1, 2, 3, 4]
    assert plan.sites[:2] == ("model.layers.0.self_attn.o_proj.input", "model.layers.0.mlp.down_proj.input")
    assert dict(plan.extras)["node_count"] == 5 * 8 + 5 * 172


def test_inline_spec_plan(shared_dir):
    plan = compile_file(shared_dir / "specs" / "inline.atp")
    assert [p.origin for p in plan.pairs] == [f"{shared_dir / 'specs' / 'inline.atp'}:4",
                                              f"{shared_dir / 'specs' / 'inline.atp'}:11"]
    assert [(g.kind, g.per_position) for g in plan.nodes] == [("heads", False), ("queries", True), ("keys", True)]
    assert plan.method.name == "atp" and not plan.method.qk_fix
    assert (plan.selection.kind, plan.selection.value) == ("threshold", 0.05)


def test_out_dir_replaces_export_folders(tmp_path, shared_dir):
    plan = compile_file(shared_dir / "specs" / "pronoun.atp", out_dir=tmp_path / "o")
    assert [e.path for e in plan.exports] == [str(tmp_path / "o" / n) for n in
                                              ("pronoun.csv", "pronoun.graphml", "pronoun.json")]


def test_defaults():
    plan = plan_of()
    assert [(g.kind, g.layers, g.heads, g.per_position) for g in plan.nodes] == [("heads", None, None, False)]
    assert plan.method == type(plan.method)("atp")
    assert (plan.batch, plan.seed, plan.selection, plan.verification, plan.diagnosis, plan.eval_metric) == (
        8, 0, None, None, None, None)
    assert not plan.write_per_pair and plan.exports == ()


def test_costs_of_atp_star_variants():
    plan = at_limits(plan_of("nodes { queries keys } method atp* { graddrop per sublayer }\nverify top 5\n"
                             "diagnose false_negatives { samples 40 }"))
    kinds = [s.kind for s in plan.steps]
    assert kinds == ["corrupt_forward", "clean_backward", "qk_fix"] + ["graddrop_term"] * 8 + [
        "edge_reads", "rank", "verify", "diagnose", "edges"]
    costs = {s.name: s.cost for s in plan.steps}
    # verify: 5 patched copies and the 2 references; diagnose: 40 samples, 2.5 more patches per sample for the
    # suspects and additivity checks (costs.DIAGNOSE_EXTRA), the 2 references
    assert (costs["qk fix"], costs["verify"], costs["diagnose"]) == (0.2, 7, 142)
    # 8 terms per sublayer: backward below each cut (the QK fix's prepared patterns are reused, not rebuilt)
    assert [s.name for s in plan.steps if s.kind == "graddrop_term"][:3] == [
        "graddrop L0.attn", "graddrop L0.mlp", "graddrop L1.attn"]
    assert (plan.diagnosis.samples, plan.diagnosis.confidence, plan.diagnosis.inclusion) == (40, 0.95, 0.1)
    plan = plan_of("nodes { queries } method atp* { qk_fix off graddrop off }")
    assert [s.kind for s in plan.steps] == ["corrupt_forward", "clean_backward", "edge_reads", "rank", "edges"]
    # kl has a zero gradient at the clean run: no edge attribution pass
    plan = compile_text('model "gpt2"\npair { clean "a" corrupt "b" }\nmetric kl\nmethod exact\n')
    assert "edges" not in [s.kind for s in plan.steps]


def test_norm_fix_is_off_unless_asked_and_costed_when_on():
    assert not plan_of("method atp*").method.norm_fix
    plan = at_limits(plan_of("nodes { neurons queries } method atp* { norm_fix on graddrop off }"))
    assert plan.method.norm_fix and not plan.method.graddrop
    # 4 layers: the MLP writes of layers 0..3 against 7, 5, 3 and 1 later norms -> 0.5 x 16 / 4
    assert [(s.name, s.cost) for s in plan.steps][2:4] == [("qk fix", 0.2), ("norm fix", 2.0)]
    with_drop = at_limits(plan_of("nodes { neurons } method atp* { norm_fix on }"))
    # + each GradDrop term l redoes the writes of layers m < l against the 2 (l - m) norms up to its cut:
    # 2 + 6 + 12 = 20 more pairs -> 0.5 x 36 / 4
    norm_in_terms = sum(s.cost for s in with_drop.steps if s.kind == "graddrop_term") - 1.0 * (0 + 1 + 2 + 3) / 4
    assert dict((s.name, s.cost) for s in with_drop.steps)["norm fix"] + norm_in_terms == pytest.approx(4.5)
    only_qk = plan_of("nodes { queries keys } method atp* { norm_fix on }")
    assert "norm fix" in [s.name for s in only_qk.steps]  # with the QK fix their heads' output change is the write
    no_qk = plan_of("nodes { queries keys } method atp* { norm_fix on qk_fix off }")
    assert "norm fix" not in [s.name for s in no_qk.steps]  # without it they keep plain AtP


def test_exact_costs_one_forward_per_node():
    plan = at_limits(plan_of("nodes { heads 0, 1 layers 1..2 ; mlp ; keys } method exact"))
    # 2 heads x 2 layers + 4 mlp + 2 KV groups x 4 layers
    assert dict(plan.extras)["node_count"] == 4 + 4 + 8
    assert [(s.name, s.cost) for s in plan.steps] == [
        ("corrupt forward", 1), ("clean forward", 1), ("patched forwards", 16), ("rank", 0)]


def test_node_count_needs_geometry():
    assert node_count((), None) is None


def test_hub_model_plan_has_no_sites_and_estimates_depth():
    plan = compile_text('model "EleutherAI/pythia-70m"\npair { clean "a" corrupt "b" }\nmetric logprob(" x")\n'
                        "nodes { heads layers 0..5 } method atp*\n")
    assert plan.sites == () and plan.model.source == "EleutherAI/pythia-70m"
    terms = [s for s in plan.steps if s.kind == "graddrop_term"]
    assert len(terms) == 6 and sum(s.cost for s in terms) == 2.5  # 6 layers from the node groups: 15 / 6
    assert all("estimated from the node groups" in s.description for s in terms)


def test_metric_args_and_eval_metric():
    plan = plan_of('eval metric logprob(first_token(answer)) at last\nverify top 2\n'
                   'keep per_pair\naggregate abs_mean\n')
    (arg,) = plan.eval_metric.args
    assert (arg.field, arg.literal, arg.first_token) == ("answer", None, True)
    assert plan.write_per_pair and plan.method.aggregate == "abs_mean"
    plan = compile_text('model "gpt2"\npair { clean "a" corrupt "b" }\nmetric logit_diff(" x", first_token(" y"))\n')
    assert [(a.field, a.literal, a.first_token) for a in plan.metric.args] == [(None, " x", False),
                                                                              (None, " y", True)]


def test_model_settings_reach_the_plan():
    plan = compile_text('model "gpt2" { dtype bf16 device cuda:1 revision "abc" attention eager }\n'
                        'pair { clean "a" corrupt "b" }\nmetric kl method exact\n')
    m = plan.model
    assert (m.dtype, m.device, m.revision, m.attention) == ("bfloat16", "cuda:1", "abc", "eager")
    assert (m.where.line, m.where.column) == (1, 1)


def test_template_pairs_and_slot_position_reach_the_plan():
    plan = compile_text('model "gpt2"\ntemplate { text "a {x} b" slot x ["1", "2", "3"] corrupt x count 5 seed 2'
                        ' answer "{x}" }\nmetric prob(answer) at x\nnodes { heads per position }\n')
    assert len(plan.pairs) == 5 and plan.metric.position == "x"
    assert all(p.slots[0].name == "x" for p in plan.pairs)


def test_spec_error_carries_every_diagnostic_and_a_readable_message():
    with pytest.raises(SpecError) as info:
        compile_text('model "gpt2"\npair { clean "a" }\nmetric kl method exact\nbatch 0\n', filename="t.atp")
    err = info.value
    assert [d.code for d in err.diagnostics] == ["E305", "E106"]
    assert str(err).splitlines() == ["t.atp:2:1: E305 pair has no `corrupt` prompt [help: add `corrupt \"...\"` to"
                                     " the block]",
                                     "t.atp:4:7: E106 `batch` must be a positive integer, got 0"]
    assert isinstance(err, AtpError)


def test_unreadable_spec_file_is_an_atp_error(tmp_path):
    with pytest.raises(AtpError, match="spec file not found"):
        compile_file(tmp_path / "nope.atp")
    with pytest.raises(AtpError, match="is a folder"):
        compile_file(tmp_path)
    (tmp_path / "bin.atp").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(AtpError, match="not UTF-8"):
        compile_file(tmp_path / "bin.atp")


def test_plan_never_imports_torch(shared_dir, project_root):
    code = (
        "import sys\n"
        "from atpdsl.cli import main\n"
        f"rc = main(['plan', {str(shared_dir / 'specs' / 'pronoun.atp')!r}])\n"
        f"rc2 = main(['check', {str(project_root / 'examples' / 'induction.atp')!r}])\n"
        "heavy = sorted(m for m in ('torch', 'nnsight', 'transformers', 'networkx', 'matplotlib')"
        " if m in sys.modules)\n"
        "print('RESULT', rc, rc2, heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         cwd=project_root)
    assert "RESULT 0 0 []" in out.stdout, out.stdout + out.stderr
