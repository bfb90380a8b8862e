"""Does fetching only what greedy decoding reads slow the CPU path? (issue 19, part 1).

Greedy decoding now asks the runtime for each node's argmax (`verify_greedy`: the base graph's
`next_tokens` output, the logits never bound) and each draft's own log-prob (`draft_tokens`:
the drafter graph's `draft_log_probs`), so that on a GPU the (B, N, V) logits and the
(B, W, L-1, V) draft distributions stay on the device. On the CPU the same graphs run either
way; this script checks that the narrow calls cost nothing there, by decoding the same held-out
demo prompts with

  - narrow: the runtime as the driver uses it now;
  - full:   the same runtime behind `FullOutputs`, which answers the narrow calls from the whole
            logits / distributions on the host (what every step did before),

interleaved prompt by prompt, autoregressive and speculative (W1 L5 + prompt lookup, p >= 0.25),
asserting identical tokens. Results in benchmarks/results/narrow_outputs.json.

    python -m benchmarks.narrow_outputs [--bundle DIR] [--jargon 4 --code 4 --max-new-tokens 128]
        [--threads 2] [--quantize none|int4] [--name narrow_outputs]

Without --bundle: the demo GGUF's bundle with the shipped drafter at W1 L5, `--quantize`
none (fp32) or int4.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks._common import demo_bundle, idle_report, machine, save


class FullOutputs:
    """A runtime whose narrow calls are answered from its full outputs on the host."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def verify_greedy(self, *args: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        from redrafter.decoding.runtime import argmax_tokens

        logits, hidden = self.inner.verify(*args)  # (B, N, V), (B, N, E)
        return argmax_tokens(logits), hidden

    def draft_tokens(self, context: np.ndarray, g0: np.ndarray, beam: Any) -> Any:
        from redrafter.decoding.runtime import drafted_log_probs

        beams, log_probs = self.inner.draft(context, g0, beam)  # (B, W, L), (B, W, L-1, V)
        return beams, drafted_log_probs(beams, log_probs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, default=None)
    parser.add_argument("--quantize", choices=["none", "int4"], default="none")
    parser.add_argument("--jargon", type=int, default=4)
    parser.add_argument("--code", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads")
    parser.add_argument("--name", default="narrow_outputs", help="results file name")
    args = parser.parse_args()

    from redrafter.config import BeamShape
    from redrafter.decoding import DecodeOptions, decode
    from redrafter.demo.data import heldout_shared_prompts
    from redrafter.demo.shipped import SHIPPED_DIR
    from redrafter.pipeline import load

    beam = BeamShape(1, 5)
    bundle = args.bundle
    if bundle is None:
        quantization = None
        if args.quantize != "none":
            from redrafter.export.quantize import quantization as make

            quantization = make(args.quantize)
        bundle = demo_bundle(SHIPPED_DIR, [beam], quantization=quantization)
    pipe = load(bundle, runtime="onnxruntime", threads=args.threads)
    runtime = pipe.runtime
    assert runtime._next_tokens, "re-export the bundle: its base graph predates next_tokens"
    prompts = heldout_shared_prompts(args.jargon, args.code)
    ids = [pipe.encode(p.text, chat=p.chat) for p in prompts]
    eos = pipe.eos_token_ids
    n = args.max_new_tokens
    shapes = {
        "autoregressive": DecodeOptions(speculative=False, max_new_tokens=n),
        "W1 L5 +lookup p>=0.25": DecodeOptions(
            max_new_tokens=n, beam=beam, prompt_lookup=True, min_draft_prob=0.25
        ),
    }
    variants = {"narrow": runtime, "full": FullOutputs(runtime)}
    load_before = idle_report()
    seconds: dict[str, dict[str, list[float]]] = {s: {v: [] for v in variants} for s in shapes}
    tokens: dict[str, int] = {}
    for shape, options in shapes.items():
        for rt in variants.values():  # warm-up
            for prompt in ids[:1]:
                list(decode(rt, [prompt], options, eos_token_ids=eos))
        for _ in range(args.repeats):
            outs: dict[str, list[list[int]]] = {v: [] for v in variants}
            totals = dict.fromkeys(variants, 0.0)
            for prompt in ids:
                for v, rt in variants.items():
                    t = time.perf_counter()
                    steps = list(decode(rt, [prompt], options, eos_token_ids=eos))
                    totals[v] += time.perf_counter() - t
                    outs[v].append([t for s in steps for t in s.new_tokens[0]])
            assert outs["narrow"] == outs["full"], f"{shape}: narrow and full outputs differ"
            tokens[shape] = sum(len(o) for o in outs["narrow"])
            for v in variants:
                seconds[shape][v].append(totals[v])
    results: dict[str, Any] = {
        "bundle": str(bundle),
        "precision": pipe.runtime.bundle.precision,
        "int4_kernel": runtime.int4,
        "prompts": len(ids),
        "max_new_tokens": n,
        "repeats": args.repeats,
        "threads": args.threads,
        "load_before": load_before,
        "load_after": idle_report(),
        "machine": machine(),
        "shapes": {},
    }
    print(f"{len(ids)} prompts x {n} greedy tokens, {args.repeats} interleaved repeats")
    for shape in shapes:
        row = {v: round(tokens[shape] / statistics.median(seconds[shape][v]), 1) for v in variants}
        row["narrow_over_full"] = round(row["narrow"] / row["full"], 3)
        results["shapes"][shape] = {**row, "tokens": tokens[shape], "seconds": seconds[shape]}
        print(
            f"{shape:24s} narrow {row['narrow']:6.1f} tok/s  full {row['full']:6.1f} tok/s  "
            f"ratio {row['narrow_over_full']:.3f}"
        )
    save(args.name, results)


if __name__ == "__main__":
    main()
