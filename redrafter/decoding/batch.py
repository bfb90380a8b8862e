"""Step-wise decoding: a `DecodeBatch` advances a batch of rows one step at a time, and rows
join and leave between steps (continuous batching, docs/design.md §3.7). `decode` in driver.py
is a batch whose rows all join at once and run to completion; `redrafter serve` keeps one open
and adds each request to a free row as others finish.

Dimensions: B rows of the batch (cache rows), R rows joining, T longest joining prompt,
E hidden, V vocab, P committed length per row.

A row is *free* (no request), *running*, or *finished* (EOS or its token limit reached; it
stays in the batch, committing nothing, until `remove`). Each step runs the runtime over rows
[0, span), span = 1 + the highest occupied row, so free rows at the top cost nothing; a free
row below it is verified with dummy inputs (past length 0) and read by nobody. Acceptance and
sampling see occupied rows only, in row order, with the batch's one generator.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from redrafter.decoding.accept import choose_token
from redrafter.decoding.options import DecodeOptions
from redrafter.decoding.output import OutputStream, Step, pad_prompts, trim
from redrafter.decoding.prefill import PhaseClock, next_logprobs
from redrafter.decoding.runtime import Runtime
from redrafter.errors import ConfigError, PromptError


class DecodeBatch:
    """Rows decoded together on one runtime with one `DecodeOptions` (each row may have its
    own token limit). `rows` cache rows are allocated at once, each holding `row_tokens`
    prompt + generated tokens (plus the slots one step writes past them). Subclasses give
    `extra_slots`, `step` and what a joining row keeps (`_joined`)."""

    kind = ""

    def __init__(
        self,
        runtime: Runtime,
        options: DecodeOptions,
        *,
        rows: int,
        row_tokens: int,
        eos_token_ids: Sequence[int] = (),
    ) -> None:
        if rows < 1 or row_tokens < 2:
            raise ConfigError(
                f"a batch needs rows >= 1 and row_tokens >= 2, got {rows}, {row_tokens}"
            )
        self.runtime, self.options = runtime, options
        self.rows, self.row_tokens = rows, row_tokens
        self.rng = np.random.default_rng(options.sampling.seed)
        self.prompts: list[list[int]] = [[] for _ in range(rows)]
        self.occupied = np.zeros(rows, dtype=bool)  # (B,) rows holding a request
        self.out = OutputStream(
            rows,
            max_new_tokens=options.max_new_tokens,
            eos_token_ids=options.stop_ids(eos_token_ids),
        )
        self.out.finished[:] = True  # a free row generates nothing
        self.past_len = np.zeros(rows, dtype=np.int64)  # (B,) P
        self.token = np.zeros(rows, dtype=np.int64)  # (B,) the LLM's latest token (g0)
        # Plain greedy reads each node's argmax only: (B, N) ids from the runtime, not (B, N, V)
        # logits (on a GPU they stay on the device). Penalties and log-probs need the logits.
        sampling = options.sampling
        self.argmax_only = sampling.greedy and not sampling.penalised and not options.logprobs
        runtime.reset(batch=rows, capacity=row_tokens + self.extra_slots)

    @property
    def extra_slots(self) -> int:
        """Cache slots one step writes past a row's committed tokens."""
        raise NotImplementedError

    @property
    def free_rows(self) -> list[int]:
        return [int(b) for b in np.flatnonzero(~self.occupied)]

    @property
    def done(self) -> bool:
        """No occupied row is still generating."""
        return self.out.done

    @property
    def finished(self) -> list[int]:
        """Occupied rows that finished (EOS, a stop id or their token limit)."""
        return [int(b) for b in np.flatnonzero(self.occupied & self.out.finished)]

    def tokens(self, row: int) -> list[int]:
        """What `row` generated so far."""
        return self.out.tokens[row]

    def add(
        self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int | None = None
    ) -> tuple[list[int], Step]:
        """Prefill `prompts` into the lowest free rows; the others' caches and committed lengths
        stay as they are. Each new row generates at most `max_new_tokens` tokens (default the
        options'). Returns the rows taken and a "prefill" `Step` with each new row's first
        token (every other row's entry empty)."""
        limit = self.options.max_new_tokens if max_new_tokens is None else int(max_new_tokens)
        free = self.free_rows
        if len(prompts) > len(free):
            raise ConfigError(f"{len(prompts)} prompts but {len(free)} free rows in the batch")
        runtime, sampling = self.runtime, self.options.sampling
        tokens, lengths = pad_prompts(
            prompts,
            vocab_size=runtime.vocab_size,
            context_length=runtime.context_length,
            max_new_tokens=limit,
        )  # (R, T), (R,)
        if int(lengths.max()) + limit > self.row_tokens:
            raise PromptError(
                f"a prompt of {int(lengths.max())} tokens + max_new_tokens {limit} exceeds this "
                f"batch's {self.row_tokens} tokens per row; open a batch with more row_tokens"
            )
        rows = free[: len(prompts)]
        clock = PhaseClock()
        if len(rows) == self.rows:  # the whole batch at once: one call over every row
            logits, hidden = runtime.prefill(tokens, lengths)  # (B, V), (B, E)
        else:
            logits, hidden = runtime.prefill_rows(np.array(rows), tokens, lengths)  # (R, ·)
        clock.lap("prefill")
        none: list[list[int]] = [[] for _ in prompts]  # nothing generated yet
        g0 = choose_token(logits, sampling, self.rng, prompts=prompts, generated=none)  # (R,)
        lp = None
        if self.options.logprobs:
            lp = next_logprobs(logits, g0, sampling, prompts=prompts, generated=none)
        for r, b in enumerate(rows):
            self.prompts[b] = [int(t) for t in prompts[r]]
            self.occupied[b] = True
            self.out.open_row(b, max_new_tokens=limit)
        self.past_len[rows], self.token[rows] = lengths, g0
        self._joined(rows, hidden)
        per_row = self._per_row(rows, [[int(t)] for t in g0])
        new = self.out.emit(per_row)
        logprobs = None if lp is None else self._per_row(rows, lp)
        step = Step(new, np.zeros(self.rows, np.int64), clock.seconds, "prefill")
        step.logprobs = trim(logprobs, new)
        return rows, step

    def remove(self, rows: Sequence[int]) -> None:
        """Free `rows` (finished or abandoned): their slots take the next joining prompts."""
        for b in rows:
            if not self.occupied[b]:
                raise ConfigError(
                    f"row {b} is not occupied; occupied: {np.flatnonzero(self.occupied).tolist()}"
                )
            self.occupied[b] = False
            self.prompts[b] = []
            self.out.close_row(b)
            self.past_len[b] = self.token[b] = 0

    def step(self) -> Step:
        """One decode step of every occupied row."""
        raise NotImplementedError

    def one_token_step(self) -> tuple[Step, np.ndarray]:
        """One token per decoding row: verify g0 alone at slot P, which is where its cache
        belongs, and choose the next token from its logits. Returns the step and the hidden
        states (B, 1, E) at g0 (what a speculative batch drafts from next). The autoregressive
        batch's step, and a speculative batch's when more rows decode than it speculates for."""
        sampling, options = self.options.sampling, self.options
        B, live = self._live()  # rows [0, B) run; sampling reads the occupied ones (R,)
        token, past_len = self.token[:B], self.past_len[:B]  # (B,), (B,)
        clock = PhaseClock()
        self_only = np.ones((B, 1, 1), dtype=bool)  # (B, 1, 1)
        args = (token[:, None], past_len[:, None], self_only, past_len)
        if self.argmax_only:
            ids, hidden = self.runtime.verify_greedy(*args)  # (B, 1), (B, 1, E)
        else:
            logits, hidden = self.runtime.verify(*args)  # (B, 1, V), (B, 1, E)
        clock.lap("verify")
        # The token was written at slot P, where it belongs: commit is bookkeeping only.
        self.past_len[:B] += ~self.out.finished[:B]
        prompts = [self.prompts[b] for b in live]
        generated = [self.out.tokens[b] for b in live]
        if self.argmax_only:
            chosen = ids[live, 0]  # (R,)
        else:
            row_logits = logits[live, 0]  # (R, V)
            chosen = choose_token(
                row_logits, sampling, self.rng, prompts=prompts, generated=generated
            )
        lp = None
        if options.logprobs:
            lp = next_logprobs(row_logits, chosen, sampling, prompts=prompts, generated=generated)
        self.token[live] = chosen
        clock.lap("accept")
        new = self.out.emit(self._per_row(live, [[int(t)] for t in chosen]))
        one_each = np.zeros(self.rows, np.int64)
        one_each[live] = 1
        logprobs = trim(None if lp is None else self._per_row(live, lp), new)
        step = Step(
            new, np.zeros(self.rows, np.int64), clock.seconds, "autoregressive", one_each, logprobs
        )
        return step, hidden

    def _joined(self, rows: list[int], hidden: np.ndarray) -> None:
        """Keep what a step needs of new rows' prefill: hidden (R, E) at their last token."""

    def _live(self) -> tuple[int, np.ndarray]:
        """(span, occupied rows below it): the runtime runs rows [0, span) and acceptance the
        occupied ones (R,)."""
        occupied = np.flatnonzero(self.occupied)
        if not len(occupied):
            raise ConfigError("the batch has no rows to decode; add() a prompt first")
        return int(occupied[-1]) + 1, occupied

    def _per_row(self, rows: Sequence[int], values: Sequence[list]) -> list[list]:
        """values[r] at row rows[r], an empty list at every other row of the batch."""
        out: list[list] = [[] for _ in range(self.rows)]
        for r, b in enumerate(rows):
            out[b] = values[r]
        return out

    def _padded(self, values: np.ndarray, span: int) -> np.ndarray:
        """(span,) per-row values -> (B,), zeros past the span."""
        out = np.zeros(self.rows, dtype=values.dtype)
        out[:span] = values
        return out
