"""Dynamic tree attention bookkeeping (docs/design.md §3.3): pack a beam of drafts into one
sequence.

Dimensions: B batch, W beam width, L beam length, N packed tokens (N <= W*L).

Beams often share prefixes (every beam starts with the LLM's token g0). `dedup` packing keeps
each distinct prefix once, in first-seen order (beam 0's tokens, then beam 1's new suffix, ...),
so every ancestor precedes its descendants and the tree mask is a subset of the causal mask.
`full` packing keeps all W*L tokens (block-diagonal mask), for static-shape targets (Core ML).

Beams may be ragged: slots after a beam's last draft hold NO_TOKEN (config.py). Dedup packing
gives them no token (their unpacker entry repeats the last real slot); full packing keeps the
slot but verifies g0 there, which acceptance never reaches because NO_TOKEN matches nothing.

Worked example (W=3, L=3)::

    beams = [[7, 1, 2],        packed = [7, 1, 2, 3, 4, 5]      depth = [0, 1, 2, 2, 1, 2]
             [7, 1, 3],        unpacker = [[0, 1, 2],
             [7, 4, 5]]                    [0, 1, 3],
                                           [0, 4, 5]]
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np

from redrafter.config import NO_TOKEN

Packing = Literal["dedup", "full"]


@dataclasses.dataclass(frozen=True)
class PackedTree:
    """tokens (B, N) int64; unpacker (B, W, L) int64 with tokens[b][unpacker[b]] == beams[b];
    tree_mask (B, N, N) bool, ancestor-or-self; depth (B, N) int64 position offsets;
    sizes (B,) the real N of each row (slots past it are padding that attends only itself)."""

    tokens: np.ndarray
    unpacker: np.ndarray
    tree_mask: np.ndarray
    depth: np.ndarray
    sizes: np.ndarray


def _dedup_parents(beams: np.ndarray) -> tuple[np.ndarray, list[int], list[int], list[int]]:
    """One row: (W, L) beams -> unpacker (W, L), packed tokens, parent index, depth."""
    W, L = beams.shape
    index: dict[tuple[int, ...], int] = {}
    unpacker = np.empty((W, L), dtype=np.int64)
    tokens: list[int] = []
    parents: list[int] = []
    depths: list[int] = []
    for w in range(W):
        prefix: tuple[int, ...] = ()
        parent = -1
        for d in range(L):
            if beams[w, d] == NO_TOKEN:  # the draft ended: the rest point at its last slot
                assert d > 0, "column 0 (g0) is never NO_TOKEN"
                unpacker[w, d:] = parent
                break
            prefix = prefix + (int(beams[w, d]),)
            slot = index.get(prefix)
            if slot is None:
                slot = index[prefix] = len(tokens)
                tokens.append(prefix[-1])
                parents.append(parent)
                depths.append(d)
            unpacker[w, d] = parent = slot
    return unpacker, tokens, parents, depths


def pack(beams: np.ndarray, *, packing: Packing = "dedup") -> PackedTree:
    """Pack beams (B, W, L) int64 into a token tree (see `PackedTree`)."""
    B, W, L = beams.shape
    if packing == "full":
        N = W * L
        slot = np.arange(N).reshape(W, L)  # (W, L)
        beam_of = slot // L  # (W, L) -> flattened below
        depth = np.tile(np.arange(L), W)  # (N,)
        same_beam = beam_of.reshape(N)[:, None] == beam_of.reshape(N)[None, :]  # (N, N)
        mask = same_beam & (depth[None, :] <= depth[:, None])  # (N, N) causal within a beam
        g0 = np.broadcast_to(beams[:, :1, :1], beams.shape)  # (B, W, L)
        return PackedTree(
            tokens=np.where(beams == NO_TOKEN, g0, beams).reshape(B, N).astype(np.int64),
            unpacker=np.broadcast_to(slot, (B, W, L)).copy(),
            tree_mask=np.broadcast_to(mask, (B, N, N)).copy(),
            depth=np.broadcast_to(depth, (B, N)).copy(),
            sizes=np.full(B, N, dtype=np.int64),
        )
    if packing != "dedup":
        raise ValueError(f"packing {packing!r} must be 'dedup' or 'full'")
    rows = [_dedup_parents(beams[b]) for b in range(B)]
    N = max(len(r[1]) for r in rows)
    tokens = np.zeros((B, N), dtype=np.int64)
    unpacker = np.empty((B, W, L), dtype=np.int64)
    mask = np.zeros((B, N, N), dtype=bool)
    depth = np.zeros((B, N), dtype=np.int64)
    sizes = np.empty(B, dtype=np.int64)
    for b, (unp, toks, parents, depths) in enumerate(rows):
        n = sizes[b] = len(toks)
        unpacker[b] = unp
        tokens[b, :n] = toks
        tokens[b, n:] = toks[0]  # padding repeats g0; it attends only itself and is never kept
        depth[b, :n] = depths
        for i, p in enumerate(parents):  # parents precede children, so rows build top-down
            if p >= 0:
                mask[b, i] = mask[b, p]
            mask[b, i, i] = True
        mask[b, np.arange(n, N), np.arange(n, N)] = True
    return PackedTree(tokens, unpacker, mask, depth, sizes)


def unpack(packed: np.ndarray, unpacker: np.ndarray) -> np.ndarray:
    """Gather per-token values back into beam layout: (B, N, ...) -> (B, W, L, ...)."""
    B = packed.shape[0]
    return packed[np.arange(B)[:, None, None], unpacker]
