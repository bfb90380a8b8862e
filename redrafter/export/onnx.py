"""ONNX export of the base model (verify/prefill graph) and of the drafter (one step's whole
beam search), with tree attention as `redrafter::TreeAttention` nodes (docs/design.md §4).

Dimensions: B batch, T new tokens, S cache capacity, Lyr layers, Hkv KV heads, D head dim,
E hidden, V vocab, W beam width, L beam length.

base.onnx   inputs  input_ids (B,T) int64, position_ids (B,T) int64, tree_mask (B,T,T) bool,
                    past_len (B,) int64, past_key_{i} / past_value_{i} (B,Hkv,S,D)
            outputs logits (B,T,V) float32, hidden_states (B,T,E) float32,
                    present_key_{i} / present_value_{i} (B,Hkv,S,D)  (the caches, updated)
drafter.onnx inputs context (B,E) float32, first_token (B,) int64
            outputs beams (B,W,L) int64, log_probs (B,W,L-1,V) float32
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import logging
import math
import warnings
from pathlib import Path

import onnx
import torch
from onnx import numpy_helper
from torch import nn

from redrafter.bundle.names import (
    BASE_INPUTS,
    DRAFTER_INPUTS,
    IR_VERSION,
    ONNX_BASE_OUTPUTS,
    ONNX_DRAFTER_OUTPUTS,
    OP_DOMAIN,
    OPSET,
    PAST,
    PRESENT,
    TREE_ATTENTION,
    cache_names,
)
from redrafter.config import BeamShape
from redrafter.errors import RedrafterError
from redrafter.export import tree_attention as ta
from redrafter.models.drafter import Drafter
from redrafter.models.llama import Transformer

DTYPES = {"float32": torch.float32, "float16": torch.float16}


class ExportError(RedrafterError):
    """The ONNX exporter failed on a model we expected to export."""


class VerifyGraph(nn.Module):
    """The base model with per-layer cache inputs/outputs and the custom attention op, so each
    cache can be bound in place (input and output sharing one buffer) by the runtime."""

    def __init__(self, base: Transformer) -> None:
        super().__init__()
        self.base = base
        default_scale = 1.0 / math.sqrt(base.config.dim_per_head)
        for layer in base.model.layers:
            # The layer passes its own attributes (scale, window, softcap) when it sets them.
            layer.self_attn.op = lambda *args, scale=default_scale, window=0, softcap=0.0: (
                torch.ops.redrafter.tree_attention_rotary(*args, scale, window, softcap)
            )

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        tree_mask: torch.Tensor,
        past_len: torch.Tensor,
        *caches: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        pairs = list(zip(caches[0::2], caches[1::2], strict=True))
        logits, hidden, new = self.base(input_ids, position_ids, tree_mask, past_len, pairs)
        logits = logits.float()  # (B, T, V)
        # next_tokens (B, T): ONNX ArgMax keeps the first max, as numpy's argmax does
        return logits, hidden.float(), logits.argmax(-1), *[t for pair in new for t in pair]


class DraftGraph(nn.Module):
    """One step's beam search: L-1 drafter steps unrolled at a static beam shape."""

    def __init__(self, drafter: Drafter, embed_weight: torch.Tensor, beam: BeamShape) -> None:
        super().__init__()
        self.drafter, self.beam = drafter, beam
        self.embed_weight = nn.Parameter(embed_weight.detach().clone(), requires_grad=False)

    def forward(
        self, context: torch.Tensor, first_token: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        dtype = self.embed_weight.dtype
        beams, log_probs = self.drafter.beam_search(
            context.to(dtype), first_token, self.embed_weight, self.beam
        )  # (B, W, L), (B, W, L-1, V)
        log_probs = log_probs.float()
        drafted = log_probs.gather(-1, beams[:, :, 1:, None])[..., 0]  # (B, W, L-1)
        return beams, log_probs, drafted


@contextlib.contextmanager
def _quiet():
    """The exporter prints progress and warnings on every call; keep the CLI readable."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    sink = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lv in zip(loggers, levels, strict=True):
            lg.setLevel(lv)


def _export(
    module: nn.Module, args: tuple, names_in: list[str], names_out: list[str], dynamic_shapes: tuple
) -> onnx.ModelProto:
    try:
        with _quiet(), torch.no_grad():
            program = torch.onnx.export(
                module,
                args,
                dynamo=True,
                opset_version=OPSET,
                input_names=names_in,
                output_names=names_out,
                dynamic_shapes=dynamic_shapes,
                custom_translation_table={
                    torch.ops.redrafter.tree_attention_rotary.default: ta.onnx_translation()
                },
                verbose=False,
            )
    except Exception as e:  # the exporter raises many types; name the graph and the cause
        raise ExportError(f"ONNX export of {type(module).__name__} failed: {e}") from e
    model = program.model_proto
    model.ir_version = IR_VERSION
    return model


def _fusable_rmsnorm(model: onnx.ModelProto) -> int:
    """Rewrite RMSNorm's `x * Reciprocal(Sqrt(mean + eps))` (torch.rsqrt) as `x / Sqrt(...)`,
    the form ONNX Runtime's optimizer fuses into one SimplifiedLayerNormalization node; the
    reciprocal form it leaves as 7 nodes. The values agree to rounding (x/s vs x*(1/s)), and the
    fused node saved 0.5-0.9 ms of a ~22 ms SmolLM2-135M step on 2 CPU cores
    (benchmarks/RESULTS.md, graph_profile). Returns how many norms were rewritten."""
    made_by = {o: n for n in model.graph.node for o in n.output}
    consumers: dict[str, int] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers[i] = consumers.get(i, 0) + 1
    dropped, count = set(), 0
    for node in model.graph.node:
        if node.op_type != "Mul" or node.domain not in ("", "ai.onnx"):
            continue
        for side in (1, 0):
            recip = made_by.get(node.input[side])
            if recip is None or recip.op_type != "Reciprocal" or consumers[recip.output[0]] != 1:
                continue
            root = made_by.get(recip.input[0])
            if root is None or root.op_type != "Sqrt":
                continue
            x = node.input[1 - side]
            node.op_type = "Div"
            del node.input[:]
            node.input.extend([x, recip.input[0]])
            dropped.add(id(recip))
            count += 1
            break
    kept = [n for n in model.graph.node if id(n) not in dropped]
    del model.graph.node[:]
    model.graph.node.extend(kept)
    return count


def export_base(base: Transformer, *, dtype: str = "float32") -> onnx.ModelProto:
    """The verify/prefill graph of `base` with one TreeAttention node per layer and the
    portable function body attached."""
    ta.register_onnx_schema()
    model = copy.deepcopy(base).eval().to(DTYPES[dtype])
    # RoPE frequencies (both LongRoPE tables, Gemma 3's local one) stay fp32 in an fp16 export.
    model.inv_freq = base.inv_freq.float()
    if base.inv_freq_long is not None:
        model.inv_freq_long = base.inv_freq_long.float()
    if base.inv_freq_local is not None:
        model.inv_freq_local = base.inv_freq_local.float()
    c = model.config
    B, T, S = 2, 3, 16  # example sizes; all three are dynamic in the graph
    cache = model.new_cache(B, S, dtype=DTYPES[dtype])
    args = (
        torch.zeros(B, T, dtype=torch.int64),
        torch.arange(T).expand(B, T).contiguous(),
        torch.ones(B, T, T, dtype=torch.bool).tril(),
        torch.tensor([5, 7], dtype=torch.int64),
        *[t.clone() for pair in model.layer_caches(cache) for t in pair],
    )
    batch, tokens, capacity = (torch.export.Dim(n) for n in ("batch", "tokens", "capacity"))
    dynamic = (
        {0: batch, 1: tokens},
        {0: batch, 1: tokens},
        {0: batch, 1: tokens, 2: tokens},
        {0: batch},
        tuple({0: batch, 2: capacity} for _ in range(2 * c.num_hidden_layers)),
    )
    names_in = [*BASE_INPUTS, *cache_names(c.num_hidden_layers, PAST)]
    names_out = [*ONNX_BASE_OUTPUTS, *cache_names(c.num_hidden_layers, PRESENT)]
    onnx_model = _export(VerifyGraph(model), args, names_in, names_out, dynamic)
    _fusable_rmsnorm(onnx_model)
    onnx_model.functions.append(ta.function_body(OPSET, **ta.body_features(onnx_model.graph)))
    count = sum(
        n.op_type == TREE_ATTENTION and n.domain == OP_DOMAIN for n in onnx_model.graph.node
    )
    if count != c.num_hidden_layers:
        raise ExportError(
            f"expected {c.num_hidden_layers} {OP_DOMAIN}::{TREE_ATTENTION} nodes, found {count}; "
            "the exporter inlined or rewrote the custom op"
        )
    return onnx_model


def export_drafter(
    drafter: Drafter, base: Transformer, beam: BeamShape, *, dtype: str = "float32"
) -> onnx.ModelProto:
    """The drafter's whole beam search for one step as one graph (batch is dynamic)."""
    graph = DraftGraph(copy.deepcopy(drafter).eval(), base.embed_weight, beam).to(DTYPES[dtype])
    B = 2
    args = (torch.zeros(B, base.config.hidden_size), torch.zeros(B, dtype=torch.int64))
    batch = torch.export.Dim("batch")
    return _export(
        graph, args, list(DRAFTER_INPUTS), list(ONNX_DRAFTER_OUTPUTS), ({0: batch}, {0: batch})
    )


def _raw_bytes(tensor: onnx.TensorProto) -> bytes:
    """A tensor's bytes as external data stores them: packed for 4-bit types (one byte holds
    two int4 values, which `to_array().tobytes()` would unpack), little-endian otherwise."""
    if tensor.raw_data:
        return tensor.raw_data
    return numpy_helper.from_array(numpy_helper.to_array(tensor)).raw_data


class SharedWeights:
    """One external-data file for several graphs of a bundle, each distinct tensor stored once
    (matched by content): the drafter graphs of every beam shape and the base graph share their
    weights and the embedding table on disk. Offsets are page-aligned so ORT can memory-map."""

    ALIGN = 4096
    THRESHOLD = 1024  # bytes; smaller tensors stay inline in the graph

    def __init__(self, path: Path) -> None:
        self.path = path
        self.index: dict[str, tuple[int, int]] = {}
        self.size = 0

    def _store(self, raw: bytes) -> tuple[int, int]:
        key = hashlib.sha256(raw).hexdigest()
        if key not in self.index:
            offset = -(-self.size // self.ALIGN) * self.ALIGN
            with open(self.path, "r+b" if self.path.exists() else "wb") as f:
                f.seek(offset)
                f.write(raw)
            self.index[key] = (offset, len(raw))
            self.size = offset + len(raw)
        return self.index[key]

    def save(self, model: onnx.ModelProto, path: Path) -> None:
        """Move `model`'s large initializers into the shared file, then save the graph."""
        for tensor in model.graph.initializer:
            raw = _raw_bytes(tensor)
            if len(raw) < self.THRESHOLD:
                continue
            offset, length = self._store(raw)
            for field in (
                "raw_data",
                "float_data",
                "int32_data",
                "int64_data",
                "double_data",
                "uint64_data",
                "string_data",
            ):
                tensor.ClearField(field)
            del tensor.external_data[:]
            for key, value in (
                ("location", self.path.name),
                ("offset", offset),
                ("length", length),
            ):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, str(value)
            tensor.data_location = onnx.TensorProto.EXTERNAL
        onnx.save_model(model, str(path))
