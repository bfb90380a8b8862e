"""The HTTP layer: OpenAI's /v1/chat/completions, /v1/completions and /v1/models, plus /health
and /metrics, on FastAPI. Streams are server-sent events, one chunk per text piece the engine
accepts, then `data: [DONE]`. Every refusal is an OpenAI-shaped error body; an unexpected
failure is logged and answered as a 500 with a one-line body (no traceback leaves the server)."""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from redrafter.decoding.options import DecodeOptions
from redrafter.pipeline import Pipeline
from redrafter.serve.engine import BatchEngine, Engine, Finish, Job, Piece
from redrafter.serve.metrics import CONTENT_TYPE, Metrics
from redrafter.serve.requests import ApiError, GenerationRequest, parse_request

log = logging.getLogger(__name__)

ENDPOINTS = {"chat": "/v1/chat/completions", "completion": "/v1/completions"}


def create_app(
    pipe: Pipeline,
    *,
    options: DecodeOptions,
    model: str,
    max_queue: int = 64,
    max_batch: int = 4,
    engine: Engine | None = None,
) -> FastAPI:
    """The server for `pipe`. `options`: the decode mode and beam every request uses (each
    request sets its own max_tokens and sampling); `model`: the id clients name; `max_queue`:
    requests allowed to wait for the decoder before 503s; `max_batch`: rows decoded together;
    `engine`: the scheduler (default a `BatchEngine`: continuous batching)."""
    metrics = Metrics()
    engine = engine or BatchEngine(pipe, max_batch=max_batch, max_queue=max_queue, metrics=metrics)
    created = int(time.time())
    app = FastAPI(title="redrafter", docs_url=None, redoc_url=None)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error answering %s", request.url.path)
        err = ApiError("internal server error; see the server log", status=500, type="server_error")
        return JSONResponse(err.body(), status_code=500)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        waiting, running = engine.load()
        # pid: which replica answered (one runtime per process: docs/serve.md, Scale-out)
        return {
            "status": "ok",
            "model": model,
            "queue_depth": waiting,
            "running": running,
            "pid": os.getpid(),
        }

    @app.get("/metrics")
    async def get_metrics() -> Response:
        return PlainTextResponse(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        card = {"id": model, "object": "model", "created": created, "owned_by": "redrafter"}
        return {"object": "list", "data": [card]}

    async def generate(request: Request, kind: str) -> Response:
        try:
            try:
                body = await request.json()
            except ValueError:
                raise ApiError("the request body is not valid JSON") from None
            parsed = parse_request(body, kind=kind, pipe=pipe, base=options, model=model)
            job = engine.submit(parsed)
        except ApiError as e:
            metrics.request(kind, e.status)
            return JSONResponse(e.body(), status_code=e.status)
        metrics.request(kind, 200)
        reply = _Reply(parsed, model)
        if parsed.stream:
            return StreamingResponse(_sse(job, reply), media_type="text/event-stream")
        try:
            text, finish = await _collect(job)
        finally:
            job.cancel()  # a handler cancelled by a disconnect stops the decode
        return JSONResponse(reply.whole(text, finish))

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await generate(request, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await generate(request, "completion")

    return app


async def _collect(job: Job) -> tuple[str, Finish]:
    parts: list[str] = []
    async for event in job:
        if isinstance(event, Piece):
            parts.append(event.text)
        else:
            return "".join(parts), event
    raise AssertionError("a job ends with a Finish")


async def _sse(job: Job, reply: _Reply) -> AsyncIterator[str]:
    """The stream's events; a client that goes away cancels the job (its decode stops)."""
    try:
        if reply.kind == "chat":  # OpenAI opens a chat stream with the assistant role
            yield _event(reply.chunk({"role": "assistant", "content": ""}))
        async for event in job:
            if isinstance(event, Piece):
                yield _event(reply.chunk(event.text))
            else:
                yield _event(reply.chunk(None, finish=event))
    except Exception:  # the status line is sent: report the failure in the stream
        log.exception("stream failed")
        err = ApiError("internal server error; see the server log", status=500, type="server_error")
        yield _event(err.body())
    finally:
        job.cancel()
    yield "data: [DONE]\n\n"


def _event(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


class _Reply:
    """The response objects of one request, in OpenAI's shapes (chat or text completion)."""

    def __init__(self, request: GenerationRequest, model: str) -> None:
        self.kind = request.kind
        prefix = "chatcmpl" if self.kind == "chat" else "cmpl"
        self.id = f"{prefix}-{uuid.uuid4().hex}"
        self.model = model
        self.created = int(time.time())

    def _head(self, object: str) -> dict[str, Any]:
        return {"id": self.id, "object": object, "created": self.created, "model": self.model}

    @staticmethod
    def usage(finish: Finish) -> dict[str, int]:
        return {
            "prompt_tokens": finish.prompt_tokens,
            "completion_tokens": finish.completion_tokens,
            "total_tokens": finish.prompt_tokens + finish.completion_tokens,
        }

    def whole(self, text: str, finish: Finish) -> dict[str, Any]:
        """A non-streamed response."""
        if self.kind == "chat":
            choice: dict[str, Any] = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": finish.reason,
                "logprobs": None,
            }
            out = self._head("chat.completion")
        else:
            choice = {"index": 0, "text": text, "finish_reason": finish.reason, "logprobs": None}
            out = self._head("text_completion")
        return {**out, "choices": [choice], "usage": self.usage(finish)}

    def chunk(self, delta: str | dict[str, str] | None, *, finish: Finish | None = None) -> dict:
        """A streamed chunk: new text (`delta`), or the last one carrying `finish` and usage."""
        reason = finish.reason if finish else None
        if self.kind == "chat":
            content = (
                delta if isinstance(delta, dict) else ({} if delta is None else {"content": delta})
            )
            choice: dict[str, Any] = {"index": 0, "delta": content, "finish_reason": reason}
            out = self._head("chat.completion.chunk")
        else:
            choice = {"index": 0, "text": delta or "", "finish_reason": reason, "logprobs": None}
            out = self._head("text_completion")
        out["choices"] = [choice]
        if finish is not None:  # usage in every response: on the final chunk
            out["usage"] = self.usage(finish)
        return out
