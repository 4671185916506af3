"""Model sizes for the memory plan (no torch): parameters, and what autograd keeps per token for the backward.

The per-architecture factors (SAVED) were counted with `torch.autograd.graph.saved_tensors_hooks` on every
architecture atpdsl ships, with frozen parameters and the embedding output requiring grad as the engine runs
it; tests/engine/test_memory_saved.py checks the formula against that count for float32 and bfloat16, eager and
sdpa attention.
"""
from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["ELEMENT_BYTES", "SavedProfile", "SAVED", "GATED", "ModelSizes", "model_sizes", "saved_per_token",
           "forward_transient_per_token", "parse_size", "format_bytes"]

ELEMENT_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}

@dataclass(frozen=True, slots=True)
class SavedProfile:
    """What autograd keeps per token and layer with frozen parameters, in units of the model's widths.

    `mlp`: MLP tensors of the MLP width (SwiGLU keeps gate, up and their activation: 3; GPT-2's tanh GELU 4);
    `norms`: norm inputs of width d per layer; `norm_fp32`: the norm keeps float32 copies (RMSNorm upcasts);
    `softmax_fp32`: eager attention keeps a float32 pattern beside the model-dtype one; `sdpa_q`/`sdpa_kv`:
    tensors of query width (heads x head_dim) and key/value width kept by fused attention (Phi-3's fused qkv
    output stays alive through its k and v views).
    """

    mlp: float
    norms: int
    norm_fp32: bool
    softmax_fp32: bool
    sdpa_q: int
    sdpa_kv: int
    qk_fp32: bool = False  # eager attention multiplies float32 copies of q and k (GPT-J)


_LLAMA = SavedProfile(3, 2, True, True, 2, 2)
SAVED: dict[str, SavedProfile] = {
    "GPT-2": SavedProfile(4, 2, False, False, 4, 0),
    "GPT-NeoX": SavedProfile(1, 1, False, True, 6, 0),  # sequential residual: 2 norms (model_sizes)
    "Llama": _LLAMA, "Qwen2": _LLAMA, "Mistral": _LLAMA, "Gemma": _LLAMA,
    "Phi-3": SavedProfile(3, 2, True, True, 2, 5),
    "OPT": SavedProfile(1, 2, False, True, 4, 0),
    "GPT-J": SavedProfile(4, 1, False, True, 4, 0, qk_fp32=True),
}
_TIED_DEFAULT = {"GPT-2": True, "Gemma": True, "OPT": True}
GATED = {"Llama", "Qwen2", "Mistral", "Gemma", "Phi-3"}
_LEARNED_POSITIONS = {"GPT-2", "OPT"}


@dataclass(frozen=True, slots=True)
class ModelSizes:
    """The sizes memory depends on, read from a config."""

    arch: str
    n_layers: int
    hidden: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    mlp: int
    vocab: int
    params: int
    profile: SavedProfile
    known: bool  # the architecture's SAVED profile was measured (else Llama's is assumed)


def model_sizes(config: Mapping, arch_name: str, parallel: bool = False) -> ModelSizes:
    """ModelSizes of a config (atpdsl.arch reads the widths; the parameter count follows the architecture)."""
    from atpdsl.arch import geometry

    g = geometry(config)
    vocab = int(config.get("vocab_size") or 50257)
    d, q, kv = g.hidden, g.n_heads * g.head_dim, g.n_kv_heads * g.head_dim
    per_layer = d * q + 2 * d * kv + q * d + (3 if arch_name in GATED else 2) * d * g.mlp + 4 * d
    params = g.n_layers * per_layer + vocab * d + 2 * d
    tied = config.get("tie_word_embeddings", _TIED_DEFAULT.get(arch_name, False))
    if not tied:
        params += vocab * d
    if arch_name in _LEARNED_POSITIONS:
        params += int(config.get("max_position_embeddings") or config.get("n_positions") or 0) * d
    profile = SAVED.get(arch_name, _LLAMA)
    if arch_name == "GPT-NeoX" and not parallel:
        profile = SavedProfile(profile.mlp, 2, profile.norm_fp32, profile.softmax_fp32, profile.sdpa_q, 0)
    return ModelSizes(arch_name, g.n_layers, d, g.n_heads, g.n_kv_heads, g.head_dim, g.mlp, vocab, params,
                      profile, arch_name in SAVED)


def saved_per_token(m: ModelSizes, dtype: str, attention: str, seq: int) -> float:
    """Bytes autograd keeps per token for the backward, all layers (see SavedProfile)."""
    e = ELEMENT_BYTES.get(dtype, 4)
    p = m.profile
    norm_e = 4 if p.norm_fp32 and e < 4 else e
    q, kv = m.n_heads * m.head_dim, m.n_kv_heads * m.head_dim
    if attention == "eager":
        attn = 3 * q * e + m.n_heads * seq * (e + (4 if p.softmax_fp32 and e != 4 else 0))
        attn += 2 * q * (4 - e) if p.qk_fp32 and e < 4 else 0
    else:
        attn = (p.sdpa_q * q + p.sdpa_kv * kv) * e + m.n_heads * 4
    layer = p.mlp * m.mlp * e + p.norms * m.hidden * norm_e + attn
    return m.n_layers * layer + m.hidden * norm_e


def forward_transient_per_token(m: ModelSizes, dtype: str, attention: str, seq: int) -> float:
    """Bytes per token one layer needs while it runs without a graph (its widest intermediate tensors)."""
    e = ELEMENT_BYTES.get(dtype, 4)
    pattern = 2 * m.n_heads * seq * max(e, 4) if attention == "eager" else 0
    return pattern + 3 * m.mlp * e + 6 * m.hidden * e


_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
_UNITS = {"": 10**9, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
          "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


def parse_size(text: str | int | float) -> int:
    """Bytes of a size such as `80GB`, `24 GiB`, `512MB` or a bare number of gigabytes; ValueError otherwise."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        if not math.isfinite(text) or text <= 0:
            raise ValueError(f"a memory size must be positive, got {text!r}")
        return int(text * 10**9)
    found = _SIZE.match(str(text))
    if not found:
        raise ValueError(f"not a memory size: {text!r} (e.g. \"80GB\", \"24GiB\", \"512MB\")")
    unit = (found.group(2) or "").lower().rstrip("b")
    value = float(found.group(1)) * _UNITS[unit]
    if value < 1:
        raise ValueError(f"a memory size must be positive, got {text!r}")
    return int(value)


def format_bytes(n: float) -> str:
    """`1.23 GB`, `456 MB`, `7.8 kB` (powers of 1000, as devices are sold)."""
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g} {unit}"
    return f"{int(n)} B"
