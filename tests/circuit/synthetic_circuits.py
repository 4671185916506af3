"""Hand-built runs (no model): RunResults and Plans with known numbers for graph and export tests."""
from __future__ import annotations

from pathlib import Path

from atpdsl.names import NodeId, NodeKind, parse_node
from atpdsl.plan import (
    Diagnosis,
    ExportTarget,
    MethodSpec,
    MetricArg,
    MetricSpec,
    ModelRef,
    NodeGroup,
    Plan,
    PromptPair,
    Selection,
    Verification,
)
from atpdsl.circuit.scores import EdgeScore, FalseNegativeBound, NodeScore, RunResult

SPEC_TEXT = '''model zoo "induction-2l"
pair { clean "A B C A" corrupt "A B D A" answer " B" wrong " D" }
metric logit_diff(answer, wrong) at last
nodes { heads  neurons layers 0..1 }
method atp* { qk_fix on graddrop on }
select top 6
verify top 5
diagnose false_negatives { samples 50 confidence 0.9 }
'''


def score(name: str, per_pair: tuple[float, ...], *, verified: tuple[float, ...] | None = None,
          attrs: tuple = (), method: str = "atp*") -> NodeScore:
    """A NodeScore whose estimate and score follow from its per-pair estimates (mean, mean |.|)."""
    n = len(per_pair)
    return NodeScore(
        node=parse_node(name),
        estimate=sum(per_pair) / n,
        score=sum(abs(v) for v in per_pair) / n,
        method=method,
        per_pair=per_pair,
        verified_effect=None if verified is None else sum(verified) / len(verified),
        verified_per_pair=verified,
        attrs=attrs,
    )


def ranked_result(scores: list[NodeScore], **kw) -> RunResult:
    """A RunResult with nodes sorted by score and ranks 1..n, as the engine returns them."""
    order = sorted(scores, key=lambda s: (-s.score, s.name))
    from dataclasses import replace

    nodes = tuple(replace(s, rank=i + 1) for i, s in enumerate(order))
    base = dict(
        model_id="zoo/induction-2l",
        spec_hash="sha256:0123abcd",
        method="atp*",
        metric="logit_diff(answer, wrong) at last",
        nodes=nodes,
        n_pairs=len(nodes[0].per_pair or (0,)) if nodes else 0,
        clean_metric=2.5,
        corrupt_metric=-1.25,
        timings=(("load", 0.5), ("forward", 0.25), ("backward", 0.125), ("verify", 0.0625)),
        provenance=(("device", "cpu"), ("dtype", "float32"), ("architecture", "llama")),
        extras={"aggregate": "mean_abs", "sites": ["model.layers.0.self_attn.o_proj"]},
    )
    base.update(kw)
    return RunResult(**base)


def mixed_scores() -> list[NodeScore]:
    """Two layers of 4 heads and 6 neurons, a KV-group key and a per-position query; 3 pairs."""
    out = []
    for layer in range(2):
        for head in range(4):
            v = (head + 1) * (layer + 1) * 0.1 * (-1) ** head
            out.append(score(f"L{layer}.H{head}", (v, 0.8 * v, 1.2 * v)))
        for n in range(6):
            v = 0.013 * (n + 1) * (-1) ** (n + layer)
            out.append(score(f"L{layer}.N{n}", (v, -0.5 * v, 2.0 * v)))
    out.append(score("L1.G0.k", (0.05, 0.04, 0.06), attrs=(("heads", "0,1"),)))
    out.append(score("L1.H2.q@3", (-0.3, -0.2, -0.4)))
    return out


def verified(scores: list[NodeScore], measured: dict[str, tuple[float, ...]]) -> list[NodeScore]:
    """The same scores with exact-patching effects attached to the named nodes."""
    return [s.with_verification(sum(measured[s.name]) / len(measured[s.name]), measured[s.name])
            if s.name in measured else s for s in scores]


def mixed_result(*, edges: bool = False, bound: bool = True) -> RunResult:
    """The mixed run, with L1.H3 verified far below its estimate (a refuted node) and L1.H1 confirmed."""
    scores = verified(mixed_scores(), {
        "L1.H3": (0.01, -0.01, 0.0),      # estimated |0.8|: refuted
        "L1.H1": (-0.35, -0.4, -0.45),    # estimated |0.4|: confirmed
        "L0.H3": (-0.3, -0.4, -0.5),
    })
    extra = {}
    if bound:
        extra["false_negatives"] = FalseNegativeBound(bound=0.0123, confidence=0.9, samples=50, nodes_tested=20,
                                                      inclusion=0.1)
    if edges:
        extra["edges"] = (
            EdgeScore("embed", "L0.H3", 0.2),
            EdgeScore("L0.H3", "L1.H1", -0.15),
            EdgeScore("L1.H1", "logits", -0.35),
            EdgeScore("L1.H2.q@3", "L1.H2", 0.05),
            EdgeScore("L0.H1", "logits", None),
            EdgeScore("L0.N0", "logits", 0.001),  # L0.N0 is not selected: kept in the table only
        )
    return ranked_result(scores, **extra)


def make_plan(tmp: Path | None = None, *, selection: Selection | None = Selection("top", 6),
              formats: tuple[str, ...] = (), aggregate: str = "mean_abs") -> Plan:
    """A plan matching SPEC_TEXT; exports (by format) go under `tmp/out/circuit.<fmt>`."""
    exports = tuple(ExportTarget(str((tmp or Path(".")) / "out" / f"circuit.{fmt}"), fmt) for fmt in formats)
    return Plan(
        spec_file=str((tmp or Path(".")) / "circuit.atp"),
        spec_text=SPEC_TEXT,
        spec_hash="sha256:0123abcd",
        model=ModelRef("induction-2l", is_zoo=True, revision="v1"),
        pairs=(PromptPair("A B C A", "A B D A", (("answer", " B"), ("wrong", " D"))),),
        metric=MetricSpec("logit_diff", (MetricArg(field="answer"), MetricArg(field="wrong"))),
        nodes=(NodeGroup("heads"), NodeGroup("neurons", layers=(0, 1))),
        method=MethodSpec("atp*", qk_fix=True, graddrop=True, aggregate=aggregate),
        seed=7,
        selection=selection,
        verification=Verification(5),
        diagnosis=Diagnosis(samples=50, confidence=0.9),
        exports=exports,
    )


def twenty_node_result() -> RunResult:
    """A 5-layer study with 20 selected nodes (heads, neurons, an MLP) and an attributed edge between every
    pair of nodes whose blocks are in order, weights spread over three orders of magnitude (some exactly 0)."""
    import random

    rng = random.Random(5)
    names = ["L0.H1", "L0.N79", "L0.N134", "L1.H3", "L1.H0", "L1.N12", "L2.H2", "L2.H5", "L2.mlp", "L2.N40",
             "L3.H1", "L3.H4", "L3.N7", "L3.N99", "L4.H0", "L4.H2", "L4.H4", "L4.N3", "L4.N18", "L4.N61"]
    scores = [score(n, tuple(rng.choice((-1, 1)) * rng.uniform(0.05, 2.0) for _ in range(4))) for n in names]
    scores = verified(scores, {"L0.N134": (-0.2, -0.3, -0.25, -0.36), "L4.H2": (0.01, 0.0, 0.02, -0.002)})
    order = {n: i for i, n in enumerate(names)}
    edges = [EdgeScore("embed", n, rng.uniform(-1, 1)) for n in names[:6]]
    for a in names:
        for b in names:
            if parse_node(a).layer < parse_node(b).layer and order[a] < order[b]:
                w = 0.0 if rng.random() < 0.05 else rng.choice((-1, 1)) * 10 ** rng.uniform(-3, 0)
                edges.append(EdgeScore(a, b, w))
    edges += [EdgeScore(n, "logits", rng.uniform(-1.5, 1.5)) for n in names[10:]]
    return ranked_result(scores, edges=tuple(edges), provenance=(("n_layers", 5),))


def finished(plan: Plan | None, run: RunResult, **kw):
    """`pipeline.finish` (exports not written unless asked): an `atpdsl.outputs.result.Result`."""
    from atpdsl.outputs.result import Result
    from atpdsl.pipeline import finish

    kw.setdefault("write_exports", False)
    res = finish(plan, run, **kw)
    assert isinstance(res, Result)
    return res


def node_ids(names: list[str]) -> list[NodeId]:
    return [parse_node(n) for n in names]


__all__ = ["SPEC_TEXT", "score", "ranked_result", "mixed_scores", "verified", "mixed_result", "make_plan",
           "finished", "twenty_node_result", "node_ids", "NodeKind"]
