"""The autoregressive baseline: one verify call per token on the same runtime, same cache,
same sampling rule, so speculative and autoregressive runs compare like for like."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence

import numpy as np

from redrafter.config import SamplingParams
from redrafter.decoding.accept import choose_token
from redrafter.decoding.driver import prefill
from redrafter.decoding.output import OutputStream, Step
from redrafter.decoding.runtime import Runtime


def autoregressive_decode(
    runtime: Runtime,
    prompts: Sequence[Sequence[int]],
    *,
    sampling: SamplingParams = SamplingParams(),
    max_new_tokens: int = 64,
    eos_token_ids: Sequence[int] = (),
) -> Iterator[Step]:
    """Generate one token per step, yielding a `Step` each time."""
    rng = np.random.default_rng(sampling.seed)
    token, _, past_len, t = prefill(
        runtime, prompts, extra_slots=1, max_new_tokens=max_new_tokens, sampling=sampling, rng=rng
    )
    B = len(prompts)
    out = OutputStream(B, max_new_tokens=max_new_tokens, eos_token_ids=eos_token_ids)
    no_drafts, one_each = np.zeros(B, np.int64), np.ones(B, np.int64)
    self_only = np.ones((B, 1, 1), dtype=bool)  # (B, 1, 1)
    yield Step(out.emit(token[:, None]), no_drafts, {"prefill": t}, "prefill")
    while not out.done:
        t0 = time.perf_counter()
        logits, _ = runtime.verify(token[:, None], past_len[:, None], self_only, past_len)
        t1 = time.perf_counter()
        # The token was written at slot P, where it belongs: commit is bookkeeping only.
        past_len = past_len + ~out.finished
        token = choose_token(logits[:, 0], sampling, rng)  # (B,)
        seconds = {"verify": t1 - t0, "accept": time.perf_counter() - t1}
        yield Step(out.emit(token[:, None]), no_drafts, seconds, "autoregressive", one_each)
