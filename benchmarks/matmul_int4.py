"""redrafter::MatMulInt4 alone (issue 22): AMX-INT8 vs AVX-512 VNNI vs the default choice, per
row count, on the demo model's int4 shapes.

    PYTHONPATH=$PWD .venv/bin/python -m benchmarks.matmul_int4 [--rows 1,2,4,6,8,16,32]
        [--zeros none|uint8|float] [--shapes lm_head,...]
        [--baseline OTHER_BUILD/libredrafter_ops.so] [--verify]

Each shape (SmolLM2-135M: K 576 -> N 576 / 192 / 1536 for attention and the MLP's gate/up,
K 1536 -> N 576 for its down projection, K 576 -> N 49152 for the LM head) is one MatMulInt4
node over random 4-bit codes (blocks of 32, symmetric, as the demo bundle's int4 export), run by
ONNX Runtime's CPU provider with the native library, on `--threads` intra-op threads (default 1:
a kernel comparison, steadier when other processes share the cores). The path is switched per
call through REDRAFTER_CPU_ISA (the library reads it at each call), and the paths' blocks are
interleaved (`time_alternating`) so drifting load hits each alike. `--baseline` adds another
build of the library (e.g. the previous commit's), run in its own session with its default
path, interleaved too, and checked to give the same bits. Reported: the median ms per call of
`--blocks` blocks, and the AMX / VNNI ratio. Results in benchmarks/results/matmul_int4.json
with the load before and after (the machine may be shared: say so beside any figure).

`--verify` (needs REDRAFTER_SMOLLM2_GGUF) then times the demo int4 bundle's verify of 1 and of 6
chained tokens after 300 (benchmarks.quantized's `verify_call`, `--threads` threads) with
the VNNI and the AMX path (where the CPU has AMX), and with `--baseline`'s build, all
interleaved in one process.

Dimensions: M rows (tokens), K reduction, N outputs.
"""

from __future__ import annotations

import argparse
import os
import statistics
from collections.abc import Callable
from typing import Any

import numpy as np

from benchmarks._common import idle_report, machine, save, time_alternating

# (name, K, N): the demo model's int4 matmuls, one of each kind
SHAPES = (
    ("q_o_proj", 576, 576),
    ("k_v_proj", 576, 192),
    ("gate_up_proj", 576, 1536),
    ("down_proj", 1536, 576),
    ("lm_head", 576, 49152),
)
PATHS = ("vnni", "amx", "best")  # REDRAFTER_CPU_ISA values ("best": unset)


def matmul_int4_model(K: int, N: int, *, block: int = 32, zeros: str = "none") -> bytes:
    """One redrafter::MatMulInt4 node, A (M, K) float32 -> Y (M, N), over random 4-bit codes
    and scales (initializers), with `zeros` zero points: "none" (symmetric: 8), "uint8"
    (4-bit, two a byte, as RTN --asymmetric) or "float" (as HQQ and GGUF Q4_1 bundles)."""
    from onnx import TensorProto, helper, numpy_helper

    from redrafter.bundle.names import OP_DOMAIN

    rng = np.random.default_rng(K + N)
    KB = -(-K // block)
    codes = rng.integers(0, 256, (N, KB, block // 2), dtype=np.uint8)  # (N, KB, block/2)
    scales = rng.uniform(0.002, 0.02, N * KB).astype(np.float32)  # (N * KB,)
    inits = [numpy_helper.from_array(codes, "B"), numpy_helper.from_array(scales, "scales")]
    if zeros == "uint8":  # (N, ceil(KB / 2)): two 4-bit zero points a byte
        zp = rng.integers(0, 256, (N, -(-KB // 2)), dtype=np.uint8)
        inits.append(numpy_helper.from_array(zp.reshape(-1), "zero_points"))
    elif zeros == "float":  # (N * KB,)
        zp = rng.uniform(0.0, 15.0, N * KB).astype(np.float32)
        inits.append(numpy_helper.from_array(zp, "zero_points"))
    node = helper.make_node(
        "MatMulInt4", ["A", "B", "scales"] + (["zero_points"] if zeros != "none" else []), ["Y"],
        domain=OP_DOMAIN, K=K, N=N, bits=4, block_size=block,
    )  # fmt: skip
    graph = helper.make_graph(
        [node],
        "matmul_int4",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", K])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", N])],
        inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(OP_DOMAIN, 1)]
    )
    model.ir_version = 8
    return model.SerializeToString()


def path_call(sess: Any, a: np.ndarray, path: str) -> Callable[[], Any]:
    """One call of `sess` on `a` with REDRAFTER_CPU_ISA set for `path` (unset for "best")."""
    return path_call_of(lambda: sess.run(None, {"A": a}), path)


def time_verify(baseline: str, blocks: int, threads: int) -> dict[str, float]:
    """Median ms per verify of 1 and 6 chained tokens after 300 on the demo int4 bundle, per
    path (and on the `baseline` build of the library when given), interleaved, on `threads`
    intra-op threads."""
    from benchmarks._common import demo_bundle, verify_call
    from redrafter import ops
    from redrafter.bundle import load_bundle
    from redrafter.export.quantize import quantization
    from redrafter.runtimes.onnxruntime import OnnxRuntime

    bundle = load_bundle(demo_bundle(None, quantization=quantization("int4")))
    runtimes = {"new": OnnxRuntime(bundle, threads=threads)}
    if baseline:  # the runtime takes the library named by the environment when it is built
        os.environ[ops.LIBRARY_ENV] = baseline
        runtimes["baseline"] = OnnxRuntime(bundle, threads=threads)
        del os.environ[ops.LIBRARY_ENV]
    steps = {}
    for tokens in (1, 6):
        call = verify_call(runtimes["new"], tokens, 300)
        for path in [p for p in usable_paths(call) if p != "best"]:
            steps[f"{path} N={tokens}"] = path_call_of(call, path)
        if baseline:
            steps[f"baseline N={tokens}"] = path_call_of(
                verify_call(runtimes["baseline"], tokens, 300), "best"
            )
    ms = time_alternating(steps, blocks, 20)
    out = {k: round(statistics.median(v), 3) for k, v in ms.items()}
    os.environ.pop("REDRAFTER_CPU_ISA", None)
    for k, v in out.items():
        print(f"verify {k}: {v:.3f} ms")
    return out


_USABLE: tuple[str, ...] | None = None  # the answer of the first probe: the CPU does not change


def usable_paths(call: Callable[[], Any]) -> tuple[str, ...]:
    """PATHS without "amx" where the library refuses it (a CPU without AMX-INT8, e.g. AMD).
    Probed once per process: ONNX Runtime logs the refusal, one line rather than one per shape
    and row count."""
    global _USABLE
    if _USABLE is not None:
        return _USABLE
    try:
        path_call_of(call, "amx")()
        _USABLE = PATHS
    except Exception as e:  # the op's error names the ISA; anything else is a real failure
        if "AMX" not in str(e):
            raise
        _USABLE = tuple(p for p in PATHS if p != "amx")
    finally:
        os.environ.pop("REDRAFTER_CPU_ISA", None)
    return _USABLE


def path_call_of(call: Callable[[], Any], path: str) -> Callable[[], Any]:
    """`call` with REDRAFTER_CPU_ISA set for `path` (unset for "best") before each run."""

    def run() -> Any:
        if path == "best":
            os.environ.pop("REDRAFTER_CPU_ISA", None)
        else:
            os.environ["REDRAFTER_CPU_ISA"] = path
        return call()

    return run


def main() -> None:
    import onnxruntime as ort

    from redrafter import ops

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="1,2,4,6,8,16,32", help="row counts M, comma-separated")
    parser.add_argument("--blocks", type=int, default=7, help="interleaved blocks per path")
    parser.add_argument("--calls", type=int, default=0, help="calls per block (0: ~20 ms)")
    parser.add_argument("--baseline", default="", help="another build of the library to compare")
    parser.add_argument("--verify", action="store_true", help="also time the int4 bundle's verify")
    parser.add_argument(
        "--threads", type=int, default=1, help="ORT intra-op threads (1: steadier on a shared box)"
    )
    parser.add_argument(
        "--zeros",
        choices=["none", "uint8", "float"],
        default="none",
        help="zero points of the random weights: none (symmetric), uint8 (4-bit) or float",
    )
    parser.add_argument("--shapes", default="", help="comma list of shape names (default all)")
    parser.add_argument("--name", default="matmul_int4", help="results file name")
    args = parser.parse_args()
    rows = [int(m) for m in args.rows.split(",")]

    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    ops.register(options, required=True)
    baseline_options = None
    if args.baseline:
        baseline_options = ort.SessionOptions()
        baseline_options.intra_op_num_threads = args.threads
        baseline_options.register_custom_ops_library(args.baseline)
    before = idle_report()
    print(f"load before: {before['loadavg']}, other processes {before['other_processes_cores']}")
    results = []
    wanted = [x for x in args.shapes.split(",") if x] or [name for name, _, _ in SHAPES]
    for name, K, N in [shape for shape in SHAPES if shape[0] in wanted]:
        model = matmul_int4_model(K, N, zeros=args.zeros)
        sess = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        baseline = baseline_options and ort.InferenceSession(
            model, baseline_options, providers=["CPUExecutionProvider"]
        )
        for M in rows:
            a = np.random.default_rng(M).standard_normal((M, K)).astype(np.float32)  # (M, K)
            paths = usable_paths(lambda s=sess, x=a: s.run(None, {"A": x}))
            steps = {p: path_call(sess, a, p) for p in paths}
            if baseline:
                steps["baseline"] = path_call(baseline, a, "best")
            outs = [f()[0] for f in steps.values()]
            assert all(np.array_equal(outs[0], o) for o in outs), f"{name} M={M}: paths differ"
            calls = args.calls
            if not calls:  # enough calls for a ~20 ms block, from a rough first timing
                probe = time_alternating({"vnni": steps["vnni"]}, 1, 3, pause=0)["vnni"][0]
                calls = max(1, min(200, round(20 / max(probe, 1e-3))))
            ms = time_alternating(steps, args.blocks, calls)
            row = {"shape": name, "K": K, "N": N, "M": M, "calls_per_block": calls}
            row |= {f"{p}_ms": round(statistics.median(ms[p]), 4) for p in ms}
            if "amx" in ms:
                row["amx_over_vnni"] = round(row["amx_ms"] / row["vnni_ms"], 3)
            if baseline:
                row["best_over_baseline"] = round(row["best_ms"] / row["baseline_ms"], 3)
            results.append(row)
            print(
                f"{name:13s} K={K:5d} N={N:6d} M={M:3d}  "
                + "  ".join(f"{p} {row[p + '_ms']:8.4f} ms" for p in ms)
                + (f"  amx/vnni {row['amx_over_vnni']:.3f}" if "amx" in ms else "")
                + (f"  best/baseline {row['best_over_baseline']:.3f}" if baseline else "")
            )
    os.environ.pop("REDRAFTER_CPU_ISA", None)
    verify = time_verify(args.baseline, args.blocks, args.threads) if args.verify else None
    after = idle_report()
    print(f"load after: {after['loadavg']}, other processes {after['other_processes_cores']}")
    save(
        args.name,
        {
            "machine": machine(),
            "load_before": before,
            "load_after": after,
            "blocks": args.blocks,
            "baseline": args.baseline or None,
            "threads": args.threads,
            "zeros": args.zeros,
            "note": "median ms per call over interleaved blocks; random codes, "
            "blocks of 32; one ORT session per shape and library",
            "results": results,
            "verify_ms": verify,
        },
    )


if __name__ == "__main__":
    main()
