"""Crash safety (issue #16): an export and a tiny training run are killed with SIGKILL at a few
chosen points, each in a child process, and the invariants are checked afterwards:

* export: `--out` is the old bundle (or absent) or a complete loadable bundle; the hidden
  `.NAME.tmp-PID-*` / `.NAME.old-PID-*` folders the dead writer left are removed by the next
  export to the same place;
* training: a complete checkpoint (the newest one saved) is always findable, `--resume` finds it
  (also in a `.NAME.old-*` folder stranded mid-swap) and ends with exactly the weights of an
  uninterrupted run.

The kill points are deterministic: the child replaces `os.replace` / `os.rename` /
`save_file` / `export_drafter` with a wrapper that SIGKILLs the process at the N-th call."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from redrafter.bundle import atomic_directory, write_manifest
from redrafter.bundle.names import (
    BASE_ONNX,
)
from redrafter.bundle.store import load_bundle
from redrafter.config import BeamShape
from redrafter.files import sibling_copies, stale_copies
from redrafter.train.trainer import TrainOptions, find_checkpoint, train_drafter

from conftest import tiny_base, tiny_manifest

TESTS = Path(__file__).resolve().parent

CHILD = r"""
import os, signal, sys
from pathlib import Path
mode, out, what, nth = sys.argv[1], Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
calls = 0

def killing(original):
    def wrapper(*args, **kwargs):
        global calls
        calls += 1
        if calls == nth:
            os.kill(os.getpid(), signal.SIGKILL)
        return original(*args, **kwargs)
    return wrapper

import test_fault_injection as t
if what in ("replace", "rename"):
    setattr(os, what, killing(getattr(os, what)))
if mode == "store":
    t.write_tiny_bundle(out, "new")
elif mode == "export":
    import redrafter.build as build
    build.export_drafter = killing(build.export_drafter)
    from redrafter.build import export_bundle
    export_bundle(Path(sys.argv[5]), out, drafter_path=Path(sys.argv[6]), overwrite=True)
else:
    import redrafter.train.checkpoint as checkpoint
    if what == "save_file":  # the optimizer moments, written into the temp folder
        checkpoint.save_file = killing(checkpoint.save_file)
    t.train(out)
print("finished")
"""


def run_child(*args: str) -> int:
    """Run the child with `args`; its return code (-9 when it killed itself)."""
    done = subprocess.run(
        [sys.executable, "-c", CHILD, *args], capture_output=True, text=True, timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(TESTS)},  # conftest
    )  # fmt: skip
    assert done.returncode in (0, -signal.SIGKILL), done.stderr[-2000:]
    return done.returncode


# --------------------------------------------------------------------------- bundles


def write_tiny_bundle(out: Path, marker: str) -> None:
    """A small but loadable bundle (its 'graph' is a marker string) through the real writer."""
    with atomic_directory(out, overwrite=True) as tmp:
        (tmp / BASE_ONNX).parent.mkdir(parents=True)
        (tmp / BASE_ONNX).write_text(marker * 1000)
        write_manifest(tmp, tiny_manifest())


def marker_of(out: Path) -> str:
    return (load_bundle(out).path(BASE_ONNX)).read_text()[:3]


@pytest.mark.parametrize("nth", [1, 2], ids=["before-swap", "mid-swap"])
def test_killed_bundle_write_leaves_old_or_nothing_and_is_cleaned(tmp_path: Path, nth) -> None:
    """os.rename #1 moves the old bundle aside, #2 moves the new one in: killed before either,
    `out` is the old bundle; killed between them, `out` is absent (the old one sits in a hidden
    sibling). Either way the next write succeeds and removes what the dead writer left."""
    out = tmp_path / "b"
    write_tiny_bundle(out, "old")
    assert run_child("store", str(out), "rename", str(nth)) == -signal.SIGKILL
    if out.exists():
        assert marker_of(out) == "old"
    else:
        assert nth == 2
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".b.")]
    assert leftovers  # the dead writer's temp (and old) folders
    write_tiny_bundle(out, "new")
    assert marker_of(out) == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["b"]


def test_killed_export_keeps_the_old_bundle(tiny_checkpoints, tmp_path: Path) -> None:
    """A real `export --overwrite` killed while exporting the drafter graph: `out` is still the
    old, loadable bundle, and the next export cleans the dead export's temp folder."""
    _, base_dir, drafter_dir = tiny_checkpoints
    out = tmp_path / "b"
    write_tiny_bundle(out, "old")
    code = run_child("export", str(out), "-", "1", str(base_dir), str(drafter_dir))
    assert code == -signal.SIGKILL
    assert marker_of(out) == "old"
    assert any(p.name.startswith(".b.tmp-") for p in tmp_path.iterdir())
    write_tiny_bundle(out, "new")
    assert [p.name for p in tmp_path.iterdir()] == ["b"]


# --------------------------------------------------------------------------- training

OPTIONS = TrainOptions(
    steps=4, batch_size=8, lr=1e-2, predict_tokens=2, bf16=False, save_every=1,
    eval_beam=BeamShape(2, 3), eval_max_new_tokens=4,
)  # fmt: skip


def train(out: Path, *, resume: bool = False):  # type: ignore[no-untyped-def]
    """The tiny training run the child is killed in (and the parent resumes)."""
    from redrafter.train.teacher import teacher_forced

    torch.set_num_threads(1)
    base = tiny_base()
    chunks = torch.arange(5, 53).view(4, 12) % 61
    examples = teacher_forced(base, chunks, predict_tokens=2)
    return train_drafter(base, examples, out, OPTIONS, progress=False, resume=resume)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    result = train(tmp_path_factory.mktemp("whole") / "d")
    return result.drafter.state_dict()


@pytest.mark.parametrize(
    "what,nth",
    [("rename", 3), ("save_file", 2)],
    ids=["mid-swap-of-save-2", "writing-optimizer-of-save-2"],
)
def test_killed_training_resumes_from_the_last_complete_checkpoint(
    tmp_path: Path, what: str, nth: int, uninterrupted
) -> None:
    """Save 1 renames once (tmp -> out); save 2 renames out -> .old, then tmp -> out (rename
    #3); each save writes the optimizer moments (trainer's save_file) after the weights. Killed
    at either point, a complete checkpoint is findable, resume finishes, and the result is the
    uninterrupted one."""
    out = tmp_path / "d"
    assert run_child("train", str(out), what, str(nth)) == -signal.SIGKILL
    assert find_checkpoint(out) == out  # recovered into place from .d.tmp-* / .d.old-* if need be
    state = json.loads((out / "trainer_state.json").read_text())
    assert 1 <= state["step"] <= 2
    resumed = train(out, resume=True)
    assert resumed.steps == OPTIONS.steps
    for name, tensor in resumed.drafter.state_dict().items():
        torch.testing.assert_close(tensor, uninterrupted[name], atol=1e-6, rtol=0, msg=name)
    assert sibling_copies(out) == [] and stale_copies(out) == []


def test_resume_finds_a_checkpoint_stranded_in_an_old_folder(tmp_path: Path) -> None:
    """The layout of the bug report: `out` holds only the weights, the last complete checkpoint
    sits in a hidden `.NAME.old-*` folder (the old naming, no PID)."""
    out = tmp_path / "d"
    cut = TrainOptions(**{**OPTIONS.__dict__, "save_every": 0})
    from redrafter.train.teacher import teacher_forced

    base = tiny_base()
    examples = teacher_forced(base, torch.arange(5, 53).view(4, 12) % 61, predict_tokens=2)
    train_drafter(base, examples, out, cut, progress=False, stop_after=2)
    stranded = tmp_path / ".d.old-1a2b3c4d"
    shutil.copytree(out, stranded)
    (out / "trainer_state.json").unlink()
    (out / "optimizer.safetensors").unlink()
    assert find_checkpoint(out) == out
    assert json.loads((out / "trainer_state.json").read_text())["step"] == 2
    assert not stranded.exists()
