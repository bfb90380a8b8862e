"""`DecodeOptions`: everything that says how to decode, in one frozen value object shared by
the library (`Pipeline.generate`), the CLI, `bench`, `validate` and the benchmarks."""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Sequence

from redrafter.config import BeamShape, SamplingParams
from redrafter.decoding.lookup import LONGEST_NGRAM, MAX_NGRAM, MIN_NGRAM, SPAN_PER_NGRAM
from redrafter.decoding.tree import Packing
from redrafter.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class DecodeOptions:
    """How to decode: speculative (ReDrafter, the default) or the autoregressive baseline.

    `beam`, `packing`, `prompt_lookup`, `min_draft_prob`, `lookup_span`, `lookup_min_ngram` and
    `lookup_max_ngram` apply to speculative decoding only: `prompt_lookup` adds an n-gram draft
    of the row's own text as one more beam, `lookup_span` tokens per matched n-gram token, from
    the longest suffix match of `lookup_min_ngram` to `lookup_max_ngram` tokens (lookup.py: a
    lone recurring token predicts its old continuation poorly, a long match a long one);
    `min_draft_prob` > 0 cuts each drafter beam where its cumulative draft probability falls
    below it (prune.py).
    `stop_token_ids` end a row as EOS does and `ignore_eos` stops EOS from ending one, the same
    way in both modes (`stop_ids`). `logprobs` makes every `Step` carry its tokens'
    log-probabilities under the controlled target distribution (computed only when asked).
    `speculate_max_rows` (None: no limit) lets a speculative batch speculate only while at most
    that many rows are decoding; a step with more decodes one token per row without the drafter
    (`DecodeBatch.one_token_step`): on a compute-bound device every tree node costs verify time,
    and a full batch's trees can cost more than they accept (docs/serve.md)."""

    max_new_tokens: int = 64
    speculative: bool = True
    beam: BeamShape = BeamShape()
    sampling: SamplingParams = SamplingParams()
    packing: Packing = "dedup"
    prompt_lookup: bool = False
    min_draft_prob: float = 0.0
    lookup_span: int = SPAN_PER_NGRAM
    lookup_min_ngram: int = MIN_NGRAM  # shorter suffix matches draft nothing
    lookup_max_ngram: int = MAX_NGRAM  # the longest suffix match sought (sizes the beam)
    stop_token_ids: tuple[int, ...] = ()  # stop a row like EOS does (the id is kept)
    ignore_eos: bool = False  # EOS ids no longer stop a row; stop_token_ids still do
    logprobs: bool = False  # Step.logprobs: each emitted token's log-probability (costs a pass)
    speculate_max_rows: int | None = None  # more decoding rows than this: one-token steps

    def stop_ids(self, eos_token_ids: Sequence[int]) -> tuple[int, ...]:
        """The ids that end a row: the model's EOS ids (unless `ignore_eos`) plus
        `stop_token_ids`."""
        eos = () if self.ignore_eos else tuple(int(t) for t in eos_token_ids)
        return tuple(sorted({*eos, *self.stop_token_ids}))

    def __post_init__(self) -> None:
        if not isinstance(self.ignore_eos, bool):
            raise ConfigError(f"ignore_eos {self.ignore_eos!r} must be True or False")
        if not isinstance(self.logprobs, bool):
            raise ConfigError(f"logprobs {self.logprobs!r} must be True or False")
        if not isinstance(self.stop_token_ids, tuple) or not all(
            isinstance(t, numbers.Integral) and not isinstance(t, bool) and t >= 0
            for t in self.stop_token_ids
        ):
            raise ConfigError(
                f"stop_token_ids {self.stop_token_ids!r} must be a tuple of integers >= 0"
            )
        if self.speculate_max_rows is not None and (
            not isinstance(self.speculate_max_rows, numbers.Integral)
            or isinstance(self.speculate_max_rows, bool)
            or self.speculate_max_rows < 1
        ):
            raise ConfigError(
                f"speculate_max_rows {self.speculate_max_rows!r} must be None or an integer >= 1"
            )
        if not isinstance(self.max_new_tokens, numbers.Integral) or self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens {self.max_new_tokens!r} must be an integer >= 1")
        if self.packing not in ("dedup", "full"):
            raise ConfigError(f"packing {self.packing!r} must be 'dedup' or 'full'")
        if (
            not isinstance(self.min_draft_prob, numbers.Real)
            or not math.isfinite(self.min_draft_prob)
            or not 0.0 <= self.min_draft_prob < 1.0
        ):
            raise ConfigError(
                f"min_draft_prob {self.min_draft_prob!r} must be a finite number in [0, 1)"
            )
        if not isinstance(self.sampling, SamplingParams) or not isinstance(self.beam, BeamShape):
            raise ConfigError("sampling must be a SamplingParams and beam a BeamShape")
        if not isinstance(self.lookup_span, numbers.Integral) or self.lookup_span < 1:
            raise ConfigError(f"lookup_span {self.lookup_span!r} must be an integer >= 1")
        for name in ("lookup_min_ngram", "lookup_max_ngram"):
            value = getattr(self, name)
            if (
                not isinstance(value, numbers.Integral)
                or isinstance(value, bool)
                or not MIN_NGRAM <= value <= LONGEST_NGRAM
            ):
                raise ConfigError(
                    f"{name} {value!r} must be an integer from {MIN_NGRAM} to {LONGEST_NGRAM}"
                )
        if self.lookup_min_ngram > self.lookup_max_ngram:
            raise ConfigError(
                f"lookup_min_ngram {self.lookup_min_ngram} is above lookup_max_ngram "
                f"{self.lookup_max_ngram}"
            )

    @property
    def beam_length(self) -> int | None:
        """The drafter's beam length when speculative (sizes the acceptance histogram)."""
        return self.beam.length if self.speculative else None

    @property
    def name(self) -> str:
        """A short label: 'autoregressive' or e.g. 'W1 L5 +lookup p>=0.25' (bench tables)."""
        if not self.speculative:
            return "autoregressive"
        lookup = " +lookup" if self.prompt_lookup else ""
        if self.prompt_lookup and self.lookup_span != SPAN_PER_NGRAM:
            lookup += f" span{self.lookup_span}"
        if self.prompt_lookup and (self.lookup_min_ngram, self.lookup_max_ngram) != (
            MIN_NGRAM,
            MAX_NGRAM,
        ):
            lookup += f" {self.lookup_min_ngram}-{self.lookup_max_ngram}gram"
        floor = f" p>={self.min_draft_prob:g}" if self.min_draft_prob > 0 else ""
        rows = "" if self.speculate_max_rows is None else f" trees<={self.speculate_max_rows}rows"
        return f"W{self.beam.width} L{self.beam.length}{lookup}{floor}{rows}"

    def replace(self, **changes: object) -> DecodeOptions:
        """A copy with some fields changed (dataclasses.replace, checked again)."""
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


AUTOREGRESSIVE = DecodeOptions(speculative=False)
