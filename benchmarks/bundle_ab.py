"""Two bundles of the same model, one verify step each, timed against each other: the A/B
for an exporter change (e.g. a bundle exported by an older redrafter as the baseline), or,
with `--baseline-library`, for a kernel change (one bundle on two builds of the native op
library: `custom_ops/build.sh OUT_DIR` makes the other build).

    .venv/bin/python -m benchmarks.bundle_ab --bundle NEW [--baseline OLD] [--tokens 1,8]
        [--library NEW.so] [--baseline-library OLD.so]
        [--baseline-unfolded | --bundle-unfolded]
        [--context 128] [--blocks 60] [--block 10] [--threads 2] [--name bundle_ab]

Both run through `OnnxRuntime.verify` (IO binding, native kernel when built) on a causal chain
of `--tokens` new tokens after `--context` cached ones, in alternating blocks of `--block`
calls. Between blocks the process sleeps 50 ms: each ORT session has its own spinning thread
pool, and without the pause the session that ran last keeps a core busy into the other's
block (measured: +4 ms per call on 2 cores). Reports the median block of each and the median
of the paired (same round) differences. The same bundle on both sides (an A/A run) shows what
the script cannot tell apart: on the 2-core VM, paired differences up to ~0.4 ms at 1 token and
~0.7 ms at 6, the `--bundle` side usually the slower (benchmarks/RESULTS.md, 2026-12-06).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from statistics import median
from typing import Any

from benchmarks._common import (
    idle_report,
    machine,
    native_library,
    save,
    time_alternating,
    verify_call,
)


def verify_step(
    bundle: Path,
    tokens: int,
    context: int,
    threads: int,
    library: str | None = None,
    *,
    fold_int4: bool = True,
) -> Callable[[], Any]:
    """A verify of `tokens` chained new tokens at `context` past ones, on a fresh runtime
    (with the native op library at `library`, else the default one; `fold_int4`: as
    `OnnxRuntime` takes it)."""
    from redrafter.runtimes.onnxruntime import OnnxRuntime

    with native_library(library):
        runtime = OnnxRuntime(bundle, threads=threads, fold_int4=fold_int4)
        return verify_call(runtime, tokens, context)


def main() -> None:
    """Time both bundles' verify steps per width in alternating blocks; save the medians."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--baseline", help="the other bundle [--bundle]")
    ap.add_argument("--library", help="native op library for --bundle [the default build]")
    ap.add_argument("--baseline-library", help="native op library for the baseline [default]")
    ap.add_argument(
        "--baseline-unfolded",
        action="store_true",
        help="the baseline keeps the Splits, residual Adds and SwiGLU Muls around MatMulInt4 as "
        "nodes (OnnxRuntime(fold_int4=False)): the A/B of those folds",
    )
    ap.add_argument(
        "--bundle-unfolded",
        action="store_true",
        help="--bundle keeps them as nodes instead (the same A/B the other way round)",
    )
    ap.add_argument("--tokens", default="1,8", help="comma list of verify widths")
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--blocks", type=int, default=60, help="blocks per bundle and width")
    ap.add_argument("--block", type=int, default=10, help="calls per block")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--name", default="bundle_ab")
    args = ap.parse_args()
    if not (
        args.baseline or args.baseline_library or args.baseline_unfolded != args.bundle_unfolded
    ):
        ap.error(
            "give --baseline (another bundle), --baseline-library (another build) and/or one of "
            "--baseline-unfolded and --bundle-unfolded"
        )
    baseline = args.baseline or args.bundle
    idle = idle_report(2.0)
    rows = {}
    for tokens in (int(t) for t in args.tokens.split(",")):
        steps = {
            "bundle": verify_step(
                Path(args.bundle),
                tokens,
                args.context,
                args.threads,
                args.library,
                fold_int4=not args.bundle_unfolded,
            ),
            "baseline": verify_step(
                Path(baseline),
                tokens,
                args.context,
                args.threads,
                args.baseline_library,
                fold_int4=not args.baseline_unfolded,
            ),
        }
        ms = time_alternating(steps, args.blocks, args.block)
        diff = [a - b for a, b in zip(ms["bundle"], ms["baseline"], strict=True)]
        rows[tokens] = {
            "median_ms": {k: median(v) for k, v in ms.items()},
            "paired_diff_ms_median": median(diff),
            "block_ms": ms,
        }
        print(
            f"{tokens} token(s): bundle {median(ms['bundle']):.2f} ms, baseline "
            f"{median(ms['baseline']):.2f} ms, paired difference {median(diff):+.2f} ms"
        )
        del steps
    save(
        args.name,
        {
            "machine": {**machine(), "idle_before": idle},
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "bundle": args.bundle,
            "baseline": baseline,
            "library": args.library,
            "baseline_library": args.baseline_library,
            "baseline_unfolded": args.baseline_unfolded,
            "bundle_unfolded": args.bundle_unfolded,
            "context": args.context,
            "threads": args.threads,
            "tokens": rows,
        },
    )


if __name__ == "__main__":
    main()
