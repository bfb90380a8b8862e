"""The base's answers as a dataset on disk: made once, sharded across ranks, reused by every
epoch and every later run with the same base and prompts.

Dimensions: n positions in a shard, p prompts in a shard, E hidden size, C teacher top-C.

A folder holds `shard-00000.safetensors`, `shard-00001.safetensors`, ... (`shard_prompts`
consecutive prompts each) and `manifest.json`, written last by rank 0 once every shard exists.
A shard stores the traces of its prompts back to back (`generate_answers`):

    hidden (n, E) float32   the base's post-norm hidden state at each context position
    next (n,) int64         the base's greedy token after it
    lengths (p,) int64      positions per prompt (they sum to n)
    top_ids (n, C) int64, top_logp (n, C) float32   the base's top-C log-probs (when C > 0)

and, as safetensors metadata, the base's fingerprint, the generation settings and the sha256
of its prompts' ids, so a shard is never reused for another base, prompts or settings. Shard i
is made by rank `i % world`, each one alone (its own slots, its own prompts in order), so the
tensors of a shard do not depend on how many ranks made the folder. Caching the hidden states is
what lets every epoch skip the base's forward: training reads them and never runs the base.

With the base sharded across the ranks (sharding.py), each rank still makes its own shards, but
its forwards are paired with the others' (answers.py's `Lockstep`): a rank done with its shards
steps dummies until every rank is done. The parameters it computes with are the whole ones
(all-gathered), so the shards are the same as unsharded. The base's dtype (`--base-dtype`) is
part of the metadata: bf16 greedy answers are another teacher's, never reused for fp32.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from redrafter.errors import RedrafterError
from redrafter.models.llama import Transformer
from redrafter.train.answers import Lockstep, generate_answers
from redrafter.train.distributed import SINGLE, Ranks, is_lost_rank, lost_rank
from redrafter.train.runtime_answers import BundleTeacher, runtime_answers
from redrafter.train.sharding import dtype_name, full_tensor, is_sharded
from redrafter.train.teacher import Examples, examples_from_trace

MANIFEST = "manifest.json"
FORMAT = 1


class TeacherDataError(RedrafterError):
    """A teacher data folder belongs to another base, other prompts or other settings."""


@dataclasses.dataclass(frozen=True)
class TeacherSettings:
    """What determines the traces besides the base and the prompts."""

    max_new_tokens: int
    eos_token_ids: tuple[int, ...]
    top_c: int = 0
    shard_prompts: int = 256

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "eos_token_ids": list(self.eos_token_ids)}


def base_fingerprint(base: Transformer) -> str:
    """sha256 (first 16 hex digits) of the base's config and of every parameter's name, shape,
    dtype and 4,096 evenly spaced values: cheap for any size, and different checkpoints differ.
    A sharded base gives the unsharded one's (each parameter gathered whole, one at a time:
    every rank must call this together)."""
    h = hashlib.sha256(json.dumps(base.config.to_dict(), sort_keys=True, default=str).encode())
    for name, p in base.state_dict().items():
        flat = full_tensor(p.detach()).reshape(-1)  # (numel,)
        sample = flat[:: max(1, flat.numel() // 4096)][:4096].float().cpu()
        h.update(f"{name}{tuple(p.shape)}{p.dtype}".encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


def prompts_sha256(prompts: Sequence[Sequence[int]]) -> str:
    return hashlib.sha256(json.dumps([list(p) for p in prompts]).encode()).hexdigest()


def _shard_file(i: int) -> str:
    return f"shard-{i:05d}.safetensors"


def _metadata(path: Path) -> dict[str, str] | None:
    """A shard's metadata, or None when the file is absent or unreadable (re-made)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (OSError, ValueError, RuntimeError):
        return None


def _check(meta: dict[str, str], expected: dict[str, str], where: Path) -> None:
    """One-line errors for a shard made with another base, prompts or settings."""
    for key, what, fix in (
        ("base_dtype", "base dtype", "another --base-dtype"),
        ("base", "base model", "another base"),
        ("settings", "generation settings", "other settings (--seq-len, --kl-weight)"),
        ("prompts_sha256", "prompts", "other prompts"),
    ):
        # Folders from before --base-dtype hold no dtype: their base always ran in fp32.
        found = meta.get(key, "float32" if key == "base_dtype" else None)
        if found != expected[key]:
            raise TeacherDataError(
                f"{where}: teacher data made with {fix} ({what} {key}={found!r}, this "
                f"run's is {expected[key]!r}); pass another --teacher-data folder or delete it"
            )


def _write_shard(path: Path, traces: Sequence[Any], metadata: dict[str, str]) -> None:
    """The traces of one shard, into a temp file renamed into place (a kill leaves no shard)."""
    tensors = {
        "hidden": torch.cat([t[0] for t in traces]).float().contiguous(),  # (n, E)
        "next": torch.cat([t[1] for t in traces]).contiguous(),  # (n,)
        "lengths": torch.tensor([len(t[1]) for t in traces], dtype=torch.int64),  # (p,)
    }
    if traces[0][2] is not None:
        tensors["top_ids"] = torch.cat([t[2] for t in traces]).contiguous()  # (n, C)
        tensors["top_logp"] = torch.cat([t[3] for t in traces]).float().contiguous()  # (n, C)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file(tensors, str(tmp), metadata=metadata)
    tmp.replace(path)


def teacher_identity(base: Transformer | BundleTeacher) -> dict[str, str]:
    """What names the teacher in the metadata: a torch base's dtype and fingerprint, or a
    bundle's 'bundle:<precision>' and its fingerprint (never equal to a torch base's)."""
    if isinstance(base, BundleTeacher):
        return {"base_dtype": f"bundle:{base.precision}", "base": base.fingerprint}
    return {"base_dtype": dtype_name(base.embed_weight.dtype), "base": base_fingerprint(base)}


def build_teacher_data(
    base: Transformer | BundleTeacher,
    prompts: Sequence[Sequence[int]],
    folder: str | Path,
    settings: TeacherSettings,
    *,
    slots: int = 64,
    ranks: Ranks = SINGLE,
    progress: Callable[[int], None] = lambda n: None,
) -> Path:
    """Make (or finish) the teacher data for `prompts` in `folder`: this rank generates the
    missing shards `i % world == rank`, every rank waits for the others, and rank 0 writes the
    manifest. Shards already there are checked and kept. Returns the folder. With a sharded
    base every rank's forwards run in lockstep with the others' (module docstring). `base` may
    be a `BundleTeacher`: the answers then come from an exported bundle's runtime
    (runtime_answers.py), e.g. the int4 model the drafter will run on."""
    folder = Path(folder)
    expected = {
        **teacher_identity(base),
        "settings": json.dumps(settings.to_dict(), sort_keys=True),
    }
    manifest = folder / MANIFEST
    if manifest.is_file():
        saved = json.loads(manifest.read_text())
        _check({**saved, "settings": json.dumps(saved["settings"], sort_keys=True)},
               {**expected, "prompts_sha256": prompts_sha256(prompts)}, folder)  # fmt: skip
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    n = settings.shard_prompts
    shards = [prompts[i : i + n] for i in range(0, len(prompts), n)]
    lockstep = None
    if isinstance(base, Transformer):
        lockstep = Lockstep(base, ranks if is_sharded(base) else SINGLE)
    try:
        for i, shard in enumerate(shards):
            path = folder / _shard_file(i)
            wanted = {**expected, "prompts_sha256": prompts_sha256(shard)}
            meta = _metadata(path)
            if meta is not None:
                _check(meta, wanted, path)
            if i % ranks.world != ranks.rank:
                continue
            if meta is not None:
                progress(len(shard))
                continue
            if isinstance(base, BundleTeacher):
                answer: Callable[..., list[Any]] = functools.partial(runtime_answers, base.runtime)
            else:
                answer = functools.partial(generate_answers, base, lockstep=lockstep)
            traces = answer(
                shard,
                max_new_tokens=settings.max_new_tokens,
                eos_token_ids=settings.eos_token_ids,
                top_c=settings.top_c,
                slots=slots,
                progress=progress,
            )
            _write_shard(path, traces, wanted)
        if lockstep is not None:
            lockstep.drain()  # a sharded base: the others' forwards still need this rank's
    except RuntimeError as e:
        # A rank that died mid-generation fails the others' next collective (a lockstep
        # all-reduce or FSDP's all-gather): one line, not a traceback from inside the backend.
        if not (ranks.distributed and is_lost_rank(e)):
            raise
        error = lost_rank(ranks, e, "while making teacher data")
        raise type(error)(
            f"{error}; the finished shards in {folder} are kept: rerun the same command"
        ) from None
    ranks.barrier()  # every shard is on disk
    if ranks.is_main:
        record = {
            "format": FORMAT,
            "base_dtype": expected["base_dtype"],
            "base": expected["base"],
            "settings": settings.to_dict(),
            "prompts": len(prompts),
            "prompts_sha256": prompts_sha256(prompts),
            "shards": [
                {"file": _shard_file(i), "prompts": len(s), "prompts_sha256": prompts_sha256(s)}
                for i, s in enumerate(shards)
            ],
        }
        tmp = folder / f".{MANIFEST}.tmp"
        tmp.write_text(json.dumps(record, indent=1) + "\n")
        tmp.replace(manifest)  # last: its presence marks a complete folder
    ranks.barrier()
    return folder


def is_complete(folder: str | Path) -> bool:
    return (Path(folder) / MANIFEST).is_file()


def load_examples(folder: str | Path, *, predict_tokens: int) -> tuple[Examples, list[list[int]]]:
    """Every shard of a complete folder as training examples (K = `predict_tokens`), and the
    base's answer (token ids) to each prompt, in prompt order."""
    folder = Path(folder)
    record = json.loads((folder / MANIFEST).read_text())
    parts, answers = [], []
    for shard in record["shards"]:
        with safe_open(str(folder / shard["file"]), framework="pt") as f:
            t = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        top = "top_ids" in t
        ends = t["lengths"].cumsum(0).tolist()
        for start, end in zip([0, *ends[:-1]], ends, strict=True):
            nxt = t["next"][start:end]  # (n_prompt,)
            answers.append(nxt.tolist())
            parts.append(
                examples_from_trace(
                    t["hidden"][start:end],
                    nxt,
                    predict_tokens=predict_tokens,
                    top_ids=t["top_ids"][start:end] if top else None,
                    top_logp=t["top_logp"][start:end] if top else None,
                )
            )
    return Examples.cat(parts), answers
