"""Tree attention, the reference semantics of the `redrafter::TreeAttention` op (DESIGN.md §4).

Dimensions: B batch, Hq query heads, Hkv key/value heads, T new tokens (N packed tree tokens when
verifying, the prompt when prefilling), S cache capacity, P committed length (per row), D head dim.

out[b, h, i] = softmax over {cache slots 0..P_b-1} ∪ {new j : tree_mask[b, i, j]} of (q·k)·scale,
weighted sum of the matching values. The new keys/values are written to cache slots [P_b, P_b+T).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def visible_slots(past_len: torch.Tensor, tree_mask: torch.Tensor, capacity: int) -> torch.Tensor:
    """Which cache slots each new token may attend, after the new tokens sit at [P, P+T).

    past_len: (B,) int64; tree_mask: (B, T, T) bool. Returns (B, T, S) bool.
    """
    B, T, _ = tree_mask.shape
    rel = torch.arange(capacity, device=past_len.device)[None, :] - past_len[:, None]  # (B, S)
    committed = rel < 0  # (B, S): slots 0..P-1, visible to every new token
    is_new = (rel >= 0) & (rel < T)  # (B, S): slots holding this call's tokens
    j = rel.clamp(0, T - 1)[:, None, :].expand(B, T, capacity)  # (B, T, S) new-token index
    new_visible = torch.gather(tree_mask, 2, j) & is_new[:, None, :]  # (B, T, S)
    return committed[:, None, :] | new_visible


def tree_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    past_len: torch.Tensor,
    tree_mask: torch.Tensor,
    *,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference tree attention. Writes key/value into the caches **in place** at [P, P+T)
    (as the native kernel does with a shared IO binding) and returns them as the cache outputs.

    query: (B, Hq, T, D); key, value: (B, Hkv, T, D); key_cache, value_cache: (B, Hkv, S, D);
    past_len: (B,) int64; tree_mask: (B, T, T) bool. Returns out (B, Hq, T, D) and both caches.
    """
    B, Hkv, T, D = key.shape
    S = key_cache.shape[2]
    slots = past_len[:, None] + torch.arange(T, device=key.device)[None, :]  # (B, T)
    index = slots[:, None, :, None].expand(B, Hkv, T, D)  # (B, Hkv, T, D)
    key_cache.scatter_(2, index, key.to(key_cache.dtype))
    value_cache.scatter_(2, index, value.to(value_cache.dtype))
    mask = visible_slots(past_len, tree_mask, S)[:, None]  # (B, 1, T, S)
    n_rep = query.shape[1] // Hkv
    # Query head h reads KV head h // n_rep (HF's repeat_kv order).
    k = key_cache.repeat_interleave(n_rep, dim=1) if n_rep > 1 else key_cache  # (B, Hq, S, D)
    v = value_cache.repeat_interleave(n_rep, dim=1) if n_rep > 1 else value_cache
    out = F.scaled_dot_product_attention(
        query, k.to(query.dtype), v.to(query.dtype), attn_mask=mask, scale=scale
    )  # (B, Hq, T, D)
    return out, key_cache, value_cache
