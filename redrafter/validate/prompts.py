"""Reading prompt files in the project's one data format (the one `train-drafter --data` reads,
`redrafter.train.data`): plain text, one prompt per line with a literal `\\n` for a newline, or
JSONL (a `prompt`, `text` or `content` field)."""

from __future__ import annotations

import json
from pathlib import Path

from redrafter.errors import PromptError


def read_prompts(path: str | Path) -> list[str]:
    """Non-empty prompts from `path`; a clear error for a missing, empty or malformed file."""
    path = Path(path)
    try:
        raw = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PromptError(f"prompts file {path} not found") from None
    except UnicodeDecodeError:
        raise PromptError(f"prompts file {path} is not UTF-8 text; re-save it as UTF-8") from None
    prompts = []
    for n, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise PromptError(f"{path}:{n} is not valid JSON ({e})") from None
            fields = ("prompt", "text", "content")
            found = [record.get(k) for k in fields] if isinstance(record, dict) else []
            text = next((t for t in found if isinstance(t, str)), None)
            if text is None:
                raise PromptError(f"{path}:{n} has no string 'prompt', 'text' or 'content' field")
            prompts.append(text)
        else:
            prompts.append(line.replace("\\n", "\n"))
    if not prompts:
        raise PromptError(f"prompts file {path} has no prompts; put one per line")
    return prompts
