"""Drafter training past one process (issue 21), on the demo model: prints and saves one JSON.

    .venv/bin/python -m benchmarks.train_distributed teacher [--prompts 128] [--rounds 2]
        [--slots 32,64] [--bundles DIR,DIR] [--bundle-slots 32]
    .venv/bin/python -m benchmarks.train_distributed steps [--prompts 48] [--steps 60]

`teacher`: the base's greedy answers (fp32, `--seq-len` new tokens at most, as the recipe) to
the first N demo training prompts (`redrafter.demo.training_prompts`), by today's lockstep
batches (`teacher.distill_examples`, `--loop-batch` prompts padded together until the longest
answer ends) and by continuous batching (`answers.generate_answers`, `--slots` rows refilled as
answers end), interleaved `--rounds` times, with the CPU load around each run; the answers must
be token-identical. `steps`: `redrafter train-drafter` on those prompts' answers (teacher data
made once, then reused) in one process and under `torchrun --nproc-per-node 2`, steps/s from
each run's trainer_state.json (training only: teacher data and evaluation excluded).
`--bundles A,B`: the same prompts answered by exported bundles of the demo model on ONNX Runtime
(`runtime_answers`, what `train-drafter --teacher` runs); an fp32 bundle's answers are the fp32
model's (counted in `identical_answers`), an int4 bundle's are the int4 model's.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks._common import cpu_seconds, machine, other_load, save

REPO = Path(__file__).resolve().parents[1]


def _load() -> dict[str, Any]:
    return {"loadavg": [round(x, 2) for x in os.getloadavg()], "cpu": cpu_seconds()}


def _timed(fn: Any) -> tuple[Any, dict[str, Any]]:
    """Run fn(); its seconds, load averages before and after, and the cores others used."""
    before = _load()
    t = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - t
    after = _load()
    return out, {
        "seconds": round(seconds, 2),
        "loadavg_before": before["loadavg"],
        "loadavg_after": after["loadavg"],
        "other_processes_cores": other_load(before["cpu"], after["cpu"]),
        # CPU this process (and its children) used: on a shared machine a steadier measure of
        # the work than wall time, which waits for the cores others hold.
        "own_cpu_seconds": round(after["cpu"]["own"] - before["cpu"]["own"], 2),
    }


def teacher(args: argparse.Namespace) -> dict[str, Any]:
    """Interleaved runs of the lockstep loop and continuous batching on the same prompts."""
    import torch

    from redrafter.bench.prompts import encode_prompts
    from redrafter.bench.tokens import token_digest
    from redrafter.demo import find_demo_gguf, find_shared_data, training_prompts
    from redrafter.models.checkpoints import load_base
    from redrafter.models.tokenizer import load_tokenizer
    from redrafter.train.answers import generate_answers
    from redrafter.train.runtime_answers import runtime_answers
    from redrafter.train.teacher import distill_examples

    torch.set_num_threads(args.threads)
    gguf = find_demo_gguf()
    base, tokenizer = load_base(gguf), load_tokenizer(gguf)
    eos = base.config.eos_token_ids
    ids = encode_prompts(tokenizer, training_prompts(find_shared_data(), count=args.prompts))
    kw = {"max_new_tokens": args.seq_len, "eos_token_ids": eos, "top_c": args.top_c}

    def loop() -> list[list[int]]:
        return distill_examples(base, ids, predict_tokens=4, batch_size=args.loop_batch, **kw)[1]

    def batched(slots: int) -> Any:
        return lambda: [t[1].tolist() for t in generate_answers(base, ids, slots=slots, **kw)]

    def on_bundle(path: str) -> tuple[str, Any]:
        from redrafter.train.runtime_answers import open_teacher

        runtime = open_teacher(path, base.config).runtime  # ONNX Runtime, native kernels

        def run() -> list[list[int]]:
            traces = runtime_answers(runtime, ids, slots=args.bundle_slots, **kw)
            return [t[1].tolist() for t in traces]

        precision = runtime.bundle.precision  # type: ignore[attr-defined]
        return f"bundle-{precision}-slots{args.bundle_slots}", run

    methods = [(f"loop{args.loop_batch}", loop)]
    methods += [
        (f"slots{n}", batched(n)) for n in map(int, args.slots.split(",") if args.slots else [])
    ]
    methods += [on_bundle(p) for p in args.bundles.split(",") if p]
    runs: list[dict[str, Any]] = []
    answers: dict[str, list[list[int]]] = {}
    for r in range(args.rounds):
        for name, fn in methods:
            answers[name], timing = _timed(fn)
            runs.append({"method": name, "round": r, **timing,
                         "prompts_per_s": round(len(ids) / timing["seconds"], 3)})  # fmt: skip
            print(json.dumps(runs[-1]), flush=True)
    first = answers[methods[0][0]]
    tokens = sum(len(a) for a in first)
    best = {m: min(x["seconds"] for x in runs if x["method"] == m) for m, _ in methods}
    return {
        "prompts": len(ids),
        "prompt_tokens_mean": round(sum(map(len, ids)) / len(ids), 1),
        "answer_tokens": tokens,
        "answer_tokens_mean": round(tokens / len(ids), 1),
        "answers_at_limit": sum(len(a) == args.seq_len for a in first),
        "identical_answers": {
            m: sum(a == b for a, b in zip(first, answers[m], strict=True)) for m, _ in methods
        },
        "answers_digest": token_digest([t for a in first for t in a]),
        "runs": runs,
        "best_seconds": best,
        "speedup_best_vs_loop": {m: round(best[methods[0][0]] / best[m], 2) for m in best},
    }


def steps(args: argparse.Namespace) -> dict[str, Any]:
    """`train-drafter` in 1 process (2 threads) and in 2 gloo processes (1 thread each) on the
    same teacher data: training steps/s."""
    from redrafter.demo import find_demo_gguf, find_shared_data, training_prompts

    work = Path(args.work)
    shutil.rmtree(work / "out", ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    prompts = training_prompts(find_shared_data(), count=args.prompts)
    data = work / "prompts.jsonl"
    data.write_text("".join(json.dumps({"text": p.text}) + "\n" for p in prompts if p.chat))
    common = ["train-drafter", "--base", str(find_demo_gguf()), "--data", str(data), "--chat",
              "--seq-len", str(args.seq_len), "--predict-tokens", "4", "--batch-size",
              str(args.batch_size), "--steps", str(args.steps), "--teacher-data",
              str(work / "teacher"), "--teacher-slots", args.slots.split(",")[0], "--no-bf16",
              "--cache-dir", str(work / "cache")]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    python = [sys.executable, "-m", "redrafter"]
    torchrun = [str(Path(sys.executable).with_name("torchrun")), "--standalone",
                "--nproc-per-node", "2", "-m", "redrafter"]  # fmt: skip
    runs = []
    for r in range(args.rounds):
        for name, launcher, threads in (("1 process", python, "2"), ("2 processes", torchrun, "1")):
            out = work / "out" / f"{name.replace(' ', '-')}-{r}"
            cmd = [*launcher, *common, "--out", str(out)]
            done, timing = _timed(
                lambda cmd=cmd, threads=threads: subprocess.run(
                    cmd, env={**env, "OMP_NUM_THREADS": threads}, capture_output=True, text=True
                )
            )
            if done.returncode != 0:
                raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
            state = json.loads((out / "trainer_state.json").read_text())
            runs.append({
                "run": name, "round": r, "world_size": state["world_size"],
                "backend": state["backend"], "steps": state["step"],
                "train_seconds": state["train_seconds"], "examples": state["examples"],
                "steps_per_s": round(state["step"] / max(state["train_seconds"], 1e-9), 3),
                "command_seconds": timing["seconds"], "loadavg_before": timing["loadavg_before"],
                "loadavg_after": timing["loadavg_after"],
                "other_processes_cores": timing["other_processes_cores"],
            })  # fmt: skip
            print(json.dumps(runs[-1]), flush=True)
    return {"batch_size": args.batch_size, "runs": runs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("part", choices=["teacher", "steps"])
    ap.add_argument("--prompts", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=128, help="most new tokens per answer")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--loop-batch", type=int, default=32, help="today's batch (2,878 s run)")
    ap.add_argument("--slots", default="32,64", help="teacher: a comma list; steps: the first")
    ap.add_argument("--top-c", type=int, default=0, help="16 for --kl-weight runs")
    ap.add_argument(
        "--bundles",
        default="",
        help="teacher: a comma list of exported bundles of the demo model, answering on ONNX "
        "Runtime too (train-drafter --teacher); their answers are counted against the loop's",
    )
    ap.add_argument("--bundle-slots", type=int, default=32, help="rows for --bundles [32]")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--work", default="/tmp/redrafter-train-distributed")
    ap.add_argument("--name", default=None)
    args = ap.parse_args()
    info = machine()
    result = teacher(args) if args.part == "teacher" else steps(args)
    payload = {"machine": info, "args": vars(args), **result}
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}))
    save(args.name or f"train_distributed_{args.part}", payload)


if __name__ == "__main__":
    main()
