"""atpdsl AtP vs plain-PyTorch AtP on the same model and batch (stories260K; random 4-layer d=256 GPT-NeoX).

Both compute per-node AtP estimates (every head and every MLP neuron of every layer, summed over
positions) for one batch of 16 pairs of 32 tokens: corrupt forward, clean forward, backward, products.
Runs are interleaved (atpdsl, plain, atpdsl, plain, ...) and the ratio of medians is printed.
The two results are also compared (max |difference|).

    python benchmarks/bench_atp.py [--repeats 15] [--threads 2]
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from atpdsl.engine.atp import run_atp
from atpdsl.engine.context import Context
from atpdsl.engine.data import EncodedPair, make_batches
from atpdsl.engine.load import wrap_model
from atpdsl.engine.node_table import build_table
from atpdsl.engine.trace import TraceSite
from atpdsl.plan import MetricArg, MetricSpec, MethodSpec, ModelRef, NodeGroup, Plan, PromptPair

STORIES = Path(__file__).resolve().parents[2] / "shared" / "models" / "stories260K"  # ../shared beside the checkout


def random_pairs(vocab: int, n: int, seq: int, seed: int = 0) -> list[EncodedPair]:
    """n pairs of `seq` random tokens; corrupt changes 3 positions; random answer/wrong tokens."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        clean = torch.randint(3, vocab, (seq,), generator=g)
        corrupt = clean.clone()
        where = torch.randperm(seq - 1, generator=g)[:3]
        corrupt[where] = torch.randint(3, vocab, (3,), generator=g)
        a, w = (int(x) for x in torch.randint(3, vocab, (2,), generator=g))
        out.append(EncodedPair(i, f"random:{i}", tuple(clean.tolist()), tuple(corrupt.tolist()), tuple(range(seq)),
                               seq - 1, seq - 1, seq - 1, seq - 1, (a, w), (a, w), ()))
    return out


def make_ctx(loaded, pairs: list[EncodedPair]) -> Context:
    groups = (NodeGroup("heads"), NodeGroup("neurons"))
    plan = Plan(spec_file="bench", spec_text="", spec_hash="", model=ModelRef("bench"),
                pairs=(PromptPair("x", "x"),), metric=MetricSpec("logit_diff", (MetricArg("answer"), MetricArg("wrong"))),
                nodes=groups, method=MethodSpec("atp"), batch=len(pairs))
    table = build_table(loaded.arch, loaded.geom, groups, None)
    batches = make_batches(pairs, len(pairs), loaded.pad_id, loaded.device)
    sites = [TraceSite(key=s.name, module=s.module, attr=s.attr, order=s.order) for s in table.sites]
    return Context(plan=plan, loaded=loaded, pairs=pairs, batches=batches, table=table, sites=sites)


def plain_atp(hf, z_mods, n_mods, n_attr: str, embed, batch, heads: int, dh: int) -> torch.Tensor:
    """Plain PyTorch: hooks capture z (o-proj input) and neurons, autograd.grad, per-node sums."""
    cache: list[torch.Tensor] = []

    def pre(_m, args):
        cache.append(args[0])

    def post(_m, _i, out):
        cache.append(out)

    def emb(_m, _i, out):
        return out.requires_grad_(True)

    hooks = []
    for z, nm in zip(z_mods, n_mods):
        hooks.append(z.register_forward_pre_hook(pre))
        hooks.append(nm.register_forward_pre_hook(pre) if n_attr == "input" else nm.register_forward_hook(post))
    try:
        with torch.no_grad():
            hf(**batch.corrupt, use_cache=False)
        corrupt = list(cache)
        cache.clear()
        h = embed.register_forward_hook(emb)
        try:
            logits = hf(**batch.clean, use_cache=False).logits
        finally:
            h.remove()
        rows = torch.arange(batch.size)
        last = logits[rows, batch.metric_pos]
        metric = (last.gather(1, batch.answers[:, :1]) - last.gather(1, batch.answers[:, 1:2])).sum()
        grads = torch.autograd.grad(metric, cache)
    finally:
        for hk in hooks:
            hk.remove()
    real = batch.real.unsqueeze(-1).float()
    out = []
    for i in range(0, len(cache), 2):
        dz = (corrupt[i] - cache[i].detach()) * real * grads[i]
        out.append(dz.view(*dz.shape[:2], heads, dh).sum(-1).sum(1))
        dn = (corrupt[i + 1] - cache[i + 1].detach()) * real * grads[i + 1]
        out.append(dn.sum(1))
    cache.clear()
    return torch.cat(out, dim=1)


def bench_model(name: str, loaded, repeats: int) -> float:
    hf, arch, geom = loaded.hf, loaded.arch, loaded.geom
    pairs = random_pairs(int(loaded.config["vocab_size"]), 16, 32)
    ctx = make_ctx(loaded, pairs)
    batch = ctx.batches[0]
    z_mods = [hf.get_submodule(arch.template("heads").path(l)) for l in range(geom.n_layers)]
    nt = arch.template("neurons")
    n_mods = [hf.get_submodule(nt.path(l)) for l in range(geom.n_layers)]
    embed = hf.get_submodule(arch.embed)

    def ours():
        acc = run_atp(ctx, keep_rows=True)
        return acc.per_pair()

    def plain():
        return plain_atp(hf, z_mods, n_mods, nt.attr, embed, batch, geom.n_heads, geom.head_dim)

    a, b = ours(), plain()
    diff = float((a - b.double()).abs().max())
    for _ in range(2):
        ours(), plain()
    t_ours, t_plain = [], []
    for _ in range(repeats):
        t = time.perf_counter(); ours(); t_ours.append(time.perf_counter() - t)
        t = time.perf_counter(); plain(); t_plain.append(time.perf_counter() - t)
    mo, mp = statistics.median(t_ours) * 1e3, statistics.median(t_plain) * 1e3
    print(f"{name:34s} atpdsl {mo:7.2f} ms   plain PyTorch {mp:7.2f} ms   ratio {mo / mp:5.3f}   "
          f"max|diff| {diff:.2e}   ({len(ctx.table.nodes)} nodes, batch 16 x 32)")
    return mo / mp


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPTNeoXConfig, GPTNeoXForCausalLM

    print(f"torch {torch.__version__}, {args.threads} threads, {args.repeats} interleaved repeats, medians")
    hf = AutoModelForCausalLM.from_pretrained(STORIES)
    tok = AutoTokenizer.from_pretrained(STORIES)
    bench_model("stories260K (Llama, GQA)", wrap_model(hf, tok), args.repeats)
    torch.manual_seed(0)
    cfg = GPTNeoXConfig(vocab_size=512, hidden_size=256, num_hidden_layers=4, num_attention_heads=8,
                        intermediate_size=1024, max_position_embeddings=128, rotary_pct=0.25)
    neox = GPTNeoXForCausalLM(cfg)
    bench_model("random GPT-NeoX L4 d256 H8 V512", wrap_model(neox, tok), args.repeats)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
