"""Resumable training checkpoints beside the drafter.

The output folder is always a loadable drafter in Apple's layout (`config.json` +
`model.safetensors`, written by `save_drafter`); a checkpoint adds `optimizer.safetensors` (AdamW
moments, safetensors, never pickle) and `trainer_state.json` (step, options, metrics, world size,
and the sha256 of the weights it belongs to), written last, so a half-written checkpoint is
detected. A save writes all three files into a hidden temp folder and swaps it in with renames,
so a kill at any instant leaves a complete checkpoint at `out` or in a hidden sibling, where
resume finds it (`find_checkpoint`). Nothing in it depends on the number of processes that
trained, so a run may resume with another world size.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from redrafter.errors import CheckpointError
from redrafter.files import pid_alive, sibling_copies, stale_copies
from redrafter.models.checkpoints import SAFETENSORS, load_drafter, save_drafter
from redrafter.models.drafter import Drafter

STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_checkpoint(
    drafter: Drafter,
    optimizer: torch.optim.Optimizer,
    out: Path,
    *,
    step: int,
    total: int,
    options: dict[str, Any],
    history: list[dict[str, float]],
    extra: dict[str, Any],
) -> None:
    """The drafter (Apple's layout) plus the optimizer moments and the trainer state, written
    together into a temp folder and swapped in with renames (`save_drafter`): at every instant a
    complete checkpoint, old or new, is at `out` or at a hidden sibling `find_checkpoint` finds."""
    names = {id(p): n for n, p in drafter.named_parameters()}
    tensors: dict[str, torch.Tensor] = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p)
            if state:
                n = names[id(p)]
                tensors[f"{n}.exp_avg"] = state["exp_avg"].cpu().contiguous()
                tensors[f"{n}.exp_avg_sq"] = state["exp_avg_sq"].cpu().contiguous()
                tensors[f"{n}.step"] = torch.as_tensor(state["step"], dtype=torch.float32).reshape(
                    1
                )

    def write_state(folder: Path) -> None:
        save_file(tensors, str(folder / OPTIMIZER_FILE))
        record = {
            "step": step,
            "total_steps": total,
            "options": options,
            "weights_sha256": _sha256(folder / SAFETENSORS),
            "optimizer_sha256": _sha256(folder / OPTIMIZER_FILE),
            "history": history,
            **extra,
        }
        (folder / STATE_FILE).write_text(json.dumps(record, indent=2) + "\n")  # written last

    save_drafter(drafter, out, extra_files=write_state)


def _complete_step(folder: Path) -> int | None:
    """The step of the complete checkpoint in `folder` (state, weights and optimizer that
    belong together), or None."""
    try:
        state = json.loads((folder / STATE_FILE).read_text())
        if not isinstance(state, dict) or not isinstance(state.get("step"), int):
            return None
        for file, key in ((SAFETENSORS, "weights_sha256"), (OPTIMIZER_FILE, "optimizer_sha256")):
            if _sha256(folder / file) != state.get(key):
                return None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return state["step"]


def find_checkpoint(out: Path) -> Path | None:
    """Put the last complete checkpoint of `out` back at `out` and return it (None: there is
    none). A save killed mid-swap can leave `out` incomplete or absent and the previous
    checkpoint in a hidden `.NAME.old-*` (or a finished `.NAME.tmp-*`) sibling; copies being
    written by a live process are left alone."""
    out = Path(out)
    mine = os.getpid()
    candidates = [out] if out.is_dir() else []
    for p in sibling_copies(out):
        pid, sep, _ = p.name[len(f".{out.name}.tmp-") :].partition("-")
        if sep and pid.isdigit() and int(pid) != mine and pid_alive(int(pid)):
            continue  # another live writer's
        candidates.append(p)
    steps = {p: _complete_step(p) for p in candidates}
    complete = [p for p in candidates if steps[p] is not None]
    if not complete:
        return None
    best = max(complete, key=lambda p: (steps[p], p == out))
    if best != out:
        if out.exists():
            if not out.is_dir() or any(
                f.name not in (SAFETENSORS, OPTIMIZER_FILE, STATE_FILE, "config.json")
                for f in out.iterdir()
            ):
                raise CheckpointError(
                    f"{out}: holds files that are not a checkpoint's, and the last complete "
                    f"checkpoint is in {best}; move {out} away and resume again"
                )
            shutil.rmtree(out)
        os.rename(best, out)
    for p in stale_copies(out):
        shutil.rmtree(p, ignore_errors=True)
    return out


def load_checkpoint(out: Path) -> tuple[Drafter, dict[str, torch.Tensor], dict[str, Any]]:
    """The drafter, optimizer tensors and trainer state of the last complete checkpoint of
    `out` (recovered from a save that was killed midway, see `find_checkpoint`), checked to
    belong together."""
    out = Path(out)
    if find_checkpoint(out) is None:
        raise CheckpointError(
            f"{out}: no complete checkpoint ({STATE_FILE} with matching weights and optimizer) "
            "to resume from; train without --resume (or pass the --out of an interrupted run)"
        )
    state = json.loads((out / STATE_FILE).read_text())
    return load_drafter(out), load_file(str(out / OPTIMIZER_FILE)), state


def restore_optimizer(
    optimizer: torch.optim.Optimizer, drafter: Drafter, tensors: dict[str, torch.Tensor]
) -> None:
    for n, p in drafter.named_parameters():
        if f"{n}.exp_avg" in tensors:
            optimizer.state[p] = {
                "step": tensors[f"{n}.step"].reshape(()).clone(),
                "exp_avg": tensors[f"{n}.exp_avg"].to(p.device),
                "exp_avg_sq": tensors[f"{n}.exp_avg_sq"].to(p.device),
            }
