"""Reference drafter beam search in numpy (docs/design.md §3.1-3.2), the oracle for every runtime's
`draft` (the torch module, the exported ONNX graph, the Core ML program).

Dimensions: B batch, W beam width, L beam length, E hidden size, V vocab.

Weights use Apple's checkpoint names: `rnn_w.weight`, `rnn_u.weight`, `rnn_u.bias`,
`lm_head.{i}.linear.{weight,bias}` (i < num_draft_layers), `lm_head.{n}.weight`, and
`input_proj.{weight,bias}` when exit_dim != 2E. Linear weights are (out, in). A reduced draft
vocabulary adds `draft_token_ids` (Vd,): head row i drafts LLM token `draft_token_ids[i]`.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from redrafter.config import LOG_0, TOP_K, BeamShape
from redrafter.decoding.accept import log_softmax, warp_logits


def _silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def draft_log_probs(
    weights: Mapping[str, np.ndarray], context: np.ndarray, state: np.ndarray, top_k: int = TOP_K
) -> np.ndarray:
    """Warped, normalised draft log-probs over the head's vocab from [context ⊕ state]:
    (..., E) x2 -> (..., Vd) (Vd = V without a reduced draft vocabulary)."""
    x = np.concatenate([context, state], axis=-1)  # (..., 2E)
    if "input_proj.weight" in weights:
        x = x @ weights["input_proj.weight"].T + weights["input_proj.bias"]
    i = 0
    while f"lm_head.{i}.linear.weight" in weights:
        x = x + _silu(
            x @ weights[f"lm_head.{i}.linear.weight"].T + weights[f"lm_head.{i}.linear.bias"]
        )
        i += 1
    logits = x @ weights[f"lm_head.{i}.weight"].T  # (..., V)
    logits = logits - logits.max(axis=-1, keepdims=True)
    return log_softmax(warp_logits(logits, top_k))


def beam_search(
    weights: Mapping[str, np.ndarray],
    embed: np.ndarray,
    context: np.ndarray,
    first_token: np.ndarray,
    beam: BeamShape,
) -> tuple[np.ndarray, np.ndarray]:
    """Draft W beams of L tokens.

    embed: (V, E) the LLM's embedding table; context: (B, E) post-norm hidden state at the last
    accepted token; first_token: (B,) g0. Returns beams (B, W, L) int64 (column 0 = g0) and the
    draft log-probs (B, W, L-1, V).
    """
    B, E = context.shape
    W, V = beam.width, embed.shape[0]
    ids = weights.get("draft_token_ids")  # (Vd,) or None: the head's vocab is the full one
    Vd = V if ids is None else len(ids)
    rows = np.arange(B)[:, None]  # (B, 1)
    scores = np.full((B, W), LOG_0, dtype=np.float64)
    scores[:, 0] = 0.0  # only beam 0 is live at step 1, so its top-W children fill all beams
    ctx = np.broadcast_to(context[:, None, :], (B, W, E))  # (B, W, E)
    beams = np.repeat(first_token.astype(np.int64)[:, None, None], W, axis=1)  # (B, W, 1)
    state = np.zeros((B, W, E), dtype=context.dtype)  # s_0 = 0
    history = np.zeros((B, W, 0, Vd), dtype=context.dtype)
    for _ in range(beam.length - 1):
        # rnn_u's bias applies at step 1 too, where s_0 = 0.
        pre = embed[beams[:, :, -1]] @ weights["rnn_w.weight"].T  # (B, W, E)
        state = _silu(pre + state @ weights["rnn_u.weight"].T + weights["rnn_u.bias"])
        logp = draft_log_probs(weights, ctx, state)  # (B, W, Vd)
        total = (logp + scores[:, :, None]).reshape(B, W * Vd)  # (B, W*Vd)
        # Top-W, best first; a stable sort keeps the lower index first among equal scores.
        flat = np.argsort(-total, axis=-1, kind="stable")[:, :W]  # (B, W)
        scores = np.take_along_axis(total, flat, axis=-1)
        parent, token = flat // Vd, flat % Vd  # (B, W)
        if ids is not None:
            token = np.asarray(ids, dtype=np.int64)[token]  # draft row -> LLM token id
        beams = np.concatenate([beams[rows, parent], token[:, :, None]], axis=-1)
        state = state[rows, parent]
        history = np.concatenate([history[rows, parent], logp[rows, parent][:, :, None]], axis=2)
    if ids is not None:  # full-vocab log-probs: LOG_0 for tokens the head cannot draft
        full = np.full((B, W, beam.length - 1, V), LOG_0, dtype=history.dtype)
        full[..., np.asarray(ids, dtype=np.int64)] = history
        history = full
    return beams, history
