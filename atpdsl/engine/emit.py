"""`emit_python(plan)`: the plan's AtP run as a standalone nnsight program, to leave the DSL with the work.

The program loads the model from the same folder (or hub id), tokenizes the same pairs, runs plain
`with model.trace(...)` blocks (corrupt forward, clean forward + `metric.backward()`), and prints one JSON
line per node: {"node", "estimate", "score"} (mean signed AtP estimate, mean |estimate|). It needs only
torch, transformers and nnsight. Supported: `at last` metrics, pairs whose clean and corrupt prompts have one
length; per-position nodes as atpdsl names them without slots (@t, or @-k from the end when lengths differ).
Template-slot alignment stays inside atpdsl.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from pprint import pformat

from atpdsl.arch import arch_for_config, geometry
from atpdsl.errors import EngineError
from atpdsl.plan import Plan

__all__ = ["emit_python"]


def _accessor(path: str) -> str:
    """`model.layers.0.self_attn.o_proj` -> `model.model.layers[0].self_attn.o_proj`."""
    parts = []
    for p in path.split("."):
        if re.fullmatch(r"\d+", p):
            parts[-1] += f"[{p}]"
        else:
            parts.append(p)
    return "model." + ".".join(parts)


def _config(plan: Plan) -> dict:
    """The model's config.json (local folders and zoo models; a hub id needs the hub's cache)."""
    if plan.model.is_zoo:
        from atpdsl.zoo import zoo_path

        folder = zoo_path(plan.model.source)
    else:
        folder = Path(plan.model.source)
    cfg = folder / "config.json"
    if cfg.is_file():
        return json.loads(cfg.read_text())
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(plan.model.source, revision=plan.model.revision).to_dict()


def emit_python(plan: Plan) -> str:
    """Source of a standalone nnsight program that reproduces the plan's AtP estimates."""
    if plan.method.name not in ("atp", "atp*") or plan.method.qk_fix or plan.method.graddrop:
        raise EngineError(f"emit python covers plain AtP; this plan uses method {plan.method.name!r}"
                          + (" with AtP* corrections" if plan.method.qk_fix or plan.method.graddrop else ""))
    m = plan.metric
    if m.position != "last":
        raise EngineError(f"emit python supports metrics `at last`, not `at {m.position}`")
    if m.kind not in ("logit_diff", "logprob", "prob", "loss"):
        raise EngineError(f"emit python supports logit_diff, logprob, prob and loss metrics, not {m.kind!r}")
    if any(p.slots for p in plan.pairs) and any(g.per_position for g in plan.nodes):
        raise EngineError("emit python does not name positions by template slot; run this plan with atpdsl")
    cfg = _config(plan)
    arch = arch_for_config(cfg)
    geom = geometry(cfg)
    from atpdsl.engine.node_table import build_table

    positions = ("index", ["@"]) if any(g.per_position for g in plan.nodes) else None
    table = build_table(arch, geom, plan.nodes, positions)
    # Per site: the hook expression and its node blocks (layout numbers, units, per position?).
    sites = []
    for si, site in enumerate(table.sites):
        blocks = []
        for b in table.blocks_at(si):
            lay = b.layout
            names = []
            for u in b.units:
                node = table.nodes[b.first + b.units.index(u) * b.n_positions]
                names.append(node.summed().name)
            blocks.append({"kind": b.kind, "count": lay.count, "width": lay.width, "start": lay.start,
                           "stride": lay.stride, "offset": lay.offset, "units": list(b.units), "names": names,
                           "per_position": b.per_position})
        sites.append((_accessor(site.module), site.attr, blocks))
    args = []
    default_args = [{"field": "answer", "literal": None, "first": False}] if m.kind == "loss" and not m.args else []
    for a in m.args:
        args.append({"field": a.field, "literal": a.literal, "first": a.first_token})
    args = args or default_args
    pairs = [{"clean": p.clean, "corrupt": p.corrupt, "fields": dict(p.fields), "origin": p.origin} for p in plan.pairs]
    reads = "\n".join(f"            vals.append({acc}.{attr})" for acc, attr, _ in sites)
    reads_clean = "\n".join(f"        vals.append({acc}.{attr})" for acc, attr, _ in sites)
    embed = _accessor(arch.embed)
    src = _TEMPLATE.format(
        spec=plan.spec_file,
        source=repr(plan.model.source if not plan.model.is_zoo else str(_zoo(plan))),
        revision=repr(plan.model.revision),
        dtype=plan.model.dtype,
        device=repr(plan.model.device),
        batch=int(plan.batch),
        metric_kind=repr(m.kind),
        metric_args=pformat(args, width=110),
        pairs=pformat(pairs, width=110, sort_dicts=False),
        blocks=pformat([b for _, _, b in sites], width=110, sort_dicts=False),
        reads=reads,
        reads_clean=reads_clean,
        embed=embed,
    )
    return src


def _zoo(plan: Plan) -> Path:
    from atpdsl.zoo import zoo_path

    return zoo_path(plan.model.source)


_TEMPLATE = '''"""AtP with plain nnsight, emitted by atpdsl from {spec}.

Prints one JSON line per node: {{"node", "estimate", "score"}}: the mean over pairs of the signed AtP estimate
(corrupt - clean) . dM/dnode at the clean run, and the mean of its absolute value.
"""
import json

import nnsight
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

SOURCE = {source}
REVISION = {revision}
DEVICE = {device}
BATCH = {batch}
METRIC = {metric_kind}
METRIC_ARGS = {metric_args}
PAIRS = {pairs}
# Per site (in forward order): node blocks; unit u of a block covers columns
# start + u*stride + offset ... + width of the site's last dimension.
BLOCKS = {blocks}

tok = AutoTokenizer.from_pretrained(SOURCE, revision=REVISION)
hf = AutoModelForCausalLM.from_pretrained(SOURCE, revision=REVISION, dtype=torch.{dtype}, attn_implementation="eager")
hf.set_attn_implementation("eager")
hf.eval().requires_grad_(False).to(DEVICE)
pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
model = nnsight.TransformersModel(hf, tokenizer=tok)


def answer_id(clean, text, first):
    base = tok(clean).input_ids
    full = tok(clean + text).input_ids
    ids = full[len(base):] if full[:len(base)] == base else []
    ids = ids or tok(text, add_special_tokens=False).input_ids
    if len(ids) != 1 and not first:
        raise SystemExit(f"answer {{text!r}} is {{len(ids)}} tokens")
    return ids[0]


def metric_rows(last, answers):
    x = last.float()
    if METRIC == "logit_diff":
        return x.gather(1, answers[:, :1]).squeeze(1) - x.gather(1, answers[:, 1:2]).squeeze(1)
    lp = torch.log_softmax(x, -1).gather(1, answers[:, :1]).squeeze(1)
    return {{"logprob": lp, "prob": lp.exp(), "loss": -lp}}[METRIC]


def left_pad(seqs, width):
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = torch.tensor(s)
        mask[i, width - len(s):] = 1
    return {{"input_ids": ids.to(DEVICE), "attention_mask": mask.to(DEVICE),
            "position_ids": (mask.cumsum(-1) - 1).clamp(min=0).to(DEVICE)}}


encoded = []
for p in PAIRS:
    clean, corrupt = tok(p["clean"]).input_ids, tok(p["corrupt"]).input_ids
    if len(clean) != len(corrupt):
        raise SystemExit(f"pair {{p['origin']}}: clean and corrupt tokenize to different lengths")
    answers = [answer_id(p["clean"], a["literal"] if a["literal"] is not None else p["fields"][a["field"]], a["first"])
               for a in METRIC_ARGS]
    encoded.append((clean, corrupt, answers))
# Per-position nodes: positions 0..T-1 when every prompt has T tokens, else counted from the end (@-1 = the
# last token; the prompts must end with the same token), over the shortest prompt's length.
lengths = {{len(c) for c, _, _ in encoded}}
FROM_END = len(lengths) > 1
if FROM_END and any(b["per_position"] for site in BLOCKS for b in site) and len({{c[-1] for c, _, _ in encoded}}) > 1:
    raise SystemExit("per-position nodes need prompts of one length or with the same last token")
POSITIONS = list(range(-min(lengths), 0)) if FROM_END else list(range(min(lengths)))

sums = {{}}
for lo in range(0, len(encoded), BATCH):
    chunk = encoded[lo:lo + BATCH]
    width = max(len(c) for c, _, _ in chunk)
    clean_in, corrupt_in = left_pad([c for c, _, _ in chunk], width), left_pad([k for _, k, _ in chunk], width)
    answers = torch.tensor([a for _, _, a in chunk], device=DEVICE)
    real = clean_in["attention_mask"].bool().unsqueeze(-1)
    rows = torch.arange(len(chunk), device=DEVICE)

    with torch.no_grad():
        with model.trace(corrupt_in, use_cache=False):
            vals = nnsight.save([])
{reads}
    corrupt_vals = vals

    with model.trace(clean_in, use_cache=False):
        {embed}.output.requires_grad_(True)   # parameters are frozen: start the graph here
        vals = nnsight.save([])
{reads_clean}
        metric = metric_rows(model.output.logits[rows, -1], answers).sum()
        grads = nnsight.save([None] * len(vals))
        with metric.backward():
            for i in reversed(range(len(vals))):   # gradients in reverse forward order
                grads[i] = vals[i].grad

    for site, (c, a, g) in enumerate(zip(corrupt_vals, vals, grads)):
        prod = (c.float() - a.detach().float()) * real * g.float()   # [b, S, W]
        for blk in BLOCKS[site]:
            seg = prod[..., blk["start"]: blk["start"] + blk["count"] * blk["stride"]]
            seg = seg.unflatten(-1, (blk["count"], blk["stride"]))[..., blk["offset"]: blk["offset"] + blk["width"]]
            per_unit = seg.sum(-1)[..., blk["units"]]                 # [b, S, units]
            for j, name in enumerate(blk["names"]):
                if blk["per_position"]:
                    for t in POSITIONS:
                        est = per_unit[:, width + t if FROM_END else t, j]
                        s = sums.setdefault(f"{{name}}@{{t}}", [0.0, 0.0])
                        s[0] += float(est.double().sum()); s[1] += float(est.double().abs().sum())
                else:
                    est = per_unit[:, :, j].sum(1)
                    s = sums.setdefault(name, [0.0, 0.0])
                    s[0] += float(est.double().sum()); s[1] += float(est.double().abs().sum())

for name, (total, total_abs) in sums.items():
    print(json.dumps({{"node": name, "estimate": total / len(encoded), "score": total_abs / len(encoded)}}))
'''
