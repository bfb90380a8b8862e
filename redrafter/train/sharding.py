"""The frozen base sharded across torchrun's ranks (`train-drafter --shard-base`), with
PyTorch's own FSDP2 (`torch.distributed.fsdp.fully_shard`), for a base that does not fit one
device.

Each decoder layer is one FSDP unit, and the root (embeddings, final norm, LM head) another:
every parameter is cut along dim 0 into N chunks and rank r keeps chunk r, so a rank holds
about 1/N of the base. A forward all-gathers one unit's parameters just before it runs and
frees them right after (`reshard_after_forward`), so a rank never holds more than its shard
plus one unit whole. The base is frozen: nothing here ever runs a backward.

The price: every forward of a unit is a collective, so all ranks must run the base's forwards
together, in the same order and with the same kinds of calls (answers.py's `Lockstep`).
`hidden_states` and `logits` are registered as FSDP forward methods, since the teacher code
calls them directly and FSDP hooks only the methods it is told of.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor

from redrafter.errors import RedrafterError
from redrafter.models.llama import Transformer
from redrafter.train.distributed import Ranks

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ShardingError(RedrafterError):
    """--shard-base or --base-dtype asked for something this run cannot do."""


def base_dtype(name: str) -> torch.dtype:
    """The torch dtype of a `--base-dtype` name; another name is a one-line ShardingError."""
    if name not in DTYPES:
        raise ShardingError(f"base dtype {name!r} must be one of {', '.join(DTYPES)}")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    """'float32' for torch.float32: how manifests and trainer_state.json spell a dtype."""
    return str(dtype).removeprefix("torch.")


def check_shardable(ranks: Ranks) -> None:
    """--shard-base needs the processes torchrun starts: with one there is nothing to split
    the base across, and running it whole would hide that the command lacked torchrun until
    the base failed to fit, hours of loading later."""
    if ranks.world < 2:
        raise ShardingError(
            "--shard-base splits the base across torchrun's processes, but this is 1 process; "
            "start it with torchrun --nproc-per-node N (N >= 2), or drop --shard-base"
        )


def shard_base(base: Transformer, ranks: Ranks) -> Transformer:
    """Shard `base` (on the CPU, whole) in place across the ranks of the process group: one
    FSDP unit per decoder layer, then the root. Shards land on `ranks.device`, a layer at a
    time, so the device never holds more than the shards plus one layer whole."""
    check_shardable(ranks)
    for p in base.parameters():
        p.requires_grad_(False)  # frozen: FSDP then keeps no gradient state
    mesh = init_device_mesh(ranks.device.type, (ranks.world,))
    for layer in base.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(base, mesh=mesh)
    for method in ("hidden_states", "logits"):  # called directly by teacher.py and answers.py
        register_fsdp_forward_method(base, method)
    return base


def is_sharded(base: torch.nn.Module) -> bool:
    return isinstance(base, FSDPModule)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A whole tensor: a sharded parameter's all-gathered copy (a collective: every rank must
    ask, in the same order), any other tensor itself."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def param_bytes(base: torch.nn.Module) -> tuple[int, int]:
    """(bytes of the base's parameters this rank holds, bytes of the whole base's)."""
    local = whole = 0
    for p in base.parameters():
        held = p.to_local() if isinstance(p, DTensor) else p
        local += held.numel() * held.element_size()
        whole += p.numel() * p.element_size()  # a DTensor's numel is the global one
    return local, whole


def bytes_per_rank(base: torch.nn.Module, ranks: Ranks) -> list[int]:
    """The parameter bytes each rank holds (rank order); a collective when distributed."""
    local, _ = param_bytes(base)
    if not is_sharded(base):  # every rank holds the whole base
        return [local] * ranks.world
    held = torch.zeros(ranks.world, dtype=torch.int64, device=ranks.device)  # (world,)
    held[ranks.rank] = local
    dist.all_reduce(held)
    return held.tolist()
