"""`redrafter serve` under load: aggregate tokens/s and p50/p95 time to first token at 1 and 4
concurrent streaming clients, the speculative server against the autoregressive one on the
same bundle and runtime, through the official `openai` client over 127.0.0.1.

    .venv/bin/python -m benchmarks.serve [--bundle DIR] [--concurrency 1,4] [--requests 8]
        [--max-tokens 64] [--threads 2] [--prompt-lookup] [--min-draft-prob P] [--name serve]

Without --bundle it serves the demo bundle (the demo GGUF with the trained demo drafter, beam
4x4; `make demo` installs both). The prompts are the 8 held-out demo prompts (4 Jargon chat
questions as chat completions, 4 HumanEval tasks as completions), greedy, stopping at EOS or
--max-tokens; each concurrency level sends --requests requests through that many clients.
This server decodes one request at a time (docs/serve.md), so more clients raise throughput
only by keeping the decoder busy between requests; TTFT grows with the queue. Greedy replies of
the two servers are compared (lossless speculation: they must match), by digest.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from benchmarks._common import demo_bundle, machine, save


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", help="bundle directory [the demo bundle]")
    parser.add_argument("--concurrency", default="1,4", help="concurrent clients [1,4]")
    parser.add_argument("--requests", type=int, default=8, help="requests per level [8]")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2, help="runtime threads [2]")
    parser.add_argument("--prompt-lookup", action="store_true", help="add the lookup beam")
    parser.add_argument("--min-draft-prob", type=float, default=0.0, help="draft floor [0]")
    parser.add_argument("--name", default="serve", help="results file name")
    args = parser.parse_args()
    levels = [int(x) for x in args.concurrency.split(",")]

    from redrafter.pipeline import implementation_of, load
    from redrafter.serve import ServeOptions

    bundle, prompts = _bundle_and_prompts(args.bundle)
    pipe = load(bundle, threads=args.threads)
    if getattr(pipe.tokenizer, "chat_template", None) is None:
        # e.g. a test bundle: no chat template, so every prompt goes as a text completion
        prompts = [dataclasses.replace(p, chat=False) for p in prompts]
    results: dict[str, Any] = {}
    digests: dict[str, list[str]] = {}
    for mode in ("speculative", "autoregressive"):
        if mode == "speculative" and not pipe.defaults.speculative:
            print("the bundle has no drafter: autoregressive only", file=sys.stderr)
            continue
        serve = ServeOptions(
            autoregressive=mode == "autoregressive",
            prompt_lookup=args.prompt_lookup,
            min_draft_prob=args.min_draft_prob,
        )
        with _server(pipe, serve) as url:
            _run_level(url, prompts, 1, 1, args.max_tokens)  # warm-up: first-call overheads
            for level in levels:
                row, replies = _run_level(url, prompts, level, args.requests, args.max_tokens)
                results[f"{mode}@{level}"] = row
                digests.setdefault(mode, replies)
                print(_line(mode, level, row))
    payload = {
        "machine": machine(),
        "bundle": str(Path(bundle).resolve()),
        "threads": args.threads,
        "implementation": implementation_of(pipe.runtime),
        "prompt_lookup": args.prompt_lookup,
        "min_draft_prob": args.min_draft_prob,
        "requests_per_level": args.requests,
        "max_tokens": args.max_tokens,
        "serving": "serial: one decode at a time (no continuous batching)",
        "results": results,
        "speedup_tokens_per_second": {
            str(level): results[f"speculative@{level}"]["tokens_per_second"]
            / results[f"autoregressive@{level}"]["tokens_per_second"]
            for level in levels
            if f"speculative@{level}" in results
        },
        "greedy_replies_match": (
            digests.get("speculative") == digests.get("autoregressive")
            if len(digests) == 2
            else None
        ),
    }
    print("speed-up (tokens/s):", payload["speedup_tokens_per_second"])
    print("greedy replies match:", payload["greedy_replies_match"])
    save(args.name, payload)


def _bundle_and_prompts(bundle: str | None) -> tuple[Path, list[Any]]:
    """The bundle to serve and the requests' prompts (`.text`, `.chat`)."""
    from redrafter.config import BeamShape
    from redrafter.demo import find_trained_drafter, heldout_shared_prompts

    prompts = heldout_shared_prompts(4, 4)
    if bundle is not None:
        return Path(bundle), prompts
    drafter = find_trained_drafter()
    if drafter is None:
        raise SystemExit("error: no trained drafter found; run `make demo` or pass --bundle DIR")
    return demo_bundle(drafter, [BeamShape(4, 4)]), prompts


class _server:
    """A `redrafter serve` app for `pipe` on a free 127.0.0.1 port, in a background thread."""

    def __init__(self, pipe: Any, serve: Any) -> None:
        import socket

        import uvicorn

        from redrafter.serve import build_app

        app = build_app(pipe, serve, model="bench")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        while not self.server.started:
            time.sleep(0.05)
        return f"http://127.0.0.1:{self.port}/v1"

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join()


def _run_level(
    url: str, prompts: list[Any], clients: int, requests: int, max_tokens: int
) -> tuple[dict[str, Any], list[str]]:
    """`requests` streamed requests through `clients` concurrent clients: aggregate tokens/s,
    TTFT percentiles and each prompt's reply digest (in prompt order)."""
    import openai

    local = threading.local()

    def one(i: int) -> tuple[float, float, int, str]:
        if not hasattr(local, "client"):
            local.client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)
        prompt = prompts[i % len(prompts)]
        common = {"model": "bench", "max_tokens": max_tokens, "temperature": 0, "stream": True}
        start = time.perf_counter()
        first = None
        parts: list[str] = []
        tokens = 0
        if prompt.chat:
            messages = [{"role": "user", "content": prompt.text}]
            stream = local.client.chat.completions.create(messages=messages, **common)
        else:
            stream = local.client.completions.create(prompt=prompt.text, **common)
        for chunk in stream:
            if chunk.choices:
                c = chunk.choices[0]
                piece = (c.delta.content if prompt.chat else c.text) or ""
                if piece and first is None:
                    first = time.perf_counter() - start
                parts.append(piece)
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
        total = time.perf_counter() - start
        digest = hashlib.sha256("".join(parts).encode()).hexdigest()[:16]
        return first if first is not None else total, total, tokens, digest

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        runs = list(pool.map(one, range(requests)))
    wall = time.perf_counter() - start
    ttft = sorted(r[0] for r in runs)
    tokens = sum(r[2] for r in runs)
    row = {
        "clients": clients,
        "requests": requests,
        "completion_tokens": tokens,
        "wall_seconds": round(wall, 3),
        "tokens_per_second": round(tokens / wall, 2),
        "ttft_p50_ms": round(1000 * statistics.median(ttft), 1),
        "ttft_p95_ms": round(1000 * _percentile(ttft, 0.95), 1),
        "latency_p50_ms": round(1000 * statistics.median(r[1] for r in runs), 1),
    }
    replies = [r[3] for r in runs[: len(prompts)]]
    return row, replies


def _percentile(values: list[float], q: float) -> float:
    """The q-quantile of sorted `values`, by linear interpolation."""
    at = q * (len(values) - 1)
    lo = int(at)
    hi = min(lo + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (at - lo)


def _line(mode: str, level: int, row: dict[str, Any]) -> str:
    return (
        f"{mode:>14} x{level}: {row['tokens_per_second']:7.1f} tok/s, TTFT p50 "
        f"{row['ttft_p50_ms']:.0f} ms p95 {row['ttft_p95_ms']:.0f} ms, "
        f"{row['completion_tokens']} tokens in {row['wall_seconds']:.1f} s"
    )


if __name__ == "__main__":
    main()
