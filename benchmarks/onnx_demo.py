"""The demo model through the ONNX path (issue 4): export SmolLM2-135M (fp32 and fp16) with a
drafter, validate tensor and token parity on real prompts from the demo's data
(`redrafter.demo.shared_prompts`), and measure ms per verify call (N = 1..20 tokens, context
128/512/2048) for the portable body and the native kernel.

    .venv/bin/python -m benchmarks.onnx_demo [--drafter DIR] [--skip-fp16]
    .venv/bin/python -m benchmarks.onnx_demo --steps-only BUNDLE   # only the ms per verify call
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks._common import machine, save
from redrafter.build import ExportOptions, export_bundle
from redrafter.bundle import load_bundle
from redrafter.config import BeamShape
from redrafter.demo import find_demo_gguf, shared_prompts
from redrafter.models.checkpoints import init_drafter, load_base, save_drafter
from redrafter.ops import library_path as native_library
from redrafter.pipeline import load, reference_runtime
from redrafter.runtimes.onnxruntime import OnnxRuntime
from redrafter.validate.report import validate_bundle

STEP_SIZES = (1, 2, 3, 4, 5, 8, 12, 16, 20)  # tokens per verify call


def ms_per_step(
    runtime: OnnxRuntime, context: int, sizes: tuple[int, ...] = STEP_SIZES, repeats: int = 7
) -> dict:
    """Median ms of one verify call of N tokens (N=1: an autoregressive step; N>1: a chain of
    N tokens, the cost of any tree of N packed tokens) on a committed cache of `context`."""
    rng = np.random.default_rng(0)
    runtime.reset(batch=1, capacity=context + max(sizes) + 8)
    # Fill the cache by prefilling a random prompt of `context` tokens.
    runtime.prefill(rng.integers(0, runtime.vocab_size, (1, context)), np.array([context]))
    past = np.array([context])
    out = {}
    for n in sizes:
        tokens = rng.integers(0, runtime.vocab_size, (1, n))
        depth = np.arange(n)[None]  # (1, N)
        mask = np.tril(np.ones((n, n), bool))[None]  # (1, N, N)
        times = []
        for _ in range(repeats + 1):
            t = time.perf_counter()
            runtime.verify(tokens, past[:, None] + depth, mask, past)
            times.append(time.perf_counter() - t)
        out[f"n{n}"] = round(1000 * statistics.median(times[1:]), 2)
    return out


def main() -> None:
    """Export fp32 (and fp16), validate, time verify steps; or only time steps of a bundle."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--drafter", help="drafter folder (default: a random one)")
    parser.add_argument("--skip-fp16", action="store_true")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--out", default=None, help="where to keep bundles (default: temp)")
    parser.add_argument(
        "--steps-only",
        metavar="BUNDLE",
        help="only measure ms/step (portable vs native) on an existing bundle",
    )
    args = parser.parse_args()
    info = machine()
    if args.steps_only:
        bundle = load_bundle(args.steps_only)
        steps = {"machine": info, "bundle": args.steps_only, "portable_cache_copy_mb_per_call": {}}
        for impl in ["portable"] + (["native"] if native_library() else []):
            rt = OnnxRuntime(bundle, native=impl == "native")
            steps[impl] = {str(ctx): ms_per_step(rt, ctx) for ctx in (128, 512, 2048)}
            print(f"{impl}: ms/step {steps[impl]}")
        c = bundle.base_config
        for ctx in (128, 512, 2048):  # the ping-pong copy of every layer's K and V per call
            capacity = ctx + max(STEP_SIZES) + 8
            nbytes = 2 * c.num_hidden_layers * c.kv_heads * capacity * c.dim_per_head * 4
            steps["portable_cache_copy_mb_per_call"][str(ctx)] = round(nbytes / 1e6, 1)
        save("onnx_step_cost", steps)
        return
    gguf = find_demo_gguf()
    work = Path(args.out or tempfile.mkdtemp(prefix="redrafter-onnx-demo-"))
    drafter_dir = Path(args.drafter) if args.drafter else work / "random-drafter"
    if not args.drafter:
        save_drafter(init_drafter(load_base(gguf).config, seed=0, exit_dim=256), drafter_dir)
    prompts_text = shared_prompts(12, 10)
    result: dict = {
        "machine": info,
        "model": gguf.name,
        "drafter": str(drafter_dir),
        "prompts": len(prompts_text),
        "max_new_tokens": args.max_new_tokens,
    }
    beam = BeamShape(4, 4)
    for dtype in ["float32"] + ([] if args.skip_fp16 else ["float16"]):
        out = work / f"bundle-{dtype}"
        t = time.perf_counter()
        bundle = export_bundle(
            gguf,
            out,
            drafter_path=drafter_dir,
            overwrite=True,
            options=ExportOptions(dtype=dtype, beam=beam),
            progress=print,
        )
        export_seconds = time.perf_counter() - t
        size = bundle.manifest.total_bytes
        pipe = load(out)
        prompts = [pipe.encode(p.text, chat=p.chat) for p in prompts_text]
        reference = reference_runtime(bundle)
        t = time.perf_counter()
        report = validate_bundle(
            bundle,
            candidate=pipe.runtime,
            reference=reference,
            prompts=prompts,
            max_new_tokens=args.max_new_tokens,
            eos_token_ids=pipe.eos_token_ids,
        )
        print(report.table())
        entry = {
            "export_seconds": round(export_seconds, 1),
            "bundle_mb": round(size / 1e6, 1),
            "validate_seconds": round(time.perf_counter() - t, 1),
            "implementation": report.implementation,
            "passed": report.passed,
            "report": report.to_dict(),
        }
        if dtype == "float32":
            steps = {}
            for impl in ["portable"] + (["native"] if native_library() else []):
                rt = OnnxRuntime(bundle, native=impl == "native")
                steps[impl] = {str(ctx): ms_per_step(rt, ctx) for ctx in (128, 2048)}
                print(f"{impl}: ms/step {steps[impl]}")
            entry["ms_per_step"] = steps
        result[dtype] = entry
    save("onnx_demo", result)


if __name__ == "__main__":
    main()
