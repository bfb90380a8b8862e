"""Repetition, presence and frequency penalties, applied to the LLM's logits at one tree node
with that node's own history (docs/algorithm.md, "Per-node controls").

Dimensions: B batch, W beam width, L beam length, V vocab.

A penalty depends on the tokens before the position it is applied at. In a verified tree, the
node at depth k of beam w comes after the row's prompt, its generated tokens (ending with g0)
and the drafts `beams[b, w, 1 : k + 1]`, so two nodes of one step see different histories. The
speculative loop penalises each node with its own path and the autoregressive loop penalises
each position with what came before it: both then sample from the same distribution, and the
`exact` tree walk still emits draws from it.

Which history each penalty counts:
- `repetition_penalty` (transformers' `RepetitionPenaltyLogitsProcessor`): every token of the
  prompt and of the generated text; each distinct one is penalised once.
- `presence_penalty`, `frequency_penalty` (OpenAI's): the generated tokens only, the frequency
  term once per occurrence, so a prompt's own words are not discouraged.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from redrafter.config import NO_TOKEN, SamplingParams


def penalise(
    logits: np.ndarray,
    sampling: SamplingParams,
    *,
    prompt: Sequence[int],
    generated: Sequence[int],
) -> np.ndarray:
    """The penalised logits of one position: logits (V,) -> (V,) float64 (a copy).

    `prompt` and `generated` are the token ids before the position; the repetition penalty
    sees both, the presence and frequency penalties `generated` only. Order as transformers
    applies its processors: the repetition penalty first, then (OpenAI's) the subtraction."""
    out = logits.astype(np.float64)  # a copy: the runtime's logits stay untouched
    gen = np.asarray(generated, dtype=np.int64)
    if sampling.repetition_penalty != 1.0:
        seen = np.unique(np.concatenate([np.asarray(prompt, dtype=np.int64), gen]))
        v = out[seen]
        # Dividing a negative logit would raise it, so it is multiplied instead (transformers).
        out[seen] = np.where(
            v < 0, v * sampling.repetition_penalty, v / sampling.repetition_penalty
        )
    if sampling.presence_penalty != 0.0 or sampling.frequency_penalty != 0.0:
        ids, counts = np.unique(gen, return_counts=True)
        out[ids] -= sampling.presence_penalty + sampling.frequency_penalty * counts
    return out


def penalise_path(
    logits: np.ndarray,
    sampling: SamplingParams,
    *,
    prompt: Sequence[int],
    generated: Sequence[int],
    path: Sequence[int],
) -> np.ndarray:
    """Penalise consecutive positions: logits (K, V) -> (K, V) float64, position k after
    `generated` + `path[:k]`: one beam's nodes, `path` its drafts."""
    return np.stack(
        [
            penalise(logits[k], sampling, prompt=prompt, generated=[*generated, *path[:k]])
            for k in range(logits.shape[0])
        ]
    )


def penalise_tree(
    llm_logits: np.ndarray,
    beams: np.ndarray,
    sampling: SamplingParams,
    *,
    prompts: Sequence[Sequence[int]],
    generated: Sequence[Sequence[int]],
) -> np.ndarray:
    """Every node of the verified tree penalised with its own path: llm_logits (B, W, L, V)
    unpacked; beams (B, W, L) with g0 at position 0 (already in `generated[b]`) and ragged
    beams ending in NO_TOKEN -> (B, W, L, V) float64. The nodes past a ragged beam's end are
    never read by acceptance; they get the path up to the end."""
    B, W, L, _ = llm_logits.shape
    out = np.empty(llm_logits.shape, dtype=np.float64)
    for b in range(B):
        for w in range(W):
            drafts = beams[b, w, 1:]  # (L-1,)
            real = drafts[: int(np.cumprod(drafts != NO_TOKEN).sum())].tolist()
            out[b, w] = penalise_path(
                llm_logits[b, w], sampling, prompt=prompts[b], generated=generated[b], path=real
            )
    return out
