"""End to end: data files (or prompts) -> the base's training examples (cached on disk) ->
a trained drafter in Apple's layout. `redrafter train-drafter` and `make demo` call this.

Dimensions: N chunks, T sequence length, M context positions, E hidden size.

Two recipes (`TrainOptions.mode`):
- `ce` (Apple's): the base reads data chunks teacher-forced; the drafter learns the data's
  next tokens.
- `distill`: the base answers the data's records as prompts (greedy, up to `seq_len` new
  tokens); the drafter learns the base's own tokens, plus KL to its top-C distributions when
  `kl_weight` > 0. Acceptance measures agreement with the base, not with the data, so this is
  the recipe that fits the job.
The base's outputs are cached under `cache_dir` (safetensors), keyed by everything that
determines them, so a resumed or re-run training skips the expensive base passes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from redrafter.models.llama import Transformer
from redrafter.train.data import DataError, load_chunks, load_prompts
from redrafter.train.prompts import Prompt
from redrafter.train.teacher import Examples, distill_examples, teacher_forced
from redrafter.train.trainer import (
    Heldout,
    TrainOptions,
    TrainResult,
    progress_bar,
    train_drafter,
)

EVAL_PROMPTS = 8  # held-out prompts decoded for tokens/step (each eval costs a real decode)
PROMPT_LIMIT = 1024  # longer prompts are skipped: they cost much and teach little


@dataclasses.dataclass
class Prepared:
    """Training examples, held-out examples and held-out prompt ids, plus a summary."""

    train: Examples
    heldout: Heldout
    summary: dict[str, Any]

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.train.save(folder / "train.safetensors")
        if self.heldout.examples is not None:
            self.heldout.examples.save(folder / "heldout.safetensors")
        meta = {"prompts": [list(p) for p in self.heldout.prompts], "summary": self.summary}
        tmp = folder / "meta.json.tmp"
        tmp.write_text(json.dumps(meta) + "\n")
        tmp.replace(folder / "meta.json")  # last: its presence marks a complete cache entry

    @staticmethod
    def load(folder: Path) -> Prepared | None:
        if not (folder / "meta.json").is_file():
            return None
        meta = json.loads((folder / "meta.json").read_text())
        held = folder / "heldout.safetensors"
        return Prepared(
            Examples.load(folder / "train.safetensors"),
            Heldout(Examples.load(held) if held.is_file() else None, meta["prompts"]),
            meta["summary"],
        )


def default_cache_dir() -> Path:
    import os

    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "redrafter"


def fingerprint(path: str | Path) -> dict[str, Any]:
    """Identity of an input file for cache keys: path, size and mtime (no full read)."""
    p = Path(path).resolve()
    st = p.stat()
    return {"path": str(p), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


def cache_key(**parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def encode_prompt(tokenizer: Any, prompt: Prompt) -> list[int]:
    """Exactly what `Pipeline.encode` does at decode time, so training sees inference's ids."""
    return tokenizer.encode_prompt(prompt.text, chat=prompt.chat)


def _split(items: list, holdout: int, seed: int) -> tuple[list, list]:
    """(train, held-out): a seeded shuffle, the last `holdout` items held out."""
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    cut = len(items) - holdout
    return [items[i] for i in order[:cut]], [items[i] for i in order[cut:]]


def prepare_distill(
    base: Transformer,
    tokenizer: Any,
    train_prompts: Sequence[Prompt],
    eval_prompts: Sequence[Prompt],
    options: TrainOptions,
    *,
    heldout_prompts: Sequence[Prompt] = (),
    batch_size: int = 16,
    progress: bool = True,
) -> Prepared:
    """The base's greedy answers to `train_prompts` (training examples) and to
    `heldout_prompts` (held-out examples); `eval_prompts` are encoded for tokens/step."""
    eos = base.config.eos_token_ids or tuple(getattr(tokenizer, "eos_token_ids", ()))
    limit = min(PROMPT_LIMIT, base.config.context_length - options.seq_len)
    encode = [encode_prompt(tokenizer, p) for p in train_prompts]
    ids = [p for p in encode if len(p) <= limit]
    if not ids:
        longest = max((len(p) for p in encode), default=0)
        raise DataError(
            f"no usable training prompts: {len(encode)} read, all longer than the {limit}-token "
            f"prompt limit (the longest has {longest} tokens); a text file holds one prompt per "
            "line (JSONL: one record per line), so split the data into shorter prompts"
        )
    held = [p for p in (encode_prompt(tokenizer, q) for q in heldout_prompts) if len(p) <= limit]
    top_c = options.top_c if options.kl_weight else 0
    with progress_bar(progress) as bar:
        task = bar.add_task("base answers", total=len(ids) + len(held), info="(greedy, fp32)")
        advance = lambda n: bar.advance(task, n)  # noqa: E731
        train, _ = distill_examples(
            base,
            ids,
            predict_tokens=options.predict_tokens,
            max_new_tokens=options.seq_len,
            eos_token_ids=eos,
            batch_size=batch_size,
            top_c=top_c,
            progress=advance,
        )
        held_ex = None
        if held:
            held_ex, _ = distill_examples(
                base,
                held,
                predict_tokens=options.predict_tokens,
                max_new_tokens=options.seq_len,
                eos_token_ids=eos,
                batch_size=batch_size,
                top_c=top_c,
                progress=advance,
            )
    prompts = [encode_prompt(tokenizer, p) for p in eval_prompts]
    summary = {
        "mode": "distill",
        "train_prompts": len(ids),
        "skipped_long_prompts": len(encode) - len(ids),
        "train_positions": len(train),
        "heldout_positions": 0 if held_ex is None else len(held_ex),
        "eval_prompts": len(prompts),
    }
    return Prepared(train, Heldout(held_ex, prompts), summary)


def prepare_ce(
    base: Transformer,
    chunks: torch.Tensor,
    options: TrainOptions,
    *,
    max_chunks: int | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> Prepared:
    """Apple's recipe: data chunks (N, T) teacher-forced through the base. A few chunks are
    held out: their positions for accuracy, their first halves as tokens/step prompts."""
    holdout = min(EVAL_PROMPTS, max(1, len(chunks) // 20)) if len(chunks) > 1 else 0
    order = torch.randperm(len(chunks), generator=torch.Generator().manual_seed(options.seed))
    train_rows, held_rows = order[: len(chunks) - holdout], order[len(chunks) - holdout :]
    if max_chunks is not None:
        train_rows = train_rows[:max_chunks]
    with progress_bar(progress) as bar:
        task = bar.add_task("base hidden states", total=len(train_rows) + holdout, info="")
        advance = lambda n: bar.advance(task, n)  # noqa: E731
        train = teacher_forced(
            base,
            chunks[train_rows],
            predict_tokens=options.predict_tokens,
            batch_size=batch_size,
            progress=advance,
        )
        held = (
            teacher_forced(
                base,
                chunks[held_rows],
                predict_tokens=options.predict_tokens,
                batch_size=batch_size,
                progress=advance,
            )
            if holdout
            else None
        )
    prompts = [chunks[i, : max(1, options.seq_len // 2)].tolist() for i in held_rows]
    summary = {
        "mode": "ce",
        "chunks": len(chunks),
        "train_chunks": len(train_rows),
        "train_positions": len(train),
        "heldout_positions": 0 if held is None else len(held),
        "eval_prompts": len(prompts),
    }
    return Prepared(train, Heldout(held, prompts), summary)


def train_from_files(
    base_path: str | Path,
    data_paths: Sequence[str | Path],
    out: str | Path,
    options: TrainOptions,
    *,
    chat: bool = False,
    field: str | None = None,
    data_format: str = "auto",
    max_records: int | None = None,
    resume: bool = False,
    cache_dir: Path | None = None,
    progress: bool = True,
    log: Callable[[str], None] = lambda message: None,
) -> tuple[TrainResult, Prepared]:
    """`redrafter train-drafter`: load the base, build (or load cached) examples from the data
    files for the chosen mode, train, save to `out`. `data_format`: how text files split into
    records (`redrafter.train.data.FORMATS`; auto: one per line, JSONL one per line)."""
    from redrafter.models.checkpoints import load_base
    from redrafter.models.tokenizer import load_tokenizer

    if not data_paths:
        raise DataError("no data files given; pass one or more --data FILE")
    # Read and check all the data before the slow base load: bad files fail in a second.
    tokenizer = load_tokenizer(base_path)
    eos = tuple(getattr(tokenizer, "eos_token_ids", ()) or ())
    chunks, prompts, max_chunks = None, [], None
    if options.mode == "ce":
        chunks = load_chunks(
            data_paths,
            tokenizer,
            seq_len=options.seq_len,
            separator=eos[0] if eos else None,
            field=field,
            data_format=data_format,
        )  # (N, T)
        if options.steps is not None:  # teacher-force only the chunks the steps will use
            max_chunks = -(-options.steps * options.batch_size // max(options.seq_len - 1, 1))
    else:
        records = load_prompts(data_paths, field=field, data_format=data_format)[:max_records]
        prompts = [Prompt(r, chat=chat) for r in records]
    key = cache_key(
        base=fingerprint(base_path),
        data=[fingerprint(p) for p in data_paths],
        mode=options.mode,
        seq_len=options.seq_len,
        predict_tokens=options.predict_tokens,
        top_c=options.top_c if options.kl_weight else 0,
        chat=chat,
        field=field,
        data_format=data_format,
        max_records=max_records,
        seed=options.seed,
        max_chunks=max_chunks,
    )
    folder = (cache_dir or default_cache_dir()) / "examples" / key
    prepared = Prepared.load(folder)
    base = load_base(base_path)
    if prepared is not None:
        log(f"using cached base outputs from {folder}")
    elif chunks is not None:
        prepared = prepare_ce(base, chunks, options, max_chunks=max_chunks, progress=progress)
        prepared.save(folder)
    else:
        holdout = min(EVAL_PROMPTS, max(1, len(prompts) // 20)) if len(prompts) > 1 else 0
        train_p, held_p = _split(prompts, holdout, options.seed)
        prepared = prepare_distill(
            base, tokenizer, train_p, held_p, options, heldout_prompts=held_p, progress=progress
        )
        prepared.save(folder)
    log("data: " + ", ".join(f"{k} {v}" for k, v in prepared.summary.items()))
    result = train_drafter(
        base,
        prepared.train,
        out,
        options,
        heldout=prepared.heldout,
        eos_token_ids=base.config.eos_token_ids,
        resume=resume,
        progress=progress,
        log=log,
    )
    return result, prepared
