"""Core ML export (docs/design.md §4, Core ML bullet), the Core ML runtime and parity on Linux
through the MIL evaluator (`coreml-mil`), on tiny random models: the saved spec has fp16 states
and one SDPA per layer, the conversion traps stay fixed, float32 programs match the torch
reference's tensors, float16 speculation changes no token, and macOS-only paths run on macOS and
say why elsewhere. Greedy tokens equal to the reference's, long accepts, ragged batches and
seeded sampling through the MIL evaluator (and Apple's runtime on macOS) are pinned in
test_conformance.py."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from redrafter.build import ExportOptions, export_bundle
from redrafter.bundle import names
from redrafter.cli import main
from redrafter.config import LOG_0, BeamShape
from redrafter.decoding import AUTOREGRESSIVE, DecodeOptions, decode
from redrafter.decoding.tree import pack
from redrafter.errors import ConfigError, RuntimeUnavailableError
from redrafter.export import coreml
from redrafter.runtimes.coreml import CoreMLRuntime
from redrafter.runtimes.coreml_mil import CoreMLMilRuntime, MilProgram
from redrafter.validate.tensors import compare_runtimes

from conftest import BUNDLE_BEAM as BEAM
from conftest import BUNDLE_SHAPE as SHAPE
from conftest import collect, tiny_base, write_hf_checkpoint

pytest.importorskip("coremltools", reason="Core ML export needs coremltools (macOS or Linux)")
ct = coreml.import_coremltools()
PROMPTS = [[1, 2, 3, 4, 5], [7, 8], [9, 10, 11, 12, 13, 14, 15, 16, 17]]
ON_MACOS = pytest.mark.skipif(
    sys.platform != "darwin", reason="Core ML prediction (MLModel.predict) needs macOS 15+"
)


@pytest.fixture(scope="module")
def bundle16(tiny_checkpoints):
    """`redrafter export --target onnx,coreml`: ONNX float32 beside Core ML float16."""
    root, base_dir, drafter_dir = tiny_checkpoints
    out = root / "bundle16"
    result = CliRunner().invoke(
        main,
        ["export", "--base", str(base_dir), "--drafter", str(drafter_dir), "--out", str(out)]
        + ["--target", "onnx,coreml", "--beam-width", "3", "--beam-length", "4"],
    )
    assert result.exit_code == 0, result.output
    from redrafter.bundle import load_bundle

    return load_bundle(out)


# -- the bundle and the saved programs -----------------------------------------------------------
def test_bundle_layout_and_manifest(coreml_bundle32, bundle16) -> None:
    files = set(coreml_bundle32.manifest.files)
    assert any(f.startswith("coreml/base.mlpackage/") for f in files)
    assert any(f.startswith("coreml/drafter.mlpackage/") for f in files)
    assert not any(f.startswith("onnx/") for f in files) and coreml_bundle32.manifest.onnx is None
    record = coreml_bundle32.manifest.coreml
    assert record is not None
    assert record.deployment_target == "iOS18" and record.batch == 1
    assert record.compute_precision == "float32" and record.state_split
    assert record.commit_length == BEAM.length and record.capacity == 256
    assert record.parity is not None and record.parity.passed, record.parity
    both = bundle16.manifest
    assert both.targets == ("onnx", "coreml") and both.parity is not None and both.parity.passed
    assert {"onnx/base.onnx", "tokenizer/tokenizer.json"} <= set(both.files)
    assert both.coreml is not None and both.coreml.compute_precision == "float16"
    assert both.coreml.parity is not None and both.coreml.parity.passed
    assert not both.coreml.state_split


def _spec(bundle, name: str):
    model = ct.models.MLModel(str(bundle.path(f"coreml/{name}.mlpackage")), skip_model_load=True)
    return model.get_spec()


@pytest.mark.parametrize("which", ["coreml_bundle32", "bundle16"])
def test_saved_spec_has_fp16_states_and_one_sdpa_per_layer(which, request) -> None:
    bundle = request.getfixturevalue(which)
    spec = _spec(bundle, "base")
    assert spec.WhichOneof("Type") == "mlProgram"
    assert spec.specificationVersion >= 9  # iOS 18 / macOS 15: states
    split = which == "coreml_bundle32"
    want = names.state_names(SHAPE["num_hidden_layers"], split=split)
    states = spec.description.state
    assert [s.name for s in states] == want
    for s in states:
        array = s.type.stateType.arrayType
        assert list(array.shape) == [1, 1, 256, 8]  # (1, Hkv, S, D)
        assert array.dataType == ct.proto.FeatureTypes_pb2.ArrayFeatureType.FLOAT16
    assert [i.name for i in spec.description.input] == list(names.COREML_BASE_INPUTS)
    assert [o.name for o in spec.description.output] == list(names.BASE_OUTPUTS)
    ops = [op.op_type for op in MilProgram.from_package(bundle.path("coreml/base.mlpackage")).ops]
    assert ops.count("scaled_dot_product_attention") == SHAPE["num_hidden_layers"]
    assert ops.count("read_state") == ops.count("coreml_update_state") == len(want)
    assert "slice_update" in ops and "gather" in ops  # K/V at P; the commit's rows
    assert "inverse" not in ops  # RoPE frequencies are constants, no 1/x (see below)


def test_spec_io_dtypes_match_the_program(bundle16) -> None:
    """The Core ML runtime reads input dtypes from the spec, the MIL runtime from the program:
    they must agree; float outputs are float32 even in the float16 program."""
    from redrafter.runtimes.coreml import _spec_dtype

    for name in ("base", "drafter"):
        spec = _spec(bundle16, name)
        program = MilProgram.from_package(bundle16.path(f"coreml/{name}.mlpackage"))
        for feature in spec.description.input:
            assert _spec_dtype(feature) == program.input_dtype(feature.name), feature.name
        for feature in spec.description.output:
            want = "INT32" if feature.name == "beams" else "FLOAT32"
            array = ct.proto.FeatureTypes_pb2.ArrayFeatureType
            assert feature.type.multiArrayType.dataType == array.ArrayDataType.Value(want)


def test_trap_no_16_bit_integers_in_the_fp16_programs(bundle16) -> None:
    """coremltools' fp16 pipeline (`add_int16_cast`) would carry token ids and top-k indices in
    int16/uint16: ids past 32767 wrap, top-k over W*V past 65535 cannot be indexed. We remove
    the pass; no 16-bit integer may appear."""
    types = ct.converters.mil.mil.types
    for name in ("base", "drafter"):
        program = MilProgram.from_package(bundle16.path(f"coreml/{name}.mlpackage"))
        dtypes = {types.builtin_to_string(v.dtype) for op in program.ops for v in op.outputs}
        assert "fp16" in dtypes and not dtypes & {"int16", "uint16"}, (name, dtypes)


def test_sdpa_gets_a_boolean_mask_and_no_scale(coreml_bundle32) -> None:
    program = MilProgram.from_package(coreml_bundle32.path("coreml/base.mlpackage"))
    for op in program.ops:
        if op.op_type == "scaled_dot_product_attention":
            assert op.attn_mask.dtype == ct.converters.mil.mil.types.bool
            q, k = op.query.shape, op.key.shape
            assert q[1] == k[1] == SHAPE["num_attention_heads"]  # KV heads repeated for GQA
            assert k[2] == 256  # attends over the whole cache, masked


# -- conversion traps ---------------------------------------------------------------------------
def _mil(module: torch.nn.Module, *args: torch.Tensor, dtype: str = "float32"):
    program = torch.export.export(module, args).run_decompositions({})
    return coreml.convert(program, dtype=dtype, outputs=("y",), convert_to="milinternal")


class _Reciprocal(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 1.0 / x


def test_trap_reciprocal_lowers_to_inverse_with_epsilon(coreml_bundle32) -> None:
    """coremltools lowers 1/x to `inverse(epsilon=1e-4)`: on RoPE's 1/theta^(i/D) that shifts the
    frequencies. Our inv_freq is a float64-computed constant: the base program has no inverse."""
    ops = list(_mil(_Reciprocal(), torch.ones(3)).functions["main"].operations)
    inverse = [op for op in ops if op.op_type == "inverse"]
    assert inverse and inverse[0].epsilon.val == pytest.approx(1e-4)
    program = MilProgram.from_package(coreml_bundle32.path("coreml/base.mlpackage"))
    assert not [op for op in program.ops if op.op_type == "inverse"]


def test_trap_rmsnorm_rsqrt_epsilon_is_negligible(coreml_bundle32) -> None:
    """RMSNorm's rsqrt(mean + eps) becomes add(eps) then rsqrt(epsilon=1e-12): the extra epsilon
    is 1e-7 of the model's own, far below fp32 rounding."""
    program = MilProgram.from_package(coreml_bundle32.path("coreml/base.mlpackage"))
    rsqrt = [op for op in program.ops if op.op_type == "rsqrt"]
    assert len(rsqrt) == 2 * SHAPE["num_hidden_layers"] + 1
    for op in rsqrt:
        assert op.epsilon.val <= 1e-11
        assert op.x.op.op_type == "add"  # + rms_norm_eps, from the model


class _LogSoftmax(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(x, dim=-1)


def test_trap_log_softmax_in_fp16_keeps_small_and_masked_log_probs() -> None:
    """coremltools 9.0 lowers log_softmax to log(softmax): in fp16 log-probs below ~-16.6
    underflow and LOG_0 becomes ~-103. Our override computes x - max - log(sum(exp(...)))."""
    x = torch.tensor([[0.0, -20.0, LOG_0, -3.0]])
    program = MilProgram(_mil(_LogSoftmax(), x, dtype="float16"))
    (y,) = program.run({"x": x.numpy()}).values()
    want = torch.log_softmax(x, -1).numpy()
    assert abs(y[0, 1] - want[0, 1]) < 0.05 and y[0, 2] < LOG_0 / 2


class _Flatten(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T = x.shape
        return x.view(B, T, 1).expand(B, T, 4).reshape(B, T * 4)


@pytest.mark.skipif(
    tuple(int(v) for v in np.__version__.split(".")[:2]) < (2, 4), reason="the trap is numpy>=2.4"
)
def test_trap_torchscript_path_breaks_with_numpy_2_4() -> None:
    """coremltools 9.0's TorchScript frontend calls int() on 1-element arrays, which numpy 2.4
    rejects; we convert through torch.export, which does not."""
    traced = torch.jit.trace(_Flatten().eval(), torch.zeros(2, 3))
    with pytest.raises(TypeError, match="only 0-dimensional arrays"), coreml.quiet():
        ct.convert(traced, inputs=[ct.TensorType(shape=(2, 3))], convert_to="milinternal")
    assert _mil(_Flatten(), torch.zeros(2, 3)) is not None


def test_trap_torch_newer_than_coremltools_tested_is_recorded() -> None:
    """coremltools 9.0 is tested up to torch 2.7.0 and warns on import with torch 2.13
    ("Torch version 2.13.0+cpu has not been tested with coremltools"). Conversion and parity
    hold regardless (this file); the CLI silences the warning. If coremltools catches up,
    update docs/coreml.md."""
    from coremltools import _deps

    tested = tuple(int(v) for v in _deps._TORCH_MAX_VERSION.split(".")[:2])
    ours = tuple(int(v) for v in torch.__version__.split(".")[:2])
    assert ours > tested, "coremltools now claims this torch: update docs/coreml.md"


# -- the wrapper, eagerly --------------------------------------------------------------------------
def test_stateful_wrapper_eagerly_equals_the_reference(torch_reference) -> None:
    """`StatefulBase` (states + in-program commit) run as torch equals the torch runtime: a
    prefill, a verify of a packed tree, a commit of a non-first beam, and one more token."""
    S, L = 64, BEAM.length
    module = coreml.StatefulBase(torch_reference.base, capacity=S, commit_length=L, split=True)
    torch_reference.reset(batch=1, capacity=S)

    def run(tokens, positions, mask, P, commit_from=np.arange(L), commit_at=0):
        with torch.no_grad():
            logits, _ = module(
                *(torch.from_numpy(np.asarray(a))[None] for a in (tokens, positions, mask)),
                torch.tensor([P]),
                torch.from_numpy(np.asarray(commit_from)),
                torch.tensor([commit_at]),
            )
        return logits[0].numpy()

    prompt = np.array([3, 1, 4, 1, 5, 9])
    causal = np.tril(np.ones((6, 6), bool))
    got = run(prompt, np.arange(6), causal, 0)
    want, _ = torch_reference.verify(prompt[None], np.arange(6)[None], causal[None], np.array([0]))
    np.testing.assert_allclose(got, want[0], atol=1e-4)
    tree = pack(np.array([[[2, 6, 5, 3], [2, 7, 1, 8], [2, 7, 1, 9]]]))
    args = (tree.tokens, 6 + tree.depth, tree.tree_mask)
    got = run(*(a[0] for a in args), 6)
    want, _ = torch_reference.verify(*args, np.array([6]))
    np.testing.assert_allclose(got, want[0], atol=1e-4)
    source = tree.unpacker[0, 2]  # beam 2, all 4 accepted: slots 0, 4, 5, 7 move to 0..3
    torch_reference.commit(np.array([6]), source[None], np.array([4]))
    got = run([8], [10], np.ones((1, 1), bool), 10, commit_from=6 + source, commit_at=6)
    one = np.ones((1, 1, 1), bool)
    want, _ = torch_reference.verify(np.array([[8]]), np.array([[10]]), one, np.array([10]))
    np.testing.assert_allclose(got, want[0], atol=1e-4)


# -- parity through the MIL evaluator ---------------------------------------------------------
def test_mil_tensor_parity_float32(coreml_bundle32, torch_reference) -> None:
    report = compare_runtimes(
        CoreMLMilRuntime(coreml_bundle32), torch_reference, dtype="float32", beam=BEAM
    )
    assert report.passed, report.checks
    assert max(c.max_abs for c in report.checks) < 1e-4  # fp32 rounding, not fp16 states


def test_mil_float16_speculation_changes_nothing(bundle16) -> None:
    runtime = CoreMLMilRuntime(bundle16)
    assert runtime.precision == "float16"
    want = collect(decode(runtime, PROMPTS[:1], AUTOREGRESSIVE.replace(max_new_tokens=10)), 1)
    got = collect(decode(runtime, PROMPTS[:1], DecodeOptions(max_new_tokens=10, beam=BEAM)), 1)
    assert got == want
    _, log_probs = runtime.draft(np.ones((1, 32), np.float32), np.array([5]), BEAM)
    masked = log_probs < LOG_0 / 2  # the log_softmax fix keeps LOG_0 entries at ~LOG_0
    assert masked.sum(-1).min() >= 61 - 50 - 2


def test_validate_cli_runs_coreml_mil(bundle16, tmp_path) -> None:
    report = tmp_path / "report.json"
    result = CliRunner().invoke(
        main,
        ["validate", "--bundle", str(bundle16.root), "--runtime", "coreml-mil"]
        + ["--prompts", str(_prompts(tmp_path)), "--max-new-tokens", "6", "--json", str(report)],
    )
    assert result.exit_code == 0, result.output
    data = json.loads(report.read_text())
    assert data["runtime"] == "coreml-mil" and data["dtype"] == "float16" and data["passed"]
    help_text = " ".join(CliRunner().invoke(main, ["validate", "--help"]).output.split())
    assert "converted Core ML program" in help_text and "not Apple's runtime" in help_text


def _prompts(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("w1 w2 w3\n")
    return path


def test_generate_cli_on_coreml_mil(coreml_bundle32) -> None:
    result = CliRunner().invoke(
        main,
        ["generate", "--bundle", str(coreml_bundle32.root), "--runtime", "coreml-mil"]
        + ["--prompt-ids", "3,4,5", "--max-new-tokens", "5", "--json"],
    )
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert len(out["token_ids"]) == 5 and out["stats"]["runtime"] == "coreml-mil"


# -- errors -------------------------------------------------------------------------------------
def test_capacity_and_option_errors(coreml_bundle32) -> None:
    runtime = CoreMLMilRuntime(coreml_bundle32)
    with pytest.raises(RuntimeUnavailableError, match="Core ML cache holds 256"):
        runtime.reset(batch=1, capacity=257)
    runtime.reset(batch=1, capacity=32)
    with pytest.raises(RuntimeUnavailableError, match="exported for beam 3x4"):
        runtime.draft(np.zeros((1, 32), np.float32), np.array([1]), BeamShape(2, 3))
    with pytest.raises(ConfigError, match="coreml_dtype"):
        ExportOptions(targets=("coreml",), coreml_dtype="int8")


def test_onnx_only_bundle_has_no_coreml_programs(tmp_path) -> None:
    base = tiny_base(seed=3, num_hidden_layers=1)
    base_dir = write_hf_checkpoint(base, tmp_path / "base", tokenizer=False)
    bundle = export_bundle(base_dir, tmp_path / "b", options=ExportOptions())
    with pytest.raises(RuntimeUnavailableError, match="export with --target coreml"):
        CoreMLMilRuntime(bundle)


@pytest.mark.skipif(sys.platform == "darwin", reason="checks the message shown off macOS")
def test_coreml_runtime_off_macos_says_it_needs_macos(coreml_bundle32) -> None:
    with pytest.raises(RuntimeUnavailableError, match="needs macOS 15"):
        CoreMLRuntime(coreml_bundle32)
    result = CliRunner().invoke(
        main,
        [
            "generate",
            "--bundle",
            str(coreml_bundle32.root),
            "--runtime",
            "coreml",
            "--prompt-ids",
            "1",
        ],
    )
    assert result.exit_code == 2 and "needs macOS" in result.output
    assert "Traceback" not in result.output


# -- Apple's runtime (macOS 15+ only) --------------------------------------------------------------
@ON_MACOS
def test_coreml_predict_agrees_with_the_mil_evaluator(bundle16, torch_reference) -> None:
    for candidate in (CoreMLRuntime(bundle16), CoreMLMilRuntime(bundle16)):
        report = compare_runtimes(candidate, torch_reference, dtype="float16", beam=BEAM)
        assert report.passed, (candidate.name, report.checks)
