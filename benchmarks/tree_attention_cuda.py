"""The CUDA TreeAttention / KVCommit kernels on a GPU, through the library's C ABI (ctypes on
torch CUDA tensors; ORT's CUDA provider is not needed): correctness against a float64 torch
reference, then kernel time against torch's scaled_dot_product_attention on the same problem.

Dimensions: B batch, Hq query heads, Hkv key/value heads, N new tokens, D head dim, S cache
capacity, P committed length.

    python -m benchmarks.tree_attention_cuda [--out DIR] [--quick]   # from the repository root

Correctness: fp32 and fp16, ragged P across the batch, GQA ratios 1, 3 and 8, N in {1, 8, 32, 64},
P in {128, 1024, 8192}; outputs poisoned with NaN before each call; caches checked bit for bit
(new rows at [P, P+N), all else untouched). Timing: the demo model's heads (Hq=9, Hkv=3, D=64,
B=1), CUDA events around repeated calls, median of several repeats, eager and CUDA-graph replay:
  native         our kernel (writes the cache in place, reads tree_mask directly)
  sdpa           F.scaled_dot_product_attention(q, k[:P+N], v[:P+N], bool mask [N, P+N],
                 enable_gqa=True) alone: inputs prepared outside the timed region
  sdpa_pipeline  what a portable graph does per layer: write the new K/V into the cache, build
                 the [N, P+N] mask from tree_mask, then sdpa
Saves JSON to DIR/tree_attention_cuda.json (DIR: benchmarks/results) and prints a table. On a
machine without the project installed (the lent GPU machine), run it from the repository root:
`python -m` puts that folder on the import path, so `redrafter` imports from the checkout.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks._common import RESULTS
from redrafter import ops
from redrafter.decoding.kv_cache import apply_commit

CODES = {torch.float32: 1, torch.float16: 10}


def launch(lib, q, k, v, kc, vc, past_host, mask, out, kc_out=None, vc_out=None):
    """One rd_tree_attention_cuda call on the current stream. past_host: numpy int64 (B,)."""
    B, Hq, N, D = q.shape
    Hkv, S = kc.shape[1], kc.shape[2]
    kc_out = kc if kc_out is None else kc_out
    vc_out = vc if vc_out is None else vc_out
    rc = lib.rd_tree_attention_cuda(
        CODES[q.dtype],
        B,
        Hq,
        Hkv,
        N,
        D,
        S,
        0.0,
        q.data_ptr(),
        k.data_ptr(),
        v.data_ptr(),
        kc.data_ptr(),
        vc.data_ptr(),
        past_host.ctypes.data,
        mask.data_ptr(),
        out.data_ptr(),
        kc_out.data_ptr(),
        vc_out.data_ptr(),
        torch.cuda.current_stream().cuda_stream,
    )
    if rc != 0:
        raise RuntimeError(lib.rd_last_error().decode())


def reference(q, k, v, kc, vc, past, mask):
    """float64 torch reference: (out, key_cache_out, value_cache_out)."""
    B, Hq, N, D = q.shape
    G = Hq // k.shape[1]
    out = torch.zeros(q.shape, dtype=torch.float64, device=q.device)
    kc_out, vc_out = kc.clone(), vc.clone()
    for b in range(B):
        P = int(past[b])
        kc_out[b, :, P : P + N], vc_out[b, :, P : P + N] = k[b], v[b]
        keys = torch.cat([kc[b, :, :P], k[b]], 1).double().repeat_interleave(G, 0)  # (Hq, P+N, D)
        vals = torch.cat([vc[b, :, :P], v[b]], 1).double().repeat_interleave(G, 0)
        visible = torch.cat([torch.ones(N, P, dtype=torch.bool, device=q.device), mask[b]], 1)
        s = q[b].double() @ keys.transpose(1, 2) / D**0.5  # (Hq, N, P+N)
        s = s.masked_fill(~visible, float("-inf"))
        out[b] = torch.softmax(s, -1) @ vals
    return out, kc_out, vc_out


def random_problem(B, Hq, Hkv, N, D, S, pasts, dtype, gen):
    def normal(*shape):
        return torch.randn(*shape, generator=gen, device="cuda").to(dtype)

    mask = torch.rand(B, N, N, generator=gen, device="cuda") < 0.5
    mask |= torch.eye(N, dtype=torch.bool, device="cuda")
    return dict(
        q=normal(B, Hq, N, D),
        k=normal(B, Hkv, N, D),
        v=normal(B, Hkv, N, D),
        kc=normal(B, Hkv, S, D),
        vc=normal(B, Hkv, S, D),
        past=np.asarray(pasts, dtype=np.int64),
        mask=mask,
    )


def check_correctness(lib, quick: bool) -> list[dict]:
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    heads = [(8, 8), (9, 3), (8, 1)]  # GQA ratios 1, 3, 8
    Ns = [1, 8, 32, 64]
    Ps = [128, 1024] if quick else [128, 1024, 8192]
    for dtype in (torch.float32, torch.float16):
        for Hq, Hkv in heads:
            for N in Ns:
                for P in Ps:
                    D, S = 64, P + N + 16
                    pasts = [P, P // 3, 0]  # ragged: full, a third, empty
                    x = random_problem(3, Hq, Hkv, N, D, S, pasts, dtype, gen)
                    ref, kc_want, vc_want = reference(
                        x["q"], x["k"], x["v"], x["kc"], x["vc"], x["past"], x["mask"]
                    )
                    out = torch.full_like(x["q"], float("nan"))
                    launch(lib, x["q"], x["k"], x["v"], x["kc"], x["vc"], x["past"], x["mask"], out)
                    torch.cuda.synchronize()
                    err = (out.double() - ref).abs().max().item()
                    rel = ((out.double() - ref).norm() / ref.norm()).item()
                    caches_ok = bool(
                        torch.equal(x["kc"], kc_want) and torch.equal(x["vc"], vc_want)
                    )
                    tol = 1e-5 if dtype == torch.float32 else 2e-3
                    ok = bool(np.isfinite(err) and err <= tol and caches_ok)
                    rows.append(
                        dict(
                            dtype=str(dtype).split(".")[-1],
                            Hq=Hq,
                            Hkv=Hkv,
                            N=N,
                            P=P,
                            max_abs=err,
                            rel=rel,
                            caches_ok=caches_ok,
                            ok=ok,
                        )
                    )
    # Wide heads (D=128: fewer rows per block, > 48 KB of shared memory) and a head dim that is
    # not a multiple of 8 (the element-by-element staging path).
    for dtype in (torch.float32, torch.float16):
        for Hq, Hkv, N, P, D in ((8, 2, 8, 1024, 128), (32, 8, 64, 700, 128), (6, 3, 5, 300, 20)):
            x = random_problem(2, Hq, Hkv, N, D, P + N + 3, [P, P // 2], dtype, gen)
            ref, kc_want, vc_want = reference(
                x["q"], x["k"], x["v"], x["kc"], x["vc"], x["past"], x["mask"]
            )
            out = torch.full_like(x["q"], float("nan"))
            launch(lib, x["q"], x["k"], x["v"], x["kc"], x["vc"], x["past"], x["mask"], out)
            torch.cuda.synchronize()
            err = (out.double() - ref).abs().max().item()
            caches_ok = bool(torch.equal(x["kc"], kc_want) and torch.equal(x["vc"], vc_want))
            tol = 1e-5 if dtype == torch.float32 else 2e-3
            rows.append(
                dict(
                    dtype=str(dtype).split(".")[-1],
                    Hq=Hq,
                    Hkv=Hkv,
                    N=N,
                    P=P,
                    D=D,
                    max_abs=err,
                    rel=None,
                    caches_ok=caches_ok,
                    ok=bool(np.isfinite(err) and err <= tol and caches_ok),
                )
            )
    # Not in place: the full copy, then the new rows.
    x = random_problem(2, 9, 3, 8, 64, 300, [200, 17], torch.float16, gen)
    ref, kc_want, vc_want = reference(
        x["q"], x["k"], x["v"], x["kc"], x["vc"], x["past"], x["mask"]
    )
    out = torch.full_like(x["q"], float("nan"))
    kc_out, vc_out = torch.zeros_like(x["kc"]), torch.zeros_like(x["vc"])
    launch(lib, x["q"], x["k"], x["v"], x["kc"], x["vc"], x["past"], x["mask"], out, kc_out, vc_out)
    torch.cuda.synchronize()
    err = (out.double() - ref).abs().max().item()
    ok = err <= 2e-3 and torch.equal(kc_out, kc_want) and torch.equal(vc_out, vc_want)
    rows.append(
        dict(
            dtype="float16",
            Hq=9,
            Hkv=3,
            N=8,
            P=200,
            max_abs=err,
            rel=None,
            caches_ok=bool(ok),
            ok=bool(ok),
            note="not in place",
        )
    )
    return rows


def check_kv_commit(lib) -> dict:
    rng = np.random.default_rng(1)
    L, B, Hkv, S, D, K = 4, 3, 3, 64, 64, 6
    cache = rng.standard_normal((L, 2, B, Hkv, S, D)).astype(np.float16)
    past = np.array([10, 40, 0], np.int64)
    count = np.array([6, 3, 0], np.int64)
    source = np.tile(np.arange(K, dtype=np.int64), (B, 1))
    source[0] = [0, 2, 5, 9, 11, 20]
    source[1, :3] = [1, 4, 7]
    want = cache.copy()
    apply_commit(want, past, source, count)
    dev = torch.from_numpy(cache).cuda()
    rc = lib.rd_kv_commit_cuda(
        10,
        L * 2,
        B,
        Hkv,
        S,
        D,
        K,
        dev.data_ptr(),
        dev.data_ptr(),
        past.ctypes.data,
        source.ctypes.data,
        count.ctypes.data,
        torch.cuda.current_stream().cuda_stream,
    )
    assert rc == 0, lib.rd_last_error().decode()
    ok = bool(np.array_equal(dev.cpu().numpy(), want))
    return dict(ok=ok, shape=list(cache.shape))


def time_fn(fn, iters: int, repeats: int) -> float:
    """Median over `repeats` of the mean time of `iters` back-to-back calls, in microseconds."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) * 1e3 / iters)
    return statistics.median(samples)


def time_graph(fn, iters: int, repeats: int) -> float | str:
    """Like time_fn, but replays `iters` calls captured in one CUDA graph (no launch gaps)."""
    try:
        fn()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn()  # warm up on the capture stream
            with torch.cuda.graph(graph, stream=stream):
                for _ in range(iters):
                    fn()
        torch.cuda.current_stream().wait_stream(stream)
        return time_fn(graph.replay, 1, repeats) / iters
    except Exception as e:  # noqa: BLE001 - report, don't fail the run
        return f"graph capture failed: {type(e).__name__}: {e}"


def time_config(lib, dtype, N: int, P: int, gen, iters: int) -> dict:
    """native, sdpa and sdpa_pipeline on one problem with the demo model's heads."""
    B, Hq, Hkv, D = 1, 9, 3, 64
    S = 8192 + 64
    x = random_problem(B, Hq, Hkv, N, D, S, [P], dtype, gen)
    out = torch.empty_like(x["q"])
    past_dev = torch.from_numpy(x["past"]).cuda()

    def native():
        launch(lib, x["q"], x["k"], x["v"], x["kc"], x["vc"], x["past"], x["mask"], out)

    k_all = x["kc"][:, :, : P + N].clone()
    v_all = x["vc"][:, :, : P + N].clone()
    ones = torch.ones(B, N, P, dtype=torch.bool, device="cuda")
    full_mask = torch.cat([ones, x["mask"]], -1)[:, None]  # (B, 1, N, P+N)

    def sdpa():
        F.scaled_dot_product_attention(x["q"], k_all, v_all, attn_mask=full_mask, enable_gqa=True)

    slots = torch.arange(S, device="cuda")

    def sdpa_pipeline():
        kc, vc = x["kc"], x["vc"]
        kc[:, :, P : P + N] = x["k"]
        vc[:, :, P : P + N] = x["v"]
        rel = slots[None, :] - past_dev[:, None]  # (B, S)
        j = rel.clamp(0, N - 1)[:, None, :].expand(B, N, S)
        new = torch.gather(x["mask"], 2, j) & ((rel >= 0) & (rel < N))[:, None]
        mask = ((rel < 0)[:, None] | new)[:, None, :, : P + N]  # (B, 1, N, P+N)
        F.scaled_dot_product_attention(
            x["q"], kc[:, :, : P + N], vc[:, :, : P + N], attn_mask=mask, enable_gqa=True
        )

    row = dict(dtype=str(dtype).split(".")[-1], N=N, P=P)
    for name, fn in (("native", native), ("sdpa", sdpa), ("sdpa_pipeline", sdpa_pipeline)):
        row[f"{name}_us"] = time_fn(fn, iters, 5)
        row[f"{name}_graph_us"] = time_graph(fn, 20, 5)
    el = 2 if dtype == torch.float16 else 4
    row["kv_bytes"] = 2 * Hkv * (P + N) * D * el
    best = row["native_graph_us"]
    best = best if isinstance(best, float) else row["native_us"]
    row["native_GBps"] = row["kv_bytes"] / best / 1e3
    return row


def benchmark(lib, quick: bool) -> list[dict]:
    gen = torch.Generator(device="cuda").manual_seed(2)
    rows = []
    for dtype in (torch.float16, torch.float32):
        for N in (1, 8, 32, 64):
            for P in (128, 1024, 8192):
                row = time_config(lib, dtype, N, P, gen, 50 if quick else 200)
                rows.append(row)
                print(
                    f"{row['dtype']:8s} N={N:3d} P={P:5d}  native {row['native_us']:8.1f} us "
                    f"(graph {fmt(row['native_graph_us'])})  sdpa {row['sdpa_us']:8.1f} "
                    f"(graph {fmt(row['sdpa_graph_us'])})  pipeline {row['sdpa_pipeline_us']:8.1f} "
                    f"(graph {fmt(row['sdpa_pipeline_graph_us'])})",
                    flush=True,
                )
    return rows


def profile(lib) -> list[dict]:
    """Device time of each kernel of one native call (torch.profiler / CUPTI), demo heads, fp16."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    gen = torch.Generator(device="cuda").manual_seed(3)
    rows = []
    for N, P in ((1, 128), (8, 128), (64, 128), (1, 8192), (64, 8192)):
        x = random_problem(1, 9, 3, N, 64, 8192 + 64, [P], torch.float16, gen)
        out = torch.empty_like(x["q"])
        for _ in range(3):
            launch(lib, x["q"], x["k"], x["v"], x["kc"], x["vc"], x["past"], x["mask"], out)
        torch.cuda.synchronize()
        with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                launch(lib, x["q"], x["k"], x["v"], x["kc"], x["vc"], x["past"], x["mask"], out)
            torch.cuda.synchronize()
        kernels = {}
        for e in prof.events():
            if e.device_type.name == "CUDA":
                kernels.setdefault(e.name[:60], []).append(e.device_time_total)
        for name, times in kernels.items():
            rows.append(dict(N=N, P=P, kernel=name, calls=len(times), us=statistics.median(times)))
            us = statistics.median(times)
            print(f"profile N={N:3d} P={P:5d} {name:60s} x{len(times):3d} {us:8.1f} us")
    return rows


def fmt(x):
    return f"{x:7.1f}" if isinstance(x, float) else "n/a"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    parser.add_argument("--quick", action="store_true", help="fewer sizes and iterations")
    parser.add_argument("--profile", action="store_true", help="only per-kernel device times")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("no CUDA device: this benchmark needs a GPU")
    lib = ops.load_c_api()
    if not lib.rd_has_cuda_kernels():
        sys.exit("the library was built without nvcc; rebuild with `make ops` where nvcc exists")

    if args.profile:
        profile(lib)
        return
    t0 = time.time()
    correctness = check_correctness(lib, args.quick)
    failed = [r for r in correctness if not r["ok"]]
    print(
        f"correctness: {len(correctness) - len(failed)}/{len(correctness)} configurations pass; "
        f"worst fp32 err {max(r['max_abs'] for r in correctness if r['dtype'] == 'float32'):.2e}, "
        f"worst fp16 err {max(r['max_abs'] for r in correctness if r['dtype'] == 'float16'):.2e}"
    )
    for r in failed:
        print("  FAIL", r)
    commit = check_kv_commit(lib)
    print(f"KVCommit CUDA == numpy reference: {commit['ok']}")
    timing = benchmark(lib, args.quick)

    result = dict(
        device=torch.cuda.get_device_name(),
        torch=torch.__version__,
        cuda=torch.version.cuda,
        python=platform.python_version(),
        date=time.strftime("%Y-%m-%d"),
        seconds=time.time() - t0,
        correctness=correctness,
        kv_commit=commit,
        timing=timing,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "tree_attention_cuda.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"saved {path}")
    header = f"{'dtype':8s} {'N':>3s} {'P':>5s} {'native':>9s} {'sdpa':>9s} {'pipeline':>9s}"
    print(f"\n{header}   (graph replay, us)")
    for r in timing:
        print(
            f"{r['dtype']:8s} {r['N']:3d} {r['P']:5d} {fmt(r['native_graph_us']):>9s} "
            f"{fmt(r['sdpa_graph_us']):>9s} {fmt(r['sdpa_pipeline_graph_us']):>9s}"
        )
    if failed or not commit["ok"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
