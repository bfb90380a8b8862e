"""Is greedy speculation token-identical to greedy autoregressive decoding on an int4 bundle?
(issue 22). Decodes held-out demo prompts autoregressively and with each speculative shape on
the same runtime, and reports per shape how many prompts came out identical and where the
first differing token is. With the native library the runtime runs `redrafter::MatMulInt4`
(`--ort-kernel`: ONNX Runtime's MatMulNBits instead).

    python -m benchmarks.int4_lossless --bundle DIR [--jargon 4 --code 4 --max-new-tokens 128]
"""

from __future__ import annotations

import argparse
from typing import Any

from benchmarks._common import machine, save


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", required=True)
    parser.add_argument("--jargon", type=int, default=4)
    parser.add_argument("--code", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--ort-kernel", action="store_true")
    parser.add_argument("--name", default="int4_lossless")
    args = parser.parse_args()

    from redrafter.bench.tokens import token_digest
    from redrafter.config import BeamShape
    from redrafter.decoding import DecodeOptions
    from redrafter.demo.data import heldout_shared_prompts
    from redrafter.pipeline import load
    from redrafter.runtimes.onnxruntime import OnnxRuntime

    pipe = load(args.bundle, runtime="onnxruntime")
    if args.ort_kernel:  # the same bundle on ONNX Runtime's MatMulNBits
        pipe.runtime = OnnxRuntime(args.bundle, int4_kernel=False)
    runtime = pipe.runtime
    prompts = heldout_shared_prompts(args.jargon, args.code)
    ids = [pipe.encode(p.text, chat=p.chat) for p in prompts]
    n = args.max_new_tokens
    shapes = {
        "W1 L5": DecodeOptions(max_new_tokens=n, beam=BeamShape(1, 5)),
        "W1 L5 +lookup p>=0.25": DecodeOptions(
            max_new_tokens=n, beam=BeamShape(1, 5), prompt_lookup=True, min_draft_prob=0.25
        ),
    }
    reference = [
        pipe.generate([i], DecodeOptions(speculative=False, max_new_tokens=n)) for i in ids
    ]
    ref_ids = [r.token_ids[0] for r in reference]
    results: dict[str, Any] = {"int4_kernel": runtime.int4, "prompts": len(ids)}
    print(f"int4 kernel: {runtime.int4}; {len(ids)} held-out prompts x {n} greedy tokens")
    for name, options in shapes.items():
        out = [pipe.generate([i], options).token_ids[0] for i in ids]
        first = [
            next((k for k, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)
            for a, b in zip(ref_ids, out, strict=True)
        ]
        same = sum(a == b for a, b in zip(ref_ids, out, strict=True))
        results[name] = {
            "identical": same,
            "first_divergence": first,
            "token_digests": [token_digest(t) for t in out],
        }
        print(f"{name}: {same}/{len(ids)} identical to autoregressive; first divergence {first}")
    results["autoregressive_token_digests"] = [token_digest(t) for t in ref_ids]
    save(args.name, {"machine": machine(), **vars(args), "results": results})


if __name__ == "__main__":
    main()
