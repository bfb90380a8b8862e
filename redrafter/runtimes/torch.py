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

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class TorchRuntime:
    """Runs a `Transformer` (and optionally a `Drafter`) eagerly, with the cache in place, on
    `device` ('cpu', or 'cuda' where torch has CUDA; the driver still talks numpy).

    `dtype` casts the models and the KV cache ('float16'/'bfloat16' are for CUDA: CPU half
    matmuls are slow); float inputs are cast on the way in and outputs come back as fp32."""

    name = "torch"

    def __init__(
        self,
        base: Transformer,
        drafter: Drafter | None = None,
        *,
        device: str = "cpu",
        dtype: str = "float32",
    ) -> None:
        if device == "cuda" and not torch.cuda.is_available():
            raise RuntimeUnavailableError(
                "device 'cuda' requested but this torch has no CUDA device; use --device cpu"
            )
        if dtype not in DTYPES:
            raise RuntimeUnavailableError(
                f"dtype {dtype!r} is not supported by the torch runtime; use one of "
                f"{', '.join(DTYPES)}"
            )
        self.device = device
        self.dtype = DTYPES[dtype]
        self.implementation = "eager" if dtype == "float32" else f"eager-{dtype}"
        self.base = base.eval().to(device, self.dtype)
        self.drafter = drafter.eval().to(device, self.dtype) if drafter is not None else None
        self.vocab_size = base.config.vocab_size
        self.context_length = base.config.context_length
        self.max_beam_length: int | None = None  # commit moves any number of rows
        self.cache: torch.Tensor | None = None  # (Lyr, 2, B, Hkv, S, D)

    def _tensor(self, array: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(array)).to(self.device)
        return t.to(self.dtype) if t.is_floating_point() else t

    @staticmethod
    def _numpy(tensor: torch.Tensor) -> np.ndarray:
        return tensor.float().cpu().numpy() if tensor.is_floating_point() else tensor.cpu().numpy()

    def reset(self, *, batch: int, capacity: int) -> None:
        c = self.cache
        if c is None or c.shape[2] != batch or c.shape[4] < capacity:
            self.cache = self.base.new_cache(batch, capacity, dtype=self.dtype).to(self.device)
        # Stale slots past P are never read (the mask hides them), so no zeroing is needed.

    @torch.inference_mode()
    def prefill(self, tokens: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        assert self.cache is not None, "call reset() first"
        B, T = tokens.shape
        ids = self._tensor(tokens)  # (B, T)
        positions = torch.arange(T, device=self.device).expand(B, T)  # (B, T)
        causal = torch.ones(T, T, dtype=torch.bool, device=self.device).tril().expand(B, T, T)
        past_len = torch.zeros(B, dtype=torch.int64, device=self.device)
        caches = self.base.layer_caches(self.cache)
        hidden, _ = self.base.hidden_states(ids, positions, causal, past_len, caches)  # (B, T, E)
        last = hidden[torch.arange(B, device=self.device), self._tensor(lengths) - 1]  # (B, E)
        return self._numpy(self.base.logits(last)), self._numpy(last)

    @torch.inference_mode()
    def draft(
        self, context: np.ndarray, first_token: np.ndarray, beam: BeamShape
    ) -> tuple[np.ndarray, np.ndarray]:
        if self.drafter is None:
            raise RuntimeUnavailableError(
                "speculative decoding needs a drafter; pass --drafter (or use --autoregressive)"
            )
        beams, log_probs = self.drafter.beam_search(
            self._tensor(context), self._tensor(first_token), self.base.embed_weight, beam
        )  # (B, W, L), (B, W, L-1, V)
        return self._numpy(beams), self._numpy(log_probs)

    @torch.inference_mode()
    def verify(
        self, tokens: np.ndarray, positions: np.ndarray, tree_mask: np.ndarray, past_len: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        assert self.cache is not None, "call reset() first"
        logits, hidden, _ = self.base(
            self._tensor(tokens),
            self._tensor(positions),
            self._tensor(tree_mask),
            self._tensor(past_len),
            self.base.layer_caches(self.cache),
        )  # (B, N, V), (B, N, E); the caches are updated in place
        return self._numpy(logits), self._numpy(hidden)

    @torch.inference_mode()
    def commit(self, past_len: np.ndarray, source: np.ndarray, count: np.ndarray) -> None:
        assert self.cache is not None, "call reset() first"
        for b in range(len(past_len)):
            P, c = int(past_len[b]), int(count[b])
            if c == 0 or np.array_equal(source[b, :c], np.arange(c)):
                continue  # the accepted path already sits at [P, P+c)
            src = self._tensor(source[b, :c] + P)  # (c,) increasing, >= destinations
            # Gather first, then write: one move of c rows per layer, keys and values together.
            self.cache[:, :, b, :, P : P + c] = self.cache[:, :, b, :, src]
