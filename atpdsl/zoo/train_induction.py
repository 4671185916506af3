"""Train the shipped `induction-2l` model: a 2-layer GPT-NeoX that learns to copy `<bos> A A`.

`python -m atpdsl.zoo.train_induction --out DIR` trains on one CPU thread (about a minute), prints the
circuit checks and head-patching numbers, and writes a folder that AutoModelForCausalLM and
AutoTokenizer load offline. Users never need this: the weights ship in atpdsl/zoo/induction-2l/.
It exists so the model is reproducible (same machine type and versions: same bits) and its circuit is
known in advance: a layer-0 previous-token head feeding layer-1 induction heads.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from atpdsl.zoo.induction_data import (
    BOS, BOS_WORD, N_WORDS, PAD, PAD_WORD, SPECIAL_WORDS, UNK_WORD, make_pairs, random_sequence,
    token_id, vocab,
)
from atpdsl.zoo.induction_eval import CopyEval, HeadEffects, encode_pairs, evaluate_copying, head_effects

__all__ = ["TrainConfig", "build_model", "build_tokenizer", "patching_report", "save_model", "sha256", "train", "main"]

MODEL_NAME = "induction-2l"
RETRAIN_COMMAND = "python -m atpdsl.zoo.train_induction --out atpdsl/zoo/induction-2l"


@dataclass(frozen=True, slots=True)
class TrainConfig:
    """Model shape and training recipe. The defaults are the shipped model's.

    Seed 6 was picked among seeds 1..6 (1000 steps each) for the cleanest circuit: one sharp
    previous-token head, both induction heads carrying the copy effect, layer 0 silent under the copy
    corruption. Choices that matter (see the induction-model notes): |A| varies per sequence, or one head learns a
    fixed positional offset instead of induction; head_dim 32 keeps 8 rotary dimensions under Pythia's
    rotary fraction 0.25; the loss covers both copies, so the first copy stays at chance level.
    """

    seed: int = 6
    steps: int = 1000
    batch: int = 64
    n_min: int = 8
    n_max: int = 20
    hidden: int = 64
    heads: int = 2
    mlp: int = 256
    rotary_fraction: float = 0.25
    parallel_residual: bool = True
    lr: float = 3e-3
    betas: tuple[float, float] = (0.9, 0.98)
    weight_decay: float = 0.01
    warmup: int = 100
    grad_clip: float = 1.0

    @property
    def max_positions(self) -> int:
        """Room for the longest training sequence plus a few extra positions."""
        return 2 * self.n_max + 1 + 8


def build_tokenizer() -> Any:
    """Word-level tokenizer over `<pad> <unk> <bos> t0..t63`; splits on whitespace, prepends `<bos>`."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel(vocab=vocab(), unk_token=UNK_WORD))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS_WORD} $A", pair=f"{BOS_WORD} $A $B", special_tokens=[(BOS_WORD, BOS)])
    # No decoder: the tokenizers library joins word-level tokens with single spaces, which is the text.
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token=BOS_WORD, pad_token=PAD_WORD,
                                   unk_token=UNK_WORD, model_max_length=512)


def build_model(config: TrainConfig) -> torch.nn.Module:
    """A freshly initialised GPT-NeoX (Pythia layout) with eager attention; seed torch first."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    model_config = GPTNeoXConfig(
        vocab_size=len(SPECIAL_WORDS) + N_WORDS,
        hidden_size=config.hidden,
        num_hidden_layers=2,
        num_attention_heads=config.heads,
        intermediate_size=config.mlp,
        hidden_act="gelu",
        max_position_embeddings=config.max_positions,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                         "partial_rotary_factor": config.rotary_fraction},
        use_parallel_residual=config.parallel_residual,
        attention_dropout=0.0,
        hidden_dropout=0.0,
        tie_word_embeddings=False,
        bos_token_id=BOS,
        eos_token_id=None,
        pad_token_id=PAD,
        attn_implementation="eager",
    )
    return GPTNeoXForCausalLM(model_config)


def _batch(rng: random.Random, config: TrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequences `<bos> A A` with |A| ~ U{n_min..n_max}, right-padded; labels -100 past the end."""
    length = 1 + 2 * config.n_max
    ids = torch.full((config.batch, length), PAD, dtype=torch.long)
    labels = torch.full((config.batch, length - 1), -100, dtype=torch.long)
    for row in range(config.batch):
        seq = [token_id(t) for t in random_sequence(rng, rng.randint(config.n_min, config.n_max))]
        tokens = torch.tensor([BOS, *seq, *seq])
        ids[row, :len(tokens)] = tokens
        labels[row, :len(tokens) - 1] = tokens[1:]
    return ids, labels


def _lr_factor(step: int, config: TrainConfig) -> float:
    """Linear warmup, then cosine decay to zero at the last step."""
    if step < config.warmup:
        return (step + 1) / config.warmup
    progress = (step - config.warmup) / max(1, config.steps - config.warmup)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


@contextmanager
def _deterministic_cpu() -> Iterator[None]:
    """One thread and deterministic kernels: the thread count changes the trained bits."""
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(deterministic)
        torch.set_num_threads(threads)


def train(config: TrainConfig = TrainConfig(), *, log: Callable[[str], None] | None = print,
          log_every: int = 250) -> torch.nn.Module:
    """Train from scratch, deterministically for a given config; returns the model in eval mode."""
    with _deterministic_cpu():
        torch.manual_seed(config.seed)
        model = build_model(config)
        model.train()
        rng = random.Random(config.seed)
        optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, betas=config.betas,
                                      weight_decay=config.weight_decay)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, config))
        start = time.perf_counter()
        for step in range(1, config.steps + 1):
            ids, labels = _batch(rng, config)
            logits = model(ids).logits[:, :-1]
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            schedule.step()
            if log is not None and (step % log_every == 0 or step == config.steps):
                ev = evaluate_copying(model, count=64)
                log(f"step {step:5d}  loss {loss.item():.4f}  first copy {ev.loss_first_copy:.3f}  "
                    f"second copy {ev.loss_second_copy:.4f}  induction L1 {ev.best(ev.induction, 1)[1]:.2f}  "
                    f"prev-token L0 {ev.best(ev.prev_token, 0)[1]:.2f}  {time.perf_counter() - start:.1f}s")
        model.eval()
    return model


def patching_report(model: torch.nn.Module, tokenizer: Any) -> dict[str, HeadEffects]:
    """Exact and AtP head effects on the example pairs (the files in examples/data), per corruption."""
    report = {}
    for corruption in ("copy", "prev"):
        with _deterministic_cpu():
            report[corruption] = head_effects(model, *encode_pairs(tokenizer, make_pairs(corruption)))
    return report


def _grid(values: tuple[tuple[float, ...], ...]) -> str:
    return "  ".join(f"L{l}H{h} {v:+.2f}" for l, row in enumerate(values) for h, v in enumerate(row))


def _readme(config: TrainConfig, ev: CopyEval, effects: dict[str, HeadEffects], seconds: float,
            digest: str) -> str:
    """The model card written beside the weights; every number in it is measured by this script."""
    fmt = lambda grid: ", ".join(  # noqa: E731
        f"L{l}H{h} {v:.3f}" for l, row in enumerate(grid) for h, v in enumerate(row))
    rows = "\n".join(
        f"| {name} | {e.clean_metric:+.2f} | {e.corrupt_metric:+.2f} | "
        + " | ".join(f"{x:+.2f} / {a:+.2f}" for xr, ar in zip(e.exact, e.atp) for x, a in zip(xr, ar)) + " |"
        for name, e in effects.items())
    heads = " | ".join(f"L{l}H{h} exact / AtP" for l in range(2) for h in range(config.heads))
    return f"""# induction-2l

A tiny GPT-NeoX (Pythia layout) trained by atpdsl to copy: on `<bos> A A`, where A is a sequence of
distinct random tokens, it predicts the second copy of A by induction. Its circuit is known in advance,
so atpdsl can show that it finds it: a **layer-0 previous-token head** writes "the token before me was
x" into each position, and **layer-1 induction heads** look for the position whose previous token is
the current token and copy what stands there.

Load it offline with `model zoo "induction-2l"` in a spec, or
`AutoModelForCausalLM.from_pretrained(atpdsl.zoo.zoo_path("induction-2l"))`.

## Model
- 2 layers, hidden size {config.hidden}, {config.heads} heads of size {config.hidden // config.heads}, MLP {config.mlp} (GELU), parallel
  residual, rotary on a fraction {config.rotary_fraction} of each head, untied embeddings, no dropout.
- Vocabulary: `<pad>` 0, `<unk>` 1, `<bos>` 2, `t0`..`t63` 3..66. Word-level tokenizer that splits on
  whitespace and prepends `<bos>`: write prompts as `t5 t17 t63`, without `<bos>`.
- `config.json` sets `attn_implementation: eager` (attention weights are visible, as AtP* needs).
- `model.safetensors` sha256 `{digest}`.

## Training
- Data: `<bos> A A` with |A| uniform in {config.n_min}..{config.n_max} (with one fixed length a head learns a fixed
  offset instead of induction), right-padded; cross-entropy on every real next token of both copies.
- AdamW lr {config.lr}, betas {config.betas}, weight decay {config.weight_decay}, {config.warmup}-step warmup then
  cosine, gradient clip {config.grad_clip}, batch {config.batch}, {config.steps} steps, seed {config.seed}.
- One CPU thread, deterministic kernels: {seconds:.0f} s on the machine that trained the shipped weights.
  Retraining is never needed; the thread count and CPU type can change the bits. The command:

      {RETRAIN_COMMAND}

## Measured (|A| = {ev.n}, {ev.count} held-out sequences)
- Loss on the first copy {ev.loss_first_copy:.3f} nats (chance: log 64 = {ev.log_vocab:.3f}); on the second
  copy {ev.loss_second_copy:.4f}; second-copy top-1 accuracy {ev.accuracy_second_copy:.3f}.
- Induction score (attention from a second-copy position q to q-n+1): {fmt(ev.induction)}.
- Previous-token score (attention from t to t-1): {fmt(ev.prev_token)}.

## Head patching on the example pairs
`examples/data/induction-copy.jsonl` and `induction-prev.jsonl` (32 pairs, |A| = 16, predict x_6):
metric logit(x_6) - logit(y) at the last position. `copy` replaces x_6 in the first copy by y (not in A);
`prev` replaces x_5, breaking the key that the previous-token head builds. Exact = mean effect of
patching the head's output at every position with its corrupt-run value; AtP = plain attribution
patching (first-order estimate). Under `prev`, plain AtP misses the previous-token head almost
entirely and gives the layer-1 heads the wrong sign: their attention is saturated, the case AtP*'s
QK fix is for. Every number here is in `training.json`.

| pairs | clean | corrupt | {heads} |
| --- | --- | --- | {" | ".join("---" for _ in range(2 * config.heads))} |
{rows}
"""


def save_model(model: torch.nn.Module, tokenizer: Any, out: str | Path, *, readme: str | None = None,
               record: dict[str, Any] | None = None) -> Path:
    """Write weights, config and tokenizer so Auto* classes load the folder offline; returns the folder.

    Two fixes after save_pretrained: it drops `attn_implementation` (a reload would pick sdpa, which
    returns no attention weights), and transformers 5 names the tokenizer class `TokenizersBackend`,
    which version 4 cannot load. `rotary_pct` / `rotary_emb_base` repeat the rotary settings under
    the names transformers 4 reads.
    """
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a bar for one 0.4 MB shard is noise
    try:
        model.save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    (folder / "model.safetensors").chmod(0o644)  # safetensors writes 0600
    _update_json(folder / "config.json", {
        "attn_implementation": "eager",
        "rotary_pct": model.config.rope_parameters["partial_rotary_factor"],
        "rotary_emb_base": model.config.rope_parameters["rope_theta"],
    })
    _update_json(folder / "tokenizer_config.json", {"tokenizer_class": "PreTrainedTokenizerFast"})
    if readme is not None:
        (folder / "README.md").write_text(readme, encoding="utf-8")
    if record is not None:
        (folder / "training.json").write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    return folder


def _update_json(path: Path, values: dict[str, Any]) -> None:
    data = json.loads(path.read_text(encoding="utf-8"))
    data.update(values)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def sha256(path: str | Path) -> str:
    """Hex sha256 of a file."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def main(argv: list[str] | None = None) -> int:
    """Command line: train, print the checks, save. Exit 1 when a circuit check fails."""
    parser = argparse.ArgumentParser(
        prog="python -m atpdsl.zoo.train_induction",
        description="Train the induction-2l model (2-layer GPT-NeoX copying <bos> A A) on one CPU thread.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--out", required=True, help="folder to write the model into")
    parser.add_argument("--steps", type=int, default=TrainConfig().steps, help="optimizer steps")
    parser.add_argument("--seed", type=int, default=TrainConfig().seed)
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps must be positive, got {args.steps}")
    config = TrainConfig(seed=args.seed, steps=args.steps)

    start = time.perf_counter()
    model = train(config)
    seconds = time.perf_counter() - start
    tokenizer = build_tokenizer()
    with _deterministic_cpu():
        ev = evaluate_copying(model)
    effects = patching_report(model, tokenizer)

    print(f"trained {config.steps} steps in {seconds:.1f} s on 1 thread")
    print(f"loss first copy {ev.loss_first_copy:.4f} (log 64 = {ev.log_vocab:.4f}), second copy "
          f"{ev.loss_second_copy:.5f}, second-copy accuracy {ev.accuracy_second_copy:.4f}")
    print(f"induction score   {_grid(ev.induction)}")
    print(f"prev-token score  {_grid(ev.prev_token)}")
    for name, e in effects.items():
        print(f"{name}-corruption pairs: metric clean {e.clean_metric:+.2f}, corrupt {e.corrupt_metric:+.2f}")
        print(f"  exact  {_grid(e.exact)}")
        print(f"  AtP    {_grid(e.atp)}")
    checks = ev.checks()
    for name, (ok, measured) in checks.items():
        print(f"{'PASS' if ok else 'FAIL'}  {name}: {measured}")

    import transformers

    record = {
        "config": asdict(config), "train_seconds": round(seconds, 1),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version(), "machine": platform.machine()},
        "eval": ev.as_dict(), "head_patching": {k: v.as_dict() for k, v in effects.items()},
    }
    folder = Path(args.out)
    save_model(model, tokenizer, folder, record=record)
    digest = sha256(folder / "model.safetensors")
    (folder / "README.md").write_text(_readme(config, ev, effects, seconds, digest), encoding="utf-8")
    print(f"wrote {folder} (model.safetensors sha256 {digest})")
    return 0 if all(ok for ok, _ in checks.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
