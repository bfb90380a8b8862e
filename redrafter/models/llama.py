"""The Llama-family decoder (Llama, Mistral, Qwen2, Qwen3, Phi-3, SmolLM; Gemma 2/3 with the
layers of gemma.py): RMSNorm, RoPE (with Llama-3, linear or LongRoPE scaling), grouped-query
attention with per-layer sliding windows, SwiGLU (GeGLU) MLP, tied or untied embeddings,
optional q/k/v bias, optional per-head q/k RMSNorm (Qwen3, Gemma 3).

Dimensions: B batch, T new tokens, S cache capacity, P committed length, Hq/Hkv heads,
D head dim, E hidden size, F MLP size, V vocab, Lyr layers.

Parameter names equal Hugging Face's (`model.layers.0.self_attn.q_proj.weight`, ...), so a HF
state dict loads after an explicit key-set check (`checkpoints.py`). `forward` has static shapes
and no data-dependent Python control flow: it is what gets exported. Phi-3's fused `qkv_proj`
and `gate_up_proj` are split into these names by the loader, so one module serves every family.

LongRoPE (Phi-3/3.5 `rope_scaling` type `longrope`, formerly `su`): two frequency tables,
1 / (short_factor[j] · θ^(2j/D)) and the same with long_factor, and cos/sin multiplied by the
config's attention factor. We pick the table per token: position p uses the long one iff
p >= O (`original_max_position_embeddings`). That does not depend on how tokens are grouped
into calls, so chunked prefill, padded batches and tree verification (whose tokens run ahead
of the committed length) rotate a position the same way, and speculative decoding keeps
emitting the autoregressive tokens. transformers' model picks one table per forward call (long
when the call's largest position + 1 > O) and keeps cached keys as they were rotated: for a
prompt of at most O tokens, then one token per call, that is exactly our rule. Two places
differ: a prompt longer than O, which transformers rotates entirely with the long table in
its one prefill call, keeps the short table for positions < O here; and Phi-3's `generate`
drops its cache once the sequence exceeds O and recomputes it with the long table, so its
tokens after that point are not ours. Matching it would take re-rotating (or re-filling) each
row's cache when it crosses O, which our fixed-cache runtimes do not do.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from redrafter.config import BaseModelConfig
from redrafter.models.attention import tree_attention


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 as HF does, so fp16 runs do not overflow the mean of squares.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_inv_freq(
    config: BaseModelConfig, *, long: bool = False, local: bool = False
) -> torch.Tensor:
    """Rotary inverse frequencies (D/2,), with Llama-3, linear (Gemma 3) scaling or LongRoPE's
    short factors (`long=True`: its long factors) when configured; `local=True`: Gemma 3's
    sliding layers' table (base rope_local_base_freq, no scaling).

    Computed in float64 on the host and stored as a constant: no `1/x` in the exported graph
    (Core ML lowers `1/x` with an epsilon that shifts the frequencies).
    """
    D = config.dim_per_head
    theta = config.rope_local_base_freq if local else config.rope_theta
    assert theta is not None
    inv = torch.exp(-math.log(theta) * torch.arange(0, D, 2, dtype=torch.float64) / D)
    rs = None if local else config.rope_scaling
    if rs is not None and config.rope_type == "linear":  # positions divided by the factor
        inv = inv / rs["factor"]
    elif rs is not None and config.rope_type == "freq_factors":  # GGUF's rope_freqs
        inv = inv / torch.tensor(rs["factors"], dtype=torch.float64)
    elif config.rope_type == "longrope":  # LongRoPE: each frequency divided by its own factor
        assert rs is not None
        factors = torch.tensor(rs["long_factor" if long else "short_factor"], dtype=torch.float64)
        inv = inv / factors
    elif rs is not None:  # Llama 3.1: stretch low frequencies, keep high ones, blend between.
        factor, lo, hi = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
        old_ctx = rs["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        smooth = (old_ctx / wavelen - lo) / (hi - lo)
        blended = (1 - smooth) * inv / factor + smooth * inv
        inv = torch.where(wavelen > old_ctx / lo, inv / factor, inv)
        mid = (wavelen <= old_ctx / lo) & (wavelen >= old_ctx / hi)
        inv = torch.where(mid, blended, inv)
    return inv.float()


class Attention(nn.Module):
    def __init__(
        self, config: BaseModelConfig, layer: int = 0, norm: type[nn.Module] = RMSNorm
    ) -> None:
        super().__init__()
        E, D = config.hidden_size, config.dim_per_head
        self.n_heads, self.n_kv_heads, self.head_dim = (
            config.num_attention_heads,
            config.kv_heads,
            D,
        )
        self.q_proj = nn.Linear(E, self.n_heads * D, bias=config.qkv_bias)
        self.k_proj = nn.Linear(E, self.n_kv_heads * D, bias=config.qkv_bias)
        self.v_proj = nn.Linear(E, self.n_kv_heads * D, bias=config.qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * D, E, bias=config.o_bias)
        # Qwen3, Gemma 3: each head of q and k is RMS-normalised over D (one weight shared by
        # the heads) before the rotary, which the attention op applies.
        self.q_norm = norm(D, config.rms_norm_eps) if config.qk_norm else None
        self.k_norm = norm(D, config.rms_norm_eps) if config.qk_norm else None
        # The tree-attention implementation (op version 2: projections and rotary table in):
        # the eager in-place reference by default; export swaps in a custom op (one node).
        self.op: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = tree_attention
        # The op's attributes beyond the default scale 1/sqrt(D): only those this layer sets
        # are passed, so an op that lacks one fails loudly on a layer that needs it (training's
        # one-token attention implements all three: train/teacher.py).
        self.op_attributes: dict[str, float | int] = {}
        if config.attention_scale is not None:  # Gemma: query_pre_attn_scalar**-0.5
            self.op_attributes["scale"] = config.attention_scale
        if config.layer_window(layer):
            self.op_attributes["window"] = config.layer_window(layer)
        if config.is_gemma and config.attn_logit_softcapping:  # Gemma 2
            self.op_attributes["softcap"] = float(config.attn_logit_softcapping)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        tree_mask: torch.Tensor,
        past_len: torch.Tensor,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns the attention output (B, T, E) and the updated caches (B, Hkv, S, D).
        cos, sin: (B, T, D) rotary table of the new tokens' positions."""
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)  # (B, T, H*D), before rotary
        if self.q_norm is not None and self.k_norm is not None:
            D = self.head_dim
            q = self.q_norm(q.unflatten(-1, (-1, D))).flatten(-2)  # (B, T, Hq*D)
            k = self.k_norm(k.unflatten(-1, (-1, D))).flatten(-2)  # (B, T, Hkv*D)
        out, key_cache, value_cache = self.op(
            q, k, v, key_cache, value_cache, past_len, tree_mask, cos, sin, **self.op_attributes
        )  # out (B, T, Hq*D)
        return self.o_proj(out), key_cache, value_cache


class MLP(nn.Module):
    def __init__(self, config: BaseModelConfig) -> None:
        super().__init__()
        E, Fd, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(E, Fd, bias=bias)
        self.up_proj = nn.Linear(E, Fd, bias=bias)
        self.down_proj = nn.Linear(Fd, E, bias=bias)

        # SwiGLU, or Gemma's GeGLU (transformers' gelu_pytorch_tanh).
        self.gelu = config.activation == "gelu_pytorch_tanh"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.gate_proj(x)
        gate = F.gelu(g, approximate="tanh") if self.gelu else F.silu(g)
        return self.down_proj(gate * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: BaseModelConfig, layer: int = 0) -> None:
        super().__init__()
        self.self_attn = Attention(config, layer)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self, x: torch.Tensor, *attn_args: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h, key_cache, value_cache = self.self_attn(self.input_layernorm(x), *attn_args)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x)), key_cache, value_cache


class Backbone(nn.Module):
    """HF's `model.*` submodule: embeddings, layers, final norm."""

    def __init__(self, config: BaseModelConfig) -> None:
        super().__init__()
        layer_cls: Callable[[BaseModelConfig, int], nn.Module] = DecoderLayer
        norm_cls: type[nn.Module] = RMSNorm
        if config.is_gemma:  # gemma.py builds its layer from this module's Attention and MLP
            from redrafter.models.gemma import GemmaDecoderLayer, GemmaRMSNorm

            layer_cls, norm_cls = GemmaDecoderLayer, GemmaRMSNorm
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(layer_cls(config, i) for i in range(config.num_hidden_layers))
        self.norm = norm_cls(config.hidden_size, config.rms_norm_eps)


class Transformer(nn.Module):
    """A decoder LLM whose forward verifies a token tree against a preallocated KV cache."""

    def __init__(self, config: BaseModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = Backbone(config)
        self.lm_head = (
            None
            if config.tie_word_embeddings
            else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        )
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)
        # LongRoPE: the long table, used from position `rope_long_from` on (module docstring).
        self.rope_long_from = config.rope_long_from
        self.rope_factor = config.rope_attention_factor
        long = None if self.rope_long_from is None else rope_inv_freq(config, long=True)
        self.register_buffer("inv_freq_long", long, persistent=False)
        # Gemma 3: sliding layers rotate with their own base (layer_local_rope).
        self.local_rope = [config.layer_local_rope(i) for i in range(config.num_hidden_layers)]
        local = rope_inv_freq(config, local=True) if any(self.local_rope) else None
        self.register_buffer("inv_freq_local", local, persistent=False)

    @property
    def embed_weight(self) -> torch.Tensor:
        """The token embedding table (V, E), shared with the drafter."""
        return self.model.embed_tokens.weight

    def new_cache(
        self, batch: int, capacity: int, dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """A zeroed stacked KV cache (Lyr, 2, B, Hkv, S, D): [layer, 0] keys, [layer, 1] values."""
        c = self.config
        return torch.zeros(
            c.num_hidden_layers, 2, batch, c.kv_heads, capacity, c.dim_per_head, dtype=dtype
        )

    @staticmethod
    def layer_caches(cache: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per-layer (key, value) views of a stacked cache; writes to them land in `cache`."""
        return [(cache[i, 0], cache[i, 1]) for i in range(cache.shape[0])]

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        tree_mask: torch.Tensor,
        past_len: torch.Tensor,
        caches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """Post-final-norm hidden states (B, T, E) and the updated per-layer caches.

        input_ids, position_ids: (B, T) int64; tree_mask: (B, T, T) bool (true = may attend);
        past_len: (B,) int64 committed length P per row; caches: one (key, value) pair of
        (B, Hkv, S, D) per layer. The eager attention writes them in place and returns them.
        """
        x = self.model.embed_tokens(input_ids)  # (B, T, E)
        if self.config.embed_scale is not None:  # Gemma: sqrt(E), rounded to x's dtype as HF
            x = x * torch.tensor(self.config.embed_scale, dtype=x.dtype)
        tables = {False: self.rotary_table(position_ids, x.dtype)}  # (B, T, D) cos, sin
        if self.inv_freq_local is not None:
            tables[True] = self.rotary_table(position_ids, x.dtype, local=True)
        new_caches = []
        for i, (layer, (key_cache, value_cache)) in enumerate(
            zip(self.model.layers, caches, strict=True)
        ):
            cos, sin = tables[self.local_rope[i]]
            x, key_cache, value_cache = layer(
                x, cos, sin, tree_mask, past_len, key_cache, value_cache
            )
            new_caches.append((key_cache, value_cache))
        return self.model.norm(x), new_caches

    def rotary_table(
        self, position_ids: torch.Tensor, dtype: torch.dtype, *, local: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (B, T, D) in `dtype` of positions (B, T) int64, computed in fp32;
        `local`: Gemma 3's sliding layers' table."""
        positions = position_ids[..., None].float()  # (B, T, 1)
        if local:
            angles = torch.cat([positions * self.inv_freq_local] * 2, dim=-1)  # (B, T, D)
            return angles.cos().to(dtype), angles.sin().to(dtype)
        angles = positions * self.inv_freq  # (B, T, D/2)
        if self.inv_freq_long is not None:  # LongRoPE: long factors from rope_long_from on
            assert self.rope_long_from is not None
            long = position_ids[..., None] >= self.rope_long_from  # (B, T, 1)
            angles = torch.where(long, positions * self.inv_freq_long, angles)  # (B, T, D/2)
        angles = torch.cat((angles, angles), dim=-1)  # (B, T, D)
        cos, sin = angles.cos(), angles.sin()
        if self.rope_factor != 1.0:
            cos, sin = cos * self.rope_factor, sin * self.rope_factor
        return cos.to(dtype), sin.to(dtype)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """LM head: (..., E) -> (..., V)."""
        weight = self.embed_weight if self.lm_head is None else self.lm_head.weight
        logits = F.linear(hidden, weight)
        cap = self.config.final_logit_softcapping if self.config.is_gemma else None
        return logits if not cap else cap * torch.tanh(logits / cap)  # Gemma 2's cap

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        tree_mask: torch.Tensor,
        past_len: torch.Tensor,
        caches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    ) -> tuple[torch.Tensor, torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """Returns logits (B, T, V), post-final-norm hidden states (B, T, E) and the caches."""
        hidden, caches = self.hidden_states(input_ids, position_ids, tree_mask, past_len, caches)
        return self.logits(hidden), hidden, caches


def interleaved_to_half(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Rows of q/k (weight (H*D, in) or bias (H*D,)) from interleaved rotary pairs (2j, 2j+1),
    Meta/llama.cpp/llama2.c, to HF's rotate_half pairs (j, j+D/2)."""
    out = w.shape[0]
    return w.reshape(n_heads, out // n_heads // 2, 2, -1).swapaxes(1, 2).reshape(w.shape)


def half_to_interleaved(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of `interleaved_to_half` (HF -> Meta layout), used by the writers."""
    out = w.shape[0]
    return w.reshape(n_heads, 2, out // n_heads // 2, -1).swapaxes(1, 2).reshape(w.shape)
