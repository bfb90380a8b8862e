"""Reading and writing Karpathy's llama2.c `.bin` checkpoints (v0 and v1 headers).

llama2.c's `run.c` rotates pairs (i, i+1) and its `export.py` permutes HF weights into that
interleaved layout before writing, so q/k rows are converted on the way in and out.
"""

from __future__ import annotations

import os
import struct
import uuid
from pathlib import Path

import numpy as np
import torch

from redrafter.config import BaseModelConfig
from redrafter.errors import CheckpointError, ConfigError
from redrafter.models.llama import (
    Transformer,
    half_to_interleaved,
    interleaved_to_half,
    rope_inv_freq,
)

LLAMA2C_MAGIC = 0x616B3432  # "ak42" as a little-endian uint32
LLAMA2C_HEADER_V1 = 256

# Per-file layout (all fp32, little-endian; verified against karpathy/llama2.c export.py/run.c):
# v0: 7 int32 header (vocab < 0 means an untied classifier), token_embedding, rms_att[Lyr],
#     wq, wk, wv, wo [Lyr each], rms_ffn[Lyr], w1, w2, w3 [Lyr each], rms_final,
#     freq_cis_real, freq_cis_imag (seq_len x D/2 each, unused), then wcls if untied.
# v1: 256-byte header (magic, version=1, 7 int32, uint8 shared_classifier), rms_att[Lyr],
#     rms_ffn[Lyr], rms_final, tok_embeddings, wq, wk, wv, wo, w1, w2, w3 [Lyr each], then output
#     if not shared. w1 = gate, w2 = down, w3 = up; wq/wk rows are in the interleaved layout.


def llama2c_header(path: Path) -> tuple[BaseModelConfig, int, bool]:
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


def llama2c_read(path: Path) -> tuple[BaseModelConfig, dict[str, torch.Tensor]]:
    config, version, _ = llama2c_header(path)
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
