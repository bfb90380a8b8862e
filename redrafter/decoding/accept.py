"""Acceptance (docs/design.md §3.5): decide how much of the drafted beam the LLM keeps.

Dimensions: B batch, W beam width, L beam length, V vocab.

Index convention: `beams[b, w, 0]` is g0 (the LLM's token from the previous step) and
`beams[b, w, k]` (k >= 1) are drafts. The LLM's output at beam position k predicts the token
*after* `beams[b, w, k]`, so draft k+1 is judged by `llm[b, w, k]`, and the drafter's
`draft_log_probs[b, w, k]` is the distribution draft k+1 was drawn from.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from redrafter.config import LOG_0, NO_TOKEN, SamplingParams
from redrafter.decoding.penalties import penalise, penalise_tree
from redrafter.decoding.tree import unpack


@dataclasses.dataclass(frozen=True)
class Acceptance:
    """beam (B,) the chosen beam; n (B,) drafts accepted (0..L-1); next_token (B,) the LLM's own
    token after them (the next step's g0); logprobs[b], when asked for, the n[b] + 1 emitted
    tokens' log-probabilities (`token_logprobs`)."""

    beam: np.ndarray
    n: np.ndarray
    next_token: np.ndarray
    logprobs: list[list[float]] | None = None


def warp_logits(logits: np.ndarray, top_k: int) -> np.ndarray:
    """Apple's top-k warp: values below the k-th largest become LOG_0 (ties are kept)."""
    k = min(top_k, logits.shape[-1])
    kth = np.partition(logits, -k, axis=-1)[..., -k, None]
    return np.where(logits < kth, np.float32(LOG_0), logits)


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


# A prefix of the sorted probabilities whose float64 sum falls short of top_p by rounding
# alone already reaches it (so P = [.5, .3, ...] with top_p .8 keeps two tokens, not three).
_TOP_P_SLACK = 1e-12


def top_p_filter(probs: np.ndarray, top_p: float, head: int | None = None) -> np.ndarray:
    """Nucleus warp: keep the most probable tokens up to the first whose cumulative probability
    reaches `top_p`, plus every token tied with the last one kept (as the top-k warp keeps ties,
    so P does not depend on token order); zero the rest, renormalise. At least the most probable
    token stays. probs (..., V) normalised -> (..., V).

    `head`: look for the nucleus among the `head` most probable tokens first (after a top-k
    warp it lies there), sorting the whole vocabulary only when they do not reach `top_p`; the
    result is the same, a full sort of a 150k vocabulary per tree node is what it saves."""
    V = probs.shape[-1]
    if head is not None and head < V:
        top = np.partition(probs, V - head, axis=-1)[..., V - head :]  # the head largest
        cutoff, reached = _nucleus_cutoff(-np.sort(-top, axis=-1), top_p)
        if reached.all():
            return _renormalise(np.where(probs >= cutoff, probs, 0.0))
    cutoff, _ = _nucleus_cutoff(-np.sort(-probs, axis=-1), top_p)
    return _renormalise(np.where(probs >= cutoff, probs, 0.0))


def _nucleus_cutoff(ordered: np.ndarray, top_p: float) -> tuple[np.ndarray, np.ndarray]:
    """For descending `ordered` (..., n): the last probability the nucleus keeps (..., 1), and
    whether the kept prefix reaches `top_p` within these n (..., 1)."""
    cumulative = np.cumsum(ordered, axis=-1)
    before = np.concatenate(  # the mass strictly above each sorted position
        [np.zeros_like(cumulative[..., :1]), cumulative[..., :-1]], axis=-1
    )
    kept = np.maximum((before < top_p - _TOP_P_SLACK).sum(axis=-1, keepdims=True), 1)
    reached = np.take_along_axis(cumulative, kept - 1, axis=-1) >= top_p - _TOP_P_SLACK
    return np.take_along_axis(ordered, kept - 1, axis=-1), reached


def min_p_filter(probs: np.ndarray, min_p: float) -> np.ndarray:
    """Min-p warp: zero the tokens less probable than `min_p` times the most probable one,
    renormalise. probs (..., V) normalised -> (..., V)."""
    floor = min_p * probs.max(axis=-1, keepdims=True)
    return _renormalise(np.where(probs >= floor, probs, 0.0))


def _renormalise(probs: np.ndarray) -> np.ndarray:
    return probs / probs.sum(axis=-1, keepdims=True)


def target_probs(logits: np.ndarray, sampling: SamplingParams) -> np.ndarray:
    """The LLM's sampling distribution P, (..., V) -> (..., V) float64: temperature, then the
    top-k warp, then top-p (nucleus), then min-p, each renormalising. Every acceptance rule
    and the autoregressive baseline sample from this P, so the controls hold for all of them.

    The top-k cut is taken on the raw logits: dividing by a temperature > 0 keeps their order,
    so it keeps the same tokens as cutting after it, and the default (top-50, top_p 1, min_p 0)
    stays bit-identical to the P that has always been used. Top-p and min-p do depend on the
    order, so they see the tempered, top-k warped distribution."""
    scaled = warp_logits(logits.astype(np.float64), sampling.top_k) / sampling.temperature
    probs = np.exp(log_softmax(scaled))
    if sampling.top_p < 1.0:  # 1 keeps every token: skipped, so the default P is unchanged
        probs = top_p_filter(probs, sampling.top_p, head=sampling.top_k)
    if sampling.min_p > 0.0:  # likewise 0
        probs = min_p_filter(probs, sampling.min_p)
    return probs


def sample(probs: np.ndarray, rng: np.random.Generator) -> int:
    """One draw from a (V,) distribution that need not be normalised."""
    cdf = np.cumsum(probs, dtype=np.float64)
    return int(min(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"), len(cdf) - 1))


def choose_token(
    logits: np.ndarray,
    sampling: SamplingParams,
    rng: np.random.Generator,
    *,
    prompts: Sequence[Sequence[int]] = (),
    generated: Sequence[Sequence[int]] = (),
) -> np.ndarray:
    """The LLM's own next token per row: argmax (first max) or a sample from P. (B, V) -> (B,).
    Greedy ignores top-k, top-p and min-p (each keeps the argmax), not the penalties, which
    need row b's `prompts[b]` and `generated[b]` (read only when `sampling.penalised`)."""
    if sampling.penalised:
        logits = penalised_rows(logits, sampling, prompts=prompts, generated=generated)
    if sampling.greedy:
        return logits.argmax(axis=-1).astype(np.int64)
    probs = target_probs(logits, sampling)
    return np.array([sample(p, rng) for p in probs], dtype=np.int64)


def penalised_rows(
    logits: np.ndarray,
    sampling: SamplingParams,
    *,
    prompts: Sequence[Sequence[int]],
    generated: Sequence[Sequence[int]],
) -> np.ndarray:
    """Each row's next-token logits penalised with its own history: (B, V) -> (B, V) float64."""
    return np.stack(
        [
            penalise(row, sampling, prompt=prompts[b], generated=generated[b])
            for b, row in enumerate(logits)
        ]
    )


def token_logprobs(logits: np.ndarray, tokens: np.ndarray, sampling: SamplingParams) -> list[float]:
    """log P(tokens[k]) at consecutive positions: logits (K, V), already penalised; tokens (K,).
    P is `target_probs` (temperature, top-k, top-p, min-p) when sampling; greedy's P is a point
    mass, so it reports the penalised softmax at temperature 1, what a sampler would see."""
    tokens = np.asarray(tokens, dtype=np.int64)[:, None]  # (K, 1)
    if sampling.greedy:
        logp = log_softmax(logits.astype(np.float64))  # (K, V)
    else:
        with np.errstate(divide="ignore"):  # a token a warp cut cannot be emitted: -inf if so
            logp = np.log(target_probs(logits, sampling))  # (K, V)
    return [float(x) for x in np.take_along_axis(logp, tokens, axis=-1)[:, 0]]


def accept(
    beams: np.ndarray,
    logits: np.ndarray,
    unpacker: np.ndarray,
    draft_log_probs: np.ndarray | None,
    sampling: SamplingParams,
    rng: np.random.Generator,
    *,
    prompts: Sequence[Sequence[int]] = (),
    generated: Sequence[Sequence[int]] = (),
    logprobs: bool = False,
) -> Acceptance:
    """The acceptance rule `sampling` names: greedy (temperature 0), Apple's rule, or the exact
    tree walk. beams (B, W, L); logits (B, N, V) as verified, over the packed tree; unpacker
    (B, W, L) from `tree.pack`; draft_log_probs (B, W, L-1, V), read by Apple's rule only
    (None otherwise).

    With penalties every node's logits are first penalised with its own path (`prompts[b]`,
    `generated[b]` ending in g0, then the beam's drafts: `penalise_tree`). `logprobs` adds the
    emitted tokens' log-probabilities under the same per-node distribution."""
    if sampling.penalised:
        llm = penalise_tree(
            unpack(logits, unpacker), beams, sampling, prompts=prompts, generated=generated
        )  # (B, W, L, V)
        if sampling.greedy:
            acc = accept_greedy(beams, llm.argmax(-1))
        elif sampling.acceptance == "apple":
            acc = accept_apple(beams, llm, draft_log_probs, sampling, rng)
        else:
            acc = accept_exact(beams, llm, sampling, rng)
    elif sampling.greedy:  # argmax before unpacking: (B, N) ids, not (B, W, L, V) floats
        acc = accept_greedy(beams, unpack(logits.argmax(-1), unpacker))
    elif sampling.acceptance == "apple":
        acc = accept_apple(beams, unpack(logits, unpacker), draft_log_probs, sampling, rng)
    else:
        acc = accept_exact(beams, unpack(logits, unpacker), sampling, rng)
    if not logprobs:
        return acc
    rows = []
    for b in range(beams.shape[0]):
        w, n = acc.beam[b], acc.n[b]
        tokens = np.array([*beams[b, w, 1 : n + 1], acc.next_token[b]])  # (n + 1,)
        # The accepted path's nodes: llm[b, w, :n+1], or gathered unpenalised from the packing.
        path = llm[b, w, : n + 1] if sampling.penalised else logits[b, unpacker[b, w, : n + 1]]
        rows.append(token_logprobs(path, tokens, sampling))
    return dataclasses.replace(acc, logprobs=rows)


def accept_greedy(beams: np.ndarray, llm_tokens: np.ndarray) -> Acceptance:
    """Longest prefix of drafts equal to the LLM's argmax; the first beam with the max wins.

    beams: (B, W, L) int64; llm_tokens: (B, W, L) the LLM's argmax at each beam position.
    """
    matches = beams[:, :, 1:] == llm_tokens[:, :, :-1]  # (B, W, L-1)
    n_per_beam = np.cumprod(matches, axis=-1).sum(axis=-1)  # (B, W)
    beam = n_per_beam.argmax(axis=-1)  # (B,) argmax takes the first max
    rows = np.arange(beams.shape[0])
    n = n_per_beam[rows, beam]  # (B,)
    return Acceptance(beam, n, llm_tokens[rows, beam, n].astype(np.int64))


def accept_apple(
    beams: np.ndarray,
    llm_logits: np.ndarray,
    draft_log_probs: np.ndarray,
    sampling: SamplingParams,
    rng: np.random.Generator,
) -> Acceptance:
    """Apple's rule: accept draft v iff u < P(v)/Q(v); the first beam with the longest accepted
    prefix wins; a rejection is resampled from relu(P - Q), a fully accepted beam gets a bonus
    token from P at its last position. Does not preserve P exactly (beam drafts are not samples
    from Q); kept for parity with Apple's implementation.

    beams: (B, W, L), ragged beams end in NO_TOKEN; llm_logits: (B, W, L, V); draft_log_probs:
    (B, W, L-1, V) normalised.
    """
    B, W, L = beams.shape
    p = target_probs(llm_logits, sampling)  # (B, W, L, V)
    q = np.exp(draft_log_probs.astype(np.float64))  # (B, W, L-1, V)
    real = beams[:, :, 1:] != NO_TOKEN  # (B, W, L-1) slots before a ragged beam's end
    drafts = np.where(real, beams[:, :, 1:], 0)[..., None]  # (B, W, L-1, 1)
    p_draft = np.take_along_axis(p[:, :, :-1], drafts, axis=-1)[..., 0]  # (B, W, L-1)
    q_draft = np.take_along_axis(q, drafts, axis=-1)[..., 0]  # (B, W, L-1)
    u = rng.random((B, W, L - 1))
    with np.errstate(divide="ignore", invalid="ignore"):
        accepted = real & (u < p_draft / q_draft)  # (B, W, L-1)
    n_per_beam = np.cumprod(accepted, axis=-1).sum(axis=-1)  # (B, W)
    beam = n_per_beam.argmax(axis=-1)  # (B,)
    next_token = np.empty(B, dtype=np.int64)
    for b in range(B):
        w, n = beam[b], n_per_beam[b, beam[b]]
        if n == L - 1 or not real[b, w, n]:  # the whole draft accepted: bonus token from P
            dist = p[b, w, n]
        else:
            dist = np.maximum(p[b, w, n] - q[b, w, n], 0.0)
            if dist.sum() <= 0:  # P == Q: the residual is empty, fall back to P
                dist = p[b, w, n]
        next_token[b] = sample(dist, rng)
    return Acceptance(beam, n_per_beam[np.arange(B), beam], next_token)


def accept_exact(
    beams: np.ndarray,
    llm_logits: np.ndarray,
    sampling: SamplingParams,
    rng: np.random.Generator,
) -> Acceptance:
    """Tree walk that preserves P exactly: from the root, sample x from P at the current node;
    if x is one of the node's drafted children, accept it and descend, else x is the next token;
    at a leaf, x is the bonus token. Each emitted token is a draw from P given its prefix.

    beams: (B, W, L); llm_logits: (B, W, L, V).
    """
    B, W, L = beams.shape
    beam = np.zeros(B, dtype=np.int64)
    n = np.zeros(B, dtype=np.int64)
    next_token = np.zeros(B, dtype=np.int64)
    for b in range(B):
        alive = np.arange(W)  # beams whose prefix equals the current node
        depth = 0
        while True:
            x = sample(target_probs(llm_logits[b, alive[0], depth], sampling), rng)
            if depth == L - 1:
                break
            children = alive[beams[b, alive, depth + 1] == x]
            if children.size == 0:
                break
            alive, depth = children, depth + 1
        beam[b], n[b], next_token[b] = alive[0], depth, x
    return Acceptance(beam, n, next_token)
