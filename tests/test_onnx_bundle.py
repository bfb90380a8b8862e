"""ONNX export, the bundle, the ONNX Runtime runtime and `redrafter validate` (DESIGN.md §4-§7),
on tiny random models: the graph keeps one `redrafter::TreeAttention` node per layer, stock ORT
runs it through the portable body, greedy tokens equal the torch reference's autoregressive
tokens, and bad bundles get one-line errors."""

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
from redrafter.cli import main
from redrafter.config import BeamShape
from redrafter.decoding.autoregressive import autoregressive_decode
from redrafter.decoding.driver import speculative_decode
from redrafter.errors import RedrafterError
from redrafter.export.build import ExportOptions, export_bundle
from redrafter.export.bundle import BundleError, exporter_fingerprint, load_bundle
from redrafter.models.checkpoints import save_drafter
from redrafter.runtimes.onnxruntime import OnnxRuntime, native_library
from redrafter.runtimes.torch import TorchRuntime

from conftest import OracleDrafts, tiny_base, tiny_drafter, write_hf_checkpoint

# Three layers and 1 KV head: no two cache dimensions are equal, so a transposed index fails.
SHAPE = dict(num_hidden_layers=3, num_key_value_heads=1, num_attention_heads=4)
PROMPTS_3 = [[1, 2, 3, 4, 5], [7, 8], [9, 10, 11, 12, 13, 14, 15, 16, 17]]
IMPLEMENTATIONS = ["portable"] + (["native"] if native_library() is not None else [])


def _collect(steps, batch: int) -> list[list[int]]:
    steps = list(steps)
    return [sum((s.new_tokens[b] for s in steps), []) for b in range(batch)]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("onnx")
    base = tiny_base(seed=2, **SHAPE)
    base_dir = write_hf_checkpoint(base, root / "base")
    drafter_dir = root / "drafter"
    save_drafter(tiny_drafter(base, seed=4, exit_dim=48), drafter_dir)
    return root, base_dir, drafter_dir


@pytest.fixture(scope="module")
def bundle(checkpoints):
    root, base_dir, drafter_dir = checkpoints
    options = ExportOptions(beam=BeamShape(3, 4))
    return export_bundle(base_dir, root / "bundle", drafter_path=drafter_dir, options=options)


@pytest.fixture(scope="module")
def reference(checkpoints):
    from redrafter.models.checkpoints import load_base, load_drafter

    _, base_dir, drafter_dir = checkpoints
    return TorchRuntime(load_base(base_dir), load_drafter(drafter_dir))


def test_bundle_layout_and_manifest(bundle) -> None:
    files = set(bundle.manifest["files"])
    assert {"onnx/base.onnx", "onnx/drafter-w3-l4.onnx", "tokenizer/tokenizer.json"} <= files
    m = bundle.manifest
    assert m["format_version"] == 1 and m["dtype"] == "float32"
    assert m["custom_op"] == {"domain": "redrafter", "name": "TreeAttention", "version": 2}
    assert m["beam"] == {"width": 3, "length": 4} and m["onnx"]["opset"] == 18
    assert m["parity"]["passed"]
    for meta in m["files"].values():
        assert len(meta["sha256"]) == 64
    # Caches of bundles (make demo, benchmarks) re-export when the exporter's code changes.
    assert m["exporter"] == exporter_fingerprint() and len(m["exporter"]) == 16


def test_base_graph_has_one_tree_attention_node_per_layer(bundle) -> None:
    model = onnx.load(str(bundle.path("onnx/base.onnx")), load_external_data=False)
    nodes = [n for n in model.graph.node if n.domain == "redrafter"]
    assert [n.op_type for n in nodes] == ["TreeAttention"] * SHAPE["num_hidden_layers"]
    assert [(f.domain, f.name) for f in model.functions] == [("redrafter", "TreeAttention")]
    assert {(o.domain, o.version) for o in model.opset_import} >= {("", 18), ("redrafter", 2)}
    # Version 2: the op takes the projections and the rotary table; no head split, rotary or
    # head merge is left in the graph (they cost ~20 small nodes per layer).
    assert all(len(n.input) == 9 for n in nodes)
    assert not {"Transpose", "Neg", "Split"} & {n.op_type for n in model.graph.node}


def test_rmsnorm_is_exported_in_the_form_onnx_runtime_fuses(bundle, tmp_path) -> None:
    """Every RMSNorm (2 per layer + the final one) reaches ORT as x / Sqrt(...), which its
    optimizer turns into one SimplifiedLayerNormalization; torch's rsqrt form stays 7 nodes."""
    import onnxruntime as ort

    norms = 2 * SHAPE["num_hidden_layers"] + 1
    model = onnx.load(str(bundle.path("onnx/base.onnx")), load_external_data=False)
    ops = [n.op_type for n in model.graph.node]
    assert "Reciprocal" not in ops and ops.count("Div") == ops.count("Sqrt") == norms
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    options.add_session_config_entry(
        "session.optimized_model_external_initializers_file_name", "optimized.data"
    )
    library = native_library()
    if library is not None:
        options.register_custom_ops_library(str(library))
    ort.InferenceSession(str(bundle.path("onnx/base.onnx")), options, ["CPUExecutionProvider"])
    optimized = onnx.load(str(tmp_path / "optimized.onnx"), load_external_data=False)
    fused = [n for n in optimized.graph.node if n.op_type == "SimplifiedLayerNormalization"]
    assert len(fused) == norms


def test_checker_passes_in_a_process_that_registered_nothing(bundle) -> None:
    code = (
        "import sys, onnx\n"
        "for p in sys.argv[1:]:\n"
        "    onnx.checker.check_model(p, full_check=True)\n"
        "print('ok')\n"
    )
    paths = [str(bundle.path("onnx/base.onnx")), str(bundle.path("onnx/drafter-w3-l4.onnx"))]
    out = subprocess.run([sys.executable, "-c", code, *paths], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("packing", ["dedup", "full"])
@pytest.mark.parametrize("prompts", [PROMPTS_3[:1], PROMPTS_3], ids=["batch1", "batch3"])
def test_greedy_tokens_equal_torch_autoregressive(
    bundle, reference, prompts, packing, implementation
) -> None:
    runtime = OnnxRuntime(bundle, native=implementation == "native")
    assert runtime.implementation == implementation
    want = _collect(autoregressive_decode(reference, prompts, max_new_tokens=20), len(prompts))
    got = _collect(
        speculative_decode(runtime, prompts, beam=bundle.beam, packing=packing, max_new_tokens=20),
        len(prompts),
    )
    assert got == want


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_long_accepts_move_cache_rows_correctly(bundle, reference, implementation) -> None:
    runtime = OnnxRuntime(bundle, native=implementation == "native")
    want = _collect(autoregressive_decode(reference, PROMPTS_3, max_new_tokens=30), 3)
    oracle = OracleDrafts(runtime, PROMPTS_3, want, seed=11)
    steps = list(speculative_decode(oracle, PROMPTS_3, beam=bundle.beam, max_new_tokens=30))
    assert _collect(steps, 3) == want
    assert max(int(s.accepted.max()) for s in steps[1:]) == bundle.beam.length - 1


def test_several_beam_shapes_share_one_weights_file(checkpoints, bundle, reference) -> None:
    root, base_dir, drafter_dir = checkpoints
    beams = (BeamShape(1, 2), BeamShape(4, 5))
    b = export_bundle(
        base_dir,
        root / "bundle-multi",
        drafter_path=drafter_dir,
        options=ExportOptions(beam=beams[0], extra_beams=beams[1:]),
    )
    assert b.manifest["parity"]["passed"], b.manifest["parity"]
    assert set(b.drafter_graphs) == set(beams)
    # Identical tensors are stored once: two drafter graphs cost no more disk than one.
    single = bundle.manifest["files"]["onnx/weights.data"]["bytes"]
    assert b.manifest["files"]["onnx/weights.data"]["bytes"] <= 1.05 * single
    runtime = OnnxRuntime(b)
    want = _collect(autoregressive_decode(reference, PROMPTS_3, max_new_tokens=16), 3)
    for beam in beams:
        got = _collect(speculative_decode(runtime, PROMPTS_3, beam=beam, max_new_tokens=16), 3)
        assert got == want
    with pytest.raises(RedrafterError, match="re-export with --beam-width"):
        runtime.draft(np.zeros((1, 32), np.float32), np.zeros(1, np.int64), BeamShape(2, 3))


def test_fp16_bundle_validates_under_tolerance(checkpoints) -> None:
    root, base_dir, drafter_dir = checkpoints
    b = export_bundle(
        base_dir,
        root / "bundle-fp16",
        drafter_path=drafter_dir,
        options=ExportOptions(beam=BeamShape(3, 4), dtype="float16"),
    )
    assert b.manifest["parity"]["passed"], b.manifest["parity"]
    result = CliRunner().invoke(
        main, ["validate", "--bundle", str(b.root), "--max-new-tokens", "12"]
    )
    assert result.exit_code == 0, result.output
    assert "onnxruntime autoregressive (float16)" in result.output


def test_library_api_loads_a_bundle(bundle) -> None:
    pipe = redrafter.load(bundle.root)
    out = pipe.generate(["w1 w2 w3"])
    assert out.texts is not None and len(out.token_ids[0]) == 64
    assert pipe.defaults.beam == bundle.beam
    steps = list(pipe.stream([[3, 4, 5]]))
    assert steps[0].kind == "prefill" and all(s.new_tokens[0] for s in steps)


def test_validate_cli_passes_and_writes_json(bundle, tmp_path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("w1 w2 w3\nw4 w5\nw6 w7 w8 w9\n")
    report = tmp_path / "report.json"
    result = CliRunner().invoke(
        main,
        [
            "validate",
            "--bundle",
            str(bundle.root),
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


def test_validate_fails_with_exit_1_against_another_model(bundle, tmp_path) -> None:
    other = write_hf_checkpoint(tiny_base(seed=9, **SHAPE), tmp_path / "other")
    result = CliRunner().invoke(
        main,
        ["validate", "--bundle", str(bundle.root), "--base", str(other), "--max-new-tokens", "8"],
    )
    assert result.exit_code == 1, result.output
    assert "FAIL" in result.output and "DIVERGES" in result.output


def test_generate_cli_on_a_bundle(bundle) -> None:
    result = CliRunner().invoke(
        main,
        [
            "generate",
            "--bundle",
            str(bundle.root),
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


def _broken_copy(bundle, tmp_path: Path, name: str) -> Path:
    dst = tmp_path / name
    shutil.copytree(bundle.root, dst)
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
def test_bad_bundles_get_one_line_errors(bundle, tmp_path, damage, message) -> None:
    root = _broken_copy(bundle, tmp_path, damage)
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


def test_export_is_atomic_and_never_clobbers(checkpoints, bundle, monkeypatch, tmp_path) -> None:
    root, base_dir, drafter_dir = checkpoints
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
            str(bundle.root),
        ],
    )
    assert result.exit_code == 2 and "--overwrite" in result.output
    load_bundle(bundle.root)  # still intact
    # A failing export leaves nothing behind, not even its temp dir.
    import redrafter.export.onnx as onnx_export

    def boom(*args, **kwargs):
        raise RuntimeError("simulated crash in the middle of an export")

    monkeypatch.setattr(onnx_export, "export_drafter", boom)
    out = tmp_path / "partial"
    with pytest.raises(RuntimeError, match="simulated"):
        export_bundle(base_dir, out, drafter_path=drafter_dir)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_portable_cache_and_native_binding(bundle) -> None:
    """The portable body ping-pongs between two cache buffers; the native library writes one
    buffer in place (its input and output bound to the same address)."""
    portable = OnnxRuntime(bundle, native=False)
    portable.reset(batch=1, capacity=32)
    assert len(portable.buffers) == 2
    if "native" in IMPLEMENTATIONS:
        native = OnnxRuntime(bundle, native=True)
        native.reset(batch=1, capacity=32)
        before = native.arrays[0].copy()
        native.prefill(np.array([[3, 4, 5, 6]]), np.array([4]))
        assert len(native.buffers) == 1
        changed = np.any(native.arrays[0] != before, axis=(0, 1, 2, 3, 5))  # (S,)
        assert changed[:4].all() and not changed[4:].any()  # rows [0, 4) written in place
