"""The drafter training loop: AdamW over shuffled context positions, a rich progress bar,
periodic evaluation, and resumable checkpoints written beside the drafter (checkpoint.py).

Dimensions: M context positions, K predicted tokens, E hidden size, V vocab, Vd draft vocab,
X exit_dim.

Batches come from a seeded permutation per epoch, so a resumed run sees the same batches as an
uninterrupted one and ends with the same weights. Under torchrun (distributed.py) the batch of a
step is the same global batch, split into one consecutive part per rank; DistributedDataParallel
averages the parts' gradients, and the loss divides by the whole batch's counts, so any number
of processes trains the drafter one process would (up to float rounding).

The base may be sharded (`--shard-base`, sharding.py) and in bf16/fp16 (`--base-dtype`): the
drafter still trains in fp32 on a whole fp32 copy of the embedding table it reads, gathered once.
Training never runs the base (its outputs are cached), but tokens/step evaluation does, on rank
0 alone: with a sharded base it is skipped (see `train_drafter`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch.nn.parallel import DistributedDataParallel

from redrafter.config import BeamShape, DrafterConfig
from redrafter.errors import ConfigError
from redrafter.models.checkpoints import load_drafter
from redrafter.models.drafter import Drafter
from redrafter.models.llama import Transformer
from redrafter.train.checkpoint import (
    OPTIMIZER_FILE,
    STATE_FILE,
    find_checkpoint,  # noqa: F401  (its old home: tests/test_fault_injection.py imports it here)
    load_checkpoint,
    restore_optimizer,
    save_checkpoint,
)
from redrafter.train.distributed import SINGLE, Ranks, is_lost_rank, lost_rank, stop_on_sigterm
from redrafter.train.evaluate import heldout_metrics, tokens_per_step
from redrafter.train.loss import IGNORE, drafter_loss, target_counts, to_head_ids, unroll
from redrafter.train.sharding import bytes_per_rank, dtype_name, full_tensor, is_sharded
from redrafter.train.teacher import Examples
from redrafter.train.vocab import choose_draft_vocab, head_index

Mode = Literal["ce", "distill"]


@dataclasses.dataclass(frozen=True)
class TrainOptions:
    """How to train. `batch_size` counts context positions per optimizer step (each unrolls
    `predict_tokens` drafter steps); `seq_len` is the data chunk length (ce) or the most tokens
    the base generates per prompt (distill). `steps` wins over `epochs`; neither = 1 epoch.
    `exit_dim` None = the base's hidden size E, which lets the head start as the base's own LM
    head restricted to the draft vocab (`init='base'`); `draft_vocab` None = the full vocab.
    `bf16` autocasts the drafter's forward (the loss stays fp32): 1.8x faster on CPUs with
    native bf16 (AVX512-BF16/AMX), slower elsewhere, hence the default None = detect."""

    mode: Mode = "ce"
    steps: int | None = None
    epochs: float | None = None
    batch_size: int = 256
    seq_len: int = 128
    lr: float = 3e-3
    weight_decay: float = 0.0
    warmup_fraction: float = 0.05
    predict_tokens: int = 5
    exit_dim: int | None = None
    num_layers: int = 1
    draft_vocab: int | None = 8192
    init: Literal["base", "random"] = "base"
    freeze_head: bool = False  # keep the head's output rows at the base's LM head (EAGLE-style)
    kl_weight: float = 0.0
    bf16: bool | None = None  # bf16 autocast for the drafter's matmuls; None = where fast
    top_c: int = 16
    eval_every: int = 0  # steps between evaluations; 0 = only at the end
    save_every: int = 0  # steps between checkpoints; 0 = only at the end
    eval_beam: BeamShape = BeamShape(4, 5)
    eval_max_new_tokens: int = 48
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in ("ce", "distill"):
            raise ConfigError(f"mode {self.mode!r} must be 'ce' or 'distill'")
        if self.init not in ("base", "random"):
            raise ConfigError(f"init {self.init!r} must be 'base' or 'random'")
        for name in ("batch_size", "seq_len", "predict_tokens", "top_c"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"training option {name}={value!r} must be an integer >= 1")
        for name in ("steps", "exit_dim", "draft_vocab"):  # None = the documented default
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ConfigError(f"training option {name}={value!r} must be an integer >= 1")
        if self.epochs is not None and not self.epochs > 0:
            raise ConfigError(f"training option epochs={self.epochs!r} must be > 0")
        if not self.lr > 0:
            raise ConfigError(f"training option lr={self.lr!r} must be > 0")
        if self.num_layers < 0 or self.eval_every < 0 or self.save_every < 0:
            raise ConfigError("num_layers, eval_every and save_every must be >= 0")
        if self.kl_weight < 0:
            raise ConfigError(f"training option kl_weight={self.kl_weight!r} must be >= 0")

    def total_steps(self, examples: int) -> int:
        if self.steps is not None:
            return self.steps
        return max(1, math.ceil((self.epochs or 1.0) * examples / self.batch_size))

    def to_dict(self) -> dict[str, Any]:
        raw = dataclasses.asdict(self)
        raw["eval_beam"] = [self.eval_beam.width, self.eval_beam.length]
        return raw


@dataclasses.dataclass
class Heldout:
    """What evaluation uses: examples (teacher-forced accuracy) and id prompts (tokens/step)."""

    examples: Examples | None = None
    prompts: Sequence[Sequence[int]] = ()


@dataclasses.dataclass
class TrainResult:
    drafter: Drafter
    out: Path
    steps: int
    seconds: float
    history: list[dict[str, float]]
    final_eval: dict[str, float]
    coverage: float | None


def base_head_weight(base: Transformer) -> torch.Tensor:
    """The base's LM head matrix (V, E) (the embeddings when tied)."""
    return base.embed_weight if base.lm_head is None else base.lm_head.weight


def build_drafter(
    base: Transformer, train: Examples, options: TrainOptions
) -> tuple[Drafter, float | None]:
    """A fresh drafter for `base`: draft vocab chosen from the training targets, head rows
    copied from the base's LM head when `init='base'` and exit_dim == E (the drafter then starts
    from the base's own next-token readout and only learns to look further ahead — far fewer
    steps than from random; the input projection starts as [I | 0], i.e. reading h_t).
    Returns the drafter and the draft vocab's coverage of the targets (None for the full vocab)."""
    c = base.config
    E = c.hidden_size
    exit_dim = options.exit_dim or E
    draft_ids, coverage = None, None
    if options.draft_vocab is not None and options.draft_vocab < c.vocab_size:
        draft_ids, coverage = choose_draft_vocab(
            train.tokens[:, 1:],
            vocab_size=c.vocab_size,
            size=options.draft_vocab,
            always=c.eos_token_ids,
        )
    config = DrafterConfig(
        vocab_size=c.vocab_size,
        hidden_size=E,
        exit_dim=exit_dim,
        num_draft_layers=options.num_layers,
        draft_vocab_size=None if draft_ids is None else len(draft_ids),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(options.seed)
        drafter = Drafter(config)
    with torch.no_grad():
        if draft_ids is not None:
            assert drafter.draft_token_ids is not None
            drafter.draft_token_ids.copy_(draft_ids)
        if options.init == "base" and exit_dim == E:
            head = full_tensor(base_head_weight(base).detach())  # (V, E) gathered if sharded
            rows = head if draft_ids is None else head[draft_ids.to(head.device)]  # (Vd, E)
            drafter.lm_head[-1].weight.copy_(rows)
            for block in drafter.lm_head[:-1]:  # residual blocks start as the identity
                block.linear.weight.zero_()
                block.linear.bias.zero_()
            if config.has_input_proj:
                drafter.input_proj.weight.zero_()
                drafter.input_proj.weight[:, :E].copy_(torch.eye(E))
                drafter.input_proj.bias.zero_()
    return drafter, coverage


def use_bf16(option: bool | None, device: torch.device) -> bool:
    """bf16 autocast where it pays: CUDA, or a CPU whose oneDNN has native bf16 kernels."""
    if option is not None:
        return option
    if device.type == "cuda":
        return True
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _lr_at(step: int, total: int, options: TrainOptions) -> float:
    """Linear warmup, then cosine decay to 10 % of the peak."""
    warm = max(1, int(options.warmup_fraction * total))
    if step < warm:
        return options.lr * (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return options.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * min(progress, 1.0))))


def batch_indices(step: int, *, count: int, batch_size: int, seed: int) -> torch.Tensor:
    """The example rows of `step`: consecutive slices of a seeded permutation per epoch, so
    the order depends only on (seed, step) and a resumed run replays it exactly. (batch_size,)"""
    start, need, picked = step * batch_size, batch_size, []
    while need > 0:
        epoch, offset = divmod(start, count)
        generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        take = torch.randperm(count, generator=generator)[offset : offset + need]
        picked.append(take)
        start, need = start + len(take), need - len(take)
    return torch.cat(picked)


def progress_bar(enabled: bool) -> Any:
    """A rich progress bar on stderr (disabled: no output), with an `info` text field."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        console=Console(stderr=True),
        disable=not enabled,
    )


class _Unroll(torch.nn.Module):
    """The teacher-forced unroll as a module's forward: DistributedDataParallel syncs gradients
    only for what runs through the forward of the module it wraps."""

    def __init__(self, drafter: Drafter) -> None:
        super().__init__()
        self.drafter = drafter

    def forward(
        self, context: torch.Tensor, tokens: torch.Tensor, embed: torch.Tensor
    ) -> torch.Tensor:
        return unroll(self.drafter, context, tokens, embed)  # (M, K, Vd)


def _resume(out: Path, ranks: Ranks) -> tuple[Drafter, dict[str, torch.Tensor], dict[str, Any]]:
    """Every rank's copy of the last checkpoint: rank 0 recovers it (`find_checkpoint` may
    rename folders) while the others wait, then each reads it (`out` on a shared file system)."""
    if ranks.is_main:
        loaded = load_checkpoint(out)
    ranks.barrier()
    if not ranks.is_main:
        state = json.loads((out / STATE_FILE).read_text())
        loaded = load_drafter(out), load_file(str(out / OPTIMIZER_FILE)), state
    return loaded


def train_drafter(
    base: Transformer,
    train: Examples,
    out: str | Path,
    options: TrainOptions,
    *,
    heldout: Heldout = Heldout(),
    eos_token_ids: Sequence[int] = (),
    resume: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = lambda message: None,
    stop_after: int | None = None,
    ranks: Ranks = SINGLE,
) -> TrainResult:
    """Train a drafter for the frozen `base` on `train` examples and save it to `out`.

    With `resume`, continue from the checkpoint in `out` (its weights, optimizer state and
    step), whatever world size wrote it. `stop_after` ends the run early at that step with a
    checkpoint, as an interruption would (a job with a time limit; tests of resuming).
    `ranks`: this process's place under torchrun; every rank passes the same examples and
    options, rank 0 alone logs, shows progress, evaluates and saves.

    A sharded base (`--shard-base`) skips the tokens/step evaluation: it decodes with the real
    driver, whose number of base forwards depends on how many drafts are accepted, and rank 0
    would run those collectives alone. Pairing them with the other ranks would need every
    rank to replay the same decode and agree bitwise; a hang if one rounded differently.
    Held-out accuracy (no base involved) is still evaluated; measure tokens/step afterwards
    with `redrafter bench` on a device the base fits."""
    out = Path(out)
    if train.predict_tokens < options.predict_tokens:
        raise ConfigError(
            f"the examples hold {train.predict_tokens} tokens per context but predict_tokens="
            f"{options.predict_tokens}; rebuild them"
        )
    if len(train) == 0:
        raise ConfigError("no training examples; pass more data")
    if options.batch_size < ranks.world:
        raise ConfigError(
            f"--batch-size {options.batch_size} is smaller than the {ranks.world} processes "
            "that split it; pass a larger batch or start fewer processes"
        )
    if not ranks.is_main:
        progress, log = False, lambda message: None
    K = options.predict_tokens
    for p in base.parameters():
        p.requires_grad_(False)
    sharded = is_sharded(base)
    # The drafter reads token embeddings: a whole fp32 table on every rank (a collective when
    # the base is sharded; a no-op for an unsharded fp32 base).
    embed = full_tensor(base.embed_weight.detach()).float()  # (V, E)
    device = embed.device  # the drafter trains where the base lives; examples stay on the CPU
    base_info = {
        "shard_base": sharded,
        "base_dtype": dtype_name(base.embed_weight.dtype),
        "base_bytes_per_rank": bytes_per_rank(base, ranks),  # the parameters each rank holds
    }
    if sharded:
        held = base_info["base_bytes_per_rank"]
        log(f"base sharded over {ranks.world} ranks: {max(held) / 2**20:.1f} MiB of parameters "
            f"per rank at most; tokens/step evaluation skipped (needs the whole base)")  # fmt: skip
    total = options.total_steps(len(train))
    history: list[dict[str, float]] = []
    start_step = 0
    coverage: float | None = None
    running: dict[str, float] = {}  # moving averages of the training logs (saved: continuity)
    seconds_before = 0.0  # training time of the run(s) this one resumes
    if resume:
        drafter, opt_tensors, state = _resume(out, ranks)
        start_step, history = int(state["step"]), list(state.get("history", []))
        coverage, running = state.get("coverage"), dict(state.get("running", {}))
        seconds_before = float(state.get("train_seconds", 0.0))
        was = state.get("world_size", 1)
        log(f"resuming {out} at step {start_step}/{total} (saved by {was} process(es))")
    else:
        drafter, coverage = build_drafter(base, train, options)
        opt_tensors, running = {}, {}
    drafter.to(device).train()
    index = head_index(drafter.draft_token_ids, base.config.vocab_size)
    index = None if index is None else index.to(device)
    if options.freeze_head:
        drafter.lm_head[-1].weight.requires_grad_(False)
    model: torch.nn.Module = _Unroll(drafter)
    if ranks.distributed:  # broadcasts rank 0's weights now, averages gradients in backward
        ids = [device.index] if device.type == "cuda" else None
        model = DistributedDataParallel(model, device_ids=ids)
    params = [p for p in drafter.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=options.lr, weight_decay=options.weight_decay)
    restore_optimizer(optimizer, drafter, opt_tensors)
    bf16 = use_bf16(options.bf16, device)
    extra = {
        "coverage": coverage,
        "examples": len(train),
        "bf16": bf16,
        **base_info,
        **ranks.describe(),
    }
    started = time.perf_counter()
    end = total if stop_after is None else min(total, stop_after)
    final_eval: dict[str, float] = {}
    saved = start_step if resume else None  # the step of the last complete checkpoint

    def evaluate(step: int) -> dict[str, float]:
        metrics: dict[str, float] = {"step": float(step)}
        if heldout.examples is not None and len(heldout.examples):
            ex = heldout.examples
            held = heldout_metrics(drafter, ex, embed, index)
            metrics.update({f"eval_{k}": v for k, v in held.items()})
        if heldout.prompts and not sharded:
            tps = tokens_per_step(
                base,
                drafter,
                heldout.prompts,
                beam=options.eval_beam,
                max_new_tokens=options.eval_max_new_tokens,
                eos_token_ids=eos_token_ids,
            )
            metrics["eval_tokens_per_step"] = tps["tokens_per_step"]
        drafter.train()
        return metrics

    def save(step: int, more: dict[str, Any]) -> None:
        nonlocal saved
        if ranks.is_main:
            save_checkpoint(
                drafter,
                optimizer,
                out,
                step=step,
                total=total,
                options=options.to_dict(),
                history=history,
                extra={**extra, **more},
            )
        saved = step

    def where() -> str:
        if saved is None:
            return f"no checkpoint in {out} yet; rerun the same command"
        return f"the last checkpoint in {out} is at step {saved}; rerun with --resume"

    step = start_step
    with stop_on_sigterm(ranks, where), progress_bar(progress) as bar:
        task = bar.add_task("training drafter", total=total, completed=start_step, info="")
        for step in range(start_step, end):
            rows = batch_indices(
                step, count=len(train), batch_size=options.batch_size, seed=options.seed
            )
            rows = torch.tensor_split(rows, ranks.world)[ranks.rank]  # this rank's part
            batch = train.take(rows).to(device)
            tokens = batch.tokens[:, : K + 1]  # (M, K+1)
            targets = to_head_ids(tokens[:, 1:], index)  # (M, K)
            teacher_rows = teacher_logp = None
            if options.kl_weight and batch.teacher_ids is not None:
                teacher_rows = to_head_ids(batch.teacher_ids[:, :K], index)  # (M, K, C)
                teacher_logp = batch.teacher_logp[:, :K]  # type: ignore[index]
            counts = target_counts(targets, teacher_rows)  # (2, K) this part's
            for group in optimizer.param_groups:
                group["lr"] = _lr_at(step, total, options)
            try:
                if ranks.distributed:
                    dist.all_reduce(counts)  # (2, K) the whole batch's: the loss's denominators
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                    logits = model(batch.context, tokens, embed)  # (M, K, Vd)
                logits = logits.float()
                loss, logs = drafter_loss(
                    logits,
                    targets,
                    teacher_rows=teacher_rows,
                    teacher_logp=teacher_logp,
                    kl_weight=options.kl_weight,
                    counts=counts,
                )
                optimizer.zero_grad(set_to_none=True)
                # DDP averages the ranks' gradients; each loss is its part of the batch's mean,
                # so scaling by the world size turns that average back into their sum.
                (loss * ranks.world).backward()
                optimizer.step()
                hits = (logits[:, 0].argmax(-1) == targets[:, 0])[targets[:, 0] != IGNORE]
                logs["top1@1"] = float(hits.float().sum() / counts[0, 0].clamp(min=1))
                if ranks.distributed:  # the parts' shares add up to the batch's values
                    shares = torch.tensor(list(logs.values()), dtype=torch.float64, device=device)
                    dist.all_reduce(shares)
                    logs = dict(zip(logs, shares.tolist(), strict=True))
            except RuntimeError as e:
                if not (ranks.distributed and is_lost_rank(e)):
                    raise
                error = lost_rank(ranks, e, f"at step {step}")
                raise type(error)(f"{error}; {where()}") from None
            for k, v in logs.items():  # exponential moving averages for the bar
                running[k] = v if k not in running else 0.9 * running[k] + 0.1 * v
            done = step + 1
            bar.update(
                task,
                completed=done,
                info=f"loss {running['loss']:.3f} top1@1 {running['top1@1']:.2f}",
            )
            if options.eval_every and done % options.eval_every == 0 and done < end:
                if ranks.is_main:
                    metrics = {**evaluate(done), "train_loss": running["loss"]}
                    history.append(metrics)
                    log(_describe(metrics))
            if options.save_every and done % options.save_every == 0 and done < end:
                seconds = seconds_before + time.perf_counter() - started
                save(done, {"running": running, "train_seconds": round(seconds, 1)})
        seconds = time.perf_counter() - started
        if end == total and ranks.is_main:
            bar.update(task, description="evaluating")
            final_eval = {**evaluate(end), "train_loss": running.get("loss", float("nan"))}
            history.append(final_eval)
            log(_describe(final_eval))
        extra["train_seconds"] = round(seconds_before + seconds, 1)
        save(end, {"running": running})
        ranks.barrier()  # no rank reports success before rank 0 has saved
    return TrainResult(drafter.cpu().eval(), out, end, seconds, history, final_eval, coverage)


def _describe(metrics: dict[str, float]) -> str:
    """One log line: step, held-out loss, top-1 per step, chain accuracy, tokens/step."""
    parts = [f"step {int(metrics['step'])}"]
    if "eval_loss" in metrics:
        parts.append(f"eval loss {metrics['eval_loss']:.3f}")
        tops = [v for k, v in sorted(metrics.items()) if k.startswith("eval_top1@")]
        parts.append("top1 " + " ".join(f"{v:.2f}" for v in tops))
        chain = [v for k, v in sorted(metrics.items()) if k.startswith("eval_chain")]
        parts.append("chain " + " ".join(f"{v:.2f}" for v in chain))
    if "eval_tokens_per_step" in metrics:
        parts.append(f"tokens/step {metrics['eval_tokens_per_step']:.2f}")
    return ", ".join(parts)
