"""The Core ML runtime: a bundle's coreml/base.mlpackage (stateful) and coreml/drafter.mlpackage
run with `MLModel.predict` on macOS 15+, one `MLState` (from `make_state()`) per batch row.

Dimensions: B batch, T prompt length, N new tokens (N <= N_max per call), S cache capacity,
W beam width, L beam length, E hidden, V vocab, P committed length per row.

The programs are batch 1 (Core ML states have a fixed shape), so a batch of B rows is B calls,
each with its own state: ragged P comes for free. `commit` is not a call: it records the move
(absolute source slots, destination P) and the row's next base call applies it inside the
program, before its tokens run (see export/coreml.py). `CoreMLProgramRuntime` holds everything
but the two `predict` calls, shared with the MIL evaluator runtime (`coreml-mil`).
"""

from __future__ import annotations

import platform
import sys
from pathlib import Path
from typing import Any

import numpy as np

from redrafter.bundle import Bundle, load_bundle
from redrafter.bundle import names as n
from redrafter.config import BeamShape
from redrafter.coremltools_support import import_coremltools, quiet
from redrafter.decoding.runtime import argmax_tokens, check_rows, drafted_log_probs
from redrafter.errors import RuntimeUnavailableError


class CoreMLProgramRuntime:
    """The Runtime protocol over a bundle's Core ML programs; subclasses supply the calls."""

    name = "coreml"
    implementation = "Core ML"
    device = "all"

    def __init__(self, bundle: Bundle | str | Path) -> None:
        self.bundle = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
        record = self.bundle.manifest.coreml
        if record is None or not self.has_package("base"):
            raise RuntimeUnavailableError(
                f"{self.bundle.root} has no Core ML programs; export with --target coreml"
            )
        config = self.bundle.base_config
        self.capacity = record.capacity  # S
        self.max_tokens = record.max_tokens  # N_max per base call
        self.commit_length = record.commit_length  # L rows per commit
        self.max_beam_length = self.commit_length  # its commit program moves L rows
        # What parity holds the programs to: their quantized weights, else the compute precision
        # (float16 | float32; the states are fp16 either way).
        q = self.bundle.manifest.quantization
        self.precision = record.compute_precision if q is None else q.weights
        self.vocab_size = config.vocab_size
        beam = self.bundle.beam
        # Room for the prompt + generation, plus one draft tree past the last committed token.
        self.context_length = min(config.context_length, self.capacity - beam.width * beam.length)
        self.states: list[Any] = []
        self.pending: list[tuple[np.ndarray, int]] = []  # per row: (commit_from (L,), commit_at)

    # -- what a backend provides ------------------------------------------------------------------
    def _new_state(self) -> Any:
        raise NotImplementedError

    def _input_dtype(self, model: str, name: str) -> np.dtype:
        raise NotImplementedError

    def _predict_base(self, feeds: dict[str, np.ndarray], state: Any) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def _predict_drafter(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise NotImplementedError

    # -- the bundle -------------------------------------------------------------------------------
    def package(self, name: str) -> Path:
        return self.bundle.path(n.coreml_package(name))

    def has_package(self, name: str) -> bool:
        return self.bundle.has_tree(n.coreml_package(name))

    # -- the protocol -----------------------------------------------------------------------------
    def reset(self, *, batch: int, capacity: int) -> None:
        if capacity > self.capacity:
            raise RuntimeUnavailableError(
                f"needs {capacity} cache slots but this bundle's Core ML cache holds "
                f"{self.capacity}; shorten the prompt or --max-new-tokens, or re-export with a "
                "larger Core ML capacity"
            )
        self.states = [self._new_state() for _ in range(batch)]
        self.pending = [self._no_commit() for _ in range(batch)]

    def _no_commit(self) -> tuple[np.ndarray, int]:
        return np.arange(self.commit_length, dtype=np.int64), 0  # rows 0..L-1 onto themselves

    def _run_base(
        self, row: int, tokens: np.ndarray, positions: np.ndarray, mask: np.ndarray, past_len: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """One base call for one row: tokens, positions (N,), mask (N, N) at committed length
        P = past_len. Returns logits (N, V) and hidden states (N, E), float32."""
        N = len(tokens)
        if N > self.max_tokens:
            raise RuntimeUnavailableError(
                f"{N} tokens in one call exceed this Core ML program's {self.max_tokens}; "
                "re-export with a smaller beam"
            )
        if past_len + N > self.capacity:
            raise RuntimeUnavailableError(
                f"cache slots [{past_len}, {past_len + N}) exceed the Core ML capacity "
                f"{self.capacity}; lower --max-new-tokens"
            )
        commit_from, commit_at = self.pending[row]
        values = {
            n.INPUT_IDS: tokens[None],
            n.POSITION_IDS: positions[None],
            n.TREE_MASK: mask[None],
            n.PAST_LEN: np.array([past_len]),
            n.COMMIT_FROM: commit_from,
            n.COMMIT_AT: np.array([commit_at]),
        }
        feeds = {
            k: np.ascontiguousarray(v, self._input_dtype("base", k)) for k, v in values.items()
        }
        out = self._predict_base(feeds, self.states[row])
        self.pending[row] = self._no_commit()
        return (
            np.asarray(out[n.LOGITS], np.float32)[0],
            np.asarray(out[n.HIDDEN_STATES], np.float32)[0],
        )

    def prefill(self, tokens: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.prefill_rows(np.arange(len(tokens)), tokens, lengths)

    def prefill_rows(
        self, rows: np.ndarray, tokens: np.ndarray, lengths: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        check_rows(rows, batch=len(self.states), prompts=len(tokens))
        out = [self._prefill_row(int(b), tokens[r], int(lengths[r])) for r, b in enumerate(rows)]
        return np.stack([o[0] for o in out]), np.stack([o[1] for o in out])  # (R, V), (R, E)

    def _prefill_row(
        self, row: int, tokens: np.ndarray, length: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """One prompt (its first `length` ids) into `row`'s state from slot 0, in chunks of
        N_max: logits (V,) and hidden (E,) at its last token."""
        self.pending[row] = self._no_commit()  # a move recorded for the row's last request
        for start in range(0, length, self.max_tokens):
            C = min(self.max_tokens, length - start)
            out_logits, out_hidden = self._run_base(
                row,
                tokens[start : start + C],
                np.arange(start, start + C),
                np.tril(np.ones((C, C), bool)),
                start,
            )
        return out_logits[-1], out_hidden[-1]

    def draft(
        self, context: np.ndarray, first_token: np.ndarray, beam: BeamShape
    ) -> tuple[np.ndarray, np.ndarray]:
        if not self.has_package("drafter"):
            raise RuntimeUnavailableError(
                f"{self.bundle.root} has no Core ML drafter; export with --drafter "
                "(or decode with --autoregressive)"
            )
        if beam != self.bundle.beam:
            raise RuntimeUnavailableError(
                f"this bundle's Core ML drafter is exported for beam {self.bundle.beam.width}x"
                f"{self.bundle.beam.length}, not {beam.width}x{beam.length}; "
                "re-export with --beam-width/--beam-length"
            )
        beams, log_probs = [], []
        for b in range(len(first_token)):
            feeds = {
                n.CONTEXT: np.ascontiguousarray(
                    context[b : b + 1], self._input_dtype("drafter", n.CONTEXT)
                ),
                n.FIRST_TOKEN: np.ascontiguousarray(
                    first_token[b : b + 1], self._input_dtype("drafter", n.FIRST_TOKEN)
                ),
            }
            out = self._predict_drafter(feeds)
            beams.append(np.asarray(out[n.BEAMS]).astype(np.int64))
            log_probs.append(np.asarray(out[n.LOG_PROBS], np.float32))
        return np.concatenate(beams), np.concatenate(log_probs)  # (B, W, L), (B, W, L-1, V)

    def verify(
        self, tokens: np.ndarray, positions: np.ndarray, tree_mask: np.ndarray, past_len: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        rows = [
            self._run_base(b, tokens[b], positions[b], tree_mask[b], int(past_len[b]))
            for b in range(len(tokens))
        ]
        return np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows])  # (B,N,V), (B,N,E)

    # The programs give whole distributions on the host already: the narrow calls read them.
    def draft_tokens(
        self, context: np.ndarray, first_token: np.ndarray, beam: BeamShape
    ) -> tuple[np.ndarray, np.ndarray]:
        beams, log_probs = self.draft(context, first_token, beam)
        return beams, drafted_log_probs(beams, log_probs)

    def verify_greedy(
        self, tokens: np.ndarray, positions: np.ndarray, tree_mask: np.ndarray, past_len: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        logits, hidden = self.verify(tokens, positions, tree_mask, past_len)
        return argmax_tokens(logits), hidden

    def commit(self, past_len: np.ndarray, source: np.ndarray, count: np.ndarray) -> None:
        L = self.commit_length
        if source.shape[1] > L:
            raise RuntimeUnavailableError(
                f"commit of {source.shape[1]} rows exceeds this Core ML program's {L}; "
                "decode with the bundle's beam length"
            )
        for b in range(len(past_len)):
            P = int(past_len[b])
            offsets = np.arange(L, dtype=np.int64)  # identity past the accepted count
            c = int(count[b])
            offsets[:c] = source[b, :c]
            self.pending[b] = (P + offsets, P)


MIN_MACOS = (15, 0)


def macos_version() -> tuple[int, ...] | None:
    """(major, minor) on macOS, else None."""
    if sys.platform != "darwin":
        return None
    release = platform.mac_ver()[0]
    return tuple(int(x) for x in release.split(".")[:2]) if release else (0, 0)


class CoreMLRuntime(CoreMLProgramRuntime):
    """Apple's runtime: `coremltools.models.MLModel(...).predict(feeds, state=...)`, macOS 15+.
    `compute_units`: 'all' (CPU, GPU and Neural Engine), 'cpu_and_gpu', 'cpu_and_ne' or
    'cpu_only'."""

    name = "coreml"
    implementation = "Core ML"

    def __init__(self, bundle: Bundle | str | Path, *, compute_units: str = "all") -> None:
        version = macos_version()
        if version is None:
            raise RuntimeUnavailableError(
                f"Core ML prediction needs macOS 15+ (this is {sys.platform}); "
                "use --runtime coreml-mil to check the converted program here"
            )
        if version < MIN_MACOS:
            raise RuntimeUnavailableError(
                f"Core ML states need macOS 15+, this is macOS {'.'.join(map(str, version))}; "
                "upgrade macOS or use --runtime coreml-mil"
            )
        super().__init__(bundle)
        ct = import_coremltools()
        units = {
            "all": ct.ComputeUnit.ALL,
            "cpu_and_gpu": ct.ComputeUnit.CPU_AND_GPU,
            "cpu_and_ne": ct.ComputeUnit.CPU_AND_NE,
            "cpu_only": ct.ComputeUnit.CPU_ONLY,
        }
        if compute_units not in units:
            raise RuntimeUnavailableError(
                f"compute units {compute_units!r} must be one of {', '.join(units)}"
            )
        self.device = compute_units
        with quiet():  # loading compiles the package once (cached by Core ML)
            self.base = ct.models.MLModel(
                str(self.package("base")), compute_units=units[compute_units]
            )
            self.drafter = (
                ct.models.MLModel(str(self.package("drafter")), compute_units=units[compute_units])
                if self.has_package("drafter")
                else None
            )
        self._dtypes = {
            ("base", i.name): _spec_dtype(i) for i in self.base.get_spec().description.input
        }
        if self.drafter is not None:
            self._dtypes.update(
                {
                    ("drafter", i.name): _spec_dtype(i)
                    for i in self.drafter.get_spec().description.input
                }
            )

    def _new_state(self) -> Any:
        return self.base.make_state()

    def _input_dtype(self, model: str, name: str) -> np.dtype:
        return self._dtypes[(model, name)]

    def _predict_base(self, feeds: dict[str, np.ndarray], state: Any) -> dict[str, np.ndarray]:
        return self.base.predict(feeds, state=state)

    def _predict_drafter(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        assert self.drafter is not None
        return self.drafter.predict(feeds)


def _spec_dtype(feature: Any) -> np.dtype:
    """numpy dtype of a model-description input (MLMultiArray)."""
    from coremltools.proto import FeatureTypes_pb2 as ft

    kinds = ft.ArrayFeatureType.ArrayDataType
    table = {
        kinds.Value("FLOAT32"): np.float32,
        kinds.Value("FLOAT16"): np.float16,
        kinds.Value("DOUBLE"): np.float64,
        kinds.Value("INT32"): np.int32,
    }
    return np.dtype(table[feature.type.multiArrayType.dataType])
