"""OpenAI request bodies, checked, and OpenAI-shaped error bodies.

A body is parsed into a `GenerationRequest` (what the engine decodes) before anything is queued;
every refusal is an `ApiError` naming the field, so the HTTP layer answers 400/404/503 with the
body OpenAI clients expect (`{"error": {"message", "type", "param", "code"}}`)."""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any

from redrafter.decoding.options import DecodeOptions
from redrafter.errors import RedrafterError
from redrafter.pipeline import Pipeline, sampling_params

MAX_STOPS = 4  # OpenAI's limit on `stop` strings
# OpenAI fields this server does not implement; their neutral values (0, false, empty) pass.
UNSUPPORTED = (
    "logprobs",
    "top_logprobs",
    "logit_bias",
    "tools",
    "functions",
    "response_format",
    "echo",
    "best_of",
    "suffix",
)
NEUTRAL = {"best_of": (1,), "response_format": ({"type": "text"},), "suffix": ("",)}


class ApiError(Exception):
    """A request the server refuses: HTTP `status`, the OpenAI error `type` and `code`, and the
    request field at fault (`param`, None when no single field is)."""

    def __init__(
        self,
        message: str,
        *,
        status: int = 400,
        param: str | None = None,
        type: str = "invalid_request_error",
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param
        self.type = type
        self.code = code

    def body(self) -> dict[str, Any]:
        """The JSON error body OpenAI's API returns (its client raises from it)."""
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


@dataclasses.dataclass(frozen=True)
class GenerationRequest:
    """One checked request: the prompt's ids, how to decode them, the stop strings, whether
    to stream, and which endpoint it came from ('chat' or 'completion')."""

    prompt_ids: tuple[int, ...]
    options: DecodeOptions
    stop: tuple[str, ...]
    stream: bool
    kind: str


def parse_request(
    body: Any, *, kind: str, pipe: Pipeline, base: DecodeOptions, model: str
) -> GenerationRequest:
    """Check a /v1/chat/completions (`kind` 'chat') or /v1/completions ('completion') body and
    encode its prompt. `base`: the server's decode options (mode, beam), to which the request's
    `max_tokens` and sampling fields are applied. Raises `ApiError` (400 bad field, 404 unknown
    model, 400 `context_length_exceeded`)."""
    if not isinstance(body, dict):
        raise ApiError("the request body must be a JSON object")
    name = body.get("model")
    if not isinstance(name, str) or not name:
        raise ApiError("'model' is required: a model id from GET /v1/models", param="model")
    if name != model:
        raise ApiError(
            f"model {name!r} does not exist; this server serves {model!r}",
            status=404,
            param="model",
            code="model_not_found",
        )
    n = body.get("n", 1)
    if n is not None and (not _is_int(n) or n != 1):
        raise ApiError(f"n {n!r} is not supported; only n=1", param="n")
    for field in UNSUPPORTED:  # refused rather than silently ignored: they change the reply
        if body.get(field) not in (None, False, 0, [], {}, *NEUTRAL.get(field, ())):
            raise ApiError(f"{field} is not supported by this server; leave it out", param=field)
    stream = body.get("stream", False)
    if not isinstance(stream, bool) and stream is not None:
        raise ApiError(f"stream {stream!r} must be true or false", param="stream")
    ids, prompt_field = _prompt_ids(body, kind=kind, pipe=pipe)
    context = int(pipe.runtime.context_length)
    if len(ids) >= context:
        raise ApiError(
            f"the prompt has {len(ids)} tokens; this model's context is {context}, which must "
            "also hold at least one generated token; shorten the prompt",
            param=prompt_field,
            code="context_length_exceeded",
        )
    max_field = "max_completion_tokens" if body.get("max_completion_tokens") is not None else None
    max_field = max_field or "max_tokens"
    max_tokens = body.get(max_field)
    if max_tokens is None:
        max_tokens = context - len(ids)  # OpenAI's default: as much as the context holds
    elif not _is_int(max_tokens) or max_tokens < 1:
        raise ApiError(f"{max_field} {max_tokens!r} must be an integer >= 1", param=max_field)
    elif len(ids) + max_tokens > context:
        raise ApiError(
            f"the prompt has {len(ids)} tokens + {max_field} {max_tokens} > this model's "
            f"context {context}; lower {max_field} to at most {context - len(ids)}",
            param=max_field,
            code="context_length_exceeded",
        )
    temperature = _number(body, "temperature", 1.0, low=0.0, high=2.0)
    top_p = _number(body, "top_p", 1.0, low=0.0, high=1.0, low_open=True)
    # OpenAI's penalties, applied at every tree node with that node's own path (penalties.py)
    presence = _number(body, "presence_penalty", 0.0, low=-2.0, high=2.0)
    frequency = _number(body, "frequency_penalty", 0.0, low=-2.0, high=2.0)
    # Not OpenAI's, but what vLLM's and llama.cpp's servers take (the openai client sends them
    # through `extra_body`): read here, not ignored, since each changes the reply.
    top_k = _top_k(body, vocab=int(pipe.runtime.vocab_size))
    min_p = _number(body, "min_p", 0.0, low=0.0, high=1.0, high_open=True)
    repetition = _number(
        body, "repetition_penalty", 1.0, low=0.0, high=math.inf, low_open=True, high_open=True
    )
    seed = body.get("seed")
    if seed is not None and (not _is_int(seed) or seed < 0):
        raise ApiError(f"seed {seed!r} must be an integer >= 0", param="seed")
    try:
        sampling = sampling_params(
            temperature=temperature,
            seed=seed,
            top_k=top_k,
            top_p=top_p,
            min_p=min_p,
            repetition_penalty=repetition,
            presence_penalty=presence,
            frequency_penalty=frequency,
        )
        options = dataclasses.replace(base, max_new_tokens=int(max_tokens), sampling=sampling)
    except RedrafterError as e:
        raise ApiError(str(e)) from None
    return GenerationRequest(
        prompt_ids=tuple(ids),
        options=options,
        stop=_stops(body.get("stop")),
        stream=bool(stream),
        kind=kind,
    )


def _prompt_ids(body: dict[str, Any], *, kind: str, pipe: Pipeline) -> tuple[list[int], str]:
    """The prompt's token ids and the field they came from: chat `messages` in the tokenizer's
    chat template, or a completion `prompt` (text, a one-item list of text, or token ids)."""
    if kind == "chat":
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ApiError("'messages' must be a non-empty list of messages", param="messages")
        chat = [_message(m, i) for i, m in enumerate(messages)]
        return _encode(pipe, chat, chat=True, field="messages"), "messages"
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]  # a batch of one prompt
    if isinstance(prompt, str) and prompt:
        return _encode(pipe, prompt, chat=False, field="prompt"), "prompt"
    if isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        vocab = int(pipe.runtime.vocab_size)
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise ApiError(
                f"prompt token id(s) {bad[:5]} are outside the vocab [0, {vocab})", param="prompt"
            )
        return [int(t) for t in prompt], "prompt"
    raise ApiError(
        "'prompt' must be a non-empty string or a list of token ids (one prompt: n=1)",
        param="prompt",
    )


def _message(item: Any, index: int) -> dict[str, str]:
    """A chat message as {"role", "content"}; content given as text parts is joined."""
    field = f"messages[{index}]"
    if not isinstance(item, dict) or not isinstance(item.get("role"), str):
        raise ApiError(f"{field} must be an object with a 'role' and a 'content'", param=field)
    content = item.get("content")
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
        if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
            raise ApiError(f"{field}.content: only text parts are supported", param=field)
        content = "".join(str(p.get("text", "")) for p in content)
    if not isinstance(content, str):
        raise ApiError(f"{field}.content must be a string or a list of text parts", param=field)
    return {"role": item["role"], "content": content}


def _encode(pipe: Pipeline, prompt: Any, *, chat: bool, field: str) -> list[int]:
    try:
        return pipe.encode(prompt, chat=chat)
    except RedrafterError as e:  # no tokenizer, no chat template, a malformed conversation
        raise ApiError(str(e), param=field) from None


def _stops(stop: Any) -> tuple[str, ...]:
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if (
        not isinstance(stops, list)
        or len(stops) > MAX_STOPS
        or not all(isinstance(s, str) and s for s in stops)
    ):
        raise ApiError(
            f"stop {stop!r} must be a non-empty string or a list of up to {MAX_STOPS} of them",
            param="stop",
        )
    return tuple(stops)


def _number(
    body: dict[str, Any],
    field: str,
    default: float,
    *,
    low: float,
    high: float,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    value = body.get(field)
    if value is None:
        return default
    ok = (
        isinstance(value, numbers.Real)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and (value > low if low_open else value >= low)
        and (value < high if high_open else value <= high)
    )
    if not ok:
        left, right = "(" if low_open else "[", ")" if high_open else "]"
        raise ApiError(
            f"{field} {value!r} must be a number in {left}{low}, {high}{right}", param=field
        )
    return float(value)


def _top_k(body: dict[str, Any], *, vocab: int) -> int | None:
    """The request's `top_k`: None (absent: the library's top-50 warp), an integer >= 1, or
    vLLM's -1 (or 0) for no cut, which is the whole vocab."""
    value = body.get("top_k")
    if value is None:
        return None
    if not _is_int(value) or value < -1:
        raise ApiError(
            f"top_k {value!r} must be an integer >= 1 (-1 or 0: no top-k cut)", param="top_k"
        )
    return vocab if value <= 0 else int(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)
