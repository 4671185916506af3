"""The memory plan's per-token count of what autograd keeps for the backward (atpdsl.memory_sizes) against the
tensors autograd really saves, counted with saved_tensors_hooks on a tiny model of every architecture, float32
and bfloat16, eager and sdpa attention (parameters frozen, embedding output requiring grad: the engine's setup)."""
from __future__ import annotations

import pytest
import torch

from engine_support import tm

from atpdsl.arch import arch_for_config
from atpdsl.memory_sizes import model_sizes, saved_per_token

SEQ, BATCH = 24, 2


def _saved_bytes(model) -> int:
    """Bytes of the distinct storages autograd saves in one forward, parameters and buffers left out."""
    model.requires_grad_(False)
    own = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in own:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    ids = torch.randint(2, tm.VOCAB_SIZE, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    hook = model.get_input_embeddings().register_forward_hook(lambda m, i, o: o.requires_grad_(True))
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(ids, use_cache=False)
    finally:
        hook.remove()
    return sum(seen.values())


def _model(name: str):
    kw = {"n_layer": 3, "d": 64, "heads": 4}
    if name == "neox_seq":
        return tm.make_neox(parallel=False, **kw)
    if name not in ("neox", "gpt2"):
        kw["mlp"] = 176
    return tm.BUILDERS[name](**kw) if name in tm.BUILDERS else getattr(tm, "make_" + name)(**kw)


@pytest.mark.parametrize("name", ["llama", "qwen2", "neox", "neox_seq", "gpt2", "opt", "gptj", "phi3", "gemma"])
@pytest.mark.parametrize("attention", ["eager", "sdpa"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_saved_formula_matches_autograd(name: str, attention: str, dtype: str) -> None:
    torch.manual_seed(0)
    model = _model(name).to(getattr(torch, dtype))
    model.set_attn_implementation(attention)
    config = model.config.to_dict()
    arch = arch_for_config(config)
    sizes = model_sizes(config, arch.name, arch.is_parallel(config))
    assert sizes.known
    predicted = saved_per_token(sizes, dtype, attention, SEQ) * BATCH * SEQ
    measured = _saved_bytes(model)
    assert abs(predicted - measured) <= 0.05 * measured, (predicted, measured)
