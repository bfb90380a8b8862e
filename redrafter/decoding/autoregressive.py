"""The autoregressive baseline: one verify call per token on the same runtime, same cache,
same sampling rule, so speculative and autoregressive runs compare like for like. Reached
through `driver.decode` with `DecodeOptions(speculative=False)` (or `driver.open_batch`).

Dimensions: B rows of the batch, R occupied rows, V vocab, P committed length per row."""

from __future__ import annotations

from redrafter.decoding.batch import DecodeBatch
from redrafter.decoding.output import Step


class AutoregressiveBatch(DecodeBatch):
    """One token per row and step: verify g0 alone at slot P; it is the next token's cache."""

    kind = "autoregressive"

    @property
    def extra_slots(self) -> int:
        return 1

    def step(self) -> Step:
        return self.one_token_step()[0]
