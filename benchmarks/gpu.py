"""ONNX Runtime CUDA end to end on a lent GPU machine (issue 19): install onnxruntime-gpu from
carried parts, build the op library with nvcc there, run the CUDA tests, validate fp32 and fp16
bundles on the CUDA provider (native kernel and portable body), benchmark autoregressive vs
speculative decoding, time the verify step against tree size N and context, measure the driver's
host overhead, and time the same step curve for randomly initialised Llama-shaped bases of 1B and
8B dimensions to predict their speed-up. One prepared script, smoke-tested here with --device cpu.

The GPU machine (Python 3.12, CUDA 13 torch, CPU-only onnxruntime, no network) receives at most
64 MiB per call, so what it lacks travels in checksummed parts over back-to-back calls while it
stays warm (ignored files a call carries stay there for the next):

  - onnxruntime-gpu 1.31.1 for cp312 (a 255 MB wheel; its CUDA provider needs libcublas.so.13,
    libcublasLt.so.13, libcudart.so.13 and libcurand.so.10, which the machine's torch CUDA wheels
    ship under site-packages/nvidia: `activate` preloads them so the provider resolves them);
  - the demo GGUF (98 MB), the pure-Python `gguf` package, ONNX Runtime's C API headers (for
    building the op library there).

    # here, once: fetch the wheel (pip download, no install), split everything into .gpu-carry/
    .venv/bin/python -m benchmarks.gpu --pack
    # on the device: the calls --pack prints, one per part, back to back; then
    python3 -m benchmarks.gpu --install          # reassemble, check, pip install --target
    python3 -m benchmarks.gpu --run              # every stage; results under $OUT

    # here: the same procedure end to end on the CPU provider (what the smoke test proves)
    .venv/bin/python -m benchmarks.gpu --install --device cpu
    .venv/bin/python -m benchmarks.gpu --run --device cpu --smoke

`--run` goes through the stages in --stages (default: all): ops, validate, bench, curve,
overhead, large. A failing stage is recorded with its error and the next one runs. The project is
not installed there: `python3 -m benchmarks.gpu` from the repository root puts the checkout on the
import path. Results: benchmarks/results/gpu.json (and $OUT/gpu.json, $OUT/gpu-*.log).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import glob
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks._common import prompt_ids, save

REPO = Path(__file__).resolve().parents[1]
CARRY = REPO / ".gpu-carry"
SITE = CARRY / "site"  # where --install puts onnxruntime-gpu
MiB = 2**20
WHEEL = "onnxruntime_gpu-1.31.1-{tag}-{tag}-manylinux_2_28_x86_64.whl"  # tag: cp312 there
WHEEL_SPEC = "onnxruntime-gpu==1.31.1"
WHEEL_CACHE = Path.home() / ".cache" / "redrafter" / "gpu-wheel"
# The CUDA provider's own needs (readelf -d libonnxruntime_providers_cuda.so, 1.31.1).
CUDA_LIBRARIES = ("libcudart.so.13", "libcublasLt.so.13", "libcublas.so.13", "libcurand.so.10")
STAGES = ("ops", "validate", "bench", "curve", "overhead", "large", "torch")
# Llama-shaped bases for the step-cost prediction (Llama 3.2 1B and Llama 3.1 8B dimensions).
LARGE = {
    "1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        tie_word_embeddings=True,
    ),
    "8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        tie_word_embeddings=False,
    ),
}
SMOKE_LARGE = {
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=8,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
        tie_word_embeddings=True,
    )
}


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


def find_wheel(python: str = "3.12") -> Path:
    """The onnxruntime-gpu wheel for CPython `python` (3.12 on the GPU machine; this machine's
    version for the smoke test): in the cache, else fetched there with `pip download` (no
    install: this environment's onnxruntime stays as it is)."""
    path = WHEEL_CACHE / WHEEL.format(tag="cp" + python.replace(".", ""))
    if path.is_file():
        return path
    WHEEL_CACHE.mkdir(parents=True, exist_ok=True)
    platforms = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux2014_x86_64"]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    cmd += ["--python-version", python, "--implementation", "cp"]
    for p in platforms:
        cmd += ["--platform", p]
    subprocess.run([*cmd, "-d", str(WHEEL_CACHE), WHEEL_SPEC], check=True)
    return path


def pack(part_mb: int, jargon: int, code: int, python: str = "3.12") -> dict[str, Any]:
    """Split the wheel and the demo GGUF into checksummed parts of at most `part_mb` MiB under
    .gpu-carry/, copy the `gguf` package and ORT's headers beside them, write the manifest and
    the device commands (CALLS.txt). .gpu-carry/ is listed in .git/info/exclude."""
    import gguf

    from redrafter.demo import find_demo_gguf, heldout_shared_prompts

    start = time.perf_counter()
    exclude = REPO / ".git" / "info" / "exclude"
    known = exclude.read_text(errors="replace") if exclude.is_file() else ""
    if exclude.parent.is_dir() and "/.gpu-carry/" not in known:
        with open(exclude, "a") as f:
            f.write("/.gpu-carry/\n")
    shutil.rmtree(CARRY, ignore_errors=True)
    CARRY.mkdir()
    shutil.copytree(Path(gguf.__file__).parent, CARRY / "pylib" / "gguf")
    headers = subprocess.run(
        [str(REPO / "custom_ops" / "fetch_ort_headers.sh")], capture_output=True, text=True
    )
    if headers.returncode == 0:
        shutil.copytree(headers.stdout.strip(), CARRY / "ort-include")
    wheel = find_wheel(python)
    files = [(f"wheel/{wheel.name}", wheel), (f"model/{find_demo_gguf().name}", find_demo_gguf())]
    manifest: dict[str, Any] = {"files": [], "parts": []}
    total = sum(path.stat().st_size for _, path in files)
    count = -(-total // (part_mb * MiB))
    limit = -(-total // count)  # even parts, each at most part_mb MiB
    part, room = None, 0
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
                        manifest["parts"].append({"name": f"part-{len(manifest['parts']):02d}"})
                        part, room = open(CARRY / manifest["parts"][-1]["name"], "wb"), limit
                    part.write(chunk[:room])
                    chunk, room = chunk[room:], room - len(chunk[:room])
    if part is not None:
        part.close()
    for entry in manifest["parts"]:
        entry["sha256"] = sha256(CARRY / entry["name"])
        entry["bytes"] = (CARRY / entry["name"]).stat().st_size
    prompts = heldout_shared_prompts(jargon, code)  # the demo's data does not travel
    manifest["prompts"] = [[p.text, p.chat] for p in prompts]
    manifest["pack_seconds"] = round(time.perf_counter() - start, 1)
    (CARRY / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    calls = device_calls(manifest)
    (CARRY / "CALLS.txt").write_text("\n".join(calls) + "\n")
    print(
        f"packed {len(files)} files ({total / MiB:.0f} MiB) into {len(manifest['parts'])} parts "
        f"of <= {limit / MiB:.1f} MiB under {CARRY} in {manifest['pack_seconds']} s\n"
    )
    print("\n".join(calls))
    return manifest


def device_calls(manifest: dict[str, Any]) -> list[str]:
    """The `run` calls that move the parts and run everything, back to back."""
    lines = ["On the GPU machine, one `run` call per line, back to back (it must stay warm):"]
    parts = [p["name"] for p in manifest["parts"]]
    for i, name in enumerate(parts):
        carry = [f".gpu-carry/{name}", ".gpu-carry/manifest.json"]
        if i == len(parts) - 1:
            carry += [".gpu-carry/pylib", ".gpu-carry/ort-include"]
            cmd = (
                "PYTHONUNBUFFERED=1 python3 -m benchmarks.gpu --install 2>&1 | tee $OUT/install.log"
            )
        else:
            cmd = f"ls -la .gpu-carry && echo {name} is there"
        lines.append(f"  call {i + 1}: carry={json.dumps(carry)} command: {cmd}")
    lines.append(
        f"  call {len(parts) + 1}: carry=[] command: PYTHONUNBUFFERED=1 python3 -m "
        "benchmarks.gpu --run --stages ops,validate,bench 2>&1 | tee $OUT/run1.log"
    )
    lines.append(
        f"  call {len(parts) + 2}: carry=[] command: PYTHONUNBUFFERED=1 python3 -m "
        "benchmarks.gpu --run --stages curve,overhead,large --name gpu2 2>&1 | tee $OUT/run2.log"
    )
    return lines


def unpack(work: Path) -> dict[str, Path]:
    """Reassemble the carried parts into `work`, checking every part's and file's size and
    sha256; {rel path: file}."""
    manifest = json.loads((CARRY / "manifest.json").read_text())
    names = [p["name"] for p in manifest["parts"]]
    missing = [p for p in names if not (CARRY / p).is_file()]
    if missing:
        raise SystemExit(
            f"error: carried parts missing on this machine: {', '.join(missing)}. The machine "
            "went back between calls (or a call did not carry them): send every part again, "
            "back to back, as `python -m benchmarks.gpu --pack` printed"
        )
    for p in manifest["parts"]:
        if (CARRY / p["name"]).stat().st_size != p["bytes"] or sha256(CARRY / p["name"]) != p[
            "sha256"
        ]:
            raise SystemExit(f"error: {p['name']} arrived damaged (size or sha256); carry it again")
    out: dict[str, Path] = {}
    parts = iter(names)
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


# ============================================================================ install (device)


def install(work: Path, device: str) -> dict[str, Any]:
    """Reassemble the parts and `pip install --no-index --no-deps --target .gpu-carry/site` the
    wheel; time each step. With --device cpu (the smoke test here) the wheel installs the same
    way, and `activate` finds whatever CUDA libraries this machine has (none here)."""
    timings: dict[str, Any] = {}
    t = time.perf_counter()
    files = unpack(work)
    timings["reassemble_and_check_s"] = round(time.perf_counter() - t, 1)
    wheel = next(p for k, p in files.items() if k.startswith("wheel/"))
    shutil.rmtree(SITE, ignore_errors=True)
    t = time.perf_counter()
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile"]
    subprocess.run([*cmd, "--no-cache-dir", "--target", str(SITE), str(wheel)], check=True)
    timings["pip_install_s"] = round(time.perf_counter() - t, 1)
    t = time.perf_counter()
    probe = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu", "--probe", "--device", device],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    timings["probe_s"] = round(time.perf_counter() - t, 1)
    result = {"timings": timings, "probe_rc": probe.returncode, "probe": probe.stdout[-4000:]}
    result["probe_stderr"] = probe.stderr[-4000:]
    (CARRY / "install.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result


def cuda_library_dirs() -> dict[str, str]:
    """Where this Python's packages keep each library in CUDA_LIBRARIES (the nvidia-* wheels
    torch depends on): {soname: file}; missing ones are absent."""
    found: dict[str, str] = {}
    roots = [p for p in sys.path if p.endswith("site-packages") and os.path.isdir(p)]
    for root in roots:
        for name in CUDA_LIBRARIES:
            if name not in found:
                hits = sorted(glob.glob(os.path.join(root, "nvidia", "**", name), recursive=True))
                if hits:
                    found[name] = hits[0]
    return found


def activate() -> dict[str, Any]:
    """Put the installed onnxruntime-gpu first on the import path (ahead of the machine's CPU
    onnxruntime), preload the CUDA libraries its provider needs (RTLD_GLOBAL, so its dlopen
    resolves them by soname), and export LD_LIBRARY_PATH / PYTHONPATH for child processes."""
    info: dict[str, Any] = {"site": str(SITE) if SITE.is_dir() else None}
    paths = [str(CARRY / "pylib")] + ([str(SITE)] if SITE.is_dir() else [])
    for p in reversed(paths):
        if p not in sys.path:
            sys.path.insert(0, p)
    libraries = cuda_library_dirs()
    info["cuda_libraries"] = libraries
    info["missing_cuda_libraries"] = [n for n in CUDA_LIBRARIES if n not in libraries]
    for name in CUDA_LIBRARIES:  # dependency order: cudart, then cublasLt before cublas
        if name in libraries:
            ctypes.CDLL(libraries[name], mode=ctypes.RTLD_GLOBAL)
    dirs = sorted({os.path.dirname(f) for f in libraries.values()})
    os.environ["LD_LIBRARY_PATH"] = os.pathsep.join(
        [*dirs, *filter(None, [os.environ.get("LD_LIBRARY_PATH")])]
    )
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(REPO), *paths, *filter(None, [os.environ.get("PYTHONPATH")])]
    )
    if (CARRY / "ort-include").is_dir():
        os.environ.setdefault("ORT_INCLUDE_DIR", str(CARRY / "ort-include"))
    import onnxruntime as ort

    info["onnxruntime"] = ort.__version__
    info["onnxruntime_file"] = ort.__file__
    info["providers"] = ort.get_available_providers()
    return info


def probe(device: str) -> None:
    """After install: does onnxruntime-gpu load, and does a one-node graph run on CUDA?"""
    info = activate()
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else None
    session = ort.InferenceSession(model.SerializeToString(), providers=providers)
    y = session.run(None, {"x": np.array([-1, 2, -3, 4], np.float32)})[0]
    info["session_providers"] = session.get_providers()
    info["relu_ok"] = bool((y == [0, 2, 0, 4]).all())
    print(json.dumps(info, indent=2))
    if device == "cuda" and session.get_providers()[0] != "CUDAExecutionProvider":
        raise SystemExit("error: the CUDA provider did not become active (see providers above)")


# ============================================================================ the run (device)


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
    env["nvcc"] = shutil.which("nvcc") or (
        "/usr/local/cuda/bin/nvcc" if Path("/usr/local/cuda/bin/nvcc").exists() else None
    )
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        smi = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        env["nvidia_smi"] = smi.stdout.strip()
    return env


def sh(cmd: list[str], name: str, timeout: float) -> dict[str, Any]:
    """Run a command from the repository root; its output goes to $OUT/gpu-<name>.log (and
    benchmarks/results/ when $OUT is unset); returns rc, seconds and the output's tail."""
    t = time.perf_counter()
    try:
        proc = subprocess.run(
            cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=os.environ.copy()
        )
        rc, out = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        rc, out = 124, f"timed out after {timeout} s\n{e.stdout or ''}{e.stderr or ''}"
    folder = Path(os.environ["OUT"]) if os.environ.get("OUT") else REPO / "benchmarks" / "results"
    (folder / f"gpu-{name}.log").write_text(out if isinstance(out, str) else str(out))
    return {
        "cmd": " ".join(cmd),
        "rc": rc,
        "seconds": round(time.perf_counter() - t, 1),
        "tail": out[-1500:] if isinstance(out, str) else "",
    }


def stage_ops(ctx: Context) -> dict[str, Any]:
    """Build the op library here (nvcc when present) and run the native-op CUDA tests and the
    conformance suite's ORT CUDA subject."""
    out = {"build": sh([str(REPO / "custom_ops" / "build.sh"), "build/ops"], "build", 600)}
    pytest = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x"]
    out["native_op_tests"] = sh([*pytest, "tests/test_native_ops.py", "-k", "cuda"], "ops", 600)
    out["conformance_cuda"] = sh(
        [*pytest, "tests/test_conformance.py", "-k", "ort-cuda"], "conformance", 600
    )
    return out


class Context:
    """What every stage shares: arguments, the device, the demo model and prompts, bundles."""

    def __init__(self, args: argparse.Namespace, base: Path, texts: list[Any]) -> None:
        from redrafter.bench.shapes import parse_beams
        from redrafter.demo.shipped import SHIPPED_DIR

        self.args, self.device, self.base = args, args.device, base
        self.drafter = Path(args.drafter) if args.drafter else SHIPPED_DIR
        self.beams = parse_beams(args.beams)
        self.prompts, self.eos = prompt_ids(base, texts)
        self._bundles: dict[str, Path] = {}

    def bundle(self, dtype: str) -> Path:
        """The demo bundle in `dtype` with a drafter graph per beam shape (exported once)."""
        if dtype not in self._bundles:
            from benchmarks._common import demo_bundle

            self._bundles[dtype] = demo_bundle(
                self.drafter, self.beams, dtype=dtype, base=self.base, log=log
            )
        return self._bundles[dtype]

    def runtime(self, dtype: str, native: bool) -> Any:
        """OnnxRuntime on this device; a silent fall-back to the CPU is an error."""
        from redrafter.runtimes.onnxruntime import OnnxRuntime

        return OnnxRuntime(self.bundle(dtype), device=self.device, native=native)


def implementations() -> list[tuple[str, bool]]:
    """(name, native) pairs: the native library when built, and always the portable body."""
    from redrafter import ops

    return ([("native", True)] if ops.library_path() is not None else []) + [("portable", False)]


def stage_validate(ctx: Context) -> dict[str, Any]:
    """`validate` (the library call the CLI makes) for fp32 and fp16 bundles, native kernel and
    portable body, against the fp32 torch reference: tensors, tokens, drift."""
    from redrafter.bundle import load_bundle
    from redrafter.models.checkpoints import load_base, load_drafter
    from redrafter.runtimes.torch import TorchRuntime
    from redrafter.validate.report import validate_bundle

    reference = TorchRuntime(load_base(ctx.base), load_drafter(ctx.drafter))
    prompts = ctx.prompts[: ctx.args.validate_prompts]
    out: dict[str, Any] = {}
    for dtype in ("float32", "float16"):
        for impl, native in implementations():
            name = f"{dtype}-{impl}"
            log(f"  validate {name}")
            candidate = ctx.runtime(dtype, native)
            report = validate_bundle(
                load_bundle(ctx.bundle(dtype)),
                candidate=candidate,
                reference=reference,
                prompts=prompts,
                max_new_tokens=ctx.args.validate_tokens,
                eos_token_ids=ctx.eos,
            )
            out[name] = {"passed": report.passed, "report": report.to_dict()}
            print(f"\nvalidate {name} on {candidate.device}:\n{report.table()}")
    return out


def stage_bench(ctx: Context) -> dict[str, Any]:
    """Autoregressive vs speculative over the beam grid, with and without the lookup beam, for
    the fp16 and fp32 bundles (native kernel), plus the `redrafter bench` command itself."""
    from redrafter.bench.harness import PROMPT_LOOKUP_SETTINGS, run_configs, speculative_grid
    from redrafter.bench.report import markdown_table

    out: dict[str, Any] = {}
    native = implementations()[0][1]
    for dtype in ctx.args.bench_dtypes.split(","):
        rt = ctx.runtime(dtype, native)
        spec = speculative_grid(
            ctx.beams,
            max_new_tokens=ctx.args.max_new_tokens,
            packing=rt.bundle.packing,
            prompt_lookup=PROMPT_LOOKUP_SETTINGS[ctx.args.prompt_lookup],
            min_draft_prob=ctx.args.min_draft_prob,
        )
        t = time.perf_counter()
        results = run_configs(
            rt,
            ctx.prompts,
            spec,
            max_new_tokens=ctx.args.max_new_tokens,
            repeats=ctx.args.repeats,
            eos_token_ids=ctx.eos,
            on_run=lambda name: log(f"    {name}"),
        )
        results["wall_s"] = round(time.perf_counter() - t, 1)
        results["implementation"] = rt.implementation
        out[dtype] = results
        table = markdown_table({k: v for k, v in results.items() if isinstance(v, dict)})
        print(f"\nONNX Runtime {rt.device} {dtype} {rt.implementation}:\n{table}")
    cli = [sys.executable, "-c", "from redrafter.cli import main; main()", "bench"]
    cli += ["--bundle", str(ctx.bundle("float16")), "--device", ctx.device, "--repeats", "1"]
    cli += ["--max-new-tokens", "32", "--prompt-ids", ",".join(map(str, ctx.prompts[0]))]
    out["cli"] = sh(cli, "bench-cli", 300)
    return out


def median_ms(call: Callable[[], Any], repeats: int, warmup: int = 3) -> float:
    """Median wall ms of `call` (synchronous: ORT returns after its outputs are on the host)."""
    for _ in range(warmup):
        call()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        call()
        times.append(1000 * (time.perf_counter() - t))
    return round(statistics.median(times), 3)


def step_call(runtime: Any, tokens: int, context: int) -> Callable[[], Any]:
    """A greedy verify (what speculative and autoregressive greedy steps call) of `tokens`
    chained tokens after `context` prefilled ones; repeatable (it writes past the context)."""
    import numpy as np

    runtime.reset(batch=1, capacity=context + tokens + 8)
    runtime.prefill(np.arange(3, 3 + context)[None] % 1000, np.array([context]))
    ids = np.full((1, tokens), 42)
    positions = (context + np.arange(tokens))[None]  # (1, T)
    mask = np.tril(np.ones((1, tokens, tokens), bool))  # (1, T, T)
    past = np.array([context])
    return lambda: runtime.verify_greedy(ids, positions, mask, past)


def step_curve(runtime: Any, sizes: list[int], contexts: list[int], repeats: int) -> dict:
    """{context: {N: ms}} of greedy verify steps."""
    curve: dict[str, dict[str, float]] = {}
    for context in contexts:
        curve[str(context)] = {}
        for n in sizes:
            curve[str(context)][str(n)] = median_ms(step_call(runtime, n, context), repeats)
        log(f"    context {context}: {curve[str(context)]}")
    return curve


def stage_curve(ctx: Context) -> dict[str, Any]:
    """ms per verify step against N and context, fp16 and fp32, each implementation."""
    out: dict[str, Any] = {"sizes": ctx.args.sizes, "contexts": ctx.args.contexts}
    for dtype in ("float16", "float32"):
        for impl, native in implementations():
            log(f"  step curve {dtype} {impl}")
            rt = ctx.runtime(dtype, native)
            out[f"{dtype}-{impl}"] = step_curve(
                rt, ctx.args.sizes, ctx.args.contexts, ctx.args.step_repeats
            )
    return out


class TimedRuntime:
    """A runtime whose calls are timed: what the driver spends outside them is its overhead."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.seconds = inner, 0.0

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.inner, name)
        if name not in (
            "reset",
            "prefill",
            "draft",
            "draft_tokens",
            "verify",
            "verify_greedy",
            "commit",
        ):
            return attr

        def timed(*args: Any, **kwargs: Any) -> Any:
            t = time.perf_counter()
            try:
                return attr(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t

        return timed


def stage_overhead(ctx: Context) -> dict[str, Any]:
    """Host time outside the runtime's calls, as a share of decode wall time (goal <= 10 %)."""
    from redrafter.config import BeamShape
    from redrafter.decoding import DecodeOptions, decode

    n = ctx.args.max_new_tokens
    shapes = {
        "autoregressive": DecodeOptions(speculative=False, max_new_tokens=n),
        "W1 L5 +lookup": DecodeOptions(max_new_tokens=n, beam=BeamShape(1, 5), prompt_lookup=True),
    }
    widest = max(ctx.beams, key=lambda b: (b.width, b.length))
    shapes[f"W{widest.width} L{widest.length}"] = DecodeOptions(max_new_tokens=n, beam=widest)
    out: dict[str, Any] = {}
    native = implementations()[0][1]
    for dtype in ("float16",):
        timed = TimedRuntime(ctx.runtime(dtype, native))
        for name, options in shapes.items():
            list(decode(timed, ctx.prompts[:1], options, eos_token_ids=ctx.eos))  # warm-up
            timed.seconds, tokens = 0.0, 0
            t = time.perf_counter()
            for prompt in ctx.prompts:
                for step in decode(timed, [prompt], options, eos_token_ids=ctx.eos):
                    tokens += len(step.new_tokens[0])
            wall = time.perf_counter() - t
            out[f"{dtype} {name}"] = {
                "wall_s": round(wall, 3),
                "runtime_s": round(timed.seconds, 3),
                "driver_share": round(1 - timed.seconds / wall, 4),
                "tokens_per_second": round(tokens / wall, 1),
            }
            log(f"    {dtype} {name}: {out[f'{dtype} {name}']}")
    return out


def stage_torch(ctx: Context) -> dict[str, Any]:
    """The torch reference runtime on this device, fp16 and fp32, over the same grid: the
    eager baseline the ONNX Runtime figures are read against."""
    from redrafter.bench.harness import PROMPT_LOOKUP_SETTINGS, run_configs, speculative_grid
    from redrafter.models.checkpoints import load_base, load_drafter
    from redrafter.runtimes.torch import TorchRuntime

    out: dict[str, Any] = {}
    for dtype in ctx.args.bench_dtypes.split(","):
        rt = TorchRuntime(
            load_base(ctx.base), load_drafter(ctx.drafter), device=ctx.device, dtype=dtype
        )
        spec = speculative_grid(
            ctx.beams,
            max_new_tokens=ctx.args.max_new_tokens,
            prompt_lookup=PROMPT_LOOKUP_SETTINGS[ctx.args.prompt_lookup],
            min_draft_prob=ctx.args.min_draft_prob,
        )
        out[dtype] = run_configs(
            rt,
            ctx.prompts,
            spec,
            max_new_tokens=ctx.args.max_new_tokens,
            repeats=ctx.args.repeats,
            eos_token_ids=ctx.eos,
        )
    return out


def random_base_checkpoint(folder: Path, dims: dict[str, Any], layers: int) -> Path:
    """A Llama-shaped base of `dims` with `layers` layers, weights N(0, 0.02) in fp16, saved as
    a Hugging Face folder (config.json + model.safetensors, no tokenizer)."""
    import torch
    from safetensors.torch import save_file

    from redrafter.config import BaseModelConfig
    from redrafter.models.llama import Transformer

    fields = dict(
        model_type="llama",
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        **{**dims, "num_hidden_layers": layers},
    )
    torch.manual_seed(0)
    model = Transformer(BaseModelConfig(**fields)).eval().half()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.02)
    folder.mkdir(parents=True, exist_ok=True)
    config = {k: v for k, v in model.config.to_dict().items() if v is not None}
    config["torch_dtype"] = "float16"
    (folder / "config.json").write_text(json.dumps(config))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    save_file(state, str(folder / "model.safetensors"))
    return folder


def stage_large(ctx: Context) -> dict[str, Any]:
    """Verify-step cost of Llama-shaped bases at real sizes (random weights, fp16), measured at
    two reduced depths and extrapolated per layer to the full depth: t(N) = head(N) +
    layers x layer(N). With the demo's measured tokens/step for each tree size, the predicted
    speed-up is tokens/step x t(1) / t(N)."""
    from redrafter.build import ExportOptions, export_bundle
    from redrafter.runtimes.onnxruntime import OnnxRuntime

    work = Path(ctx.args.work) / "large"
    shapes = SMOKE_LARGE if ctx.args.smoke else LARGE
    depths = (1, 2) if ctx.args.smoke else (2, 4)
    out: dict[str, Any] = {"depths_measured": list(depths), "sizes": ctx.args.sizes}
    native = implementations()[0][1]
    for name, dims in shapes.items():
        measured: dict[int, dict[str, dict[str, float]]] = {}
        for depth in depths:
            t = time.perf_counter()
            folder = random_base_checkpoint(work / f"{name}-{depth}", dims, depth)
            bundle = work / f"{name}-{depth}-bundle"
            export_bundle(
                folder, bundle, options=ExportOptions(dtype="float16"), overwrite=True, progress=log
            )
            log(f"  {name} x{depth} layers exported in {time.perf_counter() - t:.0f} s")
            rt = OnnxRuntime(bundle, device=ctx.device, native=native)
            measured[depth] = step_curve(
                rt, ctx.args.sizes, ctx.args.large_contexts, ctx.args.step_repeats
            )
            del rt
            shutil.rmtree(folder, ignore_errors=True)
            shutil.rmtree(bundle, ignore_errors=True)
        full = dims["num_hidden_layers"]
        lo, hi = depths
        predicted: dict[str, dict[str, float]] = {}
        for context, row in measured[lo].items():
            predicted[context] = {}
            for n, t_lo in row.items():
                per_layer = (measured[hi][context][n] - t_lo) / (hi - lo)
                predicted[context][n] = round(t_lo + (full - lo) * per_layer, 3)
        out[name] = {"dims": dims, "measured": measured, "predicted_full_depth_ms": predicted}
    return out


def predictions(payload: dict[str, Any]) -> dict[str, Any]:
    """Predicted speed-ups of the large bases: for each speculative configuration the demo
    bench measured, tokens/step x t(1) / t(mean tree size), at the first large context."""
    measured = payload.get("stages", {}).get("bench", {})
    bench = measured.get("float16") or measured.get("float32") or {}
    large = payload.get("stages", {}).get("large", {})
    out: dict[str, Any] = {}
    for name, entry in large.items():
        if not isinstance(entry, dict) or "predicted_full_depth_ms" not in entry:
            continue
        curve = next(iter(entry["predicted_full_depth_ms"].values()))  # {N: ms}
        sizes = sorted(int(n) for n in curve)
        for config, r in bench.items():
            if not isinstance(r, dict) or "tokens_per_step" not in r:
                continue
            tree = r.get("verified_per_step") or 1  # mean tree tokens verified per step
            n = min(sizes, key=lambda s: abs(s - tree))
            out.setdefault(name, {})[config] = round(
                r["tokens_per_step"] * curve[str(sizes[0])] / curve[str(n)], 2
            )
    return out


def run(args: argparse.Namespace) -> None:
    """On the GPU machine (or here with --device cpu): every stage in --stages, results saved
    after each stage so a cut-off run still returns what it measured."""
    info = activate()
    env = environment()
    env["activate"] = info
    log(json.dumps(env, indent=2))
    if args.device == "cuda" and "CUDAExecutionProvider" not in info["providers"]:
        raise SystemExit(
            f"error: onnxruntime {info['onnxruntime']} ({info['onnxruntime_file']}) has providers "
            f"{info['providers']}; run `python3 -m benchmarks.gpu --install` first "
            f"(missing CUDA libraries: {info['missing_cuda_libraries'] or 'none'})"
        )
    work = Path(args.work)
    if args.base:
        base = Path(args.base)
    elif (work / "model").is_dir():
        base = next((work / "model").glob("*.gguf"))
    else:
        from redrafter.demo import find_demo_gguf

        base = find_demo_gguf()
    from redrafter.train.prompts import Prompt

    if (CARRY / "manifest.json").is_file():
        carried = json.loads((CARRY / "manifest.json").read_text())["prompts"]
        texts = [Prompt(text, chat=bool(chat)) for text, chat in carried]
    else:
        from redrafter.demo import heldout_shared_prompts

        texts = heldout_shared_prompts(args.jargon, args.code)
    texts = texts[: args.prompts]
    ctx = Context(args, base, texts)
    payload: dict[str, Any] = {
        "environment": env,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "model": base.name,
        "drafter": str(ctx.drafter),
        "prompts": len(ctx.prompts),
        "max_new_tokens": args.max_new_tokens,
        "beams": args.beams,
        "stages": {},
    }
    stages = {
        "ops": stage_ops,
        "validate": stage_validate,
        "bench": stage_bench,
        "curve": stage_curve,
        "overhead": stage_overhead,
        "large": stage_large,
        "torch": stage_torch,
    }
    also = Path(os.environ["OUT"]) if os.environ.get("OUT") else None
    for name in args.stages.split(","):
        log(f"stage {name}")
        t = time.perf_counter()
        try:
            payload["stages"][name] = stages[name](ctx)
        except Exception as e:  # record and go on: one broken stage must not lose the others
            import traceback

            payload["stages"][name] = {"error": f"{type(e).__name__}: {e}"}
            log(traceback.format_exc())
        payload["stages"][name]["stage_seconds"] = round(time.perf_counter() - t, 1)
        payload["predicted_speedups"] = predictions(payload)
        save(args.name, payload, also_to=also)
    print(json.dumps(payload["predicted_speedups"], indent=2))


def main() -> None:
    """--pack here; --install, --probe and --run on the GPU machine (or here with --device cpu)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--pack", action="store_true", help="here: split files into .gpu-carry/")
    mode.add_argument("--install", action="store_true", help="reassemble + pip install --target")
    mode.add_argument("--probe", action="store_true", help="does onnxruntime-gpu load and run?")
    mode.add_argument("--run", action="store_true", help="run --stages")
    parser.add_argument("--part-mb", type=int, default=50, help="MiB per carried part [50]")
    parser.add_argument(
        "--for-python",
        default="3.12",
        help="--pack: the CPython the wheel is for [3.12, the GPU machine's; the smoke test "
        "here packs for this machine's]",
    )
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--smoke", action="store_true", help="small grids and a tiny 'large' base")
    parser.add_argument("--stages", default=",".join(STAGES))
    parser.add_argument("--base", help="base model (default: the carried GGUF, else the demo's)")
    parser.add_argument("--drafter", help="drafter folder (default: the shipped demo drafter)")
    parser.add_argument("--beams", default="1x5,2x5,4x5", help="WxL list [1x5,2x5,4x5]")
    parser.add_argument("--prompt-lookup", choices=["off", "on", "both"], default="both")
    parser.add_argument(
        "--min-draft-prob", type=lambda t: [float(x) for x in t.split(",")], default=[0.0]
    )
    parser.add_argument("--jargon", type=int, default=4)
    parser.add_argument("--code", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--bench-dtypes", default="float16,float32")
    parser.add_argument("--validate-prompts", type=int, default=3)
    parser.add_argument("--validate-tokens", type=int, default=32)
    parser.add_argument(
        "--sizes",
        type=lambda t: [int(x) for x in t.split(",")],
        default=[1, 2, 4, 6, 8, 16, 32, 64],
    )
    parser.add_argument(
        "--contexts",
        type=lambda t: [int(x) for x in t.split(",")],
        default=[128, 512, 1024, 2048, 4096],
    )
    parser.add_argument(
        "--large-contexts", type=lambda t: [int(x) for x in t.split(",")], default=[1024]
    )
    parser.add_argument("--step-repeats", type=int, default=20)
    parser.add_argument("--work", default="/tmp/redrafter-gpu", help="reassembly + scratch")
    parser.add_argument("--name", default="gpu")
    args = parser.parse_args()
    if args.smoke:  # the same code paths, sized for 2 CPU cores
        args.sizes, args.contexts, args.large_contexts = [1, 4, 16], [128, 512], [128]
        args.prompts, args.max_new_tokens, args.repeats = 2, 24, 1
        args.step_repeats, args.validate_prompts, args.validate_tokens = 3, 1, 8
        args.beams, args.bench_dtypes = "1x5,2x3", "float32"
    if args.pack:
        pack(args.part_mb, args.jargon, args.code, args.for_python)
    elif args.install:
        install(Path(args.work), args.device)
    elif args.probe:
        probe(args.device)
    else:
        run(args)


if __name__ == "__main__":
    main()
