"""Reading a llama.cpp GGUF base model: config from its metadata, weights dequantized to fp32.

llama.cpp's `convert_hf_to_gguf.py` permutes q/k rows into Meta's interleaved rotary layout for
arch `llama` (not for `qwen2`, `qwen3`, `gemma2` and `gemma3`, which llama.cpp runs with
rotate_half rotary), so `llama` rows are un-permuted here into the HF layout our `Transformer`
uses. Qwen3's and Gemma 3's q/k norms arrive as `attn_q_norm` / `attn_k_norm` and the head size
as `attention.key_length`. Llama 3.1/3.2's rope scaling arrives as the `rope_freqs` tensor, one
divisor per rotary frequency; it becomes the config's `rope_scaling` of type `freq_factors`
(config.py). Linear rope scaling arrives as `rope.scaling.type` "linear" with its factor.

Gemma 2 / Gemma 3 (`_gemma_raw`), as llama.cpp's converter writes them and llama.cpp's
`llama-model.cpp` reads them back:

* every RMSNorm weight is stored with Gemma's +1 folded in (the converter adds 1 to each
  `*norm.weight`), so 1 is subtracted here for our `GemmaRMSNorm`, which scales by 1 + w;
* the four norms per layer are `attn_norm`, `post_attention_norm`, `ffn_norm` (HF's
  pre_feedforward_layernorm, not Llama's post-attention norm) and `post_ffw_norm`;
  the head is tied to `token_embd` (Gemma 3 may carry an `output` tensor);
* the sliding-window layer pattern is llama.cpp's, hard-coded per arch: Gemma 2 alternates
  (even layers local), Gemma 3 makes every 6th layer global; `attention.sliding_window` is the
  window (Gemma 2: 4096 when absent; Gemma 3 without it: no local layers);
* Gemma 3's local layers rotate with base 10000 unscaled (hard-coded in llama.cpp), its global
  ones with `rope.freq_base` and the linear scaling;
* Gemma 2's soft-caps: `attn_logit_softcapping` and `final_logit_softcapping` (50 and 30 when
  absent, llama.cpp's defaults); Gemma 3: only the final one, when present;
* the files carry no query_pre_attn_scalar: llama.cpp derives the attention scale from the model
  size, 1/sqrt(hidden/heads) for the 27B models (46 layers for Gemma 2, 62 for Gemma 3) and
  1/sqrt(head_dim) otherwise, which is what every released Gemma 2/3's config says. A fine-tune
  whose config.json says otherwise runs here as it runs in llama.cpp, not as in transformers:
  load its HF folder instead.

Gemma's tokenizer is SentencePiece (`tokenizer.ggml.model` "llama"), which tokenizer.py does not
rebuild from GGUF metadata: text prompts need the model's tokenizer.json beside the .gguf.
"""

from __future__ import annotations

import dataclasses
import re
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from redrafter.config import BaseModelConfig
from redrafter.errors import CheckpointError, ConfigError, UnsupportedModelError
from redrafter.models.llama import interleaved_to_half

GGUF_MAGIC = b"GGUF"
ROPE_FREQS = "rope_freqs.weight"  # Llama-3.1 rope scaling, read into the config, not a weight
GGUF_ARCHS = ("llama", "qwen2", "qwen3", "gemma2", "gemma3")
_MODEL_TYPE = {"gemma3": "gemma3_text"}  # GGUF arch -> config model_type, where they differ
GEMMA_ARCHS = ("gemma2", "gemma3")
# llama.cpp's hard-coded Gemma facts (llama-model.cpp): every `pattern`-th layer is global, the
# 27B models' layer counts (their attention scale is 1/sqrt(hidden/heads)), Gemma 3's local
# rotary base, Gemma 2's defaults for a window and soft-caps missing from the file.
_GEMMA_PATTERN = {"gemma2": 2, "gemma3": 6}
_GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}
_GEMMA3_LOCAL_ROPE_BASE = 10_000.0
_GEMMA2_DEFAULTS = {"sliding_window": 4096, "attn_logit_softcapping": 50.0,
                    "final_logit_softcapping": 30.0}  # fmt: skip

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
    "attn_q_norm": "self_attn.q_norm",  # Qwen3's and Gemma 3's per-head q/k RMSNorm
    "attn_k_norm": "self_attn.k_norm",
}
# Gemma's four norms per layer: `ffn_norm` is the norm before the MLP, as in Llama, but
# Gemma's HF name for it is pre_feedforward_layernorm.
_GEMMA_BLOCK = {
    **_GGUF_BLOCK,
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
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
    vocab = _gguf_meta(reader, f"{arch}.vocab_size")
    if vocab is None:
        vocab = (
            int(tensors["token_embd.weight"].shape[-1])
            if "token_embd.weight" in tensors
            else len(_gguf_meta(reader, "tokenizer.ggml.tokens", []))
        )
    try:
        raw = _gguf_raw_config(reader, arch, need, tensors, vocab)
        scaling = _gguf_meta(reader, f"{arch}.rope.scaling.type", "none")
        if scaling == "linear":  # llama.cpp: positions divided by the factor
            raw["rope_scaling"] = {"rope_type": "linear", "factor": need("rope.scaling.factor")}
        elif scaling != "none":
            raise UnsupportedModelError(
                f"{path}: GGUF rope scaling {scaling!r} is not supported (only linear); load "
                "the HF folder instead"
            )
        if ROPE_FREQS in tensors:
            raw["rope_scaling"] = {"rope_type": "freq_factors", "factors": _rope_freqs(tensors)}
        if arch in GEMMA_ARCHS:
            raw |= _gemma_raw(reader, arch, path)
    except (TypeError, ValueError, ZeroDivisionError, OverflowError) as e:
        raise CheckpointError(
            f"{path}: GGUF metadata has a malformed value ({type(e).__name__}: {e}); re-convert "
            "the model with llama.cpp's convert_hf_to_gguf.py"
        ) from None
    try:
        return BaseModelConfig.from_dict(raw, where=f"{path} (GGUF metadata)")
    except (ConfigError, UnsupportedModelError) as e:  # name the file, not config.json
        where = f"{path} (GGUF metadata)"
        raise type(e)(str(e) if str(e).startswith(where) else f"{where}: {e}") from None


def _gemma_raw(reader: Any, arch: str, path: Path) -> dict[str, Any]:
    """Gemma 2/3's config fields from the metadata and llama.cpp's hard-coded rules (module
    docstring)."""

    def meta(key: str, default: Any = None) -> Any:
        return _gguf_meta(reader, f"{arch}.{key}", default)

    layers, hidden = int(meta("block_count")), int(meta("embedding_length"))
    heads = int(meta("attention.head_count"))
    head_dim = int(meta("attention.key_length", hidden // heads))
    value_dim = int(meta("attention.value_length", head_dim))
    if value_dim != head_dim:
        raise UnsupportedModelError(
            f"{path}: GGUF {arch}.attention.value_length={value_dim} differs from key_length="
            f"{head_dim}; only equal key and value head sizes are supported"
        )
    big = layers == _GEMMA_27B_LAYERS[arch]
    raw: dict[str, Any] = {
        "query_pre_attn_scalar": hidden // heads if big else head_dim,
        "sliding_window_pattern": _GEMMA_PATTERN[arch],
    }
    if arch == "gemma2":
        window = meta("attention.sliding_window", _GEMMA2_DEFAULTS["sliding_window"])
        raw["sliding_window"] = int(window)
        for key in ("attn_logit_softcapping", "final_logit_softcapping"):
            raw[key] = float(meta(key, _GEMMA2_DEFAULTS[key]))
        return raw
    window = int(meta("attention.sliding_window", 0))  # newer llama.cpp: 0 or absent = none
    raw["sliding_window"] = window or None
    raw["rope_local_base_freq"] = _GEMMA3_LOCAL_ROPE_BASE
    final = meta("final_logit_softcapping")
    raw["final_logit_softcapping"] = float(final) if final else None  # 0 = off in llama.cpp
    return raw


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
        "model_type": _MODEL_TYPE.get(arch, arch),
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
    """Every tensor under its HF name (names the map does not know stay, prefixed `<gguf>`, for
    the key-set check to report), fp32; `llama` q/k rows un-permuted, Gemma norms minus 1."""
    from gguf.quants import dequantize

    permuted = config.model_type == "llama"  # llama.cpp permutes q/k for `llama` only
    block_map = _GEMMA_BLOCK if config.is_gemma else _GGUF_BLOCK
    weights: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        if t.name == ROPE_FREQS:
            continue  # the config's rope_scaling (gguf_config)
        name = _GGUF_TOP.get(t.name)
        m = _GGUF_BLOCK_RE.fullmatch(t.name)
        if m is not None and m.group(2) in block_map:
            name = f"model.layers.{m.group(1)}.{block_map[m.group(2)]}.{m.group(3)}"
        if name is None:
            name = f"<gguf>{t.name}"  # reported as unexpected by the key-set check
        shape = [int(d) for d in t.shape[::-1]]  # GGUF lists dims innermost first
        arr = dequantize(t.data, t.tensor_type).astype(np.float32, copy=False).reshape(shape)
        if permuted and m is not None and m.group(2) in ("attn_q", "attn_k"):
            n = config.num_attention_heads if m.group(2) == "attn_q" else config.kv_heads
            arr = interleaved_to_half(arr, n)
        if config.is_gemma and name.endswith("norm.weight"):
            arr = arr - np.float32(1.0)  # the converter stored 1 + w; exact in fp32 near 1
        # F32/F16 tensors come back as read-only views of the memory-mapped file: copy those.
        arr = np.array(arr, copy=not (arr.flags.writeable and arr.flags.c_contiguous))
        weights[name] = torch.from_numpy(arr)
    return weights


@dataclasses.dataclass(frozen=True)
class GgufBlocks:
    """One GGUF tensor's legacy blocks of 32 weights (Q4_0, Q4_1, Q8_0), row by row (a row is
    an output feature): weight = scale * (code - zero), exactly as the file stores them.
    `values` is what the loader dequantizes (the same call), so a graph weight can be matched to
    its blocks by value whatever the export did to it (transposed, fused, rows un-permuted)."""

    name: str
    bits: int  # 4 (Q4_0, Q4_1) or 8 (Q8_0)
    codes: np.ndarray  # [R, K] uint8: 0..15, or 0..255 for 8 bits (the int8 q + 128)
    scales: np.ndarray  # [R, K / 32] float32: d
    zeros: np.ndarray | None  # [R, K / 32] float32: -m / d (Q4_1); None: 2^(bits-1)
    values: np.ndarray  # [R, K] float32


GGUF_BLOCK = 32  # Q4_0 / Q4_1 / Q8_0 weights per block
# bytes per block: fp16 d [, fp16 m], then the codes (16 bytes of nibbles, or 32 int8)
_BLOCK_LAYOUT = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}


def gguf_blocks(path: Path) -> list[GgufBlocks]:
    """The Q4_0 / Q4_1 / Q8_0 matrices of the GGUF at `path` as `GgufBlocks` (other types,
    e.g. Q4_K or F16, are left out: the export requantizes them).

    A Q4_1 block is d * code + m; as MatMulNBits' scale * (code - zero) that is zero = -m / d,
    and a block with d = 0 (all weights equal m) becomes scale m, codes 0, zero -1. A Q8_0 block
    is d * q with q in int8: code q + 128, zero 128."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    reader = gguf_reader(path)
    blocks: list[GgufBlocks] = []
    for t in reader.tensors:
        if len(t.shape) != 2:
            continue
        kind = t.tensor_type.name
        if kind not in _BLOCK_LAYOUT:
            continue
        rows, K = int(t.shape[1]), int(t.shape[0])
        raw = np.asarray(t.data, dtype=np.uint8).reshape(rows, K // GGUF_BLOCK, _BLOCK_LAYOUT[kind])
        d = raw[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)  # [R, KB]
        zeros = None
        if kind == "Q8_0":
            codes = (raw[..., 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
            codes = codes.reshape(rows, K)
        else:
            packed = raw[..., -16:]  # byte i: code i (low nibble), code 16 + i (high nibble)
            codes = np.concatenate([packed & 15, packed >> 4], axis=-1).reshape(rows, K)
        if kind == "Q4_1":
            m = raw[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
            flat = d == 0
            with np.errstate(divide="ignore", invalid="ignore"):
                zeros = np.where(flat, np.float32(-1), -m / d).astype(np.float32)
            zeros[flat & (m == 0)] = 0.0
            d = np.where(flat, m, d).astype(np.float32)
            codes = codes.reshape(rows, -1, GGUF_BLOCK)
            codes[flat] = 0
            codes = codes.reshape(rows, K)
        values = dequantize(t.data, GGMLQuantizationType[kind]).astype(np.float32, copy=False)
        bits = 8 if kind == "Q8_0" else 4
        blocks.append(GgufBlocks(t.name, bits, codes, d, zeros, values.reshape(rows, K)))
    return blocks
