"""The scheduler between HTTP requests and the pipeline: continuous batching (docs/serve.md).

`BatchEngine` owns one decode thread, a bounded FIFO queue and at most one open `DecodeBatch`
(decoding/batch.py) on the pipeline's runtime. Between two decode steps one waiting request
joins the batch (prefilled into a free row while the other rows keep their caches), and rows
leave as soon as they end (EOS, a stop string, max_tokens, a client gone). The HTTP layer sees
only `Engine.submit` -> `Job` (an async iterator of `Piece`s ending in one `Finish`) and
`Engine.load`.

The batching rule: requests share a batch only when their decode options are identical apart
from max_tokens and stop strings (same temperature, top_p, penalties: one sampling rule per
step), and only if the request fits the batch's rows (prompt + max_tokens <= the row length
chosen when the batch opened: a power of two >= 256 that fits its first requests, at most the
model's context). The queue is strictly FIFO: a request that cannot join waits at the head,
and those behind it wait too, until the running rows drain and a batch opens for it. A sampled
request with a seed decodes in a batch of its own (one row), so it reproduces exactly what the
same request gives alone; greedy rows give what they give alone in any batch."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import threading
from collections import deque
from collections.abc import AsyncIterator, Sequence
from typing import Protocol

from redrafter.config import TOP_K
from redrafter.decoding.batch import DecodeBatch
from redrafter.decoding.driver import open_batch
from redrafter.decoding.options import DecodeOptions
from redrafter.decoding.output import Step
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


MIN_ROW_TOKENS = 256  # the shortest row a batch opens with (prompt + generated tokens)


def row_tokens_for(requests: Sequence[GenerationRequest], *, context_length: int) -> int:
    """The row length a batch opens with: the smallest power of two >= MIN_ROW_TOKENS that
    holds every request's prompt + max_tokens, at most `context_length`."""
    need = max(len(r.prompt_ids) + r.options.max_new_tokens for r in requests)
    size = MIN_ROW_TOKENS
    while size < need:
        size *= 2
    return min(size, context_length)


def batch_key(options: DecodeOptions) -> DecodeOptions | None:
    """What rows sharing a batch must agree on: the options less max_tokens (and, for greedy
    rows, less what greedy ignores: seed, top_k, top_p, min_p); None for a seeded sampled
    request, which shares with nobody (its draws must not depend on other rows)."""
    sampling = options.sampling
    if not sampling.greedy and sampling.seed is not None:
        return None
    if sampling.greedy:
        sampling = dataclasses.replace(sampling, seed=None, top_k=TOP_K, top_p=1.0, min_p=0.0)
    return options.replace(max_new_tokens=1, sampling=sampling)


class BatchEngine:
    """Continuous batching on `pipe`: up to `max_batch` rows decode together, up to `max_queue`
    requests wait (more get a 503). One decode thread runs the batch (module docstring)."""

    def __init__(
        self, pipe: Pipeline, *, max_batch: int = 4, max_queue: int, metrics: Metrics
    ) -> None:
        self.pipe = pipe
        self.metrics = metrics
        self.max_batch = max_batch
        self.max_queue = max_queue
        self._cond = threading.Condition()
        self._waiting: deque[Job] = deque()  # guarded by _cond
        self._admitting = 0  # jobs taken from the queue, not yet in a row
        self._closing = False
        self._batch: DecodeBatch | None = None  # touched by the decode thread only
        self._rows: dict[int, _Row] = {}  # batch row -> its request
        self._hold = contextlib.ExitStack()  # the pipeline's lock while a batch is open
        self._thread = threading.Thread(target=self._serve, name="redrafter-decode", daemon=True)
        self._thread.start()

    def submit(self, request: GenerationRequest) -> Job:
        job = Job(request, asyncio.get_running_loop())
        with self._cond:
            if len(self._waiting) >= self.max_queue:
                raise ApiError(
                    f"the server is busy: {self.max_queue} requests are already waiting; "
                    "retry later (or start the server with a larger --max-queue)",
                    status=503,
                    type="server_error",
                    code="queue_full",
                )
            self._waiting.append(job)
            self._cond.notify()
        self._update_load()
        return job

    def load(self) -> tuple[int, int]:
        with self._cond:
            return len(self._waiting), len(self._rows) + self._admitting

    def close(self) -> None:
        """Stop the decode thread once the queued and running requests are done."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join()

    def _update_load(self) -> None:
        waiting, running = self.load()
        rows = self._batch.rows if self._batch is not None else 0
        self.metrics.set_load(queue_depth=waiting, running=running, batch_rows=rows)

    # -- the decode thread ------------------------------------------------------------------
    def _serve(self) -> None:
        while (joining := self._take()) is not None:
            try:
                if joining:
                    self._join(joining)
                if self._rows:
                    self._step()
            except Exception as e:  # every affected handler answers it; the thread serves on
                log.exception("decode failed")
                for job in [*joining, *(r.job for r in self._rows.values())]:
                    job.put(e)
                self._rows.clear()
                self._close_batch()
            finally:
                with self._cond:
                    self._admitting = 0
                self._update_load()
        self._close_batch()

    def _take(self) -> list[Job] | None:
        """The jobs to prefill before the next step (strict FIFO; at most one while rows run,
        so a join stalls the others by one prefill); waits while idle; None once closed."""
        with self._cond:
            while True:
                while self._waiting and self._waiting[0].cancelled.is_set():
                    self._waiting.popleft()  # a client gone before its turn
                if self._rows or self._waiting:
                    break
                if self._closing:
                    return None
                if self._batch is not None:
                    self._close_batch()  # let other users of the pipeline in while idle
                self._update_load_locked()
                self._cond.wait()
            if not self._waiting:
                return []
            head = self._waiting[0]
            if self._batch is not None and not self._rows:
                self._close_batch()  # drained: the next batch opens for the head
            if self._batch is None:
                take = [self._waiting.popleft()]
                key = batch_key(head.request.options)
                while (
                    key is not None
                    and self._waiting
                    and len(take) < self.max_batch
                    and batch_key(self._waiting[0].request.options) == key
                ):
                    take.append(self._waiting.popleft())
            elif self._joins(head.request):
                take = [self._waiting.popleft()]
            else:
                take = []
            self._admitting = len(take)
            return take

    def _update_load_locked(self) -> None:
        rows = self._batch.rows if self._batch is not None else 0
        self.metrics.set_load(
            queue_depth=len(self._waiting),
            running=len(self._rows) + self._admitting,
            batch_rows=rows,
        )

    def _joins(self, request: GenerationRequest) -> bool:
        """Whether `request` may join the open batch now (the module docstring's rule)."""
        batch = self._batch
        assert batch is not None
        key = batch_key(request.options)
        return (
            key is not None
            and key == batch_key(batch.options)
            and bool(batch.free_rows)
            and len(request.prompt_ids) + request.options.max_new_tokens <= batch.row_tokens
        )

    def _join(self, jobs: list[Job]) -> None:
        """Prefill `jobs` into free rows, opening a batch for them if none is open."""
        requests = [job.request for job in jobs]
        if self._batch is None:
            runtime = self._hold.enter_context(self.pipe.exclusive())  # waits for other users
            first = requests[0].options
            self._batch = open_batch(
                runtime,
                first,
                rows=self.max_batch if batch_key(first) is not None else 1,
                row_tokens=row_tokens_for(requests, context_length=runtime.context_length),
                eos_token_ids=self.pipe.eos_token_ids,
            )
        limits = {r.options.max_new_tokens for r in requests}
        groups = [jobs] if len(limits) == 1 else [[job] for job in jobs]  # one add per limit
        for group in groups:
            live = [j for j in group if not j.cancelled.is_set()]
            if not live:
                continue
            for job in live:
                self.metrics.prompt(len(job.request.prompt_ids))
            rows, step = self._batch.add(
                [list(j.request.prompt_ids) for j in live],
                max_new_tokens=live[0].request.options.max_new_tokens,
            )
            for row, job in zip(rows, live, strict=True):
                self._rows[row] = _Row(job, self.pipe)
            self._dispatch(step)

    def _step(self) -> None:
        assert self._batch is not None
        self._dispatch(self._batch.step())

    def _dispatch(self, step: Step) -> None:
        """Hand each row's new tokens to its request; rows that ended leave the batch."""
        assert self._batch is not None
        rows = [b for b, new in enumerate(step.new_tokens) if new]
        tokens = sum(len(step.new_tokens[b]) for b in rows)
        self.metrics.step(step, tokens=tokens, rows=len(rows))
        finished = set(self._batch.finished)
        for b, row in list(self._rows.items()):
            row.push(step.new_tokens[b])
            if b in finished or row.stopped or row.job.cancelled.is_set():
                row.finish(self.pipe.eos_token_ids)
                self._batch.remove([b])
                del self._rows[b]

    def _close_batch(self) -> None:
        self._batch = None
        self._hold.close()  # releases the pipeline's lock


class _Row:
    """One request's reply as its row's tokens arrive: text pieces (held back while they could
    begin a stop string), then its `Finish`."""

    def __init__(self, job: Job, pipe: Pipeline) -> None:
        self.job, request = job, job.request
        self.scan = StopScan(pipe.tokenizer, request.stop) if request.stop else None
        self.decoder = (
            StreamDecoder(pipe.tokenizer, skip_special_tokens=True) if pipe.tokenizer else None
        )
        self.ids: list[int] = []
        self.sent = 0  # characters of scan.text already sent

    @property
    def stopped(self) -> bool:
        """A stop string appeared in the text."""
        return self.scan is not None and self.scan.stopped

    def push(self, new: list[int]) -> None:
        if not new or self.stopped:
            return
        self.ids.extend(new)
        if self.scan is not None:
            self.scan.push(new)
            end = self.scan.safe_length()
            piece, self.sent = self.scan.text[self.sent : end], end
        else:
            piece = self.decoder.push(new) if self.decoder else ""
        if piece:
            self.job.put(Piece(piece))

    def finish(self, eos_token_ids: Sequence[int]) -> None:
        """The rest of the text, then the `Finish`."""
        request, options = self.job.request, self.job.request.options
        if self.scan is not None:
            self.scan.finish()
            if len(self.scan.text) > self.sent:
                self.job.put(Piece(self.scan.text[self.sent :]))
            kept = len(self.scan.kept_ids())
        else:
            tail = self.decoder.flush() if self.decoder else ""
            if tail:
                self.job.put(Piece(tail))
            kept = len(self.ids)
        ids, stop_ids = self.ids, set(options.stop_ids(eos_token_ids))
        hit_length = len(ids) >= options.max_new_tokens and not (ids and ids[-1] in stop_ids)
        reason = "length" if hit_length and not self.stopped else "stop"
        self.job.put(Finish(reason, len(request.prompt_ids), kept))
