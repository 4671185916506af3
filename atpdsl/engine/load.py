"""Load a model for the engine: hub id, local folder or zoo name -> frozen, eager, eval nnsight model."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from atpdsl.arch import Arch, Geometry, arch_for_config, geometry
from atpdsl.errors import ModelError
from atpdsl.plan import ModelRef
from atpdsl.engine.data import where_text

__all__ = ["Loaded", "load_model", "wrap_model", "DTYPES"]

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


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
        """Attention and MLP of a layer read the same residual point (GPT-NeoX with use_parallel_residual, Pythia)."""
        return self.arch.name == "GPT-NeoX" and bool(self.config.get("use_parallel_residual", True))


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


def _hub_error(ref: ModelRef, err: Exception) -> ModelError:
    text = str(err)
    if _offline() or "couldn't connect" in text.lower() or "connection" in text.lower():
        why = "HF_HUB_OFFLINE is set" if _offline() else "the Hugging Face hub cannot be reached"
        return ModelError(
            f"{where_text(ref.where)}cannot load {ref.source!r} from the hub: {why} and it is not in the local "
            f"cache. Download it first (e.g. `huggingface-cli download {ref.source}`) and point `model` at the "
            f"local folder, e.g. model \"./models/{ref.source.split('/')[-1]}\""
        )
    return ModelError(f"{where_text(ref.where)}cannot load model {ref.source!r}: {text.splitlines()[0] if text else err!r}")


def _resolve_device(name: str) -> str:
    """`auto` picks the best accelerator present (cuda, then mps), else the CPU."""
    if name != "auto":
        return name
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def load_model(ref: ModelRef, *, trust_remote_code: bool | None = None) -> Loaded:
    """Load `ref` with eager attention, eval mode, frozen parameters (ModelError on any failure)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    trust = bool(ref.trust_remote_code if trust_remote_code is None else trust_remote_code)
    if ref.dtype not in DTYPES:
        raise ModelError(f"{where_text(ref.where)}unknown dtype {ref.dtype!r} (known: {', '.join(DTYPES)})")
    dtype = DTYPES[ref.dtype]
    try:
        device = torch.device(_resolve_device(ref.device))
    except (RuntimeError, ValueError):
        raise ModelError(f"{where_text(ref.where)}unknown device {ref.device!r} (e.g. cpu, cuda, cuda:1, mps)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"{where_text(ref.where)}device {ref.device!r} asked for, but CUDA is not available here")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ModelError(f"{where_text(ref.where)}device {ref.device!r} asked for, but MPS is not available here")
    location, local = _location(ref)
    kw: dict[str, Any] = {"trust_remote_code": trust}
    if ref.revision and not local:
        kw["revision"] = ref.revision
    try:
        config = AutoConfig.from_pretrained(location, **kw)
    except OSError as err:
        if local:
            raise ModelError(f"{where_text(ref.where)}cannot read the config of {location!r}: {err}") from None
        raise _hub_error(ref, err) from None
    except ValueError as err:
        text = str(err)
        if "trust_remote_code" in text:
            raise ModelError(
                f"{where_text(ref.where)}model {ref.source!r} needs custom code from its repository; atpdsl runs "
                f"it only with `atpdsl run --trust-remote-code` (read that code first)"
            ) from None
        raise ModelError(f"{where_text(ref.where)}cannot read the config of {ref.source!r}: {text}") from None
    cfg = config.to_dict()
    arch_for_config(cfg)  # unsupported architectures fail before any weights load
    from transformers.utils import logging as hf_logging

    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        hf = AutoModelForCausalLM.from_pretrained(location, dtype=dtype, attn_implementation="eager", **kw)
        tok = AutoTokenizer.from_pretrained(location, **kw)
    except OSError as err:
        if local:
            raise ModelError(f"{where_text(ref.where)}cannot load model files from {location!r}: {err}") from None
        raise _hub_error(ref, err) from None
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    return wrap_model(hf, tok, device=device, location=location, revision=ref.revision, config=cfg)


def wrap_model(hf, tokenizer, *, device: torch.device | str | None = None, location: str = "<in memory>",
               revision: str | None = None, config: dict[str, Any] | None = None) -> Loaded:
    """Prepare a transformers causal LM for the engine (also for tests and benchmarks on in-memory models).

    Forces eager attention (save_pretrained does not keep it and the QK fix reads the pattern), eval mode
    (no dropout) and frozen parameters (the engine makes the embedding output require grad instead).
    """
    import nnsight

    cfg = config if config is not None else hf.config.to_dict()
    arch = arch_for_config(cfg)
    geom = geometry(cfg)
    hf.set_attn_implementation("eager")
    hf.eval()
    hf.requires_grad_(False)
    if device is not None:
        hf.to(device)
    dev = next(hf.parameters()).device
    dtype = next(hf.parameters()).dtype
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    model = nnsight.TransformersModel(hf, tokenizer=tokenizer)
    return Loaded(model=model, hf=hf, tokenizer=tokenizer, config=cfg, arch=arch, geom=geom, device=dev,
                  dtype=dtype, location=location, revision=revision, pad_id=int(pad))
