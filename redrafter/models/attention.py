"""Tree attention, the reference semantics of the `redrafter::TreeAttention` op (docs/design.md §4,
docs/tree_attention.md).

Dimensions: B batch, Hq query heads, Hkv key/value heads, T new tokens (N packed tree tokens when
verifying, the prompt when prefilling), S cache capacity, P committed length (per row), D head dim.

out[b, h, i] = softmax over {cache slots 0..P_b-1} ∪ {new j : tree_mask[b, i, j]} of (q·k)·scale,
weighted sum of the matching values. The new keys/values are written to cache slots [P_b, P_b+T).

Two optional attributes (0 = off): `window`, a sliding window (Mistral, Qwen2, Gemma's local
layers): new token i sits at position P + depth(i), depth(i) = (number of new tokens it may
attend) - 1, and sees only keys at positions p - window < q <= p (transformers' convention: itself
and window - 1 before it); a committed key's position is its slot, a new key j's is
P + depth(j). `softcap` (Gemma 2): scores become softcap · tanh(scores / softcap) before masking.

Two forms of the same attention: `attend` (op version 1) takes head-major (B, H, T, D) tensors
with rotary already applied; `tree_attention` (op version 2, what the model calls) takes the
projections as they come, (B, T, H*D), and the rotary table, and does the head split, the
rotary and the head merge itself, so an exported graph spends one node per layer on them
instead of ~20 (1-4 % of a decode step on a 2-core CPU: benchmarks/RESULTS.md).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

Attend = Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def visible_slots(
    past_len: torch.Tensor, tree_mask: torch.Tensor, capacity: int, window: int = 0
) -> torch.Tensor:
    """Which cache slots each new token may attend, after the new tokens sit at [P, P+T), with
    an optional sliding `window` (0: none; module docstring).

    past_len: (B,) int64; tree_mask: (B, T, T) bool. Returns (B, T, S) bool.
    """
    B, T, _ = tree_mask.shape
    slot = torch.arange(capacity, device=past_len.device)[None, :]  # (1, S)
    rel = slot - past_len[:, None]  # (B, S)
    committed = rel < 0  # (B, S): slots 0..P-1, visible to every new token
    is_new = (rel >= 0) & (rel < T)  # (B, S): slots holding this call's tokens
    j = rel.clamp(0, T - 1)  # (B, S) new-token index
    new_visible = torch.gather(tree_mask, 2, j[:, None, :].expand(B, T, capacity))  # (B, T, S)
    visible = committed[:, None, :] | (new_visible & is_new[:, None, :])  # (B, T, S)
    if window <= 0:
        return visible
    depth = tree_mask.sum(-1) - 1  # (B, T): ancestors of each new token
    new_pos = past_len[:, None] + torch.gather(depth, 1, j)  # (B, S): P + depth(j)
    key_pos = torch.where(is_new, new_pos, slot)  # (B, S)
    query_pos = past_len[:, None] + depth  # (B, T)
    return visible & (key_pos[:, None, :] > query_pos[:, :, None] - window)  # (B, T, S)


def attend(
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
    """Reference tree attention, head-major (op version 1). Writes key/value into the caches
    **in place** at [P, P+T) (as the native kernel does with a shared IO binding) and returns
    them as the cache outputs. `scale` None or 0: 1/sqrt(D); `window`, `softcap`: 0 = off
    (module docstring).

    query: (B, Hq, T, D); key, value: (B, Hkv, T, D); key_cache, value_cache: (B, Hkv, S, D);
    past_len: (B,) int64; tree_mask: (B, T, T) bool. Returns out (B, Hq, T, D) and both caches.
    """
    B, Hkv, T, D = key.shape
    S = key_cache.shape[2]
    slots = past_len[:, None] + torch.arange(T, device=key.device)[None, :]  # (B, T)
    index = slots[:, None, :, None].expand(B, Hkv, T, D)  # (B, Hkv, T, D)
    key_cache.scatter_(2, index, key.to(key_cache.dtype))
    value_cache.scatter_(2, index, value.to(value_cache.dtype))
    mask = visible_slots(past_len, tree_mask, S, window)[:, None]  # (B, 1, T, S)
    n_rep = query.shape[1] // Hkv
    # Query head h reads KV head h // n_rep (HF's repeat_kv order).
    k = key_cache.repeat_interleave(n_rep, dim=1) if n_rep > 1 else key_cache  # (B, Hq, S, D)
    v = value_cache.repeat_interleave(n_rep, dim=1) if n_rep > 1 else value_cache
    scale = scale or 1.0 / math.sqrt(D)
    if not softcap:
        out = F.scaled_dot_product_attention(
            query, k.to(query.dtype), v.to(query.dtype), attn_mask=mask, scale=scale
        )  # (B, Hq, T, D)
        return out, key_cache, value_cache
    # Soft-capping has no fused kernel: the scores are capped before the mask, as HF's eager
    # Gemma 2 attention does, and the softmax runs in float32.
    scores = (query.float() @ k.float().transpose(-1, -2)) * scale  # (B, Hq, T, S)
    scores = softcap * torch.tanh(scores / softcap)
    probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)  # (B, Hq, T, S)
    out = (probs @ v.float()).to(query.dtype)  # (B, Hq, T, D)
    return out, key_cache, value_cache


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x·cos + rotate_half(x)·sin over the last dim (HF's rotate_half pairs (j, j + D/2)),
    computed in float32 and rounded to x's dtype once, as the native kernels do."""
    xf = x.float()
    a, b = xf.chunk(2, dim=-1)
    return (xf * cos.float() + torch.cat((-b, a), dim=-1) * sin.float()).to(x.dtype)


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, T, H*D) -> (B, H, T, D)."""
    B, T, _ = x.shape
    return x.view(B, T, heads, -1).transpose(1, 2)


def with_rotary_layout(core: Attend) -> Attend:
    """Op version 2 from a version-1 `core`: (B, T, H*D) projections and a (B, T, D) rotary
    table in, (B, T, Hq*D) out. Hkv and D come from the cache, Hq from the query's width."""

    def op(
        query: torch.Tensor,  # (B, T, Hq*D), before rotary
        key: torch.Tensor,  # (B, T, Hkv*D), before rotary
        value: torch.Tensor,  # (B, T, Hkv*D)
        key_cache: torch.Tensor,  # (B, Hkv, S, D)
        value_cache: torch.Tensor,
        past_len: torch.Tensor,  # (B,)
        tree_mask: torch.Tensor,  # (B, T, T)
        cos: torch.Tensor,  # (B, T, D)
        sin: torch.Tensor,  # (B, T, D)
        **kwargs: float | int | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        Hkv, D = key_cache.shape[1], key_cache.shape[3]
        cos4, sin4 = cos[:, None], sin[:, None]  # (B, 1, T, D): one table for every head
        q = rotary(split_heads(query, query.shape[-1] // D), cos4, sin4)  # (B, Hq, T, D)
        k = rotary(split_heads(key, Hkv), cos4, sin4)  # (B, Hkv, T, D)
        v = split_heads(value, Hkv)  # (B, Hkv, T, D)
        out, key_cache, value_cache = core(
            q, k, v, key_cache, value_cache, past_len, tree_mask, **kwargs
        )
        B, Hq, T, _ = out.shape
        return out.transpose(1, 2).reshape(B, T, Hq * D), key_cache, value_cache

    op.__doc__ = f"{getattr(core, '__name__', 'attention')} in op version 2's layout."
    return op


tree_attention = with_rotary_layout(attend)
"""The reference of op version 2: what `Attention` calls by default."""
