"""What the frozen base model contributes to drafter training: post-norm hidden states, the
tokens to predict, and (for distillation) its own next-token distributions.

Dimensions: B batch, T tokens, M context positions (examples), E hidden size, V vocab,
K predicted tokens per context (`predict_tokens`), C teacher top-C entries kept per position.

The drafter reads the base's post-norm hidden state h_t at a context position t and, at step k
(1..K), the embedding of x_{t+k} to predict x_{t+k+1}: at inference t is the last accepted token
and x_{t+1} is the base's own next token g0 (docs/design.md §3.1). So an example is h_t plus the K+1
following tokens. A *trace* is one sequence seen from the base: contexts (n, E) and next tokens
(n,) with `next[j]` the token after context j, plus the base's top-C log-probs for that token.
Traces come from teacher forcing on data (Apple's recipe) or from the base's own greedy
generations (sequence-level distillation), where `next` is the base's argmax by construction.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from redrafter.models.attention import with_rotary_layout
from redrafter.models.llama import Transformer

Progress = Callable[[int], None]


@dataclasses.dataclass
class Examples:
    """One row per context position t.

    context: (M, E) float32, the base's post-norm hidden state at t;
    tokens: (M, K+1) int64, x_{t+1} .. x_{t+K+1}, -1 past the end of the sequence;
    teacher_ids, teacher_logp: (M, K, C) int64 / float32 or None, the base's top-C next-token
    log-probs at position t+k (the distribution of x_{t+k+1}) for k = 1..K; ids -1 where unknown.
    """

    context: torch.Tensor
    tokens: torch.Tensor
    teacher_ids: torch.Tensor | None = None
    teacher_logp: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.context.shape[0]

    @property
    def predict_tokens(self) -> int:
        return self.tokens.shape[1] - 1

    def to(self, device: torch.device | str) -> Examples:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Examples(
            self.context.to(device),
            self.tokens.to(device),
            move(self.teacher_ids),
            move(self.teacher_logp),
        )

    def take(self, index: torch.Tensor) -> Examples:
        """The rows `index` (M',) of every tensor."""
        pick = lambda t: None if t is None else t[index]  # noqa: E731
        return Examples(
            self.context[index],
            self.tokens[index],
            pick(self.teacher_ids),
            pick(self.teacher_logp),
        )

    @staticmethod
    def cat(parts: Sequence[Examples]) -> Examples:
        def join(name: str) -> torch.Tensor | None:
            tensors = [getattr(p, name) for p in parts]
            return None if any(t is None for t in tensors) else torch.cat(tensors)

        return Examples(
            torch.cat([p.context for p in parts]),
            torch.cat([p.tokens for p in parts]),
            join("teacher_ids"),
            join("teacher_logp"),
        )

    def save(self, path: Path) -> None:
        """safetensors (never pickle); written to a temp file and renamed into place."""
        tensors = {"context": self.context.contiguous(), "tokens": self.tokens.contiguous()}
        if self.teacher_ids is not None and self.teacher_logp is not None:
            tensors["teacher_ids"] = self.teacher_ids.contiguous()
            tensors["teacher_logp"] = self.teacher_logp.contiguous()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp))
        tmp.replace(path)

    @staticmethod
    def load(path: Path) -> Examples:
        t = load_file(str(path))
        return Examples(t["context"], t["tokens"], t.get("teacher_ids"), t.get("teacher_logp"))


def examples_from_trace(
    contexts: torch.Tensor,
    next_tokens: torch.Tensor,
    *,
    predict_tokens: int,
    top_ids: torch.Tensor | None = None,
    top_logp: torch.Tensor | None = None,
) -> Examples:
    """Turn one trace into examples.

    contexts: (n, E) hidden state at each context position; next_tokens: (n,) the token after
    each context; top_ids/top_logp: (n, C) the base's top-C log-probs for that token.
    Context j gets tokens next[j .. j+K] (x_{t+1}..x_{t+K+1}) and teacher rows j+1 .. j+K.
    """
    n, K = next_tokens.shape[0], predict_tokens
    padded = torch.cat([next_tokens, next_tokens.new_full((K + 1,), -1)])  # (n+K+1,)
    window = torch.arange(n)[:, None] + torch.arange(K + 1)[None, :]  # (n, K+1)
    tokens = padded[window]  # (n, K+1)
    if top_ids is None or top_logp is None:
        return Examples(contexts.float(), tokens)
    C = top_ids.shape[1]
    ids = torch.cat([top_ids, top_ids.new_full((K + 1, C), -1)])  # (n+K+1, C)
    logp = torch.cat([top_logp, top_logp.new_zeros(K + 1, C)])
    later = window[:, 1:]  # (n, K): the teacher's distribution for x_{t+k+1}
    return Examples(contexts.float(), tokens, ids[later], logp[later].float())


def decode_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    past_len: torch.Tensor,
    tree_mask: torch.Tensor,
    *,
    scale: float | None = None,
    window: int = 0,
    softcap: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`attend` (op version 1) for exactly one new token per row (T = 1), as batched generation
    needs, with the same attributes: `scale` (None or 0: 1/sqrt(D)), a sliding `window` (the
    token at position P sees the keys at P - window < q <= P) and Gemma 2's score `softcap`
    (scores capped before the mask, softmax in float32); 0 = off (models/attention.py).

    Same inputs, outputs and in-place cache write; but it reads the cache once per KV head
    instead of materialising (B, Hq, S, D) copies of it and calling a masked SDPA kernel, which
    on a CPU take ~half of a batch-32 decode step of the 135M model (profiled), and with a
    window it reads only the slots some row's window covers.
    query: (B, Hq, 1, D); key, value: (B, Hkv, 1, D); caches: (B, Hkv, S, D); past_len: (B,)."""
    B, Hkv, T, D = key.shape
    assert T == 1 and tree_mask.shape[-1] == 1, "decode_attention takes one token per row"
    slot = past_len[:, None, None, None].expand(B, Hkv, 1, D)  # (B, Hkv, 1, D)
    key_cache.scatter_(2, slot, key.to(key_cache.dtype))
    value_cache.scatter_(2, slot, value.to(value_cache.dtype))
    end = int(past_len.max()) + 1  # slots any row can see: [start, end)
    start = max(0, int(past_len.min()) - window + 1) if window > 0 else 0
    rep = query.shape[1] // Hkv  # query head h reads KV head h // rep (HF's repeat_kv order)
    dtype = torch.float32 if softcap else query.dtype  # attend caps and softmaxes in fp32
    q = query.reshape(B, Hkv, rep, D).to(dtype)  # (B, Hkv, rep, D)
    keys, values = key_cache[:, :, start:end], value_cache[:, :, start:end]  # (B, Hkv, S', D)
    scores = q @ keys.transpose(-1, -2).to(dtype)  # (B, Hkv, rep, S')
    scores = scores * (scale or D**-0.5)
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    pos = torch.arange(start, end, device=q.device)[None, :]  # (1, S') key positions
    visible = pos <= past_len[:, None]  # (B, S')
    if window > 0:
        visible &= pos > past_len[:, None] - window
    scores = scores.masked_fill(~visible[:, None, None, :], float("-inf"))
    out = torch.softmax(scores, dim=-1) @ values.to(dtype)  # (B, Hkv, rep, D)
    return out.reshape(B, Hkv * rep, 1, D).to(query.dtype), key_cache, value_cache


_decode_attention_v2 = with_rotary_layout(decode_attention)


@contextlib.contextmanager
def one_token_attention(base: Transformer) -> Iterator[None]:
    """Swap every layer's attention op for `decode_attention` (restored on exit)."""
    layers = [layer.self_attn for layer in base.model.layers]
    before = [a.op for a in layers]
    try:
        for a in layers:
            a.op = _decode_attention_v2
        yield
    finally:
        for a, op in zip(layers, before, strict=True):
            a.op = op


def _top(logits: torch.Tensor, top_c: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-C entries of log_softmax(logits): (..., V) -> ids, log-probs (..., C)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    values, ids = torch.topk(logp, top_c, dim=-1)
    return ids, values


@torch.inference_mode()
def teacher_forced(
    base: Transformer,
    chunks: torch.Tensor,
    *,
    predict_tokens: int,
    batch_size: int = 8,
    top_c: int = 0,
    progress: Progress = lambda n: None,
) -> Examples:
    """Apple's recipe: one causal pass of the base over each data chunk (N, T); every position
    but the last is a context whose following tokens are the data's."""
    parts = []
    N, T = chunks.shape
    device = base.embed_weight.device  # examples always land on the CPU
    for start in range(0, N, batch_size):
        ids = chunks[start : start + batch_size].to(device)  # (B, T)
        B = ids.shape[0]
        cache = base.new_cache(B, T, base.embed_weight.dtype).to(device)  # (Lyr, 2, B, Hkv, T, D)
        causal = torch.ones(T, T, dtype=torch.bool, device=device).tril().expand(B, T, T)
        hidden, _ = base.hidden_states(
            ids,
            torch.arange(T, device=device).expand(B, T),
            causal,
            torch.zeros(B, dtype=torch.int64, device=device),
            base.layer_caches(cache),
        )  # (B, T, E)
        for b in range(B):
            top_ids = top_logp = None
            if top_c:
                top_ids, top_logp = _top(base.logits(hidden[b, :-1]), top_c)  # (T-1, C)
                top_ids, top_logp = top_ids.cpu(), top_logp.cpu()
            parts.append(
                examples_from_trace(
                    hidden[b, :-1].cpu(),
                    ids[b, 1:].cpu(),
                    predict_tokens=predict_tokens,
                    top_ids=top_ids,
                    top_logp=top_logp,
                )
            )
        progress(B)
    return Examples.cat(parts)


@torch.inference_mode()
def generate_traces(
    base: Transformer,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    eos_token_ids: Sequence[int],
    top_c: int = 0,
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]]:
    """The base's greedy continuations of a batch of prompts, fp32 as at decode time.

    Returns per prompt (contexts (n, E), next tokens (n,), top ids, top log-probs (n, C)):
    context 0 is the prompt's last token, whose next token is the first generated one; a row
    stops after an EOS (kept: the drafter must learn to predict the end too) or n = max_new_tokens.
    """
    B, device = len(prompts), base.embed_weight.device
    lengths = torch.tensor([len(p) for p in prompts], device=device)  # (B,)
    Tp = int(lengths.max())
    ids = torch.zeros(B, Tp, dtype=torch.int64)  # right-padded; pads sit past P, never read
    for b, p in enumerate(prompts):
        ids[b, : len(p)] = torch.tensor(p)
    cache = base.new_cache(B, Tp + max_new_tokens).to(device)
    caches = base.layer_caches(cache)
    causal = torch.ones(Tp, Tp, dtype=torch.bool, device=device).tril().expand(B, Tp, Tp)
    hidden, _ = base.hidden_states(
        ids.to(device),
        torch.arange(Tp, device=device).expand(B, Tp),
        causal,
        torch.zeros(B, dtype=torch.int64, device=device),
        caches,
    )  # (B, Tp, E)
    rows = torch.arange(B, device=device)
    h = hidden[rows, lengths - 1]  # (B, E)
    logits = base.logits(h)  # (B, V)
    eos = torch.tensor(sorted(set(eos_token_ids)), dtype=torch.int64, device=device)
    past = lengths.clone()  # (B,) committed length P
    self_only = torch.ones(B, 1, 1, dtype=torch.bool, device=device)
    contexts, nexts, tops = [], [], []
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    length = torch.zeros(B, dtype=torch.int64, device=device)  # generated tokens per row
    for _ in range(max_new_tokens):
        token = logits.argmax(-1)  # (B,)
        contexts.append(h)
        nexts.append(token)
        if top_c:
            tops.append(_top(logits, top_c))
        length += ~finished
        finished |= torch.isin(token, eos)
        if bool(finished.all()) or len(nexts) == max_new_tokens:
            break
        with one_token_attention(base):
            logits, hidden, _ = base(token[:, None], past[:, None], self_only, past, caches)
        h, logits = hidden[:, 0], logits[:, 0]  # (B, E), (B, V)
        past = past + 1
    ctx = torch.stack(contexts, 1).cpu()  # (B, n, E)
    nxt = torch.stack(nexts, 1).cpu()  # (B, n)
    if top_c:
        all_ids = torch.stack([t[0] for t in tops], 1).cpu()  # (B, n, C)
        all_logp = torch.stack([t[1] for t in tops], 1).cpu()
    out = []
    for b in range(B):
        n = int(length[b])
        top_ids = top_logp = None
        if top_c:
            top_ids, top_logp = all_ids[b, :n].clone(), all_logp[b, :n].clone()
        out.append((ctx[b, :n].clone(), nxt[b, :n].clone(), top_ids, top_logp))
    return out


def distill_examples(
    base: Transformer,
    prompts: Sequence[Sequence[int]],
    *,
    predict_tokens: int,
    max_new_tokens: int,
    eos_token_ids: Sequence[int],
    batch_size: int = 16,
    top_c: int = 0,
    progress: Progress = lambda n: None,
) -> tuple[Examples, list[list[int]]]:
    """Sequence-level distillation data: greedy generations of the base from `prompts`
    (batched, similar lengths together to waste less padding). Returns the examples and the
    generated token ids per prompt (in the order given)."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    parts: list[Examples] = []
    generated: dict[int, list[int]] = {}
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        traces = generate_traces(
            base,
            [prompts[i] for i in batch],
            max_new_tokens=max_new_tokens,
            eos_token_ids=eos_token_ids,
            top_c=top_c,
        )
        for i, (ctx, nxt, top_ids, top_logp) in zip(batch, traces, strict=True):
            generated[i] = nxt.tolist()
            parts.append(
                examples_from_trace(
                    ctx, nxt, predict_tokens=predict_tokens, top_ids=top_ids, top_logp=top_logp
                )
            )
        progress(len(batch))
    return Examples.cat(parts), [generated[i] for i in range(len(prompts))]
