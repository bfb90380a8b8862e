"""One bundle decoded on two builds of the native op library, interleaved in one process: the
decode-level A/B for a kernel change (`bundle_ab --baseline-library` times one verify call;
this times whole greedy generations, drafter and host work included, and checks that both
builds emit the same tokens).

    .venv/bin/python -m benchmarks.library_ab --bundle DIR --library NEW.so --baseline-library
        OLD.so [--jargon 4 --code 4 --max-new-tokens 128] [--rounds 3] [--min-draft-prob 0.25]
        [--lookup-span 4] [--lookup-min-ngram 1] [--lookup-max-ngram 3]
        [--threads 2] [--name library_ab]

`custom_ops/build.sh OUT_DIR` makes the other build. Shapes: autoregressive and W1 L5 with the
prompt-lookup beam (the bundle needs a 1x5 drafter graph). Each round runs every shape on both
builds, the order of the builds alternating between rounds; tok/s is decode-phase throughput
over the held-out demo prompts (`redrafter.decoding.stats`), reported per round and as the
median, with ms per step by phase.
"""

from __future__ import annotations

import argparse
from statistics import median
from typing import Any

from benchmarks._common import idle_report, machine, native_library, save


def pipeline_on(bundle: str, library: str, threads: int) -> Any:
    """The bundle's pipeline with its ONNX Runtime built on the native library at `library`."""
    from redrafter.pipeline import load
    from redrafter.runtimes.onnxruntime import OnnxRuntime

    pipe = load(bundle, runtime="onnxruntime")
    with native_library(library):
        pipe.runtime = OnnxRuntime(bundle, threads=threads)
    return pipe


def main() -> None:
    """Decode the held-out prompts with each shape on both builds, round by round; save."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--library", required=True, help="the new build's libredrafter_ops.so")
    ap.add_argument("--baseline-library", required=True, help="the other build's")
    ap.add_argument("--jargon", type=int, default=4)
    ap.add_argument("--code", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--min-draft-prob", type=float, default=0.25)
    ap.add_argument("--lookup-span", type=int, default=4)
    ap.add_argument("--lookup-min-ngram", type=int, default=1)
    ap.add_argument("--lookup-max-ngram", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--name", default="library_ab")
    args = ap.parse_args()

    from redrafter.config import BeamShape
    from redrafter.decoding import DecodeOptions
    from redrafter.demo.data import heldout_shared_prompts

    before = idle_report()
    pipes = {
        "library": pipeline_on(args.bundle, args.library, args.threads),
        "baseline": pipeline_on(args.bundle, args.baseline_library, args.threads),
    }
    ids = [
        pipes["library"].encode(p.text, chat=p.chat)
        for p in heldout_shared_prompts(args.jargon, args.code)
    ]
    n = args.max_new_tokens
    spec = DecodeOptions(
        max_new_tokens=n,
        beam=BeamShape(1, 5),
        prompt_lookup=True,
        min_draft_prob=args.min_draft_prob,
        lookup_span=args.lookup_span,
        lookup_min_ngram=args.lookup_min_ngram,
        lookup_max_ngram=args.lookup_max_ngram,
    )
    shapes = {"autoregressive": DecodeOptions(max_new_tokens=n, speculative=False), spec.name: spec}
    for pipe in pipes.values():  # warm-up: sessions, packed weights, drafter graph
        for options in shapes.values():
            pipe.generate([ids[0]], options)
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {s: {k: [] for k in pipes} for s in shapes}
    tokens: dict[str, dict[str, list[list[int]]]] = {s: {} for s in shapes}
    for r in range(args.rounds):
        order = list(pipes) if r % 2 == 0 else list(pipes)[::-1]
        for shape, options in shapes.items():
            for side in order:
                emitted = steps = 0
                decode_s = 0.0
                phases: dict[str, float] = {}
                out = []
                for prompt in ids:
                    generation = pipes[side].generate([prompt], options)
                    stats = generation.stats
                    out.append(list(generation.token_ids[0]))
                    emitted += round(stats["tokens_per_step"] * stats["steps"])
                    steps += stats["steps"]
                    decode_s += stats["decode_seconds"]
                    for phase, seconds in stats["seconds_by_phase"].items():
                        phases[phase] = phases.get(phase, 0.0) + seconds
                tokens[shape][side] = out
                row = {
                    "tokens_per_second": emitted / decode_s,
                    "tokens_per_step": emitted / steps,
                    "ms_per_step_by_phase": {
                        p: 1000 * s / steps for p, s in phases.items() if p != "prefill"
                    },
                }
                runs[shape][side].append(row)
                print(f"round {r + 1} {shape:28s} {side:8s} {row['tokens_per_second']:7.1f} tok/s")
    summary = {}
    for shape in shapes:
        tps = {k: [x["tokens_per_second"] for x in runs[shape][k]] for k in pipes}
        ratios = [a / b for a, b in zip(tps["library"], tps["baseline"], strict=True)]
        summary[shape] = {
            "tokens_per_second_median": {k: median(v) for k, v in tps.items()},
            "ratio_per_round": ratios,
            "tokens_identical": tokens[shape]["library"] == tokens[shape]["baseline"],
            "tokens_per_step": runs[shape]["library"][0]["tokens_per_step"],
        }
        s = summary[shape]
        print(
            f"{shape}: library {s['tokens_per_second_median']['library']:.1f} vs baseline "
            f"{s['tokens_per_second_median']['baseline']:.1f} tok/s (rounds "
            f"{', '.join(f'{x:.2f}' for x in s['ratio_per_round'])}); tokens identical: "
            f"{s['tokens_identical']}"
        )
    save(
        args.name,
        {
            "machine": machine(),
            **vars(args),
            "idle_before": before,
            "idle_after": idle_report(),
            "runs": runs,
            "summary": summary,
        },
    )


if __name__ == "__main__":
    main()
