"""Tiny random-init Hugging Face causal LMs and a word-level tokenizer for fast offline tests.

API (everything float32, eager attention, eval mode, deterministic from `seed`):

    make_tokenizer() -> PreTrainedTokenizerFast      word-level over WORDS (+ "<unk>"); no BOS is added
    VOCAB_SIZE: int                                   len(tokenizer vocab); every builder uses it
    make_llama(n_layer=2, d=32, heads=4, kv_heads=2, mlp=48, seed=0)   LlamaForCausalLM, GQA when kv_heads < heads
    make_qwen2(n_layer=2, d=32, heads=4, kv_heads=2, mlp=48, seed=0)   Qwen2ForCausalLM (q/k/v bias), GQA
    make_neox(n_layer=2, d=32, heads=4, seed=0, parallel=True)        GPTNeoXForCausalLM, partial rotary (25%)
    make_gpt2(n_layer=2, d=32, heads=4, seed=0)                       GPT2LMHeadModel
    make_gemma(n_layer=2, d=32, heads=4, kv_heads=2, mlp=48, seed=0)  GemmaForCausalLM (1 + weight RMSNorm), GQA
    make_opt(n_layer=2, d=32, heads=4, mlp=48, seed=0, pre_norm=True) OPTForCausalLM (MLP on [b*S, d] tensors;
                                                                      pre_norm=False: OPT-350m's post-norm)
    make_gptj(n_layer=2, d=32, heads=4, mlp=48, seed=0, rotary_dim=4) GPTJForCausalLM (parallel blocks on one
                                                                      ln_1, interleaved partial rotary)
    make_phi3(n_layer=2, d=32, heads=4, kv_heads=2, mlp=48, seed=0)   Phi3ForCausalLM (fused qkv_proj with GQA,
                                                                      fused gate_up_proj)
    BUILDERS: dict[str, Callable[..., PreTrainedModel]]               {"llama", "qwen2", "neox", "gpt2", "opt",
                                                                       "gptj", "phi3"} (not gemma: norm-fix tests only)
    sharpen(model, factor) -> model        multiplies every query/key projection (weight and bias) by `factor`,
                                           in place, so attention saturates (QK-fix tests)
    save_model(model, tok, folder) -> Path writes config + weights + tokenizer, loadable by from_pretrained
    to_float64(model) -> model             .double() plus RMSNorm layers computed in float64 (HF's Llama / Qwen2
                                           RMSNorm casts to float32), for finite-difference checks
    TINY_PAIRS: list[dict]                 equal-length clean/corrupt prompts with "answer"/"wrong" words
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    GemmaConfig,
    GemmaForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    GPTJConfig,
    GPTJForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

__all__ = [
    "WORDS",
    "VOCAB_SIZE",
    "make_tokenizer",
    "make_llama",
    "make_qwen2",
    "make_neox",
    "make_gpt2",
    "make_gemma",
    "make_opt",
    "make_gptj",
    "make_phi3",
    "BUILDERS",
    "sharpen",
    "save_model",
    "to_float64",
    "TINY_PAIRS",
]

WORDS = (
    "<pad> <eos> the a cat dog sat on mat when john and mary went to store gave bottle "
    "milk tom alice bob park school book . , is was he she it"
).split()
VOCAB_SIZE = len(WORDS) + 1  # + <unk>

TINY_PAIRS = [
    {"clean": "when john and mary went to the store mary gave a bottle to",
     "corrupt": "when john and mary went to the store john gave a bottle to",
     "answer": "john", "wrong": "mary"},
    {"clean": "the cat sat on the mat and the dog sat on the",
     "corrupt": "the dog sat on the mat and the cat sat on the",
     "answer": "mat", "wrong": "park"},
    {"clean": "alice went to school and bob went to the park . she",
     "corrupt": "tom went to school and bob went to the park . he",
     "answer": "was", "wrong": "is"},
]


def make_tokenizer() -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer over WORDS; unknown words map to <unk>."""
    vocab = {w: i for i, w in enumerate(WORDS)}
    vocab["<unk>"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>", bos_token="<eos>"
    )


def _finish(model: PreTrainedModel) -> PreTrainedModel:
    model.set_attn_implementation("eager")
    return model.eval()


def make_llama(n_layer: int = 2, d: int = 32, heads: int = 4, kv_heads: int = 2, mlp: int = 48,
               seed: int = 0) -> LlamaForCausalLM:
    """A random Llama (RMSNorm, RoPE, SwiGLU, GQA when kv_heads < heads)."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB_SIZE, hidden_size=d, num_hidden_layers=n_layer, num_attention_heads=heads,
                      num_key_value_heads=kv_heads, intermediate_size=mlp, max_position_embeddings=128,
                      head_dim=d // heads, attn_implementation="eager", pad_token_id=0, eos_token_id=1,
                      bos_token_id=1, tie_word_embeddings=False, initializer_range=0.2)
    return _finish(LlamaForCausalLM(cfg))


def make_qwen2(n_layer: int = 2, d: int = 32, heads: int = 4, kv_heads: int = 2, mlp: int = 48,
               seed: int = 0) -> Qwen2ForCausalLM:
    """A random Qwen2 (Llama plus q/k/v biases), GQA."""
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=VOCAB_SIZE, hidden_size=d, num_hidden_layers=n_layer, num_attention_heads=heads,
                      num_key_value_heads=kv_heads, intermediate_size=mlp, max_position_embeddings=128,
                      attn_implementation="eager", pad_token_id=0, eos_token_id=1, bos_token_id=1,
                      tie_word_embeddings=False, initializer_range=0.2, use_sliding_window=False)
    model = Qwen2ForCausalLM(cfg)
    with torch.no_grad():  # HF initialises biases to zero; make them matter
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0.0, 0.2)
    return _finish(model)


def make_neox(n_layer: int = 2, d: int = 32, heads: int = 4, seed: int = 0,
              parallel: bool = True) -> GPTNeoXForCausalLM:
    """A random GPT-NeoX (Pythia layout: parallel attention + MLP, 25% rotary)."""
    torch.manual_seed(seed)
    cfg = GPTNeoXConfig(vocab_size=VOCAB_SIZE, hidden_size=d, num_hidden_layers=n_layer, num_attention_heads=heads,
                        intermediate_size=4 * d, max_position_embeddings=128, rotary_pct=0.25,
                        use_parallel_residual=parallel, attn_implementation="eager", pad_token_id=0,
                        eos_token_id=1, bos_token_id=1, initializer_range=0.2)
    return _finish(GPTNeoXForCausalLM(cfg))


def make_gpt2(n_layer: int = 2, d: int = 32, heads: int = 4, seed: int = 0) -> GPT2LMHeadModel:
    """A random GPT-2 (learned positions, Conv1D projections, gelu MLP)."""
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=VOCAB_SIZE, n_embd=d, n_layer=n_layer, n_head=heads, n_positions=128,
                     attn_implementation="eager", pad_token_id=0, eos_token_id=1, bos_token_id=1,
                     initializer_range=0.2)
    return _finish(GPT2LMHeadModel(cfg))


def make_gemma(n_layer: int = 2, d: int = 32, heads: int = 4, kv_heads: int = 2, mlp: int = 48,
               seed: int = 0) -> GemmaForCausalLM:
    """A random Gemma (RMSNorm with gain 1 + weight, embeddings scaled by sqrt(d), GeGLU MLP), GQA; the norm
    weights are drawn too (HF starts them at 0, a gain of exactly 1)."""
    torch.manual_seed(seed)
    cfg = GemmaConfig(vocab_size=VOCAB_SIZE, hidden_size=d, num_hidden_layers=n_layer, num_attention_heads=heads,
                      num_key_value_heads=kv_heads, intermediate_size=mlp, max_position_embeddings=128,
                      head_dim=d // heads, attn_implementation="eager", pad_token_id=0, eos_token_id=1,
                      bos_token_id=1, tie_word_embeddings=False, initializer_range=0.2)
    model = GemmaForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0.0, 0.5)
    return _finish(model)


@torch.no_grad()
def _draw_norms(model: PreTrainedModel, std: float = 0.3) -> None:
    """Norm gains around 1 and biases around 0 (HF starts them at exactly 1 and 0)."""
    for name, p in model.named_parameters():
        if "norm" in name or ".ln_" in name:
            p.add_(torch.randn_like(p) * std)


def make_opt(n_layer: int = 2, d: int = 32, heads: int = 4, mlp: int = 48, seed: int = 0,
             pre_norm: bool = True) -> OPTForCausalLM:
    """A random OPT (learned positions, ReLU MLP on [batch * positions, d] tensors, biases everywhere)."""
    torch.manual_seed(seed)
    cfg = OPTConfig(vocab_size=VOCAB_SIZE, hidden_size=d, num_hidden_layers=n_layer, num_attention_heads=heads,
                    ffn_dim=mlp, max_position_embeddings=128, word_embed_proj_dim=d, do_layer_norm_before=pre_norm,
                    attn_implementation="eager", pad_token_id=0, eos_token_id=1, bos_token_id=1, dropout=0.0,
                    attention_dropout=0.0, init_std=0.2, tie_word_embeddings=False)
    model = OPTForCausalLM(cfg)
    with torch.no_grad():  # HF initialises biases to zero; make them matter
        for name, p in model.named_parameters():
            if name.endswith("bias") and "norm" not in name:
                p.normal_(0.0, 0.1)
    _draw_norms(model)
    return _finish(model)


def make_gptj(n_layer: int = 2, d: int = 32, heads: int = 4, mlp: int = 48, seed: int = 0,
              rotary_dim: int | None = 4) -> GPTJForCausalLM:
    """A random GPT-J (attention and MLP in parallel on one ln_1, rotary on the first `rotary_dim` dims of each
    head with interleaved pairs)."""
    torch.manual_seed(seed)
    cfg = GPTJConfig(vocab_size=VOCAB_SIZE, n_embd=d, n_layer=n_layer, n_head=heads, n_inner=mlp, n_positions=128,
                     rotary_dim=rotary_dim, attn_implementation="eager", pad_token_id=0, eos_token_id=1,
                     bos_token_id=1, initializer_range=0.2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                     tie_word_embeddings=False)
    model = GPTJForCausalLM(cfg)
    _draw_norms(model)
    return _finish(model)


def make_phi3(n_layer: int = 2, d: int = 32, heads: int = 4, kv_heads: int = 2, mlp: int = 48,
              seed: int = 0) -> Phi3ForCausalLM:
    """A random Phi-3 (fused qkv_proj [q | k | v] with grouped-query attention, fused gate_up_proj, RMSNorm)."""
    torch.manual_seed(seed)
    cfg = Phi3Config(vocab_size=VOCAB_SIZE, hidden_size=d, num_hidden_layers=n_layer, num_attention_heads=heads,
                     num_key_value_heads=kv_heads, intermediate_size=mlp, max_position_embeddings=128,
                     original_max_position_embeddings=128, attn_implementation="eager", pad_token_id=0,
                     eos_token_id=1, bos_token_id=1, tie_word_embeddings=False, initializer_range=0.2,
                     resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0, sliding_window=None)
    model = Phi3ForCausalLM(cfg)
    _draw_norms(model)
    return _finish(model)


BUILDERS: dict[str, Callable[..., PreTrainedModel]] = {
    "llama": make_llama,
    "qwen2": make_qwen2,
    "neox": make_neox,
    "gpt2": make_gpt2,
    "opt": make_opt,
    "gptj": make_gptj,
    "phi3": make_phi3,
}


@torch.no_grad()
def sharpen(model: PreTrainedModel, factor: float) -> PreTrainedModel:
    """Scale every query and key projection by `factor` so attention patterns saturate."""
    mt = model.config.model_type
    if mt in ("llama", "qwen2"):
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj):
                proj.weight.mul_(factor)
                if proj.bias is not None:
                    proj.bias.mul_(factor)
    elif mt == "gpt_neox":
        for layer in model.gpt_neox.layers:
            att = layer.attention
            h, dh = att.config.num_attention_heads, att.head_size
            w = att.query_key_value.weight.view(h, 3, dh, -1)
            b = att.query_key_value.bias.view(h, 3, dh)
            w[:, :2].mul_(factor)
            b[:, :2].mul_(factor)
    elif mt in ("opt", "gptj"):
        layers = model.model.decoder.layers if mt == "opt" else model.transformer.h
        for layer in layers:
            att = layer.self_attn if mt == "opt" else layer.attn
            for proj in (att.q_proj, att.k_proj):
                proj.weight.mul_(factor)
                if proj.bias is not None:
                    proj.bias.mul_(factor)
    elif mt == "phi3":
        for layer in model.model.layers:
            cfg = model.config
            head = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
            qk = (cfg.num_attention_heads + cfg.num_key_value_heads) * head
            layer.self_attn.qkv_proj.weight[:qk].mul_(factor)  # [q | k | v] rows
    elif mt == "gpt2":
        for block in model.transformer.h:
            d = model.config.n_embd
            block.attn.c_attn.weight[:, : 2 * d].mul_(factor)  # Conv1D weight is [in, out]: q | k | v
            block.attn.c_attn.bias[: 2 * d].mul_(factor)
    else:
        raise ValueError(f"sharpen: unsupported model_type {mt!r}")
    return model


def save_model(model: PreTrainedModel, tok: PreTrainedTokenizerFast, folder: str | Path) -> Path:
    """Write a model folder (config, safetensors, tokenizer files) that from_pretrained can load."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _rmsnorm64(self, hidden_states: torch.Tensor) -> torch.Tensor:
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


def to_float64(model: PreTrainedModel) -> PreTrainedModel:
    """The model in float64 end to end (HF RMSNorm would otherwise round through float32)."""
    import types

    model = model.double()
    for mod in model.modules():
        if type(mod).__name__.endswith("RMSNorm"):
            mod.forward = types.MethodType(_rmsnorm64, mod)
    return model
