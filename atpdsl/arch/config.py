"""A model's sizes read from its config dict (a config.json): layers, heads, KV heads, widths.

Pure Python (no torch): `atpdsl check` and `plan` call it on a config file without loading a model.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from atpdsl.errors import ModelError

__all__ = ["Geometry", "geometry", "num_layers", "num_heads", "num_kv_heads", "head_dim", "hidden_size",
           "mlp_width"]


def _first(config: Mapping[str, Any], keys: Sequence[str]) -> Any:
    for key in keys:
        value = config.get(key)
        if value is not None:
            return value
    return None


def _need(config: Mapping[str, Any], keys: Sequence[str], what: str) -> int:
    value = _first(config, keys)
    if value is None:
        raise ModelError(
            f"model config has no {what} (looked for {', '.join(keys)}; model_type "
            f"{config.get('model_type')!r})"
        )
    return int(value)


def num_layers(config: Mapping[str, Any]) -> int:
    """Number of transformer layers."""
    return _need(config, ("num_hidden_layers", "n_layer", "num_layers"), "layer count")


def num_heads(config: Mapping[str, Any]) -> int:
    """Number of attention (query) heads."""
    return _need(config, ("num_attention_heads", "n_head", "num_heads"), "head count")


def num_kv_heads(config: Mapping[str, Any]) -> int:
    """Number of key/value heads (= query heads unless the model uses grouped-query attention)."""
    value = _first(config, ("num_key_value_heads", "n_kv_heads", "num_kv_heads"))
    return int(value) if value is not None else num_heads(config)


def hidden_size(config: Mapping[str, Any]) -> int:
    """Width of the residual stream."""
    return _need(config, ("hidden_size", "n_embd", "d_model"), "hidden size")


def head_dim(config: Mapping[str, Any]) -> int:
    """Per-head width; configs without `head_dim` (GPT-2, GPT-NeoX, Qwen2, OPT, GPT-J) use hidden // heads."""
    value = config.get("head_dim")
    return int(value) if value is not None else hidden_size(config) // num_heads(config)


def mlp_width(config: Mapping[str, Any]) -> int:
    """Number of MLP neurons per layer (GPT-2 and GPT-J store None for the default 4 * hidden; OPT: ffn_dim)."""
    value = _first(config, ("intermediate_size", "n_inner", "ffn_dim"))
    return int(value) if value is not None else 4 * hidden_size(config)


@dataclass(frozen=True, slots=True)
class Geometry:
    """The sizes the site layouts depend on, read once from a config."""

    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden: int
    mlp: int

    @property
    def group_size(self) -> int:
        """Query heads per KV head (1 without grouped-query attention)."""
        return self.n_heads // self.n_kv_heads

    @property
    def grouped(self) -> bool:
        """Whether keys and values belong to KV groups shared by several heads."""
        return self.n_kv_heads != self.n_heads


def geometry(config: Mapping[str, Any]) -> Geometry:
    """The Geometry of a config dict."""
    return Geometry(
        n_layers=num_layers(config),
        n_heads=num_heads(config),
        n_kv_heads=num_kv_heads(config),
        head_dim=head_dim(config),
        hidden=hidden_size(config),
        mlp=mlp_width(config),
    )
