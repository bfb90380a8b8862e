"""Building prompts for drafter training: a `Prompt` (text, and whether it goes into the chat
template), templated questions about records, and everyday requests that need no data file.

The drafter must predict what the base model *says*, so distillation trains on the base's own
answers to such prompts (see `teacher.distill_examples`). Which records are asked about, and
how they split into training and held-out prompts, is up to the caller: the demo's choice
(Jargon File and HumanEval) is `redrafter.demo.data`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

# General requests in an assistant's everyday style.
GENERAL = (
    "Tell me a fun fact about {country}.",
    "Write a haiku about {topic}.",
    "Give me three tips for learning {topic}.",
    "Explain {topic} to a ten-year-old.",
    "Write a short story about {topic}.",
)
COUNTRIES = (
    "Italy", "Spain", "Japan", "Canada", "Brazil", "Egypt", "Kenya", "Norway", "Peru", "India",
    "Mexico", "Greece", "Chile", "Vietnam", "Poland", "Ireland", "Turkey", "Australia",
)  # fmt: skip
TOPICS = (
    "the ocean", "recursion", "databases", "the moon", "gardening", "cooking pasta",
    "machine learning", "the internet", "volcanoes", "chess", "music theory", "bicycles",
    "operating systems", "photosynthesis", "encryption", "the Roman Empire", "coffee",
    "sorting algorithms", "rainbows", "time zones", "linked lists", "compilers",
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Prompt:
    """A prompt and whether to wrap it in the chat template (raw code is continued as is)."""

    text: str
    chat: bool = True


def rotating_templates(
    records: Sequence[Mapping[str, Any]],
    templates: Sequence[str],
    *,
    passes: int | None = None,
    chat: bool = True,
) -> list[Prompt]:
    """One prompt per record per pass: in pass p, record i is asked in template
    (i + p) % len(templates), each template filled from the record's fields (`{term}` reads
    `record["term"]`). Later passes ask about the same records in other templates' words, so
    up to len(templates) passes (the default) stay distinct; the first pass comes first."""
    passes = len(templates) if passes is None else passes
    return [
        Prompt(templates[(i + p) % len(templates)].format(**record), chat=chat)
        for p in range(passes)
        for i, record in enumerate(records)
    ]


def general_prompts() -> list[Prompt]:
    """Everyday assistant requests (`GENERAL` filled with `COUNTRIES` and `TOPICS` pairwise),
    in a fixed order: training text that needs no data file."""
    return [
        Prompt(g.format(country=c, topic=t))
        for g in GENERAL
        for c, t in zip(COUNTRIES, TOPICS, strict=False)
    ]
