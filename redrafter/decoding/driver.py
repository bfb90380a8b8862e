"""The ReDrafter decode loop (docs/design.md §3), written once for every runtime, and `decode`, the
one entry point that every caller (pipeline, bench, validate, train, benchmarks) goes through.

Dimensions: B batch, W beam width, L beam length, N packed tokens, E hidden, V vocab,
P committed length per row.

Each step: draft a beam from the last accepted hidden state, pack it into a tree, verify the
tree in one LLM pass, accept the longest agreeing prefix, commit it to the KV cache. The LLM's
own token g0 is emitted as soon as it is known; a step emits the accepted drafts plus the next g0.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from redrafter.decoding.accept import accept, accept_greedy
from redrafter.decoding.autoregressive import autoregressive_decode
from redrafter.decoding.kv_cache import commit_plan
from redrafter.decoding.lookup import add_lookup_beam, padded_length
from redrafter.decoding.options import DecodeOptions
from redrafter.decoding.output import OutputStream, Step, trim
from redrafter.decoding.prefill import PhaseClock, prefill
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
    # Resolved once here so both loops' OutputStream apply the very same stops.
    eos_token_ids = options.stop_ids(eos_token_ids)
    if options.speculative:
        return speculative_decode(runtime, prompts, options, eos_token_ids=eos_token_ids)
    return autoregressive_decode(runtime, prompts, options, eos_token_ids=eos_token_ids)


def speculative_decode(
    runtime: Runtime,
    prompts: Sequence[Sequence[int]],
    options: DecodeOptions,
    *,
    eos_token_ids: Sequence[int] = (),
) -> Iterator[Step]:
    """The speculative loop: draft -> pack -> verify -> accept -> commit, one `Step` each."""
    o, sampling, rng = options, options.sampling, np.random.default_rng(options.sampling.seed)
    K = o.beam.length  # the beams' length, once the lookup beam (if any) is added
    if o.prompt_lookup:  # capped where the runtime's commit takes only so many rows (Core ML)
        K = padded_length(K, max_length=runtime.max_beam_length, span_per_ngram=o.lookup_span)
    g0, lp, context, past_len, seconds = prefill(
        runtime,
        prompts,
        extra_slots=(o.beam.width + o.prompt_lookup) * K,
        max_new_tokens=o.max_new_tokens,
        sampling=sampling,
        rng=rng,
        logprobs=o.logprobs,
    )
    B, rows = len(prompts), np.arange(len(prompts))
    out = OutputStream(B, max_new_tokens=o.max_new_tokens, eos_token_ids=eos_token_ids)
    new = out.emit(g0[:, None])
    yield Step(new, np.zeros(B, np.int64), seconds, "prefill", logprobs=trim(lp, new))
    apple = not sampling.greedy and sampling.acceptance == "apple"  # reads the drafts' Q
    # Plain greedy reads each node's argmax only: (B, N) ids from the runtime, not (B, N, V)
    # logits (on a GPU they stay on the device). Penalties and log-probs need the logits.
    argmax_only = sampling.greedy and not sampling.penalised and not o.logprobs
    while not out.done:
        clock = PhaseClock()
        if apple:
            beams, q = runtime.draft(context, g0, o.beam)  # (B, W, L), (B, W, L-1, V)
            log_p = drafted_log_probs(beams, q)  # (B, W, L-1)
        else:
            (beams, log_p), q = runtime.draft_tokens(context, g0, o.beam), None
        beams = prune(beams, log_p, min_prob=o.min_draft_prob)  # ragged (B, W, L)
        if o.prompt_lookup:  # one more beam (B, W+1, K)
            histories = [[*prompts[b], *out.tokens[b]] for b in range(B)]
            beams, q = add_lookup_beam(beams, q, histories, length=K, span_per_ngram=o.lookup_span)
        clock.lap("draft")
        tree = pack(beams, packing=o.packing)
        args = (tree.tokens, past_len[:, None] + tree.depth, tree.tree_mask, past_len)
        if argmax_only:
            ids, hidden = runtime.verify_greedy(*args)  # (B, N), (B, N, E)
            clock.lap("verify")
            acc = accept_greedy(beams, unpack(ids, tree.unpacker))
        else:
            logits, hidden = runtime.verify(*args)  # (B, N, V), (B, N, E)
            clock.lap("verify")
            acc = accept(
                beams,
                logits,
                tree.unpacker,
                q,
                sampling,
                rng,
                prompts=prompts,
                generated=out.tokens,
                logprobs=o.logprobs,
            )  # penalties read each node's history: prompt, tokens so far (ending in g0), path
        clock.lap("accept")
        source, count = commit_plan(tree.unpacker, acc.beam, acc.n, ~out.finished)
        runtime.commit(past_len, source, count)
        past_len = past_len + count
        context = hidden[rows, tree.unpacker[rows, acc.beam, acc.n]]  # (B, E) at the last kept
        g0 = acc.next_token
        emitted = [[*beams[b, acc.beam[b], 1 : acc.n[b] + 1], g0[b]] for b in range(B)]
        clock.lap("commit")
        new = out.emit(emitted)
        lp = trim(acc.logprobs, new)
        yield Step(new, acc.n.copy(), clock.seconds, "speculative", tree.sizes.copy(), lp)
