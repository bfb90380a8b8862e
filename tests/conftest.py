"""Shared fixtures: tiny random models built in-process (no files, no network)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from redrafter.config import BaseModelConfig, DrafterConfig
from redrafter.models.drafter import Drafter
from redrafter.models.llama import Transformer


def tiny_base_config(**overrides) -> BaseModelConfig:
    fields = dict(
        model_type="llama",
        vocab_size=61,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
    )
    fields.update(overrides)
    return BaseModelConfig(**fields)


def tiny_base(seed: int = 0, **overrides) -> Transformer:
    """A random base model whose logits are peaked enough that greedy decoding has structure."""
    torch.manual_seed(seed)
    model = Transformer(tiny_base_config(**overrides)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.3)
    return model


def tiny_drafter(
    base: Transformer, seed: int = 1, exit_dim: int | None = None, layers: int = 1
) -> Drafter:
    torch.manual_seed(seed)
    c = base.config
    cfg = DrafterConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        exit_dim=exit_dim or 2 * c.hidden_size,
        num_draft_layers=layers,
    )
    drafter = Drafter(cfg).eval()
    with torch.no_grad():
        for p in drafter.parameters():
            p.normal_(0, 0.3)
    return drafter


@pytest.fixture
def base() -> Transformer:
    return tiny_base()


@pytest.fixture
def drafter(base: Transformer) -> Drafter:
    return tiny_drafter(base)


WORDS = [f"w{i}" for i in range(59)]  # ids 2..60 in the tiny tokenizer below


def write_hf_checkpoint(model: Transformer, folder, *, tokenizer: bool = True):
    """Save `model` as a Hugging Face folder: config.json, model.safetensors and (optionally)
    a word-level tokenizer.json whose vocab fits the tiny vocab."""
    import json
    from pathlib import Path

    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models, pre_tokenizers

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = {k: v for k, v in model.config.to_dict().items() if v is not None}
    (folder / "config.json").write_text(json.dumps(config))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"))
    if tokenizer:
        vocab = {"[UNK]": 0, "[PAD]": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
        tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        tok.save(str(folder / "tokenizer.json"))
    return folder


class OracleDrafts:
    """Wraps a runtime so its drafts come from the known greedy continuation: beam w follows it
    for a random number of tokens, then goes wrong. Exercises long accepts, non-zero beams and
    real cache moves, which random drafters rarely reach."""

    def __init__(self, inner, prompts, truth, seed: int = 0) -> None:
        self.inner, self.truth = inner, truth
        self.lengths = np.array([len(p) for p in prompts])
        self.rng = np.random.default_rng(seed)
        self.name, self.vocab_size = "oracle", inner.vocab_size
        self.context_length = inner.context_length
        self.max_beam_length = inner.max_beam_length

    def reset(self, *, batch, capacity):
        self.inner.reset(batch=batch, capacity=capacity)

    def prefill(self, tokens, lengths):
        self.past = lengths.copy()
        return self.inner.prefill(tokens, lengths)

    def draft(self, context, first_token, beam):
        _, log_probs = self.inner.draft(context, first_token, beam)
        B, W, L = len(first_token), beam.width, beam.length
        beams = self.rng.integers(0, self.vocab_size, size=(B, W, L))
        beams[:, :, 0] = first_token[:, None]
        for b in range(B):
            done = int(self.past[b] - self.lengths[b])  # tokens committed since the prompt
            future = list(self.truth[b][done + 1 :]) + [0] * L
            for w in range(W):
                good = int(self.rng.integers(0, L))  # drafts that follow the truth
                beams[b, w, 1 : 1 + good] = future[:good]
                if good < L - 1 and beams[b, w, 1 + good] == future[good]:
                    beams[b, w, 1 + good] = (future[good] + 1) % self.vocab_size
        return beams, log_probs

    def verify(self, *args):
        return self.inner.verify(*args)

    def commit(self, past_len, source, count):
        self.inner.commit(past_len, source, count)
        self.past = past_len + count
