"""Speculative vs autoregressive decoding of the demo model on a GPU (issue 8): the script a
session with the lent GPU machine runs and records.

What it runs, in order of preference:
  1. ONNX Runtime CUDA, fp16, native TreeAttention kernel (the goal: speculative >= 3.0x
     autoregressive) -- only where `onnxruntime` has the CUDAExecutionProvider, i.e. where
     onnxruntime-gpu is installed. The lent machine has CPU-only onnxruntime (and the GPU wheel
     is too large to carry), so there this step is reported as unavailable, with the reason;
  2. what CAN run there: the torch reference runtime on CUDA (`TorchRuntime(device="cuda")`),
     fp32 and fp16 (`TorchRuntime(dtype=...)`).
Each configuration goes through `redrafter.bench.harness.run_configs`: autoregressive and every
beam shape on the same prompts, interleaved, after a warm-up, median of --repeats.

The machine reaches no network and receives at most 64 MiB per call, so the model (a 98 MB
GGUF), the drafter and the pure-Python `gguf` package travel in parts, over consecutive calls
while the machine stays warm (ignored files carried by one call stay there for the next):

    # here, once (main venv): split the files into .gpu-carry/ (ignored by git)
    .venv/bin/python -m benchmarks.gpu --pack [--drafter DIR]
    # then, on the device, the commands --pack prints (one per part; the last one runs)

The project is not installed there: the last command runs `python3 -m benchmarks.gpu --run`
from the repository root, where `python -m` puts the checkout on the import path, so
`redrafter` and `benchmarks` import from it as they are.

Results: benchmarks/results/gpu.json (and $OUT/gpu.json when $OUT is set, so they come back).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks._common import add_tree_arguments, demo_bundle, prompt_ids, save

REPO = Path(__file__).resolve().parents[1]
CARRY = REPO / ".gpu-carry"
MiB = 2**20


def log(message: str) -> None:
    """Progress on stderr (stdout carries the tables)."""
    print(message, file=sys.stderr, flush=True)


def sha256(path: Path) -> str:
    """The SHA-256 of a file's bytes (hex)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(MiB), b""):
            h.update(chunk)
    return h.hexdigest()


# ============================================================================ packing (here)


def pack(drafter: Path | None, part_mb: int, jargon: int, code: int) -> None:
    """Split the GGUF (and the drafter's files) into parts of at most `part_mb` MiB under
    .gpu-carry/, copy the pure-Python `gguf` package beside them, write a manifest, and print
    the device commands. .gpu-carry/ is added to .git/info/exclude (local, never committed)."""
    import gguf

    from redrafter.demo import find_demo_gguf, heldout_shared_prompts

    exclude = REPO / ".git" / "info" / "exclude"
    if exclude.parent.is_dir() and "/.gpu-carry/" not in exclude.read_text(errors="replace"):
        with open(exclude, "a") as f:
            f.write("/.gpu-carry/\n")
    shutil.rmtree(CARRY, ignore_errors=True)
    CARRY.mkdir()
    shutil.copytree(Path(gguf.__file__).parent, CARRY / "pylib" / "gguf")
    files = [("model/" + find_demo_gguf().name, find_demo_gguf())]
    if drafter is not None:
        files += [(f"drafter/{p.name}", p) for p in sorted(drafter.iterdir()) if p.is_file()]
    manifest: dict[str, Any] = {"files": [], "parts": []}
    total_bytes = sum(path.stat().st_size for _, path in files)
    count = -(-total_bytes // (part_mb * MiB))
    limit = -(-total_bytes // count)  # even parts, each at most part_mb MiB
    part = None
    room = 0
    for rel, path in files:
        manifest["files"].append(
            {"path": rel, "bytes": path.stat().st_size, "sha256": sha256(path)}
        )
        with open(path, "rb") as src:
            while chunk := src.read(MiB):
                while chunk:
                    if room == 0:  # start the next part
                        if part is not None:
                            part.close()
                        manifest["parts"].append(f"part-{len(manifest['parts']):02d}")
                        part, room = open(CARRY / manifest["parts"][-1], "wb"), limit
                    part.write(chunk[:room])
                    chunk, room = chunk[room:], room - len(chunk[:room])
    if part is not None:
        part.close()
    prompts = heldout_shared_prompts(jargon, code)  # the demo's data does not travel
    manifest["prompts"] = [[p.text, p.chat] for p in prompts]
    (CARRY / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    total = sum(f["bytes"] for f in manifest["files"])
    print(
        f"packed {len(manifest['files'])} files ({total / MiB:.0f} MiB) into "
        f"{len(manifest['parts'])} parts under {CARRY}\n"
    )
    print("On the GPU machine, one `run` call per part, back to back (the machine must stay")
    print("warm in between; each call carries one part, earlier parts stay there):\n")
    for i, name in enumerate(manifest["parts"]):
        carry = [f".gpu-carry/{name}", ".gpu-carry/manifest.json"]
        last = i == len(manifest["parts"]) - 1
        if last:
            carry.append(".gpu-carry/pylib")
            cmd = (
                "PYTHONPATH=.gpu-carry/pylib PYTHONUNBUFFERED=1 python3 -m benchmarks.gpu --run "
                "2>&1 | tee $OUT/gpu.log"
            )
        else:
            cmd = f"ls -la .gpu-carry && echo part {name} is there"
        print(f"  call {i + 1}: carry={json.dumps(carry)}\n          command: {cmd}")


def unpack(work: Path) -> dict[str, Path]:
    """Reassemble the carried parts into `work`, checking sizes and sha256; {rel path: file}."""
    manifest = json.loads((CARRY / "manifest.json").read_text())
    missing = [p for p in manifest["parts"] if not (CARRY / p).is_file()]
    if missing:
        raise SystemExit(
            f"error: carried parts missing on this machine: {', '.join(missing)}. The machine "
            "went back between calls (or a call did not carry them): send every part again, "
            "back to back, as `python -m benchmarks.gpu --pack` printed"
        )
    out: dict[str, Path] = {}
    parts = iter(manifest["parts"])
    current = open(CARRY / next(parts), "rb")
    for entry in manifest["files"]:
        dest = work / entry["path"]
        dest.parent.mkdir(parents=True, exist_ok=True)
        remaining = entry["bytes"]
        with open(dest, "wb") as f:
            while remaining:
                chunk = current.read(min(MiB, remaining))
                if not chunk:
                    current.close()
                    current = open(CARRY / next(parts), "rb")
                    continue
                f.write(chunk)
                remaining -= len(chunk)
        if sha256(dest) != entry["sha256"]:
            raise SystemExit(f"error: {entry['path']} reassembled with a wrong checksum; re-pack")
        out[entry["path"]] = dest
    current.close()
    return out


# ============================================================================ the run (GPU machine)


def environment() -> dict[str, Any]:
    """What this machine has: GPU, torch/CUDA, onnxruntime and its providers, nvcc."""
    import numpy
    import torch

    env: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "numpy": numpy.__version__,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env["gpu"] = {
            "name": p.name,
            "memory_gib": round(p.total_memory / 2**30, 1),
            "multiprocessors": p.multi_processor_count,
        }
    try:
        import onnxruntime as ort

        env["onnxruntime"] = ort.__version__
        env["onnxruntime_providers"] = ort.get_available_providers()
    except ImportError as e:
        env["onnxruntime"] = f"not importable: {e}"
        env["onnxruntime_providers"] = []
    env["nvcc"] = shutil.which("nvcc") or (
        "/usr/local/cuda/bin/nvcc" if Path("/usr/local/cuda/bin/nvcc").exists() else None
    )
    try:
        smi = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        env["nvidia_smi"] = smi.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        env["nvidia_smi"] = None
    return env


def bench(
    runtime: Any,
    prompts: list[list[int]],
    beams: list[Any],
    args: argparse.Namespace,
    eos: tuple[int, ...],
    packing: str = "dedup",
) -> dict[str, Any]:
    """Autoregressive and every beam shape (with/without the lookup beam, per floor) on
    `runtime`: `run_configs` figures, plus peak CUDA memory and wall seconds."""
    import torch

    from redrafter.bench.harness import PROMPT_LOOKUP_SETTINGS, run_configs, speculative_grid

    cuda = torch.cuda.is_available() and args.device == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    spec = speculative_grid(
        beams,
        max_new_tokens=args.max_new_tokens,
        packing=packing,  # type: ignore[arg-type]
        prompt_lookup=PROMPT_LOOKUP_SETTINGS[args.prompt_lookup],
        min_draft_prob=args.min_draft_prob,
    )
    results = run_configs(
        runtime,
        prompts,
        spec,
        max_new_tokens=args.max_new_tokens,
        repeats=args.repeats,
        eos_token_ids=eos,
        on_run=lambda name: log(f"    {name}"),
    )
    if cuda:
        results["peak_cuda_memory_mb"] = round(torch.cuda.max_memory_allocated() / 1e6, 1)
    results["wall_s"] = round(time.perf_counter() - start, 1)
    return results


def table(results: dict[str, Any]) -> str:
    """The markdown table of one `bench` result."""
    from redrafter.bench.report import markdown_table

    return markdown_table({k: v for k, v in results.items() if isinstance(v, dict)})


def ort_cuda(
    args: argparse.Namespace,
    env: dict[str, Any],
    base_path: Path,
    drafter: Path | None,
    beams: list[Any],
    prompts: list[list[int]],
    eos: tuple[int, ...],
) -> dict[str, Any]:
    """ONNX Runtime CUDA, fp16 bundle, native kernel when the library is built (with CUDA)."""
    if args.device != "cuda":
        return {"available": False, "reason": f"--device {args.device}: smoke test, torch only"}
    if "CUDAExecutionProvider" in env["onnxruntime_providers"] and not env["cuda_available"]:
        return {
            "available": False,
            "reason": "onnxruntime lists CUDAExecutionProvider but there is no CUDA device",
        }
    if "CUDAExecutionProvider" not in env["onnxruntime_providers"]:
        return {
            "available": False,
            "reason": (
                f"onnxruntime {env['onnxruntime']} on this machine has providers "
                f"{env['onnxruntime_providers']}: no CUDAExecutionProvider (onnxruntime-gpu is "
                "not installed here, and its wheel is too large to carry), so ONNX Runtime "
                "CUDA cannot run; the torch runtime on CUDA below is what this machine can run"
            ),
        }
    from redrafter.bench.shapes import with_graphs
    from redrafter.ops import library_path as native_library
    from redrafter.runtimes.onnxruntime import OnnxRuntime

    bundle = (
        Path(args.bundle)
        if args.bundle
        else demo_bundle(drafter, beams, dtype="float16", base=base_path, log=log)
    )
    out: dict[str, Any] = {"available": True, "bundle": str(bundle)}
    library = native_library()
    impls = (["native"] if library is not None else []) + ["portable"]
    if library is None:
        out["native_note"] = "native library not built here (make ops needs ORT headers + nvcc)"
    for impl in impls:
        rt = OnnxRuntime(bundle, device="cuda", allow_fallback=True, native=impl == "native")
        if rt.device != "cuda":
            out[impl] = {"error": "ONNX Runtime fell back to the CPU provider"}
            continue
        usable, _ = with_graphs(beams, rt.bundle.drafter_graphs)
        log(f"  ORT CUDA {rt.implementation}: {len(usable)} beam shape(s)")
        out[impl] = bench(rt, prompts, usable, args, eos, packing=rt.bundle.packing)
        print(f"\nONNX Runtime CUDA fp16, {rt.implementation}:\n{table(out[impl])}")
    return out


def torch_cuda(
    args: argparse.Namespace,
    base_path: Path,
    drafter: Path | None,
    beams: list[Any],
    prompts: list[list[int]],
    eos: tuple[int, ...],
) -> dict[str, Any]:
    """The torch runtime on `args.device`, per dtype in --torch-dtypes (fp32, fp16)."""
    import torch

    from redrafter.models.checkpoints import load_base, load_drafter
    from redrafter.runtimes.torch import TorchRuntime

    out: dict[str, Any] = {}
    use = beams if drafter is not None else []
    for dtype_name in args.torch_dtypes.split(","):
        t = time.perf_counter()
        base = load_base(base_path)
        draft = load_drafter(drafter) if drafter is not None else None
        log(f"  torch CUDA {dtype_name}: loaded in {time.perf_counter() - t:.1f} s")
        try:
            rt = TorchRuntime(base, draft, device=args.device, dtype=dtype_name)
            out[dtype_name] = bench(rt, prompts, use, args, eos)
            print(f"\ntorch CUDA eager {dtype_name}:\n{table(out[dtype_name])}")
        except Exception as e:  # record and go on to the next dtype
            out[dtype_name] = {"error": f"{type(e).__name__}: {e}"}
            log(f"  torch CUDA {dtype_name} failed: {out[dtype_name]['error']}")
        del base, draft
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return out


def run(args: argparse.Namespace) -> None:
    """On the GPU machine: reassemble the carried files, then ORT CUDA (if it can run) and
    the torch runtime on CUDA; save the results (and copy them to $OUT)."""
    missing = []
    for module in ("torch", "numpy", "safetensors", "tokenizers", "gguf", "psutil"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise SystemExit(
            f"error: missing Python packages: {', '.join(missing)} (gguf travels in "
            ".gpu-carry/pylib: carry it and set PYTHONPATH=.gpu-carry/pylib)"
        )
    from redrafter.bench.shapes import parse_beams
    from redrafter.train.prompts import Prompt

    env = environment()
    log(json.dumps(env, indent=2))
    if not env["cuda_available"] and args.device == "cuda":
        raise SystemExit("error: torch sees no CUDA device here; run this on the GPU machine")
    work = Path(args.work)
    if args.base:
        base_path = Path(args.base)
        drafter = Path(args.drafter) if args.drafter else None
    elif (CARRY / "manifest.json").is_file():
        files = unpack(work)
        base_path = next(p for k, p in files.items() if k.startswith("model/"))
        drafter = (work / "drafter") if any(k.startswith("drafter/") for k in files) else None
        drafter = Path(args.drafter) if args.drafter else drafter
    else:
        from redrafter.demo import find_demo_gguf

        base_path = find_demo_gguf()
        drafter = Path(args.drafter) if args.drafter else None
    beams = parse_beams(args.beams)
    if (CARRY / "manifest.json").is_file() and not args.base:
        carried = json.loads((CARRY / "manifest.json").read_text())["prompts"]
        texts = [Prompt(text, chat=bool(chat)) for text, chat in carried]
        prompt_source = "heldout_shared_prompts, carried in .gpu-carry/manifest.json"
    else:
        from redrafter.demo import heldout_shared_prompts

        texts = heldout_shared_prompts(args.jargon, args.code)
        prompt_source = "heldout_shared_prompts"
    prompts, eos = prompt_ids(base_path, texts)
    payload: dict[str, Any] = {
        "environment": env,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "model": base_path.name,
        "drafter": str(drafter) if drafter else None,
        "drafter_note": None if drafter else "no drafter: autoregressive only",
        "prompts": len(prompts),
        "prompt_source": prompt_source,
        "max_new_tokens": args.max_new_tokens,
        "repeats": args.repeats,
        "beams": args.beams,
    }
    log("ONNX Runtime CUDA:")
    payload["onnxruntime_cuda"] = ort_cuda(args, env, base_path, drafter, beams, prompts, eos)
    if not payload["onnxruntime_cuda"]["available"]:
        print(f"\nONNX Runtime CUDA: UNAVAILABLE. {payload['onnxruntime_cuda']['reason']}")
    if not args.skip_torch:
        log("torch on CUDA:")
        payload["torch_cuda"] = torch_cuda(args, base_path, drafter, beams, prompts, eos)
    payload["summary"] = summarize(payload)
    for line in payload["summary"]:
        print(line)
    save(args.name, payload, also_to=Path(os.environ["OUT"]) if os.environ.get("OUT") else None)


def summarize(payload: dict[str, Any]) -> list[str]:
    """One line per runtime: autoregressive tok/s and the best beam shape's speed-up."""
    lines = ["", "summary (tok/s; speed-up of the best beam shape over autoregressive):"]
    sections = [
        ("ORT CUDA " + k, v) for k, v in payload["onnxruntime_cuda"].items() if isinstance(v, dict)
    ] + [("torch CUDA " + k, v) for k, v in payload.get("torch_cuda", {}).items()]
    for name, r in sections:
        if "error" in r:
            lines.append(f"  {name}: failed: {r['error']}")
            continue
        ar = r["autoregressive"]["tokens_per_second"]
        spec = [(k, v) for k, v in r.items() if isinstance(v, dict) and "beam_width" in v]
        if spec:
            k, v = max(spec, key=lambda kv: kv[1]["tokens_per_second"])
            lines.append(
                f"  {name}: AR {ar:.1f}, best {k} {v['tokens_per_second']:.1f} "
                f"({v['speedup']:.2f}x, {v['tokens_per_step']:.2f} tok/step)"
            )
        else:
            lines.append(f"  {name}: AR {ar:.1f} (no drafter)")
    return lines


def main() -> None:
    """--pack here, or --run on the GPU machine."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--pack",
        action="store_true",
        help="here: split model + drafter into .gpu-carry/ parts and print the device commands",
    )
    parser.add_argument("--part-mb", type=int, default=48, help="MiB per carried part [48]")
    parser.add_argument("--run", action="store_true", help="on the GPU machine: benchmark")
    parser.add_argument("--base", help="base model (default: from .gpu-carry, else the demo GGUF)")
    parser.add_argument("--drafter", help="drafter folder (default: from .gpu-carry)")
    parser.add_argument("--bundle", help="fp16 bundle for ORT CUDA (default: export one)")
    parser.add_argument("--beams", default="4x5,2x5", help="WxL list [4x5,2x5]")
    # On a GPU extra tree tokens are nearly free: pruning should matter less than on a CPU.
    add_tree_arguments(parser, lookup_default="both")
    parser.add_argument("--jargon", type=int, default=4)
    parser.add_argument("--code", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--torch-dtypes", default="float32,float16")
    parser.add_argument("--skip-torch", action="store_true")
    parser.add_argument("--work", default="/tmp/redrafter-gpu", help="where parts are reassembled")
    parser.add_argument("--name", default="gpu")
    parser.add_argument("--device", default="cuda", help="torch device; cpu only for a smoke test")
    args = parser.parse_args()
    if args.pack:
        if args.drafter:
            drafter = Path(args.drafter)
        else:
            from redrafter.demo import find_trained_drafter

            drafter = find_trained_drafter()
            log(f"drafter: {drafter or 'none found (autoregressive only); pass --drafter DIR'}")
        pack(drafter, args.part_mb, args.jargon, args.code)
    elif args.run:
        run(args)
    else:
        parser.error("choose --pack (here) or --run (on the GPU machine)")


if __name__ == "__main__":
    main()
