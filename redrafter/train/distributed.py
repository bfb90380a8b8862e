"""Drafter training past one process: the process group torchrun describes, and which rank
does what.

`torchrun --nproc-per-node N -m redrafter train-drafter ...` starts N copies of the command with
RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT set (across nodes, its rendezvous
sets them). `process_group` reads them, joins the group (gloo for CPU training, NCCL for CUDA,
one GPU per process: cuda:LOCAL_RANK) and leaves it at exit. Without torchrun it is one process,
rank 0 of 1, and nothing is initialised: the single-process command runs as it always has.

Who does what (docs/drafter_training.md, "Many processes"): every rank builds the same
drafter from the same seed and DistributedDataParallel averages the gradients; rank 0 alone logs,
shows the progress bar, evaluates and writes checkpoints; teacher shards are split by
`shard % world == rank`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
import signal
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist

from redrafter.errors import RedrafterError

# Ranks wait at a barrier while others generate teacher shards, which can take hours on CPUs.
TIMEOUT = datetime.timedelta(hours=6)


class DistributedError(RedrafterError):
    """The process group cannot start, or another rank stopped mid-run."""


@dataclasses.dataclass(frozen=True)
class Ranks:
    """This process's place in the group: rank r of `world`, the device it trains on, and the
    backend (None: one process, no process group)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str | None = None
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that logs, evaluates and saves."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.backend is not None

    def barrier(self) -> None:
        """Wait for every rank (no-op in one process); a lost rank is a DistributedError."""
        if self.distributed:
            try:
                dist.barrier()
            except RuntimeError as e:
                raise lost_rank(self, e, "while waiting for the other ranks") from None

    def describe(self) -> dict[str, object]:
        """What trainer_state.json records about the run's processes."""
        return {"world_size": self.world, "backend": self.backend or "none"}


SINGLE = Ranks()


def is_lost_rank(error: BaseException) -> bool:
    """Whether `error` is a collective failing because another rank went away (gloo raises a
    plain RuntimeError naming itself; NCCL and the c10d store raise DistError)."""
    text = str(error)
    return isinstance(error, dist.DistError) or any(
        word in text for word in ("gloo", "NCCL", "Connection closed", "Connection reset")
    )


def lost_rank(ranks: Ranks, error: BaseException, when: str) -> DistributedError:
    """The one-line error for a collective that failed (the first line of the backend's text)."""
    reason = (str(error).strip().splitlines() or ["?"])[0]
    if reason.startswith("["):  # gloo's "[path/pair.cc:537] Read error ...: Connection reset"
        reason = reason.partition("] ")[2]
    reason = reason.partition(". ")[0][:160]
    return DistributedError(f"rank {ranks.rank}: lost another rank {when} ({reason})")


@contextlib.contextmanager
def stop_on_sigterm(ranks: Ranks, message: Callable[[], str]) -> Iterator[None]:
    """Under torchrun, turn SIGTERM (what torchrun sends every rank once one has failed) into a
    one-line DistributedError (`message()` says what to do next) instead of a silent death.
    Once such an error is on its way out, later SIGTERMs are ignored so that it gets printed."""
    if not ranks.distributed:
        yield
        return

    def stop(signum: int, frame: Any) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise DistributedError(f"rank {ranks.rank}: stopped by torchrun (SIGTERM); {message()}")

    before = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    except DistributedError:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # torchrun's SIGTERM follows: let it pass
        raise
    signal.signal(signal.SIGTERM, before)


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None:
        return None
    if not value.isdigit():
        raise DistributedError(f"${name}={value!r} must be an integer >= 0 (torchrun sets it)")
    return int(value)


@contextlib.contextmanager
def process_group(device: str = "cpu") -> Iterator[Ranks]:
    """Join the process group torchrun started this process in, or run alone without one.

    device: 'cpu' (gloo) or 'cuda' (NCCL, cuda:LOCAL_RANK). The group is destroyed on exit."""
    if device not in ("cpu", "cuda"):
        raise DistributedError(f"device {device!r} must be 'cpu' or 'cuda'")
    if device == "cuda" and not torch.cuda.is_available():
        raise DistributedError("--device cuda: no CUDA device here; train with --device cpu")
    world = _env_int("WORLD_SIZE")
    if world is None or world == 1:  # torchrun with one process needs no group either
        local = torch.device("cuda", torch.cuda.current_device()) if device == "cuda" else None
        yield Ranks(device=local or torch.device("cpu"))
        return
    rank, local_rank = _env_int("RANK"), _env_int("LOCAL_RANK")
    if rank is None or local_rank is None:
        raise DistributedError(
            "$WORLD_SIZE is set but $RANK or $LOCAL_RANK is not: start the ranks with torchrun"
        )
    backend = "nccl" if device == "cuda" else "gloo"
    where = torch.device("cpu")
    if device == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise DistributedError(
                f"local rank {local_rank} has no GPU ({torch.cuda.device_count()} here); "
                "start at most one process per GPU (--nproc-per-node)"
            )
        where = torch.device("cuda", local_rank)
        torch.cuda.set_device(where)
    kwargs = {"device_id": where} if device == "cuda" else {}
    dist.init_process_group(backend, timeout=TIMEOUT, **kwargs)
    ranks = Ranks(rank, world, local_rank, backend, where)
    try:
        with stop_on_sigterm(ranks, lambda: "rerun the same command once every rank can run"):
            yield ranks
    finally:
        with contextlib.suppress(Exception):  # a lost peer must not hide the real error
            dist.destroy_process_group()
