"""Checkpoint formats: GGUF and llama2.c round trips, drafters in Apple's layout, and the errors a
user sees for bad files (class and message)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from redrafter.config import BaseModelConfig, DrafterConfig
from redrafter.errors import (
    CheckpointError,
    ConfigError,
    DrafterMismatchError,
    UnsupportedModelError,
)
from redrafter.models.checkpoints import (
    check_drafter_fits,
    init_drafter,
    load_base,
    load_base_config,
    load_drafter,
    save_drafter,
)
from redrafter.models.llama import Transformer
from redrafter.models.llama2c import save_llama2c

HIDDEN, HEADS, KV_HEADS, LAYERS, FFN, VOCAB, SEQ = 32, 4, 2, 2, 48, 61, 64


def tiny_config(**overrides) -> BaseModelConfig:
    fields = dict(
        model_type="llama",
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=FFN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=SEQ,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
    )
    return BaseModelConfig(**{**fields, **overrides})


def tiny_model(seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(tiny_config(**overrides)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(
                1 + 0.2 * torch.randn_like(p)
                if name.endswith("norm.weight")
                else 0.2 * torch.randn_like(p)
            )
    return model


def logits_of(model: Transformer, T: int = 12) -> torch.Tensor:
    ids = torch.randint(0, VOCAB, (2, T), generator=torch.Generator().manual_seed(5))  # (B, T)
    causal = torch.ones(T, T, dtype=torch.bool).tril().expand(2, T, T)
    with torch.no_grad():
        caches = model.layer_caches(model.new_cache(2, T))
        logits, _, _ = model(
            ids, torch.arange(T).expand(2, T), causal, torch.zeros(2, dtype=torch.long), caches
        )
    return logits  # (B, T, V)


def assert_same_logits(a: Transformer, b: Transformer) -> None:
    expected, got = logits_of(a), logits_of(b)
    assert expected.abs().max() > 1.0
    err = (got - expected).abs().max().item()
    assert err < 1e-5, f"max logit diff {err:.3g}"


# --------------------------------------------------------------------------- GGUF


def to_llama_cpp_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permute: HF rotate_half rows -> interleaved pairs."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def write_gguf(
    model: Transformer,
    path: Path,
    *,
    arch: str = "llama",
    q8_embed: bool = False,
    rope_freqs: np.ndarray | None = None,
    linear: float | None = None,
    q4: str | None = None,
) -> None:
    """`model` as llama.cpp's converter writes it; `q4` ("Q4_0" or "Q4_1"): every block matrix
    (and an untied head) in that 4-bit type, as a quantized GGUF has them."""
    c = model.config
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    w = gguf.GGUFWriter(str(path), arch)
    if linear is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(linear)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.kv_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_theta)
    w.add_vocab_size(c.vocab_size)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    if q8_embed:
        q = gguf.quants.quantize(sd["model.embed_tokens.weight"], gguf.GGMLQuantizationType.Q8_0)
        w.add_tensor("token_embd.weight", q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    else:
        w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs)

    def add_matrix(name: str, x: np.ndarray) -> None:
        if q4 is None or x.ndim != 2 or x.shape[1] % 32:
            w.add_tensor(name, np.ascontiguousarray(x))
            return
        kind = gguf.GGMLQuantizationType[q4]
        w.add_tensor(name, gguf.quants.quantize(np.ascontiguousarray(x), kind), raw_dtype=kind)

    if not c.tie_word_embeddings:
        add_matrix("output.weight", sd["lm_head.weight"])
    names = {
        "attn_norm": "input_layernorm",
        "ffn_norm": "post_attention_layernorm",
        "attn_q": "self_attn.q_proj",
        "attn_k": "self_attn.k_proj",
        "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj",
        "ffn_gate": "mlp.gate_proj",
        "ffn_up": "mlp.up_proj",
        "ffn_down": "mlp.down_proj",
        "attn_q_norm": "self_attn.q_norm",
        "attn_k_norm": "self_attn.k_norm",
    }
    if c.head_dim is not None:
        w.add_key_length(c.head_dim)
        w.add_value_length(c.head_dim)
    for i in range(c.num_hidden_layers):
        for g, h in names.items():
            for kind in ("weight", "bias"):
                x = sd.get(f"model.layers.{i}.{h}.{kind}")
                if x is None:
                    continue
                if arch == "llama" and g in ("attn_q", "attn_k"):
                    x = to_llama_cpp_rows(x, c.num_attention_heads if g == "attn_q" else c.kv_heads)
                add_matrix(f"blk.{i}.{g}.{kind}", x)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("tied", [False, True])
def test_gguf_llama_round_trip(tied: bool, tmp_path: Path) -> None:
    source = tiny_model(tie_word_embeddings=tied)
    path = tmp_path / "tiny.gguf"
    write_gguf(source, path)
    config = load_base_config(path)
    assert config.tie_word_embeddings == tied
    assert (config.num_key_value_heads, config.bos_token_id, config.eos_token_id) == (
        KV_HEADS,
        1,
        2,
    )
    assert_same_logits(source, load_base(path))


def test_gguf_qwen2_round_trip(tmp_path: Path) -> None:
    """Qwen2 GGUFs keep HF's q/k row order and carry q/k/v biases."""
    source = tiny_model(model_type="qwen2", rope_theta=1e6)
    path = tmp_path / "qwen.gguf"
    write_gguf(source, path, arch="qwen2")
    assert load_base_config(path).model_type == "qwen2"
    assert_same_logits(source, load_base(path))


def test_gguf_qwen3_round_trip(tmp_path: Path) -> None:
    """Qwen3 GGUFs: HF's q/k row order, per-head q/k RMSNorm weights, no biases, and a head
    size of their own (key_length) that is not hidden / heads."""
    source = tiny_model(model_type="qwen3", head_dim=12, rope_theta=1e6)
    assert (
        source.config.dim_per_head * source.config.num_attention_heads != source.config.hidden_size
    )
    path = tmp_path / "qwen3.gguf"
    write_gguf(source, path, arch="qwen3")
    config = load_base_config(path)
    assert (config.model_type, config.dim_per_head) == ("qwen3", 12)
    loaded = load_base(path)
    assert "model.layers.0.self_attn.q_norm.weight" in loaded.state_dict()
    assert_same_logits(source, loaded)


LLAMA31_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}


def llama_cpp_rope_freqs(config: BaseModelConfig) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf.py writes as `rope_freqs` for Llama-3 scaling: per
    rotary frequency, the divisor 1 / (the multiplier HF's llama3 rule applies), float32."""
    rs, D = config.rope_scaling, config.dim_per_head
    factor, low, high = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
    old = rs["original_max_position_embeddings"]
    freqs = 1.0 / (config.rope_theta ** (np.arange(0, D, 2, dtype=np.float32) / D))
    divisors = []
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < old / high:
            divisors.append(1.0)
        elif wavelen > old / low:
            divisors.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            divisors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(divisors, np.float32)


def test_gguf_llama31_rope_freqs(tmp_path: Path) -> None:
    """A Llama 3.1-style GGUF carries its rope scaling as the `rope_freqs` tensor: loaded, it
    gives the HF model's logits (which the scaling changes: checked over 60 positions)."""
    source = tiny_model(rope_scaling=LLAMA31_ROPE)
    path = tmp_path / "llama31.gguf"
    write_gguf(source, path, rope_freqs=llama_cpp_rope_freqs(source.config))
    loaded = load_base(path)
    assert loaded.config.rope_type == "freq_factors"
    assert_same_logits(source, loaded)
    unscaled = tiny_model(rope_scaling=None)
    # The file's divisors are float32 (as llama.cpp writes them): last-bit frequency differences.
    assert (logits_of(loaded, T=60) - logits_of(source, T=60)).abs().max() < 5e-5
    assert (logits_of(unscaled, T=60) - logits_of(source, T=60)).abs().max() > 1e-3


def test_gguf_rope_freqs_of_the_wrong_length_is_refused(tmp_path: Path) -> None:
    source = tiny_model()
    path = tmp_path / "bad.gguf"
    write_gguf(source, path, rope_freqs=np.ones(3, np.float32))
    with pytest.raises(ConfigError, match=r"rope_freqs \(3 values\) must hold head_dim/2 = 4"):
        load_base(path)


def test_gguf_quantized_tensor_is_dequantized(tmp_path: Path) -> None:
    source = tiny_model(tie_word_embeddings=True)
    path = tmp_path / "q8.gguf"
    write_gguf(source, path, q8_embed=True)
    embed = source.model.embed_tokens.weight.detach().numpy()
    q8 = gguf.GGMLQuantizationType.Q8_0
    with torch.no_grad():  # the source model as llama.cpp would see it
        source.model.embed_tokens.weight.copy_(
            torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(embed, q8), q8))
        )
    assert_same_logits(source, load_base(path))


def test_gguf_linear_rope_scaling(tmp_path: Path) -> None:
    """`rope.scaling.type` linear with its factor: positions divided by the factor, as the HF
    config's linear rope_scaling (which changes the logits: checked over 60 positions)."""
    source = tiny_model(rope_scaling={"rope_type": "linear", "factor": 4.0})
    path = tmp_path / "linear.gguf"
    write_gguf(source, path, linear=4.0)
    loaded = load_base(path)
    assert (loaded.config.rope_type, loaded.config.rope_scaling["factor"]) == ("linear", 4.0)
    assert_same_logits(source, loaded)
    assert (logits_of(loaded, T=60) - logits_of(source, T=60)).abs().max() < 1e-5
    assert (logits_of(tiny_model(), T=60) - logits_of(source, T=60)).abs().max() > 1e-3


# Gemma: what llama.cpp's convert_hf_to_gguf.py writes. HF name (inside model.layers.{i}.) ->
# GGUF block tensor; every `*norm.weight` is stored as 1 + w.
GEMMA_GGUF_NAMES = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm",
    "post_feedforward_layernorm": "post_ffw_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
GEMMA_WINDOW = 8  # the logits below run over 24 positions, 3x the window


def hf_gemma(arch: str) -> torch.nn.Module:
    """A tiny random transformers Gemma 2 (2 layers: local, global) or Gemma 3 (6 layers: five
    local, then a global one with base 1e6 and linear scaling 8), laid out as llama.cpp assumes:
    query_pre_attn_scalar = head_dim (24, not hidden/heads = 16), Gemma 3's local base 1e4."""
    from transformers import Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig

    from test_llama_vs_transformers import PHI3_IDS, SIZES, randomized

    sizes = dict(**SIZES, **PHI3_IDS, head_dim=24, query_pre_attn_scalar=24)
    sizes["sliding_window"] = GEMMA_WINDOW
    if arch == "gemma2":
        config = Gemma2Config(**sizes, attn_logit_softcapping=2.0, final_logit_softcapping=5.0)
        return randomized(Gemma2ForCausalLM(config), seed=3)
    rope = {
        "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
    }
    sizes["num_hidden_layers"] = 6
    layer_types = ["sliding_attention"] * 5 + ["full_attention"]
    config = Gemma3TextConfig(**sizes, layer_types=layer_types, rope_parameters=rope)
    return randomized(Gemma3ForCausalLM(config), seed=3)


def write_gemma_gguf(
    hf: torch.nn.Module,
    path: Path,
    arch: str,
    *,
    meta: dict | None = None,
    drop: tuple[str, ...] = (),
    tokenizer: bool = False,
) -> None:
    """`hf` as llama.cpp's converter writes arch `gemma2` / `gemma3`; `meta` adds or replaces
    metadata keys (after `{arch}.`), `drop` leaves keys out."""
    c = hf.config
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in hf.state_dict().items()}
    keys = {
        "block_count": c.num_hidden_layers,
        "context_length": c.max_position_embeddings,
        "embedding_length": c.hidden_size,
        "feed_forward_length": c.intermediate_size,
        "attention.head_count": c.num_attention_heads,
        "attention.head_count_kv": c.num_key_value_heads,
        "attention.key_length": c.head_dim,
        "attention.value_length": c.head_dim,
        "attention.layer_norm_rms_epsilon": float(c.rms_norm_eps),
        "attention.sliding_window": c.sliding_window,
    }
    if arch == "gemma2":
        keys["attn_logit_softcapping"] = float(c.attn_logit_softcapping)
        keys["final_logit_softcapping"] = float(c.final_logit_softcapping)
    else:
        keys["rope.freq_base"] = 1_000_000.0  # the global layers'
        keys["rope.scaling.type"] = "linear"
        keys["rope.scaling.factor"] = 8.0
    keys.update(meta or {})
    w = gguf.GGUFWriter(str(path), arch)
    for key, value in keys.items():
        if key in drop:
            continue
        if isinstance(value, str):
            w.add_string(f"{arch}.{key}", value)
        elif isinstance(value, float):
            w.add_float32(f"{arch}.{key}", value)
        else:
            w.add_uint32(f"{arch}.{key}", value)
    if tokenizer:  # Gemma's SentencePiece vocabulary, as the converter embeds it
        w.add_tokenizer_model("llama")
        w.add_token_list([f"<t{i}>" for i in range(c.vocab_size)])
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])  # the head is tied
    w.add_tensor("output_norm.weight", sd["model.norm.weight"] + 1)
    for i in range(c.num_hidden_layers):
        for hf_name, g in GEMMA_GGUF_NAMES.items():
            x = sd.get(f"model.layers.{i}.{hf_name}.weight")
            if x is not None:
                x = x + 1 if hf_name.endswith("norm") else x
                w.add_tensor(f"blk.{i}.{g}.weight", np.ascontiguousarray(x))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("arch", ["gemma2", "gemma3"])
def test_gguf_gemma_round_trip(arch: str, tmp_path: Path) -> None:
    """A Gemma GGUF (norms stored as 1 + w, four norms per layer, tied head, the window and
    soft-caps or Gemma 3's two rotary bases and q/k norms in the metadata) gives the HF model's
    logits over 24 positions, three times the window."""
    from test_llama_vs_transformers import full_forward

    hf = hf_gemma(arch)
    path = tmp_path / f"{arch}.gguf"
    write_gemma_gguf(hf, path, arch)
    loaded = load_base(path)
    c = loaded.config
    assert c.model_type == {"gemma2": "gemma2", "gemma3": "gemma3_text"}[arch]
    assert (c.dim_per_head, c.attention_scale) == (24, 24**-0.5)
    windows = [c.layer_window(i) for i in range(c.num_hidden_layers)]
    if arch == "gemma2":
        assert windows == [GEMMA_WINDOW, 0]
        assert (c.attn_logit_softcapping, c.final_logit_softcapping) == (2.0, 5.0)
    else:
        assert windows == [GEMMA_WINDOW] * 5 + [0]
        assert loaded.local_rope == [True] * 5 + [False]
        assert (c.rope_theta, c.rope_local_base_freq, c.rope_type) == (1e6, 1e4, "linear")
        assert "model.layers.0.self_attn.q_norm.weight" in loaded.state_dict()
    hf.save_pretrained(tmp_path / "hf")
    ids = torch.randint(0, c.vocab_size, (2, 24), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = hf(ids).logits  # (2, 24, V)
        got = full_forward(loaded, ids)
        from_folder = full_forward(load_base(tmp_path / "hf"), ids)
    assert expected.abs().max() > 1.0
    err = (got - expected).abs().max().item()
    assert err < 5e-5, f"max logit diff {err:.3g}"  # fp32 rounding on logits up to ~10
    assert torch.equal(got, from_folder)  # the very model the HF folder gives
    hf_norm = hf.state_dict()["model.layers.0.post_feedforward_layernorm.weight"]
    ours = loaded.state_dict()["model.layers.0.post_feedforward_layernorm.weight"]
    assert torch.allclose(ours, hf_norm, atol=1e-6)  # stored as 1 + w, loaded as w


@pytest.mark.parametrize(
    ("arch", "layers", "scalar"),
    [("gemma2", 46, 16), ("gemma2", 42, 24), ("gemma3", 62, 16), ("gemma3", 34, 24)],
)
def test_gguf_gemma_attention_scale_follows_llama_cpp(arch, layers, scalar, tmp_path) -> None:
    """No query_pre_attn_scalar in a GGUF: llama.cpp's rule, hidden/heads (64/4) for the 27B
    models' layer counts, head_dim (24) otherwise."""
    path = tmp_path / "m.gguf"
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(layers)
    w.add_context_length(128)
    w.add_embedding_length(64)
    w.add_feed_forward_length(96)
    w.add_head_count(4)
    w.add_key_length(24)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_vocab_size(97)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    config = load_base_config(path)
    assert config.query_pre_attn_scalar == scalar
    windows = [config.layer_window(i) for i in range(4)]
    if arch == "gemma2":  # llama.cpp's pattern and defaults for what the file leaves out
        assert windows == [4096, 0, 4096, 0]
        assert (config.attn_logit_softcapping, config.final_logit_softcapping) == (50.0, 30.0)
    else:  # Gemma 3 without a window: every layer global, one rotary base
        assert windows == [0] * 4 and not any(config.layer_local_rope(i) for i in range(4))


def tiny_gemma3() -> torch.nn.Module:
    """A 1-layer Gemma 3 for the metadata errors (the weights are never compared)."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from test_llama_vs_transformers import SIZES

    sizes = {**SIZES, "num_hidden_layers": 1, "head_dim": 24, "sliding_window": GEMMA_WINDOW}
    return Gemma3ForCausalLM(Gemma3TextConfig(**sizes)).eval()


@pytest.mark.parametrize(
    ("meta", "drop", "error", "message"),
    [
        ({}, ("rope.scaling.factor",), CheckpointError, "gemma3.rope.scaling.factor is missing"),
        ({"rope.scaling.type": "yarn"}, (), UnsupportedModelError, "rope scaling 'yarn'"),
        ({"rope.scaling.factor": -2.0}, (), ConfigError, "factor=-2.0 must be a number > 0"),
        ({"attention.value_length": 16}, (), UnsupportedModelError, "value_length=16 differs"),
        ({"attention.sliding_window": "wide"}, (), CheckpointError, "malformed value"),
        ({"final_logit_softcapping": -1.0}, (), ConfigError, "final_logit_softcapping=-1.0"),
        ({}, ("attention.layer_norm_rms_epsilon",), CheckpointError, "rms_epsilon is missing"),
    ],
)
def test_gguf_gemma_metadata_errors_are_one_line(meta, drop, error, message, tmp_path) -> None:
    path = tmp_path / "bad.gguf"
    write_gemma_gguf(tiny_gemma3(), path, "gemma3", meta=meta, drop=drop)
    with pytest.raises(error) as info:
        load_base(path)
    text = str(info.value)
    assert message in text and "\n" not in text and str(path) in text, text


def test_gguf_gemma_tokenizer_needs_tokenizer_json(tmp_path: Path) -> None:
    """Gemma's SentencePiece vocabulary is not rebuilt from GGUF metadata: without the model's
    tokenizer.json beside the .gguf, one line says to put it there; with it, it is used."""
    from redrafter.errors import RedrafterError
    from redrafter.models.tokenizer import load_tokenizer

    from conftest import write_hf_checkpoint

    path = tmp_path / "gemma.gguf"
    write_gemma_gguf(tiny_gemma3(), path, "gemma3", tokenizer=True)
    with pytest.raises(RedrafterError) as info:
        load_tokenizer(path)
    text = str(info.value)
    assert "'llama'" in text and "tokenizer.json next to the .gguf" in text and "\n" not in text
    write_hf_checkpoint(tiny_model(), tmp_path / "hf")  # its word-level tokenizer.json
    (tmp_path / "tokenizer.json").write_bytes((tmp_path / "hf" / "tokenizer.json").read_bytes())
    assert load_tokenizer(path).encode("w0 w1") == [2, 3]


def test_gguf_unsupported_architecture(tmp_path: Path) -> None:
    path = tmp_path / "gpt2.gguf"
    w = gguf.GGUFWriter(str(path), "gpt2")
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UnsupportedModelError, match="'gpt2'"):
        load_base(path)


def test_gguf_corrupt_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.gguf"
    path.write_bytes(b"GGUF" + b"\xff" * 40)
    with pytest.raises(CheckpointError, match="broken.gguf"):
        load_base(path)


# --------------------------------------------------------------------------- llama2.c


@pytest.mark.parametrize("version", [0, 1])
@pytest.mark.parametrize("tied", [False, True])
def test_llama2c_round_trip(version: int, tied: bool, tmp_path: Path) -> None:
    source = tiny_model(tie_word_embeddings=tied)
    path = tmp_path / f"model_v{version}.bin"
    save_llama2c(source, path, version=version)
    config = load_base_config(path)
    assert config.tie_word_embeddings == tied
    assert (config.hidden_size, config.kv_heads, config.max_position_embeddings) == (
        HIDDEN,
        KV_HEADS,
        SEQ,
    )
    assert_same_logits(source, load_base(path))


def test_llama2c_file_uses_interleaved_rotary(tmp_path: Path) -> None:
    """Read wq/wk straight from a v1 file and rotate pairs (i, i+1) as llama2.c's run.c does: the
    attention scores must equal our model's (rotate_half) ones."""
    source = tiny_model()
    path = tmp_path / "v1.bin"
    save_llama2c(source, path, version=1)
    E, D, kv = HIDDEN, HIDDEN // HEADS, KV_HEADS * HIDDEN // HEADS
    flat = np.fromfile(path, dtype="<f4", offset=256)
    start = 2 * LAYERS * E + E + VOCAB * E  # after rms_att, rms_ffn, rms_final, tok_embeddings
    wq = flat[start : start + E * E].reshape(E, E)  # layer 0
    start += LAYERS * E * E
    wk = flat[start : start + kv * E].reshape(kv, E)
    x = torch.randn(E, generator=torch.Generator().manual_seed(0)).numpy()
    pos_q, pos_k = 7, 3

    def run_c_rope(v: np.ndarray, pos: int) -> np.ndarray:
        v = v.copy()
        for i in range(0, v.size, 2):
            theta = pos / 10000.0 ** ((i % D) / D)
            a, b = v[i], v[i + 1]
            c, s = np.cos(theta), np.sin(theta)
            v[i], v[i + 1] = a * c - b * s, a * s + b * c
        return v

    q_c = run_c_rope(wq @ x, pos_q).reshape(HEADS, D)
    k_c = run_c_rope(wk @ x, pos_k).reshape(KV_HEADS, D)
    attn = source.model.layers[0].self_attn
    with torch.no_grad():
        q = attn.q_proj(torch.from_numpy(x)).view(HEADS, D)
        k = attn.k_proj(torch.from_numpy(x)).view(KV_HEADS, D)

    def rope_half(v: torch.Tensor, pos: int) -> torch.Tensor:
        ang = pos * source.inv_freq
        cos, sin = torch.cat([ang, ang]).cos(), torch.cat([ang, ang]).sin()
        a, b = v.chunk(2, dim=-1)
        return v * cos + torch.cat([-b, a], dim=-1) * sin

    q, k = rope_half(q, pos_q), rope_half(k, pos_k)
    for h in range(HEADS):  # query head h reads KV head h // (HEADS // KV_HEADS)
        g = h // (HEADS // KV_HEADS)
        np.testing.assert_allclose(q_c[h] @ k_c[g], float(q[h] @ k[g]), rtol=1e-4, atol=1e-5)


def test_llama2c_truncated_file(tmp_path: Path) -> None:
    path = tmp_path / "cut.bin"
    save_llama2c(tiny_model(), path, version=1)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=r"cut\.bin.*bytes"):
        load_base(path)


def test_llama2c_rejects_unrepresentable_model(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="llama2.c"):
        save_llama2c(tiny_model(rope_theta=500000.0), tmp_path / "x.bin")


def test_pickle_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "pytorch_model.bin"
    path.write_bytes(b"PK\x03\x04" + b"\0" * 64)  # what torch.save writes: a zip archive
    with pytest.raises(CheckpointError, match="never unpickle"):
        load_base(path)


# --------------------------------------------------------------------------- drafter

# Apple's ml-recurrent-drafter names, for hidden 32, exit_dim 48 (so input_proj exists), 2 layers.
APPLE_DRAFTER_TENSORS = {
    "input_proj.weight": (48, 64),
    "input_proj.bias": (48,),
    "lm_head.0.linear.weight": (48, 48),
    "lm_head.0.linear.bias": (48,),
    "lm_head.1.linear.weight": (48, 48),
    "lm_head.1.linear.bias": (48,),
    "lm_head.2.weight": (VOCAB, 48),
    "rnn_u.weight": (32, 32),
    "rnn_u.bias": (32,),
    "rnn_w.weight": (32, 32),
}


def test_drafter_round_trip_in_apples_layout(tmp_path: Path) -> None:
    drafter = init_drafter(tiny_config(), seed=3, exit_dim=48, num_layers=2)
    out = save_drafter(drafter, tmp_path / "drafter")
    raw = json.loads((out / "config.json").read_text())
    assert raw["model_type"] == "recurrent_drafting_drafter"
    assert (raw["hidden_size"], raw["vocab_size"], raw["exit_dim"], raw["num_draft_layers"]) == (
        32,
        VOCAB,
        48,
        2,
    )
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    assert shapes == APPLE_DRAFTER_TENSORS
    loaded = load_drafter(out)
    for k, v in drafter.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    ctx, state = torch.randn(3, 32), torch.randn(3, 32)
    with torch.no_grad():
        assert torch.equal(loaded.log_probs(ctx, state), drafter.log_probs(ctx, state))
    assert [p.name for p in tmp_path.iterdir()] == ["drafter"]  # no temp folders left behind


def test_drafter_without_input_proj(tmp_path: Path) -> None:
    drafter = init_drafter(tiny_config())
    assert drafter.config.exit_dim == 2 * HIDDEN and not hasattr(drafter, "input_proj")
    loaded = load_drafter(save_drafter(drafter, tmp_path / "d"))
    assert sorted(loaded.state_dict()) == [
        "lm_head.0.linear.bias",
        "lm_head.0.linear.weight",
        "lm_head.1.weight",
        "rnn_u.bias",
        "rnn_u.weight",
        "rnn_w.weight",
    ]


def test_save_drafter_replaces_a_drafter_but_not_other_folders(tmp_path: Path) -> None:
    out = tmp_path / "d"
    save_drafter(init_drafter(tiny_config(), seed=1), out)
    second = init_drafter(tiny_config(), seed=2)
    save_drafter(second, out)  # overwriting a drafter is fine
    assert torch.equal(load_drafter(out).rnn_w.weight, second.rnn_w.weight)
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("precious")
    with pytest.raises(CheckpointError, match="notes.*refusing"):
        save_drafter(second, other)
    assert (other / "keep.txt").read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "notes"]


def test_init_drafter_is_seeded_and_not_degenerate() -> None:
    rng_before = torch.get_rng_state()
    a = init_drafter(tiny_config(), seed=7)
    assert torch.equal(torch.get_rng_state(), rng_before), "init_drafter touched the global RNG"
    b = init_drafter(tiny_config(), seed=7)
    assert all(
        torch.equal(x, y)
        for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )
    ctx = torch.randn(16, HIDDEN, generator=torch.Generator().manual_seed(0))  # unit-RMS contexts
    with torch.no_grad():
        logits = a.lm_head(torch.cat([ctx, torch.zeros_like(ctx)], dim=-1))  # (16, V)
    assert logits.std(dim=-1).min() > 0.1
    assert len(set(logits.argmax(-1).tolist())) > 4, "every context drafts the same token"


def test_drafter_mismatch_names_both_sizes() -> None:
    base = tiny_config()
    check_drafter_fits(base, init_drafter(base).config)
    wide = DrafterConfig(vocab_size=VOCAB, hidden_size=48, exit_dim=96, num_draft_layers=1)
    with pytest.raises(DrafterMismatchError, match=r"hidden_size=48.*hidden_size=32"):
        check_drafter_fits(base, wide)
    other_vocab = DrafterConfig(vocab_size=100, hidden_size=HIDDEN, exit_dim=64, num_draft_layers=1)
    with pytest.raises(DrafterMismatchError, match=rf"vocab_size=100.*vocab_size={VOCAB}"):
        check_drafter_fits(base, other_vocab)


def test_drafter_with_wrong_tensors(tmp_path: Path) -> None:
    out = save_drafter(init_drafter(tiny_config()), tmp_path / "d")
    tensors = {k: v for k, v in load_drafter(out).state_dict().items() if k != "rnn_w.weight"}
    save_file({**tensors, "medusa_head.weight": torch.zeros(2)}, str(out / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing: rnn_w\.weight.*unexpected: medusa_head"):
        load_drafter(out)
    raw = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**raw, "model_type": "medusa"}))
    with pytest.raises(UnsupportedModelError, match="'medusa'"):
        load_drafter(out)


# --------------------------------------------------------------------------- HF folder errors


def write_hf_folder(model: Transformer, folder: Path, **config_overrides) -> Path:
    folder.mkdir()
    config = {**model.config.to_dict(), **config_overrides}
    (folder / "config.json").write_text(json.dumps(config))
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()},
        str(folder / "model.safetensors"),
    )
    return folder


def test_hf_folder_round_trip_and_extras(tmp_path: Path) -> None:
    source = tiny_model(tie_word_embeddings=True)
    folder = write_hf_folder(source, tmp_path / "m")
    extra = dict(source.state_dict())
    extra["lm_head.weight"] = extra["model.embed_tokens.weight"].clone()  # tied, saved anyway
    extra["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)  # old HF buffers
    save_file(extra, str(folder / "model.safetensors"))
    assert_same_logits(source, load_base(folder))


def test_missing_path_and_missing_files(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="nowhere.*not found"):
        load_base(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="empty: no config.json"):
        load_base(empty)
    folder = write_hf_folder(tiny_model(), tmp_path / "m")
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"PK")
    with pytest.raises(CheckpointError, match="no model.safetensors.*pytorch_model.bin"):
        load_base(folder)


def test_corrupt_safetensors(tmp_path: Path) -> None:
    folder = write_hf_folder(tiny_model(), tmp_path / "m")
    (folder / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a readable"):
        load_base(folder)


def test_bad_config_value(tmp_path: Path) -> None:
    folder = write_hf_folder(tiny_model(), tmp_path / "m", num_attention_heads=0)
    with pytest.raises(ConfigError, match="num_attention_heads=0"):
        load_base(folder)


def test_unknown_model_type(tmp_path: Path) -> None:
    folder = write_hf_folder(tiny_model(), tmp_path / "m", model_type="gpt2")
    with pytest.raises(UnsupportedModelError, match="'gpt2'.*llama"):
        load_base_config(folder)


def test_weights_that_do_not_match_the_config(tmp_path: Path) -> None:
    folder = write_hf_folder(tiny_model(), tmp_path / "m", intermediate_size=FFN + 8)
    with pytest.raises(CheckpointError, match=r"shapes.*mlp\.\w+_proj\.weight"):
        load_base(folder)
    folder = write_hf_folder(tiny_model(), tmp_path / "n", num_hidden_layers=3)
    with pytest.raises(CheckpointError, match=r"missing: model\.layers\.2\."):
        load_base(folder)


def test_drafter_folder_is_not_a_base_model(tmp_path: Path) -> None:
    out = save_drafter(init_drafter(tiny_config()), tmp_path / "d")
    with pytest.raises(UnsupportedModelError, match="drafter"):
        load_base(out)


def test_transformers5_rope_parameters_are_read() -> None:
    raw = tiny_config().to_dict()
    del raw["rope_theta"], raw["rope_scaling"]
    raw["rope_parameters"] = {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32,
    }
    config = BaseModelConfig.from_dict(raw)
    assert config.rope_theta == 500000.0 and config.rope_scaling["factor"] == 8.0
