"""The autoregressive baseline: one verify call per token on the same runtime, same cache,
same sampling rule, so speculative and autoregressive runs compare like for like. Reached
through `driver.decode` with `DecodeOptions(speculative=False)` (or `driver.open_batch`).

Dimensions: B rows of the batch, R occupied rows, V vocab, P committed length per row."""

from __future__ import annotations

import numpy as np

from redrafter.decoding.accept import choose_token
from redrafter.decoding.batch import DecodeBatch
from redrafter.decoding.output import Step, trim
from redrafter.decoding.prefill import PhaseClock, next_logprobs


class AutoregressiveBatch(DecodeBatch):
    """One token per row and step: verify g0 alone at slot P; it is the next token's cache."""

    kind = "autoregressive"

    @property
    def extra_slots(self) -> int:
        return 1

    def step(self) -> Step:
        sampling, options = self.options.sampling, self.options
        B, live = self._live()  # rows [0, B) run; sampling reads the occupied ones (R,)
        token, past_len = self.token[:B], self.past_len[:B]  # (B,), (B,)
        clock = PhaseClock()
        self_only = np.ones((B, 1, 1), dtype=bool)  # (B, 1, 1)
        args = (token[:, None], past_len[:, None], self_only, past_len)
        if self.argmax_only:
            ids, _ = self.runtime.verify_greedy(*args)  # (B, 1)
        else:
            logits, _ = self.runtime.verify(*args)  # (B, 1, V)
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
        return Step(
            new, np.zeros(self.rows, np.int64), clock.seconds, self.kind, one_each, logprobs
        )
