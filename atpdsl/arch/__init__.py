"""Architectures: where each node kind lives in a model's module tree and what each model type supports.

Pure Python (no torch), so `atpdsl check` and `plan` read it without loading a model. One `Arch` record per
architecture, keyed by model_type (`known.py` holds the ones atpdsl ships; `register` adds others):

- `config.py`   sizes from a config dict (`Geometry`)
- `sites.py`    unit layouts in a site's last dimension (`LAYOUTS`), site templates, concrete sites
- `record.py`   the `Arch` record: sites, norms, rotary, residual layout (from the config), supported
                methods / corrections / features
- `known.py`    the shipped records (GPT-2, GPT-NeoX, Llama, Qwen2, Mistral, Gemma, Phi-3, OPT, GPT-J)
- `registry.py` model_type -> record
- `support.py`  `support_problems`: what the checker refuses for a config, with the reason

Queries, keys and values are read at the projection outputs (before rotary embeddings): the rotation is a
fixed linear map per position, so AtP estimates and exact patches are the same as at the post-rotary
vectors; the QK fix re-rotates with the record's `rotary`.
"""
from __future__ import annotations

from atpdsl.arch.config import (
    Geometry, geometry, head_dim, hidden_size, mlp_width, num_heads, num_kv_heads, num_layers,
)
from atpdsl.arch.record import CORRECTION_NAMES, FEATURE_NAMES, METHOD_NAMES, Arch, Rotary, load_object
from atpdsl.arch.registry import (
    ARCHS, all_archs, arch_for_config, register, registered, supported_model_types, unregister,
)
from atpdsl.arch.sites import LAYOUTS, STAGES, Layout, LayoutRule, Site, SiteTemplate
from atpdsl.arch.support import Unsupported, support_problems

__all__ = [
    "Arch", "ARCHS", "Rotary", "Geometry", "Layout", "LayoutRule", "LAYOUTS", "SiteTemplate", "Site", "STAGES",
    "METHOD_NAMES", "CORRECTION_NAMES", "FEATURE_NAMES", "Unsupported", "support_problems", "load_object",
    "register", "unregister", "registered", "all_archs", "arch_for_config", "supported_model_types",
    "geometry", "num_layers", "num_heads", "num_kv_heads", "head_dim", "hidden_size", "mlp_width",
]
