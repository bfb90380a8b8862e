"""The ReDrafter decode loop (DESIGN.md §3), written once for every runtime.

Dimensions: B batch, W beam width, L beam length, N packed tokens, E hidden, V vocab,
P committed length per row.

Each step: draft a beam from the last accepted hidden state, pack it into a tree, verify the
tree in one LLM pass, accept the longest agreeing prefix, commit it to the KV cache. The LLM's
own token g0 is emitted as soon as it is known; a step emits the accepted drafts plus the next g0.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence

import numpy as np

from redrafter.config import BeamShape, SamplingParams
from redrafter.decoding.accept import accept_apple, accept_exact, accept_greedy, choose_token
from redrafter.decoding.kv_cache import commit_plan
from redrafter.decoding.lookup import SPAN_PER_NGRAM, add_lookup_beam, padded_length
from redrafter.decoding.output import OutputStream, Step, pad_prompts
from redrafter.decoding.prune import prune
from redrafter.decoding.runtime import Runtime
from redrafter.decoding.tree import Packing, pack, unpack


def prefill(
    runtime: Runtime,
    prompts: Sequence[Sequence[int]],
    *,
    extra_slots: int,
    max_new_tokens: int,
    sampling: SamplingParams,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Check and pad prompts, size the cache, run the prompts. Returns the first token g0 (B,),
    the context hidden state (B, E), the committed lengths P (B,) and the seconds taken."""
    tokens, lengths = pad_prompts(
        prompts,
        vocab_size=runtime.vocab_size,
        context_length=runtime.context_length,
        max_new_tokens=max_new_tokens,
    )
    start = time.perf_counter()
    runtime.reset(batch=len(prompts), capacity=tokens.shape[1] + max_new_tokens + extra_slots)
    logits, context = runtime.prefill(tokens, lengths)  # (B, V), (B, E)
    return choose_token(logits, sampling, rng), context, lengths, time.perf_counter() - start


def speculative_decode(
    runtime: Runtime,
    prompts: Sequence[Sequence[int]],
    *,
    beam: BeamShape,
    sampling: SamplingParams = SamplingParams(),
    max_new_tokens: int = 64,
    eos_token_ids: Sequence[int] = (),
    packing: Packing = "dedup",
    prompt_lookup: bool = False,
    min_draft_prob: float = 0.0,
    lookup_span: int = SPAN_PER_NGRAM,
) -> Iterator[Step]:
    """Generate with ReDrafter, yielding one `Step` per runtime round trip. `prompt_lookup`
    adds an n-gram draft from the row's own tokens as one more beam, `lookup_span` tokens per
    matched n-gram token (lookup.py); `min_draft_prob` > 0 ends each drafted beam where its
    draft probability falls below it (prune.py)."""
    rng = np.random.default_rng(sampling.seed)
    K = beam.length  # the beams' length, once the lookup beam (if any) is added
    if prompt_lookup:  # capped where the runtime's commit takes only so many rows (Core ML)
        K = padded_length(K, max_length=runtime.max_beam_length, span_per_ngram=lookup_span)
    g0, context, past_len, t = prefill(
        runtime,
        prompts,
        extra_slots=(beam.width + prompt_lookup) * K,
        max_new_tokens=max_new_tokens,
        sampling=sampling,
        rng=rng,
    )
    B, rows = len(prompts), np.arange(len(prompts))
    out = OutputStream(B, max_new_tokens=max_new_tokens, eos_token_ids=eos_token_ids)
    yield Step(out.emit(g0[:, None]), np.zeros(B, np.int64), {"prefill": t}, "prefill")
    while not out.done:
        t0 = time.perf_counter()
        beams, draft_log_probs = runtime.draft(context, g0, beam)  # (B, W, L), (B, W, L-1, V)
        beams = prune(beams, draft_log_probs, min_prob=min_draft_prob)  # ragged (B, W, L)
        if prompt_lookup:  # one more beam (B, W+1, K); its Q only where Apple's rule reads it
            apple = not sampling.greedy and sampling.acceptance == "apple"
            histories = [[*prompts[b], *out.tokens[b]] for b in range(B)]
            beams, q = add_lookup_beam(
                beams,
                draft_log_probs if apple else None,
                histories,
                length=K,
                span_per_ngram=lookup_span,
            )
            draft_log_probs = draft_log_probs if q is None else q
        t1 = time.perf_counter()
        tree = pack(beams, packing=packing)
        logits, hidden = runtime.verify(
            tree.tokens, past_len[:, None] + tree.depth, tree.tree_mask, past_len
        )  # (B, N, V), (B, N, E)
        t2 = time.perf_counter()
        if sampling.greedy:
            acc = accept_greedy(beams, unpack(logits.argmax(-1), tree.unpacker))
        elif sampling.acceptance == "apple":
            acc = accept_apple(beams, unpack(logits, tree.unpacker), draft_log_probs, sampling, rng)
        else:
            acc = accept_exact(beams, unpack(logits, tree.unpacker), sampling, rng)
        t3 = time.perf_counter()
        source, count = commit_plan(tree.unpacker, acc.beam, acc.n, ~out.finished)
        runtime.commit(past_len, source, count)
        past_len = past_len + count
        context = hidden[rows, tree.unpacker[rows, acc.beam, acc.n]]  # (B, E) at the last kept
        g0 = acc.next_token
        emitted = [[*beams[b, acc.beam[b], 1 : acc.n[b] + 1], g0[b]] for b in range(B)]
        seconds = {
            "draft": t1 - t0,
            "verify": t2 - t1,
            "accept": t3 - t2,
            "commit": time.perf_counter() - t3,
        }
        yield Step(out.emit(emitted), acc.n.copy(), seconds, "speculative", tree.sizes.copy())
