"""The eager PyTorch runtime: the reference every other runtime is compared with.

Dimensions: Lyr layers, B batch, Hkv KV heads, S cache capacity, D head dim, T/N new tokens,
W beam width, L beam length, E hidden, V vocab, P committed length per row.
"""

from __future__ import annotations

import numpy as np
import torch

from redrafter.config import BeamShape
from redrafter.errors import RuntimeUnavailableError
from redrafter.models.drafter import Drafter
from redrafter.models.llama import Transformer


class TorchRuntime:
    """Runs a `Transformer` (and optionally a `Drafter`) eagerly, with the cache in place."""

    name = "torch"

    def __init__(self, base: Transformer, drafter: Drafter | None = None) -> None:
        self.base = base.eval()
        self.drafter = drafter.eval() if drafter is not None else None
        self.vocab_size = base.config.vocab_size
        self.context_length = base.config.context_length
        self.cache: torch.Tensor | None = None  # (Lyr, 2, B, Hkv, S, D)

    def reset(self, *, batch: int, capacity: int) -> None:
        c = self.cache
        if c is None or c.shape[2] != batch or c.shape[4] < capacity:
            self.cache = self.base.new_cache(batch, capacity)
        # Stale slots past P are never read (the mask hides them), so no zeroing is needed.

    @torch.inference_mode()
    def prefill(self, tokens: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        assert self.cache is not None, "call reset() first"
        B, T = tokens.shape
        ids = torch.from_numpy(tokens)  # (B, T)
        positions = torch.arange(T).expand(B, T)  # (B, T)
        causal = torch.ones(T, T, dtype=torch.bool).tril().expand(B, T, T)  # (B, T, T)
        past_len = torch.zeros(B, dtype=torch.int64)
        caches = self.base.layer_caches(self.cache)
        hidden, _ = self.base.hidden_states(ids, positions, causal, past_len, caches)  # (B, T, E)
        last = hidden[torch.arange(B), torch.from_numpy(lengths) - 1]  # (B, E)
        return self.base.logits(last).float().numpy(), last.float().numpy()

    @torch.inference_mode()
    def draft(
        self, context: np.ndarray, first_token: np.ndarray, beam: BeamShape
    ) -> tuple[np.ndarray, np.ndarray]:
        if self.drafter is None:
            raise RuntimeUnavailableError(
                "speculative decoding needs a drafter; pass --drafter (or use --autoregressive)"
            )
        beams, log_probs = self.drafter.beam_search(
            torch.from_numpy(context), torch.from_numpy(first_token), self.base.embed_weight, beam
        )  # (B, W, L), (B, W, L-1, V)
        return beams.numpy(), log_probs.float().numpy()

    @torch.inference_mode()
    def verify(
        self, tokens: np.ndarray, positions: np.ndarray, tree_mask: np.ndarray, past_len: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        assert self.cache is not None, "call reset() first"
        logits, hidden, _ = self.base(
            torch.from_numpy(tokens),
            torch.from_numpy(positions),
            torch.from_numpy(tree_mask),
            torch.from_numpy(past_len),
            self.base.layer_caches(self.cache),
        )  # (B, N, V), (B, N, E); the caches are updated in place
        return logits.float().numpy(), hidden.float().numpy()

    @torch.inference_mode()
    def commit(self, past_len: np.ndarray, source: np.ndarray, count: np.ndarray) -> None:
        assert self.cache is not None, "call reset() first"
        for b in range(len(past_len)):
            P, c = int(past_len[b]), int(count[b])
            if c == 0 or np.array_equal(source[b, :c], np.arange(c)):
                continue  # the accepted path already sits at [P, P+c)
            src = torch.from_numpy(source[b, :c] + P)  # (c,) increasing, >= destinations
            # Gather first, then write: one move of c rows per layer, keys and values together.
            self.cache[:, :, b, :, P : P + c] = self.cache[:, :, b, :, src]
