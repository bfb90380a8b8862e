"""Tokens/step of trained drafters on held-out prompts, greedy, for a grid of beam shapes, with
the real decode driver on the torch runtime (the numbers of benchmarks/RESULTS.md).

    .venv/bin/python -m benchmarks.acceptance DRAFTER [DRAFTER ...] [--widths 1,2,4,8]
        [--lengths 3,4,5] [--prompts 24] [--max-new-tokens 64]
        [--runtime torch|onnxruntime] [--device cpu|cuda] [--prompt-lookup off|on|both]
        [--quantize none|int4|int8] [--quantize-method rtn|hqq|gguf]

Prompts come from held-out Jargon File entries and HumanEval tasks
(`redrafter.demo.heldout_prompts`), never trained on. Greedy fp32 decoding emits the same
tokens on every runtime, so tokens/step does not depend on it: `--runtime onnxruntime` (one
exported bundle per drafter, holding a drafter graph per beam shape) is just the fastest way on
a CPU, `--device cuda` on a GPU. `--prompt-lookup` (onnxruntime only) adds the prompt-lookup
beam (`decoding/lookup.py`): keys `W4L5+lookup`. `--quantize int4` (onnxruntime only) measures
on the int4 bundle instead, whose greedy answers are the int4 model's (issue 22 item 3).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks._common import machine, save
from redrafter.bench.harness import PROMPT_LOOKUP_SETTINGS
from redrafter.bench.prompts import encode_prompts
from redrafter.config import BeamShape
from redrafter.decoding import DecodeOptions, decode
from redrafter.demo import find_demo_gguf, find_shared_data, heldout_prompts
from redrafter.errors import RedrafterError
from redrafter.models.checkpoints import load_base, load_drafter
from redrafter.models.tokenizer import load_tokenizer
from redrafter.train.evaluate import tokens_per_step


def grid(
    base: Any,
    drafter: Any,
    prompts: list[list[int]],
    *,
    widths: list[int],
    lengths: list[int],
    max_new_tokens: int,
    eos: tuple[int, ...],
    batch_size: int = 1,
    runtime: Any = None,
    lookups: tuple[bool, ...] = (False,),
) -> dict[str, float]:
    """tokens/step for every (W, L): {"W4L5": 2.9, ...}; on `runtime` (an ONNX Runtime
    runtime of a bundle with every shape) if given, else on the torch runtime."""
    out = {}
    for L in lengths:
        for W, lookup in [(w, k) for w in widths for k in lookups]:
            t = time.perf_counter()
            if runtime is not None:
                r = _runtime_tokens_per_step(
                    runtime, prompts, BeamShape(W, L), max_new_tokens, eos, lookup
                )
            else:
                assert not lookup, "--prompt-lookup needs --runtime onnxruntime"
                r = tokens_per_step(
                    base,
                    drafter,
                    prompts,
                    beam=BeamShape(W, L),
                    max_new_tokens=max_new_tokens,
                    eos_token_ids=eos,
                    batch_size=batch_size,
                )
            out[f"W{W}L{L}" + ("+lookup" if lookup else "")] = round(r["tokens_per_step"], 3)
            print(
                f"  W={W} L={L}{' +lookup' if lookup else ''}: "
                f"{r['tokens_per_step']:.2f} tokens/step "
                f"({time.perf_counter() - t:.1f} s)",
                flush=True,
            )
    return out


def _runtime_tokens_per_step(
    runtime: Any,
    prompts: list[list[int]],
    beam: BeamShape,
    max_new_tokens: int,
    eos: tuple[int, ...],
    lookup: bool = False,
) -> dict[str, float]:
    """Greedy speculative decoding on `runtime`, one prompt per decode (see
    `tokens_per_step`): tokens emitted per decode step, the prefill's token excluded."""
    options = DecodeOptions(max_new_tokens=max_new_tokens, beam=beam, prompt_lookup=lookup)
    emitted = row_steps = 0
    for prompt in prompts:
        for step in decode(runtime, [prompt], options, eos_token_ids=eos):
            if step.kind != "prefill" and step.new_tokens[0]:
                emitted += len(step.new_tokens[0])
                row_steps += 1
    return {"tokens_per_step": emitted / max(row_steps, 1)}


def ort_runtime(
    gguf: Path,
    drafter: str,
    beams: list[BeamShape],
    threads: int,
    quantize: str = "none",
    method: str = "rtn",
) -> Any:
    """An ONNX Runtime runtime for base + drafter with a drafter graph per beam shape, its
    weights quantized as `quantize` and `method` say ('none', 'int4', 'int8'; 'rtn', 'hqq',
    'gguf': `export --quantize`'s defaults otherwise); the bundle is exported once into the
    cache (<cache>/acceptance/), keyed by the drafter's path, never into the drafter's folder
    (the shipped drafters live inside the package)."""
    import hashlib

    from redrafter.build import ExportOptions, export_bundle
    from redrafter.bundle import load_bundle
    from redrafter.export.quantize import quantization
    from redrafter.runtimes.onnxruntime import OnnxRuntime
    from redrafter.train.recipe import default_cache_dir

    tag = "_".join(f"{b.width}x{b.length}" for b in beams)
    tag += "" if quantize == "none" else f"-{quantize}" + ("" if method == "rtn" else f"-{method}")
    key = hashlib.blake2b(str(Path(drafter).resolve()).encode(), digest_size=4).hexdigest()
    out = default_cache_dir() / "acceptance" / f"{Path(drafter).name}-{key}-bundle-{tag}"
    try:
        bundle = load_bundle(out)
    except RedrafterError:
        q = None if quantize == "none" else quantization(quantize, method=method)
        options = ExportOptions(beam=beams[0], extra_beams=tuple(beams[1:]), quantization=q)
        bundle = export_bundle(gguf, out, drafter_path=drafter, options=options, overwrite=True)
    return OnnxRuntime(bundle, threads=threads)


def main() -> None:
    """Tokens/step of each drafter over the W x L grid; saves results/<--name>.json."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("drafters", nargs="+")
    ap.add_argument("--widths", default="1,2,4,8")
    ap.add_argument("--lengths", default="3,4,5")
    ap.add_argument("--prompts", type=int, default=24)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--runtime", choices=["torch", "onnxruntime"], default="torch")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--data-dir",
        help="the demo's shared data folder [$REDRAFTER_SHARED_DATA or ../shared/data]",
    )
    ap.add_argument("--name", default="acceptance")
    ap.add_argument("--prompt-lookup", choices=["off", "on", "both"], default="off")
    ap.add_argument(
        "--quantize",
        choices=["none", "int4", "int8"],
        default="none",
        help="with --runtime onnxruntime: the bundles' weights (a quantized base answers "
        "otherwise than fp32, so its tokens/step differs) [none]",
    )
    ap.add_argument(
        "--quantize-method",
        choices=["rtn", "hqq", "gguf"],
        default="rtn",
        help="with --quantize: how (gguf: keep the demo GGUF's own Q4_1 blocks) [rtn]",
    )
    args = ap.parse_args()
    if args.quantize != "none" and args.runtime != "onnxruntime":
        ap.error("--quantize needs --runtime onnxruntime")
    torch.set_num_threads(args.threads)
    info = machine()
    gguf = find_demo_gguf()
    base, tokenizer = load_base(gguf).to(args.device), load_tokenizer(gguf)
    data = find_shared_data(args.data_dir)
    prompts = encode_prompts(tokenizer, heldout_prompts(data, count=args.prompts))
    widths = [int(w) for w in args.widths.split(",")]
    lengths = [int(n) for n in args.lengths.split(",")]
    results = {}
    for path in args.drafters:
        print(f"{path}:", flush=True)
        drafter = load_drafter(path)
        runtime = None
        if args.runtime == "onnxruntime":
            shapes = [BeamShape(w, n) for n in lengths for w in widths]
            runtime = ort_runtime(
                gguf, path, shapes, args.threads, args.quantize, args.quantize_method
            )
        results[path] = grid(
            base,
            drafter,
            prompts,
            widths=widths,
            lengths=lengths,
            max_new_tokens=args.max_new_tokens,
            eos=base.config.eos_token_ids,
            runtime=runtime,
            lookups=PROMPT_LOOKUP_SETTINGS[args.prompt_lookup],
        )
    payload = {
        "machine": info,
        "device": args.device,
        "runtime": args.runtime,
        "prompts": args.prompts,
        "max_new_tokens": args.max_new_tokens,
        "prompt_lookup": args.prompt_lookup,
        "quantize": args.quantize,
        "quantize_method": args.quantize_method,
        "tokens_per_step": results,
    }
    save(args.name, payload)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
