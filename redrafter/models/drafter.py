"""The ReDrafter drafter (docs/design.md §3.1-3.2): a recurrent head over the LLM's embeddings.

Dimensions: B batch, W beam width, L beam length (column 0 is the LLM's token g0), E the LLM's
hidden size, X exit_dim, V vocab.

    s_0 = 0;  s_t = SiLU(rnn_w · E(tok_{t-1}) + rnn_u · s_{t-1})      (rnn_u has the bias)
    logits_t = lm_head([h ⊕ s_t])    h: the LLM's post-norm hidden state at the last accepted token
    lm_head = num_draft_layers × (x + SiLU(Linear(x))) then a bias-free Linear(X → V)

Parameter names are Apple's (`lm_head.0.linear.weight`, `lm_head.{n}.weight`, `rnn_u.*`,
`rnn_w.weight`, `input_proj.*`), so checkpoints load and save in Apple's layout.

Reduced draft vocabulary (our extension, `config.draft_vocab_size = Vd`): the head's last Linear
is (Vd, X) and the int64 tensor `draft_token_ids` (Vd,) maps head row i to LLM token id
`draft_token_ids[i]`. The beam search runs over Vd and returns full-vocab ids and full-vocab
log-probs (LOG_0 outside the draft vocab), so nothing downstream changes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from redrafter.config import LOG_0, TOP_K, BeamShape, DrafterConfig


class ResBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + F.silu(self.linear(x))


def warp_log_probs(logits: torch.Tensor, top_k: int = TOP_K) -> torch.Tensor:
    """Apple's logits warp then log-softmax: subtract the max, set everything below the k-th
    largest value to LOG_0 (ties with the k-th value are kept), normalise. (..., V) -> (..., V)."""
    logits = logits - logits.max(dim=-1, keepdim=True).values
    kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, LOG_0).log_softmax(dim=-1)


class Drafter(nn.Module):
    def __init__(self, config: DrafterConfig) -> None:
        super().__init__()
        self.config = config
        E, X = config.hidden_size, config.exit_dim
        if config.has_input_proj:
            self.input_proj = nn.Linear(2 * E, X, bias=True)
        self.lm_head = nn.Sequential(
            *[ResBlock(X) for _ in range(config.num_draft_layers)],
            nn.Linear(X, config.head_size, bias=False),
        )
        self.rnn_u = nn.Linear(E, E, bias=True)
        self.rnn_w = nn.Linear(E, E, bias=False)
        self.draft_token_ids: torch.Tensor | None
        if config.draft_vocab_size is not None:
            # Saved with the weights (a persistent buffer) so the id map travels with the head.
            self.register_buffer("draft_token_ids", torch.arange(config.draft_vocab_size))
        else:
            self.draft_token_ids = None

    def next_state(self, state: torch.Tensor, token_embedding: torch.Tensor) -> torch.Tensor:
        """s_t = SiLU(rnn_w·e + rnn_u·s_{t-1}); (..., E) -> (..., E). rnn_u's bias applies even
        at step 1, where s_0 = 0."""
        return F.silu(self.rnn_w(token_embedding) + self.rnn_u(state))

    def logits(self, context: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        """Raw head logits from [context ⊕ state]: (..., E) x2 -> (..., Vd) (Vd = V for a
        full-vocab drafter)."""
        x = torch.cat([context, state], dim=-1)  # (..., 2E) context first, state second
        if self.config.has_input_proj:
            x = self.input_proj(x)  # (..., X)
        return self.lm_head(x)

    def log_probs(self, context: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        """Warped draft log-probs over the head's vocab: (..., E) x2 -> (..., Vd)."""
        return warp_log_probs(self.logits(context, state))

    def beam_search(
        self,
        context: torch.Tensor,
        first_token: torch.Tensor,
        embed_weight: torch.Tensor,
        beam: BeamShape,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One step's beam search, unrolled L-1 times at static W (exportable as one graph).

        context: (B, E) post-norm hidden state at the last accepted token;
        first_token: (B,) int64, the LLM's token g0; embed_weight: (V, E) the LLM's embeddings.
        Returns beams (B, W, L) int64 and the normalised draft log-probs (B, W, L-1, V).
        """
        if beam.width == 1:
            return self._greedy_chain(context, first_token, embed_weight, beam.length)
        B, E = context.shape
        W, V, Vd = beam.width, embed_weight.shape[0], self.config.head_size
        rows = torch.arange(B, device=context.device)[:, None]  # (B, 1)
        # Only beam 0 is live at step 1, so its top-W children fill all W beams.
        scores = torch.full((B, W), LOG_0, dtype=context.dtype, device=context.device)
        scores[:, 0] = 0.0  # (B, W)
        ctx = context[:, None, :].expand(B, W, E)  # (B, W, E)
        beams = first_token[:, None, None].expand(B, W, 1)  # (B, W, 1)
        state = torch.zeros(B, W, E, dtype=context.dtype, device=context.device)  # (B, W, E)
        history = context.new_zeros(B, W, 0, Vd)  # (B, W, t, Vd)
        for _ in range(beam.length - 1):
            state = self.next_state(state, F.embedding(beams[:, :, -1], embed_weight))
            logp = self.log_probs(ctx, state)  # (B, W, Vd)
            total = (logp + scores[:, :, None]).reshape(B, W * Vd)  # (B, W*Vd)
            scores, flat = torch.topk(total, W, dim=-1)  # (B, W)
            parent, token = flat // Vd, flat % Vd  # (B, W)
            if self.draft_token_ids is not None:
                token = self.draft_token_ids[token]  # (B, W) draft row -> LLM token id
            beams = torch.cat([beams[rows, parent], token[:, :, None]], dim=-1)  # (B, W, t+1)
            state = state[rows, parent]  # (B, W, E)
            history = torch.cat([history[rows, parent], logp[rows, parent][:, :, None]], dim=2)
        return beams, self._full_vocab(history, V)

    def _greedy_chain(
        self, context: torch.Tensor, first_token: torch.Tensor, embed_weight: torch.Tensor, L: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The beam search at W = 1: each step keeps the single best token, which is the argmax
        (first max, as the reference's stable sort) of its own log-probs. The same beams and
        log-probs as the general search without its parent gathers and top-k over W*Vd: half
        the exported nodes, ~0.4 ms less per draft in the decode loop on a CPU. Tensors keep
        the general search's (B, W=1, ...) shapes so that the exporter lays the weights out
        the same way and a bundle stores them once for every beam shape."""
        ctx = context[:, None, :]  # (B, 1, E)
        token = first_token[:, None]  # (B, 1)
        state = torch.zeros_like(ctx)  # (B, 1, E) s_0 = 0
        tokens, history = [token], []
        for _ in range(L - 1):
            state = self.next_state(state, F.embedding(token, embed_weight))  # (B, 1, E)
            logp = self.log_probs(ctx, state)  # (B, 1, Vd)
            token = logp.argmax(dim=-1)  # (B, 1)
            if self.draft_token_ids is not None:
                token = self.draft_token_ids[token]  # draft row -> LLM token id
            tokens.append(token)
            history.append(logp)
        beams = torch.stack(tokens, dim=-1)  # (B, 1, L)
        log_probs = torch.stack(history, dim=2)  # (B, 1, L-1, Vd)
        return beams, self._full_vocab(log_probs, embed_weight.shape[0])

    def _full_vocab(self, history: torch.Tensor, V: int) -> torch.Tensor:
        """(B, W, L-1, Vd) head log-probs -> (B, W, L-1, V): tokens the head cannot draft get
        LOG_0 (probability 0). Identity for a full-vocab head."""
        if self.draft_token_ids is None:
            return history
        B, W, L1, Vd = history.shape
        index = self.draft_token_ids.expand(B, W, L1, Vd)  # (B, W, L-1, Vd)
        full = history.new_full((B, W, L1, V), LOG_0)  # (B, W, L-1, V)
        return full.scatter(3, index, history)
