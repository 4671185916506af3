"""Pairs, batches, positions and metrics: batch invariance, padding, slot alignment, GQA groups, and the errors a
user can cause (length mismatch, multi-token answers, unaligned per-position nodes, bad indices, kl with AtP)."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from engine_support import (
    LOGIT_DIFF,
    STORIES,
    MetricArg,
    MetricSpec,
    NodeGroup,
    SourceRef,
    Verification,
    make_plan,
    per_pair,
    stories_pairs,
    with_,
)

from atpdsl.engine import execute
from atpdsl.engine.data import encode_pairs
from atpdsl.engine.load import load_model
from atpdsl.errors import DataError, EngineError, ModelError
from atpdsl.plan import MethodSpec, ModelRef, PromptPair, SlotSpan, TextSpan

HEADS_NEURONS = (NodeGroup("heads"), NodeGroup("neurons", (2, 4), (7, 80, 96, 103)))


@pytest.fixture(scope="module")
def stories():
    torch.set_num_threads(1)
    return load_model(ModelRef(str(STORIES)))


def test_batch_equals_one_pair_at_a_time(stories):
    """20 pairs of 19-23 tokens: batches of 1, 7 (left padding) and 20 give the same per-pair numbers."""
    plan = make_plan(STORIES, stories_pairs(20), HEADS_NEURONS, write_per_pair=True)
    runs = [execute(with_(plan, batch=b), loaded=stories) for b in (1, 7, 20)]
    base = per_pair(runs[0])
    for r in runs[1:]:
        other = per_pair(r)
        worst = max(abs(a - b) for k in base for a, b in zip(base[k], other[k]))
        assert worst < 1e-5, worst
        assert r.clean_metric == pytest.approx(runs[0].clean_metric, abs=1e-5)
        assert r.corrupt_metric == pytest.approx(runs[0].corrupt_metric, abs=1e-5)
    exact = [per_pair(execute(make_plan(STORIES, stories_pairs(20)[:5], (NodeGroup("heads", (3, 4), (0, 2)),),
                                        method="exact", batch=b, write_per_pair=True), loaded=stories))
             for b in (1, 5)]
    # each exact effect is a difference of two float32 metrics of size ~5 computed in differently shaped batches:
    # their last bits differ by up to ~1e-5 depending on the BLAS kernel, so compare relative to the metric's size
    scale = max(1.0, abs(runs[0].clean_metric))
    assert max(abs(a - b) for k in exact[0] for a, b in zip(exact[0][k], exact[1][k])) < 1e-5 * scale


def test_result_shape_ranking_timings_provenance(stories):
    calls = []
    plan = make_plan(STORIES, stories_pairs(4), HEADS_NEURONS, batch=2, verification=Verification(3))
    res = execute(plan, loaded=stories, progress=lambda *a: calls.append(a))
    scores = [n.score for n in res.nodes]
    assert scores == sorted(scores, reverse=True)
    assert [n.rank for n in res.nodes] == list(range(1, len(res.nodes) + 1))
    assert all(n.verified_effect is not None for n in res.nodes[:3])
    assert all(n.verified_effect is None for n in res.nodes[3:])
    timings = dict(res.timings)
    assert {"load", "corrupt forward", "clean forward + backward", "rank", "verify", "total"} <= set(timings)
    prov = dict(res.provenance)
    for key in ("model_id", "revision", "torch", "nnsight", "transformers", "seed", "dtype", "device"):
        assert key in prov
    assert prov["trust_remote_code"] is False
    assert {c[0] for c in calls} >= {"score", "verify"}  # work units: batch steps, then nodes patched
    assert res.method == "atp" and res.metric == "logit_diff(answer, wrong) at last"


def test_per_position_nodes_need_aligned_pairs(stories):
    rows = stories_pairs(2)
    rows[1] = dict(rows[1], clean=rows[1]["clean"].rstrip(","), corrupt=rows[1]["corrupt"].rstrip(","))
    plan = make_plan(STORIES, rows, (NodeGroup("heads", (0, 0), None, True),))
    with pytest.raises(EngineError) as err:
        execute(plan, loaded=stories)
    msg = str(err.value)
    assert "per-position nodes" in msg and "pairs.jsonl:1 has 19 tokens and pairs.jsonl:2 has 20" in msg
    assert "template" in msg and "per position" in msg and "@-1" in msg


def test_unequal_lengths_count_positions_from_the_end(stories):
    """Prompts of 19-23 tokens that end alike: per-position nodes are @-19..@-1, equal to the hooks reference."""
    import torch_reference as R

    rows = stories_pairs(5)
    res = execute(make_plan(STORIES, rows, (NodeGroup("heads", (3, 4), (0, 2), True),), batch=3,
                            write_per_pair=True), loaded=stories)
    assert res.extras["positions"]["mode"] == "end"
    assert sorted({n.node.position for n in res.nodes}) == list(range(-19, 0))
    model, tok = R.load_model(STORIES)
    ref = R.atp_scores(model, tok, rows, R.logit_diff(tok))
    worst = 0.0
    for n in res.nodes:
        for i, r in enumerate(ref):
            t = r.per_position["heads"].shape[1] + n.node.position
            worst = max(worst, abs(n.per_pair[i] - float(r.per_position["heads"][n.node.layer, t, n.node.index])))
    assert worst < 1e-4, worst


def test_per_position_nodes_count_unpadded_positions(stories):
    """Equal-length pairs: one node per prompt position 0..T-1, whatever the batch width."""
    tok = stories.tokenizer
    n_tokens = len(tok(stories_pairs(1)[0]["clean"]).input_ids)
    rows = [p for p in stories_pairs(20) if len(tok(p["clean"]).input_ids) == n_tokens][:2]
    assert len(rows) == 2
    res = execute(make_plan(STORIES, rows, (NodeGroup("heads", (4, 4), (2,), True),), batch=2), loaded=stories)
    assert sorted(n.node.position for n in res.nodes) == list(range(n_tokens))


def _slot_pair(clean_word: str, corrupt_word: str, name: str, answer: str, wrong: str) -> PromptPair:
    text = "Once upon a time, there was a little {w} named {n}. One day,"
    clean, corrupt = text.format(w=clean_word, n=name), text.format(w=corrupt_word, n=name)
    s, sk = clean.index(clean_word), corrupt.index(corrupt_word)
    m, mk = clean.index(f" {name}.") + 1, corrupt.index(f" {name}.") + 1
    slots = (SlotSpan("who", TextSpan(s, s + len(clean_word)), TextSpan(sk, sk + len(corrupt_word))),
             SlotSpan("name", TextSpan(m, m + len(name)), TextSpan(mk, mk + len(name))))
    return PromptPair(clean, corrupt, (("answer", answer), ("wrong", wrong)), slots, origin=f"template:{clean_word}")


SLOT_PAIRS = [_slot_pair("girl", "dog", "Lily", " she", " he"), _slot_pair("boy", "big dog", "Tom", " he", " she")]


def test_slot_alignment_maps_positions(stories):
    enc = encode_pairs(stories.tokenizer, SLOT_PAIRS, LOGIT_DIFF, None)
    e = enc[0]  # girl = 3 tokens (g ir l), dog = 2 (do g): aligned from the slot's end
    assert len(e.clean) == len(e.corrupt) + 1
    assert e.cmap[:10] == tuple(range(10)) and e.cmap[10] == -1 and e.cmap[11:13] == (10, 11)
    assert e.cmap[13:] == tuple(range(12, len(e.corrupt)))
    assert dict(e.slot_last) == {"who": 12, "name": 14}


def test_slots_align_atp_and_exact_against_hooks(stories):
    """Different-length pairs aligned through slots: per-position nodes are the slots (no padding position is a
    node), and AtP / exact patching equal hand-written hooks using the slot alignment."""
    plan = make_plan(STORIES, SLOT_PAIRS, (NodeGroup("heads", (4, 4), (2,)), NodeGroup("heads", (4, 4), (2,), True)),
                     batch=2, write_per_pair=True)
    atp = per_pair(execute(plan, loaded=stories))
    assert sorted(atp) == ["L4.H2", "L4.H2@name", "L4.H2@who"]
    exact = per_pair(execute(with_(plan, method=MethodSpec("exact")), loaded=stories))
    hf = AutoModelForCausalLM.from_pretrained(STORIES).eval()
    tok = stories.tokenizer
    enc = encode_pairs(tok, SLOT_PAIRS, LOGIT_DIFF, None)
    o_proj = hf.model.layers[4].self_attn.o_proj
    cols = slice(16, 24)
    for i, (p, e) in enumerate(zip(SLOT_PAIRS, enc)):
        a, w = e.answers
        captured = {}
        h = o_proj.register_forward_pre_hook(lambda m, args: captured.__setitem__("z", args[0]))
        with torch.no_grad():
            hf(input_ids=torch.tensor([e.corrupt]))
        corrupt_z = captured["z"][0]
        emb = hf.model.embed_tokens.register_forward_hook(lambda m, a_, o: o.requires_grad_(True))
        hf.requires_grad_(False)
        logits = hf(input_ids=torch.tensor([e.clean])).logits
        emb.remove()
        clean_z = captured["z"][0].detach()
        metric = logits[0, -1, a] - logits[0, -1, w]
        (grad,) = torch.autograd.grad(metric, captured["z"])
        h.remove()
        pos = [t for t, k in enumerate(e.cmap) if k >= 0]
        delta = torch.stack([corrupt_z[e.cmap[t], cols] - clean_z[t, cols] for t in pos])
        manual_sum = float((delta * grad[0, pos][:, cols]).sum())
        assert atp["L4.H2"][i] == pytest.approx(manual_sum, abs=1e-5)
        who = dict(e.slot_last)["who"]
        manual_who = float(((corrupt_z[e.cmap[who], cols] - clean_z[who, cols]) * grad[0, who, cols]).sum())
        assert atp["L4.H2@who"][i] == pytest.approx(manual_who, abs=1e-5)

        def patch(m, args, t=who):
            z = args[0].clone()
            z[0, t, cols] = corrupt_z[e.cmap[t], cols]
            return (z,)

        h = o_proj.register_forward_pre_hook(patch)
        with torch.no_grad():
            lg = hf(input_ids=torch.tensor([e.clean])).logits
        h.remove()
        manual_exact = float(lg[0, -1, a] - lg[0, -1, w]) - float(metric.detach())
        assert exact["L4.H2@who"][i] == pytest.approx(manual_exact, abs=1e-4)


def test_length_mismatch_names_pair_and_tokens(stories):
    bad = {"clean": "Once upon a time, there was a little girl named Lily. One day,",
           "corrupt": "Once upon a time, there was a little dog named Lily. One day,", "answer": " she", "wrong": " he"}
    with pytest.raises(DataError) as err:
        execute(make_plan(STORIES, [stories_pairs(1)[0], bad], HEADS_NEURONS), loaded=stories)
    msg = str(err.value)
    assert "pairs.jsonl:2" in msg and "19 vs 18 tokens" in msg
    assert "'▁g', 'ir', 'l'" in msg and "'▁do', 'g'" in msg


def test_multi_token_answer_points_at_metric_and_first_token_accepts(stories):
    rows = [dict(p, answer=" girl") for p in stories_pairs(2)]
    with pytest.raises(DataError) as err:
        execute(make_plan(STORIES, rows, HEADS_NEURONS), loaded=stories)
    msg = str(err.value)
    assert msg.startswith("t.atp:3:8: ") and "' girl'" in msg and "3 tokens" in msg and "first_token(answer)" in msg
    ft = MetricSpec("logit_diff", (MetricArg("answer", first_token=True), MetricArg("wrong")))
    res = execute(make_plan(STORIES, rows, HEADS_NEURONS, metric=ft), loaded=stories)
    assert res.nodes and res.metric == "logit_diff(first_token(answer), wrong) at last"


def test_gqa_groups_named_with_their_heads(stories):
    res = execute(make_plan(STORIES, stories_pairs(2), (NodeGroup("keys", (1, 1)), NodeGroup("values", (0, 0), (3,)))),
                  loaded=stories)
    by = res.by_name()
    assert sorted(by) == ["L0.G3.v", "L1.G0.k", "L1.G1.k", "L1.G2.k", "L1.G3.k"]
    assert dict(by["L1.G1.k"].attrs)["heads"] == "2,3"
    assert dict(by["L0.G3.v"].attrs)["heads"] == "6,7"
    with pytest.raises(ModelError) as err:
        execute(make_plan(STORIES, stories_pairs(2), (NodeGroup("keys", (1, 1), (5,), where=SourceRef("t.atp", 9, 5)),)),
                loaded=stories)
    assert "t.atp:9:5" in str(err.value) and "KV group" in str(err.value) and "0..3" in str(err.value)
    with pytest.raises(ModelError) as err:
        execute(make_plan(STORIES, stories_pairs(2), (NodeGroup("heads", (3, 7)),)), loaded=stories)
    assert "5 layers" in str(err.value)


@pytest.mark.parametrize("kind", ["logprob", "prob", "loss", "kl"])
def test_metric_definitions_against_direct_computation(stories, kind):
    """Patching the last residual stream everywhere = the corrupt run, so exact effect = M(corrupt) - M(clean)
    with M computed here from the model's logits by hand."""
    rows = stories_pairs(3)
    args = () if kind in ("kl", "loss") else (MetricArg("answer"),)
    spec = MetricSpec(kind, args)
    res = execute(make_plan(STORIES, rows, (NodeGroup("resid", (4, 4)),), method="exact", metric=spec,
                            write_per_pair=True), loaded=stories)
    hf = AutoModelForCausalLM.from_pretrained(STORIES).eval()
    tok = stories.tokenizer
    for i, p in enumerate(rows):
        with torch.no_grad():
            lc = torch.log_softmax(hf(**tok(p["clean"], return_tensors="pt")).logits[0, -1], -1)
            lk = torch.log_softmax(hf(**tok(p["corrupt"], return_tensors="pt")).logits[0, -1], -1)
        a = tok(p["answer"], add_special_tokens=False).input_ids[0]
        value = {"logprob": lambda lp: lp[a], "prob": lambda lp: lp[a].exp(), "loss": lambda lp: -lp[a],
                 "kl": lambda lp: (lc.exp() * (lc - lp)).sum()}[kind]
        expected = float(value(lk) - value(lc))
        assert res.nodes[0].per_pair[i] == pytest.approx(expected, abs=1e-4)
    if kind == "kl":
        assert res.clean_metric == pytest.approx(0.0, abs=1e-6) and res.corrupt_metric > 0


def test_kl_cannot_drive_atp_but_can_verify(stories):
    kl = MetricSpec("kl")
    with pytest.raises(EngineError) as err:
        execute(make_plan(STORIES, stories_pairs(2), HEADS_NEURONS, metric=kl), loaded=stories)
    assert "zero gradient" in str(err.value) and "eval metric" in str(err.value)
    res = execute(make_plan(STORIES, stories_pairs(2), HEADS_NEURONS, eval_metric=kl, verification=Verification(2)),
                  loaded=stories)
    assert all(n.verified_effect >= 0 for n in res.nodes[:2])


def test_verify_top_k_equals_exact_scores_with_eval_metric(stories):
    rows = stories_pairs(4)
    nodes = (NodeGroup("heads", (3, 4)),)
    lp = MetricSpec("logprob", (MetricArg("answer"),))
    atp = execute(make_plan(STORIES, rows, nodes, batch=3, verification=Verification(4), eval_metric=lp),
                  loaded=stories)
    exact = execute(make_plan(STORIES, rows, nodes, method="exact", metric=lp, batch=2, write_per_pair=True),
                    loaded=stories).by_name()
    verified = [n for n in atp.nodes if n.verified_effect is not None]
    assert len(verified) == 4 and verified == list(atp.nodes[:4])
    for n in verified:
        assert n.verified_effect == pytest.approx(exact[n.name].estimate, abs=1e-5)
        assert n.verified_per_pair == pytest.approx(exact[n.name].per_pair, abs=1e-5)


def test_aggregates(stories):
    rows = stories_pairs(4)
    base = make_plan(STORIES, rows, (NodeGroup("heads", (4, 4)),), write_per_pair=True)
    runs = {a: execute(with_(base, method=MethodSpec("atp", aggregate=a)), loaded=stories).by_name()
            for a in ("mean_abs", "abs_mean", "per_pair")}
    for name, n in runs["mean_abs"].items():
        pp = torch.tensor(n.per_pair, dtype=torch.float64)
        assert n.estimate == pytest.approx(float(pp.mean()), abs=1e-9)
        assert n.score == pytest.approx(float(pp.abs().mean()), abs=1e-9)
        assert runs["abs_mean"][name].score == pytest.approx(abs(float(pp.mean())), abs=1e-9)
        assert runs["per_pair"][name].per_pair == n.per_pair
    assert runs["per_pair"]["L4.H2"].per_pair is not None


def test_offline_hub_id_says_so():
    with pytest.raises(ModelError) as err:
        load_model(ModelRef("EleutherAI/pythia-70m-does-not-exist-here", where=SourceRef("s.atp", 1, 7)))
    msg = str(err.value)
    assert msg.startswith("s.atp:1:7: ") and "HF_HUB_OFFLINE" in msg and "local folder" in msg


def test_missing_folder_and_zoo_name():
    with pytest.raises(ModelError, match="does not exist"):
        load_model(ModelRef("./no/such/model"))
    with pytest.raises(ModelError, match="no zoo model named 'nope'"):
        load_model(ModelRef("nope", is_zoo=True))


def test_dtype_bfloat16_runs(stories):
    ref = ModelRef(str(STORIES), dtype="bfloat16")
    loaded = load_model(ref)
    assert next(loaded.hf.parameters()).dtype == torch.bfloat16
    plan = with_(make_plan(STORIES, stories_pairs(4), (NodeGroup("heads", (4, 4)),)), model=ref)
    res = execute(plan, loaded=loaded)
    ref32 = execute(make_plan(STORIES, stories_pairs(4), (NodeGroup("heads", (4, 4)),)), loaded=stories).by_name()
    assert res.by_name()["L4.H2"].estimate == pytest.approx(ref32["L4.H2"].estimate, rel=0.1)
    assert dict(res.provenance)["dtype"] == "bfloat16"


def test_metric_read_at_a_template_slot(stories):
    spec = MetricSpec("logit_diff", (MetricArg("answer"), MetricArg("wrong")), position="name")
    res = execute(make_plan(STORIES, SLOT_PAIRS, (NodeGroup("heads", (4, 4)),), metric=spec), loaded=stories)
    hf = AutoModelForCausalLM.from_pretrained(STORIES).eval()
    values = []
    for p, e in zip(SLOT_PAIRS, encode_pairs(stories.tokenizer, SLOT_PAIRS, spec, None)):
        with torch.no_grad():
            lg = hf(input_ids=torch.tensor([e.clean])).logits[0, dict(e.slot_last)["name"]]
        values.append(float(lg[e.answers[0]] - lg[e.answers[1]]))
    assert res.clean_metric == pytest.approx(sum(values) / 2, abs=1e-5)
    assert res.metric == "logit_diff(answer, wrong) at name"
    with pytest.raises(DataError, match="no such slot"):
        execute(make_plan(STORIES, SLOT_PAIRS, (NodeGroup("heads", (4, 4)),),
                          metric=MetricSpec("logit_diff", spec.args, position="nmae")), loaded=stories)
