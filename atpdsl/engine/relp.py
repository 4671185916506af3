"""Relevance Patching (RelP): AtP with layer-wise relevance propagation coefficients in place of the gradient.

Jafari, Eberle, Khakzar and Nanda (2025), "RelP: Faithful and Efficient Circuit Discovery via Relevance
Patching" (arXiv:2508.21258). The estimate keeps AtP's form, (n(corrupt) - n(clean)) . c, and its cost (two
forwards, one backward), but the coefficient c is the "gradient" of a clean backward pass in which every
nonlinearity passes relevance by an LRP rule instead of its local derivative. The rules the paper applies
(each cited there to its origin):

- LN-rule (Ali et al. 2022), LayerNorm and RMSNorm: the normalising scale is a constant, so a norm acts as the
  linear map x -> gain * C x / sigma (+ bias), C the centring (LayerNorm) or the identity (RMSNorm).
- Identity rule (Jafari et al. 2024), element-wise activations f (GELU, SiLU): f(x) = x * (f(x) / x) with the
  ratio a constant; at an exact zero the ratio is taken as 0.
- Half rule (Jafari et al. 2024; Arras et al. 2019), products of two activations (SwiGLU's act(gate) * up):
  each factor receives half of the product's coefficient.
- AH-rule (Ali et al. 2022), attention: the softmax pattern is a constant, so heads are linear in their values;
  queries and keys then receive no coefficient (their RelP estimate is 0). Optional: the authors' published
  usage (their repository's README and IOI demo) applies the first three rules only, which is our default.
- Linear layers keep the plain gradient (LRP-0, which for a linear map is gradient times input).

How: `relp_context(loaded)` installs the rules on the Hugging Face model as forward hooks that keep every
forward value bit for bit and change only the graph the backward pass sees. A rule with surrogate s(x) returns
`out + (s(x) - s(x).detach())`, where the module ran on a graph-detached copy of its input: the value is `out`
(s - s.detach() is exactly 0), the gradient of the module's own output is untouched (so a node read at that
output, e.g. GPT-2's neurons at `mlp.act`, gets its coefficient as usual), and what flows on to the input is
s'(x)^T g, the rule's coefficient. The AH-rule is an attention function (registered with transformers'
AttentionInterface) that calls the model's own eager attention with detached queries and keys. Hooks act only
inside a forward of the whole model with gradients enabled, so corrupt runs and exact patching inside the
context are plain forwards, and a norm called on its own keeps its plain backward.

Wiring (for `method relp`): run the engine's ordinary AtP pass with the clean forward + backward inside the
context, e.g. `state.parts["gradient_rule"] = lambda: relp_context(loaded)` (atp.clean_forward_backward enters
it per batch), or `with relp_context(loaded): execute(plan with method atp)`; the per-pair estimates are then
RelP estimates. Corrupt runs, verification and the diagnostic may run inside or outside it: without gradients
the hooks do nothing and the AH-rule attention gives the same values as eager attention.
"""
from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from atpdsl.engine.load import Loaded
from atpdsl.errors import EngineError

__all__ = [
    "ALL_RULES",
    "PAPER_RULES",
    "RELP_ATTENTION",
    "SUPPORTED_ARCHS",
    "RelpRules",
    "check_relp_supported",
    "relp_context",
]

RELP_ATTENTION = "atpdsl_relp_constant_pattern"  # attention implementation name of the AH-rule


@dataclass(frozen=True, slots=True)
class RelpRules:
    """Which LRP rules replace the local gradient (a rule switched off keeps the plain gradient there)."""

    norm: bool = True  # LN-rule: LayerNorm / RMSNorm scale constant
    activation: bool = True  # identity rule: f(x) = x * (f(x)/x), ratio constant
    gate: bool = True  # half rule: each factor of act(gate) * up gets half the coefficient
    attention: bool = False  # AH-rule: softmax pattern constant (queries and keys get 0)

    def describe(self) -> str:
        names = [n for n, on in (("LN", self.norm), ("identity", self.activation), ("half", self.gate),
                                 ("AH", self.attention)) if on]
        return ", ".join(names) if names else "none (plain AtP)"


PAPER_RULES = RelpRules()
"""The rules of the authors' published usage: LN, identity and half rule."""
ALL_RULES = RelpRules(attention=True)
"""Every rule, the AH-rule included: the setting under which relevance is conserved (bias-free models)."""


@dataclass(frozen=True, slots=True)
class _MlpParts:
    """Module paths (with `{layer}`) of an architecture's MLP activation and, for gated MLPs, the linear factor."""

    act: str
    up: str | None = None


_LLAMA_MLP = _MlpParts(act="model.layers.{layer}.mlp.act_fn", up="model.layers.{layer}.mlp.up_proj")
SUPPORTED_ARCHS: dict[str, _MlpParts] = {
    "GPT-2": _MlpParts(act="transformer.h.{layer}.mlp.act"),
    "GPT-NeoX": _MlpParts(act="gpt_neox.layers.{layer}.mlp.act"),
    "Llama": _LLAMA_MLP,
    "Qwen2": _LLAMA_MLP,
    "Mistral": _LLAMA_MLP,
}
"""Architectures (atpdsl.arch names) RelP is implemented and tested for. Gemma is refused: its RMSNorm gain
is 1 + weight and its embeddings are scaled, which the LN-rule here and the reference test do not cover."""


def check_relp_supported(loaded: Loaded) -> None:
    """EngineError naming the architecture when RelP's rules are not implemented for it."""
    if loaded.arch.name not in SUPPORTED_ARCHS:
        raise EngineError(
            f"method relp is not implemented for {loaded.arch.name} models (model_type "
            f"{loaded.config.get('model_type')!r}); it supports {', '.join(SUPPORTED_ARCHS)}. "
            f"Use method atp or atp* for this model"
        )


# ------------------------------------------------------------------------------------------- surrogates
Surrogate = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


def _norm_surrogate(module: nn.Module, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """LN-rule: the norm with its scale 1/sigma held constant (bias dropped: it carries no gradient)."""
    h = x.float()
    if isinstance(module, nn.LayerNorm):
        h = h - h.mean(-1, keepdim=True)
        inv_sigma = torch.rsqrt(h.detach().pow(2).mean(-1, keepdim=True) + module.eps)
        y = (h * inv_sigma).to(x.dtype)
        return y * module.weight if module.weight is not None else y
    eps = getattr(module, "variance_epsilon", None)
    if eps is None:
        eps = module.eps
    inv_sigma = torch.rsqrt(h.detach().pow(2).mean(-1, keepdim=True) + eps)
    return module.weight * (h * inv_sigma).to(x.dtype)


def _check_norm(module: nn.Module, path: str) -> None:
    name = type(module).__name__
    if isinstance(module, nn.LayerNorm):
        return
    if name.endswith("RMSNorm") and "Gemma" not in name and hasattr(module, "weight") and (
            hasattr(module, "variance_epsilon") or hasattr(module, "eps")):
        return
    raise EngineError(f"method relp: no LN-rule for the norm {path!r} of class {name} (LayerNorm and "
                      f"Llama-style RMSNorm only)")


def _ratio(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """f(x) / x, and 0 at exact zeros (no coefficient passes a neuron whose input is exactly 0)."""
    zero = x == 0
    return torch.where(zero, torch.zeros_like(out), out / torch.where(zero, torch.ones_like(x), x))


def _activation_surrogate(scale: float) -> Surrogate:
    """Identity rule (times `scale`: 0.5 when the activation is a factor of a gated product)."""

    def surrogate(module: nn.Module, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return x * (_ratio(x.detach(), out) * scale)

    return surrogate


# ------------------------------------------------------------------------------------------------ hooks
class _WholeForward:
    """Rules act only inside a forward of the whole model with gradients on: a norm or activation module called
    on its own (e.g. an edge computation's closed-form check) keeps its plain backward."""

    def __init__(self) -> None:
        self.depth = 0

    @property
    def on(self) -> bool:
        return self.depth > 0 and torch.is_grad_enabled()

    def install(self, model: nn.Module) -> list[Any]:
        def enter(mod: nn.Module, args: tuple, kwargs: dict) -> None:
            self.depth += 1

        def leave(mod: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
            self.depth -= 1

        return [model.register_forward_pre_hook(enter, with_kwargs=True),
                model.register_forward_hook(leave, with_kwargs=True, always_call=True)]


def _install_surrogate(module: nn.Module, surrogate: Surrogate, path: str, inside: _WholeForward) -> list[Any]:
    """Run `module` on a graph-detached copy of its input and add the rule's surrogate term to its output.

    Value: `out` (bit for bit). Gradient: whatever arrives at `out` (a node read there keeps it), and from there
    only the surrogate's coefficient flows on to the input."""
    pending: list[tuple[torch.Tensor, torch.Tensor]] = []

    def pre(mod: nn.Module, args: tuple) -> tuple | None:
        if not inside.on:
            return None
        if not args or not isinstance(args[0], torch.Tensor):
            raise EngineError(f"method relp: {path} was called without a positional tensor input; its rule "
                              f"cannot be applied")
        x = args[0]
        if not x.requires_grad:
            return None
        leaf = x.detach().requires_grad_(True)
        pending.append((leaf, x))
        return (leaf, *args[1:])

    def post(mod: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor | None:
        if not pending or not args or pending[-1][0] is not args[0]:
            return None
        _, x = pending.pop()
        s = surrogate(mod, x, out.detach())
        return out + (s - s.detach())

    return [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]


def _install_scale(module: nn.Module, factor: float, inside: _WholeForward) -> list[Any]:
    """Scale the coefficient through `module` by `factor`: out * f + out.detach() * (1 - f), value unchanged."""

    def post(mod: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor | None:
        if not inside.on or not out.requires_grad:
            return None
        return out * factor + out.detach() * (1.0 - factor)

    return [module.register_forward_hook(post)]


def _install_rules(loaded: Loaded, rules: RelpRules, handles: list[Any]) -> None:
    """Every rule's hooks on the model's norms, activations and gate factors, appended to `handles` as they go
    (so that the caller removes all of them even when one fails)."""
    arch, hf, n_layers = loaded.arch, loaded.hf, loaded.geom.n_layers
    parts = SUPPORTED_ARCHS[arch.name]
    inside = _WholeForward()
    handles += inside.install(hf)
    seen: set[int] = set()

    def once(path: str) -> nn.Module | None:
        module = hf.get_submodule(path)
        if id(module) in seen:  # a module shared between layers is hooked once (its hook runs on every call)
            return None
        seen.add(id(module))
        return module

    if rules.norm:
        paths = [p.format(layer=i) for i in range(n_layers) for p in (arch.attn_norm, arch.mlp_norm)]
        for path in paths + [arch.final_norm]:
            module = once(path)
            if module is not None and not isinstance(module, nn.Identity):  # an identity "norm" is linear already
                _check_norm(module, path)
                handles += _install_surrogate(module, _norm_surrogate, path, inside)
    half = 0.5 if parts.up is not None and rules.gate else 1.0
    for i in range(n_layers):
        act = once(parts.act.format(layer=i))
        if act is not None and rules.activation:
            handles += _install_surrogate(act, _activation_surrogate(half), parts.act.format(layer=i), inside)
        elif act is not None and half != 1.0:
            handles += _install_scale(act, half, inside)
        if half != 1.0:
            up = once(parts.up.format(layer=i))
            if up is not None:
                handles += _install_scale(up, 0.5, inside)


# ------------------------------------------------------------------------------------------- attention
def _constant_pattern_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, Any]:
    """AH-rule: the model's own eager attention on detached queries and keys (same values, pattern constant)."""
    query, key = query.detach(), key.detach()
    if getattr(module, "reorder_and_upcast_attn", False):  # GPT-2's optional upcast path, as eager would take
        return module._upcast_and_reordered_attn(query, key, value, attention_mask)
    eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if eager is None:
        raise EngineError(f"method relp: no eager attention function for {type(module).__name__}")
    return eager(module, query, key, value, attention_mask, **kwargs)


def _register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(RELP_ATTENTION, _constant_pattern_attention)
    AttentionMaskInterface.register(RELP_ATTENTION, eager_mask)


# --------------------------------------------------------------------------------------------- context
@contextmanager
def relp_context(loaded: Loaded, rules: RelpRules = PAPER_RULES) -> Iterator[RelpRules]:
    """Install RelP's rules on `loaded.hf` for the duration of the block (EngineError if unsupported).

    Inside, any clean forward + backward of the whole model (the engine's AtP pass) yields RelP coefficients
    instead of gradients; forward values are unchanged. Not thread-safe: the model is modified in place until
    the block exits."""
    check_relp_supported(loaded)
    hf = loaded.hf
    previous = hf.config._attn_implementation
    handles: list[Any] = []
    switched = False
    try:
        _install_rules(loaded, rules, handles)
        if rules.attention:
            _register_attention()
            hf.set_attn_implementation(RELP_ATTENTION)
            switched = True
            if hf.config._attn_implementation != RELP_ATTENTION:
                raise EngineError(f"method relp: could not install the AH-rule attention on {type(hf).__name__}")
        yield rules
    finally:
        for handle in handles:
            handle.remove()
        if switched:
            hf.set_attn_implementation(previous)


relp_rules = relp_context
"""The name atpdsl/engine/run.py imports for `method relp` (state.parts["gradient_rule"])."""
