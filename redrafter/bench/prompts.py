"""Choosing benchmark prompts: a deterministic held-out split (the items a drafter never
trains on), an even spread over a collection (so a few prompts cover all of it), and
encoding (text, chat) prompts the way `Pipeline.encode` does. Which collection is read, and
where from, is the caller's business (the demo's data: `redrafter.demo.data`)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Protocol, TypeVar

T = TypeVar("T")


class ChatText(Protocol):
    """A prompt's text and whether it goes into the chat template (raw code does not)."""

    @property
    def text(self) -> str: ...

    @property
    def chat(self) -> bool: ...


def split_every(items: Sequence[T], every: int) -> tuple[list[T], list[T]]:
    """(kept, held out): items 0, `every`, 2 * `every`, ... are held out, the rest kept. The
    split depends only on the order of `items`, so training and benchmarks agree on it."""
    if every < 1:
        raise ValueError(f"every {every!r} must be >= 1")
    kept = [x for i, x in enumerate(items) if i % every]
    held = [x for i, x in enumerate(items) if i % every == 0]
    return kept, held


def spread(items: Sequence[T], count: int, *, offset: int = 0) -> list[T]:
    """At most `count` items evenly spaced over `items`, starting at `offset` within the first
    stride (another `offset` picks a disjoint slice as long as it stays below the stride)."""
    step = max(1, len(items) // max(count, 1))
    return list(items[offset % step :: step][:count])


def encode_prompts(tokenizer: Any, prompts: Iterable[ChatText]) -> list[list[int]]:
    """Token ids per prompt: the chat template around `text` when `chat`, else `text` as is
    (what `Pipeline.encode` and drafter training do: `Tokenizer.encode_prompt`, BOS included)."""
    return [tokenizer.encode_prompt(p.text, chat=p.chat) for p in prompts]
