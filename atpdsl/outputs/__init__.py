"""Exports: every format as a record in `atpdsl.outputs.formats`, one module per format, atomic writes.

| extension | module | reader | what |
| --- | --- | --- | --- |
| .json | jsonio | jsonio.read_result -> (RunResult, graph) | everything: rebuilds every other export |
| .csv | csvio | csvio.read_csv -> Table | scores table (+ `-edges.csv`, `-pairs.csv`) |
| .graphml | graphml | graphml.read_graphml | circuit graph (valid GraphML 1.0) |
| .gexf | gexf | gexf.read_gexf | circuit graph, GEXF 1.3 with Gephi layout hints |
| .cyjs | cyjs | cyjs.read_cyjs | circuit graph for Cytoscape / cytoscape.js |
| .dot / .gv | dot | - | layered Graphviz drawing that fits a page |
| .png / .svg | plots | - | circuit diagram (+ `-heads`, `-neurons`) |
| .html / .htm | report | - | self-contained report |

`write_all` writes a run's exports with a manifest (atpdsl.outputs.manifest). Nothing inside this
package imports the package itself, only its modules, and nothing here imports `atpdsl.pipeline`.
Importing it is light: format modules (networkx, matplotlib) load when a format is written.
"""
from __future__ import annotations

from atpdsl.outputs.formats import EXPORT_FORMATS, ExportError, ExportFormat, format_of, lookup, register, unregister
from atpdsl.outputs.writer import ExportOutcome, default_path, write, write_all

__all__ = [
    "EXPORT_FORMATS",
    "ExportError",
    "ExportFormat",
    "ExportOutcome",
    "default_path",
    "format_of",
    "lookup",
    "register",
    "unregister",
    "write",
    "write_all",
]
