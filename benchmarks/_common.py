"""Shared bits of the benchmark scripts: machine facts, idleness, saving results."""

from __future__ import annotations

import datetime
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def cpu_busy_fraction(seconds: float = 1.0) -> float:
    """Fraction of all CPUs busy over `seconds` (from /proc/stat): other load skews timings."""

    def snapshot() -> tuple[int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
        idle = fields[3] + fields[4]
        return sum(fields), idle

    t0, i0 = snapshot()
    time.sleep(seconds)
    t1, i1 = snapshot()
    return 1.0 - (i1 - i0) / max(t1 - t0, 1)


def machine() -> dict[str, Any]:
    import numpy
    import onnxruntime
    import torch

    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "onnxruntime": onnxruntime.__version__,
        "numpy": numpy.__version__,
        "cpu_busy_before_run": round(cpu_busy_fraction(), 3),
    }


def save(name: str, payload: dict[str, Any]) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"saved {path}")
    return path


SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def shared_prompts(n_jargon: int, n_code: int, *, offset: int = 0) -> list[tuple[str, bool]]:
    """Real prompts from ../shared/data: (text, chat) pairs. Jargon File terms become chat
    questions; HumanEval prompts are raw code to continue. `offset` picks a later slice (e.g.
    to stay clear of drafter-training data)."""
    import gzip

    entries = [
        json.loads(line)
        for line in (SHARED_DATA / "jargon-file" / "entries.jsonl").read_text().splitlines()
        if line.strip()
    ]
    step = max(1, len(entries) // max(n_jargon, 1))
    picked = entries[offset % step :: step][:n_jargon]
    prompts = [(f"Explain the computing slang term '{e['term']}'.", True) for e in picked]
    with gzip.open(SHARED_DATA / "humaneval" / "HumanEval.jsonl.gz", "rt") as f:
        code = [json.loads(line)["prompt"] for line in f if line.strip()]
    prompts += [(p, False) for p in code[offset : offset + n_code]]
    return prompts
