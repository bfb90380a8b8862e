"""Where our one-token step loses to onnxruntime-genai's: our bundle's base graph and genai's
fp32 graph for the same model, each run for one new token on the same context length in this
process's ONNX Runtime (so the runtime and its version are the same, only the graphs differ),
timed in alternating blocks (50 ms apart, so the previous block's spinning thread pool does not
eat into the next; runs before 2026-11-30 18:20 UTC had no pause and were ~4-7 ms per call
slower for both graphs), then profiled with ORT's profiler: time per op type per call.

    .venv/bin/python -m benchmarks.graph_profile --bundle DIR [--genai-model DIR]
        [--context 128] [--calls 200] [--threads 2] [--ablate rotary,rmsnorm,both,rmsnorm-div]
        [--baseline OLD_BUNDLE] [--name graph_profile]

--genai-model defaults to the genai fp32 export of `python -m benchmarks.peers --setup genai`
(its int4 export, `genai-int4`, beside it, for an int4 bundle of ours: ours then runs the
kernel it decodes with, `redrafter::MatMulInt4` when the native library is built).
Ours runs through `OnnxRuntime.verify` (IO binding, native TreeAttention kernel); genai's graph
through a plain IO binding with its KV cache shared in place as genai does it (past and present
bound to one buffer of --max-length rows, `GroupQueryAttention` reading the mask's length).

--baseline times another bundle of the same model in the same blocks (e.g. one exported by an
older redrafter, to measure an exporter change).

--ablate adds timing-only variants of our graph with parts cut out, to bound what fusing them
could save: `rotary` feeds q and k to TreeAttention unrotated (bundles of TreeAttention version 1
only: version 2 rotates inside the op), `rmsnorm` skips every RMSNorm's normalisation (x times
its weight), `both` does both. Their outputs are wrong by design; they
are timed, never used. `rmsnorm-div` is no cut: it rewrites an older bundle's RMSNorm into the
x / Sqrt form that ONNX Runtime fuses (the form the exporter now writes).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from statistics import median
from typing import Any

import numpy as np

from benchmarks._common import (
    idle_report,
    machine,
    peers_dir,
    save,
    time_alternating,
    verify_call,
)


def ours_step(
    bundle: Path, threads: int, context: int, profile: str | None, graph: Path | None = None
) -> tuple[Callable[[], Any], Any]:
    """A one-token verify at `context` past tokens on our runtime. `graph` replaces the
    bundle's base graph (an `ablated` copy); `profile` (a file prefix) turns ORT's profiler on.
    Returns (step function, base session)."""

    from redrafter import ops
    from redrafter.runtimes import onnxruntime as ours

    runtime = ours.OnnxRuntime(bundle, threads=threads)
    if profile or graph:  # the base session again: the runtime's options, plus these
        library = ops.library_path() if runtime.implementation == "native" else None
        options = ours.session_options(threads, library, spin=True)
        if profile:
            options.enable_profiling = True
            options.profile_file_prefix = profile
        path = Path(graph or bundle / "onnx" / "base.onnx")
        # the runtime's own session maker: an int4 bundle gets the same kernel it decodes with
        runtime.base = runtime._session(path, options, ["CPUExecutionProvider"])
    return verify_call(runtime, 1, context), runtime.base


def ablated(bundle: Path, cut: set[str], folder: Path) -> Path:
    """A copy of our base graph with `cut` ("rotary", "rmsnorm") bypassed, in `folder` beside
    the bundle's weights (a hard link, else a copy; timing only: the outputs are wrong)."""
    import onnx

    src = bundle / "onnx" / "base.onnx"
    model = onnx.load(str(src), load_external_data=False)
    made_by = {o: n for n in model.graph.node for o in n.output}
    weights = {i.name for i in model.graph.initializer}
    for node in model.graph.node:
        if "rotary" in cut and node.op_type == "TreeAttention" and len(node.input) == 7:
            for i in (0, 1):  # q, k: Add(Mul(x, cos), Mul(rotate_half(x), sin)) -> x
                add = made_by[node.input[i]]
                node.input[i] = made_by[add.input[0]].input[0]
        if "rmsnorm-div" in cut and node.op_type == "Mul":  # x * (1 / s) -> x / s: what the
            recip = made_by.get(node.input[1])  # exporter now writes, for older bundles
            if recip is not None and recip.op_type == "Reciprocal":
                node.op_type = "Div"
                node.input[1] = recip.input[0]
        if "rmsnorm" in cut and node.op_type == "Mul" and node.input[0] in weights:
            # w * (x * rsqrt(mean(x^2) + eps)), or w * (x / sqrt(...)) as exported now -> w * x
            scaled = made_by.get(node.input[1])
            if scaled is not None and scaled.op_type in ("Mul", "Div"):
                norm = made_by.get(scaled.input[1])
                if norm is not None and norm.op_type in ("Reciprocal", "Sqrt"):
                    node.input[1] = scaled.input[0]
    outputs = {o.name for o in model.graph.output}
    while True:  # drop the bypassed nodes (ORT would run them: their outputs are not graph outputs)
        used = {i for n in model.graph.node for i in n.input} | outputs
        dead = [n for n in model.graph.node if not any(o in used for o in n.output)]
        if not dead:
            break
        for n in dead:
            model.graph.node.remove(n)
    folder.mkdir(parents=True, exist_ok=True)
    for f in (bundle / "onnx").iterdir():
        if f.suffix != ".onnx":  # ORT refuses external data reached through a symlink
            try:
                os.link(f, folder / f.name)
            except OSError:  # another filesystem
                shutil.copyfile(f, folder / f.name)
    onnx.save(model, str(folder / "base.onnx"))
    return folder / "base.onnx"


def genai_step(
    model: Path, threads: int, context: int, max_length: int, profile: str | None
) -> tuple[Callable[[], Any], Any]:
    """genai's graph for one new token after `context` cached ones (cache contents do not
    change the time), KV buffers shared in place."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    if profile:
        options.enable_profiling = True
        options.profile_file_prefix = profile
    sess = ort.InferenceSession(str(model / "model.onnx"), options, ["CPUExecutionProvider"])
    config = json.loads((model / "genai_config.json").read_text())["model"]["decoder"]
    layers, kv, head = (
        config["num_hidden_layers"],
        config["num_key_value_heads"],
        config["head_size"],
    )
    io = sess.io_binding()
    caches = [np.zeros((1, kv, max_length, head), np.float32) for _ in range(2 * layers)]
    values = [ort.OrtValue.ortvalue_from_numpy(c) for c in caches]
    for i in range(layers):
        for j, kind in enumerate(("key", "value")):
            v = values[2 * i + j]
            io.bind_ortvalue_input(f"past_key_values.{i}.{kind}", v)
            io.bind_ortvalue_output(f"present.{i}.{kind}", v)
    io.bind_cpu_input("input_ids", np.array([[42]], np.int64))
    io.bind_cpu_input("attention_mask", np.ones((1, context + 1), np.int64))

    def step() -> Any:
        io.bind_output("logits", "cpu")
        sess.run_with_iobinding(io)
        return io.get_outputs()[0].numpy()

    return step, sess


def op_times(profile_file: str, last_runs: int) -> dict[str, float]:
    """ms per call by op type over the profile's last `last_runs` runs (the warm-up and, for
    ours, the prefill come before them), from every node's kernel time."""
    import bisect

    events = json.loads(Path(profile_file).read_text())
    runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("name") == "model_run")
    windows = runs[-last_runs:]
    starts = [w[0] for w in windows]
    total: dict[str, float] = collections.defaultdict(float)
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        i = bisect.bisect_right(starts, e["ts"]) - 1
        if i >= 0 and e["ts"] <= windows[i][1]:
            total[e["args"]["op_name"]] += e["dur"] / 1000
    return dict(sorted(((k, v / len(windows)) for k, v in total.items()), key=lambda kv: -kv[1]))


def main() -> None:
    """Time ours vs genai's one-token graph (and variants) in blocks, then profile both."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", required=True, help="our bundle (benchmarks.peers', any beam)")
    ap.add_argument("--genai-model", help="genai fp32 folder [benchmarks.peers']")
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--max-length", type=int, default=1024, help="genai's shared KV buffer rows")
    ap.add_argument("--calls", type=int, default=200, help="timed calls per graph")
    ap.add_argument("--block", type=int, default=20, help="calls per alternating block")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--ablate",
        default="",
        help="timing-only variants of our graph: rotary, rmsnorm, both, rmsnorm-div (comma list)",
    )
    ap.add_argument("--baseline", help="another bundle to time alongside (an older export)")
    ap.add_argument("--name", default="graph_profile")
    args = ap.parse_args()
    genai = Path(args.genai_model) if args.genai_model else peers_dir() / "models" / "genai-fp32"
    bundle = Path(args.bundle)
    idle = idle_report(2.0)
    steps = {
        "ours": ours_step(bundle, args.threads, args.context, None)[0],
        "genai": genai_step(genai, args.threads, args.context, args.max_length, None)[0],
    }
    if args.baseline:
        steps["ours (baseline bundle)"] = ours_step(
            Path(args.baseline), args.threads, args.context, None
        )[0]
    scratch = tempfile.TemporaryDirectory()
    cuts = {  # variant -> (what is cut, label)
        "rotary": ({"rotary"}, "ours without rotary"),
        "rmsnorm": ({"rmsnorm"}, "ours without RMSNorm"),
        "both": ({"rotary", "rmsnorm"}, "ours without either"),
        # Not a cut: the same values, in the form ORT fuses (export_base writes it since
        # 2026-11-30; this variant shows the difference on bundles exported before).
        "rmsnorm-div": ({"rmsnorm-div"}, "ours, RMSNorm as Div"),
    }
    for variant in [v for v in args.ablate.split(",") if v]:
        if variant not in cuts:
            raise SystemExit(f"error: --ablate {variant!r}: choose from {', '.join(cuts)}")
        cut, label = cuts[variant]
        graph = ablated(bundle, cut, Path(scratch.name) / variant)
        steps[label] = ours_step(bundle, args.threads, args.context, None, graph)[0]
    ms = time_alternating(steps, args.calls // args.block, args.block)
    del steps
    scratch.cleanup()
    print(f"one token at context {args.context}, {args.threads} threads, blocks of {args.block}:")
    for name, v in ms.items():
        print(f"  {name}: {median(v):.2f} ms median block ({min(v):.2f} best)")

    profiles: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        makers = {
            "ours": lambda p: ours_step(Path(args.bundle), args.threads, args.context, p),
            "genai": lambda p: genai_step(genai, args.threads, args.context, args.max_length, p),
        }
        for name, make in makers.items():
            step, sess = make(str(Path(tmp) / name))
            for _ in range(10):
                step()
            n = args.calls // 2
            for _ in range(n):
                step()
            profiles[name] = op_times(sess.end_profiling(), n)
            del step, sess
    print("\nms per call by op type (ORT profiler, kernel time):")
    ours, theirs = profiles["ours"], profiles["genai"]
    names = sorted(set(ours) | set(theirs), key=lambda k: -max(ours.get(k, 0), theirs.get(k, 0)))
    print("| op | ours | genai |\n|---|---|---|")
    for k in names:
        a, b = profiles["ours"].get(k), profiles["genai"].get(k)
        print(f"| {k} | {'' if a is None else f'{a:.3f}'} | {'' if b is None else f'{b:.3f}'} |")
    print(
        f"| total | {sum(profiles['ours'].values()):.2f} | {sum(profiles['genai'].values()):.2f} |"
    )
    save(
        args.name,
        {
            "machine": {**machine(), "idle_before": idle},
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "context": args.context,
            "threads": args.threads,
            "ablate": args.ablate,
            "baseline": args.baseline,
            "block_ms": ms,
            "median_ms": {k: median(v) for k, v in ms.items()},
            "profile_ms_per_call": profiles,
        },
    )


if __name__ == "__main__":
    main()
