"""`redrafter::TreeAttention` for export (docs/design.md §4, docs/tree_attention.md): the torch
custom ops the exporters see, the ONNX schema, the translation to one ONNX node, and the
portable ONNX function bodies.

Dimensions: B batch, Hq/Hkv heads, N new tokens, S cache capacity, P committed length, D head dim.

Two op versions, one attention (models/attention.py): version 1 takes head-major (B, H, N, D)
tensors with rotary applied (`redrafter::tree_attention`; Core ML's converter lowers it, and
the native library still runs version-1 bundles); version 2 takes the (B, N, H*D) projections
and the (B, N, D) rotary table (`redrafter::tree_attention_rotary`; what ONNX bundles carry).

Why this shape: torch 2.13's dynamo exporter inlines every model-local function during its
version-conversion pass, so an onnxscript function in `custom_translation_table` vanishes. We
register an ONNX schema in-process, translate the custom op into a single `TreeAttention` node,
and append the body as a `FunctionProto` after export. Stock ONNX Runtime inlines the body; a
registered native library overrides it (docs/design.md §9).
"""

from __future__ import annotations

import onnx
import torch
from onnx import FunctionProto, TensorProto, defs, helper

from redrafter.bundle.names import OP_DOMAIN as DOMAIN
from redrafter.bundle.names import OP_VERSION
from redrafter.bundle.names import TREE_ATTENTION as OP_NAME
from redrafter.models.attention import attend, tree_attention

INPUTS_V1 = ("query", "key", "value", "key_cache", "value_cache", "past_len", "tree_mask")
INPUTS = (*INPUTS_V1, "cos", "sin")
OUTPUTS = ("output", "key_cache_out", "value_cache_out")


@torch.library.custom_op("redrafter::tree_attention", mutates_args=())
def tree_attention_op(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    past_len: torch.Tensor,
    tree_mask: torch.Tensor,
    scale: float,
    window: int = 0,
    softcap: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Functional tree attention, op version 1: the eager reference on copies of the caches."""
    return attend(
        query,
        key,
        value,
        key_cache.clone(),
        value_cache.clone(),
        past_len,
        tree_mask,
        scale=scale,
        window=window,
        softcap=softcap,
    )


@tree_attention_op.register_fake
def _(query, key, value, key_cache, value_cache, past_len, tree_mask, scale, window=0, softcap=0.0):  # type: ignore[no-untyped-def]
    return torch.empty_like(query), torch.empty_like(key_cache), torch.empty_like(value_cache)


@torch.library.custom_op("redrafter::tree_attention_rotary", mutates_args=())
def tree_attention_rotary_op(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    past_len: torch.Tensor,
    tree_mask: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    scale: float,
    window: int = 0,
    softcap: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Functional tree attention, op version 2: the eager reference on copies of the caches."""
    return tree_attention(
        query,
        key,
        value,
        key_cache.clone(),
        value_cache.clone(),
        past_len,
        tree_mask,
        cos,
        sin,
        scale=scale,
        window=window,
        softcap=softcap,
    )


@tree_attention_rotary_op.register_fake
def _(
    query,
    key,
    value,
    key_cache,
    value_cache,
    past_len,
    tree_mask,
    cos,
    sin,
    scale,
    window=0,
    softcap=0.0,
):  # type: ignore[no-untyped-def]
    return torch.empty_like(query), torch.empty_like(key_cache), torch.empty_like(value_cache)


def register_onnx_schema() -> None:
    """Make `redrafter::TreeAttention` version 2 known to onnx in this process (idempotent).
    Needed only while exporting; checking or running a saved model relies on its function body."""
    try:
        if defs.get_schema(OP_NAME, OP_VERSION, DOMAIN).since_version == OP_VERSION:
            return
    except defs.SchemaError:
        pass
    param = defs.OpSchema.FormalParameter
    kinds = {"past_len": "I", "tree_mask": "M"}
    defs.register_schema(
        defs.OpSchema(
            OP_NAME,
            DOMAIN,
            OP_VERSION,
            doc="Tree attention over a KV cache; see redrafter docs/tree_attention.md.",
            inputs=[param(n, kinds.get(n, "T")) for n in INPUTS],
            outputs=[param(n, "T") for n in OUTPUTS],
            type_constraints=[
                ("T", ["tensor(float)", "tensor(float16)"], "activations and caches"),
                ("I", ["tensor(int64)"], "committed lengths"),
                ("M", ["tensor(bool)"], "tree mask"),
            ],
            # Optional, as in the op contract (absent: 1/sqrt(D)); our exporter always sets
            # it, because the portable body reads it.
            attributes=[
                defs.OpSchema.Attribute(
                    "scale", defs.OpSchema.AttrType.FLOAT, "default 1/sqrt(D)", required=False
                ),
                defs.OpSchema.Attribute(
                    "window", defs.OpSchema.AttrType.INT, "sliding window, 0: none", required=False
                ),
                defs.OpSchema.Attribute(
                    "softcap", defs.OpSchema.AttrType.FLOAT, "score cap, 0: none", required=False
                ),
            ],
        )
    )


def onnx_translation():  # type: ignore[no-untyped-def]
    """The exporter's translation for `redrafter::tree_attention_rotary`: one `TreeAttention`
    node of version 2."""
    from onnxscript.values import Opset

    redrafter = Opset(DOMAIN, OP_VERSION)

    def translate(
        query,
        key,
        value,
        key_cache,
        value_cache,
        past_len,
        tree_mask,
        cos,
        sin,
        scale: float,
        window: int = 0,
        softcap: float = 0.0,
    ):  # type: ignore[no-untyped-def]
        # window and softcap only when set: a node without them reads as 0 everywhere (the
        # native kernels, and the body's defaults), and plain models keep their old nodes.
        extra = {"window": window} if window else {}
        if softcap:
            extra["softcap"] = softcap
        return redrafter.TreeAttention(
            query,
            key,
            value,
            key_cache,
            value_cache,
            past_len,
            tree_mask,
            cos,
            sin,
            scale=scale,
            **extra,
            _num_outputs=3,
        )

    return translate


def function_body(
    opset: int, version: int = OP_VERSION, *, window: bool = False, softcap: bool = False
) -> FunctionProto:
    """The portable body of `TreeAttention` `version` (1 or 2) in standard ONNX ops (opset >= 18).

    It computes in float32 whatever the I/O type, writes the caches with ScatterElements (a
    full-cache copy, which the in-place native kernel avoids), and materialises the (B, Hq, N, S)
    scores: correct everywhere, fast nowhere. The native kernels are the fast path. Version 2
    is version 1's nodes between a prologue (head split, rotary) and an epilogue (head merge).

    `window` / `softcap`: include the nodes that honour those attributes (a model whose layers
    never set them keeps the smaller body); either way a node without them reads 0, i.e. off."""
    F32, I64 = TensorProto.FLOAT, TensorProto.INT64
    n = helper.make_node

    def const(name: str, value: list[int]) -> list:
        return [n("Constant", [], [name], value=helper.make_tensor(name, I64, [len(value)], value))]

    scale_attr = helper.make_attribute_ref("scale", helper.AttributeProto.FLOAT)
    scale_node = n("Constant", [], ["scale_f"])
    scale_node.attribute.append(scale_attr)
    scale_node.attribute[0].name = "value_float"
    nodes = [
        *const("zero", [0]),
        *const("one", [1]),
        *const("ax0", [0]),
        *const("ax1", [1]),
        *const("ax2", [2]),
        *const("ax13", [1, 3]),
        n("Shape", ["key"], ["kshape"]),  # [B, Hkv, N, D]
        n("Shape", ["key_cache"], ["cshape"]),  # [B, Hkv, S, D]
        n("Shape", ["query"], ["qshape"]),  # [B, Hq, N, D]
        n("Gather", ["kshape", "ax2"], ["N1"], axis=0),  # [1]
        n("Gather", ["cshape", "ax2"], ["S1"], axis=0),
        n("Squeeze", ["N1", "ax0"], ["N"]),
        n("Squeeze", ["S1", "ax0"], ["S"]),
        n("Squeeze", ["zero", "ax0"], ["zero_s"]),
        n("Squeeze", ["one", "ax0"], ["one_s"]),
        # Write the new keys/values at slots [P, P+N).
        n("Range", ["zero_s", "N", "one_s"], ["arN"]),  # [N]
        n("Unsqueeze", ["past_len", "ax1"], ["P2"]),  # [B, 1]
        n("Unsqueeze", ["arN", "ax0"], ["arN2"]),  # [1, N]
        n("Add", ["P2", "arN2"], ["slots"]),  # [B, N]
        n("Unsqueeze", ["slots", "ax13"], ["slots4"]),  # [B, 1, N, 1]
        n("Expand", ["slots4", "kshape"], ["idx"]),  # [B, Hkv, N, D]
        n("ScatterElements", ["key_cache", "idx", "key"], ["key_cache_out"], axis=2),
        n("ScatterElements", ["value_cache", "idx", "value"], ["value_cache_out"], axis=2),
        # Visible slots: committed (slot < P) or a new token the tree mask allows.
        n("Range", ["zero_s", "S", "one_s"], ["arS"]),  # [S]
        n("Unsqueeze", ["arS", "ax0"], ["arS2"]),  # [1, S]
        n("Sub", ["arS2", "P2"], ["rel"]),  # [B, S]
        n("Less", ["rel", "zero"], ["committed"]),  # [B, S]
        n("Less", ["rel", "N1"], ["below_end"]),
        n("Not", ["committed"], ["at_or_after_P"]),
        n("And", ["at_or_after_P", "below_end"], ["is_new"]),  # [B, S]
        n("Sub", ["N1", "one"], ["last"]),
        n("Max", ["rel", "zero"], ["rel_lo"]),
        n("Min", ["rel_lo", "last"], ["j"]),  # [B, S] clamped new-token index
        n("Unsqueeze", ["j", "ax1"], ["j3"]),  # [B, 1, S]
        n("Gather", ["kshape", "ax0"], ["B1"], axis=0),
        n("Concat", ["B1", "N1", "S1"], ["bns"], axis=0),
        n("Expand", ["j3", "bns"], ["jB"]),  # [B, N, S]
        n("GatherElements", ["tree_mask", "jB"], ["tree_vis"], axis=2),  # [B, N, S]
        n("Unsqueeze", ["is_new", "ax1"], ["is_new3"]),
        n("And", ["tree_vis", "is_new3"], ["new_vis"]),
        n("Unsqueeze", ["committed", "ax1"], ["committed3"]),
        n("Or", ["committed3", "new_vis"], ["visible" if not window else "tree_visible"]),
        *(_window_nodes() if window else []),  # visible [B, N, S]
        n("Unsqueeze", ["visible", "ax1"], ["visible4"]),  # [B, 1, N, S]
        # Grouped-query attention: query head h reads KV head h // (Hq / Hkv).
        n("Gather", ["qshape", "ax1"], ["Hq1"], axis=0),
        n("Gather", ["kshape", "ax1"], ["Hkv1"], axis=0),
        n("Div", ["Hq1", "Hkv1"], ["rep1"]),
        n("Shape", ["key_cache"], ["D1"], start=3),  # [1]
        n("Concat", ["B1", "Hkv1", "rep1", "S1", "D1"], ["expand5"], axis=0),
        n("Concat", ["B1", "Hq1", "S1", "D1"], ["full4"], axis=0),
        n("Cast", ["key_cache_out"], ["kc_f"], to=F32),
        n("Cast", ["value_cache_out"], ["vc_f"], to=F32),
        n("Unsqueeze", ["kc_f", "ax2"], ["kc5"]),  # [B, Hkv, 1, S, D]
        n("Unsqueeze", ["vc_f", "ax2"], ["vc5"]),
        n("Expand", ["kc5", "expand5"], ["kc_rep"]),  # [B, Hkv, rep, S, D]
        n("Expand", ["vc5", "expand5"], ["vc_rep"]),
        n("Reshape", ["kc_rep", "full4"], ["k_all"]),  # [B, Hq, S, D]
        n("Reshape", ["vc_rep", "full4"], ["v_all"]),
        # Softmax over visible slots, in float32.
        n("Cast", ["query"], ["q_f"], to=F32),
        n("Transpose", ["k_all"], ["k_t"], perm=[0, 1, 3, 2]),  # [B, Hq, D, S]
        n("MatMul", ["q_f", "k_t"], ["qk"]),  # [B, Hq, N, S]
        scale_node,
        n("Mul", ["qk", "scale_f"], ["scores_raw" if softcap else "scores"]),
        *(_softcap_nodes() if softcap else []),
        n("Constant", [], ["neg_inf"], value_float=float("-inf")),
        n("Where", ["visible4", "scores", "neg_inf"], ["masked"]),
        n("Softmax", ["masked"], ["probs"], axis=-1),
        n("MatMul", ["probs", "v_all"], ["out_f"]),  # [B, Hq, N, D]
        n("CastLike", ["out_f", "query"], ["output"]),
    ]
    if version == 2:
        nodes = _rotary_layout_nodes(nodes)
    return helper.make_function(
        DOMAIN,
        OP_NAME,
        list(INPUTS if version == 2 else INPUTS_V1),
        list(OUTPUTS),
        nodes,
        opset_imports=[helper.make_opsetid("", opset)],
        attributes=["scale"],
        attribute_protos=[
            *([helper.make_attribute("window", 0)] if window else []),
            *([helper.make_attribute("softcap", 0.0)] if softcap else []),
        ],
    )


def body_features(graph: onnx.GraphProto) -> dict[str, bool]:
    """Which optional attributes the graph's TreeAttention nodes set: the `function_body`
    flags that honour them (`window`, `softcap`)."""
    used = {
        a.name
        for node in graph.node
        if node.op_type == OP_NAME and node.domain == DOMAIN
        for a in node.attribute
    }
    return {"window": "window" in used, "softcap": "softcap" in used}


def _attribute_constant(output: str, attribute: str, kind: int, field: str):  # type: ignore[no-untyped-def]
    """A Constant node whose value is the calling node's `attribute`."""
    node = helper.make_node("Constant", [], [output])
    node.attribute.append(helper.make_attribute_ref(attribute, kind))
    node.attribute[0].name = field
    return node


def _window_nodes() -> list:
    """visible = tree_visible and key position > query position - window (or window == 0).
    Position of new token i: P + depth(i), depth = its visible new tokens - 1; of slot t < P: t."""
    n = helper.make_node
    return [
        _attribute_constant("window_s", "window", helper.AttributeProto.INT, "value_int"),
        n("Cast", ["tree_mask"], ["mask_i64"], to=TensorProto.INT64),
        n("ReduceSum", ["mask_i64", "ax2"], ["count"], keepdims=0),  # [B, N]
        n("Sub", ["count", "one"], ["depth"]),  # [B, N]
        n("GatherElements", ["depth", "j"], ["depth_at_slot"], axis=1),  # [B, S]
        n("Add", ["P2", "depth_at_slot"], ["new_pos"]),  # [B, S]
        n("Where", ["is_new", "new_pos", "arS2"], ["key_pos"]),  # [B, S]
        n("Add", ["P2", "depth"], ["query_pos"]),  # [B, N]
        n("Sub", ["query_pos", "window_s"], ["before_window"]),  # [B, N]
        n("Unsqueeze", ["before_window", "ax2"], ["before3"]),  # [B, N, 1]
        n("Unsqueeze", ["key_pos", "ax1"], ["key_pos3"]),  # [B, 1, S]
        n("Greater", ["key_pos3", "before3"], ["in_window"]),  # [B, N, S]
        n("Equal", ["window_s", "zero_s"], ["no_window"]),
        n("Or", ["in_window", "no_window"], ["window_ok"]),
        n("And", ["tree_visible", "window_ok"], ["visible"]),  # [B, N, S]
    ]


def _softcap_nodes() -> list:
    """scores = softcap * tanh(scores_raw / softcap), or scores_raw when softcap is 0."""
    n = helper.make_node
    return [
        _attribute_constant("softcap_f", "softcap", helper.AttributeProto.FLOAT, "value_float"),
        n("Div", ["scores_raw", "softcap_f"], ["scores_div"]),
        n("Tanh", ["scores_div"], ["scores_tanh"]),
        n("Mul", ["scores_tanh", "softcap_f"], ["scores_capped"]),
        n("Constant", [], ["zero_f"], value_float=0.0),
        n("Greater", ["softcap_f", "zero_f"], ["has_cap"]),
        n("Where", ["has_cap", "scores_capped", "scores_raw"], ["scores"]),
    ]


def _rotary_layout_nodes(attend_nodes: list) -> list:
    """Version 2's body: `attend_nodes` (version 1's, on head-major rotated tensors) between
    the head split + rotary of query/key/value and the head merge of the output."""
    n = helper.make_node
    heads = {"query": "q_heads", "key": "k_heads", "value": "v_heads", "output": "out_heads"}
    for node in attend_nodes:  # version 1's I/O names -> this body's intermediates
        node.input[:] = [heads.get(i, i) for i in node.input]
        node.output[:] = [heads.get(o, o) for o in node.output]

    def split(x: str, heads_count: str) -> list:  # (B, N, H*D) -> (B, N, H, D)
        return [
            n("Concat", ["B_", "N_", heads_count, "D_"], [f"{x}_shape4"], axis=0),
            n("Reshape", [x, f"{x}_shape4"], [f"{x}_4"]),
        ]

    def rotate(x: str) -> list:  # x·cos + rotate_half(x)·sin in float32, then x's type again
        return [
            n("Cast", [f"{x}_4"], [f"{x}_f"], to=TensorProto.FLOAT),
            n("Split", [f"{x}_f"], [f"{x}_lo", f"{x}_hi"], axis=-1, num_outputs=2),
            n("Neg", [f"{x}_hi"], [f"{x}_neg_hi"]),
            n("Concat", [f"{x}_neg_hi", f"{x}_lo"], [f"{x}_half"], axis=-1),
            n("Mul", [f"{x}_f", "cos_f"], [f"{x}_cos"]),
            n("Mul", [f"{x}_half", "sin_f"], [f"{x}_sin"]),
            n("Add", [f"{x}_cos", f"{x}_sin"], [f"{x}_rot_f"]),
            n("CastLike", [f"{x}_rot_f", x], [f"{x}_rot"]),
        ]

    def to_heads(x: str, src: str) -> list:  # (B, N, H, D) -> (B, H, N, D)
        return [n("Transpose", [src], [heads[x]], perm=[0, 2, 1, 3])]

    axis = helper.make_tensor("axis2", TensorProto.INT64, [1], [2])
    prologue = [
        n("Shape", ["query"], ["B_"], start=0, end=1),  # [1] each
        n("Shape", ["query"], ["N_"], start=1, end=2),
        n("Shape", ["query"], ["qwidth_"], start=2),
        n("Shape", ["key_cache"], ["Hkv_"], start=1, end=2),
        n("Shape", ["key_cache"], ["D_"], start=3),
        n("Div", ["qwidth_", "D_"], ["Hq_"]),
        n("Constant", [], ["axis2"], value=axis),
        n("Cast", ["cos"], ["cos_f32"], to=TensorProto.FLOAT),
        n("Cast", ["sin"], ["sin_f32"], to=TensorProto.FLOAT),
        n("Unsqueeze", ["cos_f32", "axis2"], ["cos_f"]),  # (B, N, 1, D): every head
        n("Unsqueeze", ["sin_f32", "axis2"], ["sin_f"]),
        *split("query", "Hq_"),
        *split("key", "Hkv_"),
        *split("value", "Hkv_"),
        *rotate("query"),
        *rotate("key"),
        *to_heads("query", "query_rot"),
        *to_heads("key", "key_rot"),
        *to_heads("value", "value_4"),
    ]
    epilogue = [
        n("Transpose", ["out_heads"], ["out_tokens"], perm=[0, 2, 1, 3]),  # (B, N, Hq, D)
        n("Shape", ["query"], ["qshape_"]),
        n("Reshape", ["out_tokens", "qshape_"], ["output"]),  # (B, N, Hq*D)
    ]
    return prologue + attend_nodes + epilogue
