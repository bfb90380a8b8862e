"""Spine benchmark on the real model (SmolLM2-135M-Instruct, Q4_1 GGUF dequantized to fp32),
torch runtime, greedy: the answer to the ChatML prompt "What is the capital of France?",
autoregressive tokens/s, and tokens/step with a random (untrained) drafter (expected ~1).

    make bench-spine        # or: .venv/bin/python -m benchmarks.spine
"""

from __future__ import annotations

import argparse
import statistics
import time

from benchmarks._common import machine, save
from redrafter.bench.tokens import token_digest
from redrafter.config import BeamShape
from redrafter.decoding import AUTOREGRESSIVE, DecodeOptions
from redrafter.demo import find_demo_gguf
from redrafter.models.checkpoints import init_drafter, load_base
from redrafter.models.tokenizer import load_tokenizer
from redrafter.pipeline import Pipeline
from redrafter.runtimes.torch import TorchRuntime

PROMPT = "What is the capital of France?"
REPEATS = 3


def main() -> None:
    """Load the demo model, answer the prompt, time autoregressive and random-drafter decoding."""
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args()
    info = machine()
    gguf = find_demo_gguf()
    t0 = time.perf_counter()
    base = load_base(gguf)
    load_seconds = time.perf_counter() - t0
    tokenizer = load_tokenizer(gguf)
    drafter = init_drafter(base.config, seed=0)
    pipe = Pipeline(TorchRuntime(base, drafter), tokenizer, base.config.eos_token_ids)

    answer = pipe.generate([PROMPT], AUTOREGRESSIVE.replace(max_new_tokens=32), chat=True)
    assert answer.texts is not None
    # Throughput on a longer, fixed-length generation (no early EOS), median of REPEATS.
    long = "Write a long story about a lighthouse keeper."
    ar = AUTOREGRESSIVE.replace(max_new_tokens=128)
    ar_runs = [pipe.generate([long], ar, chat=True).stats for _ in range(REPEATS)]
    beam = BeamShape(4, 4)
    spec = pipe.generate([long], DecodeOptions(max_new_tokens=128, beam=beam), chat=True)
    result = {
        "machine": info,
        "model": gguf.name,
        "load_seconds": round(load_seconds, 2),
        "chat_prompt": PROMPT,
        "answer": answer.texts[0],
        "answer_tokens": token_digest(answer.token_ids[0]),
        "ar_tokens_per_second_median": round(
            statistics.median(r["tokens_per_second"] for r in ar_runs), 2
        ),
        "ar_tokens_per_second_runs": [round(r["tokens_per_second"], 2) for r in ar_runs],
        "random_drafter": {
            "beam_width": beam.width,
            "beam_length": beam.length,
            "tokens_per_step": round(spec.stats["tokens_per_step"], 3),
            "tokens_per_second": round(spec.stats["tokens_per_second"], 2),
            "seconds_by_phase": spec.stats["seconds_by_phase"],
        },
    }
    print(f"answer: {answer.texts[0]!r}")
    runs = result["ar_tokens_per_second_runs"]
    print(
        f"autoregressive (torch, fp32, 128 tokens): "
        f"{result['ar_tokens_per_second_median']} tok/s (runs {runs})"
    )
    print(
        f"random drafter W=4 L=4: {result['random_drafter']['tokens_per_step']} tokens/step, "
        f"{result['random_drafter']['tokens_per_second']} tok/s"
    )
    save("spine", result)


if __name__ == "__main__":
    main()
