"""Adding an architecture is one record plus its code: a model class atpdsl has never seen (its own module names,
a fused [q | k | v] projection, learned positions), registered with one `Arch` record in the test, runs AtP and
exact patching end to end with no other change; AtP equals exact patching where the metric is linear in the node.
A renamed copy of a shipped record works the same way."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch import nn
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

from engine_support import NodeGroup, make_plan, per_pair, tm

from atpdsl.arch import Arch, arch_for_config, registered, support_problems
from atpdsl.arch.known import templates
from atpdsl.engine import execute
from atpdsl.engine.load import wrap_model
from atpdsl.engine.run import complete_plan
from atpdsl.errors import ModelError


class ToyConfig(PretrainedConfig):
    model_type = "toy_gpt"

    def __init__(self, vocab_size: int = tm.VOCAB_SIZE, hidden_size: int = 32, num_hidden_layers: int = 2,
                 num_attention_heads: int = 4, intermediate_size: int = 48, max_position_embeddings: int = 64,
                 **kwargs):
        self.vocab_size, self.hidden_size, self.num_hidden_layers = vocab_size, hidden_size, num_hidden_layers
        self.num_attention_heads, self.intermediate_size = num_attention_heads, intermediate_size
        self.max_position_embeddings = max_position_embeddings
        super().__init__(**kwargs)


class ToyMix(nn.Module):
    """Causal softmax attention from one fused [q | k | v] projection; `out` maps the heads back."""

    def __init__(self, cfg: ToyConfig):
        super().__init__()
        self.heads, self.dim = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.out = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q, k, v = (t.view(b, s, self.heads, self.dim).transpose(1, 2) for t in self.qkv(x).chunk(3, dim=-1))
        scores = q @ k.transpose(-1, -2) * self.dim ** -0.5
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        z = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, s, -1)
        return self.out(z)


class ToyBlock(nn.Module):
    def __init__(self, cfg: ToyConfig):
        super().__init__()
        self.ln_a, self.ln_b = nn.LayerNorm(cfg.hidden_size), nn.LayerNorm(cfg.hidden_size)
        self.mix = ToyMix(cfg)
        self.ff = nn.Sequential()
        self.ff.up = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.ff.act = nn.GELU()
        self.ff.down = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.mix(self.ln_a(x), mask)
        return x + self.ff(self.ln_b(x))


class ToyBody(nn.Module):
    def __init__(self, cfg: ToyConfig):
        super().__init__()
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.pos = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.blocks = nn.ModuleList(ToyBlock(cfg) for _ in range(cfg.num_hidden_layers))
        self.ln_f = nn.LayerNorm(cfg.hidden_size)


class ToyForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = ToyConfig
    base_model_prefix = "net"

    def __init__(self, cfg: ToyConfig):
        super().__init__(cfg)
        self.net = ToyBody(cfg)
        self.head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.post_init()

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(0.0, 0.2)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, **kwargs) -> CausalLMOutput:
        b, s = input_ids.shape
        keep = torch.ones(b, s, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        if position_ids is None:
            position_ids = (keep.long().cumsum(-1) - 1).clamp(min=0)
        mask = torch.ones(s, s, dtype=torch.bool).tril()[None, None] & keep[:, None, None, :]
        x = self.net.embed(input_ids) + self.net.pos(position_ids)
        for block in self.net.blocks:
            x = block(x, mask)
        return CausalLMOutput(logits=self.head(self.net.ln_f(x)))


# The whole of what atpdsl needs to know about the new architecture:
TOY = Arch(
    name="Toy",
    model_types=("toy_gpt",),
    layers="net.blocks",
    embed="net.embed",
    final_norm="net.ln_f",
    attn_norm="net.blocks.{layer}.ln_a",
    mlp_norm="net.blocks.{layer}.ln_b",
    neuron_proj="net.blocks.{layer}.ff.down",
    templates=templates([
        ("queries", "net.blocks.{layer}.mix.qkv", "output", "fused_q"),
        ("keys", "net.blocks.{layer}.mix.qkv", "output", "fused_k"),
        ("values", "net.blocks.{layer}.mix.qkv", "output", "fused_v"),
        ("heads", "net.blocks.{layer}.mix.out", "input", "heads"),
        ("attn", "net.blocks.{layer}.mix.out", "output", "whole"),
        ("neurons", "net.blocks.{layer}.ff.act", "output", "neurons"),
        ("mlp", "net.blocks.{layer}.ff", "output", "whole"),
        ("resid", "net.blocks.{layer}", "output", "whole"),
    ]),
    methods=("atp", "exact"),
    corrections=(),
    features=(),
    why_not=(("atp*", "its attention returns no pattern for the QK fix to read"),
             ("edges", "its attention returns no pattern for the per-head edges to read")),
)

NODES = (NodeGroup("heads"), NodeGroup("queries"), NodeGroup("keys"), NodeGroup("values"), NodeGroup("neurons"),
         NodeGroup("attn"), NodeGroup("mlp"), NodeGroup("resid"), NodeGroup("heads", (1, 1), (0, 2), True))


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)


def _run(plan, loaded):
    return execute(complete_plan(plan, loaded), loaded=loaded)


def _toy(linear: bool = False) -> ToyForCausalLM:
    torch.manual_seed(0)
    model = ToyForCausalLM(ToyConfig()).eval()
    if linear:
        model.net.ln_f = nn.Identity()
    return model


def test_unregistered_model_type_is_refused_by_name():
    with pytest.raises(ModelError, match="unsupported model_type 'toy_gpt'"):
        wrap_model(_toy(), tm.make_tokenizer())


def test_a_registered_record_runs_atp_and_exact_end_to_end():
    pairs = tm.TINY_PAIRS[1:]
    with registered(TOY):
        loaded = wrap_model(_toy(), tm.make_tokenizer())
        assert loaded.arch is TOY and not loaded.parallel
        res = _run(make_plan("tiny", pairs, NODES, batch=2, write_per_pair=True), loaded)
        by = res.by_name()
        # per layer: heads, queries, keys, values (4 each), 48 neurons, attn, mlp, resid; 2 heads at 12 positions
        assert len(res.nodes) == 2 * (4 * 4 + 48 + 3) + 2 * 12
        for layer in range(2):  # a layer's attention write is the sum of its heads' (AtP is linear in the head slices)
            heads = sum(torch.tensor(by[f"L{layer}.H{h}"].per_pair) for h in range(4))
            assert torch.allclose(heads, torch.tensor(by[f"L{layer}.attn"].per_pair), atol=1e-5)
        exact = _run(make_plan("tiny", pairs, (NodeGroup("resid", (1, 1)), NodeGroup("keys", (0, 0), (1,))),
                               method="exact", batch=2), loaded)
        resid = exact.by_name()["L1.resid"].estimate
        assert resid == pytest.approx(exact.corrupt_metric - exact.clean_metric, abs=1e-5)
        assert abs(exact.by_name()["L0.H1.k"].estimate) > 1e-4
        refused = {p.subject for p in support_problems(TOY, loaded.config, "atp*", corrections=["qk_fix"])}
        assert refused == {"atp*", "qk_fix"}
    with pytest.raises(ModelError):
        arch_for_config(loaded.config)  # unregistered again


def test_atp_equals_exact_on_the_new_architecture_where_the_metric_is_linear():
    pairs = tm.TINY_PAIRS[1:]
    nodes = (NodeGroup("neurons", (1, 1)), NodeGroup("mlp", (1, 1)), NodeGroup("resid", (1, 1)),
             NodeGroup("neurons", (1, 1), (3, 40), True))
    with registered(TOY):
        loaded = wrap_model(_toy(linear=True), tm.make_tokenizer())
        atp = per_pair(_run(make_plan("tiny", pairs, nodes, batch=2, write_per_pair=True), loaded))
        exact = per_pair(_run(make_plan("tiny", pairs, nodes, method="exact", batch=2, write_per_pair=True), loaded))
    worst = max(abs(a - b) for k in atp for a, b in zip(atp[k], exact[k]))
    biggest = max(abs(x) for v in exact.values() for x in v)
    assert biggest > 0.05 and worst < 1e-5, (worst, biggest)


def test_a_renamed_copy_of_a_shipped_record_gives_the_same_numbers():
    model, tok = tm.make_llama(n_layer=2), tm.make_tokenizer()
    config = model.config.to_dict()
    nodes = (NodeGroup("heads"), NodeGroup("keys"), NodeGroup("neurons", (1, 1)))
    plan = make_plan("tiny", tm.TINY_PAIRS[1:], nodes, batch=2, write_per_pair=True)
    base = per_pair(_run(plan, wrap_model(model, tok)))
    copy = replace(arch_for_config(config), name="Llama copy", model_types=("llama_copy",))
    with registered(copy):
        loaded = wrap_model(model, tok, config={**config, "model_type": "llama_copy"})
        assert loaded.arch.name == "Llama copy"
        again = per_pair(_run(plan, loaded))
    assert again == base
