"""The drafter's training objective, teacher-forced over K steps (Apple's `drafter_loss`).

Dimensions: M context positions, K predicted tokens, E hidden size, Vd the head's vocab
(the draft vocab, or the full V), C teacher top-C entries.

At context t (hidden h_t), step k = 1..K feeds E(x_{t+k}) to the RNN and predicts x_{t+k+1}:
    s_1 = SiLU(rnn_w·E(x_{t+1}) + rnn_u·0 + b),  s_k = SiLU(rnn_w·E(x_{t+k}) + rnn_u·s_{k-1} + b)
    logits_k = lm_head([h_t ⊕ s_k])
which is what the beam search does at inference with x_{t+1} = g0 (checked against Apple's
`recurrent_drafting/train/model.py`: iteration 1 reads [h_t, e_{t+1}] and predicts token t+2).
Loss = Σ_k CE(logits_k, x_{t+k+1}) (+ `kl_weight` · Σ_k CE(P_base top-C, Q_drafter) when the
base's own distributions are given: KL(P‖Q) up to P's entropy, a constant).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from redrafter.models.drafter import Drafter

IGNORE = -100  # F.cross_entropy's ignore_index


def unroll(
    drafter: Drafter, context: torch.Tensor, tokens: torch.Tensor, embed_weight: torch.Tensor
) -> torch.Tensor:
    """Teacher-forced drafter logits for K steps.

    context: (M, E) post-norm hidden states; tokens: (M, K+1) x_{t+1}..x_{t+K+1} (-1 = none);
    embed_weight: (V, E) the base's (frozen) embeddings. Returns logits (M, K, Vd).
    """
    K = tokens.shape[1] - 1
    state = context.new_zeros(context.shape)  # (M, E) s_0 = 0
    steps = []
    for k in range(K):
        embedding = F.embedding(tokens[:, k].clamp(min=0), embed_weight)  # (M, E) E(x_{t+k+1})
        state = drafter.next_state(state, embedding)
        steps.append(drafter.logits(context, state))  # (M, Vd)
    return torch.stack(steps, dim=1)  # (M, K, Vd)


def to_head_ids(ids: torch.Tensor, head_index: torch.Tensor | None) -> torch.Tensor:
    """Full-vocab ids -> head rows; IGNORE for padding (-1) and for tokens outside the draft
    vocab. head_index: (V,) row of each token in the head, -1 if absent (None: identity)."""
    if head_index is None:
        return torch.where(ids < 0, IGNORE, ids)
    rows = head_index[ids.clamp(min=0)]
    return torch.where((ids < 0) | (rows < 0), IGNORE, rows)


def drafter_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    teacher_rows: torch.Tensor | None = None,
    teacher_logp: torch.Tensor | None = None,
    kl_weight: float = 0.0,
    counts: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Sum over steps of the mean CE, plus the soft-target term.

    logits: (M, K, Vd); targets: (M, K) head rows or IGNORE; teacher_rows: (M, K, C) head rows
    of the base's top-C tokens (IGNORE where absent); teacher_logp: (M, K, C) their log-probs.
    counts: (2, K) float32, the `target_counts` of the whole batch when these M rows are one
    rank's part of it (the means divide by the batch's counts, so the ranks' losses add up to
    the one-process loss); None = these rows' own counts.
    Returns the loss and per-step losses for logging (this part's share when `counts` is given).
    """
    M, K, Vd = logits.shape
    logs: dict[str, float] = {}
    if counts is None:
        counts = target_counts(targets, teacher_rows)
    ce = F.cross_entropy(
        logits.reshape(M * K, Vd), targets.reshape(M * K), ignore_index=IGNORE, reduction="none"
    ).view(M, K)  # (M, K), 0 where ignored
    per_step = ce.sum(0) / counts[0].clamp(min=1)  # (K,)
    loss = per_step.sum()
    for k in range(K):
        logs[f"loss{k + 1}"] = float(per_step[k].detach())
    if kl_weight and teacher_rows is not None and teacher_logp is not None:
        known = teacher_rows != IGNORE  # (M, K, C)
        # The teacher's top-C renormalised over what the head can draft.
        p = torch.softmax(teacher_logp.masked_fill(~known, float("-inf")), dim=-1)
        p = torch.nan_to_num(p)  # rows with nothing draftable weigh 0
        log_q = torch.log_softmax(logits, dim=-1)  # (M, K, Vd)
        q_at = log_q.gather(2, teacher_rows.clamp(min=0))  # (M, K, C)
        soft = -(p * q_at).sum(-1)  # (M, K)
        kl = (soft.sum(0) / counts[1].clamp(min=1)).sum()
        logs["soft"] = float(kl.detach())
        loss = loss + kl_weight * kl
    logs["loss"] = float(loss.detach())
    return loss, logs


def target_counts(targets: torch.Tensor, teacher_rows: torch.Tensor | None) -> torch.Tensor:
    """(2, K) float32: per step, the contexts with a target and those with a draftable teacher
    row, the denominators of `drafter_loss`'s means. targets: (M, K); teacher_rows: (M, K, C)."""
    valid = (targets != IGNORE).float().sum(0)  # (K,)
    if teacher_rows is None:
        return torch.stack([valid, torch.zeros_like(valid)])
    return torch.stack([valid, (teacher_rows != IGNORE).any(-1).float().sum(0)])


@torch.no_grad()
def accuracy(logits: torch.Tensor, targets: torch.Tensor, top: int = 5) -> dict[str, float]:
    """Top-1..`top` accuracy per step (Apple's `redrafter{k}_top{j}`, steps counted from 1),
    and `chain{k}`: the fraction of contexts whose first k steps are all top-1 correct — the
    teacher-forced rate at which greedy W=1 decoding would accept k drafts (exactly so on the
    base's own greedy text, where the targets are the base's argmax).

    logits: (M, K, Vd); targets: (M, K) head rows or IGNORE."""
    M, K, Vd = logits.shape
    ranked = logits.topk(min(top, Vd), dim=-1).indices  # (M, K, top)
    hit = ranked == targets[..., None]  # (M, K, top)
    valid = targets != IGNORE  # (M, K)
    out: dict[str, float] = {}
    for k in range(K):
        n = valid[:, k].sum().clamp(min=1)
        for j in range(ranked.shape[-1]):
            out[f"top{j + 1}@{k + 1}"] = float(hit[:, k, : j + 1].any(-1)[valid[:, k]].sum() / n)
    # A context counts for chain k only if all k targets exist (no sequence end inside).
    chain = torch.ones(M, dtype=torch.bool, device=logits.device)
    for k in range(K):
        chain = chain & hit[:, k, 0]
        full = valid[:, : k + 1].all(-1)
        out[f"chain{k + 1}"] = float(chain[full].float().mean()) if full.any() else 0.0
    return out
