"""Prompts for training and evaluating the demo model's drafter, built from the shared data
(`<repo>/../shared/data`): the Jargon File (glossary prose) and HumanEval (Python prompts).

The drafter must predict what the base model *says*, so the training text is the base's own
answers to chat prompts built from these sources (see `teacher.distill_examples`). Entries are
split once, deterministically: every `HOLDOUT_EVERY`-th Jargon entry and the last
`HUMANEVAL_HELDOUT` HumanEval tasks are never trained on; evaluation prompts come from them.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import random
from pathlib import Path

from redrafter.train.data import DataError

JARGON = Path("jargon-file") / "entries.jsonl"
HUMANEVAL = Path("humaneval") / "HumanEval.jsonl.gz"
HOLDOUT_EVERY = 10
HUMANEVAL_HELDOUT = 14

JARGON_TEMPLATES = (
    "Explain the computing slang term '{term}'.",
    "What does '{term}' mean?",
    "Explain in one sentence what '{term}' is.",
    "Write a short paragraph about '{term}'.",
    "How would a programmer use the word '{term}'?",
    "Give an example sentence that uses '{term}'.",
)
CODE_TEMPLATES = (
    "Complete this Python function:\n\n{prompt}",
    "Write a Python function `{name}`. {summary}",
    "Explain what this Python function does:\n\n{prompt}",
)
# General requests in an assistant's everyday style (no evaluation or demo prompt is one).
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


def find_shared_data(repo_root: Path | None = None) -> Path:
    """`<repo>/../shared/data` (where CI and developer checkouts have it), with a clear error."""
    root = repo_root or Path(__file__).resolve().parents[2]
    data = root.parent / "shared" / "data"
    missing = [p for p in (JARGON, HUMANEVAL) if not (data / p).is_file()]
    if missing:
        raise DataError(
            f"training data not found: {', '.join(str(data / p) for p in missing)}; the demo "
            "trains its drafter from ../shared/data beside the checkout (Jargon File + "
            "HumanEval); put the shared folder there"
        )
    return data


def _jargon(data: Path) -> list[dict[str, str]]:
    lines = (data / JARGON).read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def _humaneval(data: Path) -> list[dict[str, str]]:
    with gzip.open(data / HUMANEVAL, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _summary(task: dict[str, str]) -> str:
    """The first line of a HumanEval docstring, e.g. 'Check if in given list of numbers...'."""
    doc = task["prompt"].split('"""')[1] if '"""' in task["prompt"] else task["prompt"]
    doc = doc.split("'''")[1] if "'''" in doc else doc
    first = doc.strip().split("\n")[0].strip()
    return first if first.endswith(".") else first + "."


def training_prompts(data: Path, *, count: int, seed: int = 0) -> list[Prompt]:
    """`count` training prompts, mixing Jargon questions (~60 %), HumanEval tasks (~25 %: chat
    requests and raw code to continue) and general questions (~15 %), none from held-out
    entries. Deterministic for a (data, count, seed)."""
    rng = random.Random(seed)
    jargon = [e for i, e in enumerate(_jargon(data)) if i % HOLDOUT_EVERY]
    code = _humaneval(data)[:-HUMANEVAL_HELDOUT]
    rng.shuffle(jargon)
    # One pass asks about every term once; later passes ask about the same terms in the other
    # templates' words, so counts beyond ~1,900 Jargon prompts stay distinct. The first pass
    # comes first, so smaller counts get the prompts they always had (cached answers match).
    pool = [
        Prompt(JARGON_TEMPLATES[(i + rep) % len(JARGON_TEMPLATES)].format(term=e["term"]))
        for rep in range(len(JARGON_TEMPLATES))
        for i, e in enumerate(jargon)
    ]
    n_jargon = round(0.6 * count)
    prompts = pool[:n_jargon]
    code_pool: list[Prompt] = []
    for i, t in enumerate(code):
        template = CODE_TEMPLATES[i % len(CODE_TEMPLATES)]
        code_pool.append(
            Prompt(template.format(prompt=t["prompt"], name=t["entry_point"], summary=_summary(t)))
        )
        code_pool.append(Prompt(t["prompt"], chat=False))  # the base continues the code itself
    rng.shuffle(code_pool)
    prompts += code_pool[: round(0.25 * count)]
    general = [
        Prompt(g.format(country=c, topic=t))
        for g in GENERAL
        for c, t in zip(COUNTRIES, TOPICS, strict=False)
    ]
    rng.shuffle(general)
    prompts += general[: count - len(prompts)]
    prompts += pool[n_jargon : n_jargon + count - len(prompts)]  # top up if a pool ran short
    rng.shuffle(prompts)
    return prompts[:count]


def heldout_prompts(data: Path, *, count: int) -> list[Prompt]:
    """`count` evaluation prompts from held-out entries only: Jargon questions (two thirds)
    and HumanEval completions (one third), in a fixed order."""
    jargon = [e for i, e in enumerate(_jargon(data)) if i % HOLDOUT_EVERY == 0]
    code = _humaneval(data)[-HUMANEVAL_HELDOUT:]
    n_code = min(len(code), count // 3)
    step = max(1, len(jargon) // max(count - n_code, 1))
    prompts = [
        Prompt(JARGON_TEMPLATES[i % 3].format(term=e["term"]))
        for i, e in enumerate(jargon[::step][: count - n_code])
    ]
    prompts += [Prompt(f"Complete this Python function:\n\n{t['prompt']}") for t in code[:n_code]]
    return prompts
