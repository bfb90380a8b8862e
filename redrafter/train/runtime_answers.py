"""The base's greedy answers from an exported bundle: teacher data made by the model the user will
ship (an int4 bundle's answers and hidden states, not the fp32 checkpoint's), through the
`Runtime` protocol, so any runtime that decodes a bundle can teach a drafter.

Dimensions: R rows (slots), T prompt length, E hidden size, V vocab, C teacher top-C entries,
n tokens in one answer.

A drafter reads the hidden states of the base it runs on. A quantized base's hidden states and
greedy answers drift from the fp32 checkpoint's (issue 22: the demo drafter drafts 1.73
tokens/step on the int4 base against 1.99 on fp32 on the demo's prompts), so distilling from the
deployed bundle trains the drafter on exactly what it will see.

The loop is `answers.generate_answers`' continuous batching over runtime calls: free rows take
the next prompts by `prefill_rows` (the other rows' caches untouched), then every step verifies
one token per row at that row's own committed length. Rows are filled lowest first and a step
runs only rows [0, highest busy row], so the last answers of a shard do not pay for empty rows
above them. A trace is the same as `answers.Trace`: context 0 is the prompt's last token, an
answer stops after an EOS (kept) or at `max_new_tokens`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from redrafter.bundle import Bundle
from redrafter.bundle import names as n
from redrafter.config import BaseModelConfig
from redrafter.decoding.runtime import Runtime
from redrafter.errors import RedrafterError
from redrafter.train.answers import Trace
from redrafter.train.teacher import _top


@dataclasses.dataclass(frozen=True)
class BundleTeacher:
    """A bundle's runtime as the teacher. `fingerprint` names the base graph and its weights
    (teacher data is never reused for another bundle); `precision` ('int4', 'int8', 'float32'
    ...) takes the place of the torch base's dtype in the teacher data's metadata."""

    runtime: Runtime
    fingerprint: str
    precision: str


def bundle_fingerprint(bundle: Bundle) -> str:
    """sha256 (16 hex digits) of what the base graph computes with: its graph file's and the
    shared weight file's checksums (from the manifest, verified when the bundle loaded), the
    base config and the quantization record. The weight file holds the drafter's weights too,
    so re-exporting with another drafter gives another fingerprint: teacher data is then made
    again rather than trusted."""
    files = bundle.manifest.files
    graph = {rel: files[rel].sha256 for rel in (n.BASE_ONNX, n.WEIGHTS_DATA) if rel in files}
    q = bundle.manifest.quantization
    record = {
        "graph": graph,
        "config": bundle.base_config.to_dict(),
        "quantization": None if q is None else dataclasses.asdict(q),
    }
    return hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()[:16]


def runtime_answers(
    runtime: Runtime,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    eos_token_ids: Sequence[int],
    top_c: int = 0,
    slots: int = 32,
    progress: Callable[[int], None] = lambda k: None,
) -> list[Trace]:
    """Greedy answers of the runtime's base to `prompts` (token id lists), `slots` rows at a
    time. Returns per prompt, in the order given: contexts (n, E) float32, next tokens (n,)
    int64 and, when `top_c` > 0, the top-C ids (n, C) int64 / log-probs (n, C) float32 (else
    None). `progress(k)` is called as k answers finish."""
    if not prompts:
        return []
    eos = set(int(t) for t in eos_token_ids)
    R = min(slots, len(prompts))
    runtime.reset(batch=R, capacity=max(len(p) for p in prompts) + max_new_tokens)
    past = np.zeros(R, np.int64)  # (R,) committed length per row
    token = np.zeros(R, np.int64)  # (R,) each row's next token (the argmax after its context)
    owner = [-1] * R  # the prompt each row answers, -1 = free
    rows_out: list[list[tuple[torch.Tensor, ...]]] = [[] for _ in range(R)]
    traces: list[Trace | None] = [None] * len(prompts)
    # Shortest prompts first, as answers.generate_answers: rows in flight hold similar lengths.
    queue = iter(sorted(range(len(prompts)), key=lambda i: len(prompts[i])))
    remaining = len(prompts)
    hidden = np.zeros((R, 0), np.float32)  # (R, E) once a step has run
    logits: np.ndarray | None = None  # (R, V) with top_c
    while remaining:
        free = [r for r in range(R) if owner[r] < 0]
        admit = list(zip(free, queue, strict=False))
        if admit:
            rows = np.array([r for r, _ in admit], np.int64)
            ids = [prompts[i] for _, i in admit]
            lengths = np.array([len(p) for p in ids], np.int64)  # (k,)
            padded = np.zeros((len(ids), int(lengths.max())), np.int64)  # (k, T) right-padded
            for j, p in enumerate(ids):
                padded[j, : len(p)] = p
            new_logits, new_hidden = runtime.prefill_rows(rows, padded, lengths)  # (k, V), (k, E)
            if hidden.shape[1] != new_hidden.shape[1]:
                hidden = np.zeros((R, new_hidden.shape[1]), np.float32)
                logits = np.zeros((R, new_logits.shape[1]), np.float32) if top_c else None
            hidden[rows], token[rows], past[rows] = new_hidden, new_logits.argmax(-1), lengths
            if logits is not None:
                logits[rows] = new_logits
            for r, i in admit:
                owner[r] = i
        busy = [r for r in range(R) if owner[r] >= 0]
        step = [torch.from_numpy(hidden.copy()), torch.from_numpy(token.copy())]
        if logits is not None:
            step += list(_top(torch.from_numpy(logits), top_c))  # (R, C) ids, log-probs
        for r in busy:
            rows_out[r].append(tuple(t[r] for t in step))
            if int(token[r]) in eos or len(rows_out[r]) == max_new_tokens:
                parts = list(zip(*rows_out[r], strict=True))
                top_ids = top_logp = None
                if logits is not None:
                    top_ids, top_logp = torch.stack(parts[2]), torch.stack(parts[3])  # (n, C)
                traces[owner[r]] = (torch.stack(parts[0]), torch.stack(parts[1]), top_ids, top_logp)
                owner[r], rows_out[r] = -1, []
                remaining -= 1
                progress(1)
        if not remaining:
            break
        live = [r for r in range(R) if owner[r] >= 0]
        if not live:
            continue  # every row just finished: the next prompts come in first
        B = live[-1] + 1  # run rows [0, B): the rows above the highest busy one are free
        args = (token[:B, None], past[:B, None], np.ones((B, 1, 1), bool), past[:B])
        if logits is None:
            argmax, h = runtime.verify_greedy(*args)  # (B, 1), (B, 1, E)
            next_ids = argmax[:, 0]  # (B,)
        else:
            row_logits, h = runtime.verify(*args)  # (B, 1, V), (B, 1, E)
            logits[:B] = row_logits[:, 0]
            next_ids = row_logits[:, 0].argmax(-1)  # (B,)
        # The token went into slot P, where it belongs (autoregressive.py): no commit needed.
        done = np.array([o >= 0 for o in owner[:B]])  # (B,) rows that ran a real token
        past[:B] += done
        hidden[:B], token[:B] = h[:, 0], next_ids
    assert all(t is not None for t in traces)
    return traces  # type: ignore[return-value]


class TeacherBundleError(RedrafterError):
    """A teacher bundle that cannot teach a drafter for the given base."""


def open_teacher(
    path: str | Path, base_config: BaseModelConfig, *, device: str = "cpu"
) -> BundleTeacher:
    """The bundle at `path` on ONNX Runtime as a teacher for a drafter of a base with
    `base_config` (its tokenizer, embeddings and LM head): the bundle must have been exported
    from that model (same vocab, width and depth), or the drafter would learn another's."""
    from redrafter.bundle import load_bundle
    from redrafter.runtimes.onnxruntime import OnnxRuntime

    bundle = load_bundle(path)
    ours = bundle.base_config
    for field in ("vocab_size", "hidden_size", "num_hidden_layers"):
        if getattr(ours, field) != getattr(base_config, field):
            raise TeacherBundleError(
                f"{path}: the teacher bundle's base has {field} {getattr(ours, field)}, --base "
                f"has {getattr(base_config, field)}; pass a bundle exported from --base"
            )
    runtime = OnnxRuntime(bundle, device=device)
    return BundleTeacher(runtime, bundle_fingerprint(bundle), bundle.precision)
