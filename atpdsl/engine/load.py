"""Load a model for the engine: hub id, local folder or zoo name -> frozen, eager, eval nnsight model.

Every way a model folder can be broken (unreadable config, sizes of zero, missing, mis-shaped, truncated or
non-finite weights, pickles that would run code, custom code without the flag) ends in a ModelError naming
the file or tensor: a run never continues on weights transformers filled in at random.
"""
from __future__ import annotations

import json
import os
import pickle
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from atpdsl.arch import Arch, Geometry, arch_for_config, geometry
from atpdsl.errors import ModelError
from atpdsl.plan import ModelRef
from atpdsl.engine.data import where_text
from atpdsl.engine.remote import open_remote
from atpdsl.engine.placement import (
    attention_for, dispatched, input_device, load_options, named_weights, readable_weights,
)

__all__ = ["Loaded", "load_model", "wrap_model", "DTYPES", "check_config_sizes", "check_finite_weights"]

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}

SIZE_KEYS = ("num_attention_heads", "n_head", "num_heads", "num_key_value_heads", "num_hidden_layers", "n_layer",
             "num_layers", "hidden_size", "n_embd", "d_model", "intermediate_size", "n_inner", "head_dim",
             "vocab_size", "max_position_embeddings", "n_positions")
"""Config fields that count something: each must be a whole number >= 1 where present (null = the default)."""

_LOAD_ERRORS: tuple[type[BaseException], ...] = (OSError, ValueError, RuntimeError, EOFError, KeyError, TypeError,
                                                  ArithmeticError, pickle.UnpicklingError)
"""What transformers raises on a bad model file; anything else escaping it is treated as a bug of ours."""


@dataclass(slots=True)
class Loaded:
    """A loaded model with what the engine needs to drive it."""

    model: Any  # nnsight.TransformersModel
    hf: Any  # the transformers *ForCausalLM
    tokenizer: Any
    config: dict[str, Any]
    arch: Arch
    geom: Geometry
    device: torch.device
    dtype: torch.dtype
    location: str  # the folder or hub id actually loaded
    revision: str | None
    pad_id: int

    @property
    def parallel(self) -> bool:
        """Attention and MLP of a layer read the same residual point (the architecture record reads the config:
        GPT-NeoX's use_parallel_residual, GPT-J always, Llama never)."""
        return self.arch.is_parallel(self.config)


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0", "false", "False") or os.environ.get(
        "TRANSFORMERS_OFFLINE", "") not in ("", "0", "false", "False")


def _location(ref: ModelRef) -> tuple[str, bool]:
    """(folder or hub id, is_local)."""
    if ref.is_zoo:
        from atpdsl.zoo import available, zoo_path

        try:
            return str(zoo_path(ref.source)), True
        except KeyError:
            raise ModelError(
                f"{where_text(ref.where)}no zoo model named {ref.source!r} (available: {', '.join(available()) or 'none'})"
            ) from None
    path = Path(ref.source).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelError(f"{where_text(ref.where)}model folder {str(path)!r} has no config.json")
        return str(path), True
    if ref.source.startswith((".", "/", "~")) or os.sep in ref.source.strip("/").replace("/", "", 1):
        raise ModelError(f"{where_text(ref.where)}model folder {ref.source!r} does not exist")
    return ref.source, False


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _hub_error(ref: ModelRef, err: Exception) -> ModelError:
    """One line: the hub cannot be reached (or is switched off) and the model is not cached."""
    text = str(err).lower()
    if _offline() or "couldn't connect" in text or "connection" in text or "offline" in text:
        why = "HF_HUB_OFFLINE is set" if _offline() else "the Hugging Face hub cannot be reached"
        name = ref.source.split("/")[-1]
        return ModelError(
            f"{where_text(ref.where)}cannot load {ref.source!r} from the hub: {why} and it is not in the local "
            f"cache; download it first (`hf download {ref.source} --local-dir models/{name}`) and point "
            f"`model` at that local folder"
        )
    return ModelError(f"{where_text(ref.where)}cannot load model {ref.source!r}: {_first_line(err)}")


def _remote_code_error(ref: ModelRef, part: str) -> ModelError:
    return ModelError(
        f"{where_text(ref.where)}the {part} of model {ref.source!r} needs custom code from its repository; atpdsl "
        f"runs such code only with `atpdsl run --trust-remote-code` (read that code first)"
    )


def _resolve_device(name: str) -> str:
    """`auto` picks the best accelerator present (cuda, then mps), else the CPU."""
    if name != "auto":
        return name
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def _device(ref: ModelRef) -> torch.device:
    try:
        device = torch.device(_resolve_device(ref.device))
    except (RuntimeError, ValueError):
        raise ModelError(f"{where_text(ref.where)}unknown device {ref.device!r} (e.g. cpu, cuda, cuda:1, mps)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"{where_text(ref.where)}device {ref.device!r} asked for, but CUDA is not available here")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ModelError(f"{where_text(ref.where)}device {ref.device!r} asked for, but MPS is not available here")
    return device


def check_config_sizes(config: Mapping[str, Any], origin: str) -> None:
    """ModelError naming the first counting field (SIZE_KEYS) that is not a whole number >= 1."""
    for key in SIZE_KEYS:
        value = config.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ModelError(f"{origin}: `{key}` is {json.dumps(value)}; it must be a whole number of at least 1")


def _read_local_config(location: str, ref: ModelRef) -> None:
    """Check a local config.json before transformers reads it (it divides by some of these sizes)."""
    path = Path(location) / "config.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise ModelError(f"{where_text(ref.where)}{path} is not UTF-8 text (byte {err.start})") from None
    except json.JSONDecodeError as err:
        raise ModelError(f"{where_text(ref.where)}{path}:{err.lineno}:{err.colno}: not valid JSON: {err.msg}") from None
    except OSError as err:
        raise ModelError(f"{where_text(ref.where)}cannot read {path}: {err.strerror or err}") from None
    if not isinstance(data, dict):
        raise ModelError(f"{where_text(ref.where)}{path} must hold a JSON object")
    check_config_sizes(data, f"{where_text(ref.where)}{path}")


def _read_config(ref: ModelRef, location: str, local: bool, kw: dict[str, Any]) -> dict[str, Any]:
    from transformers import AutoConfig

    if local:
        _read_local_config(location, ref)
    try:
        config = AutoConfig.from_pretrained(location, **kw)
    except OSError as err:
        if local:
            raise ModelError(f"{where_text(ref.where)}cannot read the config of {location!r}: {_first_line(err)}") from None
        raise _hub_error(ref, err) from None
    except (ValueError, TypeError, KeyError, ArithmeticError) as err:
        if "trust_remote_code" in str(err):
            raise _remote_code_error(ref, "config") from None
        raise ModelError(f"{where_text(ref.where)}cannot read the config of {ref.source!r}: "
                         f"{type(err).__name__}: {_first_line(err)}") from None
    cfg = config.to_dict()
    check_config_sizes(cfg, f"{where_text(ref.where)}the config of {ref.source!r}")
    return cfg


def _weight_files(location: str) -> list[Path]:
    folder = Path(location)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".pt", ".pth"))


def _broken_safetensors(location: str) -> str | None:
    """The first safetensors file in the folder whose header does not describe the file, with the reason."""
    from safetensors import safe_open

    for path in _weight_files(location):
        if path.suffix != ".safetensors":
            continue
        try:
            with safe_open(str(path), framework="pt") as handle:
                handle.keys()
        except Exception as err:  # noqa: BLE001 - safetensors' error type is private; any failure names the file
            return f"{path}: {_first_line(err)}"
    return None


def _weights_error(ref: ModelRef, location: str, err: BaseException) -> ModelError:
    """A load failure, reworded to name the file and what to do (never suggesting to unpickle unsafely)."""
    where = where_text(ref.where)
    if isinstance(err, pickle.UnpicklingError) or "weights only load failed" in str(err).lower():
        pickles = [p.name for p in _weight_files(location) if p.suffix != ".safetensors"] or ["the weights"]
        return ModelError(f"{where}{', '.join(pickles)} in {location!r} is a pickle that needs code from inside the "
                          f"file to load; atpdsl reads only plain tensors from pickles and runs nothing from them: "
                          f"use a .safetensors copy of the weights")
    if "trust_remote_code" in str(err):
        return _remote_code_error(ref, "model class")
    broken = _broken_safetensors(location) if type(err).__name__ == "SafetensorError" else None
    if broken is not None:
        return ModelError(f"{where}model weights {broken} (truncated or not a safetensors file)")
    return ModelError(f"{where}cannot load the weights of {location!r}: {type(err).__name__}: {_first_line(err)}")


def _check_loading_info(ref: ModelRef, location: str, info: Mapping[str, Any]) -> None:
    """Refuse weights transformers would have initialised at random: missing or of the wrong shape."""
    where = where_text(ref.where)
    mismatched = sorted(info.get("mismatched_keys") or (), key=lambda item: str(item[0]))
    if mismatched:
        name, found, wanted = mismatched[0]
        more = f" (and {len(mismatched) - 1} more)" if len(mismatched) > 1 else ""
        raise ModelError(f"{where}weight {name} in {location!r} has shape {list(found)} but the config needs "
                         f"{list(wanted)}{more}")
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ModelError(f"{where}the checkpoint in {location!r} lacks {len(missing)} weight(s) the model needs: "
                         f"{shown} (transformers would fill them with random values)")
    errors = list(info.get("error_msgs") or ())
    if errors:
        raise ModelError(f"{where}cannot load the weights of {location!r}: {str(errors[0]).splitlines()[0]}")


def check_finite_weights(hf: Any, origin: str) -> None:
    """ModelError naming the first parameter that holds a NaN or an infinity (every result would be meaningless)."""
    for name, param in named_weights(hf):  # offloaded weights too, read one at a time (engine.placement)
        if param.is_floating_point() and not bool(torch.isfinite(param).all()):
            nans = int(torch.isnan(param).sum())
            infs = int(torch.isinf(param).sum())
            raise ModelError(f"{origin}weight {name} holds {nans} NaN and {infs} infinite value(s); a model with "
                             f"non-finite weights gives no meaningful attribution")


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' progress bars and load report while it loads: failures are reported as ModelErrors."""
    from transformers.utils import logging as hf_logging

    bar = hf_logging.is_progress_bar_enabled()
    verbosity = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bar:
            hf_logging.enable_progress_bar()


def _load_weights(ref: ModelRef, location: str, local: bool, kw: dict[str, Any], dtype: torch.dtype) -> Any:
    from transformers import AutoModelForCausalLM

    try:
        hf, info = AutoModelForCausalLM.from_pretrained(location, **load_options(ref, dtype),
                                                        output_loading_info=True, ignore_mismatched_sizes=True, **kw)
    except _LOAD_ERRORS as err:
        if isinstance(err, OSError) and not local:
            raise _hub_error(ref, err) from None
        raise _weights_error(ref, location, err) from None
    except Exception as err:  # noqa: BLE001 - safetensors' SafetensorError derives from Exception only
        if type(err).__name__ != "SafetensorError":
            raise
        raise _weights_error(ref, location, err) from None
    _check_loading_info(ref, location, info)
    check_finite_weights(hf, f"{where_text(ref.where)}model {ref.source!r}: ")
    return hf


def _load_tokenizer(ref: ModelRef, location: str, local: bool, kw: dict[str, Any]) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(location, **kw)
    except (OSError, ValueError, RuntimeError, KeyError, TypeError, EOFError) as err:
        if "trust_remote_code" in str(err):
            raise _remote_code_error(ref, "tokenizer") from None
        if isinstance(err, OSError) and not local:
            raise _hub_error(ref, err) from None
        raise ModelError(f"{where_text(ref.where)}cannot load the tokenizer of {location!r}: "
                         f"{type(err).__name__}: {_first_line(err)}") from None
    except Exception as err:  # noqa: BLE001 - the tokenizers library raises bare Exceptions on a broken tokenizer.json
        if type(err).__module__.split(".")[0] not in ("tokenizers", "builtins"):
            raise
        raise ModelError(f"{where_text(ref.where)}cannot load the tokenizer of {location!r}: {_first_line(err)}") from None


def load_model(ref: ModelRef, *, trust_remote_code: bool | None = None) -> Loaded:
    """Load `ref` with eager attention, eval mode, frozen parameters (ModelError on any failure)."""
    trust = bool(ref.trust_remote_code if trust_remote_code is None else trust_remote_code)
    if ref.remote:  # NDIF: config and tokenizer here, weights and every trace on the server (engine.remote)
        model, cfg = open_remote(ref)
        return wrap_model(model._module, model.tokenizer, location=ref.source, revision=ref.revision, config=cfg,
                          attention=attention_for(ref), nnsight_model=model)
    if ref.dtype not in DTYPES:
        raise ModelError(f"{where_text(ref.where)}unknown dtype {ref.dtype!r} (known: {', '.join(DTYPES)})")
    dtype = DTYPES[ref.dtype]
    device = _device(ref)
    location, local = _location(ref)
    kw: dict[str, Any] = {"trust_remote_code": trust}  # always a bool: None would make transformers prompt
    if ref.revision and not local:
        kw["revision"] = ref.revision
    cfg = _read_config(ref, location, local, kw)
    arch_for_config(cfg)  # unsupported architectures fail before any weights load
    with _quiet_transformers():
        hf = _load_weights(ref, location, local, kw, dtype)
        tok = _load_tokenizer(ref, location, local, kw)
    return wrap_model(hf, tok, device=None if dispatched(hf) else device, location=location, revision=ref.revision,
                      config=cfg, attention=attention_for(ref))


def wrap_model(hf, tokenizer, *, device: torch.device | str | None = None, location: str = "<in memory>",
               revision: str | None = None, config: dict[str, Any] | None = None, attention: str = "eager",
               nnsight_model: Any = None) -> Loaded:
    """Prepare a transformers causal LM for the engine (also for tests and benchmarks on in-memory models).

    Sets the attention implementation (eager unless told: save_pretrained does not keep it and the QK fix reads
    the pattern), eval mode (no dropout) and frozen parameters (the engine makes the embedding output require grad
    instead). A model accelerate placed over devices stays where it is; inputs go to its first device.
    """
    import nnsight

    cfg = config if config is not None else hf.config.to_dict()
    arch = arch_for_config(cfg)
    geom = geometry(cfg)
    hf.set_attn_implementation(attention)  # eager unless the plan reads no pattern (engine.placement)
    readable_weights(hf)  # accelerate's disk offload: weights read outside a forward are loaded on demand
    hf.eval()
    hf.requires_grad_(False)
    if device is not None:
        hf.to(device)
    dev = input_device(hf)
    dtype = next(hf.parameters()).dtype
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    model = nnsight_model if nnsight_model is not None else nnsight.TransformersModel(hf, tokenizer=tokenizer)
    return Loaded(model=model, hf=hf, tokenizer=tokenizer, config=cfg, arch=arch, geom=geom, device=dev,
                  dtype=dtype, location=location, revision=revision, pad_id=int(pad))
