"""Frozen configs and run-time knobs.

`BaseModelConfig` and `DrafterConfig` are read from a checkpoint's `config.json` and keep the
Hugging Face / Apple field names; unknown keys are ignored and bad values are rejected by name.
`BeamShape` and `SamplingParams` are the small value objects threaded through decoding.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
from pathlib import Path
from typing import Any, Literal

from redrafter.errors import ConfigError, UnsupportedModelError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3_text")
GEMMA_TYPES = ("gemma2", "gemma3_text")
# Gemma 3's image-text checkpoints (Gemma3ForConditionalGeneration: 4B, 12B, 27B) say
# model_type "gemma3" and nest the language model's config in `text_config`; we decode their
# language model (`gemma3_text_raw`, checkpoints.gemma3_language_model).
GEMMA3_IMAGE_TEXT = "gemma3"
# transformers' Gemma3TextConfig defaults. An image-text checkpoint's config.json writes its
# `text_config` as a diff against them (Google's 4B holds 6 keys), so they fill the rest.
GEMMA3_TEXT_DEFAULTS: dict[str, Any] = {
    "vocab_size": 262_208,
    "hidden_size": 2304,
    "intermediate_size": 9216,
    "num_hidden_layers": 26,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 256,
    "hidden_activation": "gelu_pytorch_tanh",
    "max_position_embeddings": 131_072,
    "rms_norm_eps": 1e-6,
    "pad_token_id": 0,
    "eos_token_id": 1,
    "bos_token_id": 2,
    "tie_word_embeddings": True,
    "attention_bias": False,
    "query_pre_attn_scalar": 256,
    "sliding_window": 4096,
    "sliding_window_pattern": 6,
    "final_logit_softcapping": None,
    "attn_logit_softcapping": None,
    "rope_theta": 1_000_000.0,
    "rope_local_base_freq": 10_000.0,
}
# rope_scaling types we implement (besides none/default); `linear` (positions divided by
# `factor`) is Gemma 3's global layers'.
# `freq_factors` (one divisor per rotary frequency) is llama.cpp's form of Llama-3 scaling
# (GGUF's rope_freqs tensor, models/gguf.py).
ROPE_TYPES = ("llama3", "longrope", "linear", "freq_factors")
# Phi3Config's default for its top-level original_max_position_embeddings, which transformers
# gives priority over the value inside rope_scaling (LongRoPE's switch-over length).
PHI3_ORIGINAL_CONTEXT = 4096
DRAFTER_MODEL_TYPE = "recurrent_drafting_drafter"
TOP_K = 50  # Apple's warp: both the drafter's and the LLM's logits are cut to their top 50.
LOG_0 = -50000.0  # Apple's stand-in for log(0): masked logits and the initial beam scores.
# A beam slot past the end of a shorter draft (a pruned drafter beam, a lookup beam that ends
# early): packing gives it no tree token and acceptance never accepts it.
NO_TOKEN = -1

# Upper bounds on sizes read from untrusted configs (config.json, GGUF metadata, llama2.c
# headers, drafter configs, CLI flags), each far above any released model's, so a hostile or
# corrupt value is refused with one line instead of an allocator failure. The tensors in the
# file are still checked against the config before any module is built (checkpoints.py).
MAX_SIZES = {
    "vocab_size": 1 << 21,  # 2.1M (the largest released vocabularies are ~260k)
    "hidden_size": 1 << 16,
    "intermediate_size": 1 << 18,
    "num_hidden_layers": 1024,
    "num_attention_heads": 1024,
    "num_key_value_heads": 1024,
    "head_dim": 4096,
    "max_position_embeddings": 1 << 24,  # 16M positions
    "original_max_position_embeddings": 1 << 24,
    "exit_dim": 1 << 17,
    "num_draft_layers": 256,
    "draft_vocab_size": 1 << 21,
}
MAX_SEED = 2**63 - 1  # numpy's Generator takes any non-negative int; keep it to 64 bits


def _finite_real(value: Any) -> bool:
    """A finite real number, not a bool (True would pass as 1)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _check_caps(obj: Any, *fields: str) -> None:
    for name in fields:
        value, cap = getattr(obj, name), MAX_SIZES[name]
        if isinstance(value, int) and value > cap:
            raise ConfigError(
                f"config field {name}={value!r} exceeds the limit {cap}; the config is corrupt "
                "or not meant for this tool (fix the value)"
            )


def _from_dict(cls: type, raw: dict[str, Any], where: str) -> Any:
    """Build a dataclass from a dict, ignoring unknown keys and naming missing ones."""
    names = {f.name for f in dataclasses.fields(cls)}
    required = {
        f.name
        for f in dataclasses.fields(cls)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    }
    missing = sorted(required - raw.keys())
    if missing:
        raise ConfigError(f"{where}: missing required field(s) {missing}; add them to config.json")
    return cls(**{k: v for k, v in raw.items() if k in names})


def _read_json(path: Path) -> dict[str, Any]:
    try:
        raw = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: config.json not found; point at a checkpoint folder") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e}); fix or re-export the config") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a JSON object at the top level")
    return raw


def _longrope_attention_factor(rs: dict[str, Any], max_position_embeddings: int) -> float:
    """LongRoPE's cos/sin multiplier (transformers' `attention_factor`): the config's value,
    else sqrt(1 + ln(s) / ln(original)) with s = `factor`, or max_position_embeddings /
    original when the config has no `factor` (Phi-3's way), and 1 when s <= 1."""
    if rs.get("attention_factor") is not None:
        return float(rs["attention_factor"])
    original = rs["original_max_position_embeddings"]
    factor = rs.get("factor") or max_position_embeddings / original
    if factor <= 1.0:
        return 1.0
    if original <= 1:
        return math.inf  # ln(1) = 0: the caller refuses it
    return math.sqrt(1 + math.log(factor) / math.log(original))


def gemma3_text_raw(raw: dict[str, Any], where: str = "config.json") -> dict[str, Any]:
    """The language model's config of a Gemma 3 image-text checkpoint (model_type "gemma3"):
    its `text_config` over `GEMMA3_TEXT_DEFAULTS`, as model_type "gemma3_text". The top level's
    special token ids win (Google's instruction-tuned checkpoints end turns with
    `eos_token_id: [1, 106]` there). The vision tower's config is not read."""
    text = raw.get("text_config")
    if not isinstance(text, dict):
        raise ConfigError(
            f"{where}: model_type 'gemma3' needs a 'text_config' object (its language model's "
            "config); re-save the checkpoint with transformers"
        )
    if text.get("model_type", "gemma3_text") != "gemma3_text":
        raise UnsupportedModelError(
            f"{where}: text_config.model_type {text['model_type']!r} is not 'gemma3_text'; "
            "only Gemma 3's own language model is supported"
        )
    out = {**GEMMA3_TEXT_DEFAULTS, **text, "model_type": "gemma3_text"}
    if "layer_types" in text or "_sliding_window_pattern" in text:
        out.pop("sliding_window_pattern")  # the file says which layers slide
    if "rope_parameters" in text:  # transformers 5: the bases are in there
        out.pop("rope_theta")
        out.pop("rope_local_base_freq")
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if raw.get(key) is not None:
            out[key] = raw[key]
    return out


def _gemma_raw(raw: dict[str, Any]) -> dict[str, Any]:
    """A Gemma config.json in our terms: transformers' defaults where the file relies on them
    (tied embeddings, Gemma 3's two rotary bases), transformers 5's per-layer-type
    `rope_parameters` (Gemma 3) read into rope_theta / rope_scaling (global layers) and
    rope_local_base_freq (sliding layers), and transformers 4's `_sliding_window_pattern`."""
    raw = dict(raw)
    raw.setdefault("tie_word_embeddings", True)
    raw.setdefault("query_pre_attn_scalar", 256)
    if "_sliding_window_pattern" in raw:
        raw.setdefault("sliding_window_pattern", raw["_sliding_window_pattern"])
    rope = raw.get("rope_parameters")
    if isinstance(rope, dict) and "full_attention" in rope:
        full, local = rope.get("full_attention") or {}, rope.get("sliding_attention") or {}
        raw.pop("rope_parameters")
        if "rope_theta" in full:
            raw.setdefault("rope_theta", full["rope_theta"])
        if full.get("rope_type", full.get("type", "default")) != "default":
            raw.setdefault("rope_scaling", full)
        if "rope_theta" in local:
            raw.setdefault("rope_local_base_freq", local["rope_theta"])
    if raw["model_type"] == "gemma3_text":
        raw.setdefault("rope_theta", 1_000_000.0)
        raw.setdefault("rope_local_base_freq", 10_000.0)
    return raw


def _check_positive_int(obj: Any, *fields: str) -> None:
    for name in fields:
        value = getattr(obj, name)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ConfigError(f"config field {name}={value!r} must be a positive integer")


@dataclasses.dataclass(frozen=True)
class BaseModelConfig:
    """A Llama-family decoder (Llama, Mistral, Qwen2, Qwen3, Phi-3/3.5, SmolLM, Gemma 2,
    Gemma 3 text; a Gemma 3 image-text config reads as its language model's) in HF `config.json`
    terms.

    Family differences the model and loader read from here: Qwen2's q/k/v biases
    (`qkv_bias`), Qwen3's per-head q/k RMSNorm (`qk_norm`), Phi-3's fused `qkv_proj` and
    `gate_up_proj` tensors (split by the loader, checkpoints.py) and its LongRoPE scaling
    (`rope_scaling` of type `longrope`, old name `su`; see `rope_long_from`)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    model_type: str = "llama"
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"
    sliding_window: int | None = None
    # Which layers use the window: transformers' per-layer list ("sliding_attention" /
    # "full_attention"), else the family's rule (`layer_window`); Qwen2/Qwen3 window the layers
    # from max_window_layers on.
    layer_types: list[str] | None = None
    max_window_layers: int | None = None
    use_sliding_window: bool | None = None  # Qwen2/Qwen3: the window applies only when true
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    # Phi-3's pretraining context: LongRoPE's long factors apply from this position on.
    original_max_position_embeddings: int | None = None
    partial_rotary_factor: float = 1.0
    # Gemma 2/3: the attention scale is query_pre_attn_scalar**-0.5; scores (Gemma 2) and
    # logits are soft-capped when set; GeGLU's activation; Gemma 3's sliding layers rotate with
    # their own base (`rope_local_base_freq`); bidirectional attention (Gemma 3's vision
    # variant) is refused.
    query_pre_attn_scalar: float | None = None
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    hidden_activation: str | None = None
    rope_local_base_freq: float | None = None
    sliding_window_pattern: int | None = None
    use_bidirectional_attention: bool | None = None

    def __post_init__(self) -> None:
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModelError(
                f"unsupported model_type {self.model_type!r}; supported: "
                + ", ".join((*SUPPORTED_MODEL_TYPES, GEMMA3_IMAGE_TEXT))
            )
        _check_positive_int(
            self,
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "max_position_embeddings",
        )
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        _check_positive_int(self, "num_key_value_heads")
        if self.num_attention_heads % self.kv_heads:
            raise ConfigError(
                f"config field num_key_value_heads={self.kv_heads} must divide "
                f"num_attention_heads={self.num_attention_heads}"
            )
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ConfigError(
                    f"config field hidden_size={self.hidden_size} is not divisible by "
                    f"num_attention_heads={self.num_attention_heads}; set head_dim explicitly"
                )
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        _check_positive_int(self, "head_dim")
        _check_caps(
            self,
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "max_position_embeddings",
        )
        if self.head_dim % 2:
            raise ConfigError(f"config field head_dim={self.head_dim} must be even for RoPE")
        if self.activation != ("gelu_pytorch_tanh" if self.is_gemma else "silu"):
            raise UnsupportedModelError(
                f"unsupported hidden activation {self.activation!r} for {self.model_type}; "
                "supported: 'silu' (SwiGLU), and 'gelu_pytorch_tanh' (GeGLU) for Gemma"
            )
        if self.use_bidirectional_attention:
            raise UnsupportedModelError(
                "config field use_bidirectional_attention=true is not supported; only causal "
                "decoders (Gemma 3 text) are"
            )
        for name in (
            "query_pre_attn_scalar",
            "attn_logit_softcapping",
            "final_logit_softcapping",
            "rope_local_base_freq",
        ):
            value = getattr(self, name)
            if value is not None and not (_finite_real(value) and value > 0):
                raise ConfigError(f"config field {name}={value!r} must be a number > 0 (or null)")
        if self.sliding_window_pattern is not None:
            _check_positive_int(self, "sliding_window_pattern")
        if not (isinstance(self.rms_norm_eps, (int, float)) and self.rms_norm_eps > 0):
            raise ConfigError(f"config field rms_norm_eps={self.rms_norm_eps!r} must be > 0")
        if not (isinstance(self.rope_theta, (int, float)) and self.rope_theta > 0):
            raise ConfigError(f"config field rope_theta={self.rope_theta!r} must be > 0")
        if self.partial_rotary_factor is None:  # written as null: transformers' default
            object.__setattr__(self, "partial_rotary_factor", 1.0)
        if self.partial_rotary_factor != 1.0:
            raise UnsupportedModelError(
                f"config field partial_rotary_factor={self.partial_rotary_factor!r} is not "
                "supported; only rotary over the whole head (1.0) is"
            )
        if self.sliding_window is not None:
            _check_positive_int(self, "sliding_window")
        if self.max_window_layers is not None and (
            isinstance(self.max_window_layers, bool)
            or not isinstance(self.max_window_layers, int)
            or self.max_window_layers < 0
        ):
            raise ConfigError(
                f"config field max_window_layers={self.max_window_layers!r} must be an integer >= 0"
            )
        if self.layer_types is not None:
            kinds = ("sliding_attention", "full_attention")
            if (
                not isinstance(self.layer_types, list)
                or len(self.layer_types) != self.num_hidden_layers
                or any(t not in kinds for t in self.layer_types)
            ):
                raise ConfigError(
                    f"config field layer_types={self.layer_types!r} must list "
                    f"num_hidden_layers={self.num_hidden_layers} entries, each one of {kinds}"
                )
        if self.original_max_position_embeddings is None and self.model_type == "phi3":
            object.__setattr__(self, "original_max_position_embeddings", PHI3_ORIGINAL_CONTEXT)
        if self.original_max_position_embeddings is not None:
            _check_positive_int(self, "original_max_position_embeddings")
            _check_caps(self, "original_max_position_embeddings")
        if self.rope_scaling is not None:
            object.__setattr__(self, "rope_scaling", self._checked_rope_scaling(self.rope_scaling))

    def _checked_rope_scaling(self, rs: Any) -> dict[str, Any] | None:
        """`rope_scaling` validated and normalised: None for `default`, `rope_type` always set,
        Phi-3's old names (`su`, and `yarn`, which transformers' Phi3Config also reads as
        LongRoPE) renamed `longrope`, LongRoPE's switch-over length resolved."""
        if not isinstance(rs, dict):
            raise ConfigError(f"config field rope_scaling={rs!r} must be an object (or null)")
        kind = rs.get("rope_type", rs.get("type"))
        if kind in (None, "default"):
            return None
        if self.model_type == "phi3" and kind in ("su", "yarn"):
            kind = "longrope"
        if kind not in ROPE_TYPES:
            raise UnsupportedModelError(
                f"unsupported rope_scaling type {kind!r}; supported: {', '.join(ROPE_TYPES)} "
                "(or none)"
            )
        rs = {**rs, "rope_type": kind}
        rs.pop("type", None)
        # transformers takes the pretraining length from the top-level field when the config
        # has one (Phi-3 always does), over the value inside rope_scaling.
        if self.original_max_position_embeddings is not None:
            rs["original_max_position_embeddings"] = self.original_max_position_embeddings
        if kind == "freq_factors":
            factors, half = rs.get("factors"), self.dim_per_head // 2
            if not (
                isinstance(factors, list)
                and len(factors) == half
                and all(_finite_real(f) and f > 0 for f in factors)
            ):
                shown = f"{len(factors)} values" if isinstance(factors, list) else repr(factors)
                raise ConfigError(
                    f"rope_freqs ({shown}) must hold head_dim/2 = {half} positive numbers"
                )
            return rs
        if kind == "linear":
            factor = rs.get("factor")
            if not (_finite_real(factor) and factor > 0):
                raise ConfigError(f"config rope_scaling factor={factor!r} must be a number > 0")
            return rs
        if kind == "llama3":
            for key in (
                "factor",
                "low_freq_factor",
                "high_freq_factor",
                "original_max_position_embeddings",
            ):
                if key not in rs:
                    raise ConfigError(f"config rope_scaling is missing {key!r} for llama3")
            return rs
        rs.setdefault("original_max_position_embeddings", self.max_position_embeddings)
        original = rs["original_max_position_embeddings"]
        if isinstance(original, bool) or not isinstance(original, int) or original < 1:
            raise ConfigError(
                f"config rope_scaling original_max_position_embeddings={original!r} must be a "
                "positive integer"
            )
        half = self.dim_per_head // 2
        for key in ("short_factor", "long_factor"):
            factors = rs.get(key)
            if not (
                isinstance(factors, list)
                and len(factors) == half
                and all(_finite_real(f) and f > 0 for f in factors)
            ):
                shown = f"{len(factors)} values" if isinstance(factors, list) else repr(factors)
                raise ConfigError(
                    f"config rope_scaling {key} ({shown}) must be a list of head_dim/2 = {half} "
                    "positive numbers for longrope"
                )
        for key in ("factor", "attention_factor"):
            value = rs.get(key)
            if value is not None and not (_finite_real(value) and value > 0):
                raise ConfigError(f"config rope_scaling {key}={value!r} must be a number > 0")
        if not math.isfinite(_longrope_attention_factor(rs, self.max_position_embeddings)):
            raise ConfigError(
                f"config rope_scaling original_max_position_embeddings={original} gives no finite "
                "attention factor; set rope_scaling attention_factor explicitly"
            )
        return rs

    @property
    def kv_heads(self) -> int:
        assert self.num_key_value_heads is not None
        return self.num_key_value_heads

    @property
    def dim_per_head(self) -> int:
        assert self.head_dim is not None
        return self.head_dim

    @property
    def qkv_bias(self) -> bool:
        """Qwen2 always has q/k/v biases (its config has no flag for it)."""
        return self.attention_bias or self.model_type == "qwen2"

    @property
    def o_bias(self) -> bool:
        return self.attention_bias and self.model_type != "qwen2"

    @property
    def qk_norm(self) -> bool:
        """Qwen3 and Gemma 3 RMS-normalise each head of q and k (over D) before the rotary."""
        return self.model_type in ("qwen3", "gemma3_text")

    @property
    def is_gemma(self) -> bool:
        """Gemma 2/3: (1 + weight) RMSNorms, four norms per layer, GeGLU, a scaled embedding."""
        return self.model_type in GEMMA_TYPES

    @property
    def activation(self) -> str:
        """The MLP's gate activation (Gemma's config calls it `hidden_activation`)."""
        if self.is_gemma:
            return self.hidden_activation or "gelu_pytorch_tanh"
        return self.hidden_act

    @property
    def attention_scale(self) -> float | None:
        """The attention's score scale when it is not 1/sqrt(head_dim): Gemma's
        query_pre_attn_scalar**-0.5."""
        if self.query_pre_attn_scalar is None or not self.is_gemma:
            return None
        return float(self.query_pre_attn_scalar) ** -0.5

    @property
    def embed_scale(self) -> float | None:
        """Gemma multiplies the embeddings by sqrt(hidden_size) (in the embedding dtype)."""
        return math.sqrt(self.hidden_size) if self.is_gemma else None

    def layer_local_rope(self, layer: int) -> bool:
        """Whether `layer` rotates with rope_local_base_freq (Gemma 3's sliding layers) instead
        of rope_theta and rope_scaling (every other layer)."""
        return self.rope_local_base_freq is not None and bool(self.layer_window(layer))

    @property
    def rope_type(self) -> str | None:
        """None (plain RoPE), "llama3" or "longrope"."""
        return None if self.rope_scaling is None else self.rope_scaling["rope_type"]

    @property
    def rope_long_from(self) -> int | None:
        """LongRoPE only: the first position rotated with the long factors (positions before
        it use the short ones); None for other rotaries. See `models/llama.py`."""
        if self.rope_type != "longrope":
            return None
        assert self.rope_scaling is not None
        return int(self.rope_scaling["original_max_position_embeddings"])

    @property
    def rope_attention_factor(self) -> float:
        """What cos and sin are multiplied by: LongRoPE's attention factor, else 1."""
        if self.rope_type != "longrope":
            return 1.0
        assert self.rope_scaling is not None
        return _longrope_attention_factor(self.rope_scaling, self.max_position_embeddings)

    @property
    def context_length(self) -> int:
        """Longest sequence the model takes. A sliding window does not cap it: windowed layers
        attend to their last `sliding_window` positions (`layer_window`)."""
        return self.max_position_embeddings

    def layer_window(self, layer: int) -> int:
        """The sliding window of decoder layer `layer` (0: it attends to every position), as
        transformers builds it: the config's `layer_types` when given; else Qwen2/Qwen3 window
        the layers from `max_window_layers` on, and Mistral and Phi-3 every layer."""
        if not self.sliding_window:
            return 0
        if self.layer_types is not None:
            return self.sliding_window if self.layer_types[layer] == "sliding_attention" else 0
        if self.is_gemma:  # every `pattern`-th layer global: Gemma 2 alternates, Gemma 3 by 6
            pattern = self.sliding_window_pattern or (2 if self.model_type == "gemma2" else 6)
            return self.sliding_window if (layer + 1) % pattern else 0
        if self.model_type in ("qwen2", "qwen3"):
            first = 28 if self.max_window_layers is None else self.max_window_layers  # HF's default
            return self.sliding_window if layer >= first else 0
        return self.sliding_window

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        if self.eos_token_id is None:
            return ()
        if isinstance(self.eos_token_id, int):
            return (self.eos_token_id,)
        return tuple(int(t) for t in self.eos_token_id)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], where: str = "config.json") -> BaseModelConfig:
        raw = dict(raw)
        if "model_type" not in raw:
            raise ConfigError(
                f"{where}: missing 'model_type'; expected one of "
                + "/".join((*SUPPORTED_MODEL_TYPES, GEMMA3_IMAGE_TEXT))
            )
        if raw.get("model_type") == DRAFTER_MODEL_TYPE:
            raise UnsupportedModelError(
                f"{where} is a ReDrafter drafter, not a base model; pass it as --drafter"
            )
        if raw.get("model_type") == GEMMA3_IMAGE_TEXT:
            raw = gemma3_text_raw(raw, where)
        if raw.get("model_type") in GEMMA_TYPES:
            raw = _gemma_raw(raw)
        # transformers >= 5 writes rope_theta and the scaling inside `rope_parameters` only.
        rope = raw.get("rope_parameters")
        if isinstance(rope, dict):
            if "rope_theta" in rope:
                raw.setdefault("rope_theta", rope["rope_theta"])
            if rope.get("rope_type", rope.get("type", "default")) != "default":
                raw.setdefault("rope_scaling", rope)
            if "partial_rotary_factor" in rope:
                raw.setdefault("partial_rotary_factor", rope["partial_rotary_factor"])
        # Qwen2/Qwen3 keep `sliding_window` in config.json but use it only when
        # `use_sliding_window` is true (transformers drops it otherwise; its default is false).
        if (
            raw.get("model_type") in ("qwen2", "qwen3")
            and raw.get("use_sliding_window") is not True
        ):
            raw["sliding_window"] = None
        # Wrong-type values must fail by name, not deep inside torch.
        try:
            return _from_dict(cls, raw, where)
        except TypeError as e:
            raise ConfigError(f"{where}: {e}") from None

    @classmethod
    def from_json(cls, path: str | Path) -> BaseModelConfig:
        return cls.from_dict(_read_json(Path(path)), where=str(path))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class DrafterConfig:
    """Apple's ReDrafter drafter config (`model_type: recurrent_drafting_drafter`).

    `draft_vocab_size` is our one extension (absent from Apple's configs, None = Apple's full
    head): the head predicts only that many tokens, and the tensor `draft_token_ids` maps each
    head row to its id in the LLM's vocab (EAGLE-3's reduced draft vocabulary)."""

    vocab_size: int
    hidden_size: int
    exit_dim: int
    num_draft_layers: int
    rnn: bool = True
    num_lookback_tokens: int = 1
    model_type: str = DRAFTER_MODEL_TYPE
    draft_vocab_size: int | None = None

    def __post_init__(self) -> None:
        if self.model_type != DRAFTER_MODEL_TYPE:
            raise UnsupportedModelError(
                f"drafter model_type {self.model_type!r} is not {DRAFTER_MODEL_TYPE!r}; "
                "pass a ReDrafter drafter checkpoint (or make one with `redrafter init-drafter`)"
            )
        _check_positive_int(self, "vocab_size", "hidden_size", "exit_dim")
        if (
            isinstance(self.num_draft_layers, bool)
            or not isinstance(self.num_draft_layers, int)
            or self.num_draft_layers < 0
        ):
            raise ConfigError(
                f"drafter config field num_draft_layers={self.num_draft_layers!r} "
                "must be an integer >= 0"
            )
        _check_caps(self, "vocab_size", "hidden_size", "exit_dim", "num_draft_layers")
        if not self.rnn:
            raise UnsupportedModelError(
                "drafter config rnn=false is not supported; ReDrafter drafters are recurrent"
            )
        if self.draft_vocab_size is not None:
            _check_positive_int(self, "draft_vocab_size")
            _check_caps(self, "draft_vocab_size")
            if self.draft_vocab_size > self.vocab_size:
                raise ConfigError(
                    f"drafter config field draft_vocab_size={self.draft_vocab_size} exceeds "
                    f"vocab_size={self.vocab_size}; use at most the full vocab (or drop it)"
                )

    @property
    def has_input_proj(self) -> bool:
        return self.exit_dim != 2 * self.hidden_size

    @property
    def head_size(self) -> int:
        """Rows of the head's output Linear: the draft vocab, or the full vocab (Apple's)."""
        return self.vocab_size if self.draft_vocab_size is None else self.draft_vocab_size

    @classmethod
    def from_dict(cls, raw: dict[str, Any], where: str = "config.json") -> DrafterConfig:
        if raw.get("model_type") != DRAFTER_MODEL_TYPE:
            raise UnsupportedModelError(
                f"{where}: model_type {raw.get('model_type')!r} is not {DRAFTER_MODEL_TYPE!r}; "
                "pass a ReDrafter drafter checkpoint (or make one with `redrafter init-drafter`)"
            )
        try:
            return _from_dict(cls, raw, where)
        except TypeError as e:
            raise ConfigError(f"{where}: {e}") from None

    @classmethod
    def from_json(cls, path: str | Path) -> DrafterConfig:
        return cls.from_dict(_read_json(Path(path)), where=str(path))

    def to_dict(self) -> dict[str, Any]:
        raw = dataclasses.asdict(self)
        if raw["draft_vocab_size"] is None:
            del raw["draft_vocab_size"]  # a full-vocab drafter's config stays exactly Apple's
        return raw


@dataclasses.dataclass(frozen=True)
class BeamShape:
    """Drafter beam: `width` beams, each `length` tokens long (column 0 is the LLM's token)."""

    width: int = 4
    length: int = 4

    def __post_init__(self) -> None:
        if isinstance(self.width, bool) or not isinstance(self.width, int) or self.width < 1:
            raise ConfigError(f"beam width {self.width!r} must be an integer >= 1")
        if isinstance(self.length, bool) or not isinstance(self.length, int) or self.length < 2:
            raise ConfigError(
                f"beam length {self.length!r} must be an integer >= 2 "
                "(it counts the LLM's own token; 1 would draft nothing)"
            )


Acceptance = Literal["exact", "apple"]


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """`temperature == 0` means greedy. `acceptance` picks the sampling rule:
    `exact` (tree walk that preserves the target distribution) or `apple` (Apple's rule).

    `top_k`, `top_p` (nucleus) and `min_p` shape the LLM's sampling distribution P, in that order
    after the temperature (`decoding.accept.target_probs`); every acceptance rule samples from
    that P, so `exact` stays exact with them. Greedy ignores them (each keeps the argmax). The
    defaults are Apple's top-50 warp alone: top_p 1 and min_p 0 cut nothing. The drafter keeps
    its own top-50 warp whatever these are.

    `repetition_penalty` (transformers': a seen token's logit divided by it when positive,
    multiplied when negative; the history is prompt + generated), `presence_penalty` and
    `frequency_penalty` (OpenAI's: minus presence * [count > 0] + frequency * count, counted
    over the generated tokens only) change the logits before all of that, at every tree node
    with that node's own history (`decoding.penalties`); greedy takes the penalised argmax."""

    temperature: float = 0.0
    seed: int | None = None
    acceptance: Acceptance = "exact"
    top_k: int = TOP_K
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    def __post_init__(self) -> None:
        if (
            not isinstance(self.temperature, numbers.Real)
            or not math.isfinite(self.temperature)
            or self.temperature < 0
        ):
            raise ConfigError(
                f"temperature {self.temperature!r} must be a finite number >= 0 (0 means greedy)"
            )
        if self.seed is not None and (
            isinstance(self.seed, bool)
            or not isinstance(self.seed, numbers.Integral)
            or not 0 <= self.seed <= MAX_SEED
        ):
            raise ConfigError(
                f"seed {self.seed!r} must be an integer in [0, 2**63 - 1] (or None: random)"
            )
        if self.acceptance not in ("exact", "apple"):
            raise ConfigError(f"acceptance {self.acceptance!r} must be 'exact' or 'apple'")
        if (
            isinstance(self.top_k, bool)
            or not isinstance(self.top_k, numbers.Integral)
            or self.top_k < 1
        ):
            raise ConfigError(
                f"top_k {self.top_k!r} must be an integer >= 1 (the default {TOP_K} is Apple's)"
            )
        if not _finite_real(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise ConfigError(
                f"top_p {self.top_p!r} must be a finite number in (0, 1] (1 keeps every token)"
            )
        if not _finite_real(self.min_p) or not 0.0 <= self.min_p < 1.0:
            raise ConfigError(
                f"min_p {self.min_p!r} must be a finite number in [0, 1) (0 keeps every token)"
            )
        if not _finite_real(self.repetition_penalty) or self.repetition_penalty <= 0.0:
            raise ConfigError(
                f"repetition_penalty {self.repetition_penalty!r} must be a finite number > 0 "
                "(1 is none, above 1 discourages repeats)"
            )
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _finite_real(value) or not -2.0 <= value <= 2.0:
                raise ConfigError(
                    f"{name} {value!r} must be a finite number in [-2, 2] (0 is none)"
                )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalised(self) -> bool:
        """Whether any penalty changes the logits (each depends on the token history)."""
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
        )
