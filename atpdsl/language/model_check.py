"""Find the model a `model` statement names and read what `check` can know without its weights: config.json
(sizes, architecture, context length), whether weight files are there, and where its tokenizer file is."""
from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from atpdsl.errors import ModelError
from atpdsl.language import syntax as n
from atpdsl.language.diagnostics import Diagnostic, cap_list, did_you_mean, error, quote, warning
from atpdsl.language.files import FileProblem, path_problem, read_text

__all__ = ["ModelInfo", "resolve_model", "context_length", "WEIGHT_SUFFIXES", "CONTEXT_KEYS"]

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")  # what the loader looks for (engine/load.py)
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "n_ctx", "seq_length", "max_sequence_length")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json", "vocab.txt",
                    "spiece.model", "sentencepiece.bpe.model")


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """The model as resolved at check time; `config` and `geometry` only when config.json was readable.

    `tokenizer_file`: a tokenizer.json `check` can load without transformers (None: tokens are not checked).
    """

    source: str  # absolute folder, hub id, or zoo name
    is_zoo: bool
    folder: Path | None
    config: Mapping[str, Any] | None
    geometry: Any | None  # atpdsl.arch.Geometry
    arch: Any | None  # atpdsl.arch.Arch
    tokenizer_file: Path | None = None


def context_length(config: Mapping[str, Any] | None) -> int | None:
    """The longest input the model takes, from its config (None when it does not say)."""
    for key in CONTEXT_KEYS:
        value = (config or {}).get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _read_config(folder: Path, shown: str) -> tuple[dict | None, str | None]:
    path = folder / "config.json"
    if not path.exists():
        return None, f"no config.json in model folder {quote(shown)}"
    try:
        value = json.loads(read_text(path, "config.json of", quote(shown)))
    except FileProblem as e:
        return None, e.message
    except json.JSONDecodeError as e:
        return None, f"cannot read config.json of {quote(shown)}: {e}"
    if not isinstance(value, dict):
        return None, f"config.json of {quote(shown)} is not a JSON object"
    return value, None


def _hub_cached(repo: str, filename: str, revision: str | None) -> Path | None:
    """A file of a hub model already in the local cache, without any download."""
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo, filename, revision=revision)
        if isinstance(found, str) and os.path.isfile(found):
            return Path(found)
    except Exception:  # noqa: BLE001 - the cache is optional; any failure means "not known offline"
        return None
    return None


def _hub_config(repo: str, revision: str | None) -> dict | None:
    found = _hub_cached(repo, "config.json", revision)
    if found is None:
        return None
    try:
        value = json.loads(found.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _folder_problems(folder: Path, shown: str, span) -> tuple[Path | None, list[Diagnostic]]:
    """The folder's tokenizer.json (if any) and errors for what the loader would refuse: no weights, no tokenizer."""
    try:
        names = {p.name for p in folder.iterdir()}
    except OSError as e:
        return None, [error("E203", f"cannot list model folder {quote(shown)}: {e.strerror or e}", span)]
    diags = []
    if not any(name.endswith(WEIGHT_SUFFIXES) for name in names):
        diags.append(error("E205", f"model folder {quote(shown)} holds no weight files", span,
                           f"expected {cap_list(['*' + s for s in WEIGHT_SUFFIXES])} beside config.json"
                           " (save_pretrained writes them)"))
    if not names & set(_TOKENIZER_FILES):
        diags.append(error("E206", f"model folder {quote(shown)} holds no tokenizer", span,
                           "save the tokenizer beside the model: tokenizer.save_pretrained(folder)"))
    tokenizer = folder / "tokenizer.json"
    return (tokenizer if "tokenizer.json" in names else None), diags


_SIZE_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "num_attention_heads", "n_head", "num_heads",
              "num_key_value_heads", "n_kv_heads", "num_kv_heads", "hidden_size", "n_embd", "d_model", "head_dim",
              "intermediate_size", "n_inner", "ffn_dim", "vocab_size") + CONTEXT_KEYS


def _bad_sizes(config: Mapping[str, Any]) -> list[str]:
    """`key: value` for every size in the config that is not a positive integer (null means a default)."""
    bad = []
    for key in _SIZE_KEYS:
        value = config.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            bad.append(f"{key}: {json.dumps(value)[:40]}")
    return bad


def _arch_of(config: dict, span) -> tuple[Any, Any, list[Diagnostic]]:
    from atpdsl.arch import arch_for_config, geometry  # pure Python, no torch

    bad = _bad_sizes(config)
    if bad:
        return None, None, [error("E204", f"model config has unusable sizes: {', '.join(bad)}", span,
                                  "each must be a positive integer")]
    try:
        arch = arch_for_config(config)
        geom = geometry(config)
    except ModelError as e:
        return None, None, [error("E204", str(e), span)]
    except (TypeError, ValueError, ArithmeticError) as e:
        return None, None, [error("E204", f"model config has unusable sizes: {e}", span)]
    sizes = {"layers": geom.n_layers, "attention heads": geom.n_heads, "key/value heads": geom.n_kv_heads,
             "head width": geom.head_dim, "hidden size": geom.hidden, "MLP width": geom.mlp}
    bad = [f"{what} {value}" for what, value in sizes.items() if value <= 0]
    if not bad and geom.n_heads % geom.n_kv_heads:
        bad = [f"{geom.n_heads} attention heads in {geom.n_kv_heads} key/value groups"]
    if bad:
        return None, None, [error("E204", f"model config has unusable sizes: {', '.join(bad)}", span,
                                  "each must be a positive integer (heads a multiple of key/value heads)")]
    return arch, geom, []


def _zoo(written: str, span) -> tuple[Path | None, list[Diagnostic]]:
    from atpdsl.zoo import available, zoo_path

    names = available()
    if written in names:
        return zoo_path(written), []
    if not names:
        return None, [error("E202", f"unknown zoo model {quote(written)}", span, "this installation ships no zoo models")]
    guess = did_you_mean(written, names)
    return None, [error("E202", f"unknown zoo model {quote(written)}", span,
                        f"did you mean {quote(guess)}?" if guess and guess != written
                        else f"zoo models: {cap_list([quote(x) for x in names])}")]


def resolve_model(stmt: n.Model, base_dir: Path, revision: str | None = None
                  ) -> tuple[ModelInfo | None, list[Diagnostic]]:
    """Find the model a `model` statement names and read its config when it is on disk."""
    written = stmt.source.value
    span = stmt.source.span
    config: dict | None = None
    folder: Path | None = None
    tokenizer: Path | None = None
    diags: list[Diagnostic] = []
    problem: str | None = None
    if stmt.zoo:
        folder, diags = _zoo(written, span)
        if folder is None:
            return None, diags
        config, problem = _read_config(folder, f"zoo {written}")
        source = written
    else:
        if not written.strip():
            return None, [error("E201", "empty model name", span,
                                'give a hub id such as "EleutherAI/pythia-70m" or a local folder')]
        bad_path = path_problem(written)
        if bad_path is not None:
            return None, [error("E201", f"model path {bad_path}", span)]
        looks_local = written.startswith(("/", "./", "../", "~", ".\\", "..\\")) or written in (".", "..")
        path = base_dir / os.path.expanduser(written)
        if path.is_dir():
            folder = path.resolve()
            config, problem = _read_config(folder, written)
            source = str(folder)
        elif looks_local or path.exists() or not _HUB_ID.match(written):
            what = "is not a folder" if path.exists() else "not found"
            return None, [error("E201", f"model folder {what}: {quote(written)}", span,
                                f"paths are relative to the spec's folder ({base_dir})"
                                if not os.path.isabs(written) else "",
                                "a hub id looks like `org/name`" if not looks_local else "")]
        else:
            source = written
            config = _hub_config(written, revision)
            tokenizer = _hub_cached(written, "tokenizer.json", revision)
            first = written.split("/")[0]
            if "/" in written and (base_dir / first).is_dir():
                diags.append(warning("W201", f"no folder {quote(written)} here, so it is taken as a hub id", span,
                                     f"write {quote('./' + written)} for a local folder"))
    if problem is not None:
        return None, diags + [error("E203", problem, span, "a model folder holds config.json and the weights"
                                                          " (save_pretrained writes both)")]
    geom = arch = None
    if config is not None:
        arch, geom, found = _arch_of(config, span)
        if found:
            return None, diags + found
    if folder is not None:
        tokenizer, found = _folder_problems(folder, f"zoo {written}" if stmt.zoo else written, span)
        diags.extend(found)
    return ModelInfo(source, stmt.zoo, folder, config, geom, arch, tokenizer), diags
