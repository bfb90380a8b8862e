"""Benchmark output: a Markdown table, a JSON document and a PNG plot of the speed-up over the
(W, L) grid."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from redrafter.bundle import Bundle
from redrafter.decoding.runtime import Runtime
from redrafter.pipeline import implementation_of


def markdown_table(results: dict[str, Any]) -> str:
    """One row per configuration of `run_configs` results: throughput, speed-up, tokens and
    verified tokens per step, ms per step and per phase, latency percentiles, peak RSS."""
    head = (
        "| config | tok/s | speed-up | tok/step | verified/step | ms/step | draft | verify "
        "| accept+commit | host | p50 ms/tok | p95 ms/tok | peak RSS MB |"
    )
    lines = [head, "|" + "---|" * 13]
    for name, r in results.items():
        p = r["ms_per_step_by_phase"]
        lines.append(
            f"| {name} | {r['tokens_per_second']:.1f} | {r['speedup']:.2f}x | "
            f"{r['tokens_per_step']:.2f} | {r['verified_per_step']:.2f} | "
            f"{r['ms_per_step']:.1f} | {p['draft']:.1f} | "
            f"{p['verify']:.1f} | {p['accept_commit']:.1f} | {p['host']:.1f} | "
            f"{r['token_latency_ms_p50']:.1f} | {r['token_latency_ms_p95']:.1f} | "
            f"{r['peak_rss_mb']:.0f} |"
        )
    return "\n".join(lines)


def bench_title(
    bundle: Bundle, runtime: Runtime, *, device: str, prompts: int, max_new_tokens: int
) -> str:
    """The one-line heading of a benchmark (printed above the table, the plot's title): bundle,
    runtime, implementation, device, and how many prompts x tokens."""
    return (
        f"{bundle.root.name}: {runtime.name} ({implementation_of(runtime)}, {device}), "
        f"{prompts} prompts x {max_new_tokens} tokens"
    )


def bench_payload(
    bundle: Bundle,
    runtime: Runtime,
    results: dict[str, Any],
    *,
    device: str,
    prompts: int,
    max_new_tokens: int,
    repeats: int,
) -> dict[str, Any]:
    """The JSON document `redrafter bench --json` writes: what ran (bundle path, runtime,
    implementation, device, intra-op `threads` (see `threads_of`), the bundle's dtype, prompt
    count, max_new_tokens, repeats) and `results` (from `redrafter.bench.harness.run_configs`)."""
    return {
        "bundle": str(bundle.root),
        "runtime": runtime.name,
        "implementation": implementation_of(runtime),
        "device": device,
        "threads": threads_of(runtime),
        "dtype": bundle.dtype,
        "precision": bundle.precision,  # int4/int8 for quantized weights, else the dtype
        "quantization": None
        if bundle.manifest.quantization is None
        else dataclasses.asdict(bundle.manifest.quantization),
        "prompts": prompts,
        "max_new_tokens": max_new_tokens,
        "repeats": repeats,
        "results": results,
    }


def threads_of(runtime: Runtime) -> int | None:
    """The runtime's intra-op thread count (`runtime.threads`); None where the runtime does not
    set one (ONNX Runtime without --threads: its default, one per physical core)."""
    threads = getattr(runtime, "threads", None)
    return None if threads is None else int(threads)


def save_json(payload: dict[str, Any], path: str | Path) -> None:
    """Write `payload` as indented JSON (with a final newline)."""
    Path(path).write_text(json.dumps(payload, indent=2) + "\n")


def plot_speedup(results: dict[str, Any], path: str | Path, *, title: str) -> None:
    """`speedup_figure` saved as a PNG at `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = speedup_figure(results, title=title)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def speedup_figure(results: dict[str, Any], *, title: str) -> Any:
    """Heat map of speed-up over beam width x beam length (annotated); one panel
    per (prompt-lookup, draft-probability floor) setting present in the results, all on one
    colour scale (centred on 1x) with one colour bar; the figure is at least as wide as the
    title. Returns the matplotlib figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    spec = [r for r in results.values() if "beam_width" in r]
    widths = sorted({r["beam_width"] for r in spec})
    lengths = sorted({r["beam_length"] for r in spec})

    def setting(r: dict[str, Any]) -> tuple[bool, float]:
        return bool(r.get("prompt_lookup", False)), float(r.get("min_draft_prob", 0.0))

    panels = sorted({setting(r) for r in spec})
    speedups = [float(r["speedup"]) for r in spec]
    # One colour scale for every panel (the same quantity), centred on 1x so that slower than
    # autoregressive and faster read alike across panels.
    spread = max([abs(v - 1.0) for v in speedups] + [0.05])
    norm = matplotlib.colors.Normalize(vmin=1.0 - spread, vmax=1.0 + spread)
    panel_width = 1.4 + 1.1 * len(lengths)
    # Wide enough for the title (~0.075 in per 9 pt character), however few panels there are.
    width = max(len(panels) * panel_width + 1.2, 0.075 * len(title) + 0.6)
    fig, axes = plt.subplots(
        1,
        len(panels),
        figsize=(width, 2.0 + 0.9 * len(widths)),
        squeeze=False,
        layout="constrained",
    )
    image = None
    for ax, panel in zip(axes[0], panels, strict=True):
        grid = np.full((len(widths), len(lengths)), np.nan)
        for r in spec:
            if setting(r) == panel:
                grid[widths.index(r["beam_width"]), lengths.index(r["beam_length"])] = r["speedup"]
        image = ax.imshow(grid, cmap="RdYlGn", norm=norm, aspect="auto")
        ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
        ax.set_yticks(range(len(widths)), [str(w) for w in widths])
        ax.set_xlabel("beam length L")
        ax.set_ylabel("beam width W")
        for i in range(len(widths)):
            for j in range(len(lengths)):
                if not np.isnan(grid[i, j]):
                    ax.text(j, i, f"{grid[i, j]:.2f}x", ha="center", va="center", color="black")
        lookup, floor = panel
        label = "with prompt lookup" if lookup else "drafter only"
        ax.set_title(label + (f", drafts p >= {floor:g}" if floor > 0 else ""), fontsize=9)
    if image is not None:
        fig.colorbar(image, ax=list(axes[0]), label="speed-up vs autoregressive")
    fig.suptitle(title, fontsize=9)
    return fig
