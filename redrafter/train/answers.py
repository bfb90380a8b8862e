"""The base's greedy answers to many prompts at once: continuous batching over a fixed number of
KV-cache rows ("slots"), so a row whose answer ended (EOS or `max_new_tokens`) takes the next
prompt at once instead of idling until the slowest answer of its batch is done.

Dimensions: R rows (slots), P prompt length, S cache capacity, E hidden size, V vocab,
C teacher top-C entries, n tokens in one answer.

Each step runs one token for every busy row at that row's own position (`decode_attention` reads
each row's committed length), so rows hold prompts of different lengths at different points of
their answers. Prompts are taken shortest first. Free rows are refilled together: the new
prompts are prefilled right-padded in a small cache of their own, which is then copied into the
free rows. Once no prompt is left, the rows still busy are packed into a smaller cache whenever
half of them are free, so the last answers do not pay for empty rows.

A trace is what `teacher.generate_traces` returns per prompt, and in greedy mode the same:
identical tokens; hidden states and log-probs equal up to fp32 rounding (other batch shapes sum
in another order), checked by tests/test_train_distributed.py.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from redrafter.models.llama import Transformer
from redrafter.train.teacher import _top, one_token_attention

Trace = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]


def _prefill(
    base: Transformer, prompts: Sequence[Sequence[int]], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One causal pass over `prompts` (right-padded to P). Returns their cache
    (Lyr, 2, n, Hkv, P, D), the post-norm hidden state of each last token (n, E) and lengths (n,).
    Pads sit past each row's length: the answer's tokens overwrite them before anyone reads."""
    n = len(prompts)
    lengths = torch.tensor([len(p) for p in prompts], device=device)  # (n,)
    P = int(lengths.max())
    ids = torch.zeros(n, P, dtype=torch.int64)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = torch.tensor(p)
    cache = base.new_cache(n, P).to(device)
    causal = torch.ones(P, P, dtype=torch.bool, device=device).tril().expand(n, P, P)
    hidden, _ = base.hidden_states(
        ids.to(device),
        torch.arange(P, device=device).expand(n, P),
        causal,
        torch.zeros(n, dtype=torch.int64, device=device),
        base.layer_caches(cache),
    )  # (n, P, E)
    last = hidden[torch.arange(n, device=device), lengths - 1]  # (n, E)
    return cache, last, lengths


@torch.inference_mode()
def generate_answers(
    base: Transformer,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    eos_token_ids: Sequence[int],
    top_c: int = 0,
    slots: int = 32,
    progress: Callable[[int], None] = lambda n: None,
) -> list[Trace]:
    """Greedy answers of `base` to `prompts` (token id lists), fp32, `slots` rows at a time.

    Returns per prompt, in the order given: contexts (n, E) float32, next tokens (n,) int64,
    and the top-C ids (n, C) int64 / log-probs (n, C) float32 (None when `top_c` is 0).
    Context 0 is the prompt's last token; an answer stops after an EOS (kept) or at
    `max_new_tokens`. `progress(k)` is called as k answers finish."""
    if not prompts:
        return []
    device = base.embed_weight.device
    eos = torch.tensor(sorted(set(eos_token_ids)), dtype=torch.int64)
    R = min(slots, len(prompts))
    S = max(len(p) for p in prompts) + max_new_tokens
    cache = base.new_cache(R, S).to(device)  # (Lyr, 2, R, Hkv, S, D)
    past = torch.zeros(R, dtype=torch.int64, device=device)  # (R,) committed length per row
    h = torch.zeros(R, base.config.hidden_size, device=device)  # (R, E) last hidden per row
    logits = torch.zeros(R, base.config.vocab_size, device=device)  # (R, V) its next-token logits
    owner = [-1] * R  # the prompt each row answers, -1 = free
    rows_out: list[list[tuple[torch.Tensor, ...]]] = [[] for _ in range(R)]
    traces: list[Trace | None] = [None] * len(prompts)
    # Shortest prompts first: rows in flight then hold prompts of similar lengths, and each
    # step's attention reads the cache up to the longest row's position, not a stray long one's.
    queue = iter(sorted(range(len(prompts)), key=lambda i: len(prompts[i])))
    remaining = len(prompts)
    while True:
        free = [r for r in range(R) if owner[r] < 0]
        admit = [(r, i) for r, i in zip(free, queue, strict=False)]
        if admit:
            rows = torch.tensor([r for r, _ in admit], device=device)
            new_cache, last, lengths = _prefill(base, [prompts[i] for _, i in admit], device)
            cache[:, :, rows, :, : new_cache.shape[4]] = new_cache
            past[rows], h[rows], logits[rows] = lengths, last, base.logits(last)
            for r, i in admit:
                owner[r] = i
        busy = [r for r in range(R) if owner[r] >= 0]
        if not busy:
            break
        token = logits.argmax(-1)  # (R,)
        step = [h.cpu(), token.cpu()]  # one device->host copy per step, not per row
        if top_c:
            step += [t.cpu() for t in _top(logits, top_c)]  # (R, C) ids, log-probs
        is_eos = torch.isin(step[1], eos).tolist()  # (R,)
        ended = []
        for r in busy:
            rows_out[r].append(tuple(t[r] for t in step))
            if is_eos[r] or len(rows_out[r]) == max_new_tokens:
                ended.append(r)
        for r in ended:
            parts = list(zip(*rows_out[r], strict=True))
            top_ids = top_logp = None
            if top_c:
                top_ids, top_logp = torch.stack(parts[2]), torch.stack(parts[3])  # (n, C)
            traces[owner[r]] = (torch.stack(parts[0]), torch.stack(parts[1]), top_ids, top_logp)
            owner[r], rows_out[r] = -1, []
            remaining -= 1
        if ended:
            progress(len(ended))
        if remaining == 0:
            break
        queue_empty = sum(o >= 0 for o in owner) == remaining
        live = [r for r in range(R) if owner[r] >= 0]
        if queue_empty and len(live) <= R // 2:
            # No prompt left to refill the free rows: pack the busy ones into a smaller cache.
            keep = torch.tensor(live, device=device)
            cache = cache.index_select(2, keep)  # (Lyr, 2, R', Hkv, S, D)
            past, h, logits, token = past[keep], h[keep], logits[keep], token[keep]
            owner = [owner[r] for r in live]
            rows_out = [rows_out[r] for r in live]
            R = len(live)
        # Free rows step too (on a harmless token at their stale position): a fixed batch
        # shape per step costs less than gathering the busy rows every step.
        with one_token_attention(base):
            out_logits, hidden, _ = base(
                token[:, None],
                past[:, None],
                torch.ones(R, 1, 1, dtype=torch.bool, device=device),
                past,
                base.layer_caches(cache),
            )  # (R, 1, V), (R, 1, E)
        h, logits = hidden[:, 0], out_logits[:, 0]  # (R, E), (R, V)
        past = torch.where(torch.tensor([o >= 0 for o in owner], device=device), past + 1, past)
    assert all(t is not None for t in traces)
    return traces  # type: ignore[return-value]
