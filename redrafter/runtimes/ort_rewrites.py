"""Rewrites of a bundle graph that the ONNX Runtime runtime makes in memory when it opens a
CPU session for the native int4 kernel (`onnxruntime.with_int4_kernel`): the bundle on disk is
never changed. Each removes nodes whose dispatch (~3-10 us each on this CPU, the thread pool's
hand-off included) is most of their cost at one to a few tokens per step."""

from __future__ import annotations

from typing import Any

from redrafter.bundle import names as n

# redrafter::MatMulInt4 (custom_ops/matmul_int4): the native int4 kernel the runtime swaps in.
MATMUL_INT4 = "MatMulInt4"
SKIP_NORM = "SkipSimplifiedLayerNormalization"  # com.microsoft, CPU and CUDA kernels


def fold_splits(model: Any, max_outputs: int) -> None:
    """Give each `redrafter::MatMulInt4` read only by a `Split` of its last axis (sizes from a
    constant; a fused projection's q/k/v or gate/up, `export.quantize.fuse_sibling_matmuls`)
    the Split's outputs and a `split` attribute, and drop the Split, in place. The kernel writes
    the same columns to the same outputs: the split is copies, never arithmetic."""
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    readers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    inits = {t.name: t for t in graph.initializer}
    graph_outputs = {o.name for o in graph.output}
    dropped = []
    for node in graph.node:
        if node.op_type != MATMUL_INT4 or node.domain != n.OP_DOMAIN:
            continue
        y = node.output[0]
        users = readers.get(y, [])
        if len(users) != 1 or y in graph_outputs:
            continue
        split = users[0]
        axis = next((a.i for a in split.attribute if a.name == "axis"), 0)
        sizes_init = inits.get(split.input[1]) if len(split.input) > 1 else None
        if (
            split.op_type != "Split"
            or split.domain not in ("", "ai.onnx")
            or axis != -1
            or sizes_init is None
            or sizes_init.data_location == TensorProto.EXTERNAL
        ):
            continue
        sizes = [int(v) for v in numpy_helper.to_array(sizes_init).reshape(-1)]
        N = next(a.i for a in node.attribute if a.name == "N")
        if len(sizes) != len(split.output) or len(sizes) > max_outputs or sum(sizes) != N:
            continue
        del node.output[:]
        node.output.extend(split.output)
        node.attribute.append(helper.make_attribute("split", sizes))
        dropped.append(split)
    for split in dropped:
        graph.node.remove(split)
    used = {name for node in graph.node for name in node.input}
    for name in {split.input[1] for split in dropped} - used:  # the sizes, now unread
        graph.initializer.remove(inits[name])


def fuse_residual_norms(model: Any) -> int:
    """Replace each residual `Add(a, b) -> s` read by the exported RMSNorm chain
    `w * (s / Sqrt(ReduceMean(Pow(s, 2), axes=-1) + eps))` by one
    `com.microsoft::SkipSimplifiedLayerNormalization(a, b, w)` whose fourth output is s (the
    next residual reads it), in place; returns how many. Other forms are left as they are.

    ONNX Runtime fuses the chain into a SimplifiedLayerNormalization by itself but leaves the
    Add beside it (the sum has a second reader). Row-wise arithmetic either way, so a row's
    bits do not depend on the rows beside it (speculation stays lossless); they are not the
    unfused graph's bits (another kernel, another rounding), which the parity tests bound."""
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    made = {o: node for node in graph.node for o in node.output}

    def scalar(name: str) -> float | None:
        t = inits.get(name)
        if t is None or t.data_location == TensorProto.EXTERNAL:
            return None
        a = numpy_helper.to_array(t)
        return float(a.reshape(-1)[0]) if a.size == 1 else None

    def producer(name: str, op: str) -> Any:
        node = made.get(name)
        return node if node is not None and node.op_type == op and not node.domain else None

    fused: dict[int, Any] = {}  # id(the residual Add) -> the fused node
    dropped: set[int] = set()
    for mul in graph.node:
        if mul.op_type != "Mul" or mul.domain or len(mul.input) != 2:
            continue
        weight, normed = mul.input if mul.input[0] in inits else mul.input[::-1]
        div = producer(normed, "Div")
        if weight not in inits or div is None:
            continue
        s = div.input[0]
        sqrt = producer(div.input[1], "Sqrt")
        plus = sqrt and producer(sqrt.input[0], "Add")
        mean = plus and producer(plus.input[0], "ReduceMean")
        square = mean and producer(mean.input[0], "Pow")
        residual = producer(s, "Add")
        if not (square and residual) or square.input[0] != s or scalar(square.input[1]) != 2.0:
            continue
        eps = scalar(plus.input[1])
        axes = [a.ints for a in mean.attribute if a.name == "axes"]
        if len(mean.input) > 1:
            axes_init = inits.get(mean.input[1])
            axes = [list(numpy_helper.to_array(axes_init))] if axes_init is not None else []
        keepdims = next((a.i for a in mean.attribute if a.name == "keepdims"), 1)
        if (
            eps is None
            or [list(x) for x in axes] != [[-1]]
            or keepdims != 1
            or any(x in inits for x in residual.input)
        ):
            continue
        fused[id(residual)] = helper.make_node(
            SKIP_NORM,
            [residual.input[0], residual.input[1], weight],
            [mul.output[0], "", "", s],
            domain="com.microsoft",
            name=f"{mul.name or mul.output[0]}_skip_norm",
            epsilon=eps,
        )
        dropped |= {id(x) for x in (square, mean, plus, sqrt, div, mul)}
    if not fused:
        return 0
    # The fused node sits where the residual Add was: its inputs are ready there, and every
    # reader of s or of the chain's output comes after it.
    nodes = [fused.get(id(node), node) for node in graph.node if id(node) not in dropped]
    del graph.node[:]
    graph.node.extend(nodes)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return len(fused)
