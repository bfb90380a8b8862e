"""What a benchmark records of the tokens an engine decoded: a digest and a count per prompt,
never the ids themselves. Two engines decoded the same tokens for a prompt when their digests
match; while the ids are still in memory, `compare_tokens` also says how far they agree.

A digest is the SHA-256 of the ids written as decimal numbers joined by commas
(`[504, 3575]` -> sha256(b"504,3575")), so any tool can recompute it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

TokenDigest = dict[str, Any]  # {"tokens_sha256": "<64 hex digits>", "tokens": <count>}


def token_digest(ids: Sequence[int]) -> TokenDigest:
    """`{"tokens_sha256": ..., "tokens": len(ids)}` for one prompt's decoded ids."""
    text = ",".join(str(int(t)) for t in ids)
    return {"tokens_sha256": hashlib.sha256(text.encode()).hexdigest(), "tokens": len(ids)}


def digest_rows(rows: Sequence[Sequence[int]]) -> list[TokenDigest]:
    """One `token_digest` per prompt."""
    return [token_digest(r) for r in rows]


@dataclasses.dataclass(frozen=True)
class Agreement:
    """How many of `prompts` two engines decoded to identical tokens and, when the ids were
    compared (not only their digests), the mean length of their common prefix."""

    identical: int
    prompts: int
    mean_common_prefix: float | None = None

    def text(self) -> str:
        """E.g. '8/8 identical, mean common prefix 119' (the prefix only when known)."""
        out = f"{self.identical}/{self.prompts} identical"
        if self.mean_common_prefix is not None:
            out += f", mean common prefix {self.mean_common_prefix:.0f}"
        return out

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready record (the form results files store)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> Agreement:
        """The inverse of `to_dict`."""
        return cls(int(raw["identical"]), int(raw["prompts"]), raw.get("mean_common_prefix"))


def compare_tokens(a: Sequence[Sequence[int]], b: Sequence[Sequence[int]]) -> Agreement:
    """Per prompt, whether `a` and `b` (token ids, prompt by prompt) are identical, and the mean
    length of their common prefix (where quantized engines drift away from fp32 ones)."""
    prefixes = []
    for x, y in zip(a, b, strict=False):
        k = 0
        while k < min(len(x), len(y)) and x[k] == y[k]:
            k += 1
        prefixes.append(k)
    identical = sum(list(x) == list(y) for x, y in zip(a, b, strict=False))
    mean = statistics.mean(prefixes) if prefixes else 0.0
    return Agreement(identical, len(prefixes), round(mean, 1))


def compare_digests(a: Sequence[Mapping[str, Any]], b: Sequence[Mapping[str, Any]]) -> Agreement:
    """`compare_tokens` for stored results: identical when digest and count both match."""
    same = sum(
        x["tokens_sha256"] == y["tokens_sha256"] and x["tokens"] == y["tokens"]
        for x, y in zip(a, b, strict=False)
    )
    return Agreement(same, min(len(a), len(b)))
