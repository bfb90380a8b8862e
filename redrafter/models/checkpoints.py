"""Checkpoint loaders and writers: base models (Hugging Face folder, GGUF, llama2.c `.bin`) and
ReDrafter drafters (Apple's layout).

Dimensions: V vocab, E hidden size, F MLP size, Lyr layers, Hq/Hkv heads, D head dim, X exit_dim.

Every loader maps names explicitly, compares the key set with the model's state dict exactly, checks
every shape and casts to fp32; nothing is unpickled. Rotary layouts: our `Transformer` uses HF's
`rotate_half` (a head's rotary pairs are rows (j, j + D/2)). llama.cpp's GGUF (arch `llama`) and
llama2.c store q/k rows in Meta's interleaved layout (pairs are rows (2j, 2j + 1)), so those rows
are un-permuted on load. Verified facts: llama.cpp's `convert_hf_to_gguf.py` permutes q/k weights
and biases for `llama` but not for `qwen2` (which llama.cpp runs with NEOX = rotate_half rotary);
llama2.c's `run.c` rotates pairs (i, i+1), and its `export.py` applies `permute_reverse`
(HF -> interleaved) to HF weights before writing a `.bin`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import tempfile
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from redrafter.config import DRAFTER_MODEL_TYPE, BaseModelConfig, DrafterConfig
from redrafter.errors import (
    CheckpointError,
    ConfigError,
    DrafterMismatchError,
    UnsupportedModelError,
)
from redrafter.models.drafter import Drafter
from redrafter.models.llama import Transformer, rope_inv_freq

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
GGUF_MAGIC = b"GGUF"
LLAMA2C_MAGIC = 0x616B3432  # "ak42" as a little-endian uint32
LLAMA2C_HEADER_V1 = 256
GGUF_ARCHS = ("llama", "qwen2")
_ROTARY_INV_FREQ = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")
_FIX_CONFIG = "check that the config belongs to these weights, or re-export the checkpoint"


def _few(names: list[str], n: int = 4) -> str:
    return ", ".join(names[:n]) + (f" (+{len(names) - n} more)" if len(names) > n else "")


def load_checked(module: nn.Module, weights: dict[str, torch.Tensor], where: str) -> None:
    """Load `weights` into `module` after an exact key-set and per-tensor shape check (fp32)."""
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    missing = sorted(expected.keys() - weights.keys())
    unexpected = sorted(weights.keys() - expected.keys())
    if missing or unexpected:
        raise CheckpointError(
            f"{where}: tensor names do not match the config (missing: {_few(missing) or 'none'}; "
            f"unexpected: {_few(unexpected) or 'none'}); {_FIX_CONFIG}"
        )
    bad = [
        f"{k} {tuple(w.shape)} != {expected[k]}"
        for k, w in sorted(weights.items())
        if tuple(w.shape) != expected[k]
    ]
    if bad:
        raise CheckpointError(
            f"{where}: tensor shapes do not match the config: {_few(bad)}; {_FIX_CONFIG}"
        )
    # Integer tensors (a drafter's `draft_token_ids`) keep their dtype; weights become fp32.
    module.load_state_dict(
        {k: w.to(torch.float32) if w.is_floating_point() else w for k, w in weights.items()},
        strict=True,
    )


def interleaved_to_half(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Rows of q/k (weight (H*D, in) or bias (H*D,)) from interleaved rotary pairs (2j, 2j+1),
    Meta/llama.cpp/llama2.c, to HF's rotate_half pairs (j, j+D/2)."""
    out = w.shape[0]
    return w.reshape(n_heads, out // n_heads // 2, 2, -1).swapaxes(1, 2).reshape(w.shape)


def half_to_interleaved(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of `interleaved_to_half` (HF -> Meta layout), used by the writers."""
    out = w.shape[0]
    return w.reshape(n_heads, 2, out // n_heads // 2, -1).swapaxes(1, 2).reshape(w.shape)


def _checkpoint_format(path: Path) -> str:
    """'hf' (folder), 'gguf' (by magic) or 'llama2c' (a .bin file)."""
    if path.is_dir():
        return "hf"
    if not path.exists():
        raise CheckpointError(
            f"{path}: not found; pass a Hugging Face checkpoint folder, a .gguf or a llama2.c .bin"
        )
    with open(path, "rb") as f:
        head = f.read(4)
    if head == GGUF_MAGIC:
        return "gguf"
    if head[:2] == b"PK":
        raise CheckpointError(
            f"{path} is a PyTorch pickle archive, which we never unpickle; re-save the model "
            "with save_pretrained(safe_serialization=True) and pass the folder"
        )
    if path.suffix == ".bin":
        return "llama2c"
    if path.name in (SAFETENSORS, SAFETENSORS_INDEX, "config.json"):
        raise CheckpointError(f"{path}: pass the folder holding it ({path.parent}), not the file")
    raise CheckpointError(
        f"{path}: unknown checkpoint format; pass a Hugging Face folder, a .gguf or a llama2.c .bin"
    )


def load_base_config(path: str | Path) -> BaseModelConfig:
    """The base model's config without reading its weights (any supported format)."""
    path = Path(path)
    kind = _checkpoint_format(path)
    if kind == "hf":
        return _hf_config(path)
    if kind == "gguf":
        return _gguf_config(_gguf_reader(path), path)
    return _llama2c_header(path)[0]


def load_base(path: str | Path) -> Transformer:
    """A base model from a HF folder, a `.gguf` or a llama2.c `.bin`; fp32, eval mode."""
    path = Path(path)
    kind = _checkpoint_format(path)
    if kind == "hf":
        config, weights = _hf_config(path), _hf_weights(path)
        weights = _sanitize_hf(weights, config, path)
    elif kind == "gguf":
        reader = _gguf_reader(path)
        config = _gguf_config(reader, path)
        weights = _gguf_weights(reader, config)
    else:
        config, weights = _llama2c_read(path)
    model = Transformer(config)
    load_checked(model, weights, str(path))
    return model.eval()


# --------------------------------------------------------------------------- Hugging Face


def _hf_config(folder: Path) -> BaseModelConfig:
    if not (folder / "config.json").is_file():
        raise CheckpointError(
            f"{folder}: no config.json; a Hugging Face checkpoint folder needs config.json "
            f"and {SAFETENSORS} (or {SAFETENSORS_INDEX} with its shards)"
        )
    return BaseModelConfig.from_json(folder / "config.json")


def read_safetensors(file: Path) -> dict[str, torch.Tensor]:
    """Every tensor of one safetensors file (CheckpointError if missing or corrupt)."""
    if not file.is_file():
        raise CheckpointError(f"{file}: not found; re-download or re-export the checkpoint")
    try:
        with safe_open(str(file), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(
            f"{file}: not a readable safetensors file ({e}); re-download or re-export it"
        ) from None


def _hf_weights(folder: Path) -> dict[str, torch.Tensor]:
    if (folder / SAFETENSORS).is_file():
        return read_safetensors(folder / SAFETENSORS)
    index = folder / SAFETENSORS_INDEX
    if not index.is_file():
        pickles = sorted(p.name for p in folder.glob("*.bin")) + sorted(
            p.name for p in folder.glob("*.pt*")
        )
        hint = f" (found {_few(pickles)}: pickles are never loaded)" if pickles else ""
        raise CheckpointError(
            f"{folder}: no {SAFETENSORS} or {SAFETENSORS_INDEX}{hint}; re-save the model with "
            "save_pretrained(safe_serialization=True)"
        )
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        assert isinstance(weight_map, dict)
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AssertionError):
        raise CheckpointError(
            f"{index}: not a valid index (needs a 'weight_map' object); re-export the checkpoint"
        ) from None
    weights: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        for name, tensor in read_safetensors(folder / shard).items():
            if name in weights:
                raise CheckpointError(f"{folder}: tensor {name} appears in two shards; re-export")
            if weight_map.get(name) != shard:
                raise CheckpointError(
                    f"{folder / shard}: holds {name}, which {SAFETENSORS_INDEX} does not map to "
                    "this shard; re-export the checkpoint"
                )
            weights[name] = tensor
    absent = sorted(weight_map.keys() - weights.keys())
    if absent:
        raise CheckpointError(f"{index}: maps {_few(absent)} to shards that lack them; re-export")
    return weights


def _sanitize_hf(
    weights: dict[str, torch.Tensor], config: BaseModelConfig, where: Path
) -> dict[str, torch.Tensor]:
    """HF quirks: drop old rotary caches; drop a redundant lm_head when embeddings are tied."""
    weights = {k: v for k, v in weights.items() if not _ROTARY_INV_FREQ.fullmatch(k)}
    if config.tie_word_embeddings and "lm_head.weight" in weights:
        head = weights.pop("lm_head.weight")
        embed = weights.get("model.embed_tokens.weight")
        if embed is not None and head.shape != embed.shape:
            raise CheckpointError(
                f"{where}: lm_head.weight {tuple(head.shape)} differs from the tied embedding "
                f"{tuple(embed.shape)}; set tie_word_embeddings=false in config.json"
            )
    return weights


# --------------------------------------------------------------------------- GGUF

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
}
_GGUF_TOP = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_GGUF_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def _gguf_reader(path: Path) -> Any:
    from gguf import GGUFReader

    try:
        return GGUFReader(str(path))
    except (ValueError, OSError, struct.error, IndexError, KeyError) as e:
        raise CheckpointError(f"{path}: not a readable GGUF file ({e}); re-download it") from None


def _gguf_meta(reader: Any, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _gguf_config(reader: Any, path: Path) -> BaseModelConfig:
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
    if "rope_freqs.weight" in tensors:
        raise UnsupportedModelError(
            f"{path}: GGUF rope_freqs (Llama-3.1 rope scaling) is not supported from GGUF; "
            "load the Hugging Face checkpoint folder instead"
        )
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
    return BaseModelConfig.from_dict(raw, where=f"{path} (GGUF metadata)")


def _gguf_weights(reader: Any, config: BaseModelConfig) -> dict[str, torch.Tensor]:
    from gguf.quants import dequantize

    permuted = config.model_type == "llama"  # llama.cpp permutes q/k for `llama` only
    weights: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
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


# --------------------------------------------------------------------------- llama2.c

# Per-file layout (all fp32, little-endian; verified against karpathy/llama2.c export.py/run.c):
# v0: 7 int32 header (vocab < 0 means an untied classifier), token_embedding, rms_att[Lyr],
#     wq, wk, wv, wo [Lyr each], rms_ffn[Lyr], w1, w2, w3 [Lyr each], rms_final,
#     freq_cis_real, freq_cis_imag (seq_len x D/2 each, unused), then wcls if untied.
# v1: 256-byte header (magic, version=1, 7 int32, uint8 shared_classifier), rms_att[Lyr],
#     rms_ffn[Lyr], rms_final, tok_embeddings, wq, wk, wv, wo, w1, w2, w3 [Lyr each], then output
#     if not shared. w1 = gate, w2 = down, w3 = up; wq/wk rows are in the interleaved layout.


def _llama2c_header(path: Path) -> tuple[BaseModelConfig, int, bool]:
    """(config, version, shared_classifier), after checking the file size matches."""
    with open(path, "rb") as f:
        head = f.read(LLAMA2C_HEADER_V1)
    if len(head) < 28:
        raise CheckpointError(f"{path}: too short for a llama2.c checkpoint; re-export it")
    if struct.unpack_from("<I", head, 0)[0] == LLAMA2C_MAGIC:
        version = struct.unpack_from("<i", head, 4)[0]
        if version != 1:
            raise CheckpointError(
                f"{path}: llama2.c version {version} is not supported (fp32 v0 and v1 only); "
                "re-export with export.py --version 1"
            )
        dim, hidden, layers, heads, kv_heads, vocab, seq_len = struct.unpack_from("<7i", head, 8)
        shared = bool(head[36])
    else:
        version = 0
        dim, hidden, layers, heads, kv_heads, vocab, seq_len = struct.unpack_from("<7i", head, 0)
        shared, vocab = vocab > 0, abs(vocab)
    if min(dim, hidden, layers, heads, kv_heads, vocab, seq_len) <= 0 or dim % heads:
        raise CheckpointError(
            f"{path}: not a llama2.c checkpoint (header dim={dim} hidden_dim={hidden} "
            f"n_layers={layers} n_heads={heads} vocab={vocab}); pass a llama2.c .bin"
        )
    config = BaseModelConfig(
        model_type="llama",
        vocab_size=vocab,
        hidden_size=dim,
        intermediate_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=seq_len,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=shared,
        bos_token_id=1,
        eos_token_id=2,
    )  # llama2.c's run.c hard-codes eps 1e-5 and theta 10000; its tokenizers use BOS 1, EOS 2
    offset = LLAMA2C_HEADER_V1 if version == 1 else 28
    expected = offset + 4 * sum(int(np.prod(s)) for _, s in _llama2c_layout(config, version))
    actual = path.stat().st_size
    if actual != expected:
        raise CheckpointError(
            f"{path}: {actual} bytes, but a llama2.c v{version} file with this header has "
            f"{expected}; the file is truncated or not an fp32 llama2.c checkpoint"
        )
    return config, version, shared


def _llama2c_layout(c: BaseModelConfig, version: int) -> list[tuple[str, tuple[int, ...]]]:
    """(llama2.c name, shape) in file order."""
    L, E, F, V = c.num_hidden_layers, c.hidden_size, c.intermediate_size, c.vocab_size
    q, kv = c.num_attention_heads * c.dim_per_head, c.kv_heads * c.dim_per_head
    norms = [("rms_att", (L, E)), ("rms_ffn", (L, E)), ("rms_final", (E,))]
    mats = [
        ("wq", (L, q, E)),
        ("wk", (L, kv, E)),
        ("wv", (L, kv, E)),
        ("wo", (L, E, q)),
        ("w1", (L, F, E)),
        ("w2", (L, E, F)),
        ("w3", (L, F, E)),
    ]
    if version == 1:
        order = norms + [("tok", (V, E))] + mats
    else:
        freq = (c.max_position_embeddings, c.dim_per_head // 2)
        order = [
            ("tok", (V, E)),
            ("rms_att", (L, E)),
            *mats[:4],
            ("rms_ffn", (L, E)),
            *mats[4:],
            ("rms_final", (E,)),
            ("freq_real", freq),
            ("freq_imag", freq),
        ]
    return order + ([] if c.tie_word_embeddings else [("wcls", (V, E))])


def _llama2c_read(path: Path) -> tuple[BaseModelConfig, dict[str, torch.Tensor]]:
    config, version, _ = _llama2c_header(path)
    offset = LLAMA2C_HEADER_V1 if version == 1 else 28
    flat = np.fromfile(path, dtype="<f4", offset=offset)
    raw: dict[str, np.ndarray] = {}
    cursor = 0
    for name, shape in _llama2c_layout(config, version):
        n = int(np.prod(shape))
        raw[name] = flat[cursor : cursor + n].reshape(shape)
        cursor += n
    weights = {"model.embed_tokens.weight": raw["tok"], "model.norm.weight": raw["rms_final"]}
    if "wcls" in raw:
        weights["lm_head.weight"] = raw["wcls"]
    hf = {
        "input_layernorm.weight": "rms_att",
        "post_attention_layernorm.weight": "rms_ffn",
        "self_attn.q_proj.weight": "wq",
        "self_attn.k_proj.weight": "wk",
        "self_attn.v_proj.weight": "wv",
        "self_attn.o_proj.weight": "wo",
        "mlp.gate_proj.weight": "w1",
        "mlp.down_proj.weight": "w2",
        "mlp.up_proj.weight": "w3",
    }
    for i in range(config.num_hidden_layers):
        for hf_name, name in hf.items():
            w = raw[name][i]
            if name == "wq":
                w = interleaved_to_half(w, config.num_attention_heads)
            elif name == "wk":
                w = interleaved_to_half(w, config.kv_heads)
            weights[f"model.layers.{i}.{hf_name}"] = w
    return config, {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in weights.items()}


def save_llama2c(model: Transformer, path: str | Path, *, version: int = 1) -> None:
    """Write `model` as an fp32 llama2.c checkpoint (v0 legacy or v1), e.g. for tests."""
    c = model.config
    if version not in (0, 1):
        raise ConfigError(f"llama2.c version {version!r} is not writable; use 0 or 1")
    if (
        c.model_type != "llama"
        or c.qkv_bias
        or c.mlp_bias
        or c.rope_scaling is not None
        or c.rope_theta != 10000.0
        or c.rms_norm_eps != 1e-5
        or c.num_attention_heads * c.dim_per_head != c.hidden_size
    ):
        raise ConfigError(
            "llama2.c stores only plain Llama (no biases, rope_theta 10000, rms_norm_eps 1e-5, "
            "head_dim * heads == hidden_size); export this model as a HF folder instead"
        )
    sd = {k: v.detach().float().cpu().numpy() for k, v in model.state_dict().items()}
    L = c.num_hidden_layers

    def stack(name: str, heads: int | None = None) -> np.ndarray:
        ws = [sd[f"model.layers.{i}.{name}"] for i in range(L)]
        return np.stack([half_to_interleaved(w, heads) if heads else w for w in ws])

    pos = torch.arange(c.max_position_embeddings, dtype=torch.float32)[:, None]
    angles = (pos * rope_inv_freq(c)[None, :]).numpy()  # (seq_len, D/2)
    arrays = {
        "tok": sd["model.embed_tokens.weight"],
        "rms_final": sd["model.norm.weight"],
        "rms_att": stack("input_layernorm.weight"),
        "rms_ffn": stack("post_attention_layernorm.weight"),
        "wq": stack("self_attn.q_proj.weight", c.num_attention_heads),
        "wk": stack("self_attn.k_proj.weight", c.kv_heads),
        "wv": stack("self_attn.v_proj.weight"),
        "wo": stack("self_attn.o_proj.weight"),
        "w1": stack("mlp.gate_proj.weight"),
        "w2": stack("mlp.down_proj.weight"),
        "w3": stack("mlp.up_proj.weight"),
        "freq_real": np.cos(angles),
        "freq_imag": np.sin(angles),
    }
    if not c.tie_word_embeddings:
        arrays["wcls"] = sd["lm_head.weight"]
    params = (c.hidden_size, c.intermediate_size, L, c.num_attention_heads, c.kv_heads)
    if version == 1:
        header = struct.pack("<Ii", LLAMA2C_MAGIC, 1)
        header += struct.pack("<7i", *params, c.vocab_size, c.max_position_embeddings)
        header += struct.pack("<B", int(c.tie_word_embeddings))
        header = header.ljust(LLAMA2C_HEADER_V1, b"\0")
    else:
        vocab = c.vocab_size if c.tie_word_embeddings else -c.vocab_size
        header = struct.pack("<7i", *params, vocab, c.max_position_embeddings)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    with open(tmp, "wb") as f:
        f.write(header)
        for name, shape in _llama2c_layout(c, version):
            arr = np.ascontiguousarray(arrays[name], dtype="<f4")
            assert arr.shape == shape, (name, arr.shape, shape)
            f.write(arr.tobytes())
    os.replace(tmp, path)


# --------------------------------------------------------------------------- drafter


def check_drafter_fits(base_config: BaseModelConfig, drafter_config: DrafterConfig) -> None:
    """Raise DrafterMismatchError unless the drafter was built for this base model's sizes."""
    for field in ("hidden_size", "vocab_size"):
        base, draft = getattr(base_config, field), getattr(drafter_config, field)
        if base != draft:
            raise DrafterMismatchError(
                f"drafter {field}={draft} does not match the base model's {field}={base}; "
                "use a drafter trained for this base model (or init one for it)"
            )


def load_drafter(path: str | Path) -> Drafter:
    """A drafter from Apple's layout: `config.json` (model_type recurrent_drafting_drafter) +
    `model.safetensors` with Apple's tensor names; fp32, eval mode."""
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(
            f"{folder}: not a folder; pass a drafter folder with config.json and {SAFETENSORS}"
        )
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder}: no config.json; pass a ReDrafter drafter folder")
    config = DrafterConfig.from_json(folder / "config.json")
    drafter = Drafter(config)
    load_checked(drafter, read_safetensors(folder / SAFETENSORS), str(folder))
    ids = drafter.draft_token_ids
    if ids is not None and (
        ids.min() < 0 or ids.max() >= config.vocab_size or len(ids.unique()) != len(ids)
    ):
        raise CheckpointError(
            f"{folder}: draft_token_ids must be distinct token ids in [0, {config.vocab_size}); "
            "re-train or re-save the drafter"
        )
    return drafter.eval()


def _is_drafter_dir(folder: Path) -> bool:
    try:
        raw = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return False
    return isinstance(raw, dict) and raw.get("model_type") == DRAFTER_MODEL_TYPE


def save_drafter(drafter: Drafter, out_dir: str | Path) -> Path:
    """Write `config.json` + `model.safetensors` atomically (temp folder, then rename).

    An existing `out_dir` is replaced only if it is empty or already a drafter checkpoint."""
    out = Path(out_dir)
    if out.exists() and not (out.is_dir() and (not any(out.iterdir()) or _is_drafter_dir(out))):
        raise CheckpointError(
            f"{out}: exists and is not a drafter checkpoint; refusing to overwrite it, "
            "choose another output path"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        os.chmod(tmp, 0o755)
        tensors = {k: v.detach().cpu().contiguous() for k, v in drafter.state_dict().items()}
        weights = (t for t in tensors.values() if t.is_floating_point())  # not draft_token_ids
        dtype = str(next(weights).dtype).removeprefix("torch.")
        config = {"architectures": ["Drafter"], **drafter.config.to_dict(), "torch_dtype": dtype}
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        save_file(tensors, str(tmp / SAFETENSORS), metadata={"format": "pt"})
        if out.exists():
            old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
            os.rename(out, old)
            try:
                os.rename(tmp, out)
            except OSError:
                os.rename(old, out)  # put the previous drafter back
                raise
            shutil.rmtree(old)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def init_drafter(
    base_config: BaseModelConfig,
    *,
    seed: int = 0,
    exit_dim: int | None = None,
    num_layers: int = 1,
) -> Drafter:
    """A randomly initialised drafter that fits `base_config` (exit_dim defaults to 2E).

    PyTorch's default Linear init (uniform, ±1/sqrt(fan_in)) gives logits of spread ~0.5 on
    unit-RMS inputs: distinct, non-degenerate draft distributions before any training. The
    global RNG is left untouched."""
    config = DrafterConfig(
        vocab_size=base_config.vocab_size,
        hidden_size=base_config.hidden_size,
        exit_dim=2 * base_config.hidden_size if exit_dim is None else exit_dim,
        num_draft_layers=num_layers,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        drafter = Drafter(config)
    return drafter.eval()
