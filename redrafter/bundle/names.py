"""Every name both sides of the bundle agree on, defined once: file layout, graph input/output
names, cache and state names, drafter-graph naming, the custom-op identity and versions, and the
ONNX opset/IR numbers. `export/` writes these names; `runtimes/` binds them.

Dimensions: B batch, T new tokens, S cache capacity, Hkv KV heads, D head dim, E hidden,
V vocab, W beam width, L beam length.
"""

from __future__ import annotations

from redrafter.config import BeamShape

# -- the format ----------------------------------------------------------------------------------
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TOKENIZER_DIR = "tokenizer"
ONNX_DIR = "onnx"
COREML_DIR = "coreml"
BASE_ONNX = f"{ONNX_DIR}/base.onnx"
WEIGHTS_DATA = f"{ONNX_DIR}/weights.data"  # external data shared by every ONNX graph
TARGETS = ("onnx", "coreml")

# -- ONNX ----------------------------------------------------------------------------------------
OPSET = 18
IR_VERSION = 10  # ORT 1.20+ reads IR 10; the exporter writes a newer IR than ORT 1.31 accepts

# -- the custom ops (mirrors custom_ops/tree_attention/redrafter_ops.h; a test checks) ----------
OP_DOMAIN = "redrafter"
TREE_ATTENTION = "TreeAttention"
KV_COMMIT = "KVCommit"
OP_VERSION = 2  # the TreeAttention version the exporter writes (2: + rotary, (B, N, H*D) layout)
OP_VERSIONS = (1, 2)  # the versions bundles may carry (the native library runs both)

# -- graph I/O (base.onnx; the Core ML base program adds COMMIT_FROM/COMMIT_AT) -----------------
INPUT_IDS = "input_ids"  # (B, T) int64
POSITION_IDS = "position_ids"  # (B, T) int64
TREE_MASK = "tree_mask"  # (B, T, T) bool
PAST_LEN = "past_len"  # (B,) int64
LOGITS = "logits"  # (B, T, V) float32
HIDDEN_STATES = "hidden_states"  # (B, T, E) float32
NEXT_TOKENS = "next_tokens"  # (B, T) int64: argmax of logits (first max), ONNX graphs only
BASE_INPUTS = (INPUT_IDS, POSITION_IDS, TREE_MASK, PAST_LEN)
BASE_OUTPUTS = (LOGITS, HIDDEN_STATES)
# ONNX base graphs also give each token's argmax, so greedy decoding on a device fetches (B, T)
# ids instead of (B, T, V) logits; graphs exported before it lack it (runtimes fall back).
ONNX_BASE_OUTPUTS = (*BASE_OUTPUTS, NEXT_TOKENS)
COMMIT_FROM = "commit_from"  # Core ML: (L,) the previous step's absolute source slots
COMMIT_AT = "commit_at"  # Core ML: (1,) where they go
COREML_BASE_INPUTS = (*BASE_INPUTS, COMMIT_FROM, COMMIT_AT)

# drafter graphs: one step's whole beam search at a static beam shape
CONTEXT = "context"  # (B, E) float32
FIRST_TOKEN = "first_token"  # (B,) int64
BEAMS = "beams"  # (B, W, L) int64
LOG_PROBS = "log_probs"  # (B, W, L-1, V) float32
DRAFT_LOG_PROBS = "draft_log_probs"  # (B, W, L-1) float32: each drafted token's own log-prob
DRAFTER_INPUTS = (CONTEXT, FIRST_TOKEN)
DRAFTER_OUTPUTS = (BEAMS, LOG_PROBS)
# ONNX drafter graphs also give the drafted tokens' own log-probs: all that pruning reads, so
# only Apple's acceptance rule needs the (B, W, L-1, V) distributions off the device.
ONNX_DRAFTER_OUTPUTS = (*DRAFTER_OUTPUTS, DRAFT_LOG_PROBS)

PAST, PRESENT = "past", "present"


def cache_names(num_layers: int, prefix: str) -> list[str]:
    """[prefix_key_0, prefix_value_0, prefix_key_1, ...] for prefix in {past, present}: the
    base graph's per-layer cache inputs (past) and outputs (present), each (B, Hkv, S, D)."""
    return [f"{prefix}_{kind}_{i}" for i in range(num_layers) for kind in ("key", "value")]


def state_names(num_layers: int, *, split: bool = False) -> list[str]:
    """The Core ML base program's states: key_cache_0, value_cache_0, key_cache_1, ...; with
    `split` (float32 export) also key_cache_lo_{i}, value_cache_lo_{i}."""
    kinds = ("key", "value", "key", "value") if split else ("key", "value")
    return [
        f"{kind}_cache_{'lo_' if j >= 2 else ''}{i}"
        for i in range(num_layers)
        for j, kind in enumerate(kinds)
    ]


def drafter_graph_file(beam: BeamShape) -> str:
    """Where the ONNX drafter graph for one beam shape lives in a bundle."""
    return f"{ONNX_DIR}/drafter-w{beam.width}-l{beam.length}.onnx"


def coreml_package(name: str) -> str:
    """Where a Core ML package ('base' or 'drafter') lives in a bundle."""
    return f"{COREML_DIR}/{name}.mlpackage"
