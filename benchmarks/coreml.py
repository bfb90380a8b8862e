"""The demo model through the Core ML path (issue 6): export SmolLM2-135M-Instruct with a random
drafter to Core ML (float16, the default, and float32), record conversion time and package
sizes, inspect the saved programs (states, SDPA ops, the conversion traps), and check tensor
and token parity of the converted programs through the MIL evaluator (`coreml-mil`).

This checks the converted programs, not Apple's runtime or the Neural Engine (no macOS here).

    .venv/bin/python -m benchmarks.coreml [--out DIR] [--dtypes float16,float32]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections import Counter
from pathlib import Path

from benchmarks._common import machine, save
from redrafter.build import ExportOptions, export_bundle
from redrafter.coremltools_support import import_coremltools
from redrafter.demo import find_demo_gguf
from redrafter.models.checkpoints import init_drafter, load_base, save_drafter
from redrafter.models.tokenizer import load_tokenizer
from redrafter.pipeline import reference_runtime
from redrafter.runtimes.coreml_mil import CoreMLMilRuntime, MilProgram
from redrafter.validate.report import validate_bundle

PROMPTS = ("What is the capital of France?", "Explain what a compiler does.")


def package_mb(path: Path) -> float:
    """Megabytes of every file under a Core ML package."""
    return round(sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6, 1)


def program_facts(path: Path) -> dict:
    """What the saved base program holds: op counts that matter, and the traps' markers."""
    program = MilProgram.from_package(path)
    ops = Counter(op.op_type for op in program.ops)
    rsqrt_eps = [float(op.epsilon.val) for op in program.ops if op.op_type == "rsqrt"]
    return {
        "states": len(program.state_names),
        "operations": sum(ops.values()) - ops["const"],
        "scaled_dot_product_attention": ops["scaled_dot_product_attention"],
        "read_state": ops["read_state"],
        "coreml_update_state": ops["coreml_update_state"],
        "slice_update": ops["slice_update"],
        "inverse": ops["inverse"],
        "rsqrt_epsilon_max": max(rsqrt_eps) if rsqrt_eps else None,
    }


def main() -> None:
    """Export to Core ML per dtype, inspect the programs, validate through the MIL evaluator."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="where to write the bundles [a temp dir]")
    parser.add_argument("--dtypes", default="float16,float32")
    parser.add_argument("--max-new-tokens", type=int, default=12)
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="coreml-demo-"))
    out.mkdir(parents=True, exist_ok=True)
    ct = import_coremltools()
    info = {**machine(), "coremltools": ct.__version__}
    gguf = find_demo_gguf()
    base = load_base(gguf)
    tokenizer = load_tokenizer(gguf)
    drafter_dir = out / "random-drafter"
    if not drafter_dir.exists():
        save_drafter(init_drafter(base.config, seed=0), drafter_dir)
    prompts = [tokenizer.encode(tokenizer.chat_prompt(p)) for p in PROMPTS]
    result: dict = {"machine": info, "model": gguf.name, "prompts": list(PROMPTS)}
    for dtype in args.dtypes.split(","):
        start = time.perf_counter()
        bundle = export_bundle(
            gguf,
            out / f"bundle-{dtype}",
            drafter_path=drafter_dir,
            options=ExportOptions(targets=("coreml",), coreml_dtype=dtype),
            overwrite=True,
            progress=lambda m: print(f"  {m}", flush=True),
        )
        export_seconds = time.perf_counter() - start
        record = bundle.manifest.coreml
        assert record is not None
        runtime = CoreMLMilRuntime(bundle)
        t = time.perf_counter()
        report = validate_bundle(
            bundle,
            candidate=runtime,
            reference=reference_runtime(bundle),
            prompts=prompts,
            max_new_tokens=args.max_new_tokens,
            eos_token_ids=base.config.eos_token_ids,
        )
        result[dtype] = {
            "export_seconds_total": round(export_seconds, 1),
            "convert_seconds": record.seconds,
            "package_mb": {
                name: package_mb(bundle.path(rel)) for name, rel in record.files.items()
            },
            "capacity": record.capacity,
            "max_tokens": record.max_tokens,
            "state_split": record.state_split,
            "export_time_parity": None if record.parity is None else record.parity.to_dict(),
            "base_program": program_facts(bundle.path(record.files["base"])),
            "validate_seconds": round(time.perf_counter() - t, 1),
            "report": report.to_dict(),
        }
        print(report.table(), flush=True)
        facts = result[dtype]["base_program"]
        print(f"{dtype}: {result[dtype]['package_mb']} MB, convert {record.seconds} s, {facts}")
    save("coreml", result)


if __name__ == "__main__":
    main()
