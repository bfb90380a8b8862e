"""The library entry point: a runtime plus a tokenizer, with `generate` and a streaming iterator.

import redrafter
pipe = redrafter.from_checkpoints("path/to/base", drafter="path/to/drafter")
out = pipe.generate(["What is the capital of France?"], chat=True)
print(out.texts[0], out.stats["tokens_per_step"])
chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
out = pipe.generate([chat, "Plain text", [1, 2, 3]])  # a chat, text and ids: one batch
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from redrafter.bundle import Bundle, load_bundle
from redrafter.bundle.names import TOKENIZER_DIR
from redrafter.config import TOP_K, BeamShape, SamplingParams
from redrafter.decoding.driver import decode
from redrafter.decoding.lookup import MAX_NGRAM, MIN_NGRAM, SPAN_PER_NGRAM
from redrafter.decoding.options import DecodeOptions
from redrafter.decoding.output import Step
from redrafter.decoding.runtime import Runtime
from redrafter.decoding.stats import summarize
from redrafter.errors import (
    CheckpointError,
    ConfigError,
    RuntimeUnavailableError,
    TokenizerError,
)
from redrafter.models.chat import Chat, is_chat
from redrafter.models.checkpoints import load_pair
from redrafter.models.tokenizer import StreamDecoder, find_tokenizer, load_tokenizer
from redrafter.runtimes.coreml import CoreMLRuntime
from redrafter.runtimes.coreml_mil import CoreMLMilRuntime
from redrafter.runtimes.onnxruntime import OnnxRuntime
from redrafter.runtimes.torch import TorchRuntime, default_threads


@dataclasses.dataclass
class Generation:
    """token_ids: generated ids per prompt (prompt excluded); texts: their decoded text (None
    without a tokenizer); stats: see `redrafter.decoding.stats.summarize`; logprobs[b][i]:
    token_ids[b][i]'s log-probability, when the options asked for them (else None)."""

    token_ids: list[list[int]]
    texts: list[str] | None
    stats: dict[str, Any]
    logprobs: list[list[float]] | None = None


# Text, token ids, or a chat: `Message`s or {"role", "content"} dicts (`models.chat`).
Prompt = str | Sequence[int] | Chat


class Pipeline:
    """A runtime, a tokenizer (optional: id prompts work without one) and the stop tokens.

    Thread safety: a runtime holds one KV cache, so a pipeline runs one decode at a time.
    Concurrent callers are serialised by a lock held for a whole decode: `generate` holds it
    until it returns; a `stream` iterator takes it at its first step and holds it for its whole
    life, releasing it when exhausted, closed (`close()`, garbage collection) or on an
    exception. Other threads wait meanwhile, so each caller gets exactly the tokens of a
    sequential call. A thread that starts a decode while its own stream is still open gets a
    `ConfigError` instead of a deadlock (finish or close that stream first)."""

    def __init__(
        self,
        runtime: Runtime,
        tokenizer: Any | None = None,
        eos_token_ids: Sequence[int] = (),
        defaults: DecodeOptions = DecodeOptions(),
    ) -> None:
        self.runtime = runtime
        self.defaults = defaults  # e.g. a bundle's beam shape and packing
        self.tokenizer = tokenizer
        eos = set(eos_token_ids) | set(getattr(tokenizer, "eos_token_ids", ()) or ())
        self.eos_token_ids = tuple(sorted(eos))
        self._lock = threading.Lock()  # one decode at a time (see the class docstring)
        self._owner: int | None = None  # the thread whose decode holds _lock

    def _locked_decode(self, ids: list[list[int]], options: DecodeOptions) -> Iterator[Step]:
        """`decode` under the pipeline's lock, held from the first step to the last."""
        with self.exclusive():
            yield from decode(self.runtime, ids, options, eos_token_ids=self.eos_token_ids)

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[Runtime]:
        """Hold the pipeline's lock (the one a decode holds, see the class docstring) around a
        decode the caller drives itself, e.g. `redrafter serve`'s continuous batch stepping
        `decoding.driver.open_batch` on the runtime this yields."""
        if self._owner == threading.get_ident():
            raise ConfigError(
                "this thread already runs a decode on this pipeline (an open stream); "
                "finish or close() that stream before starting another"
            )
        with self._lock:
            self._owner = threading.get_ident()
            try:
                yield self.runtime
            finally:
                self._owner = None

    def encode(self, prompt: Prompt, *, chat: bool = False) -> list[int]:
        """A prompt's ids: token ids as given; text as transformers' `tokenizer(text)` encodes
        it (with the BOS the tokenizer adds, if any), or with `chat` as one user turn in the
        chat template; a message list in the chat template (`Tokenizer.encode_prompt`). A
        chat needs a tokenizer with a chat template (else a one-line `TokenizerError`)."""
        if not isinstance(prompt, str) and not is_chat(prompt):
            return [int(t) for t in prompt]  # type: ignore[arg-type]
        if self.tokenizer is None:
            raise TokenizerError("this model has no tokenizer; pass token ids (--prompt-ids)")
        return list(self.tokenizer.encode_prompt(prompt, chat=chat))

    def stream(
        self,
        prompts: Sequence[Prompt],
        options: DecodeOptions | None = None,
        *,
        chat: bool = False,
    ) -> Iterator[Step]:
        """Yield one `Step` per runtime round trip; `step.new_tokens[b]` is what row b emitted.
        The options are checked against the runtime (`check_options`) before anything runs.
        The iterator holds the pipeline's lock from its first step until it is exhausted or
        closed (see the class docstring)."""
        options = options or self.defaults
        check_options(self.runtime, options)
        ids = [self.encode(p, chat=chat) for p in prompts]
        return self._locked_decode(ids, options)  # holds the lock (see the class docstring)

    def stream_text(
        self,
        prompts: Sequence[Prompt],
        options: DecodeOptions | None = None,
        *,
        chat: bool = False,
        stop: Sequence[str] = (),
    ) -> Iterator[str]:
        """Stream the text of one prompt's generation as it is accepted: the pieces concatenate
        to the full decode (multi-byte characters split across steps are held back until
        complete, `StreamDecoder`). One prompt only; needs a tokenizer. `stop`: decoding ends
        as soon as the text contains one of these strings; the text streamed ends just before
        it (text that could be the start of a stop is held back until it is known not to be)."""
        if len(prompts) != 1:
            raise ConfigError(
                f"stream_text streams one prompt, got {len(prompts)}; call it per prompt "
                "(or use stream() for token ids per row)"
            )
        if self.tokenizer is None:
            raise TokenizerError("this model has no tokenizer; use stream() for token ids")
        stops = check_stops(stop)
        steps = self.stream(prompts, options, chat=chat)
        if stops:
            return _stopped_pieces(steps, StopScan(self.tokenizer, stops))
        return _text_pieces(steps, StreamDecoder(self.tokenizer, skip_special_tokens=True))

    def generate(
        self,
        prompts: Sequence[Prompt],
        options: DecodeOptions | None = None,
        *,
        chat: bool = False,
        stop: Sequence[str] = (),
    ) -> Generation:
        """Run to completion; returns ids, texts and stats. `stop`: a row ends as soon as its
        decoded text contains one of these strings (matched across token boundaries); its
        text is cut just before the stop, and its token_ids keep the tokens whose text ends
        at or before the stop's start (a token straddling the stop's start is dropped, though
        its text before the stop stays in `texts`). Decoding ends once every row has stopped
        (by stop string, stop id or max_new_tokens); stats count the steps actually run."""
        options = options or self.defaults
        stops = check_stops(stop)
        if stops and self.tokenizer is None:
            raise TokenizerError("stop strings need a tokenizer; use stop_token_ids instead")
        stream = self.stream(prompts, options, chat=chat)
        scans = [StopScan(self.tokenizer, stops) for _ in prompts] if stops else []
        steps: list[Step] = []
        try:
            for step in stream:
                steps.append(step)
                for scan, new in zip(scans, step.new_tokens, strict=bool(scans)):
                    scan.push(new)
                # Rows that hit a stop string are done; the runtime decodes the batch until
                # all are (or the driver's own stops end it), then the stream is closed.
                if scans and all(scan.stopped for scan in scans):
                    break
        finally:
            stream.close()  # type: ignore[attr-defined]  # releases the lock at once
        token_ids = [sum((s.new_tokens[b] for s in steps), []) for b in range(len(prompts))]
        if scans:
            for scan in scans:
                scan.finish()
            token_ids = [scan.kept_ids() for scan in scans]
            texts: list[str] | None = [scan.text for scan in scans]
        else:
            texts = (
                None
                if self.tokenizer is None
                else [self.tokenizer.decode(t, skip_special_tokens=True) for t in token_ids]
            )
        stats = summarize(steps, beam_length=options.beam_length)
        logprobs = None
        if options.logprobs:  # each row's, cut where a stop string cut its ids
            logprobs = [
                sum((s.logprobs[b] for s in steps if s.logprobs is not None), [])[: len(ids)]
                for b, ids in enumerate(token_ids)
            ]
        return Generation(token_ids, texts, stats, logprobs)


def from_checkpoints(
    base: str | Path,
    *,
    drafter: str | Path | None = None,
    runtime: str = "torch",
    device: str = "cpu",
    dtype: str = "float32",
    threads: int | None = None,
) -> Pipeline:
    """Load a base checkpoint (HF folder, .gguf or llama2.c .bin) and optionally a drafter
    (Apple's layout) into a pipeline on the eager torch runtime (`dtype`: float32, float16 or
    bfloat16 weights and cache; `threads`: torch intra-op threads around each runtime call,
    None = `redrafter.runtimes.torch.default_threads()`). Without a drafter the pipeline
    decodes autoregressively by default (as a drafter-less bundle does)."""
    if runtime != "torch":
        raise RuntimeUnavailableError(
            f"runtime {runtime!r} needs an exported bundle; checkpoints run on 'torch'"
        )
    model, draft = load_pair(base, drafter)
    return Pipeline(
        TorchRuntime(
            model, draft, device=device, dtype=dtype, threads=threads or default_threads()
        ),
        find_tokenizer(base),  # None: id prompts still work; text prompts raise a clear error
        model.config.eos_token_ids,
        DecodeOptions(speculative=draft is not None),
    )


def load(
    bundle: str | Path,
    *,
    runtime: str = "onnxruntime",
    device: str = "cpu",
    native: bool | None = None,
    threads: int | None = None,
    allow_fallback: bool = False,
) -> Pipeline:
    """Load an exported bundle onto a runtime. `runtime`: 'onnxruntime' (the bundle's graphs;
    `device` 'cpu' or 'cuda'; `native` None = use the native TreeAttention library when built)
    or 'torch' (the PyTorch reference rebuilt from the checkpoints the bundle was exported from),
    'coreml' (the Core ML programs on Apple's runtime, macOS 15+) or 'coreml-mil' (the converted
    Core ML programs evaluated op by op in numpy: checks the conversion, not Apple's runtime).
    Defaults for `generate` come from the bundle (its beam shape and packing; a bundle without
    a drafter decodes autoregressively). `threads`: intra-op threads of the onnxruntime and
    torch runtimes (None: their default, `runtimes.torch.default_threads` for torch);
    `allow_fallback`: let ONNX Runtime run on the CPU when `device='cuda'` is unavailable
    (otherwise `RuntimeUnavailableError`)."""
    b = load_bundle(bundle)
    if runtime == "onnxruntime":
        rt: Runtime = OnnxRuntime(
            b, device=device, native=native, threads=threads, allow_fallback=allow_fallback
        )
    elif runtime == "torch":
        rt = reference_runtime(b, threads=threads)
    elif runtime == "coreml":
        rt = CoreMLRuntime(b)
    elif runtime == "coreml-mil":
        rt = CoreMLMilRuntime(b)
    else:
        raise RuntimeUnavailableError(
            f"unknown runtime {runtime!r}; choose onnxruntime, torch, coreml or coreml-mil"
        )
    tokenizer = load_tokenizer(b.path(TOKENIZER_DIR)) if b.has_tree(TOKENIZER_DIR) else None
    defaults = DecodeOptions(
        beam=b.beam,
        packing=b.packing,  # type: ignore[arg-type]
        speculative=b.drafter_config is not None,
    )
    return Pipeline(rt, tokenizer, b.base_config.eos_token_ids, defaults)


def reference_runtime(
    bundle: Bundle,
    *,
    base: str | Path | None = None,
    drafter: str | Path | None = None,
    threads: int | None = None,
) -> Runtime:
    """The torch reference for a bundle, from the checkpoints recorded in its manifest (or
    the paths given), on `threads` torch threads (None: `runtimes.torch.default_threads`)."""

    def source(kind: str, given: str | Path | None) -> Path | None:
        if given is not None:
            return Path(given)
        record = bundle.manifest.base_source if kind == "base" else bundle.manifest.drafter_source
        if record is None:
            return None
        path = Path(record.path)
        if not path.exists():
            raise CheckpointError(
                f"the {kind} checkpoint this bundle was exported from ({path}) is gone; "
                f"pass --{kind} PATH to rebuild the torch reference"
            )
        return path

    base_path, drafter_path = source("base", base), source("drafter", drafter)
    assert base_path is not None
    return TorchRuntime(*load_pair(base_path, drafter_path), threads=threads or default_threads())


def open_pipeline(
    *,
    base: str | Path | None = None,
    drafter: str | Path | None = None,
    bundle: str | Path | None = None,
    runtime: str | None = None,
    device: str = "cpu",
    dtype: str | None = None,
    native: bool | None = None,
    autoregressive: bool = False,
    threads: int | None = None,
    allow_fallback: bool = False,
) -> Pipeline:
    """A pipeline from either checkpoints (`base`, optionally `drafter`, on the torch runtime)
    or an exported `bundle` (on `runtime`, default 'onnxruntime'), checking that the
    combination makes sense before anything is loaded: exactly one of `base` and `bundle`;
    `drafter` and `dtype` (default float32) only with `base`; 'onnxruntime' and `native` only
    with a bundle. Without a drafter (none given, or a bundle exported without one) the
    pipeline decodes autoregressively by default, as `from_checkpoints` and `load` do: its
    `defaults.speculative` is False. `threads` and `allow_fallback`: see `load`. Raises
    `ConfigError` (the CLI's `generate` prints it as one line, exit code 2)."""
    if (base is None) == (bundle is None):
        raise ConfigError("give exactly one of --base PATH (checkpoints) or --bundle DIR")
    if bundle is not None:
        if drafter is not None:
            raise ConfigError("--drafter goes with --base; a bundle carries its drafter")
        if dtype is not None:
            raise ConfigError(
                "--dtype goes with --base; a bundle runs in the dtype it was exported in "
                "(redrafter export --dtype)"
            )
        runtime = runtime or "onnxruntime"
        if native is not None and runtime != "onnxruntime":
            raise ConfigError("--native/--portable apply to --runtime onnxruntime")
        return load(
            bundle,
            runtime=runtime,
            device=device,
            native=native,
            threads=threads,
            allow_fallback=allow_fallback,
        )
    if runtime == "onnxruntime":
        raise ConfigError(
            "--runtime onnxruntime needs --bundle DIR (make one with `redrafter export`)"
        )
    if native is not None:
        raise ConfigError("--native/--portable apply to --runtime onnxruntime")
    if allow_fallback:
        raise ConfigError("--allow-cpu-fallback applies to --runtime onnxruntime (a --bundle)")
    assert base is not None
    return from_checkpoints(
        base,
        drafter=None if autoregressive else drafter,
        runtime=runtime or "torch",
        device=device,
        dtype=dtype or "float32",
        threads=threads,
    )


def sampling_params(
    *,
    temperature: float | None = None,
    seed: int | None = None,
    acceptance: str = "exact",
    top_k: int | None = None,
    top_p: float = 1.0,
    min_p: float = 0.0,
    repetition_penalty: float = 1.0,
    presence_penalty: float = 0.0,
    frequency_penalty: float = 0.0,
) -> SamplingParams:
    """`SamplingParams` from per-run choices, checked (a bad value is a one-line ConfigError):
    `temperature` None or 0 is greedy, `top_k` None is Apple's top-50 warp."""
    return SamplingParams(
        temperature=temperature or 0.0,
        seed=seed,
        acceptance=acceptance,  # type: ignore[arg-type]
        top_k=TOP_K if top_k is None else top_k,
        top_p=top_p,
        min_p=min_p,
        repetition_penalty=repetition_penalty,
        presence_penalty=presence_penalty,
        frequency_penalty=frequency_penalty,
    )


def decode_options(
    defaults: DecodeOptions,
    *,
    max_new_tokens: int = 64,
    beam_width: int | None = None,
    beam_length: int | None = None,
    temperature: float | None = None,
    seed: int | None = None,
    acceptance: str = "exact",
    packing: str | None = None,
    speculative: bool = True,
    prompt_lookup: bool = False,
    min_draft_prob: float = 0.0,
    lookup_span: int = SPAN_PER_NGRAM,
    lookup_min_ngram: int = MIN_NGRAM,
    lookup_max_ngram: int = MAX_NGRAM,
    top_k: int | None = None,
    top_p: float = 1.0,
    min_p: float = 0.0,
    stop_token_ids: Sequence[int] = (),
    ignore_eos: bool = False,
    repetition_penalty: float = 1.0,
    presence_penalty: float = 0.0,
    frequency_penalty: float = 0.0,
    logprobs: bool = False,
) -> DecodeOptions:
    """`DecodeOptions` from per-run choices, the beam shape and packing left as None taken from
    `defaults` (a pipeline's: e.g. a bundle's exported beam). `temperature` None or 0 is greedy;
    the sampling controls and penalties are `sampling_params`'; `stop_token_ids`, `ignore_eos`
    and `logprobs` are `DecodeOptions`'."""
    return DecodeOptions(
        max_new_tokens=max_new_tokens,
        beam=BeamShape(beam_width or defaults.beam.width, beam_length or defaults.beam.length),
        sampling=sampling_params(
            temperature=temperature,
            seed=seed,
            acceptance=acceptance,
            top_k=top_k,
            top_p=top_p,
            min_p=min_p,
            repetition_penalty=repetition_penalty,
            presence_penalty=presence_penalty,
            frequency_penalty=frequency_penalty,
        ),
        packing=packing or defaults.packing,  # type: ignore[arg-type]
        speculative=speculative,
        prompt_lookup=prompt_lookup,
        min_draft_prob=min_draft_prob,
        lookup_span=lookup_span,
        lookup_min_ngram=lookup_min_ngram,
        lookup_max_ngram=lookup_max_ngram,
        stop_token_ids=tuple(stop_token_ids),
        ignore_eos=ignore_eos,
        logprobs=logprobs,
    )


def implementation_of(runtime: Runtime) -> str:
    """How a runtime runs its graphs, for reports: e.g. 'native' or 'portable' TreeAttention on
    ONNX Runtime; 'eager' for runtimes that do not say."""
    return str(getattr(runtime, "implementation", "eager"))


def run_stats(
    pipe: Pipeline, steps: Sequence[Step], options: DecodeOptions, *, wall_seconds: float
) -> dict[str, Any]:
    """The statistics of one generation (`redrafter.decoding.stats.summarize`) plus
    `wall_seconds` (the whole run, as the caller timed it), `runtime` and `implementation`."""
    stats = summarize(steps, beam_length=options.beam_length)
    stats["wall_seconds"] = wall_seconds
    stats["runtime"] = pipe.runtime.name
    stats["implementation"] = implementation_of(pipe.runtime)
    return stats


def generation_record(
    pipe: Pipeline, token_ids: Sequence[int], stats: dict[str, Any], *, text: str | None = None
) -> dict[str, Any]:
    """The JSON object `redrafter generate --json` prints for one prompt: `token_ids`, `text`
    (given, e.g. cut at a stop string, or decoded from the ids; None without a tokenizer) and
    `stats` (see `run_stats`)."""
    ids = [int(t) for t in token_ids]
    if text is None and pipe.tokenizer is not None:
        text = pipe.tokenizer.decode(ids, skip_special_tokens=True)
    return {"token_ids": ids, "text": text, "stats": stats}


def stats_text(stats: dict[str, Any], options: DecodeOptions) -> str:
    """`run_stats` as the lines `redrafter generate --stats` prints: tokens/step, tokens/s,
    time by phase and, for speculative runs, the acceptance histogram."""
    mode = (
        f"speculative W={options.beam.width} L={options.beam.length}"
        if options.speculative
        else "autoregressive"
    )
    lines = [
        f"[{stats['runtime']} {stats['implementation']}, {mode}] "
        f"{stats['generated_tokens']} tokens in {stats['steps']} steps: "
        f"{stats['tokens_per_step']:.2f} tokens/step, {stats['tokens_per_second']:.1f} tokens/s "
        f"(prefill {1000 * stats['prefill_seconds']:.0f} ms)",
        "time by phase: "
        + ", ".join(f"{k} {1000 * v:.0f} ms" for k, v in stats["seconds_by_phase"].items()),
    ]
    if stats["acceptance_histogram"]:
        lines.append("steps by accepted drafts (0, 1, ...): " + str(stats["acceptance_histogram"]))
    return "\n".join(lines)


def encode_prompts(
    pipe: Pipeline,
    texts: Sequence[str] | None,
    *,
    defaults: Sequence[str] = (),
    chat: bool = False,
    synthetic_vocab: int | None = None,
) -> list[list[int]]:
    """The token ids of the prompts `validate` and `bench` run: `texts` (e.g. a prompts file's,
    `redrafter.validate.prompts.read_prompts`) or, when None, `defaults`, each encoded (in the
    chat template with `chat`). Without a tokenizer text cannot be encoded: given
    `synthetic_vocab` and no `texts`, four fixed 8-token id prompts below it stand in for the
    defaults; otherwise a `TokenizerError`."""
    if pipe.tokenizer is None and synthetic_vocab is not None:
        if texts is not None:
            raise TokenizerError(
                "this bundle has no tokenizer, so text prompts cannot be used; pass token ids "
                "(--prompt-ids 1,2,3, or --prompt-ids @FILE with one comma list per line)"
            )
        return [[(7 * i + j) % synthetic_vocab for j in range(1, 9)] for i in range(4)]
    return [pipe.encode(t, chat=chat) for t in (defaults if texts is None else texts)]


def check_options(runtime: Runtime, options: DecodeOptions) -> None:
    """Refuse options the runtime cannot decode, before anything runs (so nothing is emitted
    first): a stop token id outside the model's vocab (it is never emitted, so it would never
    stop a row), speculative decoding on a runtime without a drafter, or a beam shape the
    runtime has no drafter graph for (`runtime.beams`, where the runtime lists them)."""
    vocab = int(runtime.vocab_size)
    outside = [t for t in options.stop_token_ids if t >= vocab]
    if outside:
        raise ConfigError(
            f"stop token id(s) {outside[:5]} are outside this model's vocab [0, {vocab}), so "
            "they would never stop decoding; pass ids the model can emit (--stop-id)"
        )
    if not options.speculative:
        return
    beams = getattr(runtime, "beams", None)
    if getattr(runtime, "drafter", True) is None or (beams is not None and not beams):
        raise ConfigError(
            "this model has no drafter, so it cannot decode speculatively; decode "
            "autoregressively (--autoregressive, DecodeOptions(speculative=False)) or export "
            "with --drafter"
        )
    if beams is not None and options.beam not in beams:
        ordered = sorted(beams, key=lambda b: (b.width, b.length))
        shapes = ", ".join(f"{b.width}x{b.length}" for b in ordered)
        raise ConfigError(
            f"beam {options.beam.width}x{options.beam.length} (width x length) has no drafter "
            f"graph in this bundle, which has {shapes}; pass one of those to --beam-width/"
            "--beam-length, or re-export with it"
        )


def check_stops(stop: Sequence[str]) -> tuple[str, ...]:
    """Stop strings, checked: a sequence of non-empty strings (a bare string is refused, since
    it would be read as its characters)."""
    if isinstance(stop, str) or not all(isinstance(s, str) and s for s in stop):
        raise ConfigError(f"stop {stop!r} must be a list of non-empty strings")
    return tuple(stop)


class StopScan:
    """One row's decoded text, checked for stop strings as tokens arrive.

    Text comes from a `StreamDecoder`, so the check sees exactly the text a full decode gives,
    and each push searches only the new text plus the few characters before it where a stop
    could have begun (a stop split across tokens or steps is still found)."""

    def __init__(self, tokenizer: Any, stops: tuple[str, ...]) -> None:
        self.tokenizer = tokenizer
        self.stops = stops
        self.decoder = StreamDecoder(tokenizer, skip_special_tokens=True)
        self.ids: list[int] = []
        self.text = ""
        self.stopped = False
        self._longest = max(len(s) for s in stops)

    def push(self, ids: Sequence[int]) -> None:
        """Add a step's tokens (ignored once stopped); cuts the text at a stop found."""
        if self.stopped or not ids:
            return
        self.ids.extend(int(t) for t in ids)
        self._scan(self.decoder.push(list(ids)))

    def finish(self) -> None:
        """Take in the text the decoder held back (an incomplete character at the end)."""
        if not self.stopped:
            self._scan(self.decoder.flush())

    def _scan(self, piece: str) -> None:
        start = max(0, len(self.text) - self._longest + 1)
        self.text += piece
        found = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
        if found:
            self.text, self.stopped = self.text[: min(found)], True

    def safe_length(self) -> int:
        """How much of the text is final: all of it once stopped, else all but the tail that
        could still grow into a stop."""
        return len(self.text) if self.stopped else max(0, len(self.text) - self._longest + 1)

    def kept_ids(self) -> list[int]:
        """The tokens whose text ends at or before the cut (all of them without a stop)."""
        if not self.stopped:
            return list(self.ids)
        k = len(self.ids)
        # Text grows with the prefix, so the longest prefix that fits is found walking back.
        while k > 0 and len(self._decode(self.ids[:k])) > len(self.text):
            k -= 1
        return self.ids[:k]

    def _decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))


def _stopped_pieces(steps: Iterator[Step], scan: StopScan) -> Iterator[str]:
    """Row 0's text per step up to its first stop string, then the stream is closed (decoding
    ends there); text that may begin a stop is held back until it is known not to."""
    sent = 0
    try:
        for step in steps:
            scan.push(step.new_tokens[0])
            end = scan.safe_length()
            if end > sent:
                yield scan.text[sent:end]
                sent = end
            if scan.stopped:
                return
        scan.finish()
        if len(scan.text) > sent:
            yield scan.text[sent:]
    finally:
        steps.close()  # type: ignore[attr-defined]  # ends the decode and frees the lock


def _text_pieces(steps: Iterator[Step], decoder: StreamDecoder) -> Iterator[str]:
    """Row 0's new text per step (empty pieces skipped), then what the decoder held back."""
    for step in steps:
        piece = decoder.push(step.new_tokens[0])
        if piece:
            yield piece
    tail = decoder.flush()
    if tail:
        yield tail
