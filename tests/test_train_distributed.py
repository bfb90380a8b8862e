"""Drafter training past one process (issue 21): batched teacher answers equal the
one-prompt-at-a-time loop, the teacher data folder is reused and checked, the loss splits across
ranks exactly, and `torchrun --nproc-per-node 2` (gloo, real subprocesses) trains the drafter
one process trains, makes the same teacher shards, and fails cleanly and resumably when a rank
is killed; with `--shard-base` each rank holds half the base (FSDP2) and the teacher data and
drafter are still the one process's. Tiny random models, one thread."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file

from redrafter.cli import main
from redrafter.train.answers import generate_answers
from redrafter.train.loss import drafter_loss, target_counts
from redrafter.train.teacher import generate_traces
from redrafter.train.teacher_data import (
    TeacherDataError,
    TeacherSettings,
    build_teacher_data,
    load_examples,
)

from conftest import WORDS, tiny_base, write_hf_checkpoint

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).with_name("torchrun")


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _ragged_prompts(n: int) -> list[list[int]]:
    """n prompts of 1..8 tokens (ids 2..60), so rows of a batch sit at different positions."""
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 9, (n,), generator=g).tolist()
    return [torch.randint(2, 61, (k,), generator=g).tolist() for k in lengths]


# --------------------------------------------------------------------------- batched answers


@pytest.mark.parametrize("slots", [1, 4, 13])
def test_batched_answers_equal_the_one_at_a_time_loop(slots: int) -> None:
    """13 prompts of mixed lengths, EOS = 7 ends some answers early (rows are refilled): the
    same tokens as `generate_traces` on one prompt at a time, the same hidden states and top-C
    log-probs to fp32 rounding."""
    base = tiny_base()
    prompts = _ragged_prompts(13)
    kw = {"max_new_tokens": 20, "eos_token_ids": (7,), "top_c": 4}
    alone = [generate_traces(base, [p], **kw)[0] for p in prompts]
    batched = generate_answers(base, prompts, slots=slots, **kw)
    lengths = [len(t[1]) for t in alone]
    assert min(lengths) < 20 == max(lengths)  # some answers end early, some run to the limit
    for i, (a, b) in enumerate(zip(alone, batched, strict=True)):
        assert a[1].tolist() == b[1].tolist(), f"prompt {i}: tokens differ"
        for name, x, y in zip(("hidden", "next", "top_ids", "top_logp"), a, b, strict=True):
            torch.testing.assert_close(y, x, atol=1e-5, rtol=1e-5, msg=f"prompt {i} {name}")


# --------------------------------------------------------------------------- teacher data


def test_teacher_data_is_reused_and_refuses_another_base(tmp_path: Path) -> None:
    base = tiny_base()
    prompts = _ragged_prompts(10)
    settings = TeacherSettings(max_new_tokens=6, eos_token_ids=(7,), top_c=3, shard_prompts=4)
    folder = build_teacher_data(base, prompts, tmp_path / "t", settings, slots=3)
    shards = sorted(folder.glob("shard-*.safetensors"))
    assert [p.name for p in shards] == [f"shard-0000{i}.safetensors" for i in range(3)]
    examples, answers = load_examples(folder, predict_tokens=2)
    alone = [generate_traces(base, [p], max_new_tokens=6, eos_token_ids=(7,))[0] for p in prompts]
    assert answers == [t[1].tolist() for t in alone]
    assert len(examples) == sum(len(a) for a in answers) and examples.teacher_ids is not None
    # A second run reuses the folder: nothing is regenerated.
    stamps = [p.stat().st_mtime_ns for p in shards]
    build_teacher_data(base, prompts, folder, settings)
    assert [p.stat().st_mtime_ns for p in shards] == stamps
    # Another base, or other prompts, is one line naming the folder and the fix.
    with pytest.raises(TeacherDataError, match=r"teacher data made with another base .*delete"):
        build_teacher_data(tiny_base(seed=1), prompts, folder, settings)
    (folder / "manifest.json").unlink()  # an unfinished folder: the shards themselves check
    with pytest.raises(TeacherDataError, match="shard-00000.safetensors: .* other prompts"):
        build_teacher_data(base, prompts[::-1], folder, settings)


# --------------------------------------------------------------------------- loss split


def test_the_ranks_losses_add_up_to_the_whole_batchs() -> None:
    """With the whole batch's counts, two parts' losses (and their gradients) sum to the
    one-process loss, even when the parts hold different numbers of targets."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 2, 5, generator=g, requires_grad=True)  # (M, K, Vd)
    targets = torch.tensor([[1, 2], [3, -100], [0, 4], [2, -100], [4, 1], [1, -100]])  # (M, K)
    teacher_rows = torch.randint(0, 5, (6, 2, 3), generator=g)  # (M, K, C)
    teacher_logp = torch.randn(6, 2, 3, generator=g).log_softmax(-1)
    kw = {"kl_weight": 0.5}
    whole, _ = drafter_loss(logits, targets, teacher_rows=teacher_rows,
                            teacher_logp=teacher_logp, **kw)  # fmt: skip
    counts = target_counts(targets, teacher_rows)
    assert counts.tolist() == [[6.0, 3.0], [6.0, 6.0]]
    parts = [
        drafter_loss(logits[rows], targets[rows], teacher_rows=teacher_rows[rows],
                     teacher_logp=teacher_logp[rows], counts=counts, **kw)[0]
        for rows in (slice(0, 2), slice(2, 6))
    ]  # fmt: skip
    torch.testing.assert_close(parts[0] + parts[1], whole)
    (g_whole,) = torch.autograd.grad(whole, logits)
    (g_parts,) = torch.autograd.grad(parts[0] + parts[1], logits)
    torch.testing.assert_close(g_parts, g_whole)


# --------------------------------------------------------------------------- torchrun


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    """A tiny HF base folder and 48 prompts (jsonl) of 3..7 words."""
    root = tmp_path_factory.mktemp("dist")
    write_hf_checkpoint(tiny_base(), root / "base")
    lines = [
        json.dumps({"prompt": " ".join(WORDS[(7 * i) % 50 : (7 * i) % 50 + 3 + i % 5])})
        for i in range(48)
    ]
    (root / "prompts.jsonl").write_text("\n".join(lines) + "\n")
    return root


def _args(files: Path, out: Path, cache: Path, *more: str) -> list[str]:
    return ["train-drafter", "--base", str(files / "base"), "--data",
            str(files / "prompts.jsonl"), "--out", str(out), "--cache-dir", str(cache),
            "--batch-size", "16", "--seq-len", "8", "--predict-tokens", "3",
            "--draft-vocab", "32", "--shard-prompts", "8", "--teacher-slots", "4",
            "--no-bf16", "--lr", "1e-2", *more]  # fmt: skip


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def _one(args: list[str]) -> None:
    """`python -m redrafter ...` in one process."""
    run = subprocess.run([sys.executable, "-m", "redrafter", *args], env=_env(),
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert run.returncode == 0, run.stderr


def _torchrun(args: list[str], *extra: str) -> list[str]:
    return [str(TORCHRUN), "--standalone", "--nproc-per-node", "2", *extra, "-m", "redrafter",
            *args]  # fmt: skip


def _assert_same_weights(a: Path, b: Path, atol: float) -> None:
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for name in wa:
        diff = (wa[name].double() - wb[name].double()).abs().max().item()
        assert diff <= atol, f"{name}: max |diff| {diff:.2e} > {atol}"


def test_torchrun_two_ranks_train_the_one_process_drafter(files: Path, tmp_path: Path) -> None:
    """Same command and global batch, 1 vs 2 gloo processes: the teacher shards are equal, the
    drafter after 3 steps is equal to fp32 rounding, and resuming the 2-rank checkpoint in one
    process ends where the 1-process run ends."""
    one, two = tmp_path / "one", tmp_path / "two"
    _one(_args(files, one, tmp_path / "c1", "--steps", "6", "--stop-after", "3"))
    shutil.copytree(one, tmp_path / "one@3")
    _one(_args(files, one, tmp_path / "c1", "--steps", "6", "--resume"))
    run = subprocess.run(
        _torchrun(_args(files, two, tmp_path / "c2", "--steps", "6", "--stop-after", "3")),
        env=_env(), capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    state = json.loads((two / "trainer_state.json").read_text())
    assert (state["step"], state["world_size"], state["backend"]) == (3, 2, "gloo")
    # Teacher shards: made by 2 ranks (shard i by rank i % 2), the same as by 1.
    made_by_one = sorted((tmp_path / "c1").rglob("shard-*.safetensors"))
    assert len(made_by_one) == 7  # 46 train prompts in 6 shards of 8, 2 held-out in 1
    for a in made_by_one:
        b = tmp_path / "c2" / a.relative_to(tmp_path / "c1")
        with safe_open(str(a), "pt") as fa, safe_open(str(b), "pt") as fb:
            assert fa.metadata() == fb.metadata()
            assert fa.keys() == fb.keys()  # noqa: SIM118
            for k in fa.keys():  # noqa: SIM118
                assert torch.equal(fa.get_tensor(k), fb.get_tensor(k)), f"{a.name} {k}"
    _assert_same_weights(tmp_path / "one@3", two, atol=1e-6)
    _one(_args(files, two, tmp_path / "c2", "--steps", "6", "--resume"))  # world size 2 -> 1
    _assert_same_weights(one, two, atol=1e-6)


def _rank_pid(launcher: int, rank: int) -> int:
    """The pid of the worker torchrun started as `rank` (its children carry RANK in their
    environment)."""
    for pid in Path(f"/proc/{launcher}/task/{launcher}/children").read_text().split():
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        if f"RANK={rank}".encode() in environ:
            return int(pid)
    raise AssertionError(f"no rank {rank} among torchrun's children")


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc for pids")
def test_a_killed_rank_fails_cleanly_and_leaves_a_resumable_checkpoint(
    files: Path, tmp_path: Path
) -> None:
    """SIGKILL rank 1 mid-training: torchrun exits nonzero, rank 0 says in one line where the
    last checkpoint is, `--out` holds only that complete checkpoint, and one process resumes it."""
    out, logs = tmp_path / "out", tmp_path / "logs"
    args = _args(files, out, tmp_path / "c", "--steps", "100000", "--save-every", "4")
    launcher = subprocess.Popen(
        _torchrun(args, "--redirects", "3", "--log-dir", str(logs)),
        env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not (out / "trainer_state.json").exists():
            assert launcher.poll() is None and time.monotonic() < deadline, "no checkpoint came"
            time.sleep(0.02)
        os.kill(_rank_pid(launcher.pid, 1), signal.SIGKILL)
        launcher.communicate(timeout=60)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode != 0
    (rank0,) = logs.rglob("attempt_0/0/stderr.log")
    errors = [line for line in rank0.read_text().splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in rank0.read_text(), rank0.read_text()
    # Which one rank 0 sees first is a race: its next collective failing, or torchrun's SIGTERM
    # (sent to every rank once one has died). Either way it must be the one designed line.
    assert errors[0].startswith(
        ("error: rank 0: lost another rank at step", "error: rank 0: stopped by torchrun (SIGTERM)")
    ), errors[0]
    assert "rerun with --resume" in errors[0]
    state = json.loads((out / "trainer_state.json").read_text())
    step = state["step"]
    assert step % 4 == 0 and f"at step {step}; rerun" in errors[0]
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "model.safetensors", "optimizer.safetensors", "trainer_state.json"
    ]  # fmt: skip
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".out.")]  # no temp copies
    _one([*args, "--resume", "--stop-after", str(step + 2)])
    state = json.loads((out / "trainer_state.json").read_text())
    assert (state["step"], state["world_size"]) == (step + 2, 1)


# --------------------------------------------------------------------------- --shard-base


def _kill_workers(launcher: subprocess.Popen) -> None:
    """SIGKILL torchrun's workers, then torchrun itself (the workers hold its pipes open)."""
    children = Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children")
    for pid in children.read_text().split() if children.exists() else []:
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), signal.SIGKILL)
    launcher.kill()
    launcher.communicate()


def _same_shards(a_root: Path, b_root: Path) -> int:
    """Every teacher shard under `a_root` equals its twin under `b_root` (metadata and tensors,
    bit for bit), and so do the manifests. Returns how many shards were compared."""
    shards = sorted(a_root.rglob("shard-*.safetensors"))
    for a in shards:
        b = b_root / a.relative_to(a_root)
        with safe_open(str(a), "pt") as fa, safe_open(str(b), "pt") as fb:
            assert fa.metadata() == fb.metadata(), a.name
            assert fa.keys() == fb.keys()  # noqa: SIM118
            for k in fa.keys():  # noqa: SIM118
                x, y = fa.get_tensor(k), fb.get_tensor(k)
                assert x.shape == y.shape and torch.equal(x, y), f"{a.relative_to(a_root)} {k}"
    for a in a_root.rglob("manifest.json"):
        assert a.read_text() == (b_root / a.relative_to(a_root)).read_text()
    return len(shards)


def test_torchrun_shard_base_holds_half_and_matches_one_process(
    files: Path, tmp_path: Path
) -> None:
    """`torchrun --nproc-per-node 2 ... --shard-base` (FSDP2 over gloo): each rank holds about
    half of the base's parameter bytes, the teacher data is bit for bit the one process's (rank
    1 has fewer prompts than rank 0, so it steps dummies for rank 0's forwards), and the
    drafter is the one process's within the DDP test's tolerance."""
    one, two = tmp_path / "one", tmp_path / "two"
    _one(_args(files, one, tmp_path / "c1", "--steps", "3"))
    launcher = subprocess.Popen(
        _torchrun(_args(files, two, tmp_path / "c2", "--steps", "3", "--shard-base")),
        env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        _, stderr = launcher.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        # A lockstep bug deadlocks the ranks inside a gloo collective (its timeout is hours),
        # where they cannot act on torchrun's SIGTERM: kill them, then fail.
        _kill_workers(launcher)
        raise AssertionError("--shard-base hung: the ranks' forwards are out of step") from None
    assert launcher.returncode == 0, stderr
    assert "base sharded over 2 ranks" in stderr and "tokens/step evaluation skipped" in stderr
    assert _same_shards(tmp_path / "c1", tmp_path / "c2") == 7
    _assert_same_weights(one, two, atol=1e-6)
    alone = json.loads((one / "trainer_state.json").read_text())
    state = json.loads((two / "trainer_state.json").read_text())
    assert (alone["shard_base"], alone["base_dtype"]) == (False, "float32")
    assert (state["shard_base"], state["base_dtype"], state["world_size"]) == (True, "float32", 2)
    (whole,) = alone["base_bytes_per_rank"]
    held = state["base_bytes_per_rank"]
    assert len(held) == 2 and sum(held) == whole, (held, whole)  # dim-0 chunks: no overlap
    assert all(0.45 * whole <= h <= 0.55 * whole for h in held), (held, whole)


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc for pids")
def test_a_rank_killed_during_sharded_teacher_generation_fails_in_one_line(
    files: Path, tmp_path: Path
) -> None:
    """SIGKILL rank 1 while the sharded base makes teacher data: rank 0 ends with the one
    designed line (no traceback from inside gloo), the finished shards stay, and one process
    rerunning the command keeps them and finishes."""
    out, logs, cache = tmp_path / "out", tmp_path / "logs", tmp_path / "c"
    args = _args(files, out, cache, "--steps", "3", "--shard-prompts", "2", "--seq-len", "48",
                 "--teacher-slots", "2")  # fmt: skip
    launcher = subprocess.Popen(
        _torchrun([*args, "--shard-base"], "--redirects", "3", "--log-dir", str(logs)),
        env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not list(cache.glob("teacher/*/train/shard-00000.safetensors")):
            assert launcher.poll() is None and time.monotonic() < deadline, "no shard came"
            time.sleep(0.01)
        os.kill(_rank_pid(launcher.pid, 1), signal.SIGKILL)
        launcher.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        _kill_workers(launcher)
        raise AssertionError("rank 0 hung after rank 1 died") from None
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode != 0
    assert not list(cache.glob("teacher/*/train/manifest.json"))  # stopped before the end
    (rank0,) = logs.rglob("attempt_0/0/stderr.log")
    text = rank0.read_text()
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in text, text
    # Rank 0's next collective failing, or torchrun's SIGTERM: either way the designed line.
    assert errors[0].startswith(
        ("error: rank 0: lost another rank while making teacher data",
         "error: rank 0: stopped by torchrun (SIGTERM)")
    ), errors[0]  # fmt: skip
    assert "rerun the same command" in errors[0]
    kept = {p: p.stat().st_mtime_ns for p in cache.glob("teacher/*/train/shard-*.safetensors")}
    assert kept
    _one(args)  # one process, unsharded: the same teacher data, so the shards are reused
    assert all(p.stat().st_mtime_ns == t for p, t in kept.items())
    assert list(cache.glob("teacher/*/train/manifest.json")) and (out / "config.json").is_file()


def test_teacher_data_of_another_base_dtype_is_refused_in_one_line(tmp_path: Path) -> None:
    """bf16 greedy answers are another teacher's: a folder made in fp32 is refused, naming
    the dtypes, and a bf16 folder records its dtype in the manifest and every shard."""
    base = tiny_base()
    prompts = _ragged_prompts(5)
    settings = TeacherSettings(max_new_tokens=4, eos_token_ids=(7,), shard_prompts=4)
    folder = build_teacher_data(base, prompts, tmp_path / "fp32", settings, slots=2)
    assert json.loads((folder / "manifest.json").read_text())["base_dtype"] == "float32"
    half = tiny_base().to(torch.bfloat16)
    with pytest.raises(
        TeacherDataError,
        match=r"another --base-dtype \(base dtype base_dtype='float32', this run's is 'bfloat16'\)",
    ):
        build_teacher_data(half, prompts, folder, settings)
    made = build_teacher_data(half, prompts, tmp_path / "bf16", settings, slots=2)
    assert json.loads((made / "manifest.json").read_text())["base_dtype"] == "bfloat16"
    with safe_open(str(made / "shard-00001.safetensors"), "pt") as f:
        assert f.metadata()["base_dtype"] == "bfloat16"
        assert f.get_tensor("hidden").dtype == torch.float32  # stored in fp32 whatever the base's


def test_shard_base_without_torchrun_is_one_line_exit_2(files: Path, tmp_path: Path) -> None:
    """--shard-base in one process has nothing to shard across: refused before the base loads,
    in one line naming the fix, and nothing written."""
    out = tmp_path / "d"
    result = CliRunner().invoke(main, _args(files, out, tmp_path / "c", "--shard-base"))
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines() == [
        "error: --shard-base splits the base across torchrun's processes, but this is 1 "
        "process; start it with torchrun --nproc-per-node N (N >= 2), or drop --shard-base"
    ]
    assert not out.exists() and not (tmp_path / "c").exists()
