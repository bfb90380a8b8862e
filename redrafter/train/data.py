"""Training data for the drafter: text and JSONL files -> records -> token chunks or prompts.

Dimensions: N chunks, T sequence length (`--seq-len`).

One data format for every command (`train-drafter --data`, `validate`/`bench --prompts`): a text
file (`.txt`, anything not JSONL) is one record per non-blank line, a literal `\n` in a line
standing for a newline; a JSONL file (`.jsonl`, `.jsonl.gz`) is one record per line, its text
taken from the first present field of `TEXT_FIELDS` (or the field named by the caller).
`--format paragraphs` reads a text file as blank-line-separated paragraphs instead (prose
corpora for `--mode ce`). Gzipped files are read transparently. Every problem with a file is
one `DataError` naming the file and the fix.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import torch

from redrafter.errors import RedrafterError

TEXT_FIELDS = ("text", "prompt", "content")
FORMATS = ("auto", "lines", "paragraphs", "jsonl")  # auto: jsonl by the file name, else lines


class DataError(RedrafterError):
    """A training data file is missing, empty, not UTF-8, malformed, or too short."""


class Encoder(Protocol):
    def encode(self, text: str) -> list[int]: ...


def _read_text(path: Path) -> str:
    """The whole file as text (gunzipped if it ends in .gz), with one-line errors."""
    if not path.is_file():
        raise DataError(f"{path}: no such data file; pass text or JSONL files with --data")
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DataError(f"{path}: cannot read ({e}); pass a readable text or JSONL file") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(
            f"{path}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}); "
            "convert it with `iconv -t utf-8` or pass another file"
        ) from None
    if not text.strip():
        raise DataError(f"{path}: the file is empty; pass a file with training text")
    return text


def is_jsonl(path: Path) -> bool:
    return path.name.endswith((".jsonl", ".jsonl.gz", ".json", ".json.gz"))


def read_records(
    path: str | Path, *, field: str | None = None, data_format: str = "auto"
) -> list[str]:
    """The text records of one file: by `data_format` (see `FORMATS`), the lines of a text file
    (`\\n` read as a newline), its blank-line-separated paragraphs, or a field of each JSONL
    line."""
    if data_format not in FORMATS:
        raise DataError(f"data format {data_format!r} is not one of {', '.join(FORMATS)}")
    path = Path(path)
    text = _read_text(path)
    if data_format == "auto":
        data_format = "jsonl" if is_jsonl(path) else "lines"
    if data_format == "lines":
        return [line.replace("\\n", "\n") for line in text.splitlines() if line.strip()]
    if data_format == "paragraphs":
        records = [p.strip() for p in text.split("\n\n")]
        return [p for p in records if p]
    records = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj: Any = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(
                f"{path}:{n}: not valid JSON ({e.msg}); one JSON object per line"
            ) from None
        if not isinstance(obj, dict):
            raise DataError(f"{path}:{n}: expected a JSON object, got {type(obj).__name__}")
        names = (field,) if field else TEXT_FIELDS
        key = next((k for k in names if isinstance(obj.get(k), str)), None)
        if key is None:
            raise DataError(
                f"{path}:{n}: no text field {' or '.join(repr(k) for k in names)}; "
                "name the field with --text-field"
            )
        if obj[key].strip():
            records.append(obj[key])
    if not records:
        raise DataError(f"{path}: no non-empty text records; pass a file with training text")
    return records


def token_stream(records: Sequence[str], tokenizer: Encoder, *, separator: int | None) -> list[int]:
    """All records tokenized and concatenated, `separator` (EOS) after each one."""
    ids: list[int] = []
    for r in records:
        ids += tokenizer.encode(r)
        if separator is not None:
            ids.append(separator)
    return ids


def load_chunks(
    paths: Sequence[str | Path],
    tokenizer: Encoder,
    *,
    seq_len: int,
    separator: int | None = None,
    field: str | None = None,
    data_format: str = "auto",
) -> torch.Tensor:
    """Tokenize each file's records into one stream and cut it into non-overlapping windows of
    `seq_len` tokens (the tail shorter than a window is dropped). Returns (N, T) int64.

    A file with fewer than `seq_len` tokens is an error (it would contribute nothing)."""
    if not paths:
        raise DataError("no data files given; pass one or more --data FILE")
    chunks = []
    for path in paths:
        records = read_records(path, field=field, data_format=data_format)
        ids = token_stream(records, tokenizer, separator=separator)
        if len(ids) < seq_len:
            raise DataError(
                f"{path}: {len(ids)} tokens, fewer than --seq-len {seq_len}; "
                "pass more text or a smaller --seq-len"
            )
        n = len(ids) // seq_len
        chunks.append(torch.tensor(ids[: n * seq_len], dtype=torch.int64).view(n, seq_len))
    return torch.cat(chunks)


def load_prompts(
    paths: Sequence[str | Path], *, field: str | None = None, data_format: str = "auto"
) -> list[str]:
    """Every record of every file, for distillation prompts (one per line of a text file)."""
    if not paths:
        raise DataError("no data files given; pass one or more --data FILE")
    return [r for path in paths for r in read_records(path, field=field, data_format=data_format)]
