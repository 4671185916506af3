"""Remote execution on NDIF (the National Deep Inference Fabric, nnsight's hosted models): the same plan, with
every trace run on the server.

How: the engine reads and changes the model only through atpdsl.engine.trace, whose trace bodies are plain
nnsight and torch (module paths as data, `model.get(path)`, `.output`, `.grad`, `torch.where` patches). For a
remote model each trace is `model.trace(..., remote=True)` and takes the general path (the backward inside the
trace, since tensors come back from the server without their graph). nnsight ships the traced block and every
function it calls by value (cloudpickle); atpdsl is registered for by-value pickling, so nothing of atpdsl is
needed on the server. The attribution arithmetic runs here on the values the traces bring back.

`simulate(loaded)` marks a loaded model for nnsight's `remote="local"`: the same serialisation, deserialised with
every module that is not installed on a server hidden, then run here. tests/engine/test_remote.py checks that a
whole pipeline through it gives the local numbers.

Not remote (refused at check time, E207, atpdsl.language.checker_memory): GradDrop (its terms take vector-Jacobian products on the clean graph
kept between steps, which on NDIF stays on the server), and the norm fix and the edges (they read weights outside
a trace, and a remote model's weights are not here). A remote plan therefore computes no edges.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from atpdsl.errors import AtpError, ModelError
from atpdsl.plan import ModelRef
from atpdsl.engine.data import where_text
from atpdsl.engine.placement import set_remote

__all__ = ["RemoteRunError", "REMOTE_MARK", "simulate", "api_key", "check_ready", "open_remote", "remote_errors"]

REMOTE_MARK = "_atpdsl_remote"
"""Key set in a remote model's config dict: atpdsl.lowering.edges_allowed then plans no edges for it."""

class RemoteRunError(AtpError):
    """NDIF could not be used: no API key, the model is not served, the service cannot be reached, a timeout."""


def _register() -> None:
    """Ship atpdsl's functions by value with each request (the server has no atpdsl installed)."""
    from nnsight.ndif import register

    register("atpdsl")


def simulate(loaded: Any) -> Any:
    """Run every trace of this loaded model through nnsight's local simulation of the remote path."""
    _register()
    set_remote(loaded.model, "local")
    return loaded


def api_key() -> str | None:
    """The NDIF API key: NDIF_API_KEY, or the one `nnsight.login()` saved."""
    key = os.environ.get("NDIF_API_KEY")
    if key:
        return key
    try:
        from nnsight import CONFIG

        return CONFIG.API.APIKEY or None
    except (ImportError, AttributeError):
        return None


def check_ready(ref: ModelRef, *, served: Any = None) -> None:
    """RemoteRunError unless NDIF can run this model: a hub id (not a folder), an API key, and the model among
    the running deployments. `served(repo, revision) -> bool` defaults to nnsight.is_model_running."""
    where = where_text(ref.where)
    if ref.is_zoo or os.path.isdir(os.path.expanduser(ref.source)):
        raise RemoteRunError(f"{where}`remote on` needs a hub id, but {ref.source!r} is a local folder: NDIF runs the "
                             f"models it hosts (drop `remote on` to run it here)")
    if api_key() is None:
        raise RemoteRunError(f"{where}`remote on` needs an NDIF API key: set NDIF_API_KEY (get one at "
                             f"https://login.ndif.us) or run `python -c \"import nnsight; nnsight.login('KEY')\"`")
    if served is None:
        from nnsight import is_model_running as served
    try:
        running = served(ref.source, ref.revision or "main")
    except Exception as err:  # noqa: BLE001 - the hub or NDIF unreachable: any failure means "cannot check"
        raise RemoteRunError(f"{where}cannot reach NDIF to check that it serves {ref.source!r}: "
                             f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from None
    if not running:
        raise RemoteRunError(f"{where}NDIF does not serve {ref.source!r}"
                             f"{' at revision ' + ref.revision if ref.revision else ''} right now (or cannot be "
                             f"reached): see https://nnsight.net/status for the models it runs")


def open_remote(ref: ModelRef, *, served: Any = None) -> tuple[Any, dict]:
    """The remote model as nnsight names it (config and tokenizer from the hub or its cache; no weights here) and
    its config dict, marked REMOTE_MARK. Every trace of it runs on NDIF."""
    check_ready(ref, served=served)
    import nnsight

    from transformers import AutoTokenizer

    kw = {"revision": ref.revision} if ref.revision else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(ref.source, **kw)
        model = nnsight.TransformersModel(ref.source, task="text-generation", tokenizer=tokenizer, dispatch=False,
                                          **kw)
    except (OSError, ValueError) as err:
        raise ModelError(f"{where_text(ref.where)}cannot read the config and tokenizer of {ref.source!r} (needed "
                         f"here even for a remote run): {str(err).splitlines()[0]}") from None
    config = dict(model.config.to_dict(), **{REMOTE_MARK: True})
    _register()
    set_remote(model, True)
    return model, config


@contextmanager
def remote_errors(mode: bool | str) -> Iterator[None]:
    """NDIF's failures (the job failed, a timeout, no connection) as RemoteRunError; local traces untouched."""
    if not mode:
        yield
        return
    try:
        yield
    except AtpError:
        raise
    except Exception as err:  # noqa: BLE001 - nnsight, httpx and websocket raise many types; sorted by name below
        name = type(err).__name__
        text = str(err).splitlines()[0] if str(err) else name
        if "Timeout" in name or "timed out" in text.lower():
            raise RemoteRunError(f"NDIF did not answer in time ({name}): {text}; retry later, or lower `batch` so "
                                 f"that each request is smaller") from None
        if isinstance(err, ConnectionError) or name in ("ConnectError", "WebSocketException",
                                                        "WebSocketConnectionClosedException"):
            raise RemoteRunError(f"cannot reach NDIF or the Hugging Face hub it names models by ({name}): "
                                 f"{text}") from None
        if name == "RemoteError":
            raise RemoteRunError(f"the NDIF job failed: {text}") from None
        raise
