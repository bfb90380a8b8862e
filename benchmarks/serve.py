"""`redrafter serve` under load, continuous batching: aggregate tokens/s, p50/p95 time to first
token and inter-token latency at 1, 4 and 16 concurrent streaming clients, the speculative
server against the autoregressive one on the same bundle and runtime, for each --max-batch,
through the official `openai` client (AsyncOpenAI) over 127.0.0.1.

    REDRAFTER_SMOLLM2_GGUF=... .venv/bin/python -m benchmarks.serve [--bundle DIR]
        [--beam 1x5] [--concurrency 1,4,16] [--max-batch 4] [--requests 16] [--max-tokens 64]
        [--threads 2] [--rounds 1] [--prompt-lookup] [--min-draft-prob P]
        [--speculate-max-rows default,4] [--name serve]

Without --bundle it serves the demo bundle: the demo GGUF with the trained demo drafter,
exported once with a drafter graph for --beam (default W1 L5) and cached (`benchmarks._common.
demo_bundle`). Each server is `redrafter serve` in its own process (`--threads` runtime
threads; one speculative and one autoregressive server per --max-batch value, all started
first, idle while another is measured); the clients run in this process on one event loop.

Prompts: the 8 held-out demo prompts (4 Jargon chat questions as chat completions, 4 HumanEval
tasks as completions; text completions only when the tokenizer has no chat template), greedy,
stopping at EOS or --max-tokens. A level of C clients sends max(--requests, 2 C) requests,
prompt i % 8 for request i, each client taking the next request as it finishes one. Levels
are interleaved across servers (level by level, every server in turn, --rounds times), so
machine drift stays out of the ratios.

Reported per server and level: completion tokens per second of wall time (all clients),
TTFT p50/p95 (request sent -> first text), TPOT p50/p95 (a request's mean time per output
token after its first: its inter-token latency; a speculative chunk carries several tokens),
chunk-gap p95 (the longest stalls a client sees, e.g. while a row joins). Greedy replies are
compared by digest across every server and level: speculation and batching must not change
them (`greedy_replies_match`, with the prompts that differ). Goal (issue 20): at 4 clients,
speculative >= 1.5x autoregressive aggregate tokens/s.

What to expect on a CPU: a batch's verify turns compute-bound at a few tens of tokens per step,
so the rows' trees (W·L tokens each, padded to the batch's largest) cost what the tokens cost,
while autoregressive rows ride on the weights' one read. A probe on one busy core (decode() of
4 held-out prompts, 48 tokens, not a figure): autoregressive 34 ms/step at B=4 (26 at B=1);
W1 L5 74 ms/step at B=4 for 1.46 tokens per row (32 ms at B=1). Narrow, pruned trees
(`--prompt-lookup --min-draft-prob 0.25`, `--beam 1x5`) are the ones to measure under load.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import hashlib
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks._common import demo_bundle, idle_report, machine, save

MODEL = "bench"


@dataclasses.dataclass(frozen=True)
class Server:
    """One `redrafter serve` configuration."""

    speculative: bool
    max_batch: int
    speculate_max_rows: int | None = None  # None: the server's default (1 on the CPU)

    @property
    def name(self) -> str:
        rows = "" if self.speculate_max_rows is None else f" s{self.speculate_max_rows}"
        return f"{'speculative' if self.speculative else 'autoregressive'} b{self.max_batch}{rows}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", help="bundle directory [the demo bundle]")
    parser.add_argument("--beam", default="1x5", help="drafter beam WxL [1x5]")
    parser.add_argument("--concurrency", default="1,4,16", help="concurrent clients [1,4,16]")
    parser.add_argument("--max-batch", default="4", help="server --max-batch values [4]")
    parser.add_argument("--requests", type=int, default=16, help="requests per level, >= 2C [16]")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2, help="runtime threads per server [2]")
    parser.add_argument("--rounds", type=int, default=1, help="interleaved rounds [1]")
    parser.add_argument("--prompt-lookup", action="store_true", help="add the lookup beam")
    parser.add_argument("--min-draft-prob", type=float, default=0.0, help="draft floor [0]")
    parser.add_argument(
        "--speculate-max-rows",
        default="default",
        help="comma list, one speculative server per value per --max-batch: 'default' (the "
        "server's: 1 on the CPU) or N (server --speculate-max-rows N) [default]",
    )
    parser.add_argument("--name", default="serve", help="results file name [serve]")
    args = parser.parse_args()
    levels = [int(x) for x in args.concurrency.split(",")]
    batches = [int(x) for x in args.max_batch.split(",")]
    width, length = (int(x) for x in args.beam.lower().split("x"))

    bundle, prompts = _bundle_and_prompts(args.bundle, width, length)
    if not _has_chat_template(bundle):
        prompts = [dataclasses.replace(p, chat=False) for p in prompts]
    spec_rows = [None if x == "default" else int(x) for x in args.speculate_max_rows.split(",")]
    servers = [
        server
        for b in batches
        for server in (*(Server(True, b, n) for n in spec_rows), Server(False, b))
    ]
    load_before = idle_report()
    rows: list[dict[str, Any]] = []
    digests: dict[int, set[str]] = {}  # prompt -> digests of its greedy replies, everywhere
    with _Servers(bundle, servers, args, width, length) as urls:
        for server in servers:  # warm-up: first-call overheads (sessions, bindings)
            asyncio.run(_level(urls[server], prompts, 2, 2, args.max_tokens))
        for r in range(args.rounds):
            for level in levels:
                for server in servers:
                    requests = max(args.requests, 2 * level)
                    row, replies = asyncio.run(
                        _level(urls[server], prompts, level, requests, args.max_tokens)
                    )
                    row |= {"server": server.name, "round": r}
                    row |= {"speculative": server.speculative, "max_batch": server.max_batch}
                    row |= {"speculate_max_rows": server.speculate_max_rows}
                    rows.append(row)
                    for i, digest in replies:
                        digests.setdefault(i % len(prompts), set()).add(digest)
                    print(_line(server, level, row), flush=True)
    table = _table(rows, servers, levels)
    differ = sorted(i for i, d in digests.items() if len(d) > 1)
    payload = {
        "machine": machine(),
        "load_before": load_before,
        "bundle": str(Path(bundle).resolve()),
        "beam": f"W{width} L{length}",
        "threads": args.threads,
        "max_batch": batches,
        "speculate_max_rows": spec_rows,
        "prompt_lookup": args.prompt_lookup,
        "min_draft_prob": args.min_draft_prob,
        "max_tokens": args.max_tokens,
        "rounds": args.rounds,
        "serving": "continuous batching (BatchEngine), one server process per configuration",
        "results": rows,
        "median_by_level": table,
        "greedy_replies_match": not differ,
        "prompts_that_differ": differ,
    }
    print()
    print(_markdown(table))
    print("greedy replies match across servers and levels:", not differ, differ or "")
    save(args.name, payload)


def _bundle_and_prompts(bundle: str | None, width: int, length: int) -> tuple[Path, list[Any]]:
    """The bundle to serve and the requests' prompts (`.text`, `.chat`)."""
    from redrafter.config import BeamShape
    from redrafter.demo import find_trained_drafter, heldout_shared_prompts

    prompts = heldout_shared_prompts(4, 4)
    if bundle is not None:
        return Path(bundle), prompts
    drafter = find_trained_drafter()
    if drafter is None:
        raise SystemExit("error: no trained drafter found; run `make demo` or pass --bundle DIR")
    return demo_bundle(drafter, [BeamShape(width, length)]), prompts


def _has_chat_template(bundle: Path) -> bool:
    from redrafter.pipeline import load

    pipe = load(bundle, threads=1)
    return getattr(pipe.tokenizer, "chat_template", None) is not None


class _Servers:
    """`redrafter serve` processes, one per configuration, on free 127.0.0.1 ports."""

    def __init__(
        self, bundle: Path, servers: list[Server], args: Any, width: int, length: int
    ) -> None:
        self.commands: dict[Server, list[str]] = {}
        self.ports: dict[Server, int] = {}
        for server in servers:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                self.ports[server] = s.getsockname()[1]
            command = [sys.executable, "-m", "redrafter.cli", "serve", "--bundle", str(bundle)]
            command += ["--port", str(self.ports[server]), "--threads", str(args.threads)]
            command += ["--max-batch", str(server.max_batch), "--model-name", MODEL]
            command += ["--max-queue", "256"]
            if server.speculative:
                command += ["--beam-width", str(width), "--beam-length", str(length)]
                command += ["--min-draft-prob", str(args.min_draft_prob)]
                command += ["--prompt-lookup"] if args.prompt_lookup else []
                if server.speculate_max_rows is not None:
                    command += ["--speculate-max-rows", str(server.speculate_max_rows)]
            else:
                command += ["--autoregressive"]
            self.commands[server] = command
        self.processes: list[subprocess.Popen] = []

    def __enter__(self) -> dict[Server, str]:
        import httpx

        urls = {}
        for server, command in self.commands.items():
            process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            self.processes.append(process)
            url = f"http://127.0.0.1:{self.ports[server]}"
            for _ in range(2400):  # loading a bundle takes a while on a busy machine
                if process.poll() is not None:
                    raise SystemExit(f"{server.name}: {process.stderr.read().decode()}")  # type: ignore[union-attr]
                try:
                    if httpx.get(f"{url}/health").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.05)
            else:
                raise SystemExit(f"{server.name} did not answer /health within 120 s")
            urls[server] = f"{url}/v1"
        return urls

    def __exit__(self, *exc: object) -> None:
        for process in self.processes:
            process.terminate()
        for process in self.processes:
            process.wait(30)


async def _level(
    url: str, prompts: list[Any], clients: int, requests: int, max_tokens: int
) -> tuple[dict[str, Any], list[tuple[int, str]]]:
    """`requests` streamed greedy requests through `clients` concurrent clients: the level's
    figures and each request's (index, reply digest)."""
    import openai

    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(requests):
        queue.put_nowait(i)
    runs: list[dict[str, Any]] = []

    async def client_loop() -> None:
        client = openai.AsyncOpenAI(base_url=url, api_key="unused", max_retries=0, timeout=600)
        try:
            while not queue.empty():
                runs.append(await _one(client, queue.get_nowait(), prompts, max_tokens))
        finally:
            await client.close()

    before = _server_counters(url)
    start = time.perf_counter()
    await asyncio.gather(*(client_loop() for _ in range(clients)))
    wall = time.perf_counter() - start
    after = _server_counters(url)
    done = {k: after[k] - before.get(k, 0.0) for k in after}
    tokens = sum(r["tokens"] for r in runs)
    ttft = [r["ttft"] for r in runs]
    tpot = [r["tpot"] for r in runs if r["tpot"] is not None]
    gaps = [g for r in runs for g in r["gaps"]]
    row = {
        "clients": clients,
        "requests": requests,
        "completion_tokens": tokens,
        "wall_seconds": round(wall, 3),
        "tokens_per_second": round(tokens / wall, 2),
        "ttft_p50_ms": _ms(statistics.median(ttft)),
        "ttft_p95_ms": _ms(_percentile(ttft, 0.95)),
        "tpot_p50_ms": _ms(statistics.median(tpot)) if tpot else None,
        "tpot_p95_ms": _ms(_percentile(tpot, 0.95)) if tpot else None,
        "chunk_gap_p95_ms": _ms(_percentile(gaps, 0.95)) if gaps else None,
    }
    steps = done.get("decode_steps_total", 0.0)
    if steps:  # the server's own view of the level (its /metrics counters, differenced)
        row["server_steps"] = int(steps)
        row["rows_per_step"] = round(done["row_steps_total"] / steps, 2)
        row["speculative_step_share"] = round(done.get("speculative_steps_total", 0.0) / steps, 3)
        row["server_ms_per_phase"] = {
            k.removeprefix("phase_").removesuffix("_s"): round(1000 * v, 1)
            for k, v in done.items()
            if k.startswith("phase_")
        }
    return row, [(r["index"], r["digest"]) for r in runs]


def _server_counters(url: str) -> dict[str, float]:
    """The server's unlabelled counters (`redrafter_*_total`) and decode seconds by phase
    (`phase_<name>_s`), from its /metrics."""
    import httpx

    text = httpx.get(url.removesuffix("/v1") + "/metrics", timeout=30).text
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name, value = line.rsplit(" ", 1)
        if name.startswith("redrafter_step_phase_seconds_total{phase="):
            phase = name.split('"')[1]
            out[f"phase_{phase}_s"] = float(value)
        elif name.endswith("_total") and "{" not in name:
            out[name.removeprefix("redrafter_")] = float(value)
    return out


async def _one(client: Any, i: int, prompts: list[Any], max_tokens: int) -> dict[str, Any]:
    """One streamed greedy request: its TTFT, TPOT, chunk gaps, tokens and reply digest."""
    prompt = prompts[i % len(prompts)]
    common = {"model": MODEL, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    start = time.perf_counter()
    if prompt.chat:
        messages = [{"role": "user", "content": prompt.text}]
        stream = await client.chat.completions.create(messages=messages, **common)
    else:
        stream = await client.completions.create(prompt=prompt.text, **common)
    parts: list[str] = []
    arrivals: list[float] = []
    tokens = 0
    async for chunk in stream:
        if chunk.choices:
            c = chunk.choices[0]
            piece = (c.delta.content if prompt.chat else c.text) or ""
            if piece:
                arrivals.append(time.perf_counter() - start)
                parts.append(piece)
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    total = time.perf_counter() - start
    first = arrivals[0] if arrivals else total
    tpot = (arrivals[-1] - first) / (tokens - 1) if tokens > 1 and arrivals else None
    return {
        "index": i,
        "ttft": first,
        "tpot": tpot,
        "gaps": [b - a for a, b in zip(arrivals, arrivals[1:], strict=False)],
        "tokens": tokens,
        "digest": hashlib.sha256("".join(parts).encode()).hexdigest()[:16],
    }


def _table(
    rows: list[dict[str, Any]], servers: list[Server], levels: list[int]
) -> list[dict[str, Any]]:
    """Medians over rounds per server and level, with speculative / autoregressive tok/s."""
    keys = ["tokens_per_second", "ttft_p50_ms", "ttft_p95_ms", "tpot_p50_ms", "tpot_p95_ms"]
    keys.append("chunk_gap_p95_ms")
    out = []
    for level in levels:
        for server in servers:
            mine = [r for r in rows if r["server"] == server.name and r["clients"] == level]
            entry: dict[str, Any] = {"server": server.name, "clients": level}
            for k in keys:
                values = [r[k] for r in mine if r[k] is not None]
                entry[k] = round(statistics.median(values), 2) if values else None
            out.append(entry)
        for server in (s for s in servers if s.speculative):
            spec = _find(out, server.name, level)
            ar = _find(out, f"autoregressive b{server.max_batch}", level)
            if spec and ar and ar["tokens_per_second"]:
                spec["speedup_vs_autoregressive"] = round(
                    spec["tokens_per_second"] / ar["tokens_per_second"], 2
                )
    return out


def _find(table: list[dict[str, Any]], name: str, level: int) -> dict[str, Any] | None:
    return next((e for e in table if e["server"] == name and e["clients"] == level), None)


def _markdown(table: list[dict[str, Any]]) -> str:
    head = "| server | clients | tok/s | x AR | TTFT p50/p95 ms | TPOT p50/p95 ms | gap p95 ms |"
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|"]
    for e in table:
        lines.append(
            f"| {e['server']} | {e['clients']} | {e['tokens_per_second']} | "
            f"{e.get('speedup_vs_autoregressive', '')} | {e['ttft_p50_ms']} / "
            f"{e['ttft_p95_ms']} | {e['tpot_p50_ms']} / {e['tpot_p95_ms']} | "
            f"{e['chunk_gap_p95_ms']} |"
        )
    return "\n".join(lines)


def _percentile(values: list[float], q: float) -> float:
    """The q-quantile of `values`, by linear interpolation."""
    values = sorted(values)
    at = q * (len(values) - 1)
    lo = int(at)
    hi = min(lo + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (at - lo)


def _ms(seconds: float) -> float:
    return round(1000 * seconds, 1)


def _line(server: Server, level: int, row: dict[str, Any]) -> str:
    return (
        f"{server.name:>18} x{level}: {row['tokens_per_second']:7.1f} tok/s, TTFT p50 "
        f"{row['ttft_p50_ms']:.0f} ms p95 {row['ttft_p95_ms']:.0f} ms, TPOT p50 "
        f"{row['tpot_p50_ms']} ms, {row['completion_tokens']} tokens in "
        f"{row['wall_seconds']:.1f} s"
        + (
            f", {row['rows_per_step']} rows/step, trees in {row['speculative_step_share']:.0%}"
            if "rows_per_step" in row
            else ""
        )
    )


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
