"""Our Transformer vs transformers' Llama/Mistral/Qwen2/Qwen3/Phi-3/Gemma 2/Gemma 3 on tiny random
configs, loaded through `load_base` from folders written by `save_pretrained` (single file and
sharded). The 40-token sequences run 5x past the sliding windows (8) of the windowed cases.
tests/test_families.py takes Qwen3, Phi-3, Gemma and the windowed families further: greedy
`generate`, LongRoPE past its switch-over, ONNX and Core ML."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from redrafter.config import BaseModelConfig
from redrafter.models.checkpoints import load_base, load_base_config
from redrafter.models.llama import Transformer

SIZES = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=97,
    max_position_embeddings=128,
)
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}
# Phi3Config's token ids default to 32000 (its real vocab): a pad id past the tiny vocab would
# break its embedding, and no test wants an EOS.
PHI3_IDS = dict(bos_token_id=None, eos_token_id=None, pad_token_id=None)


def longrope(original: int, head_dim: int = 16) -> dict:
    """A LongRoPE rope_scaling whose short and long factors differ per frequency and from 1."""
    half = head_dim // 2
    return {
        "rope_type": "longrope",
        "short_factor": [1.0 + 0.1 * j for j in range(half)],
        "long_factor": [1.5 + 0.9 * j for j in range(half)],
        "original_max_position_embeddings": original,
    }


CASES = {
    "llama": (LlamaForCausalLM, LlamaConfig(**SIZES)),
    "llama-bias": (LlamaForCausalLM, LlamaConfig(**SIZES, attention_bias=True, mlp_bias=True)),
    "llama3-rope": (
        LlamaForCausalLM,
        LlamaConfig(**SIZES, rope_theta=500000.0, rope_scaling=LLAMA3_ROPE),
    ),
    "llama-tied": (LlamaForCausalLM, LlamaConfig(**SIZES, tie_word_embeddings=True)),
    "mistral": (MistralForCausalLM, MistralConfig(**SIZES, sliding_window=None)),
    "qwen2": (Qwen2ForCausalLM, Qwen2Config(**SIZES, rope_theta=1000000.0)),
    "qwen2-tied": (Qwen2ForCausalLM, Qwen2Config(**SIZES, tie_word_embeddings=True)),
    # head_dim 24: Hq*D = 96 is not the hidden size, as in Qwen3-0.6B (16 x 128 vs 1024)
    "qwen3": (Qwen3ForCausalLM, Qwen3Config(**SIZES, head_dim=24, rope_theta=1000000.0)),
    "qwen3-tied-bias": (
        Qwen3ForCausalLM,
        Qwen3Config(**SIZES, head_dim=24, tie_word_embeddings=True, attention_bias=True),
    ),
    "phi3": (Phi3ForCausalLM, Phi3Config(**SIZES, **PHI3_IDS)),
    "mistral-window": (MistralForCausalLM, MistralConfig(**SIZES, sliding_window=8)),
    "qwen2-window": (
        Qwen2ForCausalLM,
        Qwen2Config(**SIZES, use_sliding_window=True, sliding_window=8, max_window_layers=1),
    ),
    # Gemma: head_dim 24, scale 32**-0.5, one sliding layer (window 8) and one global.
    "gemma2": (
        Gemma2ForCausalLM,
        Gemma2Config(
            **SIZES,
            head_dim=24,
            query_pre_attn_scalar=32,
            sliding_window=8,
            attn_logit_softcapping=2.0,
            final_logit_softcapping=5.0,
        ),
    ),
    "gemma3": (
        Gemma3ForCausalLM,
        Gemma3TextConfig(
            **SIZES,
            head_dim=24,
            query_pre_attn_scalar=32,
            sliding_window=8,
            layer_types=["sliding_attention", "full_attention"],
            rope_parameters={
                "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
            },
        ),
    ),
    # Switch-over at 64, past this module's 40-token sequences: short factors and the attention
    # factor only (test_families.py crosses the switch-over).
    "phi3-longrope": (
        Phi3ForCausalLM,
        Phi3Config(
            **SIZES, **PHI3_IDS, original_max_position_embeddings=64, rope_scaling=longrope(64)
        ),
    ),
}


def random_hf_model(name: str, seed: int = 0) -> torch.nn.Module:
    cls, config = CASES[name]
    return randomized(cls(config), seed)


def randomized(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """HF's own init (std 0.02) makes every logit ~0; use weights that make a real difference."""
    torch.manual_seed(seed)
    model = model.eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0, 0.15)
    return model


def full_forward(model: Transformer, ids: torch.Tensor) -> torch.Tensor:
    """Uncached causal forward over the whole sequence: ids (B, T) -> logits (B, T, V)."""
    B, T = ids.shape
    positions = torch.arange(T).expand(B, T)  # (B, T)
    causal = torch.ones(T, T, dtype=torch.bool).tril().expand(B, T, T)  # (B, T, T)
    caches = model.layer_caches(model.new_cache(B, T))
    logits, _, _ = model(ids, positions, causal, torch.zeros(B, dtype=torch.long), caches)
    return logits


def save(hf: torch.nn.Module, folder: Path, shard: str | None = None) -> Path:
    if shard is None:
        hf.save_pretrained(folder)
    else:
        hf.save_pretrained(folder, max_shard_size=shard)
    return folder


@pytest.mark.parametrize("name", sorted(CASES))
def test_logits_match_transformers(name: str, tmp_path: Path) -> None:
    hf = random_hf_model(name)
    folder = save(hf, tmp_path / name)
    config = load_base_config(folder)
    assert config.model_type == hf.config.model_type
    assert config.tie_word_embeddings == hf.config.tie_word_embeddings
    ours = load_base(folder)
    assert not ours.training
    ids = torch.randint(0, SIZES["vocab_size"], (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(ids).logits  # (B, T, V)
        got = full_forward(ours, ids)
    assert expected.abs().max() > 1.0, "logits too small for the comparison to mean anything"
    err = (got - expected).abs().max().item()
    assert err < 2e-5, f"{name}: max |ours - transformers| = {err:.3g}"


def test_llama3_rope_changes_the_model(tmp_path: Path) -> None:
    """The Llama-3 case must exercise the scaling (and config.json's nested rope_parameters)."""
    folder = save(random_hf_model("llama3-rope"), tmp_path / "l3")
    config = load_base_config(folder)
    assert config.rope_theta == 500000.0
    assert config.rope_scaling is not None and config.rope_scaling["factor"] == 8.0
    plain = BaseModelConfig.from_dict({**config.to_dict(), "rope_scaling": None})
    assert not torch.equal(Transformer(config).inv_freq, Transformer(plain).inv_freq)


@pytest.mark.parametrize("name", ["llama", "qwen2-tied"])
def test_sharded_checkpoint_loads(name: str, tmp_path: Path) -> None:
    hf = random_hf_model(name)
    folder = save(hf, tmp_path / "sharded", shard="20KB")
    assert (folder / "model.safetensors.index.json").is_file()
    assert len(list(folder.glob("model-*.safetensors"))) > 1
    ours = load_base(folder)
    ids = torch.randint(0, SIZES["vocab_size"], (1, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        err = (full_forward(ours, ids) - hf(ids).logits).abs().max().item()
    assert err < 2e-5


@pytest.mark.parametrize(
    "name", ["llama", "qwen2", "llama3-rope", "qwen3", "phi3-longrope", "gemma2", "gemma3"]
)
@pytest.mark.parametrize("batch", [1, 3])
def test_cached_decoding_equals_full_forward(name: str, batch: int, tmp_path: Path) -> None:
    """Prefill T0 tokens, then feed one token at a time with past_len; same logits as uncached."""
    ours = load_base(save(random_hf_model(name), tmp_path / name))
    T, T0 = 13, 5
    ids = torch.randint(
        0, SIZES["vocab_size"], (batch, T), generator=torch.Generator().manual_seed(3)
    )
    caches = ours.layer_caches(ours.new_cache(batch, capacity=T + 3))
    steps = []
    with torch.no_grad():
        expected = full_forward(ours, ids)  # (B, T, V)
        causal = torch.ones(T0, T0, dtype=torch.bool).tril().expand(batch, T0, T0)
        positions = torch.arange(T0).expand(batch, T0)
        past = torch.zeros(batch, dtype=torch.long)
        logits, _, caches = ours(ids[:, :T0], positions, causal, past, caches)
        steps.append(logits)
        for p in range(T0, T):
            one = torch.ones(batch, 1, 1, dtype=torch.bool)
            pos = torch.full((batch, 1), p)
            logits, _, caches = ours(ids[:, p : p + 1], pos, one, torch.full((batch,), p), caches)
            steps.append(logits)
    got = torch.cat(steps, dim=1)  # (B, T, V)
    err = (got - expected).abs().max().item()
    assert err < 2e-5, f"cached vs uncached: max diff {err:.3g}"
