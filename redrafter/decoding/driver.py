"""The ReDrafter decode loop (docs/design.md §3), written once for every runtime, and `decode`, the
one entry point that every caller (pipeline, bench, validate, train, benchmarks) goes through.

Dimensions: B batch, W beam width, L beam length, N packed tokens, E hidden, V vocab,
P committed length per row.

Each step (`SpeculativeBatch.step`): draft a beam from the last accepted hidden state, pack it
into a tree, verify the tree in one LLM pass, accept the longest agreeing prefix, commit it to
the KV cache; with more decoding rows than `speculate_max_rows`, a step verifies g0 alone per
row instead. The LLM's own token g0 is emitted as soon as it is known; a step emits the
accepted drafts plus the next g0. `decode` runs a batch's steps to completion; `redrafter
serve` steps one batch whose rows come and go (batch.py).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from redrafter.decoding.accept import accept, accept_greedy
from redrafter.decoding.autoregressive import AutoregressiveBatch
from redrafter.decoding.batch import DecodeBatch
from redrafter.decoding.kv_cache import commit_plan
from redrafter.decoding.lookup import add_lookup_beam, padded_length
from redrafter.decoding.options import DecodeOptions
from redrafter.decoding.output import Step, pad_prompts, trim
from redrafter.decoding.prefill import PhaseClock
from redrafter.decoding.prune import prune
from redrafter.decoding.runtime import Runtime, drafted_log_probs
from redrafter.decoding.tree import pack, unpack


def decode(
    runtime: Runtime,
    prompts: Sequence[Sequence[int]],
    options: DecodeOptions = DecodeOptions(),
    *,
    eos_token_ids: Sequence[int] = (),
) -> Iterator[Step]:
    """Decode token-id prompts (a batch; ragged lengths are fine) on `runtime` as `options`
    say, yielding one `Step` per runtime round trip; a row stops at any of `eos_token_ids`
    (unless `options.ignore_eos`) or `options.stop_token_ids` (the stop id kept), or after
    `options.max_new_tokens` tokens."""
    pad_prompts(  # the prompts' one-line errors before any cache is sized for them
        prompts,
        vocab_size=runtime.vocab_size,
        context_length=runtime.context_length,
        max_new_tokens=options.max_new_tokens,
    )
    row_tokens = max(len(p) for p in prompts) + options.max_new_tokens
    batch = open_batch(
        runtime, options, rows=len(prompts), row_tokens=row_tokens, eos_token_ids=eos_token_ids
    )
    yield batch.add(prompts)[1]
    while not batch.done:
        yield batch.step()


def open_batch(
    runtime: Runtime,
    options: DecodeOptions,
    *,
    rows: int,
    row_tokens: int,
    eos_token_ids: Sequence[int] = (),
) -> DecodeBatch:
    """An empty batch of `rows` cache rows of `row_tokens` prompt + generated tokens each,
    speculative or autoregressive as `options` say (batch.py)."""
    kind = SpeculativeBatch if options.speculative else AutoregressiveBatch
    return kind(runtime, options, rows=rows, row_tokens=row_tokens, eos_token_ids=eos_token_ids)


class SpeculativeBatch(DecodeBatch):
    """The speculative loop's step: draft -> pack -> verify -> accept -> commit."""

    kind = "speculative"

    def __init__(
        self,
        runtime: Runtime,
        options: DecodeOptions,
        *,
        rows: int,
        row_tokens: int,
        eos_token_ids: Sequence[int] = (),
    ) -> None:
        o = options
        self.K = o.beam.length  # the beams' length, once the lookup beam (if any) is added
        if o.prompt_lookup:  # capped where the runtime's commit takes only so many rows (Core ML)
            self.K = padded_length(
                self.K,
                max_length=runtime.max_beam_length,
                span_per_ngram=o.lookup_span,
                max_ngram=o.lookup_max_ngram,
            )
        self.context: np.ndarray | None = None  # (B, E) hidden state at each row's last token
        super().__init__(
            runtime, options, rows=rows, row_tokens=row_tokens, eos_token_ids=eos_token_ids
        )

    @property
    def extra_slots(self) -> int:
        return (self.options.beam.width + self.options.prompt_lookup) * self.K

    def _joined(self, rows: list[int], hidden: np.ndarray) -> None:
        if self.context is None:
            self.context = np.zeros((self.rows, hidden.shape[-1]), np.float32)
        self.context[rows] = hidden

    def _one_token_now(self) -> bool:
        """More rows are decoding than `options.speculate_max_rows` allows trees for."""
        limit = self.options.speculate_max_rows
        return limit is not None and int((self.occupied & ~self.out.finished).sum()) > limit

    def step(self) -> Step:
        o, sampling, runtime = self.options, self.options.sampling, self.runtime
        B, live = self._live()  # rows [0, B) run; acceptance reads the occupied ones (R,)
        assert self.context is not None
        if self._one_token_now():  # too many rows for trees to pay: g0 alone, no drafter
            step, hidden = self.one_token_step()
            self.context[:B] = hidden[:, 0]  # (B, E) at g0, the last committed token
            return step
        pick = (lambda a: a) if len(live) == B else (lambda a: a[live])  # (B, ...) -> (R, ...)
        g0, context, past_len = self.token[:B], self.context[:B], self.past_len[:B]  # (B,), ...
        clock = PhaseClock()
        if not sampling.greedy and sampling.acceptance == "apple":  # reads the drafts' Q
            beams, q = runtime.draft(context, g0, o.beam)  # (B, W, L), (B, W, L-1, V)
            log_p = drafted_log_probs(beams, q)  # (B, W, L-1)
        else:
            (beams, log_p), q = runtime.draft_tokens(context, g0, o.beam), None
        beams = prune(beams, log_p, min_prob=o.min_draft_prob)  # ragged (B, W, L)
        if o.prompt_lookup:  # one more beam (B, W+1, K)
            histories = [[*self.prompts[b], *self.out.tokens[b]] for b in range(B)]
            beams, q = add_lookup_beam(
                beams,
                q,
                histories,
                length=self.K,
                span_per_ngram=o.lookup_span,
                min_ngram=o.lookup_min_ngram,
                max_ngram=o.lookup_max_ngram,
            )
        clock.lap("draft")
        tree = pack(beams, packing=o.packing)
        args = (tree.tokens, past_len[:, None] + tree.depth, tree.tree_mask, past_len)
        if self.argmax_only:
            ids, hidden = runtime.verify_greedy(*args)  # (B, N), (B, N, E)
            clock.lap("verify")
            acc = accept_greedy(pick(beams), pick(unpack(ids, tree.unpacker)))
        else:
            logits, hidden = runtime.verify(*args)  # (B, N, V), (B, N, E)
            clock.lap("verify")
            acc = accept(
                pick(beams),
                pick(logits),
                pick(tree.unpacker),
                None if q is None else pick(q),
                sampling,
                self.rng,
                prompts=[self.prompts[b] for b in live],
                generated=[self.out.tokens[b] for b in live],
                logprobs=o.logprobs,
            )  # penalties read each node's history: prompt, tokens so far (ending in g0), path
        clock.lap("accept")
        beam, n = np.zeros(B, np.int64), np.zeros(B, np.int64)  # (B,): free rows keep beam 0
        beam[live], n[live] = acc.beam, acc.n
        source, count = commit_plan(tree.unpacker, beam, n, ~self.out.finished[:B])
        K = source.shape[1]  # every row of the batch is given (count 0 past the span)
        full_source = np.tile(np.arange(K), (self.rows, 1))  # (B_all, K)
        full_source[:B] = source
        runtime.commit(self.past_len, full_source, self._padded(count, B))
        self.past_len[:B] += count
        rows = np.arange(B)
        self.context[:B] = hidden[rows, tree.unpacker[rows, beam, n]]  # (B, E) at the last kept
        self.token[live] = acc.next_token
        emitted = [[*beams[b, beam[b], 1 : n[b] + 1], self.token[b]] for b in live]
        clock.lap("commit")
        new = self.out.emit(self._per_row(live, emitted))
        lp = trim(None if acc.logprobs is None else self._per_row(live, acc.logprobs), new)
        verified = self._padded(tree.sizes, B)
        return Step(new, self._padded(n, B), clock.seconds, "speculative", verified, lp)
