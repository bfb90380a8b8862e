"""TreeAttention on the CPU: the native kernel (through ONNX Runtime, the cache updated in place
by IO binding) against the portable paths, on the demo model's attention shapes, plus evidence
that the native path updates the cache in place.

Dimensions: B batch, Hq query heads, Hkv key/value heads, N new tokens, D head dim, S cache
capacity, P committed length.

    .venv/bin/python -m benchmarks.tree_attention [--out DIR] [--quick]

Per (N, P), N in {1, 8, 32, 64}, P in {128, 1024, 8192}, B=1, Hq=9, Hkv=3, D=64 (SmolLM2-135M),
fp32, S = 8192 + 64, median wall time of one call, --threads threads (default 1) for ORT and torch:
  native     ORT CPU provider, the library registered, one TreeAttention node, shared IO binding
  portable   ORT CPU provider, no library: the same node's ONNX function body from
             redrafter.export.tree_attention (skipped when that module is absent)
  torch      redrafter.models.attention.attend (scatter into the cache + SDPA over S)
  numpy      a vectorised numpy implementation over the P+N live keys
In place: 1000 calls on a 100 MiB cache pair (S=65536) with the shared binding, then without it
(ORT allocates fresh outputs and the kernel copies the whole cache): RSS and time per call.
Saves DIR/tree_attention_cpu.json (DIR: benchmarks/results) and prints tables.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

# numpy's BLAS threads spin against the other timed paths on a small, shared machine; one thread
# each, like the other paths (--threads), unless the caller says otherwise.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402
from onnx import TensorProto, helper  # noqa: E402

from benchmarks._common import RESULTS  # noqa: E402
from redrafter import ops  # noqa: E402
from redrafter.bundle.names import OP_DOMAIN, TREE_ATTENTION  # noqa: E402
from redrafter.models.attention import attend as torch_tree_attention  # noqa: E402

B, HQ, HKV, D = 1, 9, 3, 64
INPUTS = ["query", "key", "value", "key_cache", "value_cache", "past_len", "tree_mask"]
OUTPUTS = ["output", "key_cache_out", "value_cache_out"]
OP_V1 = 1  # the op's version 1 layout ((B, H, N, D) heads, rotary done outside), timed alone here


def one_node_model(*, with_body: bool) -> bytes | None:
    """One redrafter::TreeAttention node (fp32, symbolic dims); with_body appends the portable
    function body from redrafter.export (None when that module is not there)."""
    body = None
    if with_body:
        try:
            from redrafter.export.tree_attention import function_body
        except ImportError:
            return None
        body = function_body(18, OP_V1)
    f = TensorProto.FLOAT
    dims = {
        "query": ["B", "Hq", "N", "D"],
        "key": ["B", "Hkv", "N", "D"],
        "value": ["B", "Hkv", "N", "D"],
        "key_cache": ["B", "Hkv", "S", "D"],
        "value_cache": ["B", "Hkv", "S", "D"],
    }
    inputs = [helper.make_tensor_value_info(k, f, v) for k, v in dims.items()]
    inputs += [
        helper.make_tensor_value_info("past_len", TensorProto.INT64, ["B"]),
        helper.make_tensor_value_info("tree_mask", TensorProto.BOOL, ["B", "N", "N"]),
    ]
    outputs = [
        helper.make_tensor_value_info("output", f, ["B", "Hq", "N", "D"]),
        helper.make_tensor_value_info("key_cache_out", f, ["B", "Hkv", "S", "D"]),
        helper.make_tensor_value_info("value_cache_out", f, ["B", "Hkv", "S", "D"]),
    ]
    node = helper.make_node(
        TREE_ATTENTION, INPUTS, OUTPUTS, domain=OP_DOMAIN, scale=1.0 / np.sqrt(D)
    )
    graph = helper.make_graph([node], "tree_attention", inputs, outputs)
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(OP_DOMAIN, OP_V1)],
    )
    model.ir_version = 10
    if body is not None:
        model.functions.append(body)
    return model.SerializeToString()


THREADS = 1  # set by --threads


def session(model: bytes, *, native: bool) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = THREADS
    if native:
        ops.register(so, required=True)
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])


def bind(sess, x: dict, *, shared: bool):
    """IO binding over the numpy inputs; shared: each cache bound as its own output."""
    binding = sess.io_binding()
    for name in ("query", "key", "value", "past_len", "tree_mask"):
        binding.bind_cpu_input(name, x[name])
    binding.bind_output("output")
    values = []
    for name in ("key_cache", "value_cache"):
        value = ort.OrtValue.ortvalue_from_numpy(x[name])
        values.append(value)  # keep alive
        binding.bind_ortvalue_input(name, value)
        if shared:
            binding.bind_ortvalue_output(f"{name}_out", value)
        else:
            binding.bind_output(f"{name}_out")
    return binding, values


def numpy_tree_attention(q, k, v, kc, vc, past, mask):
    """Vectorised numpy over the P+N live keys (B=1): (out, caches written in place)."""
    P, N = int(past[0]), q.shape[2]
    kc[0, :, P : P + N], vc[0, :, P : P + N] = k[0], v[0]
    G = q.shape[1] // k.shape[1]
    keys = kc[0, :, : P + N]  # (Hkv, P+N, D)
    vals = vc[0, :, : P + N]
    qg = q[0].reshape(k.shape[1], G * N, D)  # (Hkv, G*N, D): heads of a group share K/V
    s = qg @ keys.transpose(0, 2, 1) / np.sqrt(D)  # (Hkv, G*N, P+N)
    visible = np.concatenate([np.ones((N, P), bool), mask[0]], axis=1)  # (N, P+N)
    s = np.where(np.tile(visible, (G, 1))[None], s, -np.inf)
    s = np.exp(s - s.max(-1, keepdims=True))
    s /= s.sum(-1, keepdims=True)
    return (s @ vals).reshape(1, q.shape[1], N, D)


def problem(N: int, P: int, S: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)

    def normal(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    return dict(
        query=normal(B, HQ, N, D),
        key=normal(B, HKV, N, D),
        value=normal(B, HKV, N, D),
        key_cache=normal(B, HKV, S, D),
        value_cache=normal(B, HKV, S, D),
        past_len=np.array([P], np.int64),
        tree_mask=np.tril(np.ones((B, N, N), bool)),  # a chain: the worst case for the mask
    )


def median_ms(fn, *, budget_s: float, max_reps: int = 200) -> float:
    fn()
    times = []
    start = time.perf_counter()
    while len(times) < max_reps and (len(times) < 3 or time.perf_counter() - start < budget_s):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def time_config(native, portable, N: int, P: int, budget: float) -> dict:
    """Every path on one problem; also checks that they agree."""
    x = problem(N, P, 8192 + 64)
    row = dict(N=N, P=P)
    binding, _keep = bind(native, x, shared=True)
    row["native_ms"] = median_ms(lambda: native.run_with_iobinding(binding), budget_s=budget)
    out_native = binding.copy_outputs_to_cpu()[0]
    if portable is not None:
        pb, _pkeep = bind(portable, x, shared=False)
        row["portable_ms"] = median_ms(
            lambda: portable.run_with_iobinding(pb), budget_s=budget, max_reps=50
        )
        row["portable_vs_native_max_abs"] = float(
            np.abs(pb.copy_outputs_to_cpu()[0] - out_native).max()
        )
    t = [torch.from_numpy(x[k]) for k in INPUTS]
    with torch.inference_mode():
        row["torch_ms"] = median_ms(lambda: torch_tree_attention(*t), budget_s=budget, max_reps=50)
    args = [x[k] for k in INPUTS]
    row["numpy_ms"] = median_ms(lambda: numpy_tree_attention(*args), budget_s=budget, max_reps=50)
    row["native_vs_numpy_max_abs"] = float(np.abs(out_native - numpy_tree_attention(*args)).max())
    return row


def kernel_times(quick: bool) -> list[dict]:
    native = session(one_node_model(with_body=False), native=True)
    body_model = one_node_model(with_body=True)
    portable = session(body_model, native=False) if body_model is not None else None
    if portable is None:
        print("portable body: redrafter.export.tree_attention not found; skipped")
    rows = []
    for N in (1, 8, 32, 64):
        for P in (128, 1024, 8192):
            row = time_config(native, portable, N, P, 0.2 if quick else 1.0)
            rows.append(row)
            print(
                f"N={N:3d} P={P:5d}  native {row['native_ms']:8.3f} ms  portable "
                f"{fmt(row.get('portable_ms'))}  torch {row['torch_ms']:8.3f}  "
                f"numpy {row['numpy_ms']:8.3f}",
                flush=True,
            )
    return rows


def in_place_evidence(runs: int) -> dict:
    """RSS and time per call over `runs` calls, shared binding vs fresh outputs."""
    S, N, P = 65536, 8, 1024  # 2 x 48 MiB of cache
    sess = session(one_node_model(with_body=False), native=True)
    result = dict(S=S, N=N, P=P, runs=runs, cache_mib=2 * B * HKV * S * D * 4 / 2**20)
    for shared in (True, False):
        x = problem(N, P, S, seed=1)
        binding, _keep = bind(sess, x, shared=shared)
        before = rss_mib()
        sess.run_with_iobinding(binding)
        after_one = rss_mib()
        start = time.perf_counter()
        for _ in range(runs):
            sess.run_with_iobinding(binding)
        per_call = (time.perf_counter() - start) / runs * 1e3
        key = "shared" if shared else "not_shared"
        result[key] = dict(
            rss_before_mib=before,
            rss_after_first_mib=after_one,
            rss_after_all_mib=rss_mib(),
            ms_per_call=per_call,
            numpy_buffer_updated=bool(np.array_equal(x["key_cache"][0, :, P : P + N], x["key"][0])),
        )
        print(f"in place ({key}): {result[key]}", flush=True)
    return result


def fmt(x) -> str:
    return f"{x:8.3f}" if isinstance(x, float) else "     n/a"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    parser.add_argument("--quick", action="store_true", help="shorter timings, 100 in-place runs")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="threads for ORT (intra-op) and torch; 1 keeps numbers stable on a shared machine",
    )
    args = parser.parse_args()
    global THREADS
    THREADS = args.threads
    torch.set_num_threads(args.threads)
    if ops.library_path() is None:
        sys.exit("native op library missing: run `make ops`")

    t0 = time.time()
    timings = kernel_times(args.quick)
    in_place = in_place_evidence(100 if args.quick else 1000)
    result = dict(
        date=time.strftime("%Y-%m-%d"),
        machine=f"{platform.machine()}, {os.cpu_count()} CPUs",
        load_average=os.getloadavg(),
        python=platform.python_version(),
        onnxruntime=ort.__version__,
        onnx=onnx.__version__,
        torch=torch.__version__,
        numpy=np.__version__,
        threads=THREADS,
        seconds=time.time() - t0,
        shapes=dict(B=B, Hq=HQ, Hkv=HKV, D=D, dtype="float32"),
        timings=timings,
        in_place=in_place,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "tree_attention_cpu.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"saved {path}\n")
    print("| N | P | native (ms) | portable body (ms) | torch ref (ms) | numpy (ms) |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in timings:
        print(
            f"| {r['N']} | {r['P']} | {r['native_ms']:.3f} | {fmt(r.get('portable_ms')).strip()} "
            f"| {r['torch_ms']:.3f} | {r['numpy_ms']:.3f} |"
        )


if __name__ == "__main__":
    main()
