"""The first batch's check that every site's tensor has the shape its architecture record promises.

A wrong record (a layout that does not fit the module, a module that flattens batch and positions but is not
listed as flat) would otherwise surface as a shape error deep inside the arithmetic, or not at all. The engine
calls `check_site_values` once per run on the values its first traces read, before any estimate is formed; it
raises an EngineError naming the site (module path, input or output), the expected and the actual shape.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from atpdsl.arch import Arch, Geometry
from atpdsl.errors import EngineError
from atpdsl.engine.node_table import NodeTable

__all__ = ["expected_shapes", "check_site_values", "check_trace"]


def _norm_modules(arch: Arch, n_layers: int) -> set[str]:
    out = {arch.final_norm} if arch.final_norm else set()
    for template in (arch.attn_norm, arch.mlp_norm):
        if template:
            out.update(template.format(layer=layer) for layer in range(n_layers))
    return out


def expected_shapes(arch: Arch, geom: Geometry, table: NodeTable, rows: int, positions: int
                    ) -> dict[str, tuple[tuple[int, ...], str]]:
    """Site key -> (expected shape, what it holds) for the table's node sites and the record's norm inputs and
    outputs (`{module}.input` / `{module}.output`, the keys the engine's extra sites use)."""
    out: dict[str, tuple[tuple[int, ...], str]] = {}
    for site in table.sites:
        templates = [arch.template(kind) for kind in site.kinds]
        widths = {t.tensor_width(geom) for t in templates}
        if len(widths) != 1:
            raise EngineError(f"the {arch.name} record puts {', '.join(site.kinds)} at {site.module} ({site.attr}) "
                              f"with layouts of different widths {sorted(widths)}: fix the record")
        layouts = ", ".join(t.layout for t in templates)
        out[site.name] = ((rows, positions, widths.pop()), f"{'/'.join(site.kinds)} nodes (layout {layouts})")
    for module in _norm_modules(arch, geom.n_layers):
        for attr in ("input", "output"):
            out[f"{module}.{attr}"] = ((rows, positions, geom.hidden), "a block norm (residual width)")
    return out


def _shape(shape: Sequence[int]) -> str:
    return "[" + ", ".join(str(int(x)) for x in shape) + "]"


def _hint(arch: Arch, module: str, want: tuple[int, ...], got: tuple[int, ...]) -> str:
    if len(got) == 2 and got[0] == want[0] * want[1] and len(want) == 3:
        flag = "is listed" if arch.is_flat(module) else "is not listed"
        return (f"the module sees batch and positions flattened into one dimension, and it {flag} in the record's "
                f"flat_modules")
    if len(got) == len(want) and tuple(got[:-1]) == tuple(want[:-1]):
        return (f"its last dimension is {got[-1]} wide where the record's layout, with this config's sizes, needs "
                f"{want[-1]}: the layout does not fit this module")
    return "the record's module path or input/output does not name this tensor"


def check_site_values(arch: Arch, geom: Geometry, table: NodeTable, values: Mapping[str, torch.Tensor],
                      rows: int, positions: int, *, run: str = "clean") -> None:
    """EngineError at the first value (in site order) whose shape differs from the record's promise; values
    without an expectation (patterns, rotary tables, ...) are not checked."""
    expected = expected_shapes(arch, geom, table, rows, positions)
    for key, value in values.items():
        if key not in expected or not isinstance(value, torch.Tensor):
            continue
        want, what = expected[key]
        got = tuple(value.shape)
        if got != want:
            module, _, attr = key.rpartition(".")
            raise EngineError(
                f"{arch.name} site {module} ({attr}) in the {run} run: expected a [batch, positions, width] tensor "
                f"{_shape(want)} for {what}, but the model gave {_shape(got)}; {_hint(arch, module, want, got)}. "
                f"The architecture record (atpdsl.arch) does not describe this model; the spec is not at fault"
            )


def check_trace(ctx: Any, out: Any, inputs: Mapping[str, torch.Tensor], run: str) -> None:
    """`check_site_values` for one trace of a run: `ctx` an engine Context, `out` the trace's TraceOut, `inputs`
    the batch inputs it ran on (their input_ids give batch and positions)."""
    rows, positions = inputs["input_ids"].shape
    loaded = ctx.loaded
    check_site_values(loaded.arch, loaded.geom, ctx.table, out.acts, int(rows), int(positions), run=run)
