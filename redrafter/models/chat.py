"""Chats as the library and the CLI take them: a conversation is a list of `Message`s (or
transformers' `{"role": ..., "content": ...}` dicts), checked once by `as_messages`;
`read_messages` reads one from a JSON or JSONL file. `Tokenizer.chat_prompt`
(`redrafter.models.tokenizer`) renders it with the checkpoint's chat template."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from redrafter.errors import PromptError

ROLES = ("system", "user", "assistant")


@dataclasses.dataclass(frozen=True)
class Message:
    """One chat turn: `role` is system, user or assistant; `content` is its text."""

    role: str
    content: str

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise PromptError(f"role {self.role!r} is not one of {', '.join(ROLES)}")
        if not isinstance(self.content, str):
            raise PromptError(f"the {self.role} message's content {self.content!r} is not text")


# A conversation as the library takes it: Messages, or transformers' {"role", "content"} dicts.
Chat = Sequence[Message | Mapping[str, Any]]


def is_chat(prompt: Any) -> bool:
    """Whether a prompt is a message list (rather than text or token ids)."""
    return (
        not isinstance(prompt, str | bytes)
        and isinstance(prompt, Sequence)
        and len(prompt) > 0
        and isinstance(prompt[0], Message | Mapping)
    )


def as_messages(chat: Chat, *, system: str | None = None) -> tuple[Message, ...]:
    """A conversation, checked, with `system` (if given) put first as a system turn. It needs
    a user turn; a system turn may only come first; the last turn may not be the assistant's
    (the reply is generated after it). Anything else is a one-line `PromptError`."""
    if isinstance(chat, str | bytes) or not isinstance(chat, Sequence):
        raise PromptError(f"a chat is a list of messages, not a {type(chat).__name__}")
    messages = [_message(m, f"message {n}") for n, m in enumerate(chat, 1)]
    if system is not None:
        if messages and messages[0].role == "system":
            raise PromptError(
                "the messages already start with a system message; give the system text once "
                "(drop that message, or --system)"
            )
        messages.insert(0, Message("system", system))
    if not any(m.role == "user" for m in messages):
        raise PromptError("the chat has no user message; add a {'role': 'user', ...} turn")
    late = next((n for n, m in enumerate(messages[1:], 2) if m.role == "system"), None)
    if late is not None:
        raise PromptError(f"message {late} is a system message; only the first one may be")
    if messages[-1].role == "assistant":
        raise PromptError(
            "the last message is the assistant's; end with a user message (the reply is "
            "generated after it)"
        )
    return tuple(messages)


def _message(item: Any, where: str) -> Message:
    """A `Message` from itself or its dict form; errors start with `where`."""
    if isinstance(item, Message):
        return item
    if not isinstance(item, Mapping):
        raise PromptError(f"{where} is {item!r}, not a {{role, content}} object")
    if set(item) != {"role", "content"}:
        raise PromptError(
            f"{where} has fields {sorted(item)}; a message has exactly 'role' and 'content'"
        )
    try:
        return Message(item["role"], item["content"])
    except PromptError as e:
        raise PromptError(f"{where}: {e}") from None


def read_messages(path: str | Path) -> tuple[Message, ...]:
    """A conversation from a file: a JSON list of `{"role", "content"}` objects, or JSONL with
    one such object per line. A missing or malformed file, or a bad message, is a one-line
    `PromptError` naming the file (and the line of a JSONL message)."""
    path = Path(path)
    try:
        raw = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PromptError(f"messages file {path} not found") from None
    except UnicodeDecodeError:
        raise PromptError(f"messages file {path} is not UTF-8 text; re-save it as UTF-8") from None
    except OSError as e:
        raise PromptError(f"cannot read messages file {path} ({e.strerror})") from None
    found: list[tuple[str, Any]] = []  # (where, the parsed object)
    if raw.lstrip().startswith("["):
        try:
            items = json.loads(raw)
        except json.JSONDecodeError as e:
            raise PromptError(f"{path} is not valid JSON ({e})") from None
        found = [(f"{path}: message {n}", item) for n, item in enumerate(items, 1)]
    else:
        for n, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                found.append((f"{path}:{n}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise PromptError(
                    f"{path}:{n} is not valid JSON ({e}); write one message object per line, "
                    "or one JSON list of them"
                ) from None
    if not found:
        raise PromptError(f"messages file {path} has no messages")
    messages = [_message(item, where) for where, item in found]
    try:
        return as_messages(messages)
    except PromptError as e:
        raise PromptError(f"{path}: {e}") from None
