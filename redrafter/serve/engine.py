"""The scheduler between HTTP requests and the pipeline: this first one decodes serially.

`SerialEngine` owns one decode thread and a bounded queue: requests wait in order, and each is
decoded alone through `Pipeline.stream` (a batch of one), so its output is exactly what the same
request run alone gives. The HTTP layer sees only `Engine.submit` -> `Job` (an async iterator of
`Piece`s ending in one `Finish`) and `Engine.load`; a continuous-batching scheduler (rows joining
a running batch between steps) can replace this class behind the same two calls."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import queue
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Protocol

from redrafter.models.tokenizer import StreamDecoder
from redrafter.pipeline import Pipeline, StopScan
from redrafter.serve.metrics import Metrics
from redrafter.serve.requests import ApiError, GenerationRequest

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Piece:
    """New text of a request's reply, final (never taken back by a later stop string)."""

    text: str


@dataclasses.dataclass(frozen=True)
class Finish:
    """The end of a reply: why ('stop': EOS, a stop id or a stop string; 'length': max_tokens),
    and the tokens it counts (completion tokens: those whose text ends before a stop string)."""

    reason: str
    prompt_tokens: int
    completion_tokens: int


class Job:
    """One request in the engine: the decode thread puts events, the HTTP handler iterates
    them (`async for`); `cancel()` (a client gone) stops its decode at the next step."""

    def __init__(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop) -> None:
        self.request = request
        self._loop = loop
        self._events: asyncio.Queue[Piece | Finish | BaseException] = asyncio.Queue()
        self.cancelled = threading.Event()

    def cancel(self) -> None:
        self.cancelled.set()

    def put(self, event: Piece | Finish | BaseException) -> None:
        """Called from the decode thread: hand an event to the handler's event loop."""
        if not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._events.put_nowait, event)

    async def __aiter__(self) -> AsyncIterator[Piece | Finish]:
        while True:
            event = await self._events.get()
            if isinstance(event, BaseException):
                raise event
            yield event
            if isinstance(event, Finish):
                return


class Engine(Protocol):
    """What the HTTP layer needs from a scheduler."""

    def submit(self, request: GenerationRequest) -> Job:
        """Queue a request (raises `ApiError` 503 when the queue is full); call from the
        event loop's thread."""

    def load(self) -> tuple[int, int]:
        """(requests waiting, requests decoding)."""


class SerialEngine:
    """One decode at a time on `pipe`, the others waiting in a queue of at most `max_queue`."""

    def __init__(self, pipe: Pipeline, *, max_queue: int, metrics: Metrics) -> None:
        self.pipe = pipe
        self.metrics = metrics
        self._queue: queue.Queue[Job | None] = queue.Queue(maxsize=max_queue)
        self._running = 0
        self._thread = threading.Thread(target=self._serve, name="redrafter-decode", daemon=True)
        self._thread.start()

    def submit(self, request: GenerationRequest) -> Job:
        job = Job(request, asyncio.get_running_loop())
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise ApiError(
                f"the server is busy: {self._queue.maxsize} requests are already waiting; "
                "retry later (or start the server with a larger --max-queue)",
                status=503,
                type="server_error",
                code="queue_full",
            ) from None
        self._update_load()
        return job

    def load(self) -> tuple[int, int]:
        return self._queue.qsize(), self._running

    def close(self) -> None:
        """Stop the decode thread after the requests already queued."""
        self._queue.put(None)
        self._thread.join()

    def _update_load(self) -> None:
        waiting, running = self.load()
        self.metrics.set_load(queue_depth=waiting, running=running)

    def _serve(self) -> None:
        while (job := self._queue.get()) is not None:
            self._running = 1
            self._update_load()
            try:
                if not job.cancelled.is_set():
                    for event in self._decode(job):
                        job.put(event)
            except Exception as e:  # the handler answers it; the thread serves on
                log.exception("decode failed")
                job.put(e)
            finally:
                self._running = 0
                self._update_load()

    def _decode(self, job: Job) -> Iterator[Piece | Finish]:
        """Decode one request alone: text pieces as steps are accepted, then its `Finish`."""
        request, pipe = job.request, self.pipe
        options = request.options
        self.metrics.prompt(len(request.prompt_ids))
        scan = StopScan(pipe.tokenizer, request.stop) if request.stop else None
        decoder = (
            StreamDecoder(pipe.tokenizer, skip_special_tokens=True) if pipe.tokenizer else None
        )
        ids: list[int] = []
        sent = 0  # characters of scan.text already sent
        steps = pipe.stream([list(request.prompt_ids)], options)
        try:
            for step in steps:
                new = step.new_tokens[0]
                ids.extend(new)
                self.metrics.step(step, tokens=len(new))
                if scan is not None:
                    scan.push(new)
                    end = scan.safe_length()
                    piece, sent = scan.text[sent:end], end
                else:
                    piece = decoder.push(new) if decoder else ""
                if piece:
                    yield Piece(piece)
                if (scan is not None and scan.stopped) or job.cancelled.is_set():
                    break
        finally:
            steps.close()  # type: ignore[attr-defined]  # ends the decode, frees the lock
        if scan is not None:
            scan.finish()
            if len(scan.text) > sent:
                yield Piece(scan.text[sent:])
            kept = len(scan.kept_ids())
        else:
            tail = decoder.flush() if decoder else ""
            if tail:
                yield Piece(tail)
            kept = len(ids)
        stopped = scan is not None and scan.stopped
        stop_ids = set(options.stop_ids(pipe.eos_token_ids))
        hit_length = len(ids) >= options.max_new_tokens and not (ids and ids[-1] in stop_ids)
        reason = "length" if hit_length and not stopped else "stop"
        yield Finish(reason, len(request.prompt_ids), kept)
