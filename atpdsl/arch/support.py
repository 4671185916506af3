"""What an architecture cannot do with a given config: the checker's refusals, in plain words.

Pure Python (no torch): `atpdsl check` calls `support_problems` with the model's config.json so that an
unsupported combination is refused before any model loads, instead of failing (or, worse, computing
something wrong) at run time.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from atpdsl.arch.record import Arch

__all__ = ["Unsupported", "support_problems"]


@dataclass(frozen=True, slots=True)
class Unsupported:
    """One refused part of a request: `subject` is the method, node kind, correction or feature named."""

    subject: str
    message: str
    hint: str = ""

    def __str__(self) -> str:
        return self.message


def _listed(names: Iterable[str]) -> str:
    names = list(names)
    return ", ".join(f"`{n}`" for n in names) if names else "none"


def _post_norm(arch: Arch, config: Mapping[str, Any]) -> str:
    if arch.is_pre_norm(config):
        return ""
    return (f"this {arch.name} config normalises after the residual add ({arch.pre_norm_key} is false), and "
            f"{{what}} needs pre-norm blocks")


def _correction_reason(arch: Arch, config: Mapping[str, Any], name: str, graddrop_mode: str) -> str:
    """Why a declared correction still cannot run with this config ("" when it can)."""
    if name in ("graddrop", "norm_fix"):
        post = _post_norm(arch, config)
        if post:
            return post.format(what="GradDrop's cut of a block write" if name == "graddrop" else "the norm fix")
    if name == "graddrop" and graddrop_mode == "sublayer" and not arch.is_parallel(config) and not arch.mlp_norm:
        return "GradDrop per sublayer reads the residual stream at the MLP's input norm, which the record does not name"
    if name == "norm_fix":
        if not (arch.attn_norm and arch.mlp_norm and arch.final_norm):
            return "the norm fix needs the block input norms and the final norm, which the record does not all name"
        if arch.shared_block_norm:
            return "attention and MLP read one shared norm: the norm fix's per-block norm terms would count it twice"
    return ""


def _feature_reason(arch: Arch, config: Mapping[str, Any], name: str) -> str:
    if name == "edges":
        post = _post_norm(arch, config)
        if post:
            return post.format(what="edge attribution through block input norms")
        if not (arch.attn_norm and arch.mlp_norm):
            return "edge attribution reads the block input norms, which the record does not name"
        if arch.shared_block_norm:
            return "attention and MLP read one shared norm, so their inputs cannot be told apart"
        if "qk_fix" not in arch.corrections:
            return ("per-head edges read the attention pattern (the attention module's second output), which the "
                    "record does not declare (a record that does lists the `qk_fix` correction)")
    return ""


def support_problems(arch: Arch, config: Mapping[str, Any], method: str, kinds: Iterable[str] = (), *,
                     corrections: Iterable[str] = (), graddrop_mode: str = "layer",
                     features: Iterable[str] = ()) -> list[Unsupported]:
    """Every part of (method, node kinds, AtP* corrections switched on, pipeline features) that `arch` with this
    config cannot run; empty when all of it can. Unknown names are the checker's to report, not refused here."""
    out: list[Unsupported] = []
    if method not in arch.methods:
        why = arch.reason(method)
        out.append(Unsupported(method, f"{arch.name} models do not support `method {method}`"
                               + (f": {why}" if why else ""), f"methods for {arch.name}: {_listed(arch.methods)}"))
    for kind in dict.fromkeys(kinds):
        if kind not in arch.kinds:
            out.append(Unsupported(kind, f"{arch.name} models have no `{kind}` nodes",
                                   f"this architecture has {_listed(arch.kinds)}"))
    if method == "atp*":
        for name in dict.fromkeys(corrections):
            why = arch.reason(name) if name not in arch.corrections else _correction_reason(arch, config, name,
                                                                                          graddrop_mode)
            if name not in arch.corrections or why:
                message = f"{arch.name} models do not support `{name}`" + (f": {why}" if why else "")
                out.append(Unsupported(name, message, f"turn it off: `{name} off`"))
    for name in dict.fromkeys(features):
        why = arch.reason(name) if name not in arch.features else _feature_reason(arch, config, name)
        if name not in arch.features or why:
            out.append(Unsupported(name, f"{arch.name} models do not support {name}" + (f": {why}" if why else "")))
    return out
