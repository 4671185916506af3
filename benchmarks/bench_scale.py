"""Scale on a real deep model (SmolLM2-135M: 30 layers, GQA): time and peak memory of atpdsl's passes.

    python benchmarks/bench_scale.py --part time|attention|memory|grid|cli|all [--model /work/cache/smollm2]
                                     [--repeats 3] [--threads 1]

- time: AtP (every head and neuron summed over positions, batch 4 x 128 tokens; the streamed clean backward)
  against hand-written PyTorch AtP on the same batch (hooks, autograd.grad, the same products), interleaved, ratio
  of medians and max |difference|; AtP* (QK fix on every layer's queries and keys, GradDrop per layer) against AtP.
- attention: one forward + backward with eager against sdpa attention, 128 and 512 tokens (the `attention auto`
  choice rests on it).
- memory: peak resident memory of a fresh process (weights + run; glibc's mmap threshold fixed at 64 kB so that
  freed tensors go back) for one plain forward + backward of the batch, and for atpdsl's runs of it, with the
  memory plan's estimate beside each (atpdsl.memory).
- grid: AtP time and peak memory as batch and prompt length grow.
- cli: `atpdsl run` end to end on the 512-token per-position spec (no edges): wall time and peak resident memory.

Token pairs are random ids (three positions changed), so every length is exact. Other jobs sharing the machine
change the times but not the ratios measured in one run, nor the memory.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
SMOLLM2 = Path("/work/cache/smollm2")
NODES = {"summed": [["heads", False], ["neurons", False]], "per_position": [["heads", True], ["neurons", True]]}


def _status() -> dict[str, int]:
    with open("/proc/self/status", encoding="ascii") as handle:
        return {line.split(":")[0]: int(line.split()[1]) * 1024 for line in handle if line.startswith(("VmRSS", "VmHWM"))}


def _pairs(vocab: int, n: int, seq: int, seed: int = 0):
    import torch

    from atpdsl.engine.data import EncodedPair

    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        clean = torch.randint(100, vocab, (seq,), generator=g)
        corrupt = clean.clone()
        corrupt[torch.randperm(seq - 1, generator=g)[:3]] = torch.randint(100, vocab, (3,), generator=g)
        a, w = (int(x) for x in torch.randint(100, vocab, (2,), generator=g))
        out.append(EncodedPair(i, f"random:{i}", tuple(clean.tolist()), tuple(corrupt.tolist()), tuple(range(seq)),
                               seq - 1, seq - 1, seq - 1, seq - 1, (a, w), (a, w), ()))
    return out


def _state(loaded, pairs, nodes, method: str, edges: bool, batch: int):
    """A RunState over these encoded pairs, with the steps the compiler would lower (edges on or off)."""
    from atpdsl.engine.context import Accumulator, Context
    from atpdsl.engine.data import make_batches, node_positions
    from atpdsl.engine.node_table import build_table
    from atpdsl.engine.state import ExtraSites, RunState
    from atpdsl.engine.trace import TraceSite
    from atpdsl.lowering import lower_steps, node_count
    from atpdsl.plan import MetricArg, MetricSpec, MethodSpec, ModelRef, NodeGroup, Plan, PromptPair

    groups = tuple(NodeGroup(k, per_position=pp) for k, pp in nodes)
    spec = MethodSpec(method, qk_fix=method == "atp*", graddrop=method == "atp*")
    steps = lower_steps(spec, groups, n_layers=loaded.geom.n_layers, nodes=node_count(groups, loaded.geom),
                        verification=None, diagnosis=None, edges_ok=edges)
    plan = Plan(spec_file="bench", spec_text="", spec_hash="", model=ModelRef("bench"), pairs=(PromptPair("x", "x"),),
                metric=MetricSpec("logit_diff", (MetricArg("answer"), MetricArg("wrong"))), nodes=groups,
                method=spec, batch=batch, steps=steps, geometry=loaded.geom)
    positions = node_positions(pairs) if any(pp for _, pp in nodes) else None
    table = build_table(loaded.arch, loaded.geom, groups, positions)
    batches = make_batches(pairs, batch, loaded.pad_id, loaded.device, positions)
    sites = [TraceSite(key=s.name, module=s.module, attr=s.attr, order=s.order, flat=s.flat) for s in table.sites]
    ctx = Context(plan=plan, loaded=loaded, pairs=list(pairs), batches=batches, table=table, sites=sites)
    return RunState(ctx, steps, Accumulator(table.size, False), extra=ExtraSites({s.key for s in sites}))


def _load(model: Path, attention: str = "eager"):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from atpdsl.engine.load import wrap_model

    return wrap_model(AutoModelForCausalLM.from_pretrained(model), AutoTokenizer.from_pretrained(model),
                      attention=attention)


def plain_fb(loaded, batch):
    """One plain forward + backward of the batch's clean prompts (frozen weights, gradient at the embedding)."""
    import torch

    hf = loaded.hf
    box = {}
    hook = hf.get_input_embeddings().register_forward_hook(lambda m, i, o: box.setdefault("e", o.requires_grad_(True)))
    try:
        logits = hf(**batch.clean, use_cache=False).logits
    finally:
        hook.remove()
    rows = torch.arange(batch.size)
    last = logits[rows, batch.metric_pos]
    metric = (last.gather(1, batch.answers[:, :1]) - last.gather(1, batch.answers[:, 1:2])).sum()
    del logits, last
    torch.autograd.grad(metric, [box["e"]])


def plain_atp(loaded, batch):
    """Hand-written AtP: hooks keep z (o_proj input) and neurons (down_proj input), autograd.grad, products."""
    import torch

    hf, g = loaded.hf, loaded.geom
    layers = hf.model.layers
    cache: list = []
    hooks = [m.register_forward_pre_hook(lambda _m, a: cache.append(a[0]))
             for layer in layers for m in (layer.self_attn.o_proj, layer.mlp.down_proj)]
    try:
        with torch.no_grad():
            hf(**batch.corrupt, use_cache=False)
        corrupt = list(cache)
        cache.clear()
        emb = hf.get_input_embeddings().register_forward_hook(lambda m, i, o: o.requires_grad_(True))
        try:
            logits = hf(**batch.clean, use_cache=False).logits
        finally:
            emb.remove()
        rows = torch.arange(batch.size)
        last = logits[rows, batch.metric_pos]
        metric = (last.gather(1, batch.answers[:, :1]) - last.gather(1, batch.answers[:, 1:2])).sum()
        del logits
        grads = torch.autograd.grad(metric, cache)
    finally:
        for h in hooks:
            h.remove()
    out = []
    for i in range(0, len(cache), 2):
        dz = (corrupt[i].float() - cache[i].detach().float()) * grads[i].float()
        out.append(dz.view(*dz.shape[:2], g.n_heads, g.head_dim).sum(-1).sum(1))
        out.append(((corrupt[i + 1].float() - cache[i + 1].detach().float()) * grads[i + 1].float()).sum(1))
    return torch.cat(out, dim=1)


def _engine(state, kinds):
    from atpdsl.engine.steps import prepare_steps, run_batch

    if "prepared" not in state.parts:
        prepare_steps(state)
        state.parts["prepared"] = True
    work = run_batch(state, state.ctx.batches[0], kinds)
    if work.clean is not None:
        work.clean.live.clear()
    return work


def _timed(fns: dict, repeats: int) -> dict[str, float]:
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():
        fn()  # warm up
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def part_time(model: Path, repeats: int) -> None:
    loaded = _load(model)
    pairs = _pairs(int(loaded.config["vocab_size"]), 4, 128)
    atp = _state(loaded, pairs, NODES["summed"], "atp", False, 4)
    star = _state(loaded, pairs, [["heads", False], ["queries", False], ["keys", False], ["neurons", False]],
                  "atp*", False, 4)
    atp_q = _state(loaded, pairs, [["heads", False], ["queries", False], ["keys", False], ["neurons", False]],
                   "atp", False, 4)
    batch = atp.ctx.batches[0]
    kinds = {"corrupt_forward", "clean_backward"}
    diff = float((_engine(atp, kinds).est.double() - plain_atp(loaded, batch).double()).abs().max())
    t = _timed({"atpdsl": lambda: _engine(atp, kinds), "plain": lambda: plain_atp(loaded, batch)}, repeats)
    print(f"AtP, heads + neurons summed, batch 4 x 128: atpdsl {t['atpdsl']:.2f} s, hand-written PyTorch "
          f"{t['plain']:.2f} s, ratio {t['atpdsl'] / t['plain']:.3f}, max |difference| {diff:.1e}")
    star_kinds = {s.kind for s in star.steps if s.scope == "batch"}
    t = _timed({"atp": lambda: _engine(atp_q, kinds), "atp*": lambda: _engine(star, star_kinds)}, max(1, repeats // 2))
    n = loaded.geom.n_layers
    print(f"AtP* (QK fix, GradDrop per layer; heads, queries, keys, neurons): {t['atp*']:.2f} s against AtP "
          f"{t['atp']:.2f} s: ratio {t['atp*'] / t['atp']:.2f} (target <= 1 + L/2 = {1 + n / 2:g})")


def part_attention(model: Path, repeats: int) -> None:
    for seq, b in ((128, 4), (512, 2)):
        fns = {}
        for attention in ("eager", "sdpa"):
            loaded = _load(model, attention)
            batch = _state(loaded, _pairs(int(loaded.config["vocab_size"]), b, seq), NODES["summed"], "atp", False,
                           b).ctx.batches[0]
            fns[attention] = (lambda ld=loaded, bt=batch: plain_fb(ld, bt))
        t = _timed(fns, repeats)
        print(f"forward + backward, batch {b} x {seq}: eager {t['eager']:.2f} s, sdpa {t['sdpa']:.2f} s "
              f"(sdpa / eager {t['sdpa'] / t['eager']:.3f})")


def probe(case: dict) -> dict:
    """One measurement in this process: peak resident memory above the size before the model was loaded."""
    import gc

    import torch

    from atpdsl.memory import estimate, model_sizes, shape_for

    torch.set_num_threads(1)
    base = _status()["VmRSS"]
    loaded = _load(Path(case["model"]), case.get("attention", "eager"))
    pairs = _pairs(int(loaded.config["vocab_size"]), case["pairs"], case["tokens"])
    if case["run"] == "plain":  # no node table: only the model and the batch
        from atpdsl.engine.data import make_batches

        batch, est = make_batches(pairs, case["batch"], loaded.pad_id, loaded.device)[0], 0
    else:
        if not case.get("stream", True):  # the clean backward that keeps every site (before the streamed one)
            import atpdsl.engine.atp as atp

            atp.streams = lambda kinds: False
        state = _state(loaded, pairs, NODES[case["nodes"]], "atp", case["edges"], case["batch"])
        lengths = [case["tokens"]] * case["pairs"]
        shape = shape_for(state.ctx.plan, loaded.config, lengths, attention=case.get("attention", "eager"))
        est = estimate(model_sizes(loaded.config, loaded.arch.name), shape, case["batch"], lengths).peak
    gc.collect()
    with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
        handle.write("5")
    t0 = time.perf_counter()
    if case["run"] == "plain":
        plain_fb(loaded, batch)
    else:
        from atpdsl.engine.result import build_result
        from atpdsl.engine.steps import execute_steps

        execute_steps(state)
        build_result(state)
    return {"peak": _status()["VmHWM"] - base, "seconds": time.perf_counter() - t0, "estimate": est}


def run_probe(case: dict) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, __file__, "--probe", json.dumps(case)], capture_output=True, text=True,
                          env=env, check=False)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else str(done.returncode)}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _row(label: str, case: dict, plain: dict | None) -> None:
    got = run_probe(case)
    if "error" in got:
        print(f"| {label} | failed: {got['error']} | | | |")
        return
    ratio = f"{got['peak'] / plain['peak']:.2f}" if plain else "1"
    print(f"| {label} | {got['peak'] / 1e9:.2f} GB | {got['estimate'] / 1e9:.2f} GB | {ratio} | {got['seconds']:.1f} s |")


def part_memory(model: Path) -> None:
    print("| run (SmolLM2-135M, 1 thread) | measured peak | plan's estimate | / plain fwd+bwd | seconds |")
    print("|---|---|---|---|---|")
    for seq, b, nodes in ((128, 4, "summed"), (128, 4, "per_position"), (512, 4, "summed")):
        base = {"model": str(model), "tokens": seq, "pairs": b, "batch": b, "nodes": nodes, "edges": False}
        plain = run_probe({**base, "run": "plain"})
        print(f"| plain forward + backward, batch {b} x {seq} | {plain['peak'] / 1e9:.2f} GB | | 1 | "
              f"{plain['seconds']:.1f} s |")
        _row(f"atpdsl AtP, {nodes} heads + neurons, no edges", {**base, "run": "atp"}, plain)
        _row(f"  the same, every site kept (not streamed)", {**base, "run": "atp", "stream": False}, plain)
        _row(f"atpdsl AtP, {nodes} heads + neurons, with edges (default)", {**base, "run": "atp", "edges": True},
             plain)
    # 23.7M per-position nodes at 512 tokens, as `select edges none` runs it (`attention auto` picks sdpa then)
    base = {"model": str(model), "tokens": 512, "pairs": 4, "batch": 4, "nodes": "per_position", "edges": False,
            "attention": "sdpa"}
    plain = run_probe({**base, "run": "plain"})
    print(f"| plain forward + backward, batch 4 x 512, sdpa | {plain['peak'] / 1e9:.2f} GB | | 1 | "
          f"{plain['seconds']:.1f} s |")
    _row("atpdsl AtP, per_position heads + neurons (23.7M nodes), no edges, sdpa", {**base, "run": "atp"}, plain)
    base = {**base, "attention": "eager"}  # the edges read the pattern: eager attention
    plain = run_probe({**base, "run": "plain"})
    print(f"| plain forward + backward, batch 4 x 512, eager | {plain['peak'] / 1e9:.2f} GB | | 1 | "
          f"{plain['seconds']:.1f} s |")
    _row("atpdsl AtP, per_position heads + neurons (23.7M nodes), with edges (default)",
         {**base, "run": "atp", "edges": True}, plain)


def part_grid(model: Path) -> None:
    print("| batch x tokens | AtP seconds | AtP peak | plain fwd+bwd peak | ratio |")
    print("|---|---|---|---|---|")
    for seq in (64, 128, 256):
        for b in (1, 4):
            base = {"model": str(model), "tokens": seq, "pairs": b, "batch": b, "nodes": "summed", "edges": False}
            plain, ours = run_probe({**base, "run": "plain"}), run_probe({**base, "run": "atp"})
            print(f"| {b} x {seq} | {ours['seconds']:.1f} | {ours['peak'] / 1e9:.2f} GB | {plain['peak'] / 1e9:.2f} GB"
                  f" | {ours['peak'] / plain['peak']:.2f} |")


def part_cli(model: Path) -> None:
    """`atpdsl run` end to end (compile, run, select, graph, summary) on the 23.7M-node spec: per-position heads +
    neurons, 4 pairs of 512 tokens, batch 4, `select edges none`; wall time and the child process's peak RSS."""
    import resource
    import tempfile

    body = " ".join(["the"] * 509)
    pairs = "".join(f'pair {{ clean "{body} girl said" corrupt "{body} boy said" answer " she" wrong " he" }}\n'
                    for _ in range(4))
    spec = (f'model "{model}"\n{pairs}metric logit_diff(answer, wrong)\n'
            "nodes {\n heads per position\n neurons per position\n}\nbatch 4\nmethod atp\nselect edges none\n")
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "spec.atp").write_text(spec)
        t0 = time.perf_counter()
        command = [sys.executable, "-m", "atpdsl.cli.app", "run", "spec.atp", "--out", "out", "--threads", "1"]
        done = subprocess.run(command, cwd=tmp, capture_output=True, text=True, check=False)
        seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    print(f"| `atpdsl run`, per_position heads + neurons, 512 tokens, batch 4, no edges | exit {done.returncode} | "
          f"{seconds:.1f} s | {peak / 1e9:.2f} GB peak resident (whole process) |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", default="all", choices=["time", "attention", "memory", "grid", "cli", "all"])
    ap.add_argument("--model", type=Path, default=SMOLLM2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--probe", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.probe:
        print(json.dumps(probe(json.loads(args.probe))))
        return 0
    import torch

    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), {args.repeats} interleaved repeats, medians")
    parts = ["time", "attention", "memory", "grid"] if args.part == "all" else [args.part]
    for part in parts:
        print(f"\n## {part}")
        if part in ("time", "attention"):
            {"time": part_time, "attention": part_attention}[part](args.model, args.repeats)
        else:
            {"memory": part_memory, "grid": part_grid, "cli": part_cli}[part](args.model)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
