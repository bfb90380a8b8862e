"""The TreeAttention CPU kernel with the `window` and `softcap` attributes: what a sliding-window
layer (Mistral, Qwen2, Gemma's local layers) and Gemma 2's score cap cost, against the same call
without them, on one shape of a 2B-class model's attention.

Dimensions: B batch, Hq query heads, Hkv key/value heads, N new tokens, D head dim, P committed
length, W window.

    .venv/bin/python -m benchmarks.tree_attention_window [--threads T] [--quick]

Per (N, P, W, softcap): B=1, Hq=8, Hkv=4, D=256 (Gemma 2 2B / Gemma 3 1B-4B heads), fp32, a
causal chain of N new tokens, S = P + N; median wall time of one call of the native CPU kernel
through the C ABI (`redrafter.ops.tree_attention_host`, in place), T threads (default 1). The
kernel skips whole 64-key tiles before every row's window, so a windowed call costs about what
an unwindowed call over W keys costs; softcap adds one tanh per visible score.
Saves results/tree_attention_window.json with the machine's load (uptime) before and after.
"""

from __future__ import annotations

import argparse
import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402

from benchmarks._common import machine, save  # noqa: E402
from benchmarks.tree_attention import median_ms  # noqa: E402
from redrafter import ops  # noqa: E402

B, HQ, HKV, D = 1, 8, 4, 256


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages (what `uptime` prints): the machine is shared."""
    return [round(x, 2) for x in os.getloadavg()]


def time_call(lib, *, N: int, P: int, window: int, softcap: float, threads: int, budget: float):
    rng = np.random.default_rng(0)
    S = P + N
    q = rng.standard_normal((B, HQ, N, D), dtype=np.float32)
    k, v = (rng.standard_normal((B, HKV, N, D), dtype=np.float32) for _ in range(2))
    kc, vc = (rng.standard_normal((B, HKV, S, D), dtype=np.float32) for _ in range(2))
    past = np.array([P], np.int64)
    mask = np.tril(np.ones((B, N, N), bool))

    def call() -> None:
        ops.tree_attention_host(
            lib, q, k, v, kc, vc, past, mask, window=window, softcap=softcap, threads=threads
        )

    return median_ms(call, budget_s=budget)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="kernel threads")
    parser.add_argument("--quick", action="store_true", help="shorter timings")
    args = parser.parse_args()
    lib = ops.load_c_api()
    budget = 0.3 if args.quick else 1.0
    load_before = load_average()
    rows = []
    for N in (1, 8):
        for P in (1024, 8192):
            for window in (0, 512, 4096):
                for softcap in (0.0, 50.0):
                    if window >= P + N:
                        continue  # the window covers everything: the same call as no window
                    ms = time_call(
                        lib,
                        N=N,
                        P=P,
                        window=window,
                        softcap=softcap,
                        threads=args.threads,
                        budget=budget,
                    )
                    rows.append(dict(N=N, P=P, window=window, softcap=softcap, ms=round(ms, 4)))
                    print(
                        f"N={N:2d} P={P:5d} window={window:4d} softcap={softcap:4.0f}: {ms:.3f} ms"
                    )
    payload = {
        "machine": machine(),
        "load_average_before": load_before,
        "load_average_after": load_average(),
        "shape": dict(B=B, Hq=HQ, Hkv=HKV, D=D, dtype="float32", threads=args.threads),
        "rows": rows,
    }
    save("tree_attention_window", payload)


if __name__ == "__main__":
    main()
