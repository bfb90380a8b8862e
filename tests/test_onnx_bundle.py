"""ONNX export, the bundle, the ONNX Runtime runtime and `redrafter validate` (docs/design.md
§4-§7), on tiny random models: the graph keeps one `redrafter::TreeAttention` node per layer,
stock ORT runs it through the portable body, one weights file serves several beam shapes, the
native library binds the cache in place, and bad bundles get one-line errors. Greedy tokens equal
to the torch reference's autoregressive tokens, long accepts, ragged batches and seeded sampling
are pinned for ORT (portable, native, CUDA) in test_conformance.py."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

import redrafter
from redrafter.build import ExportOptions, export_bundle
from redrafter.bundle import BundleError, exporter_fingerprint, load_bundle
from redrafter.cli import main
from redrafter.config import BeamShape
from redrafter.decoding import AUTOREGRESSIVE, DecodeOptions, decode
from redrafter.errors import RedrafterError
from redrafter.ops import library_path
from redrafter.runtimes.onnxruntime import OnnxRuntime

from conftest import BUNDLE_SHAPE as SHAPE
from conftest import collect, tiny_base, write_hf_checkpoint

PROMPTS_3 = [[1, 2, 3, 4, 5], [7, 8], [9, 10, 11, 12, 13, 14, 15, 16, 17]]


def test_bundle_layout_and_manifest(onnx_bundle) -> None:
    m = onnx_bundle.manifest
    assert {"onnx/base.onnx", "onnx/drafter-w3-l4.onnx", "tokenizer/tokenizer.json"} <= set(m.files)
    assert m.format_version == 1 and m.dtype == "float32"
    op = m.custom_op
    assert (op.domain, op.name, op.version) == ("redrafter", "TreeAttention", 2)
    assert m.beam == BeamShape(3, 4) and m.onnx is not None and m.onnx.opset == 18
    assert m.parity is not None and m.parity.passed
    for meta in m.files.values():
        assert len(meta.sha256) == 64
    # Caches of bundles (make demo, benchmarks) re-export when the exporter's code changes.
    assert m.exporter == exporter_fingerprint() and len(m.exporter) == 16


def test_base_graph_has_one_tree_attention_node_per_layer(onnx_bundle) -> None:
    model = onnx.load(str(onnx_bundle.path("onnx/base.onnx")), load_external_data=False)
    nodes = [n for n in model.graph.node if n.domain == "redrafter"]
    assert [n.op_type for n in nodes] == ["TreeAttention"] * SHAPE["num_hidden_layers"]
    assert [(f.domain, f.name) for f in model.functions] == [("redrafter", "TreeAttention")]
    assert {(o.domain, o.version) for o in model.opset_import} >= {("", 18), ("redrafter", 2)}
    # Version 2: the op takes the projections and the rotary table; no head split, rotary or
    # head merge is left in the graph (they cost ~20 small nodes per layer).
    assert all(len(n.input) == 9 for n in nodes)
    assert not {"Transpose", "Neg", "Split"} & {n.op_type for n in model.graph.node}


def test_rmsnorm_is_exported_in_the_form_onnx_runtime_fuses(onnx_bundle, tmp_path) -> None:
    """Every RMSNorm (2 per layer + the final one) reaches ORT as x / Sqrt(...), which its
    optimizer turns into one SimplifiedLayerNormalization; torch's rsqrt form stays 7 nodes."""
    import onnxruntime as ort

    norms = 2 * SHAPE["num_hidden_layers"] + 1
    model = onnx.load(str(onnx_bundle.path("onnx/base.onnx")), load_external_data=False)
    ops = [n.op_type for n in model.graph.node]
    assert "Reciprocal" not in ops and ops.count("Div") == ops.count("Sqrt") == norms
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    options.add_session_config_entry(
        "session.optimized_model_external_initializers_file_name", "optimized.data"
    )
    library = library_path()
    if library is not None:
        options.register_custom_ops_library(str(library))
    ort.InferenceSession(str(onnx_bundle.path("onnx/base.onnx")), options, ["CPUExecutionProvider"])
    optimized = onnx.load(str(tmp_path / "optimized.onnx"), load_external_data=False)
    fused = [n for n in optimized.graph.node if n.op_type == "SimplifiedLayerNormalization"]
    assert len(fused) == norms


def test_checker_passes_in_a_process_that_registered_nothing(onnx_bundle) -> None:
    code = (
        "import sys, onnx\n"
        "for p in sys.argv[1:]:\n"
        "    onnx.checker.check_model(p, full_check=True)\n"
        "print('ok')\n"
    )
    paths = [
        str(onnx_bundle.path("onnx/base.onnx")),
        str(onnx_bundle.path("onnx/drafter-w3-l4.onnx")),
    ]
    out = subprocess.run([sys.executable, "-c", code, *paths], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_several_beam_shapes_share_one_weights_file(
    tiny_checkpoints, onnx_bundle, torch_reference
) -> None:
    root, base_dir, drafter_dir = tiny_checkpoints
    beams = (BeamShape(1, 2), BeamShape(4, 5))
    b = export_bundle(
        base_dir,
        root / "bundle-multi",
        drafter_path=drafter_dir,
        options=ExportOptions(beam=beams[0], extra_beams=beams[1:]),
    )
    assert b.manifest.parity is not None and b.manifest.parity.passed, b.manifest.parity
    assert set(b.drafter_graphs) == set(beams)
    # Identical tensors are stored once: two drafter graphs cost no more disk than one.
    single = onnx_bundle.manifest.files["onnx/weights.data"].bytes
    assert b.manifest.files["onnx/weights.data"].bytes <= 1.05 * single
    runtime = OnnxRuntime(b)
    want = collect(decode(torch_reference, PROMPTS_3, AUTOREGRESSIVE.replace(max_new_tokens=16)), 3)
    for beam in beams:
        got = collect(decode(runtime, PROMPTS_3, DecodeOptions(max_new_tokens=16, beam=beam)), 3)
        assert got == want
    with pytest.raises(RedrafterError, match="re-export with --beam-width"):
        runtime.draft(np.zeros((1, 32), np.float32), np.zeros(1, np.int64), BeamShape(2, 3))


def test_fp16_bundle_validates_under_tolerance(tiny_checkpoints) -> None:
    root, base_dir, drafter_dir = tiny_checkpoints
    b = export_bundle(
        base_dir,
        root / "bundle-fp16",
        drafter_path=drafter_dir,
        options=ExportOptions(beam=BeamShape(3, 4), dtype="float16"),
    )
    assert b.manifest.parity is not None and b.manifest.parity.passed, b.manifest.parity
    result = CliRunner().invoke(
        main, ["validate", "--bundle", str(b.root), "--max-new-tokens", "12"]
    )
    assert result.exit_code == 0, result.output
    assert "onnxruntime autoregressive (float16)" in result.output


def test_library_api_loads_a_bundle(onnx_bundle) -> None:
    pipe = redrafter.load(onnx_bundle.root)
    out = pipe.generate(["w1 w2 w3"])
    assert out.texts is not None and len(out.token_ids[0]) == 64
    assert pipe.defaults.beam == onnx_bundle.beam
    steps = list(pipe.stream([[3, 4, 5]]))
    assert steps[0].kind == "prefill" and all(s.new_tokens[0] for s in steps)


def test_validate_cli_passes_and_writes_json(onnx_bundle, tmp_path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("w1 w2 w3\nw4 w5\nw6 w7 w8 w9\n")
    report = tmp_path / "report.json"
    result = CliRunner().invoke(
        main,
        [
            "validate",
            "--bundle",
            str(onnx_bundle.root),
            "--prompts",
            str(prompts),
            "--max-new-tokens",
            "10",
            "--json",
            str(report),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "PASS" in result.output and "verify logits" in result.output
    data = json.loads(report.read_text())
    assert data["passed"] and data["token_parity"] == "3/3"
    assert {c["output"] for c in data["tensors"]} >= {
        "prefill logits",
        "verify logits",
        "log_probs",
        "beams",
    }


def test_validate_fails_with_exit_1_against_another_model(onnx_bundle, tmp_path) -> None:
    other = write_hf_checkpoint(tiny_base(seed=9, **SHAPE), tmp_path / "other")
    result = CliRunner().invoke(
        main,
        [
            "validate",
            "--bundle",
            str(onnx_bundle.root),
            "--base",
            str(other),
            "--max-new-tokens",
            "8",
        ],
    )
    assert result.exit_code == 1, result.output
    assert "FAIL" in result.output and "DIVERGES" in result.output


def test_generate_cli_on_a_bundle(onnx_bundle) -> None:
    result = CliRunner().invoke(
        main,
        [
            "generate",
            "--bundle",
            str(onnx_bundle.root),
            "--prompt-ids",
            "3,4,5",
            "--max-new-tokens",
            "9",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert len(out["token_ids"]) == 9
    assert out["stats"]["runtime"] == "onnxruntime"
    assert out["stats"]["implementation"] in ("native", "portable")


def _broken_copy(onnx_bundle, tmp_path: Path, name: str) -> Path:
    dst = tmp_path / name
    shutil.copytree(onnx_bundle.root, dst)
    return dst


@pytest.mark.parametrize(
    "damage,message",
    [
        ("missing", "missing"),
        ("tampered", "checksum mismatch"),
        ("version", "format version"),
        ("domain", "unknown custom-op domain"),
        ("not-a-bundle", "not a bundle"),
    ],
)
def test_bad_bundles_get_one_line_errors(onnx_bundle, tmp_path, damage, message) -> None:
    root = _broken_copy(onnx_bundle, tmp_path, damage)
    manifest = json.loads((root / "manifest.json").read_text())
    if damage == "missing":
        (root / "onnx" / "drafter-w3-l4.onnx").unlink()
    elif damage == "tampered":
        with open(root / "tokenizer" / "tokenizer.json", "a") as f:
            f.write(" ")
    elif damage == "version":
        manifest["format_version"] = 99
    elif damage == "domain":
        manifest["custom_op"]["domain"] = "com.example"
    else:
        (root / "manifest.json").unlink()
    if damage in ("version", "domain"):
        (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=message):
        load_bundle(root)
    for command in (
        ["validate", "--bundle", str(root)],
        ["generate", "--bundle", str(root), "--prompt-ids", "1,2"],
    ):
        result = CliRunner().invoke(main, command)
        assert result.exit_code == 2, result.output
        assert message in result.output and "Traceback" not in result.output


def test_export_is_atomic_and_never_clobbers(
    tiny_checkpoints, onnx_bundle, monkeypatch, tmp_path
) -> None:
    root, base_dir, drafter_dir = tiny_checkpoints
    # An existing bundle is kept unless --overwrite.
    result = CliRunner().invoke(
        main,
        [
            "export",
            "--base",
            str(base_dir),
            "--drafter",
            str(drafter_dir),
            "--out",
            str(onnx_bundle.root),
        ],
    )
    assert result.exit_code == 2 and "--overwrite" in result.output
    load_bundle(onnx_bundle.root)  # still intact
    # A failing export leaves nothing behind, not even its temp dir.
    import redrafter.build

    def boom(*args, **kwargs):
        raise RuntimeError("simulated crash in the middle of an export")

    monkeypatch.setattr(redrafter.build, "export_drafter", boom)
    out = tmp_path / "partial"
    with pytest.raises(RuntimeError, match="simulated"):
        export_bundle(base_dir, out, drafter_path=drafter_dir)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_portable_cache_and_native_binding(onnx_bundle) -> None:
    """The portable body ping-pongs between two cache buffers; the native library writes one
    buffer in place (its input and output bound to the same address)."""
    portable = OnnxRuntime(onnx_bundle, native=False)
    portable.reset(batch=1, capacity=32)
    assert len(portable.buffers) == 2
    if library_path() is not None:
        native = OnnxRuntime(onnx_bundle, native=True)
        native.reset(batch=1, capacity=32)
        before = native.arrays[0].copy()
        native.prefill(np.array([[3, 4, 5, 6]]), np.array([4]))
        assert len(native.buffers) == 1
        changed = np.any(native.arrays[0] != before, axis=(0, 1, 2, 3, 5))  # (S,)
        assert changed[:4].all() and not changed[4:].any()  # rows [0, 4) written in place


@pytest.mark.parametrize("native", [False, True], ids=["portable", "native"])
def test_narrow_outputs_equal_the_full_ones(onnx_bundle, native: bool) -> None:
    """`verify_greedy` (the graph's next_tokens, the logits never bound) gives the argmax of
    `verify`'s logits, and `draft_tokens` (the drafter graph's draft_log_probs) each draft's
    entry of `draft`'s distributions; graphs exported before those outputs existed get the
    same from the host."""
    if native and library_path() is None:
        pytest.skip("the native op library is not built (make ops)")
    runtime = OnnxRuntime(onnx_bundle, native=native)
    assert runtime._next_tokens  # this exporter writes next_tokens
    tokens = np.array([[3, 4, 5, 6, 7], [9, 8, 7, 6, 5]])  # (2, 5)
    positions = np.array([[0, 1, 2, 3, 3], [0, 1, 2, 2, 3]])
    mask = np.tril(np.ones((5, 5), bool))[None].repeat(2, 0)  # (2, 5, 5)
    mask[0, 4, 3] = mask[1, 3, 2] = mask[1, 4, 3] = False  # two branches per row
    past = np.zeros(2, np.int64)

    def run(method):
        runtime.reset(batch=2, capacity=16)
        return method(tokens, positions, mask, past)

    logits, hidden = run(runtime.verify)  # (2, 5, V), (2, 5, E)
    for graph_output in (True, False):
        runtime._next_tokens = graph_output
        ids, hidden_g = run(runtime.verify_greedy)
        np.testing.assert_array_equal(ids, logits.argmax(-1))
        assert ids.dtype == np.int64 and ids.shape == (2, 5)
        np.testing.assert_array_equal(hidden_g, hidden)

    beam = onnx_bundle.manifest.beam
    context = np.random.default_rng(0).standard_normal((2, hidden.shape[-1])).astype(np.float32)
    g0 = np.array([5, 11])
    beams, log_probs = runtime.draft(context, g0, beam)  # (2, W, L), (2, W, L-1, V)
    beams_t, drafted = runtime.draft_tokens(context, g0, beam)
    np.testing.assert_array_equal(beams_t, beams)
    want = np.take_along_axis(log_probs, beams[:, :, 1:, None], -1)[..., 0]  # (2, W, L-1)
    np.testing.assert_allclose(drafted, want, rtol=1e-6, atol=1e-6)
    session = runtime._drafter_session(beam)
    assert "draft_log_probs" in {o.name for o in session.get_outputs()}


@pytest.mark.parametrize("native", [False, True], ids=["portable", "native"])
def test_device_commit_graph_moves_what_numpy_moves(onnx_bundle, native: bool) -> None:
    """The commit graph CUDA runs (KVCommit in place / portable gather-scatter into the second
    buffer), run here on the CPU provider, moves exactly the rows the host commit moves: rows
    with nothing to move, the identity path, and real moves, in one call."""
    if native and library_path() is None:
        pytest.skip("the native op library is not built (make ops)")
    rng = np.random.default_rng(1)
    host = OnnxRuntime(onnx_bundle, native=native)
    device = OnnxRuntime(onnx_bundle, native=native, device_commit=True)
    for rt in (host, device):
        rt.reset(batch=3, capacity=24)
    start = rng.standard_normal(host.arrays[0].shape).astype(np.float32)
    for rt in (host, device):
        for a in rt.arrays:
            a[...] = start
    past = np.array([4, 9, 2])
    source = np.array([[0, 2, 5, 6], [0, 1, 2, 0], [0, 3, 4, 7]])  # (3, 4)
    count = np.array([4, 3, 0])  # row 1: identity, row 2: nothing
    host.commit(past, source, count)
    device.commit(past, source, count)
    np.testing.assert_array_equal(device.arrays[device.live], host.arrays[host.live])
    moved = host.arrays[host.live][:, :, 0, :, 4:8]  # row 0's slots P..P+3
    np.testing.assert_array_equal(moved, start[:, :, 0, :, [4, 6, 9, 10]].transpose(1, 2, 3, 0, 4))


def test_a_small_drafter_runs_on_one_thread_a_large_one_on_all() -> None:
    """drafter_threads: one intra-op thread for a drafter step under ONE_THREAD_DRAFT_MACS on the
    CPU (SmolLM2-135M's, 2.5 M), the caller's count for a large drafter, on CUDA, or without a
    drafter config."""
    from redrafter.config import DrafterConfig
    from redrafter.runtimes.onnxruntime import ONE_THREAD_DRAFT_MACS, drafter_threads

    small = DrafterConfig(
        vocab_size=49152, hidden_size=576, exit_dim=576, num_draft_layers=1, draft_vocab_size=2048
    )
    large = DrafterConfig(vocab_size=128256, hidden_size=2048, exit_dim=2048, num_draft_layers=1)
    assert drafter_threads(2, small, 1, "cpu") == 1
    assert drafter_threads(None, small, 2, "cpu") == 1
    assert drafter_threads(2, large, 1, "cpu") == 2
    assert drafter_threads(None, large, 1, "cpu") is None
    assert drafter_threads(2, small, 1, "cuda") == 2
    assert drafter_threads(2, None, 1, "cpu") == 2
    # Width multiplies the step: enough beams of the small drafter get every thread again.
    per_beam = 576 * 576 * 4 + 576 * 2048
    assert drafter_threads(2, small, ONE_THREAD_DRAFT_MACS // per_beam + 1, "cpu") == 2


def test_draft_threads_must_be_a_positive_integer(onnx_bundle) -> None:
    from redrafter.errors import ConfigError

    with pytest.raises(ConfigError, match="draft_threads 0 must be an integer >= 1"):
        OnnxRuntime(onnx_bundle, draft_threads=0)
