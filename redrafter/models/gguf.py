"""Reading a llama.cpp GGUF base model: config from its metadata, weights dequantized to fp32.

llama.cpp's `convert_hf_to_gguf.py` permutes q/k rows into Meta's interleaved rotary layout for
arch `llama` (not for `qwen2` and `qwen3`, which llama.cpp runs with rotate_half rotary), so
`llama` rows are un-permuted here into the HF layout our `Transformer` uses. Qwen3's q/k norms
arrive as `attn_q_norm` / `attn_k_norm` and its head size as `attention.key_length`. Llama
3.1/3.2's rope scaling arrives as the `rope_freqs` tensor, one divisor per rotary frequency; it
becomes the config's `rope_scaling` of type `freq_factors` (config.py).
"""

from __future__ import annotations

import re
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from redrafter.config import BaseModelConfig
from redrafter.errors import CheckpointError, UnsupportedModelError
from redrafter.models.llama import interleaved_to_half

GGUF_MAGIC = b"GGUF"
ROPE_FREQS = "rope_freqs.weight"  # Llama-3.1 rope scaling, read into the config, not a weight
GGUF_ARCHS = ("llama", "qwen2", "qwen3")

# llama.cpp block tensor name -> HF name (inside `model.layers.{i}.`).
_GGUF_BLOCK = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_q_norm": "self_attn.q_norm",  # Qwen3's per-head q/k RMSNorm
    "attn_k_norm": "self_attn.k_norm",
}
_GGUF_TOP = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_GGUF_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def gguf_reader(path: Path) -> Any:
    from gguf import GGUFReader

    try:
        return GGUFReader(str(path))
    except (ValueError, OSError, struct.error, IndexError, KeyError) as e:
        raise CheckpointError(f"{path}: not a readable GGUF file ({e}); re-download it") from None


def _gguf_meta(reader: Any, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def gguf_config(reader: Any, path: Path) -> BaseModelConfig:
    arch = _gguf_meta(reader, "general.architecture")
    if arch not in GGUF_ARCHS:
        raise UnsupportedModelError(
            f"{path}: GGUF architecture {arch!r} is not supported; supported: "
            + ", ".join(GGUF_ARCHS)
        )

    def need(key: str) -> Any:
        value = _gguf_meta(reader, f"{arch}.{key}")
        if value is None:
            raise CheckpointError(
                f"{path}: GGUF metadata {arch}.{key} is missing; re-convert the model with "
                "llama.cpp's convert_hf_to_gguf.py"
            )
        return value

    tensors = {t.name: t for t in reader.tensors}
    scaling = _gguf_meta(reader, f"{arch}.rope.scaling.type", "none")
    if scaling != "none":
        raise UnsupportedModelError(
            f"{path}: GGUF rope scaling {scaling!r} is not supported; load the HF folder instead"
        )
    vocab = _gguf_meta(reader, f"{arch}.vocab_size")
    if vocab is None:
        vocab = (
            int(tensors["token_embd.weight"].shape[-1])
            if "token_embd.weight" in tensors
            else len(_gguf_meta(reader, "tokenizer.ggml.tokens", []))
        )
    try:
        raw = _gguf_raw_config(reader, arch, need, tensors, vocab)
        if ROPE_FREQS in tensors:
            raw["rope_scaling"] = {"rope_type": "freq_factors", "factors": _rope_freqs(tensors)}
    except (TypeError, ValueError, ZeroDivisionError, OverflowError) as e:
        raise CheckpointError(
            f"{path}: GGUF metadata has a malformed size ({type(e).__name__}: {e}); re-convert "
            "the model with llama.cpp's convert_hf_to_gguf.py"
        ) from None
    return BaseModelConfig.from_dict(raw, where=f"{path} (GGUF metadata)")


def _rope_freqs(tensors: dict[str, Any]) -> list[float]:
    """llama.cpp's `rope_freqs` tensor (D/2,): Llama-3.1's rope scaling as one divisor per
    rotary frequency (convert_hf_to_gguf.py writes 1 / the factor HF's llama3 rule multiplies
    the frequency by), which llama.cpp divides each frequency by."""
    from gguf.quants import dequantize

    t = tensors[ROPE_FREQS]
    return [float(x) for x in dequantize(t.data, t.tensor_type).astype(np.float64).reshape(-1)]


def _gguf_raw_config(
    reader: Any, arch: str, need: Callable[[str], Any], tensors: dict[str, Any], vocab: Any
) -> dict[str, Any]:
    """The HF-style config dict from GGUF metadata (sizes are checked and capped by
    `BaseModelConfig`, which the caller builds from it)."""
    hidden, heads = int(need("embedding_length")), int(need("attention.head_count"))
    raw = {
        "model_type": arch,
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "intermediate_size": int(need("feed_forward_length")),
        "num_hidden_layers": int(need("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(_gguf_meta(reader, f"{arch}.attention.head_count_kv", heads)),
        "head_dim": int(_gguf_meta(reader, f"{arch}.attention.key_length", hidden // heads)),
        "rms_norm_eps": float(need("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(_gguf_meta(reader, f"{arch}.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(need("context_length")),
        "tie_word_embeddings": "output.weight" not in tensors,
        # Qwen2's q/k/v biases are implied by model_type; a Llama GGUF may carry them too.
        "attention_bias": arch == "llama" and "blk.0.attn_q.bias" in tensors,
        "bos_token_id": _gguf_meta(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _gguf_meta(reader, "tokenizer.ggml.eos_token_id"),
        "pad_token_id": _gguf_meta(reader, "tokenizer.ggml.padding_token_id"),
    }
    return raw


def gguf_weights(reader: Any, config: BaseModelConfig) -> dict[str, torch.Tensor]:
    from gguf.quants import dequantize

    permuted = config.model_type == "llama"  # llama.cpp permutes q/k for `llama` only
    weights: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        if t.name == ROPE_FREQS:
            continue  # the config's rope_scaling (gguf_config)
        name = _GGUF_TOP.get(t.name)
        m = _GGUF_BLOCK_RE.fullmatch(t.name)
        if m is not None and m.group(2) in _GGUF_BLOCK:
            name = f"model.layers.{m.group(1)}.{_GGUF_BLOCK[m.group(2)]}.{m.group(3)}"
        if name is None:
            name = f"<gguf>{t.name}"  # reported as unexpected by the key-set check
        shape = [int(d) for d in t.shape[::-1]]  # GGUF lists dims innermost first
        arr = dequantize(t.data, t.tensor_type).astype(np.float32, copy=False).reshape(shape)
        if permuted and m is not None and m.group(2) in ("attn_q", "attn_k"):
            n = config.num_attention_heads if m.group(2) == "attn_q" else config.kv_heads
            arr = interleaved_to_half(arr, n)
        # F32/F16 tensors come back as read-only views of the memory-mapped file: copy those.
        arr = np.array(arr, copy=not (arr.flags.writeable and arr.flags.c_contiguous))
        weights[name] = torch.from_numpy(arr)
    return weights
