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

With the base sharded across ranks (sharding.py) every forward is a collective, yet each rank
answers its own prompts, whose count and lengths differ. `Lockstep` keeps the ranks' forwards
paired: a step is always "agree, maybe prefill; agree, maybe decode" on every rank, where
agreeing is one all-reduce of (this rank wants the call, this rank still has work). When any
rank wants a prefill (decode), every rank runs one: its own, or a 1-row dummy whose output is
dropped. A rank out of prompts keeps stepping dummies (`drain`) until no rank has work.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist

from redrafter.models.llama import Transformer
from redrafter.train.distributed import SINGLE, Ranks
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
    cache = base.new_cache(n, P, base.embed_weight.dtype).to(device)  # (Lyr, 2, n, Hkv, P, D)
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


def _decode(
    base: Transformer, token: torch.Tensor, past: torch.Tensor, cache: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row at that row's committed length: token, past (R,) -> logits (R, V),
    hidden (R, E); writes the token's keys and values into `cache` (Lyr, 2, R, Hkv, S, D)."""
    R = token.shape[0]
    with one_token_attention(base):
        logits, hidden, _ = base(
            token[:, None],
            past[:, None],
            torch.ones(R, 1, 1, dtype=torch.bool, device=token.device),
            past,
            base.layer_caches(cache),
        )  # (R, 1, V), (R, 1, E)
    return logits[:, 0], hidden[:, 0]


class Lockstep:
    """Pairs every base forward of this rank with one on every other rank (module docstring),
    for a base sharded across `ranks`. With `ranks` of one process (the default) it is inert:
    `agree` returns this rank's own wish and nothing else runs, so the unsharded path is
    unchanged."""

    def __init__(self, base: Transformer, ranks: Ranks = SINGLE) -> None:
        self.base, self.ranks = base, ranks
        self.device = base.embed_weight.device

    @property
    def collective(self) -> bool:
        return self.ranks.distributed

    def agree(self, want: bool, *, active: bool = True) -> tuple[bool, bool]:
        """(whether any rank wants this call, whether any rank still has work)."""
        if not self.collective:
            return want, active
        flags = torch.tensor([int(want), int(active)], device=self.device)  # (2,)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        return bool(flags[0]), bool(flags[1])

    def prefill(self, want: bool) -> bool:
        """Agree on this step's prefill; run a dummy one if another rank wants it and this one
        does not. Returns whether this rank should run its own."""
        anyone, _ = self.agree(want)
        if anyone and not want:
            self._dummy_prefill()
        return want

    def decode(self, want: bool) -> bool:
        """`prefill`'s twin for the decode step."""
        anyone, _ = self.agree(want)
        if anyone and not want:
            self._dummy_decode()
        return want

    def _dummy_prefill(self) -> None:
        """A 1-token prompt through the same calls as a real admission: hidden_states, then
        logits (each call is its own set of collectives, so the calls must match too)."""
        _, last, _ = _prefill(self.base, [[0]], self.device)
        self.base.logits(last)

    def _dummy_decode(self) -> None:
        cache = self.base.new_cache(1, 1, dtype=self.base.embed_weight.dtype).to(self.device)
        zero = torch.zeros(1, dtype=torch.int64, device=self.device)  # (1,)
        _decode(self.base, zero, zero, cache)

    @torch.inference_mode()
    def drain(self) -> None:
        """This rank has no prompts left: step dummies alongside the others until none has
        work. All ranks leave at the same step, the first whose agreement finds no work."""
        if not self.collective:
            return
        while True:
            anyone, busy = self.agree(False, active=False)
            if not busy:
                return
            if anyone:
                self._dummy_prefill()
            self.decode(False)


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
    lockstep: Lockstep | None = None,
) -> list[Trace]:
    """Greedy answers of `base` to `prompts` (token id lists), in the base's dtype (fp32
    unless it was cast), `slots` rows at a time.

    Returns per prompt, in the order given: contexts (n, E) in the base's dtype, next tokens
    (n,) int64, and the top-C ids (n, C) int64 / log-probs (n, C) float32 (None when `top_c`
    is 0). Context 0 is the prompt's last token; an answer stops after an EOS (kept) or at
    `max_new_tokens`. `progress(k)` is called as k answers finish. `lockstep`: for a sharded
    base, pairs each forward with the other ranks' (the caller then `drain`s it)."""
    if not prompts:
        return []
    step_with = lockstep or Lockstep(base)
    device, dtype = base.embed_weight.device, base.embed_weight.dtype
    eos = torch.tensor(sorted(set(eos_token_ids)), dtype=torch.int64)
    R = min(slots, len(prompts))
    S = max(len(p) for p in prompts) + max_new_tokens
    cache = base.new_cache(R, S, dtype).to(device)  # (Lyr, 2, R, Hkv, S, D)
    past = torch.zeros(R, dtype=torch.int64, device=device)  # (R,) committed length per row
    E, V = base.config.hidden_size, base.config.vocab_size
    h = torch.zeros(R, E, dtype=dtype, device=device)  # (R, E) last hidden per row
    logits = torch.zeros(R, V, dtype=dtype, device=device)  # (R, V) its next-token logits
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
        if step_with.prefill(bool(admit)):
            rows = torch.tensor([r for r, _ in admit], device=device)
            new_cache, last, lengths = _prefill(base, [prompts[i] for _, i in admit], device)
            cache[:, :, rows, :, : new_cache.shape[4]] = new_cache
            past[rows], h[rows], logits[rows] = lengths, last, base.logits(last)
            for r, i in admit:
                owner[r] = i
        busy = [r for r in range(R) if owner[r] >= 0]
        if not busy:
            step_with.decode(False)  # finish the step the other ranks are in
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
            step_with.decode(False)
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
        step_with.decode(True)
        logits, h = _decode(base, token, past, cache)  # (R, V), (R, E)
        past = torch.where(torch.tensor([o >= 0 for o in owner], device=device), past + 1, past)
    assert all(t is not None for t in traces)
    return traces  # type: ignore[return-value]
