"""The architectures atpdsl ships: one `Arch` record each (module names as in transformers 5.x)."""
from __future__ import annotations

from collections.abc import Sequence

from atpdsl.arch.record import Arch, Rotary
from atpdsl.arch.sites import SiteTemplate

__all__ = ["BUILTIN", "templates"]


def templates(rows: Sequence[tuple[str, str, str, str]]) -> tuple[SiteTemplate, ...]:
    """Site templates from (kind, module template, "input"|"output", layout name) rows."""
    return tuple(SiteTemplate(kind, module, attr, layout) for kind, module, attr, layout in rows)


# RelP's LRP rules (engine/relp.py) are implemented for these records' norms, activations and gates only.
_WITH_RELP = ("atp", "atp*", "exact", "relp")
_WITHOUT_RELP = ("atp", "atp*", "exact")
_NO_RELP = ("relp", "RelP's LRP rules (engine/relp.py) are not implemented for its norms and MLP")

_GPT2 = Arch(
    name="GPT-2",
    model_types=("gpt2",),
    layers="transformer.h",
    embed="transformer.wte",
    final_norm="transformer.ln_f",
    attn_norm="transformer.h.{layer}.ln_1",
    mlp_norm="transformer.h.{layer}.ln_2",
    neuron_proj="transformer.h.{layer}.mlp.c_proj",
    templates=templates([
        ("queries", "transformer.h.{layer}.attn.c_attn", "output", "fused_q"),
        ("keys", "transformer.h.{layer}.attn.c_attn", "output", "fused_k"),
        ("values", "transformer.h.{layer}.attn.c_attn", "output", "fused_v"),
        ("heads", "transformer.h.{layer}.attn.c_proj", "input", "heads"),
        ("attn", "transformer.h.{layer}.attn.c_proj", "output", "whole"),
        ("neurons", "transformer.h.{layer}.mlp.act", "output", "neurons"),
        ("mlp", "transformer.h.{layer}.mlp", "output", "whole"),
        ("resid", "transformer.h.{layer}", "output", "whole"),
    ]),
    methods=_WITH_RELP,
    notes="learned positions (no rotary); Conv1D projections",
)

_NEOX = Arch(
    name="GPT-NeoX",
    model_types=("gpt_neox",),
    layers="gpt_neox.layers",
    embed="gpt_neox.embed_in",
    final_norm="gpt_neox.final_layer_norm",
    attn_norm="gpt_neox.layers.{layer}.input_layernorm",
    mlp_norm="gpt_neox.layers.{layer}.post_attention_layernorm",
    neuron_proj="gpt_neox.layers.{layer}.mlp.dense_4h_to_h",
    rotary=Rotary("gpt_neox.rotary_emb"),
    parallel=True,
    parallel_key="use_parallel_residual",
    templates=templates([
        ("queries", "gpt_neox.layers.{layer}.attention.query_key_value", "output", "neox_q"),
        ("keys", "gpt_neox.layers.{layer}.attention.query_key_value", "output", "neox_k"),
        ("values", "gpt_neox.layers.{layer}.attention.query_key_value", "output", "neox_v"),
        ("heads", "gpt_neox.layers.{layer}.attention.dense", "input", "heads"),
        ("attn", "gpt_neox.layers.{layer}.attention.dense", "output", "whole"),
        ("neurons", "gpt_neox.layers.{layer}.mlp.act", "output", "neurons"),
        ("mlp", "gpt_neox.layers.{layer}.mlp", "output", "whole"),
        ("resid", "gpt_neox.layers.{layer}", "output", "whole"),
    ]),
    methods=_WITH_RELP,
    notes="parallel or sequential residual (use_parallel_residual); partial rotary",
)

_LLAMA_ROWS = [
    ("queries", "model.layers.{layer}.self_attn.q_proj", "output", "q"),
    ("keys", "model.layers.{layer}.self_attn.k_proj", "output", "k"),
    ("values", "model.layers.{layer}.self_attn.v_proj", "output", "v"),
    ("heads", "model.layers.{layer}.self_attn.o_proj", "input", "heads"),
    ("attn", "model.layers.{layer}.self_attn.o_proj", "output", "whole"),
    # act_fn(gate) * up has no module of its own: the down projection's input is the neuron vector.
    ("neurons", "model.layers.{layer}.mlp.down_proj", "input", "neurons"),
    ("mlp", "model.layers.{layer}.mlp.down_proj", "output", "whole"),
    ("resid", "model.layers.{layer}", "output", "whole"),
]


def _llama_like(name: str, model_types: tuple[str, ...], notes: str = "",
                rows: Sequence[tuple[str, str, str, str]] = _LLAMA_ROWS, relp: bool = True) -> Arch:
    return Arch(
        name=name,
        model_types=model_types,
        layers="model.layers",
        embed="model.embed_tokens",
        final_norm="model.norm",
        templates=templates(rows),
        attn_norm="model.layers.{layer}.input_layernorm",
        mlp_norm="model.layers.{layer}.post_attention_layernorm",
        rotary=Rotary("model.rotary_emb"),
        methods=_WITH_RELP if relp else _WITHOUT_RELP,
        why_not=() if relp else (_NO_RELP,),
        notes=notes,
    )


_PHI3_ROWS = [
    ("queries", "model.layers.{layer}.self_attn.qkv_proj", "output", "fused_q"),
    ("keys", "model.layers.{layer}.self_attn.qkv_proj", "output", "fused_k"),
    ("values", "model.layers.{layer}.self_attn.qkv_proj", "output", "fused_v"),
    *_LLAMA_ROWS[3:],
]

_OPT = Arch(
    name="OPT",
    model_types=("opt",),
    layers="model.decoder.layers",
    embed="model.decoder.embed_tokens",
    final_norm="model.decoder.final_layer_norm",
    attn_norm="model.decoder.layers.{layer}.self_attn_layer_norm",
    mlp_norm="model.decoder.layers.{layer}.final_layer_norm",
    pre_norm_key="do_layer_norm_before",
    # The decoder layer reshapes the residual stream to [batch * positions, d] before its MLP.
    flat_modules=tuple(f"model.decoder.layers.{{layer}}.{m}" for m in ("final_layer_norm", "fc1", "activation_fn",
                                                                        "fc2")),
    templates=templates([
        ("queries", "model.decoder.layers.{layer}.self_attn.q_proj", "output", "q"),
        ("keys", "model.decoder.layers.{layer}.self_attn.k_proj", "output", "k"),
        ("values", "model.decoder.layers.{layer}.self_attn.v_proj", "output", "v"),
        ("heads", "model.decoder.layers.{layer}.self_attn.out_proj", "input", "heads"),
        ("attn", "model.decoder.layers.{layer}.self_attn.out_proj", "output", "whole"),
        ("neurons", "model.decoder.layers.{layer}.fc2", "input", "neurons"),
        ("mlp", "model.decoder.layers.{layer}.fc2", "output", "whole"),
        ("resid", "model.decoder.layers.{layer}", "output", "whole"),
    ]),
    corrections=("qk_fix", "graddrop"),
    features=("edges",),
    methods=_WITHOUT_RELP,
    why_not=(
        _NO_RELP,
        ("norm_fix", "the norm fix does not yet read OPT's MLP norm, which sees [batch * positions, d] tensors"),
        ("emit", "the emitted program does not reshape OPT's [batch * positions, d] MLP tensors"),
    ),
    notes="learned positions; queries scaled after q_proj; MLP on [batch * positions, d]; "
          "do_layer_norm_before false (OPT-350m) is post-norm",
)

_GPTJ = Arch(
    name="GPT-J",
    model_types=("gptj",),
    layers="transformer.h",
    embed="transformer.wte",
    final_norm="transformer.ln_f",
    attn_norm="transformer.h.{layer}.ln_1",
    mlp_norm="transformer.h.{layer}.ln_1",  # attention and MLP read the same norm
    neuron_proj="transformer.h.{layer}.mlp.fc_out",
    rotary=Rotary("transformer.rotary_emb", "atpdsl.engine.rotary:gptj"),
    parallel=True,
    corrections=("qk_fix", "graddrop"),
    features=("emit",),
    methods=_WITHOUT_RELP,
    why_not=(
        _NO_RELP,
        ("norm_fix", ("attention and MLP read one shared norm (ln_1): the norm fix's per-block norm terms would "
                      "count it twice")),
        ("edges", "attention and MLP read one shared norm (ln_1), so their inputs cannot be told apart"),
    ),
    templates=templates([
        ("queries", "transformer.h.{layer}.attn.q_proj", "output", "q"),
        ("keys", "transformer.h.{layer}.attn.k_proj", "output", "k"),
        ("values", "transformer.h.{layer}.attn.v_proj", "output", "v"),
        ("heads", "transformer.h.{layer}.attn.out_proj", "input", "heads"),
        ("attn", "transformer.h.{layer}.attn.out_proj", "output", "whole"),
        ("neurons", "transformer.h.{layer}.mlp.act", "output", "neurons"),
        ("mlp", "transformer.h.{layer}.mlp", "output", "whole"),
        ("resid", "transformer.h.{layer}", "output", "whole"),
    ]),
    notes="parallel attention and MLP on one shared ln_1; rotary on the first rotary_dim dims, pairs interleaved",
)

BUILTIN: tuple[Arch, ...] = (
    _GPT2,
    _NEOX,
    _llama_like("Llama", ("llama",), "grouped-query attention: keys/values per KV group"),
    _llama_like("Qwen2", ("qwen2",), "Llama layout plus q/k/v biases"),
    _llama_like("Mistral", ("mistral",), "Llama layout"),
    _llama_like("Gemma", ("gemma",), "Llama layout; embeddings scaled inside embed_tokens", relp=False),
    _llama_like("Phi-3", ("phi3",), "fused qkv_proj [q | k | v] with grouped-query attention; fused gate_up_proj",
                _PHI3_ROWS, relp=False),
    _OPT,
    _GPTJ,
)
