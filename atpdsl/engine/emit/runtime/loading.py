"""Loading: the model (eager attention, eval mode, frozen weights) and the pairs as atpdsl encoded them."""
from __future__ import annotations

import nnsight
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from atpdsl.arch.config import Geometry
from atpdsl.engine.emit.runtime.objects import EngineError, Loaded
from atpdsl.language.encoding import EncodedPair, ResolvedAnswer, TokenRead


def resolve_device(name: str) -> torch.device:
    """`auto`: the best accelerator present (cuda, then mps), else the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    return torch.device(name)


def load_model(spec: dict, geometry: dict) -> Loaded:
    """The model and tokenizer as atpdsl loads them: eager attention (the QK fix reads the pattern), eval mode
    (no dropout), frozen parameters (the embedding output is made to require grad instead)."""
    kw = {"revision": spec["revision"], "trust_remote_code": spec["trust_remote_code"]}
    dtype = getattr(torch, spec["dtype"])
    tok = AutoTokenizer.from_pretrained(spec["source"], **kw)
    hf = AutoModelForCausalLM.from_pretrained(spec["source"], dtype=dtype, attn_implementation="eager", **kw)
    hf.set_attn_implementation("eager")
    hf.eval().requires_grad_(False).to(resolve_device(spec["device"]))
    model = nnsight.TransformersModel(hf, tokenizer=tok)
    param = next(hf.parameters())
    return Loaded(model, hf, tok, Geometry(**geometry), hf.config.to_dict(), param.device, param.dtype,
                  spec["parallel"])


def make_pairs(pairs: list, tokenizer) -> list:
    """The plan's pairs as atpdsl encoded them (token ids, aligned positions, what each metric reads), each
    checked against this tokenizer: a tokenizer giving other ids would silently move every position."""
    out = []
    for i, p in enumerate(pairs):
        ids = tokenizer([p["clean_text"], p["corrupt_text"]], add_special_tokens=True)["input_ids"]
        if [list(ids[0]), list(ids[1])] != [list(p["clean"]), list(p["corrupt"])]:
            raise EngineError(f"pair {p['origin']}: the tokenizer gives other token ids than when this program was "
                              f"emitted; emit the program again for this tokenizer")
        out.append(EncodedPair(
            index=i, origin=p["origin"], clean=tuple(p["clean"]), corrupt=tuple(p["corrupt"]), cmap=tuple(p["cmap"]),
            metric_pos=p["metric_pos"], corrupt_metric_pos=p["corrupt_metric_pos"], eval_pos=p["eval_pos"],
            corrupt_eval_pos=p["corrupt_eval_pos"], answers=tuple(p["answers"]),
            eval_answers=tuple(p["eval_answers"]), slot_last=tuple((n, t) for n, t in p["slot_last"]),
            tails=tuple(tuple(t) for t in p["tails"]), reads=tuple(TokenRead(*r) for r in p["reads"]),
            eval_reads=tuple(TokenRead(*r) for r in p["eval_reads"]),
            resolved=tuple(ResolvedAnswer(a, text, tuple(ids), use) for a, text, ids, use in p["resolved"]),
            eval_resolved=tuple(ResolvedAnswer(a, text, tuple(ids), use) for a, text, ids, use in p["eval_resolved"])))
    return out
