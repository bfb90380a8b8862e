"""`--quantize int4 --quantize-method gguf`: a GGUF base's own Q4_0/Q4_1 blocks go into the
bundle as they are (MatMulNBits over the file's codes; float zero points for Q4_1), run on
ONNX Runtime's kernel and on redrafter::MatMulInt4, and speculation on them stays lossless."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx import numpy_helper
from test_checkpoints import write_gguf

from redrafter.build import ExportOptions, export_bundle
from redrafter.bundle import Bundle
from redrafter.bundle import names as n
from redrafter.cli import main
from redrafter.config import BeamShape
from redrafter.decoding import DecodeOptions, decode
from redrafter.errors import ConfigError
from redrafter.export.quantize import quantization
from redrafter.models.checkpoints import checkpoint_gguf_blocks, load_base, save_drafter
from redrafter.runtimes.onnxruntime import OnnxRuntime

from conftest import collect, tiny_base, tiny_drafter

BEAM = BeamShape(2, 4)
# K of every block matrix a multiple of 32 (GGUF's 4-bit blocks); q/k rows permuted on disk
SHAPE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4)
SHAPE_VOCAB = 61  # tiny_base_config's vocabulary


def _gguf_pair(root: Path, q4: str) -> tuple[Path, Path]:
    """Q4_0: an untied head in Q4_0 too; Q4_1: as the demo model, a tied head whose table is
    Q8_0 (kept exactly as two 4-bit planes)."""
    tied = q4 == "Q4_1"
    base = tiny_base(seed=3, tie_word_embeddings=tied, **SHAPE)
    path = root / f"tiny-{q4}.gguf"
    write_gguf(base, path, q4=q4, q8_embed=tied)
    save_drafter(tiny_drafter(base, seed=5), root / f"drafter-{q4}")
    return path, root / f"drafter-{q4}"


@pytest.fixture(scope="module", params=["Q4_0", "Q4_1"])
def gguf_bundle(request, tmp_path_factory) -> tuple[Bundle, Path, str]:
    root = tmp_path_factory.mktemp("gguf")
    path, drafter = _gguf_pair(root, request.param)
    options = ExportOptions(beam=BEAM, quantization=quantization("int4", method="gguf"))
    bundle = export_bundle(path, root / "bundle", drafter_path=drafter, options=options)
    return bundle, path, request.param


def _dequantized(model: onnx.ModelProto) -> list[np.ndarray]:
    """Each 4-bit MatMulNBits' weight, (code - zero) * scale, as [N, K]."""
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    twice = {
        n.output[0] for n in model.graph.node if n.op_type == "Concat" and n.input[0] == n.input[1]
    }
    out = []
    for node in model.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        attrs = {a.name: a.i for a in node.attribute}
        N, K, bs = attrs["N"], attrs["K"], attrs["block_size"]
        packed = inits[node.input[1]].reshape(N, K // bs, bs // 2)
        codes = np.stack([packed & 15, packed >> 4], -1).reshape(N, K // bs, bs).astype(np.float32)
        scales = inits[node.input[2]].reshape(N, K // bs, 1)
        zp: np.ndarray | float = 8.0
        if len(node.input) > 3 and node.input[3]:
            zp = inits[node.input[3]]
            if zp.dtype == np.uint8:  # RTN's 4-bit zero points, two per byte
                zp = np.stack([zp & 15, zp >> 4], -1).reshape(N, -1)[:, : K // bs]
            zp = zp.reshape(N, K // bs, 1).astype(np.float32)
        w = ((codes - zp) * scales).reshape(N, K)
        if node.input[0] in twice:  # an 8-bit matrix as two 4-bit planes over the input twice
            w = w[:, : K // 2] + w[:, K // 2 :]
        out.append(w)
    return out


PROMPT = [1, 2, 3, 4, 5]


def _torch_logits(path: Path) -> np.ndarray:
    """The fp32 GGUF's next-token logits after PROMPT, from the torch reference model."""
    base = load_base(path)
    T = len(PROMPT)
    with torch.no_grad():
        caches = base.layer_caches(base.new_cache(1, 16))
        causal = torch.ones(T, T, dtype=torch.bool).tril()[None]  # [1, T, T]
        pos = torch.arange(T)[None]  # [1, T]
        logits, _, _ = base(
            torch.tensor([PROMPT]), pos, causal, torch.zeros(1, dtype=torch.long), caches
        )
    return logits[0, -1].numpy()  # [V]


def _ort_logits(bundle: Bundle) -> np.ndarray:
    """The bundle's next-token logits after PROMPT on ORT's kernels (fp32 compute)."""
    runtime = OnnxRuntime(bundle, native=False)
    runtime.reset(batch=1, capacity=16)
    logits, _ = runtime.prefill(np.array([PROMPT]), np.array([len(PROMPT)]))
    return logits[0]  # [V]


def test_the_files_blocks_are_kept_not_requantized(gguf_bundle) -> None:
    """Every block matrix and the head (Q4_0 untied, or tied to a Q8_0 table) becomes a
    MatMulNBits whose weights are the loaded model's, to float rounding: q|k|v and gate|up
    fused, q/k rows un-permuted, 8-bit rows as two exact 4-bit planes."""
    bundle, path, q4 = gguf_bundle
    assert bundle.manifest.quantization is not None
    assert bundle.manifest.quantization.method == "gguf"
    model = onnx.load(str(bundle.path(n.BASE_ONNX)))
    assert [f.name for f in model.functions] == [n.TREE_ATTENTION]
    base = load_base(path)
    sd = {k: v.numpy() for k, v in base.state_dict().items()}
    wanted = [sd.get("lm_head.weight", sd["model.embed_tokens.weight"])]  # tied: the table
    for i in range(SHAPE["num_hidden_layers"]):
        p = f"model.layers.{i}."
        wanted += [
            np.concatenate([sd[p + f"self_attn.{x}_proj.weight"] for x in "qkv"]),
            sd[p + "self_attn.o_proj.weight"],
            np.concatenate([sd[p + "mlp.gate_proj.weight"], sd[p + "mlp.up_proj.weight"]]),
            sd[p + "mlp.down_proj.weight"],
        ]
    got = _dequantized(model)
    # the embedding table: Q8_0 in the file -> kept as an exact 8-bit GatherBlockQuantized;
    # a float table (the Q4_0 file) -> RTN's 4-bit one
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    (gather,) = [node for node in model.graph.node if node.op_type == "GatherBlockQuantized"]
    bits = next((a.i for a in gather.attribute if a.name == "bits"), 4)
    assert bits == (8 if q4 == "Q4_1" else 4)
    if bits == 8:
        codes = inits[gather.input[0]].astype(np.float32)  # [V, H]
        table = (codes - 128) * np.repeat(inits[gather.input[2]], 32, axis=1)
        assert np.array_equal(table, sd["model.embed_tokens.weight"])
    zero_types = {
        model_init.data_type
        for node in model.graph.node
        if node.op_type == "MatMulNBits" and len(node.input) > 3
        for model_init in model.graph.initializer
        if model_init.name == node.input[3]
    }
    # Q4_1's zeros are the file's floats -m/d, not a 4-bit grid; Q4_0 needs none (zero 8); the
    # Q8_0 head's planes have 4-bit ones (8 and 0)
    want = {onnx.TensorProto.FLOAT, onnx.TensorProto.UINT8} if q4 == "Q4_1" else set()
    assert zero_types == want
    assert len(got) == len(wanted) == 4 * SHAPE["num_hidden_layers"] + 1
    for w in wanted:  # each matrix found among the nodes, to the rounding of -m / d * d
        errors = [np.abs(g - w).max() for g in got if g.shape == w.shape]
        assert errors and min(errors) <= 1e-6 * np.abs(w).max(), q4
    # the same graph requantized by RTN differs by its rounding: a real second rounding
    rtn = export_bundle(
        path,
        bundle.root.parent / "rtn",
        options=ExportOptions(quantization=quantization("int4", symmetric=q4 == "Q4_0")),
    )
    rtn_model = onnx.load(str(rtn.path(n.BASE_ONNX)))
    drift = [
        min(np.abs(g - w).max() for g in _dequantized(rtn_model) if g.shape == w.shape)
        for w in wanted
    ]
    if q4 == "Q4_1":  # onto a symmetric grid: every Q4_1 matrix moves
        assert min(drift) > 1e-3
    # end to end, the kept blocks sit no farther from the fp32 GGUF's logits than RTN's (the
    # same grid as Q4_0; for Q4_1 strictly closer). Both requantize the float embedding to int4,
    # which dominates what is left of the error in a random tiny model.
    ref = _torch_logits(path)
    kept, requantized = (np.abs(_ort_logits(b) - ref).max() for b in (bundle, rtn))
    assert kept <= requantized + 1e-4
    if q4 == "Q4_1":
        assert kept < 0.9 * requantized


@pytest.mark.parametrize("native", [False, True], ids=["onnxruntime-kernel", "native"])
def test_speculation_is_lossless_on_kept_blocks(gguf_bundle, native) -> None:
    """Greedy speculation (both packings, prompt lookup) equals greedy autoregressive decoding
    on the kept blocks, on ORT's MatMulNBits and on redrafter::MatMulInt4 (float zero points)."""
    from redrafter import ops

    bundle, path, _ = gguf_bundle
    if native and ops.library_path() is None:
        pytest.skip("native op library not built (make ops)")
    runtime = OnnxRuntime(bundle, native=native, int4_kernel=native or False)
    assert runtime.int4 == ("redrafter" if native else "onnxruntime")
    prompts = [[1, 2, 3, 4, 5], [7, 8], [9, 10, 11, 12, 13, 14, 15, 16, 17]]
    ar = collect(decode(runtime, prompts, DecodeOptions(speculative=False, max_new_tokens=20)), 3)
    for packing in ("dedup", "full"):
        spec = DecodeOptions(max_new_tokens=20, beam=BEAM, packing=packing)
        assert collect(decode(runtime, prompts, spec), 3) == ar
    lookup = DecodeOptions(max_new_tokens=20, beam=BEAM, prompt_lookup=True)
    assert collect(decode(runtime, prompts, lookup), 3) == ar


def test_gguf_method_refuses_what_it_cannot_keep(tiny_checkpoints, tmp_path) -> None:
    """A non-GGUF base, a GGUF without 4-bit matrices, int8 or another block size: one-line
    errors (exit 2 from the CLI), nothing written."""
    _, hf_dir, drafter_dir = tiny_checkpoints
    out = tmp_path / "b"
    args = ["export", "--base", str(hf_dir), "--out", str(out), "--quantize", "int4"]
    result = CliRunner().invoke(main, args + ["--quantize-method", "gguf"])
    assert result.exit_code == 2, result.output
    assert "is not a GGUF file; use --quantize-method rtn" in result.output
    assert "Traceback" not in result.output and not out.exists()
    f32 = tmp_path / "f32.gguf"
    write_gguf(tiny_base(seed=3, **SHAPE), f32)
    with pytest.raises(ConfigError, match="no Q4_0 or Q4_1 matrices"):
        checkpoint_gguf_blocks(f32)
    with pytest.raises(ConfigError, match="int4 only"):
        quantization("int8", method="gguf")
    with pytest.raises(ConfigError, match="keeps GGUF blocks of 32"):
        quantization("int4", method="gguf", block_size=64)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f32.gguf"]


def test_validate_passes_kept_blocks_and_fails_a_broken_head(gguf_bundle, tmp_path) -> None:
    """`validate` (tensors, greedy tokens, drift against the fp32 GGUF) passes the kept blocks;
    swapping the nibbles of the head's codes (a packing bug; for the tied Q8_0 head, in its
    planes) makes it fail with exit 1."""
    from test_quantize import broken_head_copy, validate_cli

    bundle, _, q4 = gguf_bundle
    ok, report = validate_cli(bundle.root, tmp_path / "ok.json")
    assert ok.exit_code == 0, ok.output
    assert report["drift"]["precision"] == "int4" and report["drift"]["passed"]
    head = broken_head_copy(bundle.root, tmp_path / "broken")
    assert next(a.i for a in head.attribute if a.name == "N") == SHAPE_VOCAB  # the head
    bad, report = validate_cli(tmp_path / "broken", tmp_path / "bad.json")
    assert bad.exit_code == 1, bad.output
    assert not report["drift"]["passed"], q4
