"""Shared bits of the benchmark scripts: machine facts, idleness, saving results (with token
digests, never raw token ids), the cached demo bundle. Standard library only at import time:
`benchmarks.peers` also runs as a worker inside peer venvs that have no redrafter dependencies.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
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
    """Date, CPU, core count and the versions that shape timings; the busy fraction before."""
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


def save(name: str, payload: dict[str, Any], *, also_to: Path | None = None) -> Path:
    """Write `payload` as results/<name>.json (and into `also_to`, e.g. the device's $OUT).
    Results keep token digests and counts (`redrafter.bench.tokens`), never raw token ids: a
    payload with a `*token_ids` key is refused."""
    raw = _raw_token_ids(payload)
    if raw:
        raise ValueError(f"results must not hold raw token ids ({raw}): store token_digest()s")
    text = json.dumps(payload, indent=2) + "\n"
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(text)
    print(f"saved {path}")
    if also_to is not None:
        (also_to / f"{name}.json").write_text(text)
        print(f"saved {also_to / (name + '.json')}")
    return path


def _raw_token_ids(value: Any, where: str = "") -> str | None:
    """The path of the first `*token_ids` key in `value`, if any."""
    if isinstance(value, dict):
        for k, v in value.items():
            here = f"{where}.{k}" if where else str(k)
            if str(k).endswith("token_ids"):
                return here
            found = _raw_token_ids(v, here)
            if found:
                return found
    elif isinstance(value, list):
        for i, v in enumerate(value):
            found = _raw_token_ids(v, f"{where}[{i}]")
            if found:
                return found
    return None


# -- peers / roofline helpers (issue 8) ----------------------------------------------------------


def cpu_seconds() -> dict[str, float]:
    """CPU seconds so far: `busy` for the whole machine (from /proc/stat) and `own` for this
    process plus its finished children. Two snapshots give the CPU other processes used in
    between (`other_load`)."""
    import resource

    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    hz = os.sysconf("SC_CLK_TCK")
    busy = (sum(fields[:8]) - fields[3] - fields[4]) / hz  # all but idle and iowait
    own = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        r = resource.getrusage(who)
        own += r.ru_utime + r.ru_stime
    return {"busy": busy, "own": own, "wall": time.perf_counter()}


def other_load(before: dict[str, float], after: dict[str, float]) -> float:
    """Cores' worth of CPU that processes other than this one (and its children) used between
    two `cpu_seconds()` snapshots: 0 on an idle machine, up to the core count when saturated."""
    wall = max(after["wall"] - before["wall"], 1e-9)
    others = (after["busy"] - before["busy"]) - (after["own"] - before["own"])
    return round(max(others, 0.0) / wall, 3)


def busiest_processes(seconds: float = 2.0, top: int = 5) -> list[dict[str, Any]]:
    """The processes (other than this one) that used the most CPU over `seconds`, from
    /proc/<pid>/stat: who is competing for the cores right now."""

    def snap() -> dict[int, tuple[str, int]]:
        out = {}
        for d in Path("/proc").iterdir():
            if not d.name.isdigit() or int(d.name) == os.getpid():
                continue
            try:
                raw = (d / "stat").read_text()
            except OSError:
                continue
            name = raw[raw.index("(") + 1 : raw.rindex(")")]
            rest = raw[raw.rindex(")") + 2 :].split()
            out[int(d.name)] = (name, int(rest[11]) + int(rest[12]))  # utime + stime
        return out

    a = snap()
    time.sleep(seconds)
    b = snap()
    hz = os.sysconf("SC_CLK_TCK")
    used = [
        {"pid": pid, "name": name, "cores": round((t - a[pid][1]) / hz / seconds, 2)}
        for pid, (name, t) in b.items()
        if pid in a and t > a[pid][1]
    ]
    return sorted(used, key=lambda x: -x["cores"])[:top]


def idle_report(seconds: float = 2.0) -> dict[str, Any]:
    """Is the machine idle enough to time? Load averages, the busy fraction of all CPUs and
    the busiest other processes over `seconds`."""
    before = cpu_seconds()
    top = busiest_processes(seconds)
    after = cpu_seconds()
    busy = other_load(before, after)
    cores = os.cpu_count() or 1
    return {
        "loadavg": [round(x, 2) for x in os.getloadavg()],
        "other_processes_cores": busy,
        "idle": busy < 0.1 * cores,
        "busiest": top,
    }


def peers_dir() -> Path:
    """Where benchmark environments and exported models are cached, outside the repository:
    $REDRAFTER_PEERS_DIR, else ${XDG_CACHE_HOME:-~/.cache}/redrafter/peers."""
    if os.environ.get("REDRAFTER_PEERS_DIR"):
        return Path(os.environ["REDRAFTER_PEERS_DIR"])
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "redrafter" / "peers"


def demo_bundle(
    drafter: Path | None,
    beams: list[Any] | None = None,
    *,
    dtype: str = "float32",
    base: Path | None = None,
    log: Any = print,
    quantization: Any = None,
) -> Path:
    """An exported bundle of the demo GGUF (or `base`), with `drafter` (None: autoregressive
    only) and a drafter graph per beam shape, its weights quantized as `quantization` says
    (a `redrafter.bundle.Quantization`; None: float), cached under peers_dir()/bundles and
    re-exported only when the drafter folder, the quantization or the exporter's code change."""
    from redrafter.build import ExportOptions, export_bundle
    from redrafter.bundle import exporter_fingerprint
    from redrafter.config import BeamShape
    from redrafter.demo import find_demo_gguf

    base = base or find_demo_gguf()
    beams = beams or [BeamShape(4, 4)]
    shapes = "-".join(f"{b.width}x{b.length}" for b in beams)
    key = (
        "ar-only"
        if drafter is None
        else f"{drafter.resolve().name}-{int(drafter.stat().st_mtime)}-{shapes}"
    )
    q = quantization
    if q is not None:
        sym = "sym" if q.symmetric else "asym"
        key += f"-{q.weights}-{q.method}-b{q.block_size}-{sym}-acc{q.accuracy_level}"
    stem = f"{base.stem}-{dtype}-{key}-"
    out = peers_dir() / "bundles" / (stem + exporter_fingerprint()[:8])
    for old in out.parent.glob(stem + "?" * 8):  # ~600 MB each: drop older exporters' ones
        if old != out and old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
    if not (out / "manifest.json").is_file():
        log(f"exporting {base.name} ({dtype}, drafter {drafter}) to {out}")
        options = ExportOptions(
            beam=beams[0], extra_beams=tuple(beams[1:]), dtype=dtype, quantization=quantization
        )
        export_bundle(
            base, out, drafter_path=drafter, options=options, overwrite=True, progress=log
        )
    return out


def prompt_ids(base: Path, texts: Sequence[Any]) -> tuple[list[list[int]], tuple[int, ...]]:
    """The token ids of `texts` (prompts with `.text` and `.chat`, e.g. from
    `redrafter.demo.heldout_shared_prompts`) with `base`'s tokenizer, and the stop tokens: the
    base config's EOS ids and the tokenizer's."""
    from redrafter.bench.prompts import encode_prompts
    from redrafter.models.checkpoints import load_base_config
    from redrafter.models.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(base)
    eos = set(load_base_config(base).eos_token_ids) | set(tokenizer.eos_token_ids)
    return encode_prompts(tokenizer, texts), tuple(sorted(eos))


def add_tree_arguments(parser: Any, *, lookup_default: str, note: str = "") -> None:
    """`--prompt-lookup off|on|both`, `--min-draft-prob FLOORS`, `--lookup-span N`,
    `--lookup-min-ngram N` and `--lookup-max-ngram N`, as
    `redrafter bench` has them (harness.PROMPT_LOOKUP_SETTINGS, decoding/prune.py,
    decoding/lookup.py); `note` ends their helps."""
    parser.add_argument(
        "--prompt-lookup",
        choices=["off", "on", "both"],
        default=lookup_default,
        help=f"speculative runs without/with/both the prompt-lookup beam [{lookup_default}]" + note,
    )
    parser.add_argument(
        "--min-draft-prob",
        type=lambda t: [float(x) for x in t.split(",")],
        default=[0.0],
        help="comma list of draft-probability floors (decoding/prune.py) [0]" + note,
    )
    parser.add_argument(
        "--lookup-span",
        type=int,
        default=4,
        help="prompt-lookup drafts per matched token (decoding/lookup.py) [4]" + note,
    )
    parser.add_argument(
        "--lookup-min-ngram",
        type=int,
        default=1,
        help="the prompt-lookup beam drafts from suffix matches of at least this many tokens "
        "[1]" + note,
    )
    parser.add_argument(
        "--lookup-max-ngram",
        type=int,
        default=3,
        help="the longest suffix match the prompt-lookup beam seeks [3]" + note,
    )


def wait_for_idle(max_minutes: float, *, threshold: float = 0.3, log: Any = print) -> dict:
    """Poll every ~20 s until other processes use less than `threshold` cores twice in a row,
    or `max_minutes` pass; returns the last `idle_report` with `waited_s` added."""
    start = time.perf_counter()
    calm = 0
    while True:
        report = idle_report(5.0)
        calm = calm + 1 if report["other_processes_cores"] < threshold else 0
        waited = time.perf_counter() - start
        if calm >= 2 or waited >= 60 * max_minutes:
            report["waited_s"] = round(waited)
            return report
        log(
            f"waiting for an idle machine: load {report['loadavg']}, other processes "
            f"{report['other_processes_cores']} cores ({waited / 60:.1f}/{max_minutes} min)"
        )
        time.sleep(15)


@contextlib.contextmanager
def native_library(path: str | None) -> Iterator[None]:
    """Runtimes built inside the block load the native op library at `path` (None: the default
    build): the runtime reads `redrafter.ops.LIBRARY_ENV` when it is built."""
    from redrafter import ops

    previous = os.environ.get(ops.LIBRARY_ENV)
    if path:
        os.environ[ops.LIBRARY_ENV] = path
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(ops.LIBRARY_ENV, None)
        else:
            os.environ[ops.LIBRARY_ENV] = previous


def verify_call(runtime: Any, tokens: int, context: int) -> Callable[[], Any]:
    """A verify of `tokens` chained new tokens after `context` prefilled ones on an
    `OnnxRuntime`, as a no-argument call (the same inputs every time; the cache rows it
    writes sit past the context, so repeated calls all see the same cache)."""
    import numpy as np

    runtime.reset(batch=1, capacity=context + tokens + 8)
    runtime.prefill(np.arange(3, 3 + context)[None] % 1000, np.array([context]))
    ids = np.full((1, tokens), 42)
    positions = (context + np.arange(tokens))[None]  # (1, T)
    mask = np.tril(np.ones((1, tokens, tokens), bool))  # (1, T, T) a chain
    past = np.array([context])
    return lambda: runtime.verify(ids, positions, mask, past)


def time_alternating(
    steps: dict[str, Callable[[], Any]], blocks: int, block: int, *, pause: float = 0.05
) -> dict[str, list[float]]:
    """ms per call of each step, in `blocks` rounds of one block of `block` calls per step,
    after 10 warm-up calls each. Each block starts `pause` s after the previous one: ORT
    sessions have their own spinning thread pools, and without the pause the session that ran
    last keeps a core busy into the next one's block (+4 ms per call measured on 2 cores)."""
    for f in steps.values():
        for _ in range(10):
            f()
    ms: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(blocks):
        for name, f in steps.items():
            time.sleep(pause)
            t = time.perf_counter()
            for _ in range(block):
                f()
            ms[name].append(1000 * (time.perf_counter() - t) / block)
    return ms
