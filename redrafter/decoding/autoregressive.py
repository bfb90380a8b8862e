"""The autoregressive baseline: one verify call per token on the same runtime, same cache,
same sampling rule, so speculative and autoregressive runs compare like for like. Reached
through `driver.decode` with `DecodeOptions(speculative=False)`."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from redrafter.decoding.accept import choose_token
from redrafter.decoding.options import DecodeOptions
from redrafter.decoding.output import OutputStream, Step, trim
from redrafter.decoding.prefill import PhaseClock, next_logprobs, prefill
from redrafter.decoding.runtime import Runtime


def autoregressive_decode(
    runtime: Runtime,
    prompts: Sequence[Sequence[int]],
    options: DecodeOptions,
    *,
    eos_token_ids: Sequence[int] = (),
) -> Iterator[Step]:
    """Generate one token per step, yielding a `Step` each time."""
    sampling, rng = options.sampling, np.random.default_rng(options.sampling.seed)
    token, lp, _, past_len, seconds = prefill(
        runtime,
        prompts,
        extra_slots=1,
        max_new_tokens=options.max_new_tokens,
        sampling=sampling,
        rng=rng,
        logprobs=options.logprobs,
    )
    B = len(prompts)
    out = OutputStream(B, max_new_tokens=options.max_new_tokens, eos_token_ids=eos_token_ids)
    no_drafts, one_each = np.zeros(B, np.int64), np.ones(B, np.int64)
    self_only = np.ones((B, 1, 1), dtype=bool)  # (B, 1, 1)
    new = out.emit(token[:, None])
    yield Step(new, no_drafts, seconds, "prefill", logprobs=trim(lp, new))
    # Plain greedy reads the argmax only: (B, 1) ids from the runtime, not (B, 1, V) logits.
    argmax_only = sampling.greedy and not sampling.penalised and not options.logprobs
    while not out.done:
        clock = PhaseClock()
        args = (token[:, None], past_len[:, None], self_only, past_len)
        if argmax_only:
            ids, _ = runtime.verify_greedy(*args)  # (B, 1)
        else:
            logits, _ = runtime.verify(*args)  # (B, 1, V)
        clock.lap("verify")
        # The token was written at slot P, where it belongs: commit is bookkeeping only.
        past_len = past_len + ~out.finished
        if argmax_only:
            token = ids[:, 0]
        else:
            token = choose_token(logits[:, 0], sampling, rng, prompts=prompts, generated=out.tokens)
        if options.logprobs:
            lp = next_logprobs(logits[:, 0], token, sampling, prompts=prompts, generated=out.tokens)
        clock.lap("accept")
        new = out.emit(token[:, None])
        yield Step(new, no_drafts, clock.seconds, "autoregressive", one_each, trim(lp, new))
