"""Peers on the same machine, in one run (issue 8, docs/design.md §8): the demo model
(SmolLM2-135M-Instruct) decoded greedily on the same prompts, the same max new tokens and the
same thread count by

  * HF transformers `generate` (fp32, in this process, built from our loaded weights);
  * onnxruntime-genai, fp32 and int4 (its own builder's export of the same weights; a separate
    venv, run as a subprocess);
  * llama.cpp through llama-cpp-python on the original Q4_1 GGUF (a separate venv, subprocess);
  * ours: ONNX Runtime CPU on an exported bundle, native TreeAttention kernel and portable
    body, autoregressive and speculative (`redrafter.bench.harness.run_configs`).

It prints one table with each engine's decode tokens/s and our speculative (and
autoregressive) tokens/s divided by each of theirs, and saves benchmarks/results/peers.json
(each engine's tokens as a digest and a count per prompt, never the ids).

    .venv/bin/python -m benchmarks.peers --setup          # once: peer venvs + models (~10 min)
    .venv/bin/python -m benchmarks.peers [--bundle DIR | --drafter DIR] [--repeats 3]
        [--interleave]

With --interleave every engine runs one repeat per round, round after round, and each ratio is
also taken per round (ours and the peer measured minutes apart, not a whole run apart): this
VM's speed drifts by up to ~20 % an hour, which a ratio of two separate medians picks up.

Peer environments live outside the repository, under
`${XDG_CACHE_HOME:-~/.cache}/redrafter/peers/` (override with $REDRAFTER_PEERS_DIR): they need
`onnxruntime` (CPU) and a llama.cpp build, which must never enter the project's .venv (it has
onnxruntime-gpu; the two packages overwrite each other).

Decode speed is measured the way `redrafter bench` measures it: the prefill and the first token
are excluded; tokens/s = (tokens after the first) / (seconds from the first token to the last),
summed over all prompts, median over repeats, after a warm-up prompt. Every engine stops at EOS
(or with --ignore-eos runs exactly --max-new-tokens).

This file is also the worker that runs inside the peer venvs (`--worker genai|llamacpp`, as
`python -m benchmarks.peers` from the repository root): the top level imports only the standard
library and `benchmarks._common` (standard library only at import time); redrafter is imported
where the main venv needs it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from benchmarks._common import (
    add_tree_arguments,
    cpu_seconds,
    demo_bundle,
    idle_report,
    machine,
    other_load,
    peers_dir,
    prompt_ids,
    save,
    wait_for_idle,
)

REPO = Path(__file__).resolve().parents[1]
SETUP_HINT = "run python -m benchmarks.peers --setup"

PEERS_DIR = peers_dir()
GENAI_VENV = PEERS_DIR / "genai-venv"
LLAMA_VENV = PEERS_DIR / "llamacpp-venv"
WHEELS = PEERS_DIR / "wheels"
MODELS = PEERS_DIR / "models"
LOGS = PEERS_DIR / "logs"
HF_DIR = MODELS / "smollm2-hf"  # written from the GGUF with our loader: config + safetensors

# Pinned, so a re-run measures the same peers. torch is pinned to the project's CPU wheel
# (the genai builder imports torch and transformers; an unpinned torch pulls CUDA wheels).
GENAI_PACKAGES = [
    "onnxruntime-genai==0.18.0",
    "onnxruntime==1.32.0",
    "onnx-ir==1.1.0",  # the builder imports onnx_ir without declaring it
    "torch==2.13.0",
    "transformers==5.24.0",
]
LLAMA_CPP_VERSION = "0.3.36"
# llama-cpp-python's own dependencies, installed beside the cached wheel (read from its
# pyproject.toml); the wheel itself goes in with --no-deps.
LLAMA_DEPS = ["numpy", "typing-extensions>=4.5.0", "diskcache>=5.6.1", "jinja2>=2.11.3"]
# CPU only, tuned for this CPU (GGML_NATIVE: the wheel is cached per machine, never shipped).
LLAMA_CMAKE_ARGS = (
    "-DGGML_NATIVE=ON -DGGML_BLAS=OFF -DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_VULKAN=OFF "
    "-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF"
)
GENAI_PRECISIONS = ("fp32", "int4")


def log(message: str) -> None:
    """Progress on stderr (stdout carries the tables and, in a worker, the RESULT line)."""
    print(message, file=sys.stderr, flush=True)


def venv_python(venv: Path) -> Path:
    """The interpreter of `venv`."""
    return venv / "bin" / "python"


# ============================================================================ timing (any venv)


def timed_stream(tokens: Iterable[int], *, max_new_tokens: int, eos: set[int]) -> dict[str, Any]:
    """Drain an engine's token stream (the first item is the token the prefill produced) and
    time it: prefill = start -> first token; decode = first token -> last token. The ids stay
    in memory: the run digests them before anything is saved."""
    start = time.perf_counter()
    stamps: list[float] = []
    ids: list[int] = []
    for token in tokens:
        stamps.append(time.perf_counter())
        ids.append(int(token))
        if len(ids) >= max_new_tokens or int(token) in eos:
            break
    return {
        "prefill_s": stamps[0] - start,
        "decode_s": stamps[-1] - stamps[0],
        "decode_tokens": len(ids) - 1,
        "token_ids": ids,
    }


def run_engine(
    stream: Callable[[list[int]], Iterable[int]],
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    repeats: int,
    eos: set[int],
) -> dict[str, Any]:
    """Warm up on the first prompt, then `repeats` passes over all prompts; per pass the decode
    tokens/s over all prompts; the median pass. Token ids come from the first pass."""
    timed_stream(stream(prompts[0]), max_new_tokens=max_new_tokens, eos=eos)
    passes = []
    for _ in range(repeats):
        passes.append(
            [timed_stream(stream(p), max_new_tokens=max_new_tokens, eos=eos) for p in prompts]
        )
    rates = [
        sum(r["decode_tokens"] for r in ps) / max(sum(r["decode_s"] for r in ps), 1e-9)
        for ps in passes
    ]
    prefill_ms = [1000 * statistics.mean(r["prefill_s"] for r in ps) for ps in passes]
    return {
        "tokens_per_second": statistics.median(rates),
        "tokens_per_second_repeats": [round(x, 2) for x in rates],
        "prefill_ms_mean": round(statistics.median(prefill_ms), 1),
        "decode_tokens": sum(r["decode_tokens"] for r in passes[0]),
        "token_ids": [r["token_ids"] for r in passes[0]],
    }


def _peak_rss_mb() -> float:
    """This process's RSS high-water mark (VmHWM: per address space, so unlike ru_maxrss it
    does not carry the parent's peak across fork + exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


# ============================================================================ workers (peer venvs)


def worker_genai(job: dict[str, Any]) -> dict[str, Any]:
    """onnxruntime-genai: greedy, intra-op threads from the job, KV buffer shared in place (the
    builder's default `past_present_share_buffer`)."""
    import onnxruntime_genai as og

    overlay = {
        "model": {
            "decoder": {
                "session_options": {
                    "intra_op_num_threads": job["threads"],
                    "inter_op_num_threads": 1,
                }
            }
        }
    }
    config = og.Config(job["model_dir"])
    config.overlay(json.dumps(overlay))
    model = og.Model(config)
    n = job["max_new_tokens"]

    def stream(ids: list[int]) -> Iterator[int]:
        params = og.GeneratorParams(model)
        options: dict[str, Any] = {"max_length": len(ids) + n, "do_sample": False}
        if job["ignore_eos"]:
            options["min_length"] = len(ids) + n
        params.set_search_options(**options)
        generator = og.Generator(model, params)
        generator.append_tokens(ids)
        while not generator.is_done():
            generator.generate_next_token()
            yield int(generator.get_next_tokens()[0])

    eos = set() if job["ignore_eos"] else set(job["eos"])
    result = run_engine(stream, job["prompts"], max_new_tokens=n, repeats=job["repeats"], eos=eos)
    import onnxruntime

    result["versions"] = {
        "onnxruntime-genai": og.__version__,
        "onnxruntime": onnxruntime.__version__,
    }
    return result


def worker_llamacpp(job: dict[str, Any]) -> dict[str, Any]:
    """llama.cpp via llama-cpp-python on the GGUF: greedy sampler (temp 0), n_threads for both
    decode and batch (prefill); the KV cache is reset before every prompt."""
    import llama_cpp

    longest = max(len(p) for p in job["prompts"])
    llm = llama_cpp.Llama(
        model_path=job["gguf"],
        n_ctx=longest + job["max_new_tokens"] + 16,
        n_threads=job["threads"],
        n_threads_batch=job["threads"],
        n_batch=512,
        seed=0,
        verbose=False,
    )
    n = job["max_new_tokens"]

    def stream(ids: list[int]) -> Iterator[int]:
        llm.reset()  # no prefix reuse across prompts or repeats: every prompt pays its prefill
        yield from llm.generate(
            ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True
        )

    eos = set() if job["ignore_eos"] else set(job["eos"])
    result = run_engine(stream, job["prompts"], max_new_tokens=n, repeats=job["repeats"], eos=eos)
    info = llama_cpp.llama_print_system_info()
    result["versions"] = {
        "llama-cpp-python": llama_cpp.__version__,
        "system_info": info.decode() if isinstance(info, bytes) else str(info),
    }
    return result


def worker_main(kind: str, job_path: str) -> None:
    """Run one peer job (a JSON file) in this venv; print its result as one RESULT line."""
    job = json.loads(Path(job_path).read_text())
    result = {"genai": worker_genai, "llamacpp": worker_llamacpp}[kind](job)
    result["peak_rss_mb"] = round(_peak_rss_mb(), 1)
    print("RESULT " + json.dumps(result), flush=True)


# ============================================================================ setup


def _run(cmd: list[str], *, log_name: str, env: dict[str, str] | None = None) -> float:
    """Run a setup command at low priority, its output in LOGS/<log_name>; seconds taken."""
    LOGS.mkdir(parents=True, exist_ok=True)
    path = LOGS / log_name
    start = time.perf_counter()
    log(f"  $ {' '.join(cmd)}   (log: {path})")
    with open(path, "w") as out:
        rc = subprocess.call(
            ["nice", "-n", "19", *cmd], stdout=out, stderr=subprocess.STDOUT, env=env
        )
    if rc != 0:
        tail = path.read_text(errors="replace")[-2000:]
        raise SystemExit(f"setup step failed (exit {rc}): {' '.join(cmd)}\n...{tail}")
    return round(time.perf_counter() - start, 1)


def _make_venv(venv: Path) -> float:
    """A venv from this interpreter's base Python, unless it exists; seconds taken."""
    if venv_python(venv).exists():
        return 0.0
    # From inside a venv, `-m venv` bases the new one on the same base interpreter.
    return _run([sys.executable, "-m", "venv", str(venv)], log_name=f"{venv.name}.log")


def write_hf_folder(out: Path = HF_DIR) -> Path:
    """The demo GGUF as a Hugging Face folder (config.json, model.safetensors in HF names,
    tokenizer files), through our loader: the weights every fp32 engine runs are the same
    dequantized Q4_1 weights ours runs. Tied embeddings stay tied (no lm_head tensor)."""
    if (out / "model.safetensors").is_file():
        return out
    from safetensors.torch import save_file

    from redrafter.demo import find_demo_gguf
    from redrafter.models.checkpoints import load_base
    from redrafter.models.tokenizer import load_tokenizer, save_tokenizer

    gguf = find_demo_gguf()
    model = load_base(gguf)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    config = {**model.config.to_dict(), "architectures": ["LlamaForCausalLM"]}
    config["torch_dtype"] = "float32"
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    save_tokenizer(load_tokenizer(gguf), tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def setup_genai() -> dict[str, float]:
    """genai-venv, the HF folder and genai's fp32 and int4 builds; seconds per step."""
    times = {"venv_s": _make_venv(GENAI_VENV)}
    pip = [str(venv_python(GENAI_VENV)), "-m", "pip", "install", "-q"]
    times["pip_s"] = _run([*pip, *GENAI_PACKAGES], log_name="genai-pip.log")
    start = time.perf_counter()
    write_hf_folder()
    times["hf_folder_s"] = round(time.perf_counter() - start, 1)
    for precision in GENAI_PRECISIONS:
        out = MODELS / f"genai-{precision}"
        if (out / "genai_config.json").is_file():
            continue
        times[f"build_{precision}_s"] = _run(
            [
                str(venv_python(GENAI_VENV)),
                "-m",
                "onnxruntime_genai.models.builder",
                "-i",
                str(HF_DIR),
                "-o",
                str(out),
                "-p",
                precision,
                "-e",
                "cpu",
                "-c",
                str(MODELS / "genai-cache"),
            ],
            log_name=f"genai-build-{precision}.log",
        )
    shutil.rmtree(MODELS / "genai-cache", ignore_errors=True)
    return times


def llama_wheel() -> Path | None:
    """The cached llama-cpp-python wheel, if built."""
    found = sorted(WHEELS.glob(f"llama_cpp_python-{LLAMA_CPP_VERSION}-*.whl"))
    return found[-1] if found else None


def setup_llamacpp() -> dict[str, float]:
    """Build llama-cpp-python (it compiles llama.cpp: ~7 min on 2 cores) once into a cached
    wheel, then install it with its small dependencies into its own venv."""
    times = {"venv_s": _make_venv(LLAMA_VENV)}
    if llama_wheel() is None:
        WHEELS.mkdir(parents=True, exist_ok=True)
        env = {
            **os.environ,
            "CMAKE_ARGS": LLAMA_CMAKE_ARGS,
            "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 2),
        }
        times["wheel_build_s"] = _run(
            [
                str(venv_python(LLAMA_VENV)),
                "-m",
                "pip",
                "wheel",
                "--no-deps",
                "-w",
                str(WHEELS),
                f"llama-cpp-python=={LLAMA_CPP_VERSION}",
            ],
            log_name="llamacpp-wheel.log",
            env=env,
        )
    wheel = llama_wheel()
    assert wheel is not None
    pip = [str(venv_python(LLAMA_VENV)), "-m", "pip", "install", "-q"]
    times["pip_s"] = _run([*pip, *LLAMA_DEPS], log_name="llamacpp-deps.log")
    times["pip_s"] += _run([*pip, "--no-deps", str(wheel)], log_name="llamacpp-pip.log")
    return times


def setup(which: list[str]) -> None:
    """Set up the named peers (genai, llamacpp), idempotently; record step times."""
    log(f"peer environments under {PEERS_DIR}")
    report = {}
    if "genai" in which:
        log("onnxruntime-genai: venv, packages, HF folder from the GGUF, fp32 + int4 builds")
        report["genai"] = setup_genai()
    if "llamacpp" in which:
        log("llama-cpp-python: venv, cached wheel (compiles llama.cpp once), install")
        report["llamacpp"] = setup_llamacpp()
    # Keep the times of steps that ran before (a re-run skips what is already there).
    record_file = PEERS_DIR / "setup.json"
    previous = json.loads(record_file.read_text()) if record_file.is_file() else {}
    for peer, times in report.items():
        ran = {k: round(v, 1) for k, v in times.items() if v}
        previous[peer] = {**previous.get(peer, {}), **ran}
    report = previous
    record_file.write_text(json.dumps(report, indent=2) + "\n")
    log(json.dumps(report, indent=2))


def genai_ready(precision: str) -> str | None:
    """None when the genai peer can run, else why not."""
    if not venv_python(GENAI_VENV).exists():
        return f"no {GENAI_VENV}; {SETUP_HINT}"
    if not (MODELS / f"genai-{precision}" / "genai_config.json").is_file():
        return f"no genai {precision} model; {SETUP_HINT}"
    return None


def llamacpp_ready() -> str | None:
    """None when the llama.cpp peer can run, else why not."""
    python = venv_python(LLAMA_VENV)
    if not python.exists():
        return f"no {LLAMA_VENV}; {SETUP_HINT}"
    if subprocess.call([str(python), "-c", "import llama_cpp"], stderr=subprocess.DEVNULL):
        return f"llama_cpp does not import in its venv; {SETUP_HINT}"
    return None


# ============================================================================ the run (main venv)


def run_worker(venv: Path, kind: str, job: dict[str, Any]) -> dict[str, Any]:
    """Run this module as a worker in a peer venv (from the repository root, so that
    `benchmarks` imports); returns its RESULT line."""
    job_file = PEERS_DIR / f"job-{kind}-{os.getpid()}.json"
    job_file.write_text(json.dumps(job))
    try:
        proc = subprocess.run(
            [
                str(venv_python(venv)),
                "-m",
                "benchmarks.peers",
                "--worker",
                kind,
                "--job",
                str(job_file),
            ],
            capture_output=True,
            text=True,
            cwd=REPO,
            env={**os.environ, "OMP_NUM_THREADS": str(job["threads"])},
        )
    finally:
        job_file.unlink(missing_ok=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    raise RuntimeError(f"{kind} worker failed (exit {proc.returncode}): {proc.stderr[-1500:]}")


def run_transformers(
    prompts: list[list[int]],
    *,
    threads: int,
    max_new_tokens: int,
    repeats: int,
    eos: set[int],
    ignore_eos: bool,
) -> dict[str, Any]:
    """HF transformers `generate` (greedy, fp32, default dynamic KV cache) on the HF folder made
    from our loaded weights; a stopping criterion time-stamps every new token."""
    import torch
    import transformers
    from transformers import LlamaForCausalLM, StoppingCriteria, StoppingCriteriaList

    torch.set_num_threads(threads)
    model = LlamaForCausalLM.from_pretrained(str(write_hf_folder()), dtype=torch.float32)
    model.eval()
    n = max_new_tokens

    def stream(ids: list[int]) -> Iterator[_Replayed]:
        """generate() runs to completion: a stopping criterion records each token and its
        time, and they are replayed afterwards."""
        tokens: list[int] = []
        stamps: list[float] = []

        class Rec(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):  # type: ignore[no-untyped-def]
                stamps.append(time.perf_counter())
                tokens.append(int(input_ids[0, -1]))
                return torch.zeros(input_ids.shape[0], dtype=torch.bool)

        kwargs: dict[str, Any] = dict(
            max_new_tokens=n,
            do_sample=False,
            num_beams=1,
            use_cache=True,
            stopping_criteria=StoppingCriteriaList([Rec()]),
            pad_token_id=2,
        )
        if ignore_eos:
            kwargs["min_new_tokens"] = n
            kwargs["eos_token_id"] = None
        else:
            kwargs["eos_token_id"] = sorted(eos)
        with torch.inference_mode():
            model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids)), **kwargs)
        yield from _replay(tokens, stamps)

    result = run_engine_replayed(
        stream, prompts, max_new_tokens=n, repeats=repeats, eos=set() if ignore_eos else eos
    )
    result["versions"] = {"transformers": transformers.__version__, "torch": torch.__version__}
    return result


class _Replayed(int):
    """A token id carrying the time it was produced (transformers' generate is not a stream)."""

    stamp: float


def _replay(tokens: list[int], stamps: list[float]) -> Iterator[_Replayed]:
    for t, s in zip(tokens, stamps, strict=False):
        token = _Replayed(t)
        token.stamp = s
        yield token


def run_engine_replayed(
    stream: Callable[[list[int]], Iterable[_Replayed]],
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    repeats: int,
    eos: set[int],
) -> dict[str, Any]:
    """`run_engine` for an engine whose tokens come after the fact with their own stamps."""

    def timed(ids: list[int]) -> dict[str, Any]:
        start = time.perf_counter()
        toks = list(stream(ids))
        cut = next((i + 1 for i, t in enumerate(toks) if int(t) in eos), len(toks))
        toks = toks[: min(cut, max_new_tokens)]
        return {
            "prefill_s": toks[0].stamp - start,
            "decode_s": toks[-1].stamp - toks[0].stamp,
            "decode_tokens": len(toks) - 1,
            "token_ids": [int(t) for t in toks],
        }

    timed(prompts[0])
    passes = [[timed(p) for p in prompts] for _ in range(repeats)]
    rates = [
        sum(r["decode_tokens"] for r in ps) / max(sum(r["decode_s"] for r in ps), 1e-9)
        for ps in passes
    ]
    prefill_ms = [1000 * statistics.mean(r["prefill_s"] for r in ps) for ps in passes]
    return {
        "tokens_per_second": statistics.median(rates),
        "tokens_per_second_repeats": [round(x, 2) for x in rates],
        "prefill_ms_mean": round(statistics.median(prefill_ms), 1),
        "decode_tokens": sum(r["decode_tokens"] for r in passes[0]),
        "token_ids": [r["token_ids"] for r in passes[0]],
    }


def ensure_bundle(args: argparse.Namespace, beams: list[Any]) -> tuple[Path, str]:
    """The bundle to benchmark and a note on where its drafter came from."""
    from redrafter.demo import find_trained_drafter

    if args.bundle:
        return Path(args.bundle), "given with --bundle"
    # An int4 bundle drafts with the drafter distilled from the int4 model (issue 22 item 3).
    precision = "int4" if args.quantize == "int4" else "fp32"
    drafter = Path(args.drafter) if args.drafter else find_trained_drafter(precision)
    note = (
        f"drafter {drafter}"
        if drafter
        else "NO trained drafter found: autoregressive only for ours (pass --drafter DIR)"
    )
    quantization = None
    if args.quantize != "none":
        from redrafter.export.quantize import quantization as make

        method = args.quantize_method
        quantization = make(args.quantize, accuracy_level=args.accuracy_level, method=method)
        note += f", weights {args.quantize} {method} (accuracy level {args.accuracy_level})"
    return demo_bundle(drafter, beams, log=log, quantization=quantization), note


def run_ours(
    bundle_dir: Path,
    prompts: list[list[int]],
    beams: list[Any],
    *,
    threads: int,
    max_new_tokens: int,
    repeats: int,
    eos: set[int],
    ignore_eos: bool,
    portable: bool,
    prompt_lookup: str = "off",
    min_draft_prob: Sequence[float] = (0.0,),
    lookup_span: int = 4,
    lookup_min_ngram: int = 1,
    lookup_max_ngram: int = 3,
    on_partial: Callable[[dict[str, Any]], None] = lambda out: None,
    on_tokens: Callable[[list[list[int]]], None] | None = None,
) -> dict[str, Any]:
    """ORT CPU on the bundle, native kernel (and portable body): `run_configs` per
    implementation, plus (with `on_tokens`) one greedy autoregressive pass whose token ids go
    to `on_tokens` (to compare with the peers') and, as digests, into the first block."""
    from redrafter.bench.harness import PROMPT_LOOKUP_SETTINGS, run_configs, speculative_grid
    from redrafter.bench.shapes import with_graphs
    from redrafter.bench.tokens import digest_rows
    from redrafter.bundle import load_bundle
    from redrafter.decoding import AUTOREGRESSIVE
    from redrafter.ops import library_path as native_library
    from redrafter.pipeline import Pipeline
    from redrafter.runtimes.onnxruntime import OnnxRuntime

    bundle = load_bundle(bundle_dir)
    usable, skipped = with_graphs(beams, bundle.drafter_graphs)
    out: dict[str, Any] = {"bundle": str(bundle_dir), "dtype": bundle.dtype}
    if skipped:
        out["beams_without_graph"] = [f"W{b.width} L{b.length}" for b in skipped]
    impls = ["native"] if native_library() is not None else []
    if portable or not impls:
        impls.append("portable")
    stop = () if ignore_eos else tuple(sorted(eos))
    spec = speculative_grid(
        usable,
        max_new_tokens=max_new_tokens,
        packing=bundle.packing,
        prompt_lookup=PROMPT_LOOKUP_SETTINGS[prompt_lookup],
        min_draft_prob=min_draft_prob,
        lookup_span=lookup_span,
        lookup_min_ngram=lookup_min_ngram,
        lookup_max_ngram=lookup_max_ngram,
    )
    for impl in impls:
        rt = OnnxRuntime(bundle, native=impl == "native", threads=threads)
        log(f"ours: onnxruntime {rt.implementation}, {len(usable)} beam shape(s), int4 {rt.int4}")
        out["int4_kernel"] = rt.int4  # 'redrafter' (MatMulInt4), 'onnxruntime' or None
        before = cpu_seconds()
        results = run_configs(
            rt,
            prompts,
            spec,
            max_new_tokens=max_new_tokens,
            repeats=repeats,
            eos_token_ids=stop,
            on_run=lambda name, i=impl: log(f"  {i}: {name}"),
        )
        results["other_processes_cores"] = other_load(before, cpu_seconds())
        if impl == impls[0] and on_tokens is not None:
            pipe = Pipeline(rt, None, stop)
            ar = AUTOREGRESSIVE.replace(max_new_tokens=max_new_tokens)
            ids = [pipe.generate([p], ar).token_ids[0] for p in prompts]
            results["token_digests"] = digest_rows(ids)
            on_tokens(ids)
        out[impl] = results
        on_partial(out)  # saved now: the portable run that follows is slow
        del rt
    return out


def encode_prompts(
    n_jargon: int, n_code: int, offset: int, heldout: bool
) -> tuple[list[list[int]], list[Any], tuple[int, ...]]:
    """The benchmark prompts' token ids (the demo tokenizer), the prompts themselves and the
    stop tokens: `heldout_shared_prompts`, else `shared_prompts` from `offset`."""
    from redrafter.demo import find_demo_gguf, heldout_shared_prompts, shared_prompts

    texts = (
        heldout_shared_prompts(n_jargon, n_code)
        if heldout
        else shared_prompts(n_jargon, n_code, offset=offset)
    )
    ids, eos = prompt_ids(find_demo_gguf(), texts)
    return ids, texts, eos


def engine_tokens(result: dict[str, Any], reference: list[list[int]] | None) -> dict[str, Any]:
    """A peer's result with its decoded ids replaced by digests and counts, and (when our
    autoregressive ids are known) how far they agree with ours, common prefix included."""
    from redrafter.bench.tokens import compare_tokens, digest_rows

    ids = result.pop("token_ids", None)
    if ids is not None:
        result["token_digests"] = digest_rows(ids)
        if reference is not None:
            result["agreement_with_ours_ar"] = compare_tokens(reference, ids).to_dict()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--setup",
        nargs="*",
        choices=["genai", "llamacpp"],
        default=None,
        help="create the peer venvs and models (default: both), then exit",
    )
    parser.add_argument("--bundle", help="our bundle (default: export one from the GGUF)")
    parser.add_argument(
        "--drafter",
        help="drafter folder for the default bundle "
        "(default: the trained demo drafter, if one is cached)",
    )
    parser.add_argument("--beams", default="4x5,2x5", help="WxL list for ours [4x5,2x5]")
    add_tree_arguments(parser, lookup_default="off", note=" (ours)")
    parser.add_argument("--jargon", type=int, default=4, help="Jargon chat prompts [4]")
    parser.add_argument("--code", type=int, default=4, help="HumanEval code prompts [4]")
    parser.add_argument(
        "--prompt-set",
        choices=["heldout", "shared"],
        default="heldout",
        help="heldout: entries the demo drafter never trains on [default]; shared: "
        "redrafter.demo.shared_prompts with --offset",
    )
    parser.add_argument("--offset", type=int, default=0, help="shared prompt offset [0]")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--interleave",
        action="store_true",
        help="one repeat per engine per round, --repeats rounds; ratios also per round",
    )
    parser.add_argument(
        "--ignore-eos", action="store_true", help="decode exactly --max-new-tokens on every engine"
    )
    parser.add_argument(
        "--quantize",
        choices=["none", "int4", "int8"],
        default="none",
        help="export ours with quantized weights (export --quantize) [none]",
    )
    parser.add_argument(
        "--quantize-method",
        choices=["rtn", "hqq", "gguf"],
        default="rtn",
        help="with --quantize: export --quantize-method (gguf keeps the GGUF's Q4_1 blocks) [rtn]",
    )
    parser.add_argument(
        "--accuracy-level",
        type=int,
        default=1,
        help="with --quantize: MatMulNBits compute type (1 fp32, 4 int8) [1]",
    )
    parser.add_argument(
        "--portable",
        action="store_true",
        help="also time ours with the portable ONNX TreeAttention body",
    )
    parser.add_argument(
        "--only",
        default="ours,transformers,genai-fp32,genai-int4,llamacpp",
        help="comma list of engines to run",
    )
    parser.add_argument("--name", default="peers", help="results file name [peers]")
    parser.add_argument(
        "--wait-idle",
        type=float,
        default=0,
        metavar="MIN",
        help="first wait up to MIN minutes for other processes to go quiet",
    )
    parser.add_argument("--worker", choices=["genai", "llamacpp"], help=argparse.SUPPRESS)
    parser.add_argument("--job", help=argparse.SUPPRESS)
    parser.add_argument("--summarize", metavar="JSON", help="recompute the summary of a saved run")
    args = parser.parse_args()

    if args.worker:
        worker_main(args.worker, args.job)
        return
    if args.summarize:  # re-summarize a saved (e.g. interrupted) run
        payload = json.loads(Path(args.summarize).read_text())
        payload["summary"] = summarize(payload)
        print_summary(payload)
        Path(args.summarize).write_text(json.dumps(payload, indent=2) + "\n")
        return
    if args.setup is not None:
        setup(args.setup or ["genai", "llamacpp"])
        return

    from redrafter.bench.rounds import merge_rounds
    from redrafter.bench.shapes import parse_beams
    from redrafter.demo import find_demo_gguf
    from redrafter.errors import ConfigError

    wanted = [x.strip() for x in args.only.split(",") if x.strip()]
    try:
        beams = parse_beams(args.beams)
    except ConfigError as e:
        parser.error(f"--beams: {e}")
    if "ours" in wanted:  # export (if needed) before the idle check: it is not timed
        bundle_dir, note = ensure_bundle(args, beams)
    if args.wait_idle:
        wait_for_idle(args.wait_idle, log=log)
    idle = idle_report(3.0)
    info = machine()
    log(
        f"machine: load {idle['loadavg']}, other processes {idle['other_processes_cores']} "
        f"cores{'' if idle['idle'] else '  <-- BUSY: timings are skewed'}"
    )
    prompts, texts, stop = encode_prompts(
        args.jargon, args.code, args.offset, args.prompt_set == "heldout"
    )
    gguf = find_demo_gguf()
    eos = set(stop)
    common = dict(
        max_new_tokens=args.max_new_tokens,
        repeats=args.repeats,
        threads=args.threads,
        ignore_eos=args.ignore_eos,
    )
    payload: dict[str, Any] = {
        "machine": {**info, "idle_before": idle, "platform": platform.platform()},
        "env": {k: os.environ[k] for k in os.environ if k.startswith(("OPENBLAS", "OMP_"))},
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "model": gguf.name,
        "prompt_set": args.prompt_set,
        "prompts": [
            {"chat": t.chat, "text": t.text[:80], "tokens": len(p)}
            for t, p in zip(texts, prompts, strict=False)
        ],
        **common,
        "engines": {},
        "skipped": {},
    }
    skipped = payload["skipped"]
    reference: dict[str, list[list[int]]] = {}  # our AR token ids, in memory only

    def run_all(engines: dict[str, Any], common: dict[str, Any], first: bool = True) -> None:
        """Every wanted engine once (`common["repeats"]` repeats each), results into `engines`."""

        def record(name: str, label: str, fn: Callable[[], dict[str, Any]]) -> None:
            log(f"--- {label}")
            before = cpu_seconds()
            start = time.perf_counter()
            try:
                result = fn()
            except Exception as e:  # a broken peer must not sink the whole run
                skipped[name] = f"failed: {type(e).__name__}: {str(e)[-500:]}"
                log(f"    {skipped[name]}")
                return
            result = engine_tokens(result, reference.get("ours"))  # digests: never raw ids
            result["label"] = label
            result.setdefault("other_processes_cores", other_load(before, cpu_seconds()))
            result.pop("partial", None)
            result["wall_s"] = round(time.perf_counter() - start, 1)
            engines[name] = result
            save(args.name, payload)  # after every engine: an interrupted run keeps its figures
            tps = result.get("tokens_per_second")
            log(f"    {tps:.1f} tok/s" if tps else "    done")

        if "ours" in wanted:
            payload["drafter_note"] = note
            label = "ours: ONNX Runtime CPU fp32 (redrafter)"

            def partial(out: dict[str, Any]) -> None:
                engines["ours"] = {**out, "label": label, "partial": True}
                save(args.name, payload)

            def ours() -> dict[str, Any]:
                return run_ours(
                    bundle_dir,
                    prompts,
                    beams,
                    eos=eos,
                    portable=args.portable,
                    prompt_lookup=args.prompt_lookup,
                    min_draft_prob=args.min_draft_prob,
                    lookup_span=args.lookup_span,
                    lookup_min_ngram=args.lookup_min_ngram,
                    lookup_max_ngram=args.lookup_max_ngram,
                    on_partial=partial,
                    on_tokens=(lambda ids: reference.update(ours=ids)) if first else None,
                    **common,
                )  # type: ignore[arg-type]

            record("ours", label, ours)
        job = {"prompts": prompts, "eos": sorted(eos), "gguf": str(gguf), **common}
        for precision in GENAI_PRECISIONS:
            name = f"genai-{precision}"
            if name not in wanted:
                continue
            why = genai_ready(precision)
            if why:
                skipped[name] = why
                continue
            record(
                name,
                f"onnxruntime-genai, {precision}",
                lambda p=precision: run_worker(
                    GENAI_VENV, "genai", {**job, "model_dir": str(MODELS / f"genai-{p}")}
                ),
            )
        if "llamacpp" in wanted:
            why = llamacpp_ready()
            if why:
                skipped["llamacpp"] = why
            else:
                record(
                    "llamacpp",
                    "llama.cpp (llama-cpp-python), Q4_1 GGUF",
                    lambda: run_worker(LLAMA_VENV, "llamacpp", job),
                )
        if "transformers" in wanted:  # last: torch suffers most when other work shares the cores
            record(
                "transformers",
                "HF transformers generate, fp32",
                lambda: run_transformers(prompts, eos=eos, **common),  # type: ignore[arg-type]
            )

    if args.interleave:
        payload["interleaved"] = True
        payload["rounds"] = []
        for r in range(args.repeats):
            log(f"=== round {r + 1}/{args.repeats}")
            payload["rounds"].append({})
            run_all(payload["rounds"][-1], {**common, "repeats": 1}, first=r == 0)
        payload["engines"] = merge_rounds(payload.pop("rounds"))
    else:
        run_all(payload["engines"], common)
    payload["idle_after"] = idle_report(2.0)
    payload["summary"] = summarize(payload)
    print_summary(payload)
    save(args.name, payload)


def summarize(payload: dict[str, Any]) -> dict[str, Any]:
    """Table rows and our tokens/s over each peer's (`redrafter.bench.rounds.summarize_engines`)."""
    from redrafter.bench.rounds import summarize_engines

    return summarize_engines(payload["engines"], interleaved=bool(payload.get("interleaved")))


def print_summary(payload: dict[str, Any]) -> None:
    """The run's tables (markdown) and skipped peers, on stdout."""
    s = payload["summary"]
    print(
        f"\n{payload['model']}: {len(payload['prompts'])} prompts x "
        f"{payload['max_new_tokens']} new tokens, greedy, {payload['threads']} threads, "
        f"median of {payload['repeats']}"
        + (" interleaved rounds" if payload.get("interleaved") else "")
    )
    idle = payload["machine"]["idle_before"]
    print(
        f"before: load {idle['loadavg']}, other processes {idle['other_processes_cores']} cores"
        f" ({'idle' if idle['idle'] else 'BUSY'})"
    )
    if payload.get("drafter_note"):
        print(f"ours: {payload['drafter_note']}")
    print("\n| engine | tok/s | tok/step | other procs (cores) | greedy tokens vs ours AR |")
    print("|---|---|---|---|---|")
    for r in s["rows"]:
        print(
            f"| {r['engine']} | {r['tokens_per_second']} | {r.get('tokens_per_step', '')} | "
            f"{r.get('other_processes_cores')} | {r.get('same_tokens_as_ours_ar') or ''} |"
        )
    best = s["ours_best_speculative"]
    print("\n| peer | peer tok/s | ours AR / peer | ours speculative / peer | per round |")
    print("|---|---|---|---|---|")
    for name, r in s["ratios"].items():
        tps = payload["engines"][name]["tokens_per_second"]
        rounds = ", ".join(f"{x:.2f}" for x in r.get("ours_spec_over_peer_rounds", []))
        print(
            f"| {name} | {tps:.1f} | {r['ours_ar_over_peer']} | {r['ours_spec_over_peer']} | "
            f"{rounds} |"
        )
    if best:
        print(
            f"\nours speculative = {best['config']}: {best['tokens_per_second']:.1f} tok/s, "
            f"{best['tokens_per_step']:.2f} tok/step"
        )
    for name, why in payload["skipped"].items():
        print(f"skipped {name}: {why}")


if __name__ == "__main__":
    main()
