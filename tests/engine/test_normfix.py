"""Norm fix (atpdsl extension to AtP*): closed forms against the norm modules, the engine against a brute-force
hook reference (tests/engine/normfix_reference.py) with and without GradDrop, exactness where only the final
norm lies between a node and the metric, and the GradDrop facts with the fix on.

Measured (3-layer tiny models, sharpened x3, TINY_PAIRS[0], float32; `pytest -s` prints it): engine vs reference
<= 9.2e-7 on every heads / queries / keys / values / neurons / attn / mlp / resid node, per position and summed
(the fix moves estimates by up to 1.3), and <= 5.9e-7 under each GradDrop term; last-layer MLP nodes and layer outputs vs exact patching <= 1.7e-6, where plain AtP is
off by up to 8.8e-4 (llama) and 8.8e-2 (gpt2); three pairs in one left-padded batch vs the reference per pair
<= 5.3e-6.
"""
from __future__ import annotations

import pytest
import torch

from engine_support import NodeGroup, first_batch, make_plan, tm
import normfix_reference as NR
import torch_reference as R  # noqa: I001

from atpdsl.engine import execute
from atpdsl.engine.corrections import norm_fix
from atpdsl.engine.context import make_context
from atpdsl.engine.graddrop import zero_and_atp_terms
from atpdsl.engine.load import wrap_model
from atpdsl.engine.normfix import center_columns, norm_map, rank1_change, stack_norms, write_change
from atpdsl.errors import EngineError
from atpdsl.plan import MethodSpec

FIXED = ("heads", "queries", "keys", "values", "neurons", "attn", "mlp", "resid")
NODES = tuple(NodeGroup(k, per_position=True) for k in FIXED)
PAIR = tm.TINY_PAIRS[0]
ARCHS = ["llama", "neox", "neox_seq", "gpt2", "gemma"]


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)


def _model(name: str, n_layer: int = 3):
    if name == "gemma":  # not in tm.BUILDERS (nor tm.sharpen): only the norm fix's tests use it
        return tm.make_gemma(n_layer=n_layer)
    builder = tm.make_neox if name == "neox_seq" else tm.BUILDERS[name]
    return tm.sharpen(builder(n_layer=n_layer, **({"parallel": False} if name == "neox_seq" else {})), 3.0)


def _norm_modules():
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    mods = [torch.nn.LayerNorm(16), LlamaRMSNorm(16), GemmaRMSNorm(16)]
    with torch.no_grad():
        for mod in mods:
            mod.weight.normal_()
            if getattr(mod, "bias", None) is not None:
                mod.bias.normal_()
    return [mod.double() for mod in mods]


# ------------------------------------------------------------------------------------------ closed forms
@pytest.mark.parametrize("which", [0, 1, 2], ids=["layernorm", "llama-rms", "gemma-rms"])
@torch.no_grad()
def test_closed_forms_equal_the_norm_modules(which):
    mod = _norm_modules()[which]
    norm = norm_map(mod, torch.float64)
    g = torch.Generator().manual_seed(which)
    r, h = torch.randn(2, 3, 16, generator=g, dtype=torch.float64), torch.randn(2, 3, 16, generator=g, dtype=torch.float64)
    tol = 1e-12 if which == 0 else 2e-6  # the RMSNorms compute in float32 inside
    assert float((norm(r) - mod(r)).abs().max()) <= tol
    writes = 3 * torch.randn(2, 3, 5, 16, generator=g, dtype=torch.float64)
    brute = torch.stack([(h * (mod(r + writes[:, :, u]) - mod(r))).sum(-1) for u in range(5)], -1)
    assert float((write_change(norm, r, h, writes) - brute).abs().max()) <= tol * 10
    cols = torch.randn(16, 7, generator=g, dtype=torch.float64)
    delta = 3 * torch.randn(2, 3, 7, generator=g, dtype=torch.float64)
    brute = torch.stack([(h * (mod(r + delta[..., u:u + 1] * cols[:, u]) - mod(r))).sum(-1) for u in range(7)], -1)
    cw, ww = center_columns(norm, cols)
    assert float((rank1_change(norm, r, h, cw, ww, delta) - brute).abs().max()) <= tol * 10
    assert float(brute.abs().max()) > 0.5


def test_stacked_readers_sum_and_small_writes_are_linear():
    mods = [torch.nn.LayerNorm(16).double() for _ in range(3)]
    with torch.no_grad():
        for mod in mods:
            mod.weight.normal_()
    norms = [norm_map(m, torch.float64) for m in mods]
    g = torch.Generator().manual_seed(7)
    r = torch.randn(3, 2, 4, 16, generator=g, dtype=torch.float64)
    h = torch.randn(3, 2, 4, 16, generator=g, dtype=torch.float64)
    writes = torch.randn(2, 4, 5, 16, generator=g, dtype=torch.float64)
    one_by_one = sum(write_change(n, r[i], h[i], writes) for i, n in enumerate(norms))
    stacked = write_change(stack_norms(norms), r, h, writes)
    assert float((stacked - one_by_one).abs().max()) <= 1e-12
    kept = write_change(stack_norms(norms), r, h, writes, sum_readers=False)
    assert kept.shape == (3, 2, 4, 5) and float((kept.sum(0) - stacked).abs().max()) <= 1e-12
    # D -> 0: the change per unit of D tends to the linearised norm, h . J D (plain AtP's term)
    eps = 1e-6
    with torch.no_grad():
        lin = torch.stack([(h[0] * torch.func.jvp(mods[0], (r[0],), (writes[:, :, u],))[1]).sum(-1)
                           for u in range(5)], -1)
    with torch.no_grad():
        small = write_change(norms[0], r[0], h[0], eps * writes) / eps
    assert float((small - lin).abs().max()) <= 1e-5 * float(lin.abs().max())


def test_an_unknown_norm_is_a_clear_error():
    class ScaleNorm(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.g = torch.nn.Parameter(torch.ones(()))

    with pytest.raises(EngineError, match="ScaleNorm.*norm_fix off"):
        norm_map(ScaleNorm())


# ----------------------------------------------------------------------------------------------- engine
def _fix(qk: bool = True, gd: bool = False, mode: str = "layer") -> MethodSpec:
    return MethodSpec("atp*", qk_fix=qk, graddrop=gd, graddrop_mode=mode, norm_fix=True)


@pytest.mark.parametrize("summed", [False, True], ids=["per-position", "summed"])
@pytest.mark.parametrize("arch", ARCHS)
def test_engine_equals_brute_force_reference(arch, summed):
    model, tok = _model(arch), tm.make_tokenizer()
    nodes = tuple(NodeGroup(k) for k in FIXED) if summed else NODES
    res = execute(make_plan("tiny", [PAIR], nodes, batch=1, method_spec=_fix()), loaded=wrap_model(model, tok))
    ref = NR.norm_fixed(model, tok, PAIR, R.logit_diff(tok), [n.node for n in res.nodes])
    plain = execute(make_plan("tiny", [PAIR], nodes, batch=1, method_spec=MethodSpec("atp*", qk_fix=True)),
                    loaded=wrap_model(model, tok)).by_name()  # QK-fixed, without the norm fix
    worst = max(abs(n.estimate - r) for n, r in zip(res.nodes, ref))
    moved = max(abs(n.estimate - plain[n.name].estimate) for n in res.nodes)
    print(f"{arch}{' summed' if summed else ''}: engine vs reference {worst:.2g}; moved from plain AtP by up to"
          f" {moved:.2g}")
    assert {n.node.kind.value for n in res.nodes} == set(FIXED)
    assert worst <= 2e-6, worst
    assert moved > 1e-3, moved  # the fix changes estimates: the comparison has teeth


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_exact_where_only_the_final_norm_follows(arch):
    """A last-layer MLP node or layer output of a sequential model reaches the logits only through the final norm,
    and the metric is linear in the norm's output: the norm-fixed estimate is exact patching, plain AtP is not. The
    last MLP's output projection is scaled x30 so that its writes are a large part of the residual stream (as
    L0.N64's is on stories260K), where the norm's slope misleads most."""
    model, tok = _model(arch), tm.make_tokenizer()
    down = model.model.layers[2].mlp.down_proj if arch == "llama" else model.transformer.h[2].mlp.c_proj
    with torch.no_grad():
        down.weight.mul_(30.0)
    nodes = tuple(NodeGroup(k, (2, 2), per_position=True) for k in ("neurons", "mlp", "resid"))
    fixed = execute(make_plan("tiny", [PAIR], nodes, batch=1, method_spec=_fix()), loaded=wrap_model(model, tok))
    plain = execute(make_plan("tiny", [PAIR], nodes, batch=1), loaded=wrap_model(model, tok)).by_name()
    truth = execute(make_plan("tiny", [PAIR], nodes, batch=1, method_spec=MethodSpec("exact")),
                    loaded=wrap_model(model, tok)).by_name()  # engine exact patching (tested against the reference)
    changed = [n for n in fixed.nodes if plain[n.name].estimate != 0.0]
    exact = [truth[n.name].estimate for n in changed]
    err_fix = max(abs(n.estimate - e) for n, e in zip(changed, exact))
    err_atp = max(abs(plain[n.name].estimate - e) for n, e in zip(changed, exact))
    size = max(abs(e) for e in exact)
    print(f"{arch}: largest |exact| {size:.3g}; |norm fix - exact| <= {err_fix:.2g}, |AtP - exact| up to {err_atp:.2g}")
    assert len(changed) > 20
    assert err_fix <= 1e-5 * max(1.0, size), err_fix
    assert err_atp > 500 * err_fix and err_atp > 0.005 * size, (err_atp, err_fix, size)


def _terms(arch: str, mode: str, limit: int | None = None):
    model, tok = _model(arch), tm.make_tokenizer()
    loaded = wrap_model(model, tok)
    ctx = make_context(make_plan("tiny", [PAIR], NODES, batch=1, method_spec=_fix(gd=True, mode=mode)), loaded)
    old = norm_fix.NORM_SUFFIX_LIMIT
    if limit is not None:
        norm_fix.NORM_SUFFIX_LIMIT = limit
    try:
        state, run = first_batch(ctx, {"corrupt_forward", "clean_backward", "qk_fix", "norm_fix"})
        star = state.parts["graddrop"]
        est = run.est
        terms = torch.stack([star.estimates(run, t) for t in star.terms])  # [n_terms, 1, N]
    finally:
        norm_fix.NORM_SUFFIX_LIMIT = old
    run.clean.live.clear()
    return model, tok, ctx, star, est, terms


@pytest.mark.parametrize("mode", ["layer", "sublayer"])
@pytest.mark.parametrize("arch", ["llama", "neox"])
def test_graddrop_terms_with_the_fix_equal_the_reference(arch, mode):
    """Each term: the norm-fixed estimate with that term's cut gradients (reference: DropGradient on the cut block
    writes, norms called on the patched stream); also without the cache of the main pass's contributions."""
    model, tok, ctx, star, est, terms = _terms(arch, mode)
    _, _, _, _, _, uncached = _terms(arch, mode, limit=0)
    assert float((terms - uncached).abs().max()) <= 1e-6
    nodes = ctx.table.nodes
    mf = R.logit_diff(tok)
    worst = 0.0
    for j, term in enumerate(star.terms):
        drops = [(term.layer, side) for side in sorted(term.sides)]
        ref = NR.norm_fixed(model, tok, PAIR, mf, nodes, drops)
        worst = max(worst, float((terms[j, 0] - torch.tensor(ref)).abs().max()))
    print(f"{arch} per {mode}: terms vs reference {worst:.2g}")
    assert worst <= 2e-6, worst
    assert float((terms - est.unsqueeze(0)).abs().max()) > 1e-2  # the terms differ from the main estimate


@pytest.mark.parametrize("mode,arch,parallel", [("layer", "llama", False), ("sublayer", "llama", False),
                                                ("sublayer", "neox", True)])
def test_zero_term_and_unchanged_terms_with_the_fix(mode, arch, parallel):
    """A node's own term is 0 and the terms below it equal its (norm-fixed) main estimate."""
    _, _, ctx, _, est, terms = _terms(arch, mode)
    for col, node in enumerate(ctx.table.nodes):
        if node.kind.value == "resid":
            continue  # no term cuts a layer's output
        side = "mlp" if node.kind.value in ("neurons", "mlp") else "attn"
        zero, same = zero_and_atp_terms(node.layer, side, 3, mode, parallel)
        assert float(terms[zero, 0, col]) == 0.0
        for j in same:
            assert float(terms[j, 0, col]) == pytest.approx(float(est[0, col]), abs=1e-7), (node.name, j)


def test_the_norm_check_names_the_reader():
    """A reader whose closed form does not reproduce the model's norm output stops the run on the first batch."""
    model, tok = _model("llama"), tm.make_tokenizer()
    ctx = make_context(make_plan("tiny", [PAIR], NODES, batch=1, method_spec=_fix()), wrap_model(model, tok))
    state, run = first_batch(ctx, {"corrupt_forward", "clean_backward"})
    fix = state.parts["norm"]
    assert fix.readers[3].name == "L1.mlp-in"
    fix.readers[3].norm = norm_map(torch.nn.LayerNorm(32))  # centred: not the model's RMSNorm
    with pytest.raises(EngineError, match=r"L1\.mlp-in.*norm_fix off"):
        norm_fix.norm_fix_step(state, None, run)


@pytest.mark.parametrize("arch", ["llama", "neox", "gpt2", "qwen2"])
def test_padded_batch_equals_the_reference_per_pair(arch):
    """Three pairs of different lengths in one left-padded batch, nodes summed over positions, with GradDrop:
    every pair's norm-fixed estimate equals the brute-force reference for that pair alone (padding positions
    write nothing, and the readers there see no change)."""
    model, tok = _model(arch), tm.make_tokenizer()
    nodes = tuple(NodeGroup(k) for k in FIXED)
    res = execute(make_plan("tiny", tm.TINY_PAIRS, nodes, batch=3, write_per_pair=True, method_spec=_fix(gd=True)),
                  loaded=wrap_model(model, tok))
    worst = 0.0
    for i, pair in enumerate(tm.TINY_PAIRS):
        ref = NR.norm_fixed(model, tok, pair, R.logit_diff(tok), [n.node for n in res.nodes])
        worst = max(worst, max(abs(n.per_pair[i] - r) for n, r in zip(res.nodes, ref)))
    print(f"{arch}: padded batch vs per-pair reference {worst:.2g}")
    assert worst <= 1e-5, worst
