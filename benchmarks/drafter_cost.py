"""Drafter sizing: one step's drafting (the whole beam search) against one verification step
and one autoregressive step, on ONNX Runtime (CPU, from exported graphs) and on the torch
runtime, for several head sizes and beam shapes.

    .venv/bin/python -m benchmarks.drafter_cost [--beams 1x4,1x5,2x4,4x5] [--threads 2]
        [--bundle AR_BUNDLE] [--runtimes onnxruntime,torch]
    .venv/bin/python -m benchmarks.drafter_cost --in-loop BUNDLE   # a trained drafter's bundle

Goal (issue 7): drafting <= 25 % of one verification step. The verification runs the W x L
tree without dedup (N = W*L, the worst case) over a 200-token cache. `break_even` is the
tokens/step at which speculative decoding merely matches autoregressive decoding on that
runtime: (draft + verify(N)) / verify(1). Weights are random (cost does not depend on them).
Timings: median of repeated runs, CPU load before the run recorded (others skew them).

A drafter timed alone keeps its weights in the L3 cache between runs (a 2.8M-parameter head
then drafts in ~1.5 ms), which the decode loop does not: each verification streams the base's
540 MB through. `--in-loop` therefore also times the phases inside the real driver, on a bundle
with a trained drafter (its beam shapes), over the demo's prompts.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks._common import machine, save
from redrafter.bench.shapes import parse_beams
from redrafter.config import DrafterConfig
from redrafter.decoding import AUTOREGRESSIVE, DecodeOptions
from redrafter.decoding.tree import pack
from redrafter.demo import find_demo_gguf
from redrafter.models.checkpoints import load_base
from redrafter.models.drafter import Drafter
from redrafter.runtimes.torch import TorchRuntime

# (name, exit_dim or None = 2E, draft vocab or None = full V)
CONFIGS = [
    ("Apple default: 2E -> V", None, None),
    ("exit E, full V", 576, None),
    ("exit E, Vd 16384", 576, 16384),
    ("exit E, Vd 8192", 576, 8192),
    ("exit E, Vd 4096", 576, 4096),
    ("exit E, Vd 2048", 576, 2048),
]


def _median_ms(fn: Callable[[], Any], repeats: int) -> float:
    """Median milliseconds of `fn` over `repeats` calls after a warm-up call."""
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def in_loop(bundle_path: str, threads: int) -> None:
    """Per-step milliseconds by phase in the real decode loop (ORT, batch 1, greedy)."""
    from redrafter.bundle import load_bundle
    from redrafter.demo import DEMO_PROMPTS
    from redrafter.models.tokenizer import load_tokenizer
    from redrafter.pipeline import Pipeline
    from redrafter.runtimes.onnxruntime import OnnxRuntime

    info = machine()
    bundle = load_bundle(bundle_path)
    runtime = OnnxRuntime(bundle, threads=threads)
    pipe = Pipeline(
        runtime, load_tokenizer(bundle.root / "tokenizer"), bundle.base_config.eos_token_ids
    )
    prompts = [*DEMO_PROMPTS, "Explain what a linked list is.", "Why do cats purr?"]
    rows = []
    for beam in [None, *bundle.drafter_graphs]:
        seconds: dict[str, float] = {}
        steps = 0
        tokens = decode = 0.0
        for p in prompts:
            options = (
                AUTOREGRESSIVE.replace(max_new_tokens=64)
                if beam is None
                else DecodeOptions(max_new_tokens=64, beam=beam)
            )
            s = pipe.generate([p], options, chat=True).stats
            steps += s["steps"]
            tokens += s["tokens_per_second"] * s["decode_seconds"]
            decode += s["decode_seconds"]
            for k, v in s["seconds_by_phase"].items():
                if k != "prefill":
                    seconds[k] = seconds.get(k, 0.0) + v
        row = {
            "decoding": "autoregressive" if beam is None else f"W{beam.width} L{beam.length}",
            "tokens_per_step": round(tokens / steps, 3),
            "tokens_per_second": round(tokens / decode, 2),
            "ms_per_step": {k: round(1000 * v / steps, 2) for k, v in seconds.items()},
        }
        rows.append(row)
        print(row, flush=True)
    save("drafter_cost_in_loop", {"machine": info, "bundle": str(bundle_path), "rows": rows})


def main() -> None:
    """Drafting vs verification per head size and beam shape (or, --in-loop, the phases)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--beams", default="1x4,1x5,2x4,4x5")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--runtimes", default="onnxruntime,torch")
    ap.add_argument("--configs", default="", help="comma-separated indexes into CONFIGS")
    ap.add_argument("--bundle", help="an existing autoregressive bundle of the demo model")
    ap.add_argument("--in-loop", metavar="BUNDLE", help="time the phases of the decode loop")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.in_loop:
        in_loop(args.in_loop, args.threads)
        return
    info = machine()
    beams = parse_beams(args.beams)
    configs = [CONFIGS[int(i)] for i in args.configs.split(",")] if args.configs else CONFIGS
    base = load_base(find_demo_gguf())
    E, V = base.config.hidden_size, base.config.vocab_size
    rng = np.random.default_rng(0)
    prompt, lengths = rng.integers(0, V, size=(1, 200)), np.array([200])

    import onnx
    import onnxruntime as ort

    from redrafter.build import export_bundle
    from redrafter.export.onnx import export_drafter
    from redrafter.runtimes.onnxruntime import OnnxRuntime

    tmp = Path(tempfile.mkdtemp(prefix="drafter-cost-"))
    bundle_path = Path(args.bundle) if args.bundle else tmp / "ar-bundle"
    if "onnxruntime" in args.runtimes and not bundle_path.exists():
        export_bundle(find_demo_gguf(), bundle_path)

    def verify_ms(rt: Any, n: int) -> float:
        """One verification of n tree tokens (a chain when n = 1: the autoregressive step)."""
        tree = pack(rng.integers(0, V, size=(1, 1, n)) if n == 1 else _beams(n), packing="full")
        rt.reset(batch=1, capacity=256)
        rt.prefill(prompt, lengths)
        positions = lengths[:, None] + tree.depth
        return _median_ms(
            lambda: rt.verify(tree.tokens, positions, tree.tree_mask, lengths), args.repeats
        )

    def _beams(n: int) -> np.ndarray:
        b = next(b for b in beams if b.width * b.length == n)
        return rng.integers(0, V, size=(1, b.width, b.length))

    runtimes = {}
    if "onnxruntime" in args.runtimes:
        runtimes["onnxruntime"] = OnnxRuntime(bundle_path, threads=args.threads)
    if "torch" in args.runtimes:
        runtimes["torch"] = TorchRuntime(base)
    verify: dict[str, dict[int, float]] = {}
    for name, rt in runtimes.items():
        sizes = sorted({1, *(b.width * b.length for b in beams)})
        verify[name] = {n: round(verify_ms(rt, n), 2) for n in sizes}
        print(f"{name} verify ms by tree tokens N: {verify[name]}", flush=True)

    rows = []
    context = rng.standard_normal((1, E)).astype(np.float32)
    g0 = np.array([42])
    for name, exit_dim, vd in configs:
        config = DrafterConfig(
            vocab_size=V,
            hidden_size=E,
            exit_dim=exit_dim or 2 * E,
            num_draft_layers=1,
            draft_vocab_size=vd,
        )
        torch.manual_seed(0)
        drafter = Drafter(config).eval()
        if drafter.draft_token_ids is not None:
            drafter.draft_token_ids.copy_(torch.randperm(V)[:vd].sort().values)
        params = sum(p.numel() for p in drafter.parameters())
        for beam in beams:
            N = beam.width * beam.length
            row = {
                "config": name,
                "draft_vocab": vd or V,
                "params_millions": round(params / 1e6, 2),
                "megabytes_fp32": round(params * 4 / 1e6, 1),
                "beam": f"W{beam.width} L{beam.length}",
            }
            if "torch" in runtimes:
                t_rt = TorchRuntime(base, drafter)
                ms = _median_ms(lambda rt=t_rt, b=beam: rt.draft(context, g0, b), args.repeats)
                row["torch_draft_ms"] = round(ms, 2)
                row["torch_fraction_of_verify"] = round(ms / verify["torch"][N], 3)
                row["torch_break_even"] = round((ms + verify["torch"][N]) / verify["torch"][1], 2)
            if "onnxruntime" in runtimes:
                path = tmp / f"drafter-{len(rows)}.onnx"
                graph = export_drafter(drafter, base, beam)
                onnx.save_model(
                    graph, str(path), save_as_external_data=True, location=path.name + ".data"
                )
                options = ort.SessionOptions()
                options.intra_op_num_threads = args.threads
                session = ort.InferenceSession(
                    str(path), options, providers=["CPUExecutionProvider"]
                )
                feed = {"context": context, "first_token": g0}
                ms = _median_ms(lambda s=session, f=feed: s.run(None, f), args.repeats)
                ort_v = verify["onnxruntime"]
                row["ort_draft_ms"] = round(ms, 2)
                row["ort_fraction_of_verify"] = round(ms / ort_v[N], 3)
                row["ort_break_even"] = round((ms + ort_v[N]) / ort_v[1], 2)
            rows.append(row)
            print(row, flush=True)
    save(
        "drafter_cost",
        {"machine": info, "threads": args.threads, "verify_ms": verify, "rows": rows},
    )


if __name__ == "__main__":
    main()
