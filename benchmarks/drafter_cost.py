"""Drafter sizing: one step's drafting (the whole beam search) against one verification step,
on the torch runtime and on ONNX Runtime (CPU) from exported graphs, for several head sizes.

    .venv/bin/python benchmarks/drafter_cost.py [--width 4 --length 5] [--threads 2]

The goal (issue 7): drafting ≤ 25 % of one verification step. Verification runs on a realistic
cache (a 200-token prompt) with the packed tree of the W×L beam (no dedup: the worst case).
Weights are random (cost does not depend on them). Timings: median of repeated runs; the CPU
load seen before the run is recorded because other processes skew them.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from redrafter.config import BeamShape, DrafterConfig  # noqa: E402
from redrafter.decoding.tree import pack  # noqa: E402
from redrafter.demo import find_demo_gguf  # noqa: E402
from redrafter.models.checkpoints import load_base  # noqa: E402
from redrafter.models.drafter import Drafter  # noqa: E402
from redrafter.runtimes.torch import TorchRuntime  # noqa: E402

from _common import machine, save  # noqa: E402

# (name, exit_dim or None = 2E, draft vocab or None = full V)
CONFIGS = [
    ("Apple default: 2E -> V", None, None),
    ("exit E, full V", 576, None),
    ("exit E, Vd 16384", 576, 16384),
    ("exit E, Vd 8192", 576, 8192),
    ("exit E, Vd 4096", 576, 4096),
]


def _median_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--width", type=int, default=4)
    ap.add_argument("--length", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--bundle", help="an existing autoregressive bundle of the demo model")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    info = machine()
    beam = BeamShape(args.width, args.length)
    base = load_base(find_demo_gguf())
    E, V = base.config.hidden_size, base.config.vocab_size

    # The verification step both runtimes are compared with.
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, V, size=(1, 200))
    lengths = np.array([200])
    beams = rng.integers(0, V, size=(1, beam.width, beam.length))
    tree = pack(beams, packing="full")
    positions = lengths[:, None] + tree.depth

    def verify_ms(rt) -> float:
        rt.reset(batch=1, capacity=256)
        rt.prefill(prompt, lengths)
        return _median_ms(
            lambda: rt.verify(tree.tokens, positions, tree.tree_mask, lengths), args.repeats
        )

    torch_verify = verify_ms(TorchRuntime(base))
    ort_verify = None
    from redrafter.export.build import export_bundle
    from redrafter.export.onnx import export_drafter
    from redrafter.runtimes.onnxruntime import OnnxRuntime

    tmp = Path(tempfile.mkdtemp(prefix="drafter-cost-"))
    bundle_path = Path(args.bundle) if args.bundle else tmp / "ar-bundle"
    if not bundle_path.exists():
        export_bundle(find_demo_gguf(), bundle_path)
    ort_verify = verify_ms(OnnxRuntime(bundle_path, threads=args.threads))
    print(
        f"verify (N={tree.tokens.shape[1]}): torch {torch_verify:.1f} ms, ORT {ort_verify:.1f} ms"
    )

    import onnx
    import onnxruntime as ort

    rows = []
    context = rng.standard_normal((1, E)).astype(np.float32)
    g0 = np.array([42])
    for name, exit_dim, vd in CONFIGS:
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
        t_rt = TorchRuntime(base, drafter)
        torch_ms = _median_ms(lambda rt=t_rt: rt.draft(context, g0, beam), args.repeats)
        graph = export_drafter(drafter, base, beam)
        path = tmp / f"drafter-{len(rows)}.onnx"
        onnx.save_model(graph, str(path), save_as_external_data=True, location=path.name + ".data")
        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        feed = {"context": context, "first_token": g0}
        ort_ms = _median_ms(lambda s=session, f=feed: s.run(None, f), args.repeats)
        row = {
            "config": name,
            "exit_dim": config.exit_dim,
            "draft_vocab": vd or V,
            "params_millions": round(params / 1e6, 2),
            "megabytes_fp32": round(params * 4 / 1e6, 1),
            "torch_draft_ms": round(torch_ms, 2),
            "torch_fraction_of_verify": round(torch_ms / torch_verify, 3),
            "ort_draft_ms": round(ort_ms, 2),
            "ort_fraction_of_verify": round(ort_ms / ort_verify, 3),
        }
        rows.append(row)
        print(row)
    save(
        f"drafter_cost_w{beam.width}_l{beam.length}",
        {
            "machine": info,
            "beam": [beam.width, beam.length],
            "verify_tokens": int(tree.tokens.shape[1]),
            "torch_verify_ms": round(torch_verify, 2),
            "ort_verify_ms": round(ort_verify, 2),
            "rows": rows,
        },
    )


if __name__ == "__main__":
    main()
