"""Weight-only quantization of exported ONNX graphs, by ONNX Runtime's own quantizer
(`MatMulNBitsQuantizer`, round-to-nearest per block): every MatMul with a constant weight
becomes `com.microsoft::MatMulNBits` (the LM head included: the exporter folds the tied head's
transpose into a constant) and the embedding Gather becomes `GatherBlockQuantized`. Activations,
the KV cache and `redrafter::TreeAttention` stay float: the op's nodes and its function body
pass through untouched (see docs/bundle.md, "Quantized bundles").

Quantization runs on the in-memory graph right after export, before its weights move to the
bundle's shared external-data file, so identical quantized tensors of the base and drafter
graphs (the embedding) are still stored once.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator

import onnx

from redrafter.bundle import Quantization
from redrafter.errors import ConfigError
from redrafter.export.onnx import ExportError

WEIGHT_TYPES = {"int4": 4, "int8": 8}
ACCURACY_LEVELS = (0, 1, 2, 3, 4)  # MatMulNBits compute: 0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8


METHODS = ("rtn", "hqq")


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
        raise ConfigError(f"quantization method {method!r} is not supported; choose rtn or hqq")
    if method == "hqq" and weights != "int4":
        raise ConfigError(f"the hqq method quantizes to int4 only, not {weights}; use rtn")
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


def quantize_graph(model: onnx.ModelProto, q: Quantization) -> onnx.ModelProto:
    """`model` with its constant MatMul weights as MatMulNBits and its Gather tables as
    GatherBlockQuantized, blocks of `q.block_size` along the reduction (MatMul) / hidden
    (Gather) axis. Custom-domain nodes and model-local functions are kept as they are."""
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
