"""Gemma 2 and Gemma 3 (text) decoder layers, built from the Llama family's `Attention` and `MLP`
(models/llama.py), which read the family's differences from the config.

Dimensions: B batch, T new tokens, E hidden size.

What differs from Llama, as transformers' modeling_gemma2.py / modeling_gemma3.py compute it:

* RMSNorm scales by (1 + weight) (weights stored centred on 0), in float32, and rounds once;
* four norms per layer: input and post-attention around the attention, pre- and post-feed-forward
  around the MLP, each post-norm applied to the branch before the residual add;
* GeGLU (gelu with the tanh approximation), an embedding scaled by sqrt(E), the attention scale
  query_pre_attn_scalar**-0.5 and a head_dim of its own (Attention, config.py);
* sliding-window layers interleaved with global ones (`BaseModelConfig.layer_window`): Gemma 2
  alternates, Gemma 3 makes every 6th layer global, and rotates its sliding layers with
  rope_local_base_freq (`Transformer.local_rope`), its global ones with rope_theta and linear
  rope scaling;
* Gemma 2 soft-caps attention scores (the TreeAttention op's `softcap`) and the final logits
  (`Transformer.logits`); Gemma 3 RMS-normalises q and k per head instead.
"""

from __future__ import annotations

import torch
from torch import nn

from redrafter.config import BaseModelConfig
from redrafter.models.llama import MLP, Attention


class GemmaRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))  # the scale is 1 + weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # HF: (x_normed * (1 + w)) in float32, then x's dtype (Llama rounds before the weight).
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * (1.0 + self.weight.float())).to(x.dtype)


class GemmaDecoderLayer(nn.Module):
    def __init__(self, config: BaseModelConfig, layer: int) -> None:
        super().__init__()
        E, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = Attention(config, layer, norm=GemmaRMSNorm)
        self.mlp = MLP(config)
        self.input_layernorm = GemmaRMSNorm(E, eps)
        self.post_attention_layernorm = GemmaRMSNorm(E, eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(E, eps)
        self.post_feedforward_layernorm = GemmaRMSNorm(E, eps)

    def forward(
        self, x: torch.Tensor, *attn_args: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: (B, T, E); attn_args as `Attention.forward`'s. Returns (B, T, E) and the caches."""
        h, key_cache, value_cache = self.self_attn(self.input_layernorm(x), *attn_args)
        x = x + self.post_attention_layernorm(h)  # (B, T, E)
        h = self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        return x + h, key_cache, value_cache
