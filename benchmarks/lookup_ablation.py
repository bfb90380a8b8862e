"""Which prompt-lookup span, shortest match and draft-probability floor pay off: W1 L5 with the
lookup beam at several spans (drafts per matched n-gram token, `decoding/lookup.py`), shortest
matches (`--min-ngrams`) and floors (`decoding/prune.py`), against autoregressive decoding and
the drafter alone, on ONNX Runtime CPU (native kernel), interleaved rounds, paired speed-ups
per round.

    .venv/bin/python -m benchmarks.lookup_ablation [--drafter DIR | --bundle DIR]
        [--spans 1,2,4] [--min-ngrams 1] [--floors 0,0.25] [--repeats 4]
        [--max-new-tokens 128] [--wait-idle 3] [--name NAME]

`--bundle` decodes an exported bundle with a 1x5 drafter graph (e.g. the int4 peers bundle,
whose verification prices tree tokens differently from fp32's) instead of exporting the
demo bundle for `--drafter`.

The same 8 held-out prompts as benchmarks.peers (4 Jargon chat questions, 4 HumanEval
tasks, never trained on), stopping at EOS. On a 2-core CPU the verification is compute-bound,
so every tree token costs about 1 ms whether or not it is accepted: the span and the floor
trade tokens/step against tree size. The per-round speed-ups (`speedup_repeats`) show how much
of a difference is the machine's noise.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from benchmarks._common import (
    demo_bundle,
    idle_report,
    machine,
    prompt_ids,
    save,
    wait_for_idle,
)


def main() -> None:
    """W1 L5 alone and with the lookup beam at each span x floor, interleaved rounds."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--drafter", help="drafter folder [the trained demo drafter]")
    parser.add_argument("--bundle", help="an exported bundle with a 1x5 drafter graph")
    parser.add_argument("--spans", default="1,2,4", help="lookup spans [1,2,4]")
    parser.add_argument("--min-ngrams", default="1", help="lookup shortest matches [1]")
    parser.add_argument("--floors", default="0,0.25", help="draft-probability floors [0,0.25]")
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--wait-idle", type=float, default=0, metavar="MIN")
    parser.add_argument("--name", default="lookup_ablation", help="results file name")
    args = parser.parse_args()

    from redrafter.bench.harness import run_configs
    from redrafter.bench.report import markdown_table
    from redrafter.bench.rounds import speedup_rounds_table
    from redrafter.config import BeamShape
    from redrafter.decoding import DecodeOptions
    from redrafter.demo import find_demo_gguf, find_trained_drafter, heldout_shared_prompts
    from redrafter.runtimes.onnxruntime import OnnxRuntime

    beam = BeamShape(1, 5)
    if args.bundle:
        bundle = Path(args.bundle)
    else:
        drafter = Path(args.drafter) if args.drafter else find_trained_drafter()
        if drafter is None:
            raise SystemExit(
                "error: no trained drafter found; run `make demo` or pass --drafter DIR"
            )
        bundle = demo_bundle(drafter, [beam])
    spans = [int(x) for x in args.spans.split(",")]
    min_ngrams = [int(x) for x in args.min_ngrams.split(",")]
    floors = [float(x) for x in args.floors.split(",")]
    drafter_only = DecodeOptions(max_new_tokens=args.max_new_tokens, beam=beam)
    spec = [drafter_only] + [
        drafter_only.replace(
            prompt_lookup=True, min_draft_prob=floor, lookup_span=span, lookup_min_ngram=shortest
        )
        for span in spans
        for shortest in min_ngrams
        for floor in floors
    ]
    prompts, eos = prompt_ids(find_demo_gguf(), heldout_shared_prompts(4, 4))
    runtime = OnnxRuntime(bundle, threads=args.threads)
    if args.wait_idle:
        wait_for_idle(args.wait_idle)
    idle = idle_report(3.0)
    print(f"machine: other processes {idle['other_processes_cores']} cores before the run")
    results = run_configs(
        runtime,
        prompts,
        spec,
        repeats=args.repeats,
        eos_token_ids=eos,
        on_run=lambda name: print(f"  {name}", flush=True),
    )
    after = idle_report(2.0)
    print(markdown_table(results))
    print("\n" + speedup_rounds_table(results))
    save(
        args.name,
        {
            "machine": {**machine(), "idle_before": idle, "idle_after": after},
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "bundle": str(bundle),
            "runtime": f"onnxruntime {runtime.implementation}",
            "prompts": len(prompts),
            "max_new_tokens": args.max_new_tokens,
            "repeats": args.repeats,
            "results": results,
        },
    )


if __name__ == "__main__":
    main()
