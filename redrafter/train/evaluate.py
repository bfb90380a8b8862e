"""Evaluating a drafter: teacher-forced accuracy on held-out examples, and tokens/step on
held-out prompts with the real decode driver (greedy, torch runtime) — the number that matters.

Dimensions: M context positions, K predicted tokens, Vd the head's vocab.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch

from redrafter.config import BeamShape
from redrafter.models.drafter import Drafter
from redrafter.models.llama import Transformer
from redrafter.train.loss import accuracy, drafter_loss, to_head_ids, unroll
from redrafter.train.teacher import Examples


@torch.no_grad()
def heldout_metrics(
    drafter: Drafter,
    examples: Examples,
    embed_weight: torch.Tensor,
    head_index: torch.Tensor | None,
    *,
    batch_size: int = 1024,
) -> dict[str, float]:
    """Loss and top-k / chain accuracy per step on `examples`, weighted by context count."""
    if len(examples) == 0:
        return {}
    was_training = drafter.training
    drafter.eval()
    sums: dict[str, float] = {}
    for start in range(0, len(examples), batch_size):
        rows = torch.arange(start, min(start + batch_size, len(examples)))
        part = examples.take(rows).to(embed_weight.device)
        logits = unroll(drafter, part.context, part.tokens, embed_weight)  # (m, K, Vd)
        targets = to_head_ids(part.tokens[:, 1:], head_index)  # (m, K)
        _, logs = drafter_loss(logits, targets)
        logs.update(accuracy(logits, targets))
        for k, v in logs.items():
            sums[k] = sums.get(k, 0.0) + v * len(part)
    drafter.train(was_training)
    return {k: v / len(examples) for k, v in sums.items()}


def tokens_per_step(
    base: Transformer,
    drafter: Drafter,
    prompts: Sequence[Sequence[int]],
    *,
    beam: BeamShape,
    max_new_tokens: int,
    eos_token_ids: Sequence[int] = (),
    batch_size: int = 1,
) -> dict[str, float]:
    """Greedy speculative decoding of `prompts` with the real driver on the torch runtime (on
    the base's device), `batch_size` prompts per decode. Returns tokens/step over all rows
    (the prefill's token excluded, as in `summarize`) and the mean accepted drafts per step.

    One prompt per decode by default: with several, a row that finishes inside a multi-token
    accept leaves its cache up to L-2 slots past the driver's capacity while the others go on
    verifying (a driver bug, reported), which a trained drafter triggers.

    The decode runs in the base's dtype (`--base-dtype`). The runtime casts the models it is
    given in place, so a base in bf16/fp16 decodes with a cast copy of the drafter, never the
    fp32 one being trained."""
    from redrafter.decoding.driver import decode
    from redrafter.decoding.options import DecodeOptions
    from redrafter.runtimes.torch import TorchRuntime
    from redrafter.train.sharding import dtype_name

    was_training = drafter.training
    dtype = dtype_name(base.embed_weight.dtype)
    if dtype != "float32":
        drafter = copy.deepcopy(drafter)
    runtime = TorchRuntime(base, drafter, device=base.embed_weight.device.type, dtype=dtype)
    emitted = row_steps = accepted = 0
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        options = DecodeOptions(max_new_tokens=max_new_tokens, beam=beam)
        for step in decode(runtime, batch, options, eos_token_ids=eos_token_ids):
            if step.kind == "prefill":
                continue
            for b, row in enumerate(step.new_tokens):
                if row:
                    emitted += len(row)
                    row_steps += 1
                    accepted += int(step.accepted[b])
    drafter.train(was_training)
    return {
        "tokens_per_step": emitted / max(row_steps, 1),
        "accepted_per_step": accepted / max(row_steps, 1),
        "steps": float(row_steps),
    }
