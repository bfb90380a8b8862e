"""The reduced draft vocabulary (EAGLE-3's trick): the drafter's head predicts only the Vd
tokens that occur most often in what it must predict, so its largest matmul shrinks V/Vd times.

Dimensions: V the base's vocab, Vd the draft vocab.

Tokens outside the draft vocab are never drafted (the step costs one draft, not correctness:
verification still emits the base's token). Coverage (the share of training targets inside the
draft vocab) bounds the acceptance rate from above, so it is logged with the choice.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def choose_draft_vocab(
    targets: torch.Tensor, *, vocab_size: int, size: int, always: Sequence[int] = ()
) -> tuple[torch.Tensor, float]:
    """The `size` most frequent ids among `targets` (any shape, -1 ignored), plus `always`
    (e.g. EOS). Ties, and slots left when fewer distinct tokens occur, go to the lowest ids
    (BPE vocabularies give frequent merges low ids). Returns the sorted ids (Vd,) int64 and the
    fraction of targets they cover."""
    flat = targets[targets >= 0].flatten()
    counts = torch.bincount(flat, minlength=vocab_size).double()  # (V,)
    # Rank by count, then by id: a tiny decreasing bonus breaks ties towards low ids.
    score = counts + 0.5 * (1.0 - torch.arange(vocab_size, dtype=torch.float64) / vocab_size)
    forced = torch.tensor(sorted({int(t) for t in always if 0 <= int(t) < vocab_size}))
    if len(forced):
        score[forced] = float("inf")
    ids = torch.sort(torch.topk(score, min(size, vocab_size)).indices).values
    covered = counts[ids].sum() / counts.sum().clamp(min=1)
    return ids, float(covered)


def head_index(draft_ids: torch.Tensor | None, vocab_size: int) -> torch.Tensor | None:
    """(V,) row of each token in the head, -1 for tokens the head cannot draft (None when the
    head covers the full vocab)."""
    if draft_ids is None:
        return None
    index = torch.full((vocab_size,), -1, dtype=torch.int64)
    index[draft_ids] = torch.arange(len(draft_ids))
    return index
