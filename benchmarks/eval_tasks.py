"""The evaluation's tasks: prompt pairs, node sets and models (used by benchmarks/eval_methods.py).

- stories260K pronoun: the 20 pairs of ../shared/data/stories260K-pronoun.jsonl ("girl" vs "boy", answer " she"
  vs " he"), heads / queries / keys / neurons at every position (18,240 nodes on 20 pairs).
- SmolLM2 IOI: "When A and B went to the P, B gave a O to" -> " A" against " B"; the corrupt prompt names A as
  the giver, which flips the answer. All 270 heads and 30 MLP outputs, summed over positions.
- SmolLM2 induction: a list of common words, then the list again up to its last word -> that word, against the
  word the corrupt prompt has in its place in the first copy. Same 300 nodes.

The SmolLM2 pairs are built deterministically from the word lists below; a candidate is kept only when every
answer is one token and the model's clean logit difference is at least MIN_CLEAN_DIFF and the corrupt one at
most -MIN_CLEAN_DIFF (the behaviour is there to explain), checked with a plain forward before the evaluation.
"""
from __future__ import annotations

import itertools
import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
STORIES = SHARED / "models" / "stories260K"
PRONOUN = SHARED / "data" / "stories260K-pronoun.jsonl"
SMOLLM2 = ROOT.parent / "cache" / "smollm2"

MIN_CLEAN_DIFF = 1.0

NAMES = [
    "Mary", "John", "Tom", "James", "Dan", "Sarah", "Paul", "Anna", "Mark", "David", "Emma", "Peter", "Alice",
    "Bob", "Jack", "Lucy", "Sam", "Ben", "Max", "Tim", "Kate", "Lisa", "Amy", "Joe",
]
PLACES = ("store", "park", "school", "market", "beach", "library", "station", "garden")
OBJECTS = ("drink", "book", "ball", "gift", "letter", "bag", "key", "flower")
WORDS = [
    "apple", "river", "chair", "music", "window", "garden", "pencil", "tiger", "silver", "cloud", "bread",
    "doctor", "engine", "forest", "island", "jacket", "ladder", "mirror", "orange", "pocket", "rabbit", "summer",
    "ticket", "violin", "wallet", "yellow", "basket", "candle", "dragon", "feather",
]


@dataclass(frozen=True)
class TaskSpec:
    """One evaluation task: where the model is, its pairs (dicts with clean/corrupt/answer/wrong) and nodes."""

    name: str
    model: Path
    pairs: tuple[dict[str, str], ...]
    kinds: tuple[str, ...]
    per_position: bool
    about: str


def stories_pronoun(n_pairs: int) -> TaskSpec:
    rows = [json.loads(line) for line in PRONOUN.read_text().splitlines() if line.strip()][:n_pairs]
    return TaskSpec("stories260K pronoun", STORIES, tuple(rows), ("heads", "queries", "keys", "neurons"), True,
                    "5-layer Llama (GQA); per position")


def _ioi_candidates(seed: int = 0):
    rng = random.Random(seed)
    pairs = list(itertools.permutations(NAMES, 2))
    rng.shuffle(pairs)
    for i, (a, b) in enumerate(pairs):
        place, obj = PLACES[i % len(PLACES)], OBJECTS[(i // len(PLACES)) % len(OBJECTS)]
        stem = f"When {a} and {b} went to the {place}, "
        yield {"clean": stem + f"{b} gave a {obj} to", "corrupt": stem + f"{a} gave a {obj} to",
               "answer": f" {a}", "wrong": f" {b}"}


def _induction_candidates(seed: int = 0, length: int = 6):
    rng = random.Random(seed)
    while True:
        words = rng.sample(WORDS, length + 1)
        seq, other = words[:length], words[length]
        first = " ".join(seq)
        corrupt_first = " ".join(seq[:-1] + [other])
        second = " ".join(seq[:-1])
        yield {"clean": f"{first}. {second}", "corrupt": f"{corrupt_first}. {second}",
               "answer": f" {seq[-1]}", "wrong": f" {other}"}


def _single_token(tok, text: str) -> int | None:
    ids = tok(text, add_special_tokens=False)["input_ids"]
    return ids[0] if len(ids) == 1 else None


@torch.no_grad()
def _logit_diff(hf, tok, prompt: str, a: int, b: int) -> float:
    ids = torch.tensor([tok(prompt)["input_ids"]])
    last = hf(input_ids=ids, use_cache=False).logits[0, -1]
    return float(last[a] - last[b])


def select_pairs(hf, tok, candidates, n_pairs: int, max_tries: int = 400) -> tuple[dict[str, str], ...]:
    """The first `n_pairs` candidates with one-token answers, equal token lengths and a clear behaviour."""
    kept = []
    for pair in itertools.islice(candidates, max_tries):
        a, b = _single_token(tok, pair["answer"]), _single_token(tok, pair["wrong"])
        if a is None or b is None or len(tok(pair["clean"])["input_ids"]) != len(tok(pair["corrupt"])["input_ids"]):
            continue
        if _logit_diff(hf, tok, pair["clean"], a, b) < MIN_CLEAN_DIFF:
            continue
        if _logit_diff(hf, tok, pair["corrupt"], a, b) > -MIN_CLEAN_DIFF:
            continue
        kept.append(pair)
        if len(kept) == n_pairs:
            return tuple(kept)
    raise RuntimeError(f"only {len(kept)} of {n_pairs} pairs show the behaviour in {max_tries} candidates")


def smollm2_tasks(loaded, n_pairs: int) -> list[TaskSpec]:
    """The IOI and induction tasks on SmolLM2-135M (pairs checked on the loaded model)."""
    hf, tok = loaded.hf, loaded.tokenizer
    ioi = select_pairs(hf, tok, _ioi_candidates(), n_pairs)
    induction = select_pairs(hf, tok, _induction_candidates(), n_pairs)
    about = "30-layer Llama (SmolLM2-135M); summed over positions"
    return [TaskSpec("SmolLM2 IOI", SMOLLM2, ioi, ("heads", "mlp"), False, about),
            TaskSpec("SmolLM2 induction", SMOLLM2, induction, ("heads", "mlp"), False, about)]
