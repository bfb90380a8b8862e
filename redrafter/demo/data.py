"""The demo's data: the Jargon File (glossary prose) and HumanEval (Python prompts) from the
shared data folder beside the checkout (`<repo>/../shared/data`, or `$REDRAFTER_SHARED_DATA`),
the only data the project reads from outside the repository, and only here.

Entries are split once, deterministically: every `HOLDOUT_EVERY`-th Jargon entry and the last
`HUMANEVAL_HELDOUT` HumanEval tasks are never trained on. The drafter's training prompts come
from the rest (`training_prompts`); its held-out evaluation (`heldout_prompts`) and the
benchmarks' prompts (`heldout_shared_prompts`) come from the held-out entries.
"""

from __future__ import annotations

import gzip
import json
import os
import random
from pathlib import Path
from typing import Any

from redrafter.bench.prompts import split_every, spread
from redrafter.train.data import DataError
from redrafter.train.prompts import Prompt, general_prompts, rotating_templates

JARGON = Path("jargon-file") / "entries.jsonl"
HUMANEVAL = Path("humaneval") / "HumanEval.jsonl.gz"
DATA_ENV = "REDRAFTER_SHARED_DATA"
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


def default_data_dir() -> Path:
    """`$REDRAFTER_SHARED_DATA`, else `<repo>/../shared/data` (where CI and developer
    checkouts have it)."""
    if os.environ.get(DATA_ENV):
        return Path(os.environ[DATA_ENV])
    return Path(__file__).resolve().parents[2].parent / "shared" / "data"


def find_shared_data(data_dir: str | Path | None = None) -> Path:
    """The shared data folder (`data_dir`, else `default_data_dir()`), checked: a one-line
    `DataError` names the missing files and how to provide them."""
    data = Path(data_dir) if data_dir is not None else default_data_dir()
    missing = [str(data / p) for p in (JARGON, HUMANEVAL) if not (data / p).is_file()]
    if missing:
        raise DataError(
            f"demo data not found: {', '.join(missing)}; put the shared data folder "
            f"({JARGON}, {HUMANEVAL}) at {data} or set ${DATA_ENV} to where it is"
        )
    return data


def jargon_entries(data: Path) -> list[dict[str, Any]]:
    """The Jargon File's entries (`term`, `text`, ...), in file order."""
    lines = (data / JARGON).read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def humaneval_tasks(data: Path) -> list[dict[str, Any]]:
    """HumanEval's tasks (`prompt`, `entry_point`, ...), in file order."""
    with gzip.open(data / HUMANEVAL, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _summary(task: dict[str, Any]) -> str:
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
    jargon, _ = split_every(jargon_entries(data), HOLDOUT_EVERY)
    code = humaneval_tasks(data)[:-HUMANEVAL_HELDOUT]
    rng.shuffle(jargon)
    # One pass asks about every term once; later passes ask about the same terms in the other
    # templates' words, so counts beyond ~1,900 Jargon prompts stay distinct. The first pass
    # comes first, so smaller counts get the prompts they always had (cached answers match).
    pool = rotating_templates(jargon, JARGON_TEMPLATES)
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
    general = general_prompts()
    rng.shuffle(general)
    prompts += general[: count - len(prompts)]
    prompts += pool[n_jargon : n_jargon + count - len(prompts)]  # top up if a pool ran short
    rng.shuffle(prompts)
    return prompts[:count]


def heldout_prompts(data: Path, *, count: int) -> list[Prompt]:
    """`count` evaluation prompts from held-out entries only: Jargon questions (two thirds)
    and HumanEval completions (one third), in a fixed order."""
    _, jargon = split_every(jargon_entries(data), HOLDOUT_EVERY)
    code = humaneval_tasks(data)[-HUMANEVAL_HELDOUT:]
    n_code = min(len(code), count // 3)
    prompts = rotating_templates(spread(jargon, count - n_code), JARGON_TEMPLATES[:3], passes=1)
    prompts += [Prompt(f"Complete this Python function:\n\n{t['prompt']}") for t in code[:n_code]]
    return prompts


def shared_prompts(
    n_jargon: int, n_code: int, *, offset: int = 0, data_dir: str | Path | None = None
) -> list[Prompt]:
    """Benchmark prompts from the whole data (training entries included): `n_jargon` Jargon
    terms spread over the file as chat questions, then `n_code` HumanEval prompts as raw code
    to continue, from task `offset` on (`offset` also shifts the Jargon picks)."""
    data = find_shared_data(data_dir)
    picked = spread(jargon_entries(data), n_jargon, offset=offset)
    prompts = rotating_templates(picked, JARGON_TEMPLATES[:1], passes=1)
    code = humaneval_tasks(data)[offset : offset + n_code]
    return prompts + [Prompt(t["prompt"], chat=False) for t in code]


def heldout_shared_prompts(
    n_jargon: int, n_code: int, *, data_dir: str | Path | None = None
) -> list[Prompt]:
    """Like `shared_prompts`, but only from entries the demo drafter never trains on, so
    speculative figures are not inflated by memorised text: `n_jargon` held-out Jargon terms
    (spread over them) as chat questions, the first `n_code` held-out HumanEval prompts as raw
    code."""
    data = find_shared_data(data_dir)
    _, held = split_every(jargon_entries(data), HOLDOUT_EVERY)
    prompts = rotating_templates(spread(held, n_jargon), JARGON_TEMPLATES[:1], passes=1)
    code = humaneval_tasks(data)[-HUMANEVAL_HELDOUT:][:n_code]
    return prompts + [Prompt(t["prompt"], chat=False) for t in code]
