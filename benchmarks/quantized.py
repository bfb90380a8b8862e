"""Quantized bundles of the demo model side by side (issue 22): size on disk, drift against
the fp32 reference, whether a tree verification agrees with one-token steps (what lossless
speculation needs), and the cost of verifying 1 and 6 tokens, for each export variant.

    .venv/bin/python -m benchmarks.quantized [--variants fp32,int4,int4-hqq,int4-gguf,...]

Drift (`redrafter.validate.drift`): teacher-forced over `--texts` x `--text-tokens` tokens of
Jargon File prose against the torch fp32 reference (the Q4_1 GGUF dequantized). Chain vs step:
the logits of one text verified as chains of up to 64 tokens and decoded one token at a time,
on the same bundle. Timing: `verify_call` blocks interleaved across variants
(`time_alternating`), one token and six chained tokens after a 300-token context. Results in
benchmarks/results/quantized.json.
"""

from __future__ import annotations

import argparse
import statistics
from typing import Any

import numpy as np

from benchmarks._common import (
    demo_bundle,
    idle_report,
    machine,
    save,
    time_alternating,
    verify_call,
)

# int4-ort: the int4 bundle run with ONNX Runtime's MatMulNBits instead of the native library's
# redrafter::MatMulInt4 (which every int4 variant with blocks of 32 gets when the library is built)
# int4-gguf: the demo GGUF's own Q4_1 blocks kept (`--quantize-method gguf`), its Q8_0 head by RTN
VARIANTS = ("fp32", "int4", "int4-acc4", "int8", "int4-hqq", "int4-ort", "int4-gguf")


def variant(name: str) -> Any:
    """The quantization of a variant name (None: fp32)."""
    from redrafter.export.quantize import quantization

    return {
        "fp32": None,
        "int4": quantization("int4"),
        "int4-ort": quantization("int4"),
        "int4-acc4": quantization("int4", accuracy_level=4),
        "int8": quantization("int8"),
        "int4-hqq": quantization("int4", method="hqq"),
        "int4-gguf": quantization("int4", method="gguf"),
    }[name]


def step_logits(runtime: Any, tokens: list[int]) -> np.ndarray:
    """The runtime's next-token logits (T, V) decoding `tokens` one verify call per token."""
    ids = np.asarray(tokens, np.int64)
    runtime.reset(batch=1, capacity=len(ids) + 1)
    first, _ = runtime.prefill(ids[None, :1], np.array([1]))  # (1, V)
    rows = [first[0]]
    for i in range(1, len(ids)):
        logits, _ = runtime.verify(
            ids[None, i : i + 1], np.array([[i]]), np.ones((1, 1, 1), bool), np.array([i])
        )  # (1, 1, V)
        rows.append(logits[0, 0])
    return np.stack(rows)


def drift_texts(count: int, length: int) -> list[list[int]]:
    """`count` spans of `length` tokens of Jargon File prose (entries 500 on)."""
    from redrafter.demo import find_demo_gguf
    from redrafter.demo.data import find_shared_data, jargon_entries
    from redrafter.models.tokenizer import load_tokenizer

    entries = jargon_entries(find_shared_data())
    text = "\n\n".join(e["text"] for e in entries[500:700])
    ids = load_tokenizer(find_demo_gguf()).encode(text)
    return [ids[i * length : (i + 1) * length] for i in range(count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default=",".join(VARIANTS[:4]))
    parser.add_argument("--texts", type=int, default=4)
    parser.add_argument("--text-tokens", type=int, default=256)
    parser.add_argument("--blocks", type=int, default=5, help="timing rounds")
    parser.add_argument("--block", type=int, default=20, help="calls per timing block")
    parser.add_argument(
        "--verify-tokens", default="1,6", help="comma list of chained tokens per timed verify"
    )
    parser.add_argument(
        "--timing-only", action="store_true", help="skip drift and chain-vs-step (fast)"
    )
    parser.add_argument("--name", default="quantized", help="results file name [quantized]")
    args = parser.parse_args()
    from redrafter.bundle import load_bundle
    from redrafter.demo import find_demo_gguf
    from redrafter.models.checkpoints import load_base
    from redrafter.runtimes.onnxruntime import OnnxRuntime
    from redrafter.runtimes.torch import TorchRuntime
    from redrafter.validate.drift import measure_drift, next_token_logits

    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        parser.error(f"--variants: unknown {unknown}; choose from {', '.join(VARIANTS)}")
    bundles = {n: load_bundle(demo_bundle(None, quantization=variant(n))) for n in names}
    texts = drift_texts(args.texts, args.text_tokens)
    reference = TorchRuntime(load_base(find_demo_gguf()), None)
    results: dict[str, dict[str, Any]] = {}
    runtimes = {
        n: OnnxRuntime(b, int4_kernel=False if n.endswith("-ort") else None)
        for n, b in bundles.items()
    }
    for n, rt in runtimes.items():
        results[n] = {"size_mb": round(bundles[n].manifest.total_bytes / 1e6, 1), "int4": rt.int4}
        if args.timing_only:
            continue
        drift = measure_drift(rt, reference, texts, precision=bundles[n].precision)
        chain = next_token_logits(rt, texts[0][:61])  # (61, V)
        steps = step_logits(rt, texts[0][:61])  # (61, V)
        results[n] |= {
            "drift_top1": round(drift.top1, 4),
            "drift_mean_kl": round(drift.mean_kl, 4),
            "drift_positions": drift.positions,
            "chain_vs_step_max_abs": float(np.abs(chain - steps).max()),
            "chain_vs_step_argmax": float((chain.argmax(-1) == steps.argmax(-1)).mean()),
        }
        print(n, results[n], flush=True)
    idle = idle_report(3.0)
    sizes = [int(t) for t in args.verify_tokens.split(",") if t.strip()]
    calls = {f"{n} N={k}": verify_call(rt, k, 300) for n, rt in runtimes.items() for k in sizes}
    ms = time_alternating(calls, args.blocks, args.block)
    for n in runtimes:
        for k in sizes:
            results[n][f"verify_ms_n{k}"] = round(statistics.median(ms[f"{n} N={k}"]), 2)
        for k in sizes[1:]:  # each size against one token: what a tree of k tokens costs
            results[n][f"verify{k}_over_verify1"] = round(
                results[n][f"verify_ms_n{k}"] / results[n]["verify_ms_n1"], 2
            )
    if args.timing_only:
        for n, r in results.items():
            print(n, {k: v for k, v in r.items() if k.startswith("verify")})
        save(
            args.name,
            {"machine": machine(), "idle_before_timing": idle, **vars(args), "results": results},
        )
        return
    print(
        "\n| variant | size MB | top-1 | mean KL | chain vs step argmax | verify 1 tok ms | "
        "verify 6 tok ms | 6/1 |\n|---|---|---|---|---|---|---|---|"
    )
    for n, r in results.items():
        print(
            f"| {n} | {r['size_mb']} | {r['drift_top1']:.3f} | {r['drift_mean_kl']:.3f} | "
            f"{r['chain_vs_step_argmax']:.3f} | {r['verify_ms_n1']} | {r['verify_ms_n6']} | "
            f"{r.get('verify6_over_verify1')} |"
        )
    save(
        args.name,
        {"machine": machine(), "idle_before_timing": idle, **vars(args), "results": results},
    )


if __name__ == "__main__":
    main()
