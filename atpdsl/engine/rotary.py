"""Rotary position embeddings for the QK fix: the functions an architecture record's `Rotary.rotate` names.

Each factory takes (hf model, Arch, config dict) and returns `rotate(q, k, table0, table1) -> (q, k)` for q / k
as [batch, heads, positions, head_dim] and the rotary module's two outputs in the order it returns them. The
rotation itself is always the model's own `apply_rotary_pos_emb` (found beside its attention class), so the
QK fix rotates exactly as the model does.
"""
from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from typing import Any

import torch

from atpdsl.arch import Arch, load_object
from atpdsl.errors import EngineError

__all__ = ["Rotate", "rotary_function", "beside_attention", "gptj"]

Rotate = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def _model_function(hf: Any, arch: Arch) -> Callable[..., Any]:
    """`apply_rotary_pos_emb` from the module that defines the model's attention class."""
    attention = hf.get_submodule(arch.template("heads").path(0).rsplit(".", 1)[0])
    fn = getattr(sys.modules.get(type(attention).__module__), "apply_rotary_pos_emb", None)
    if fn is None:
        raise EngineError(f"QK fix: cannot find apply_rotary_pos_emb beside {type(attention).__name__}; "
                          f"use `qk_fix off`")
    return fn


def beside_attention(hf: Any, arch: Arch, config: Mapping[str, Any]) -> Rotate:
    """Llama, GPT-NeoX, Phi-3, ...: the rotary module returns (cos, sin) and the model's function rotates q and k
    together (partial rotary included)."""
    fn = _model_function(hf, arch)

    def rotate(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        return fn(q, k, cos, sin)

    return rotate


def gptj(hf: Any, arch: Arch, config: Mapping[str, Any]) -> Rotate:
    """GPT-J: the rotary module returns (sin, cos); the model's function rotates one [batch, positions, heads, dims]
    tensor, and only its first `rotary_dim` dims (all of them when rotary_dim is unset)."""
    fn = _model_function(hf, arch)
    dims = config.get("rotary_dim")

    def one(x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
        x = x.transpose(1, 2)  # [B, S, H, dh], the model's layout when it rotates
        cut = x.shape[-1] if dims is None else int(dims)
        out = torch.cat([fn(x[..., :cut], sin, cos), x[..., cut:]], dim=-1)
        return out.transpose(1, 2)

    def rotate(q: torch.Tensor, k: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor):
        return one(q, sin, cos), one(k, sin, cos)

    return rotate


def rotary_function(loaded: Any) -> Rotate | None:
    """The QK fix's rotation for a loaded model (`engine.load.Loaded`), None when its record has no rotary."""
    rotary = loaded.arch.rotary
    if rotary is None:
        return None
    factory = load_object(rotary.rotate)
    return factory(loaded.hf, loaded.arch, loaded.config)
