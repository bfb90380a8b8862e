"""The library entry point: a runtime plus a tokenizer, with `generate` and a streaming iterator.

import redrafter
pipe = redrafter.from_checkpoints("path/to/base", drafter="path/to/drafter")
out = pipe.generate(["What is the capital of France?"], chat=True)
print(out.texts[0], out.stats["tokens_per_step"])
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from redrafter.decoding.driver import decode
from redrafter.decoding.options import DecodeOptions
from redrafter.decoding.output import Step
from redrafter.decoding.runtime import Runtime
from redrafter.decoding.stats import summarize
from redrafter.errors import TokenizerError


@dataclasses.dataclass
class Generation:
    """token_ids: generated ids per prompt (prompt excluded); texts: their decoded text (None
    without a tokenizer); stats: see `redrafter.decoding.stats.summarize`."""

    token_ids: list[list[int]]
    texts: list[str] | None
    stats: dict[str, Any]


Prompt = str | Sequence[int]


class Pipeline:
    """A runtime, a tokenizer (optional: id prompts work without one) and the stop tokens."""

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

    def encode(self, prompt: Prompt, *, chat: bool = False) -> list[int]:
        """Text (optionally wrapped in the chat template) or ids -> ids."""
        if not isinstance(prompt, str):
            return [int(t) for t in prompt]
        if self.tokenizer is None:
            raise TokenizerError("this model has no tokenizer; pass token ids (--prompt-ids)")
        text = self.tokenizer.chat_prompt(prompt) if chat else prompt
        return self.tokenizer.encode(text)

    def stream(
        self,
        prompts: Sequence[Prompt],
        options: DecodeOptions | None = None,
        *,
        chat: bool = False,
    ) -> Iterator[Step]:
        """Yield one `Step` per runtime round trip; `step.new_tokens[b]` is what row b emitted."""
        options = options or self.defaults
        ids = [self.encode(p, chat=chat) for p in prompts]
        return decode(self.runtime, ids, options, eos_token_ids=self.eos_token_ids)

    def generate(
        self,
        prompts: Sequence[Prompt],
        options: DecodeOptions | None = None,
        *,
        chat: bool = False,
    ) -> Generation:
        """Run to completion; returns ids, texts and stats."""
        options = options or self.defaults
        steps = list(self.stream(prompts, options, chat=chat))
        token_ids = [sum((s.new_tokens[b] for s in steps), []) for b in range(len(prompts))]
        texts = (
            None
            if self.tokenizer is None
            else [self.tokenizer.decode(t, skip_special_tokens=True) for t in token_ids]
        )
        stats = summarize(steps, beam_length=options.beam_length)
        return Generation(token_ids, texts, stats)


def from_checkpoints(
    base: str | Path,
    *,
    drafter: str | Path | None = None,
    runtime: str = "torch",
    device: str = "cpu",
    dtype: str = "float32",
) -> Pipeline:
    """Load a base checkpoint (HF folder, .gguf or llama2.c .bin) and optionally a drafter
    (Apple's layout) into a pipeline on the eager torch runtime (`dtype`: float32, float16 or
    bfloat16 weights and cache)."""
    from redrafter.errors import RuntimeUnavailableError
    from redrafter.models.checkpoints import check_drafter_fits, load_base, load_drafter
    from redrafter.models.tokenizer import load_tokenizer

    if runtime != "torch":
        raise RuntimeUnavailableError(
            f"runtime {runtime!r} needs an exported bundle; checkpoints run on 'torch'"
        )
    from redrafter.runtimes.torch import TorchRuntime

    model = load_base(base)
    draft = None
    if drafter is not None:
        draft = load_drafter(drafter)
        check_drafter_fits(model.config, draft.config)
    try:
        tokenizer = load_tokenizer(base)
    except TokenizerError:
        tokenizer = None  # id prompts still work; text prompts raise a clear error
    return Pipeline(
        TorchRuntime(model, draft, device=device, dtype=dtype),
        tokenizer,
        model.config.eos_token_ids,
    )


def load(
    bundle: str | Path,
    *,
    runtime: str = "onnxruntime",
    device: str = "cpu",
    native: bool | None = None,
) -> Pipeline:
    """Load an exported bundle onto a runtime. `runtime`: 'onnxruntime' (the bundle's graphs;
    `device` 'cpu' or 'cuda'; `native` None = use the native TreeAttention library when built)
    or 'torch' (the PyTorch reference rebuilt from the checkpoints the bundle was exported from),
    'coreml' (the Core ML programs on Apple's runtime, macOS 15+) or 'coreml-mil' (the converted
    Core ML programs evaluated op by op in numpy: checks the conversion, not Apple's runtime).
    Defaults for `generate` come from the bundle (its beam shape and packing)."""
    from redrafter.errors import RuntimeUnavailableError
    from redrafter.export.bundle import load_bundle
    from redrafter.models.tokenizer import load_tokenizer

    b = load_bundle(bundle)
    if runtime == "onnxruntime":
        from redrafter.runtimes.onnxruntime import OnnxRuntime

        rt: Runtime = OnnxRuntime(b, device=device, native=native)
    elif runtime == "torch":
        rt = reference_runtime(b)
    elif runtime == "coreml":
        from redrafter.runtimes.coreml import CoreMLRuntime

        rt = CoreMLRuntime(b)
    elif runtime == "coreml-mil":
        from redrafter.runtimes.coreml_mil import CoreMLMilRuntime

        rt = CoreMLMilRuntime(b)
    else:
        raise RuntimeUnavailableError(
            f"unknown runtime {runtime!r}; choose onnxruntime, torch, coreml or coreml-mil"
        )
    tokenizer = load_tokenizer(b.root / "tokenizer") if (b.root / "tokenizer").is_dir() else None
    defaults = DecodeOptions(
        beam=b.beam,
        packing=b.packing,  # type: ignore[arg-type]
        speculative=b.drafter_config is not None,
    )
    return Pipeline(rt, tokenizer, b.base_config.eos_token_ids, defaults)


def reference_runtime(
    bundle: Any, *, base: str | Path | None = None, drafter: str | Path | None = None
) -> Runtime:
    """The torch reference for a bundle, from the checkpoints recorded in its manifest (or
    the paths given)."""
    from redrafter.errors import CheckpointError
    from redrafter.models.checkpoints import load_base, load_drafter
    from redrafter.runtimes.torch import TorchRuntime

    def source(kind: str, given: str | Path | None) -> Path | None:
        if given is not None:
            return Path(given)
        record = bundle.manifest.get(kind)
        if record is None:
            return None
        path = Path(record["source"]["path"])
        if not path.exists():
            raise CheckpointError(
                f"the {kind} checkpoint this bundle was exported from ({path}) is gone; "
                f"pass --{kind} PATH to rebuild the torch reference"
            )
        return path

    base_path, drafter_path = source("base", base), source("drafter", drafter)
    assert base_path is not None
    return TorchRuntime(
        load_base(base_path), load_drafter(drafter_path) if drafter_path is not None else None
    )
