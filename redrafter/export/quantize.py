"""Weight-only quantization of exported ONNX graphs, by ONNX Runtime's own quantizer
(`MatMulNBitsQuantizer`, round-to-nearest per block): every MatMul with a constant weight
becomes `com.microsoft::MatMulNBits` (the LM head included: the exporter folds the tied head's
transpose into a constant) and the embedding Gather becomes `GatherBlockQuantized`. Activations,
the KV cache and `redrafter::TreeAttention` stay float: the op's nodes and its function body
pass through untouched (see docs/bundle.md, "Quantized bundles"). Method "gguf" first keeps a
GGUF base's own Q4_0/Q4_1/Q8_0 blocks exactly (`keep_gguf_blocks`) and leaves the rest to RTN.

Quantization runs on the in-memory graph right after export, before its weights move to the
bundle's shared external-data file, so identical quantized tensors of the base and drafter
graphs (the embedding) are still stored once.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import warnings
from collections.abc import Iterator, Sequence

import numpy as np
import onnx

from redrafter.bundle import Quantization
from redrafter.errors import ConfigError
from redrafter.export.onnx import ExportError
from redrafter.models.gguf import GGUF_BLOCK, GgufBlocks

WEIGHT_TYPES = {"int4": 4, "int8": 8}
ACCURACY_LEVELS = (0, 1, 2, 3, 4)  # MatMulNBits compute: 0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8


# rtn: round to nearest per block; hqq: fitted float zero points; gguf: keep a GGUF base's own
# Q4_0/Q4_1 blocks (no second rounding), RTN for the rest
METHODS = ("rtn", "hqq", "gguf")


def quantization(
    weights: str,
    *,
    block_size: int = 32,
    symmetric: bool = True,
    accuracy_level: int = 1,
    method: str = "rtn",
) -> Quantization:
    """A checked quantization record; each bad value is a one-line `ConfigError`.

    `accuracy_level` 1 (fp32 compute) is the default because it keeps speculation lossless:
    ONNX Runtime 1.31's int8-compute MatMulNBits (level 4) rounds a one-token call and a
    multi-token call differently (teacher-forced argmaxes of SmolLM2-135M agree 95-97 % between
    them, against 100 % at level 1), so a level-4 bundle's greedy speculative tokens drift from
    its own autoregressive tokens. Level 4 decodes ~30 % faster per token; `validate` reports
    the divergence (docs/parity.md)."""
    if weights not in WEIGHT_TYPES:
        raise ConfigError(f"quantize {weights!r} is not supported; choose none, int4 or int8")
    if block_size < 16 or block_size & (block_size - 1):
        raise ConfigError(
            f"block size {block_size} must be a power of two >= 16 (MatMulNBits' blocks), e.g. 32"
        )
    if accuracy_level not in ACCURACY_LEVELS:
        raise ConfigError(
            f"accuracy level {accuracy_level} must be one of {', '.join(map(str, ACCURACY_LEVELS))}"
            " (4: int8 compute on CPUs)"
        )
    if method not in METHODS:
        raise ConfigError(
            f"quantization method {method!r} is not supported; choose rtn, hqq or gguf"
        )
    if method in ("hqq", "gguf") and weights != "int4":
        raise ConfigError(f"the {method} method quantizes to int4 only, not {weights}; use rtn")
    if method == "gguf" and block_size != GGUF_BLOCK:
        raise ConfigError(
            f"the gguf method keeps GGUF blocks of {GGUF_BLOCK}; drop --block-size {block_size}"
        )
    return Quantization(weights, block_size, symmetric, accuracy_level, method)


@contextlib.contextmanager
def _quiet_quantizer() -> Iterator[None]:
    """The quantizer's module calls `logging.basicConfig(level=INFO)` on import (a root handler
    that would print every INFO line of every library afterwards) and logs a line per node:
    undo the first, silence the second, so export's progress stays readable."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    logger = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    own_level = logger.level
    try:
        import onnxruntime.quantization.matmul_nbits_quantizer  # noqa: F401
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():  # HQQ hands torch a read-only numpy view (harmless)
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            yield
    finally:
        logger.setLevel(own_level)


def fold_weight_transposes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Replace each `Transpose` of an initializer by the transposed initializer, in place.

    A tied LM head reaches its MatMul as `MatMul(h, Transpose(embedding))`; the quantizer only
    takes constant weights, so without this fold the head (the largest matrix of a small
    model) stays float, and so does the float embedding it reads. Initializers nothing reads
    any more are dropped."""
    from onnx import numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    kept = []
    for node in graph.node:
        if node.op_type == "Transpose" and node.domain == "" and node.input[0] in inits:
            array = numpy_helper.to_array(inits[node.input[0]])
            perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
            graph.initializer.append(numpy_helper.from_array(array.transpose(perm), node.output[0]))
        else:
            kept.append(node)
    if len(kept) != len(graph.node):
        del graph.node[:]
        graph.node.extend(kept)
        used = {i for node in graph.node for i in node.input} | {o.name for o in graph.output}
        unused = [t for t in graph.initializer if t.name not in used]
        for t in unused:
            graph.initializer.remove(t)
    return model


def fuse_sibling_matmuls(model: onnx.ModelProto) -> onnx.ModelProto:
    """Replace the MatMuls that multiply one tensor by constant weights (a layer's q/k/v
    projections; its MLP's gate and up) by one MatMul over the weights side by side and a
    `Split` of its last axis back into their outputs, in place.

    Why: a quantized one-token step is ~200 small int4 MatMuls, and each call pays a fixed cost
    (ONNX Runtime's dispatch, the thread pool's wake-up, quantizing the activation row to int8)
    that a wider call pays once. Each output column is still its own dot product over the same
    K, and block quantization runs per column, so the quantized weights and, on our int4 kernel,
    every output bit are those of the separate MatMuls."""
    from onnx import helper, numpy_helper

    if next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0) < 13:
        return model  # Split takes its sizes as an input from opset 13
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    siblings: dict[str, list[int]] = {}  # input -> indices of its MatMuls by a constant weight
    for i, node in enumerate(graph.node):
        w = inits.get(node.input[1]) if node.op_type == "MatMul" and not node.domain else None
        if w is not None and len(w.dims) == 2:
            siblings.setdefault(node.input[0], []).append(i)
    fused: dict[int, list[onnx.NodeProto]] = {}  # first sibling's index -> replacement nodes
    dropped: set[int] = set()
    for x, indices in siblings.items():
        nodes = [graph.node[i] for i in indices]
        weights = [numpy_helper.to_array(inits[n.input[1]]) for n in nodes]  # (K, N_i) each
        if len(nodes) < 2 or len({(w.shape[0], w.dtype) for w in weights}) != 1:
            continue
        name = f"{nodes[0].name or nodes[0].output[0]}_fused{len(nodes)}"
        graph.initializer.append(numpy_helper.from_array(np.concatenate(weights, 1), f"{name}.w"))
        sizes = np.array([w.shape[1] for w in weights], np.int64)
        graph.initializer.append(numpy_helper.from_array(sizes, f"{name}.split"))
        fused[indices[0]] = [
            helper.make_node("MatMul", [x, f"{name}.w"], [f"{name}.y"], name=name),
            helper.make_node(
                "Split",
                [f"{name}.y", f"{name}.split"],
                [n.output[0] for n in nodes],
                name=f"{name}.split",
                axis=-1,
            ),
        ]
        dropped |= set(indices[1:])
    if not fused:
        return model
    # the fused pair sits where the first sibling was: its input is ready there, and every
    # output is then made no later than before (graph nodes are in topological order)
    nodes = [
        new for i, node in enumerate(graph.node) if i not in dropped for new in fused.get(i, [node])
    ]
    del graph.node[:]
    graph.node.extend(nodes)
    used = {i for node in graph.node for i in node.input} | {o.name for o in graph.output}
    for t in [t for t in graph.initializer if t.name not in used]:
        graph.initializer.remove(t)
    return model


def keep_gguf_blocks(
    model: onnx.ModelProto, blocks: Sequence[GgufBlocks], accuracy_level: int
) -> tuple[onnx.ModelProto, int]:
    """Turn each MatMul whose constant weight is, column for column, rows of a checkpoint's own
    blocks (`gguf_blocks`) into a 4-bit MatMulNBits over those very codes, scales and zero
    points, in place; returns the model and how many MatMuls and Gathers were turned.

    A column is matched to a row by its exact float32 values (a digest, then compared in
    full), so transposes, fused siblings and un-permuted rows need no bookkeeping, and nothing
    is requantized: the graph computes the checkpoint's weights, not a second rounding of them.
    8-bit rows (Q8_0, e.g. a tied head) are kept exactly too, as two 4-bit planes over the input
    twice (`_two_planes`): the int4 kernels run them, and ORT's own 8-bit MatMulNBits at fp32
    compute is ~14x slower; an 8-bit embedding table becomes an 8-bit GatherBlockQuantized
    (`_keep_8bit_table`). A MatMul with any column not found, or with rows of both widths, is
    left for the quantizer."""
    from onnx import helper, numpy_helper

    index: dict[bytes, tuple[int, int]] = {}
    for i, b in enumerate(blocks):
        for r in range(len(b.values)):
            index.setdefault(
                hashlib.blake2b(b.values[r].tobytes(), digest_size=16).digest(), (i, r)
            )
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    turned = 0
    nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        nodes.append(node)
        if _keep_8bit_table(node, inits, blocks, index, graph):
            turned += 1
            continue
        w = inits.get(node.input[1]) if node.op_type == "MatMul" and not node.domain else None
        if w is None or len(w.dims) != 2 or w.data_type != onnx.TensorProto.FLOAT:
            continue
        cols = np.ascontiguousarray(numpy_helper.to_array(w).T)  # [N, K]
        found = []
        for col in cols:
            hit = index.get(hashlib.blake2b(col.tobytes(), digest_size=16).digest())
            if hit is None or not np.array_equal(blocks[hit[0]].values[hit[1]], col):
                break
            found.append(hit)
        if len(found) != len(cols) or len({blocks[i].bits for i, _ in found}) != 1:
            continue
        name, x = w.name, node.input[0]
        codes = np.stack([blocks[i].codes[r] for i, r in found])  # [N, K]
        scales = np.stack([blocks[i].scales[r] for i, r in found])  # [N, KB]
        zeros: np.ndarray | None = None
        if blocks[found[0][0]].bits == 8:
            codes, scales, zeros = _two_planes(codes, scales)  # [N, 2K], [N, 2KB], [N, KB]
            nodes.insert(-1, helper.make_node("Concat", [x, x], [f"{name}_x2"], axis=-1))
            x = f"{name}_x2"
        elif any(blocks[i].zeros is not None for i, _ in found):  # Q4_1 rows: float zeros
            fill = np.full(scales.shape[1], 8.0)  # a Q4_0 row among them: zero 8
            zeros = np.stack(
                [blocks[i].zeros[r] if blocks[i].zeros is not None else fill for i, r in found]
            ).astype(np.float32)
        N, K = codes.shape
        packed = (codes[:, 0::2] | codes[:, 1::2] << 4).reshape(N, K // GGUF_BLOCK, -1)
        extra = [
            numpy_helper.from_array(packed.astype(np.uint8), f"{name}_Q4"),
            numpy_helper.from_array(scales.reshape(-1).astype(np.float32), f"{name}_scales"),
        ]
        inputs = [x, f"{name}_Q4", f"{name}_scales"]
        if zeros is not None:
            extra.append(numpy_helper.from_array(zeros.reshape(-1), f"{name}_zp"))
            inputs.append(f"{name}_zp")
        graph.initializer.extend(extra)
        replacement = helper.make_node(
            "MatMulNBits",
            inputs,
            list(node.output),
            name=node.name or f"{name}_MatMulNBits",
            domain="com.microsoft",
            K=K,
            N=N,
            bits=4,
            block_size=GGUF_BLOCK,
            accuracy_level=accuracy_level,
        )
        node.CopyFrom(replacement)
        turned += 1
    del graph.node[:]
    graph.node.extend(nodes)
    if turned:
        used = {i for node in graph.node for i in node.input} | {o.name for o in graph.output}
        for t in [t for t in graph.initializer if t.name not in used]:
            graph.initializer.remove(t)
        if not any(o.domain == "com.microsoft" for o in model.opset_import):
            model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return model, turned


def _keep_8bit_table(
    node: onnx.NodeProto,
    inits: dict[str, onnx.TensorProto],
    blocks: Sequence[GgufBlocks],
    index: dict[bytes, tuple[int, int]],
    graph: onnx.GraphProto,
) -> bool:
    """Turn `node`, if it is a row Gather of a table whose rows are all 8-bit (Q8_0) rows of
    `blocks` (an embedding), into a `GatherBlockQuantized` with bits 8 over the file's codes and
    scales (zero 128, the op's default for 8 bits): exact, where RTN would round the table to 4
    bits. Returns whether it did."""
    from onnx import helper, numpy_helper

    if node.op_type != "Gather" or node.domain or node.input[0] not in inits:
        return False
    table = inits[node.input[0]]
    axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
    if axis != 0 or len(table.dims) != 2 or table.data_type != onnx.TensorProto.FLOAT:
        return False
    rows = numpy_helper.to_array(table)  # [V, H]
    found = []
    for row in rows:
        hit = index.get(hashlib.blake2b(row.tobytes(), digest_size=16).digest())
        if hit is None or blocks[hit[0]].bits != 8:
            return False
        if not np.array_equal(blocks[hit[0]].values[hit[1]], row):
            return False
        found.append(hit)
    codes = np.stack([blocks[i].codes[r] for i, r in found])  # [V, H] uint8
    scales = np.stack([blocks[i].scales[r] for i, r in found]).astype(np.float32)  # [V, H / 32]
    name = table.name
    graph.initializer.extend(
        [
            numpy_helper.from_array(codes.astype(np.uint8), f"{name}_Q8"),
            numpy_helper.from_array(scales, f"{name}_scales"),
        ]
    )
    replacement = helper.make_node(
        "GatherBlockQuantized",
        [f"{name}_Q8", node.input[1], f"{name}_scales"],
        list(node.output),
        name=node.name or f"{name}_GatherBlockQuantized",
        domain="com.microsoft",
        bits=8,
        block_size=GGUF_BLOCK,
        gather_axis=0,
        quantize_axis=1,
    )
    node.CopyFrom(replacement)
    return True


def _two_planes(codes: np.ndarray, scales: np.ndarray) -> tuple[np.ndarray, ...]:
    """8-bit blocks as 4-bit ones over the input twice, exactly: code c = 16 hi + lo, so
    d (c - 128) = 16d (hi - 8) + d (lo - 0). From `codes` [N, K] (0..255) and `scales`
    [N, KB]: codes [N, 2K] (the high nibbles, then the low ones), scales [N, 2KB] (16d, then
    d) and MatMulNBits' packed 4-bit zero points [N, KB] (8 for a high block, 0 for a low one:
    two blocks a byte, the first in the low nibble)."""
    N, KB = scales.shape
    planes = np.concatenate([codes >> 4, codes & 15], axis=1).astype(np.uint8)  # [N, 2K]
    both = np.concatenate([16 * scales, scales], axis=1).astype(np.float32)  # [N, 2KB]
    zeros = np.concatenate([np.full((N, KB), 8), np.zeros((N, KB))], axis=1).astype(np.uint8)
    packed = zeros[:, 0::2] | zeros[:, 1::2] << 4  # [N, KB]: 2KB blocks, two a byte
    return planes, both, packed


def quantize_graph(
    model: onnx.ModelProto,
    q: Quantization,
    *,
    fuse: bool = True,
    blocks: Sequence[GgufBlocks] = (),
) -> onnx.ModelProto:
    """`model` with its constant MatMul weights as MatMulNBits and its Gather tables as
    GatherBlockQuantized, blocks of `q.block_size` along the reduction (MatMul) / hidden
    (Gather) axis. Custom-domain nodes and model-local functions are kept as they are.
    `fuse`: MatMuls of one input become one (`fuse_sibling_matmuls`) first. Method "gguf":
    MatMuls whose weights are the checkpoint's own 4-bit `blocks` keep them
    (`keep_gguf_blocks`); the rest are quantized by RTN."""
    with _quiet_quantizer():
        from onnxruntime.quantization.matmul_nbits_quantizer import (
            DefaultWeightOnlyQuantConfig,
            HQQWeightOnlyQuantConfig,
            MatMulNBitsQuantizer,
        )
        from onnxruntime.quantization.quant_utils import QuantFormat

        bits = WEIGHT_TYPES[q.weights]
        functions = list(model.functions)
        model = fold_weight_transposes(model)
        if fuse:
            model = fuse_sibling_matmuls(model)
        if q.method == "gguf":
            model, _ = keep_gguf_blocks(model, blocks, q.accuracy_level)
        if q.method == "hqq":  # MatMuls by HQQ (float zero points), then the table by RTN
            hqq = HQQWeightOnlyQuantConfig(block_size=q.block_size, bits=bits)
            quantizer = MatMulNBitsQuantizer(model, algo_config=hqq)
            quantizer.process()
            model = quantizer.model.model
        # GatherBlockQuantized takes 4-bit tables only: int8 bundles keep a float embedding.
        ops = ("MatMul", "Gather") if bits == 4 else ("MatMul",)
        config = DefaultWeightOnlyQuantConfig(
            block_size=q.block_size,
            is_symmetric=q.symmetric,
            accuracy_level=q.accuracy_level,
            quant_format=QuantFormat.QOperator,
            op_types_to_quantize=ops,
            quant_axes=(("MatMul", 0), ("Gather", 1)),
            bits=bits,
        )
        quantizer = MatMulNBitsQuantizer(model, algo_config=config)
        quantizer.process()
    out: onnx.ModelProto = quantizer.model.model
    if [f.name for f in out.functions] != [f.name for f in functions]:
        raise ExportError("the ONNX Runtime quantizer dropped the model's TreeAttention function")
    return out
