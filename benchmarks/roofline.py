"""The memory roofline of autoregressive decoding for the demo model (issue 8, docs/design.md §8).

Decoding one token reads every weight once plus the KV cache of the context, so
tokens/s <= memory bandwidth / bytes read per token. This script measures

  1. memory bandwidth, STREAM-style on arrays far larger than the caches: numpy copy and triad
     (single-threaded: numpy does not parallelise element-wise work), torch copy, triad and
     read-only sum with --threads threads, and a torch fp32 GEMV over a weight-sized matrix
     (the kernel decoding actually runs);
  2. bytes read per token for the demo model in fp32 at several context lengths (weights, from
     the model config, checked against the exported weights file; + KV cache);
  3. the resulting tokens/s bound, and the fraction of it that autoregressive decoding reaches
     on ONNX Runtime CPU (native kernel and portable body) and on the torch runtime: one decode
     step timed at a fixed context, and end to end on real prompts (`run_configs`, no drafter).

    .venv/bin/python -m benchmarks.roofline [--threads 2] [--contexts 128,512,2048]

Saves benchmarks/results/roofline.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks._common import (
    cpu_seconds,
    demo_bundle,
    idle_report,
    machine,
    other_load,
    prompt_ids,
    save,
    wait_for_idle,
)

GB = 1e9
REPO = Path(__file__).resolve().parents[1]


def log(message: str) -> None:
    """Progress on stderr (stdout carries the tables)."""
    print(message, file=sys.stderr, flush=True)


def best_and_median(fn: Callable[[], Any], repeats: int) -> tuple[float, float]:
    """Seconds of `fn`: (best, median) over `repeats` runs after one warm-up run."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times), statistics.median(times)


def bandwidth(size_mb: int, threads: int, repeats: int) -> dict[str, dict[str, float]]:
    """GB/s (decimal) per kernel, best and median. Bytes counted as STREAM does (each array
    read or written once; no write-allocate traffic), except numpy triad, which takes two
    passes (c*s into a, then a += b) and is counted with the 5 array passes it really makes."""
    import torch

    torch.set_num_threads(threads)
    n = size_mb * 2**20 // 4  # fp32 elements per array
    rng = np.random.default_rng(0)
    a = rng.standard_normal(n, dtype=np.float32)
    b = np.empty_like(a)
    c = rng.standard_normal(n, dtype=np.float32)
    s = np.float32(3.0)
    word = 4 * n

    def np_triad() -> None:
        np.multiply(c, s, out=b)
        np.add(b, a, out=b)

    ta, tb, tc = (torch.from_numpy(x) for x in (a, b, c))
    rows = 49152 * 4  # a weight-sized fp32 matrix (4x the tied lm_head: > any cache)
    mat = torch.randn(rows, 576)
    vec = torch.randn(576)
    kernels: dict[str, tuple[Callable[[], Any], float]] = {
        "numpy_copy_1t": (lambda: np.copyto(b, a), 2 * word),
        "numpy_triad_1t": (np_triad, 5 * word),
        "numpy_sum_1t": (lambda: a.sum(), word),
        f"torch_copy_{threads}t": (lambda: tb.copy_(ta), 2 * word),
        f"torch_triad_{threads}t": (lambda: torch.add(ta, tc, alpha=3.0, out=tb), 3 * word),
        f"torch_sum_{threads}t": (lambda: ta.sum(), word),
        f"torch_gemv_{threads}t": (lambda: torch.mv(mat, vec), mat.numel() * 4),
    }
    out = {}
    for name, (fn, nbytes) in kernels.items():
        best, med = best_and_median(fn, repeats)
        out[name] = {
            "best_GBps": round(nbytes / best / GB, 2),
            "median_GBps": round(nbytes / med / GB, 2),
        }
        row = out[name]
        log(f"  {name:18s} {row['best_GBps']:6.1f} GB/s best, {row['median_GBps']:6.1f} median")
    return out


def numpy_gemv_GBps(repeats: int) -> float:
    """numpy (OpenBLAS) fp32 GEMV on a weight-sized matrix: where OPENBLAS_* settings act."""
    mat = np.random.default_rng(0).standard_normal((49152 * 4, 576), dtype=np.float32)
    vec = np.ones(576, np.float32)
    best, _ = best_and_median(lambda: mat @ vec, repeats)
    return round(mat.nbytes / best / GB, 2)


def openblas_effect(repeats: int) -> dict[str, Any]:
    """numpy GEMV with this environment's OPENBLAS_* variables and, in a subprocess, without
    them. None of our runtimes use OpenBLAS (torch uses MKL, ONNX Runtime its MLAS); numpy's
    OpenBLAS only matters for numpy matmuls on the host."""
    env = {k: v for k, v in os.environ.items() if k.startswith("OPENBLAS")}
    out: dict[str, Any] = {"env": env, "numpy_gemv_GBps": numpy_gemv_GBps(repeats)}
    if env:
        clean = {k: v for k, v in os.environ.items() if not k.startswith("OPENBLAS")}
        code = f"from benchmarks.roofline import numpy_gemv_GBps; print(numpy_gemv_GBps({repeats}))"
        res = subprocess.run(
            [sys.executable, "-c", code], env=clean, cwd=REPO, capture_output=True, text=True
        )
        try:
            out["numpy_gemv_GBps_without_openblas_env"] = float(res.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            out["numpy_gemv_GBps_without_openblas_env"] = f"failed: {res.stderr[-300:]}"
    return out


def bytes_per_token(config: Any, contexts: list[int], itemsize: int = 4) -> dict[str, Any]:
    """Bytes one autoregressive step reads: every block weight, the final norm, the LM head
    (the tied embedding matrix, read whole), one embedding row, and K and V of `context`
    positions in every layer. Activations and the logits written are small and left out."""
    E, F, Lyr = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    Hq, Hkv, D, V = (
        config.num_attention_heads,
        config.kv_heads,
        config.dim_per_head,
        config.vocab_size,
    )
    per_layer = E * Hq * D + 2 * E * Hkv * D + Hq * D * E + 3 * E * F + 2 * E
    if getattr(config, "attention_bias", False):
        per_layer += Hq * D + 2 * Hkv * D
    head = V * E  # the LM head (tied: the embedding matrix); untied adds nothing read per token
    params_read = Lyr * per_layer + E + head + E  # + final norm + one embedding row
    params_total = Lyr * per_layer + E + V * E * (1 if config.tie_word_embeddings else 2)
    kv_per_position = 2 * Lyr * Hkv * D * itemsize
    return {
        "params_total": params_total,
        "weight_bytes_per_token": params_read * itemsize,
        "kv_bytes_per_position": kv_per_position,
        "bytes_per_token": {str(c): params_read * itemsize + c * kv_per_position for c in contexts},
    }


def step_ms(runtime: Any, context: int, repeats: int) -> float:
    """Median ms of one autoregressive decode step (verify with N=1) on a committed cache of
    `context` random tokens."""
    rng = np.random.default_rng(0)
    runtime.reset(batch=1, capacity=context + 8)
    runtime.prefill(rng.integers(0, runtime.vocab_size, (1, context)), np.array([context]))
    past = np.array([context])
    token = rng.integers(0, runtime.vocab_size, (1, 1))
    depth = np.zeros((1, 1), np.int64)
    mask = np.ones((1, 1, 1), bool)
    times = []
    for _ in range(repeats + 2):
        t = time.perf_counter()
        logits, _ = runtime.verify(token, past[:, None] + depth, mask, past)
        int(logits[0, 0].argmax())  # the host reads the logits, as the driver does
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times[2:])


def end_to_end(
    runtime: Any, prompts: list[list[int]], eos: tuple[int, ...], args: argparse.Namespace
) -> dict[str, Any]:
    """Autoregressive decoding of `prompts` end to end (`run_configs`' figures, no drafter)."""
    from redrafter.bench.harness import run_configs

    r = run_configs(
        runtime,
        prompts,
        [],
        max_new_tokens=args.max_new_tokens,
        repeats=args.repeats,
        eos_token_ids=eos,
    )
    return r["autoregressive"]


def main() -> None:
    """Bandwidth, bytes per token, the bound, and what autoregressive decoding reaches."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--size-mb", type=int, default=256, help="MiB per array [256]")
    parser.add_argument("--contexts", default="128,512,2048", help="context lengths for one step")
    parser.add_argument("--step-repeats", type=int, default=15)
    parser.add_argument("--bw-repeats", type=int, default=7)
    parser.add_argument("--repeats", type=int, default=3, help="end-to-end repeats [3]")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--jargon", type=int, default=2)
    parser.add_argument("--code", type=int, default=2)
    parser.add_argument("--skip-e2e", action="store_true", help="skip the end-to-end decode runs")
    parser.add_argument("--skip-portable", action="store_true")
    parser.add_argument("--name", default="roofline")
    parser.add_argument(
        "--wait-idle",
        type=float,
        default=0,
        metavar="MIN",
        help="first wait up to MIN minutes for other processes to go quiet",
    )
    args = parser.parse_args()
    contexts = [int(x) for x in args.contexts.split(",")]

    import torch

    torch.set_num_threads(args.threads)
    if args.wait_idle:
        wait_for_idle(args.wait_idle, log=log)
    idle = idle_report(3.0)
    info = machine()
    log(
        f"machine: load {idle['loadavg']}, other processes {idle['other_processes_cores']} cores"
        + ("" if idle["idle"] else "  <-- BUSY: bandwidth and timings are skewed")
    )
    payload: dict[str, Any] = {
        "machine": {**info, "idle_before": idle},
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "threads": args.threads,
    }

    log("1. memory bandwidth")
    before = cpu_seconds()
    bw = bandwidth(args.size_mb, args.threads, args.bw_repeats)
    payload["bandwidth_GBps"] = bw
    payload["bandwidth_other_processes_cores"] = other_load(before, cpu_seconds())
    payload["openblas"] = openblas_effect(args.bw_repeats)
    t = args.threads
    # The bound takes the best figure any copy (or read) kernel reached: a ceiling, not a mean.
    headline = {
        "stream_copy": max(bw["numpy_copy_1t"]["best_GBps"], bw[f"torch_copy_{t}t"]["best_GBps"]),
        "read": max(bw["numpy_sum_1t"]["best_GBps"], bw[f"torch_sum_{t}t"]["best_GBps"]),
        "gemv": bw[f"torch_gemv_{t}t"]["best_GBps"],
    }
    payload["bandwidth_used_for_bounds_GBps"] = headline

    log("2. bytes read per token (fp32)")
    from redrafter.demo import find_demo_gguf, shared_prompts
    from redrafter.models.checkpoints import load_base, load_base_config

    gguf = find_demo_gguf()
    config = load_base_config(gguf)
    per_token = bytes_per_token(config, contexts)
    bundle = demo_bundle(None, log=log)  # autoregressive only: no drafter needed
    weights_file = bundle / "onnx" / "weights.data"
    if weights_file.is_file():
        per_token["exported_weights_bytes"] = weights_file.stat().st_size
    payload["model"] = {"gguf": gguf.name, "config": config.to_dict(), **per_token}
    wb = per_token["weight_bytes_per_token"]
    kv = per_token["kv_bytes_per_position"]
    log(f"  weights read per token {wb / 1e6:.1f} MB; KV {kv / 1e3:.1f} kB per context position")

    bounds = {
        kind: {c: round(gbps * GB / per_token["bytes_per_token"][str(c)], 1) for c in contexts}
        for kind, gbps in headline.items()
    }
    payload["bound_tokens_per_second"] = {
        k: {str(c): v for c, v in d.items()} for k, d in bounds.items()
    }

    log("3. autoregressive decoding against the bound")
    from redrafter.ops import library_path as native_library
    from redrafter.runtimes.onnxruntime import OnnxRuntime
    from redrafter.runtimes.torch import TorchRuntime

    runtimes: dict[str, Callable[[], Any]] = {}
    if native_library() is not None:
        runtimes["ort_cpu_native"] = lambda: OnnxRuntime(bundle, native=True, threads=args.threads)
    if not args.skip_portable:
        runtimes["ort_cpu_portable"] = lambda: OnnxRuntime(
            bundle, native=False, threads=args.threads
        )
    runtimes["torch_eager"] = lambda: TorchRuntime(load_base(gguf))

    prompts, eos = prompt_ids(gguf, shared_prompts(args.jargon, args.code))
    measured: dict[str, Any] = {}
    for name, make in runtimes.items():
        rt = make()
        before = cpu_seconds()
        steps = {str(c): round(step_ms(rt, c, args.step_repeats), 2) for c in contexts}
        entry: dict[str, Any] = {"step_ms": steps}
        entry["step_tokens_per_second"] = {c: round(1000 / ms, 1) for c, ms in steps.items()}
        entry["fraction_of_bound"] = {
            kind: {c: round(1000 / steps[str(c)] / bounds[kind][c], 3) for c in contexts}
            for kind in bounds
        }
        entry["achieved_GBps"] = {
            c: round(per_token["bytes_per_token"][c] / (ms / 1000) / GB, 1)
            for c, ms in steps.items()
        }
        if not args.skip_e2e and name != "ort_cpu_portable":  # portable: one step is enough
            e2e = end_to_end(rt, prompts, eos, args)
            mean_ctx = statistics.mean(len(p) for p in prompts) + e2e["tokens"] / len(prompts) / 2
            ctx_bytes = wb + mean_ctx * per_token["kv_bytes_per_position"]
            entry["end_to_end"] = {
                "tokens_per_second": round(e2e["tokens_per_second"], 1),
                "ms_per_step": round(e2e["ms_per_step"], 2),
                "mean_context": round(mean_ctx),
                "fraction_of_stream_copy_bound": round(
                    e2e["tokens_per_second"] * ctx_bytes / (headline["stream_copy"] * GB), 3
                ),
                "fraction_of_gemv_bound": round(
                    e2e["tokens_per_second"] * ctx_bytes / (headline["gemv"] * GB), 3
                ),
            }
        entry["other_processes_cores"] = other_load(before, cpu_seconds())
        measured[name] = entry
        e2e_tps = entry.get("end_to_end", {}).get("tokens_per_second")
        log(f"  {name}: step ms {steps}; end to end {e2e_tps} tok/s")
        del rt
    payload["autoregressive"] = measured
    payload["idle_after"] = idle_report(2.0)
    print_summary(payload, contexts, headline)
    save(args.name, payload)


def print_summary(payload: dict[str, Any], contexts: list[int], headline: dict[str, float]) -> None:
    """The bandwidth and bound tables and the end-to-end fractions, on stdout."""
    m = payload["model"]
    print(
        f"\n{m['gguf']} fp32: {m['params_total'] / 1e6:.1f}M parameters; "
        f"{m['weight_bytes_per_token'] / 1e6:.1f} MB of weights + "
        f"{m['kv_bytes_per_position'] / 1e3:.1f} kB of KV per context position read per token"
    )
    idle = payload["machine"]["idle_before"]
    print(
        f"machine before: load {idle['loadavg']}, other processes "
        f"{idle['other_processes_cores']} cores ({'idle' if idle['idle'] else 'BUSY'})"
    )
    print("\n| bandwidth kernel | best GB/s | median GB/s |\n|---|---|---|")
    for k, v in payload["bandwidth_GBps"].items():
        print(f"| {k} | {v['best_GBps']} | {v['median_GBps']} |")
    print(
        f"\n| context | bytes/token | bound tok/s (copy {headline['stream_copy']} GB/s) | "
        f"bound (gemv {headline['gemv']} GB/s) | "
        + " | ".join(f"{n} tok/s (frac of copy bound)" for n in payload["autoregressive"])
        + " |"
    )
    print("|---" * (4 + len(payload["autoregressive"])) + "|")
    for c in contexts:
        cells = []
        for r in payload["autoregressive"].values():
            frac = r["fraction_of_bound"]["stream_copy"][c]
            cells.append(f"{r['step_tokens_per_second'][str(c)]} ({frac:.0%})")
        b = payload["bound_tokens_per_second"]
        print(
            f"| {c} | {m['bytes_per_token'][str(c)] / 1e6:.1f} MB | {b['stream_copy'][str(c)]} | "
            f"{b['gemv'][str(c)]} | " + " | ".join(cells) + " |"
        )
    for name, r in payload["autoregressive"].items():
        e = r.get("end_to_end")
        if e:
            print(
                f"end to end {name}: {e['tokens_per_second']} tok/s at mean context "
                f"{e['mean_context']} = "
                f"{e['fraction_of_stream_copy_bound']:.0%} of the copy bound, "
                f"{e['fraction_of_gemv_bound']:.0%} of the GEMV bound"
            )
    ob = payload["openblas"]
    if ob["env"]:
        print(
            f"OPENBLAS env {ob['env']}: numpy GEMV {ob['numpy_gemv_GBps']} GB/s, without it "
            f"{ob.get('numpy_gemv_GBps_without_openblas_env')} GB/s "
            "(numpy only; our runtimes do not use OpenBLAS)"
        )


if __name__ == "__main__":
    main()
