"""The nnsight engine against the independent plain-PyTorch reference (tests/torch_reference.py):
AtP estimates and exact patch effects, per pair, on stories260K and on tiny models of every architecture."""
from __future__ import annotations

import pytest
import torch

from engine_support import STORIES, NodeGroup, make_plan, per_pair, stories_pairs, tiny_folder, tm
import torch_reference as R  # noqa: I001  (tests/ is on sys.path once engine_support is imported)

from transformers import AutoModelForCausalLM

from atpdsl.engine import execute
from atpdsl.engine.load import wrap_model
from atpdsl.names import NodeKind, parse_node

REF_KIND = {NodeKind.HEAD: "heads", NodeKind.NEURON: "neurons", NodeKind.QUERY: "queries", NodeKind.ATTN: "attn",
            NodeKind.MLP: "mlp"}


def ref_kind(node) -> str:
    if node.kind in (NodeKind.KEY, NodeKind.VALUE):
        base = "keys" if node.kind is NodeKind.KEY else "values"
        return "group_" + base if node.grouped else base
    return REF_KIND[node.kind]


def reference_atp(model, tok, pairs, names, metrics: list | None = None) -> dict[str, list[float]]:
    """name -> per-pair AtP from the hooks reference (summed over positions, or at the node's position)."""
    res = R.atp_scores(model, tok, pairs, R.logit_diff(tok))
    if metrics is not None:
        metrics.extend((r.clean_metric, r.corrupt_metric) for r in res)
    out = {}
    for name in names:
        node = parse_node(name)
        unit = 0 if node.index is None else node.index
        vals = []
        for r in res:
            if node.position is None:
                vals.append(float(r.summed[ref_kind(node)][node.layer, unit]))
            else:
                vals.append(float(r.per_position[ref_kind(node)][node.layer, node.position, unit]))
        out[name] = vals
    return out


def assert_close(ours: dict, ref: dict, tol: float) -> float:
    assert set(ours) == set(ref)
    worst = 0.0
    for name in ours:
        a = torch.tensor(ours[name], dtype=torch.float64)
        b = torch.tensor(ref[name], dtype=torch.float64)
        worst = max(worst, float((a - b).abs().max()))
    assert worst <= tol, worst
    return worst


@pytest.fixture(scope="module")
def stories_ref():
    torch.set_num_threads(1)
    return R.load_model(STORIES)


def test_stories_atp_equals_hooks_reference(stories_ref):
    """20 pronoun pairs (19-23 tokens, left-padded batches of 8), heads, neurons, queries, KV-group keys/values."""
    model, tok = stories_ref
    pairs = stories_pairs(20)
    nodes = (NodeGroup("heads"), NodeGroup("neurons"), NodeGroup("queries"), NodeGroup("keys"), NodeGroup("values"))
    result = execute(make_plan(STORIES, pairs, nodes, write_per_pair=True))
    ours = per_pair(result)
    assert len(ours) == 5 * (8 + 172 + 8 + 4 + 4)
    assert "L1.G3.k" in ours and "L4.N171" in ours
    metrics: list = []
    worst = assert_close(ours, reference_atp(model, tok, pairs, ours, metrics), 1e-4)
    print(f"stories260K AtP max |engine - reference| = {worst:.2e}")
    assert result.n_pairs == 20
    assert result.clean_metric == pytest.approx(sum(m[0] for m in metrics) / 20, abs=1e-4)
    assert result.corrupt_metric == pytest.approx(sum(m[1] for m in metrics) / 20, abs=1e-4)


def test_stories_exact_equals_hooks_reference(stories_ref):
    model, tok = stories_ref
    pairs = stories_pairs(20)[:4]
    nodes = (NodeGroup("heads"), NodeGroup("keys", (1, 1)), NodeGroup("queries", (4, 4), (0, 2)),
             NodeGroup("neurons", (3, 4), (7, 80, 96)), NodeGroup("attn", (4, 4)), NodeGroup("mlp", (3, 3)))
    result = execute(make_plan(STORIES, pairs, nodes, method="exact", batch=3, write_per_pair=True))
    ours = per_pair(result)
    ids = [parse_node(n) for n in ours]
    per = [R.exact_patches(model, tok, p, R.logit_diff(tok), ids) for p in pairs]
    ref = {n: [per[i][j] for i in range(len(pairs))] for j, n in enumerate(ours)}
    worst = assert_close(ours, ref, 1e-4)
    print(f"stories260K exact max |engine - reference| = {worst:.2e}")
    top_head = next(n for n in result.nodes if n.node.kind is NodeKind.HEAD)
    assert top_head.name == "L4.H2" and top_head.estimate < -2.0  # the pronoun head


ARCH_NODES = (NodeGroup("heads"), NodeGroup("queries"), NodeGroup("keys"), NodeGroup("values"),
              NodeGroup("neurons"), NodeGroup("attn"), NodeGroup("mlp"), NodeGroup("heads", (1, 1), (0, 3), True))


@pytest.mark.parametrize("name", ["gpt2", "neox", "neox_seq", "llama", "qwen2"])
def test_tiny_architectures_atp_and_exact_equal_reference(name, tmp_path_factory):
    """Every node kind, summed and per position, on left-padded batches: AtP and exact patching vs hooks."""
    torch.set_num_threads(1)
    folder = tiny_folder(name, str(tmp_path_factory.getbasetemp()))
    model, tok = R.load_model(folder)
    loaded = None
    if name == "qwen2":
        # transformers 5 loads a Qwen2 folder's tokenizer as Qwen2Tokenizer whatever tokenizer_config.json
        # says, which does not fit tiny_models' word-level vocabulary: hand both sides the real tokenizer.
        tok = tm.make_tokenizer()
        loaded = wrap_model(AutoModelForCausalLM.from_pretrained(folder), tok)
    pairs = tm.TINY_PAIRS[1:]  # equal lengths (12 tokens): per-position nodes are allowed
    result = execute(make_plan(folder, pairs, ARCH_NODES, batch=1, write_per_pair=True), loaded=loaded)
    ours = per_pair(result)
    grouped = name in ("llama", "qwen2")
    assert ("L0.G1.k" in ours) == grouped and ("L0.H3.k" in ours) == (not grouped)
    assert "L1.H3@11" in ours and "L1.H3@12" not in ours
    worst = assert_close(ours, reference_atp(model, tok, pairs, ours), 2e-5)
    # exact patching of one node of every kind, batch 2 with a padded row (13 + 12 tokens)
    pick = ["L1.H0", "L0.H1.q", "L1.G1.k" if grouped else "L1.H2.k", "L0.G0.v" if grouped else "L0.H3.v",
            "L0.N3", "L1.N10", "L1.attn", "L0.mlp"]
    exact_nodes = tuple(NodeGroup(k, (l, l), u) for k, l, u in [
        ("heads", 1, (0,)), ("queries", 0, (1,)), ("keys", 1, (1,) if grouped else (2,)),
        ("values", 0, (0,) if grouped else (3,)), ("neurons", 0, (3,)), ("neurons", 1, (10,)),
        ("attn", 1, None), ("mlp", 0, None)])
    all_pairs = tm.TINY_PAIRS
    ex = per_pair(execute(make_plan(folder, all_pairs, exact_nodes, method="exact", batch=2, write_per_pair=True),
                          loaded=loaded))
    assert sorted(ex) == sorted(pick)
    ids = [parse_node(n) for n in ex]
    per = [R.exact_patches(model, tok, p, R.logit_diff(tok), ids) for p in all_pairs]
    ref = {n: [per[i][j] for i in range(len(all_pairs))] for j, n in enumerate(ex)}
    worst_exact = assert_close(ex, ref, 2e-5)
    print(f"{name}: AtP max diff {worst:.1e}, exact max diff {worst_exact:.1e}")
