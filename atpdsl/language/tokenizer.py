"""The model's tokenizer for `check`, from its tokenizer.json alone: the `tokenizers` library (Rust, ~60 ms to
import) instead of transformers (seconds, and torch with it). It tokenizes exactly as the fast tokenizer a run
loads (tests/language/test_tokens.py compares them on the project's models), so `check` sees the run's tokens."""
from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from pathlib import Path

from atpdsl.language.files import FileProblem, read_text

__all__ = ["FileTokenizer", "load_file_tokenizer"]


class FileTokenizer:
    """A tokenizers.Tokenizer behind the encoding protocol (atpdsl.language.encoding.TokenizerLike)."""

    def __init__(self, tokenizer, path: Path) -> None:
        self.tokenizer = tokenizer
        self.path = path
        self.unk_id = self._unk_id()

    def _unk_id(self) -> int | None:
        """The unknown token: the tokenizer model's, else tokenizer_config.json's (as transformers reads it)."""
        unk = getattr(self.tokenizer.model, "unk_token", None)
        if not unk:
            unk = _config_unk(self.path.parent / "tokenizer_config.json")
        return self.tokenizer.token_to_id(unk) if unk else None

    @property
    def vocab_size(self) -> int:
        """Ids in the vocabulary, added tokens included."""
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, texts: Sequence[str], special: bool) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(list(texts), add_special_tokens=special)]

    def offsets(self, texts: Sequence[str]) -> list[list[tuple[int, int]]]:
        return [list(e.offsets) for e in self.tokenizer.encode_batch(list(texts), add_special_tokens=True)]

    def pieces(self, ids: Sequence[int]) -> list[str]:
        return [self.tokenizer.id_to_token(i) or "" for i in ids]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)


def _config_unk(path: Path) -> str | None:
    if not path.exists():
        return None
    try:
        value = json.loads(read_text(path, "tokenizer_config.json")).get("unk_token")
    except (FileProblem, ValueError, AttributeError):
        return None
    if isinstance(value, dict):  # {"content": "<unk>", ...}
        value = value.get("content")
    return value if isinstance(value, str) else None


@functools.lru_cache(maxsize=8)
def _load(path: str, mtime: float) -> FileTokenizer:
    from tokenizers import Tokenizer

    text = read_text(Path(path), "tokenizer file")  # a regular file only: never blocks on a FIFO
    return FileTokenizer(Tokenizer.from_str(text), Path(path))


def load_file_tokenizer(path: Path) -> FileTokenizer:
    """The tokenizer in a tokenizer.json (cached per file and modification time). Raises FileProblem, or the
    library's own Exception for a file it cannot parse."""
    return _load(str(path), path.stat().st_mtime)
