"""Which prompt-lookup span and draft-probability floor pay off: W1 L5 with the lookup beam at
several spans (drafts per matched n-gram token, `decoding/lookup.py`) and floors
(`decoding/prune.py`), against autoregressive decoding and the drafter alone, on ONNX Runtime
CPU (native kernel), interleaved rounds, paired speed-ups per round.

    .venv/bin/python benchmarks/lookup_ablation.py [--drafter DIR] [--spans 1,2,4]
        [--floors 0,0.25] [--repeats 4] [--max-new-tokens 128] [--wait-idle 3] [--name NAME]

The same 8 held-out prompts as benchmarks/peers.py (4 Jargon chat questions, 4 HumanEval
tasks, never trained on), stopping at EOS. On a 2-core CPU the verification is compute-bound,
so every tree token costs about 1 ms whether or not it is accepted: the span and the floor
trade tokens/step against tree size. The per-round speed-ups (`speedup_repeats`) show how much
of a difference is the machine's noise.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    demo_bundle,
    heldout_shared_prompts,
    idle_report,
    machine,
    save,
    wait_for_idle,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--drafter", help="drafter folder [the trained demo drafter]")
    parser.add_argument("--spans", default="1,2,4", help="lookup spans [1,2,4]")
    parser.add_argument("--floors", default="0,0.25", help="draft-probability floors [0,0.25]")
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--wait-idle", type=float, default=0, metavar="MIN")
    parser.add_argument("--name", default="lookup_ablation", help="results file name")
    args = parser.parse_args()

    from peers import find_trained_drafter

    from redrafter.bench.harness import Speculative, run_configs
    from redrafter.bench.report import markdown_table
    from redrafter.config import BeamShape
    from redrafter.demo import find_demo_gguf
    from redrafter.models.checkpoints import load_base_config
    from redrafter.models.tokenizer import load_tokenizer
    from redrafter.runtimes.onnxruntime import OnnxRuntime

    drafter = Path(args.drafter) if args.drafter else find_trained_drafter()
    if drafter is None:
        raise SystemExit("error: no trained drafter found; run `make demo` or pass --drafter DIR")
    beam = BeamShape(1, 5)
    bundle = demo_bundle(drafter, [beam])
    spans = [int(x) for x in args.spans.split(",")]
    floors = [float(x) for x in args.floors.split(",")]
    spec = [Speculative(beam)] + [
        Speculative(beam, True, floor, span) for span in spans for floor in floors
    ]
    gguf = find_demo_gguf()
    tokenizer = load_tokenizer(gguf)
    texts = heldout_shared_prompts(4, 4)
    prompts = [tokenizer.encode(tokenizer.chat_prompt(t) if chat else t) for t, chat in texts]
    eos = sorted(set(load_base_config(gguf).eos_token_ids) | set(tokenizer.eos_token_ids))
    runtime = OnnxRuntime(bundle, threads=args.threads)
    if args.wait_idle:
        wait_for_idle(args.wait_idle)
    idle = idle_report(3.0)
    print(f"machine: other processes {idle['other_processes_cores']} cores before the run")
    results = run_configs(
        runtime,
        prompts,
        spec,
        max_new_tokens=args.max_new_tokens,
        repeats=args.repeats,
        eos_token_ids=eos,
        on_run=lambda name: print(f"  {name}", flush=True),
    )
    after = idle_report(2.0)
    print(markdown_table(results))
    print("\n| config | speed-up per round |\n|---|---|")
    for name, r in results.items():
        print(f"| {name} | {', '.join(f'{x:.2f}x' for x in r['speedup_repeats'])} |")
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
