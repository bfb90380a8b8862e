"""Quantized bundles (`export --quantize`, redrafter/export/quantize.py): weight-only int4/int8
through ONNX Runtime's quantizer. Pinned here: the manifest records it, TreeAttention survives,
the bundle shrinks, speculation stays lossless on the quantized model (greedy speculative ==
greedy autoregressive of the same bundle), validate reports drift and fails a broken
quantization, and bad options are one-line errors that leave nothing behind."""

from __future__ import annotations

import collections
import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from redrafter.build import ExportOptions, export_bundle
from redrafter.bundle import Bundle, load_bundle, write_manifest
from redrafter.bundle import names as n
from redrafter.cli import main
from redrafter.config import BeamShape
from redrafter.decoding import DecodeOptions, decode
from redrafter.errors import ConfigError
from redrafter.export.quantize import quantization
from redrafter.runtimes.onnxruntime import OnnxRuntime

from conftest import BUNDLE_BEAM, BUNDLE_SHAPE, collect

IMPLEMENTATIONS = [False, True]  # portable body, native kernel (skipped where not built)


@pytest.fixture(scope="module")
def int4_bundle(tiny_checkpoints: tuple[Path, Path, Path]) -> Bundle:
    root, base_dir, drafter_dir = tiny_checkpoints
    options = ExportOptions(beam=BUNDLE_BEAM, quantization=quantization("int4", block_size=16))
    return export_bundle(base_dir, root / "int4-bundle", drafter_path=drafter_dir, options=options)


def _ops(bundle: Bundle, rel: str) -> collections.Counter[tuple[str, str]]:
    model = onnx.load(str(bundle.path(rel)), load_external_data=False)
    return collections.Counter((node.domain, node.op_type) for node in model.graph.node)


def test_quantized_export_keeps_tree_attention_and_shrinks(int4_bundle, onnx_bundle) -> None:
    q = int4_bundle.manifest.quantization
    assert q is not None and (q.weights, q.block_size, q.symmetric, q.accuracy_level) == (
        "int4",
        16,
        True,
        1,  # fp32 compute: the level that keeps speculation lossless (export/quantize.py)
    )
    assert int4_bundle.precision == "int4" and int4_bundle.dtype == "float32"
    base_ops = _ops(int4_bundle, n.BASE_ONNX)
    layers = BUNDLE_SHAPE["num_hidden_layers"]
    assert base_ops[(n.OP_DOMAIN, n.TREE_ATTENTION)] == layers
    assert base_ops[("", "MatMul")] == 0  # every constant weight, the LM head too
    # q|k|v (fused), o, gate|up (fused), down per layer, and the LM head
    assert base_ops[("com.microsoft", "MatMulNBits")] == 4 * layers + 1
    assert base_ops[("", "Split")] >= 2 * layers  # the fused projections' outputs
    assert base_ops[("com.microsoft", "GatherBlockQuantized")] == 1  # the embedding
    model = onnx.load(str(int4_bundle.path(n.BASE_ONNX)), load_external_data=False)
    assert [f.name for f in model.functions] == [n.TREE_ATTENTION]
    drafter_ops = _ops(int4_bundle, int4_bundle.drafter_graphs[BUNDLE_BEAM])
    assert drafter_ops[("com.microsoft", "MatMulNBits")] > 0
    # Weights shrink (the tiny model's norms and biases stay float, so less than 8x).
    assert int4_bundle.manifest.total_bytes < 0.6 * onnx_bundle.manifest.total_bytes
    assert int4_bundle.manifest.parity is not None and int4_bundle.manifest.parity.passed


@pytest.mark.parametrize("native", IMPLEMENTATIONS, ids=["portable", "native"])
@pytest.mark.parametrize("packing", ["dedup", "full"])
def test_speculation_is_lossless_on_the_quantized_model(int4_bundle, packing, native) -> None:
    from redrafter import ops

    if native and ops.library_path() is None:
        pytest.skip("native op library not built (make ops)")
    runtime = OnnxRuntime(int4_bundle, native=native)
    prompts = [[1, 2, 3, 4, 5], [7, 8], [9, 10, 11, 12, 13, 14, 15, 16, 17]]
    ar = collect(decode(runtime, prompts, DecodeOptions(speculative=False, max_new_tokens=20)), 3)
    options = DecodeOptions(max_new_tokens=20, beam=BUNDLE_BEAM, packing=packing)
    assert collect(decode(runtime, prompts, options), 3) == ar
    lookup = options.replace(prompt_lookup=True, beam=BeamShape(BUNDLE_BEAM.width, 4))
    assert collect(decode(runtime, prompts, lookup), 3) == ar


def test_int8_bundle_runs_and_stays_close(tiny_checkpoints) -> None:
    root, base_dir, drafter_dir = tiny_checkpoints
    options = ExportOptions(beam=BUNDLE_BEAM, quantization=quantization("int8"))
    bundle = export_bundle(
        base_dir, root / "int8-bundle", drafter_path=drafter_dir, options=options
    )
    ops = _ops(bundle, n.BASE_ONNX)
    assert ops[("com.microsoft", "MatMulNBits")] > 0
    assert ops[("", "Gather")] == 1  # 8-bit tables have no GatherBlockQuantized kernel
    assert bundle.manifest.parity is not None and bundle.manifest.parity.passed


def _swap_nibbles(bundle_dir: Path, initializer: str) -> None:
    """A packing bug on purpose: the two 4-bit values of every byte of one quantized weight
    swapped (wherever the tensor lives: inline or in the shared weights file), checksums
    rewritten, so only parity can notice."""
    path = bundle_dir / n.BASE_ONNX
    model = onnx.load(str(path), load_external_data=False)
    data = bytearray((bundle_dir / n.WEIGHTS_DATA).read_bytes())
    (tensor,) = [t for t in model.graph.initializer if t.name == initializer]
    info = {e.key: e.value for e in tensor.external_data}

    def swap(raw: bytes) -> bytes:
        b = np.frombuffer(raw, np.uint8)
        return ((b << 4) | (b >> 4)).astype(np.uint8).tobytes()

    if "offset" in info:
        start, length = int(info["offset"]), int(info["length"])
        data[start : start + length] = swap(bytes(data[start : start + length]))
        (bundle_dir / n.WEIGHTS_DATA).write_bytes(bytes(data))
    else:
        tensor.raw_data = swap(tensor.raw_data)
        onnx.save(model, str(path))
    write_manifest(bundle_dir, load_bundle(bundle_dir, verify_checksums=False).manifest)


def validate_cli(bundle_dir: Path, report: Path) -> tuple[Any, dict]:
    """`redrafter validate --bundle DIR --json REPORT` through the CLI: the result and report."""
    result = CliRunner().invoke(
        main, ["validate", "--bundle", str(bundle_dir), "--json", str(report)]
    )
    return result, json.loads(report.read_text()) if report.is_file() else {}


def broken_head_copy(bundle_dir: Path, out: Path) -> onnx.NodeProto:
    """A copy of the bundle at `out` whose last MatMulNBits (the head) has its nibbles
    swapped (`_swap_nibbles`); returns that node."""
    import shutil

    shutil.copytree(bundle_dir, out)
    model = onnx.load(str(out / n.BASE_ONNX), load_external_data=False)
    head = [node for node in model.graph.node if node.op_type == "MatMulNBits"][-1]
    _swap_nibbles(out, head.input[1])
    return head


def test_validate_fails_a_broken_quantization(int4_bundle, tmp_path) -> None:
    broken = tmp_path / "broken"
    broken_head_copy(int4_bundle.root, broken)
    ok, report = validate_cli(int4_bundle.root, tmp_path / "ok.json")
    assert ok.exit_code == 0, ok.output
    assert report["drift"]["precision"] == "int4" and report["drift"]["passed"]
    bad, report = validate_cli(broken, tmp_path / "bad.json")
    assert bad.exit_code == 1, bad.output
    assert not report["drift"]["passed"] and report["drift"]["mean_kl"] > 1.0
    assert "drift FAIL" in bad.output


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--quantize", "int3"], "Invalid value for '--quantize'"),
        (["--quantize", "int4", "--block-size", "48"], "block size 48 must be a power of two"),
        (["--quantize", "int4", "--block-size", "8"], "block size 8 must be a power of two"),
        (["--quantize", "int4", "--accuracy-level", "7"], "accuracy level 7 must be one of"),
    ],
)
def test_bad_quantize_options_exit_2_and_leave_nothing(tiny_checkpoints, tmp_path, flags, message):
    _, base_dir, drafter_dir = tiny_checkpoints
    out = tmp_path / "b"
    args = ["export", "--base", str(base_dir), "--drafter", str(drafter_dir), "--out", str(out)]
    result = CliRunner().invoke(main, args + flags)
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_quantization_record_is_checked() -> None:
    with pytest.raises(ConfigError, match="choose none, int4 or int8"):
        quantization("fp8")
    assert quantization("int8", block_size=128, symmetric=False).block_size == 128


def test_coreml_int4_programs_run_in_the_mil_evaluator(tiny_checkpoints) -> None:
    pytest.importorskip("coremltools", reason="Core ML export needs coremltools (macOS or Linux)")
    from redrafter.runtimes.coreml_mil import CoreMLMilRuntime

    root, base_dir, drafter_dir = tiny_checkpoints
    options = ExportOptions(
        targets=("coreml",),
        beam=BUNDLE_BEAM,
        quantization=quantization("int4", block_size=16),
    )
    bundle = export_bundle(
        base_dir, root / "coreml-int4", drafter_path=drafter_dir, options=options
    )
    assert bundle.manifest.coreml is not None and bundle.manifest.coreml.parity is not None
    assert bundle.manifest.coreml.parity.passed  # held to the int4 limits
    runtime = CoreMLMilRuntime(bundle)
    assert runtime.precision == "int4"
    ops = {op.op_type for op in runtime.base.function.operations}
    assert "constexpr_blockwise_shift_scale" in ops  # the weights really are 4-bit blocks
    prompts = [[1, 2, 3, 4, 5], [7, 8]]
    ar = collect(decode(runtime, prompts, DecodeOptions(speculative=False, max_new_tokens=8)), 2)
    spec = DecodeOptions(max_new_tokens=8, beam=BUNDLE_BEAM)
    assert collect(decode(runtime, prompts, spec), 2) == ar


def test_hqq_method_fits_float_zero_points_and_stays_lossless(tiny_checkpoints) -> None:
    root, base_dir, drafter_dir = tiny_checkpoints
    q = quantization("int4", block_size=16, method="hqq")
    options = ExportOptions(beam=BUNDLE_BEAM, quantization=q)
    bundle = export_bundle(base_dir, root / "hqq-bundle", drafter_path=drafter_dir, options=options)
    assert bundle.manifest.quantization is not None
    assert bundle.manifest.quantization.method == "hqq"
    model = onnx.load(str(bundle.path(n.BASE_ONNX)), load_external_data=False)
    nbits = [node for node in model.graph.node if node.op_type == "MatMulNBits"]
    inits = {t.name: t for t in model.graph.initializer}
    zero_points = [inits[node.input[3]] for node in nbits if len(node.input) > 3 and node.input[3]]
    assert zero_points and all(z.data_type == onnx.TensorProto.FLOAT for z in zero_points)
    runtime = OnnxRuntime(bundle, native=False)
    prompts = [[1, 2, 3, 4, 5], [7, 8]]
    ar = collect(decode(runtime, prompts, DecodeOptions(speculative=False, max_new_tokens=12)), 2)
    spec = DecodeOptions(max_new_tokens=12, beam=BUNDLE_BEAM)
    assert collect(decode(runtime, prompts, spec), 2) == ar
    with pytest.raises(ConfigError, match="int4 only"):
        quantization("int8", method="hqq")
    with pytest.raises(ConfigError, match="Core ML programs"):
        ExportOptions(targets=("coreml",), quantization=q)


@pytest.mark.parametrize("symmetric", [True, False], ids=["symmetric", "asymmetric"])
def test_native_int4_kernel_keeps_speculation_lossless(tiny_checkpoints, symmetric) -> None:
    """With the native library, blocks of 32 run on redrafter::MatMulInt4 (bit-identical
    rows whatever the call's row count), and TreeAttention folds a tree node's keys as the
    one-token step of its path does: greedy speculation (branching trees, the lookup beam) is
    token-identical to greedy autoregressive decoding."""
    from redrafter import ops

    if ops.library_path() is None:
        pytest.skip("native op library not built (make ops)")
    root, base_dir, drafter_dir = tiny_checkpoints
    q = quantization("int4", block_size=32, symmetric=symmetric)
    bundle = export_bundle(
        base_dir,
        root / f"int4-b32-{symmetric}",
        drafter_path=drafter_dir,
        options=ExportOptions(beam=BUNDLE_BEAM, quantization=q),
    )
    runtime = OnnxRuntime(bundle)
    assert runtime.int4 == "redrafter"
    prompts = [[1, 2, 3, 4, 5], [7, 8], [9, 10, 11, 12, 13, 14, 15, 16, 17]]
    ar = collect(decode(runtime, prompts, DecodeOptions(speculative=False, max_new_tokens=24)), 3)
    for packing in ("dedup", "full"):
        options = DecodeOptions(max_new_tokens=24, beam=BUNDLE_BEAM, packing=packing)
        assert collect(decode(runtime, prompts, options), 3) == ar
    lookup = DecodeOptions(max_new_tokens=24, beam=BeamShape(BUNDLE_BEAM.width, 4))
    assert collect(decode(runtime, prompts, lookup.replace(prompt_lookup=True)), 3) == ar
    # ONNX Runtime's own kernel on the same bundle, on request; the two agree to the rounding
    # of int8 activations (first-token logits of a prompt).
    theirs = OnnxRuntime(bundle, int4_kernel=False)
    assert theirs.int4 == "onnxruntime"
    tokens, lengths = np.array([[1, 2, 3, 4, 5]]), np.array([5])
    for rt in (runtime, theirs):
        rt.reset(batch=1, capacity=16)
    ours_logits, _ = runtime.prefill(tokens, lengths)
    ort_logits, _ = theirs.prefill(tokens, lengths)
    scale = np.abs(ort_logits).max()
    assert np.abs(ours_logits - ort_logits).max() < 0.05 * scale


def _sibling_matmuls() -> onnx.ModelProto:
    """x -> three MatMuls of one input (q/k/v-shaped) and two more of another (gate/up), plus a
    MatMul of a different K (never fused with them), as the exporter's graphs have them."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(3)
    shapes = {"wq": (64, 64), "wk": (64, 32), "wv": (64, 32), "wg": (64, 96), "wu": (64, 96)}
    weights = {k: rng.standard_normal(s).astype(np.float32) * 0.1 for k, s in shapes.items()}
    weights["wd"] = rng.standard_normal((96, 64)).astype(np.float32) * 0.1
    nodes = [
        helper.make_node("MatMul", ["x", "wq"], ["q"], name="q_proj"),
        helper.make_node("MatMul", ["x", "wk"], ["k"], name="k_proj"),
        helper.make_node("MatMul", ["x", "wv"], ["v"], name="v_proj"),
        helper.make_node("Add", ["q", "x"], ["h"]),
        helper.make_node("MatMul", ["h", "wg"], ["g"], name="gate_proj"),
        helper.make_node("MatMul", ["h", "wu"], ["u"], name="up_proj"),
        helper.make_node("Mul", ["g", "u"], ["gu"]),
        helper.make_node("MatMul", ["gu", "wd"], ["d"], name="down_proj"),
    ]
    outs = {"k": 32, "v": 32, "d": 64}
    graph = helper.make_graph(
        nodes,
        "siblings",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", 64])],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, ["M", w]) for o, w in outs.items()],
        [numpy_helper.from_array(w, k) for k, w in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    return model


def _residual_block() -> onnx.ModelProto:
    """A decoder layer's float steps around its projections, shapes inferred as the exporter's
    graphs record them: h = x + o_proj(x); y = h + down(act(gate(h)) * up(h)); then two Adds
    that must not fold: a bias (an initializer) and a broadcast ([M, 64] + [M, 1])."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(4)
    shapes = {"wo": (64, 64), "wg": (64, 96), "wu": (64, 96), "wd": (96, 64), "wb": (64, 64)}
    shapes["wc"] = (64, 64)
    weights = {k: rng.standard_normal(v).astype(np.float32) * 0.1 for k, v in shapes.items()}
    weights["bias"] = rng.standard_normal(64).astype(np.float32)
    weights["zero"], weights["one"] = np.array([0]), np.array([1])
    nodes = [
        helper.make_node("MatMul", ["x", "wo"], ["o"]),
        helper.make_node("Add", ["x", "o"], ["h"]),
        helper.make_node("MatMul", ["h", "wg"], ["g"]),
        helper.make_node("MatMul", ["h", "wu"], ["u"]),
        helper.make_node("Sigmoid", ["g"], ["s"]),
        helper.make_node("Mul", ["g", "s"], ["a"]),
        helper.make_node("Mul", ["a", "u"], ["au"]),
        helper.make_node("MatMul", ["au", "wd"], ["d"]),
        helper.make_node("Add", ["h", "d"], ["y"]),
        helper.make_node("MatMul", ["y", "wb"], ["b"]),
        helper.make_node("Add", ["b", "bias"], ["z"]),
        helper.make_node("MatMul", ["z", "wc"], ["c"]),
        helper.make_node("Slice", ["y", "zero", "one", "one"], ["y0"]),  # [M, 1]
        helper.make_node("Add", ["c", "y0"], ["e"]),
    ]
    graph = helper.make_graph(
        nodes,
        "residual_block",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", 64])],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, ["M", 64]) for o in ("z", "e")],
        [numpy_helper.from_array(w, k) for k, w in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    return onnx.shape_inference.infer_shapes(model)


def test_residual_adds_and_gate_muls_fold_into_the_int4_kernel_bit_for_bit(tmp_path) -> None:
    """With a library whose MatMulInt4 takes `residual` and `gate`, the runtime's swap folds a
    residual Add after a projection and a SwiGLU Mul before one into the node; outputs are the
    unfolded graph's bit for bit; an Add of a bias or a broadcast stays a node."""
    import onnxruntime as ort

    from redrafter import ops
    from redrafter.export.quantize import quantize_graph
    from redrafter.runtimes.onnxruntime import with_int4_kernel

    if ops.library_path() is None:
        pytest.skip("the native op library is not built (`make ops`)")
    path = tmp_path / "block.onnx"
    onnx.save(quantize_graph(_residual_block(), quantization("int4", block_size=32)), str(path))
    x = np.random.default_rng(6).standard_normal((5, 64)).astype(np.float32)
    outs, kinds = {}, {}
    for inputs in (6, ops.matmul_int4_max_inputs()):
        graph = with_int4_kernel(path, max_inputs=inputs)
        assert graph is not None
        model = onnx.load_from_string(graph)
        kinds[inputs] = collections.Counter(node.op_type for node in model.graph.node)
        options = ort.SessionOptions()
        ops.register(options, required=True)
        sess = ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
        outs[inputs] = sess.run(None, {"x": x})
    assert (kinds[6]["Add"], kinds[6]["Mul"]) == (4, 2)
    assert (kinds[8]["Add"], kinds[8]["Mul"]) == (2, 1)  # bias and broadcast Adds; act's Mul
    assert kinds[8]["MatMulInt4"] == kinds[6]["MatMulInt4"] == 5  # gate/up: one, and a Split
    for got, want in zip(outs[8], outs[6], strict=True):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("symmetric", [True, False], ids=["symmetric", "asymmetric"])
def test_sibling_matmuls_fuse_without_changing_a_bit(tmp_path, symmetric) -> None:
    """q/k/v and gate/up, each one MatMul of one input, quantize as one wider MatMulNBits and a
    Split; block quantization is per column, so the fused graph gives the separate MatMuls'
    outputs bit for bit on the native kernel, and on ONNX Runtime's own kernel too."""
    import onnxruntime as ort

    from redrafter import ops
    from redrafter.export.quantize import quantize_graph
    from redrafter.runtimes.onnxruntime import with_int4_kernel

    q = quantization("int4", block_size=32, symmetric=symmetric)
    graphs = {}
    for fuse in (False, True):
        path = tmp_path / f"fuse-{fuse}.onnx"
        onnx.save(quantize_graph(_sibling_matmuls(), q, fuse=fuse), str(path))
        graphs[fuse] = path
    fused = onnx.load(str(graphs[True]))
    kinds = collections.Counter(node.op_type for node in fused.graph.node)
    assert (kinds["MatMulNBits"], kinds["Split"], kinds["MatMul"]) == (3, 2, 0)
    x = np.random.default_rng(5).standard_normal((7, 64)).astype(np.float32)  # (M, K)
    kernels: list[tuple[str, bool]] = [("onnxruntime", False)]
    if ops.library_path() is not None:
        kernels.append(("redrafter", True))
        # The native kernel takes a Split's outputs itself (MatMulInt4's `split` attribute).
        folded = onnx.load_from_string(
            with_int4_kernel(graphs[True], max_outputs=ops.matmul_int4_max_outputs())
        )
        kinds = collections.Counter(node.op_type for node in folded.graph.node)
        assert (kinds["MatMulInt4"], kinds["Split"]) == (3, 0)
        widths = [len(node.output) for node in folded.graph.node if node.op_type == "MatMulInt4"]
        assert widths == [3, 2, 1]  # q/k/v, gate/up, down
    for kernel, native in kernels:
        outs = []
        for fuse, fold in ((False, 1), (True, 1), (True, 4)):
            if fold > 1 and not native:
                continue
            options = ort.SessionOptions()
            model: str | bytes = str(graphs[fuse])
            if native:
                ops.register(options, required=True)
                model = with_int4_kernel(graphs[fuse], max_outputs=fold) or model
            sess = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
            outs.append(sess.run(None, {"x": x}))
        for got in outs[1:]:
            for a, b, name in zip(outs[0], got, ("k", "v", "d"), strict=True):
                np.testing.assert_array_equal(a, b, err_msg=f"{kernel}: {name}")


def test_native_int4_kernel_is_refused_where_it_cannot_run(int4_bundle) -> None:
    from redrafter.errors import RuntimeUnavailableError

    with pytest.raises(RuntimeUnavailableError, match="native int4 kernel"):
        OnnxRuntime(int4_bundle, native=False, int4_kernel=True)
    # blocks of 16 are not the kernel's: ONNX Runtime's MatMulNBits runs them
    assert OnnxRuntime(int4_bundle, native=False).int4 == "onnxruntime"
