"""The eager PyTorch runtime: the reference every other runtime is compared with.

Dimensions: Lyr layers, B batch, Hkv KV heads, S cache capacity, D head dim, T/N new tokens,
W beam width, L beam length, E hidden, V vocab, P committed length per row.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import numpy as np
import torch

from redrafter.config import BeamShape
from redrafter.decoding.runtime import check_rows
from redrafter.errors import ConfigError, RuntimeUnavailableError
from redrafter.models.drafter import Drafter
from redrafter.models.llama import Transformer

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
F = TypeVar("F", bound=Callable[..., Any])


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity mask, else the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def default_threads() -> int:
    """Torch intra-op threads the library's entry points use when none are asked for
    (`redrafter.pipeline`): half the usable cores, at least 1, at most 8. torch's own default
    (one per core) collapses when another process shares the cores: its OpenMP threads wait on
    each other (1.9 tok/s against 265 with one thread on 2 busy cores)."""
    return max(1, min(8, usable_cores() // 2))


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Run the block on `threads` torch intra-op threads, restoring the previous count."""
    before = torch.get_num_threads()
    if before != threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        if before != threads:
            torch.set_num_threads(before)


def _threaded(method: F) -> F:
    """A runtime call run on the runtime's own thread count (`TorchRuntime.threads`)."""

    @functools.wraps(method)
    def call(self: TorchRuntime, *args: Any, **kwargs: Any) -> Any:
        if self.threads is None:
            return method(self, *args, **kwargs)
        with torch_threads(self.threads):
            return method(self, *args, **kwargs)

    return call  # type: ignore[return-value]


class TorchRuntime:
    """Runs a `Transformer` (and optionally a `Drafter`) eagerly, with the cache in place, on
    `device` ('cpu', or 'cuda' where torch has CUDA; the driver still talks numpy).

    `dtype` casts the models and the KV cache ('float16'/'bfloat16' are for CUDA: CPU half
    matmuls are slow); float inputs are cast on the way in and outputs come back as fp32.
    `threads`: torch intra-op threads for each call (set around the call and restored, since
    torch's count is process-wide); None leaves torch's process-wide count as it is (the
    pipeline's entry points pass `default_threads()` instead)."""

    name = "torch"

    def __init__(
        self,
        base: Transformer,
        drafter: Drafter | None = None,
        *,
        device: str = "cpu",
        dtype: str = "float32",
        threads: int | None = None,
    ) -> None:
        if threads is not None and (isinstance(threads, bool) or threads < 1):
            raise ConfigError(f"threads {threads!r} must be an integer >= 1 (e.g. --threads 1)")
        self.threads = None if threads is None else int(threads)
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

    @_threaded
    @torch.inference_mode()
    def prefill(self, tokens: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        assert self.cache is not None, "call reset() first"
        return self._prefill(self.cache, tokens, lengths)

    @_threaded
    @torch.inference_mode()
    def prefill_rows(
        self, rows: np.ndarray, tokens: np.ndarray, lengths: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        assert self.cache is not None, "call reset() first"
        check_rows(rows, batch=self.cache.shape[2], prompts=len(tokens))
        out = [
            # a one-row view of the batch's cache: the prompt's K/V land in row b only
            self._prefill(self.cache[:, :, b : b + 1], tokens[r : r + 1], lengths[r : r + 1])
            for r, b in enumerate(int(x) for x in rows)
        ]
        return np.concatenate([o[0] for o in out]), np.concatenate([o[1] for o in out])

    def _prefill(
        self, cache: torch.Tensor, tokens: np.ndarray, lengths: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Prompts (B, T) into `cache` (Lyr, 2, B, Hkv, S, D) at [0, T): logits (B, V) and
        hidden (B, E) at each row's last prompt token."""
        B, T = tokens.shape
        ids = self._tensor(tokens)  # (B, T)
        positions = torch.arange(T, device=self.device).expand(B, T)  # (B, T)
        causal = torch.ones(T, T, dtype=torch.bool, device=self.device).tril().expand(B, T, T)
        past_len = torch.zeros(B, dtype=torch.int64, device=self.device)
        caches = self.base.layer_caches(cache)
        hidden, _ = self.base.hidden_states(ids, positions, causal, past_len, caches)  # (B, T, E)
        last = hidden[torch.arange(B, device=self.device), self._tensor(lengths) - 1]  # (B, E)
        return self._numpy(self.base.logits(last)), self._numpy(last)

    def _beam_search(
        self, context: np.ndarray, first_token: np.ndarray, beam: BeamShape
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Beams (B, W, L) and draft log-probs (B, W, L-1, V), on this runtime's device."""
        if self.drafter is None:
            raise RuntimeUnavailableError(
                "speculative decoding needs a drafter; pass --drafter (or use --autoregressive)"
            )
        return self.drafter.beam_search(
            self._tensor(context), self._tensor(first_token), self.base.embed_weight, beam
        )

    @_threaded
    @torch.inference_mode()
    def draft(
        self, context: np.ndarray, first_token: np.ndarray, beam: BeamShape
    ) -> tuple[np.ndarray, np.ndarray]:
        beams, log_probs = self._beam_search(context, first_token, beam)
        return self._numpy(beams), self._numpy(log_probs)

    @_threaded
    @torch.inference_mode()
    def draft_tokens(
        self, context: np.ndarray, first_token: np.ndarray, beam: BeamShape
    ) -> tuple[np.ndarray, np.ndarray]:
        beams, log_probs = self._beam_search(context, first_token, beam)
        # each draft's own log-prob, gathered where the distributions live: (B, W, L-1)
        drafted = log_probs.float().gather(-1, beams[:, :, 1:, None])[..., 0]
        return self._numpy(beams), self._numpy(drafted)

    def _verify(
        self, tokens: np.ndarray, positions: np.ndarray, tree_mask: np.ndarray, past_len: np.ndarray
    ) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.cache is not None, "call reset() first"
        B = len(tokens)  # rows [0, B) of the batch (a continuous batch's span: runtime.py)
        logits, hidden, _ = self.base(
            self._tensor(tokens),
            self._tensor(positions),
            self._tensor(tree_mask),
            self._tensor(past_len),
            self.base.layer_caches(self.cache[:, :, :B]),
        )  # (B, N, V), (B, N, E); the caches are updated in place
        return logits, hidden

    @_threaded
    @torch.inference_mode()
    def verify(
        self, tokens: np.ndarray, positions: np.ndarray, tree_mask: np.ndarray, past_len: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        logits, hidden = self._verify(tokens, positions, tree_mask, past_len)
        return self._numpy(logits), self._numpy(hidden)

    @_threaded
    @torch.inference_mode()
    def verify_greedy(
        self, tokens: np.ndarray, positions: np.ndarray, tree_mask: np.ndarray, past_len: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        logits, hidden = self._verify(tokens, positions, tree_mask, past_len)
        # argmax on the device, in float32 as `verify`'s logits reach the host (first max)
        return self._numpy(logits.float().argmax(-1)), self._numpy(hidden)

    @_threaded
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
