"""The induction task's vocabulary, its `<bos> A A` sequences, and the example prompt-pair files.

Pure Python (no torch), so the example data can be regenerated anywhere, bit for bit:
`python -m atpdsl.zoo.induction_data --out examples/data`.
"""
from __future__ import annotations

import argparse
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

__all__ = [
    "BOS",
    "BOS_WORD",
    "N_WORDS",
    "PAD",
    "PAD_WORD",
    "SPECIAL_WORDS",
    "UNK",
    "UNK_WORD",
    "Corruption",
    "InductionPair",
    "PAIR_FILES",
    "make_pairs",
    "random_sequence",
    "token_id",
    "vocab",
    "word",
    "write_pairs",
    "main",
]

PAD_WORD, UNK_WORD, BOS_WORD = "<pad>", "<unk>", "<bos>"
SPECIAL_WORDS = (PAD_WORD, UNK_WORD, BOS_WORD)
PAD, UNK, BOS = 0, 1, 2
N_WORDS = 64
"""Ordinary tokens t0..t63; their ids follow the three special tokens."""

Corruption = Literal["copy", "prev"]
"""`copy`: replace the first-copy token the model must copy (position p); the L1 induction heads
carry the effect. `prev`: replace the token before it (position p-1), which breaks the key match
that the L0 previous-token head builds."""

PAIR_FILES: dict[str, str] = {"copy": "induction-copy.jsonl", "prev": "induction-prev.jsonl"}


def word(index: int) -> str:
    """The word of ordinary token `index` (0..63): `t17`."""
    if not 0 <= index < N_WORDS:
        raise ValueError(f"token index {index} is outside 0..{N_WORDS - 1}")
    return f"t{index}"


def token_id(index: int) -> int:
    """The vocabulary id of ordinary token `index`."""
    word(index)  # range check
    return len(SPECIAL_WORDS) + index


def vocab() -> dict[str, int]:
    """The whole word-level vocabulary: specials first, then t0..t63."""
    table = {w: i for i, w in enumerate(SPECIAL_WORDS)}
    table.update({word(i): token_id(i) for i in range(N_WORDS)})
    return table


def random_sequence(rng: random.Random, n: int) -> list[int]:
    """n distinct ordinary token indices (0..63) drawn without replacement."""
    if not 1 <= n <= N_WORDS:
        raise ValueError(f"sequence length {n} is outside 1..{N_WORDS}")
    return rng.sample(range(N_WORDS), n)


@dataclass(frozen=True, slots=True)
class InductionPair:
    """One clean/corrupt prompt pair; texts carry no `<bos>` because the tokenizer prepends it."""

    clean: str
    corrupt: str
    answer: str
    wrong: str

    def as_json(self) -> dict[str, str]:
        """The JSON-lines record, in the field order users read."""
        return {"clean": self.clean, "corrupt": self.corrupt, "answer": self.answer, "wrong": self.wrong}


def make_pairs(corruption: Corruption, *, count: int = 32, n: int = 16, p: int = 6,
               seed: int = 0) -> list[InductionPair]:
    """Prompt pairs whose last position must predict x_p by induction.

    Token positions count `<bos>` as 0, so the first copy of A sits at 1..n and position p holds
    x_p = A[p-1]. The clean prompt is `A` followed by the second copy cut after x_{p-1}, so the last
    position shows x_{p-1} and the right continuation is x_p. The corrupt prompt replaces one first-copy
    token with y, a token not in A: x_p itself (`copy`) or x_{p-1} (`prev`). The metric
    logit(answer) - logit(wrong) = logit(x_p) - logit(y). Clean and corrupt have the same length in every
    pair, and every pair in a file has the same length (n + p tokens with `<bos>`).
    The same seed gives the same clean prompts for both corruptions.
    """
    if corruption not in PAIR_FILES:
        raise ValueError(f"unknown corruption {corruption!r}; expected one of {sorted(PAIR_FILES)}")
    if not 2 <= p <= n:
        raise ValueError(f"p={p} must lie in 2..n={n} (position p-1 must be a first-copy token)")
    if n >= N_WORDS:
        raise ValueError(f"n={n} leaves no token outside A; use n < {N_WORDS}")
    rng = random.Random(seed)
    pairs = []
    for _ in range(count):
        seq = random_sequence(rng, n)
        outside = sorted(set(range(N_WORDS)) - set(seq))
        y = rng.choice(outside)
        clean = seq + seq[: p - 1]
        corrupt = list(clean)
        corrupt[p - 1 if corruption == "copy" else p - 2] = y  # list index = position - 1
        pairs.append(InductionPair(
            clean=" ".join(word(t) for t in clean),
            corrupt=" ".join(word(t) for t in corrupt),
            answer=word(seq[p - 1]),
            wrong=word(y),
        ))
    return pairs


def write_pairs(out_dir: str | Path, *, count: int = 32, n: int = 16, p: int = 6,
                seed: int = 0) -> list[Path]:
    """Write one JSON-lines file per corruption into `out_dir`; returns the paths written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for corruption, name in PAIR_FILES.items():
        path = out / name
        lines = [json.dumps(pair.as_json()) for pair in make_pairs(corruption, count=count, n=n, p=p, seed=seed)]
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    """Command line: regenerate the example prompt-pair files."""
    parser = argparse.ArgumentParser(
        prog="python -m atpdsl.zoo.induction_data",
        description="Write the induction-2l prompt pairs (copy and prev corruptions) as JSON lines.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--out", default="examples/data", help="folder to write into")
    parser.add_argument("--count", type=int, default=32, help="pairs per file")
    parser.add_argument("--n", type=int, default=16, help="length of the repeated sequence A")
    parser.add_argument("--p", type=int, default=6, help="position of the token to predict (<bos> is 0)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        paths = write_pairs(args.out, count=args.count, n=args.n, p=args.p, seed=args.seed)
    except ValueError as exc:
        parser.error(str(exc))
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
