"""Whole-answer metrics (`sequence(...)`): values, corrupt values and AtP estimates from the engine's batch encoding
(several rows per pair, left padding, answer positions read one per token) against a brute force that runs plain
transformers on each unpadded prompt + answer and sums log-softmax terms by hand."""
from __future__ import annotations

import pytest
import torch

import tiny_models as T
from atpdsl.engine.data import encode_pairs, make_batches, pair_sum
from atpdsl.engine.metrics import metric_rows, metric_values, pick
from atpdsl.language.resolved import resolved_tokens
from atpdsl.plan import MetricArg, MetricSpec, ModelRef, Plan, MethodSpec, NodeGroup, PromptPair

LAYER = 1
HEAD_COLS = slice(8, 16)  # head 1 of the tiny Llama's 4 heads of width 8


def seq(field: str) -> MetricArg:
    return MetricArg(field=field, sequence=True)


DIFF = MetricSpec("logit_diff", (seq("answer"), seq("wrong")))
LOGPROB = MetricSpec("logprob", (seq("answer"),))
PROB = MetricSpec("prob", (seq("answer"),))


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return T.make_llama(n_layer=2, d=32, heads=4, kv_heads=2, seed=3), T.make_tokenizer()


def pairs() -> list[PromptPair]:
    """The tiny pairs with answers of 2 and 3 words, and one pair whose prompts are shorter (left padding)."""
    answers = [(" mary went", " the cat sat"), (" mat and", " park"), (" was he", " is the dog")]
    out = [PromptPair(p["clean"], p["corrupt"], (("answer", a), ("wrong", w)), (), f"tiny:{i}")
           for i, (p, (a, w)) in enumerate(zip(T.TINY_PAIRS, answers))]
    out.append(PromptPair("the cat sat on the", "the dog sat on the", (("answer", " mat"), ("wrong", " park school")),
                          (), "tiny:short"))
    return out


def brute_logprob(model, tok, prompt: str, answer: str, hook=None) -> torch.Tensor:
    """sum_j log softmax(logits[len(prompt) - 1 + j])[a_j] on the unpadded prompt + answer (teacher forcing)."""
    p = tok(prompt).input_ids
    a = tok(answer, add_special_tokens=False).input_ids
    logits = model(input_ids=torch.tensor([p + a[:-1]])).logits[0]
    lp = torch.log_softmax(logits.float(), -1)
    return sum(lp[len(p) - 1 + j, t] for j, t in enumerate(a))


def test_resolved_rows_and_reads(tiny):
    _, tok = tiny
    enc = encode_pairs(tok, pairs(), DIFF, None)
    e = enc[0]
    assert [r.use for r in e.resolved] == ["sequence", "sequence"]
    assert e.tails == (tuple(tok(" mary", add_special_tokens=False).input_ids),
                       tuple(tok(" the cat", add_special_tokens=False).input_ids))
    n = len(e.clean)
    assert [(r.row, r.clean_pos, r.arg) for r in e.reads] == [(0, n - 1, 0), (0, n, 0), (1, n - 1, 1), (1, n, 1),
                                                             (1, n + 1, 1)]


@pytest.mark.parametrize("spec", [DIFF, LOGPROB, PROB], ids=["logit_diff", "logprob", "prob"])
@pytest.mark.parametrize("batch", [1, 3])
def test_values_equal_brute_force(tiny, spec, batch):
    model, tok = tiny
    ps = pairs()
    batches = make_batches(encode_pairs(tok, ps, spec, None), batch, 0, "cpu")
    got_clean, got_corrupt = [], []
    with torch.no_grad():
        for b in batches:
            assert b.per_pair == (2 if spec is DIFF else 1)
            clean = model(**b.clean).logits
            corrupt = model(**b.corrupt).logits
            got_clean += metric_values(spec, pick(clean, b.reads.pos), b.reads).tolist()
            got_corrupt += metric_values(spec, pick(corrupt, b.reads.corrupt_pos), b.reads.corrupt()).tolist()
        for p, c, k in zip(ps, got_clean, got_corrupt):
            for prompt, value in ((p.clean, c), (p.corrupt, k)):
                a = brute_logprob(model, tok, prompt, p.field("answer"))
                if spec is DIFF:
                    want = a - brute_logprob(model, tok, prompt, p.field("wrong"))
                else:
                    want = a.exp() if spec is PROB else a
                assert value == pytest.approx(float(want), abs=1e-4), (p.origin, prompt)


def _capture(model):
    store = {}
    attn = model.model.layers[LAYER].self_attn.o_proj

    def hook(module, args):
        z = args[0]
        if z.requires_grad:
            z.retain_grad()
        store["z"] = z

    return attn.register_forward_pre_hook(hook), store


def test_atp_estimates_equal_brute_force(tiny):
    """AtP of one head through a two-sequence logit_diff: the engine's rows (prompt + each answer), left padded
    and summed per pair, against one unpadded forward and backward per pair and answer."""
    model, tok = tiny
    ps = pairs()
    model.requires_grad_(False)
    handle, store = _capture(model)
    try:
        est = []
        for b in make_batches(encode_pairs(tok, ps, DIFF, None), 4, 0, "cpu"):
            with torch.no_grad():
                model(**b.corrupt)
            zk = store["z"].detach()
            emb = model.model.embed_tokens.register_forward_hook(lambda m, a, o: o.requires_grad_(True))
            logits = model(**b.clean).logits
            emb.remove()
            z = store["z"]
            metric_values(DIFF, pick(logits, b.reads.pos), b.reads).sum().backward()
            rows = ((zk - z.detach()) * z.grad * b.real.unsqueeze(-1))[..., HEAD_COLS].sum((1, 2))
            est += pair_sum(b, rows).tolist()
        for p, value in zip(ps, est):
            want = 0.0
            for field, sign in (("answer", 1.0), ("wrong", -1.0)):
                n = len(tok(p.clean).input_ids)
                a = tok(p.field(field), add_special_tokens=False).input_ids
                with torch.no_grad():
                    model(input_ids=torch.tensor([tok(p.corrupt).input_ids + a[:-1]]))
                zk = store["z"][0].detach()
                emb = model.model.embed_tokens.register_forward_hook(lambda m, a_, o: o.requires_grad_(True))
                lp = brute_logprob(model, tok, p.clean, p.field(field))
                emb.remove()
                (g,) = torch.autograd.grad(lp, store["z"])
                zc = store["z"][0].detach()
                want += sign * float(((zk[:n] - zc[:n]) * g[0, :n])[:, HEAD_COLS].sum())  # prompt positions only
            assert value == pytest.approx(want, abs=1e-5), p.origin
    finally:
        handle.remove()
        model.requires_grad_(True)


def test_one_token_call_agrees_with_the_reads(tiny):
    """The one-position call (metric_rows) and the reads path give the same one-token metric values."""
    model, tok = tiny
    ps = [PromptPair(p["clean"], p["corrupt"], (("answer", " " + p["answer"]), ("wrong", " " + p["wrong"])), (),
                     f"t:{i}") for i, p in enumerate(T.TINY_PAIRS)]
    for spec in (MetricSpec("logit_diff", (MetricArg("answer"), MetricArg("wrong"))),
                 MetricSpec("prob", (MetricArg("answer"),)), MetricSpec("loss")):
        (b,) = make_batches(encode_pairs(tok, ps, spec, None), 8, 0, "cpu")
        with torch.no_grad():
            logits = model(**b.clean).logits
        one = metric_rows(spec, pick(logits, b.metric_pos), b.answers)
        two = metric_values(spec, pick(logits, b.reads.pos), b.reads)
        assert torch.allclose(one, two, atol=1e-6)


def test_resolved_tokens_for_the_outputs(tiny):
    _, tok = tiny
    plan = Plan(spec_file="t.atp", spec_text="", spec_hash="", model=ModelRef("tiny"), pairs=tuple(pairs()),
                metric=DIFF, nodes=(NodeGroup("heads"),), method=MethodSpec("atp"))
    rows = resolved_tokens(tok, plan)
    assert rows[0]["pair"] == "tiny:0" and rows[0]["clean_tokens"] == len(tok(T.TINY_PAIRS[0]["clean"]).input_ids)
    answer, wrong = rows[0]["metric"]
    assert (answer["arg"], answer["text"], answer["pieces"], answer["use"]) == (
        "sequence(answer)", " mary went", ["mary", "went"], "sequence")
    assert wrong["read_pieces"] == ["the", "cat", "sat"]
