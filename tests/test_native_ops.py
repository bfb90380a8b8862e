"""The native op library (custom_ops/): TreeAttention and KVCommit against a numpy reference,
through the C ABI (CPU kernel, host emulation of the CUDA kernel, CUDA kernel on a GPU) and
through ONNX Runtime (CPU provider), including the in-place cache update by IO binding.

Dimensions: B batch, Hq query heads, Hkv key/value heads, N new tokens, D head dim,
S cache capacity, P committed length, K commit slots.

The library is built by `make test` before pytest runs; these tests fail (not skip) without it.
Only the CUDA-device tests skip, when no CUDA device is present.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from redrafter import ops
from redrafter.bundle.names import KV_COMMIT, OP_DOMAIN, OP_VERSION, TREE_ATTENTION
from redrafter.decoding.kv_cache import apply_commit
from redrafter.errors import RuntimeUnavailableError

REPO = Path(__file__).resolve().parent.parent
OPS_HEADER = REPO / "custom_ops" / "tree_attention" / "redrafter_ops.h"

ATOL = {np.float32: 1e-5, np.float16: 2e-3}
ELEM = {np.float32: TensorProto.FLOAT, np.float16: TensorProto.FLOAT16}

# (B, Hq, Hkv, N, D, S): N=1, odd N and D, GQA ratios 1, 3 and 8, the demo model's heads, and a
# head dim that is not a multiple of 8 (the CUDA kernel's element-by-element staging path).
CASES = [
    (1, 1, 1, 1, 8, 1),
    (3, 6, 2, 13, 24, 64),
    (2, 8, 8, 4, 32, 100),
    (2, 8, 1, 7, 16, 50),
    (2, 9, 3, 1, 64, 700),
    (1, 9, 3, 64, 64, 300),
    (2, 4, 2, 3, 20, 30),
]
DTYPES = [np.float32, np.float16]


@pytest.fixture(scope="module")
def lib():
    path = ops.library_path()
    if path is None:
        pytest.fail(
            f"native op library missing: run `make ops` (expected build/ops/{ops.LIBRARY_NAME})"
        )
    return ops.load_c_api(path)


# ---- reference -------------------------------------------------------------------------------


def reference(
    query, key, value, key_cache, value_cache, past_len, tree_mask, scale=None, window=0, softcap=0
):
    """out[b,h,i] = softmax over {slots < P_b} ∪ {new j: mask[b,i,j]} of (q·k)·scale, @ v; in
    float64. A row that sees no key gives 0. Returns (out, key_cache_out, value_cache_out).
    window > 0: new token i sits at P + depth(i) (depth = its visible new tokens - 1) and sees
    keys at positions > its own - window; softcap > 0: s = softcap·tanh(s / softcap)."""
    q, k, v, kc, vc = query, key, value, key_cache, value_cache
    B, Hq, N, D = q.shape
    G = Hq // k.shape[1]
    scale = scale or 1.0 / np.sqrt(D)
    out = np.zeros(q.shape, np.float64)
    kc_out, vc_out = kc.copy(), vc.copy()
    for b in range(B):
        P = int(past_len[b])
        kc_out[b, :, P : P + N], vc_out[b, :, P : P + N] = k[b], v[b]
        keys = np.concatenate([kc[b, :, :P], k[b]], axis=1).astype(np.float64)  # (Hkv, P+N, D)
        vals = np.concatenate([vc[b, :, :P], v[b]], axis=1).astype(np.float64)
        visible = np.concatenate([np.ones((N, P), bool), tree_mask[b]], axis=1)  # (N, P+N)
        if window:
            depth = tree_mask[b].sum(axis=1) - 1  # (N,)
            key_pos = np.concatenate([np.arange(P), P + depth])  # (P+N,)
            visible &= key_pos[None, :] > (P + depth)[:, None] - window
        for h in range(Hq):
            s = q[b, h].astype(np.float64) @ keys[h // G].T * scale  # (N, P+N)
            if softcap:
                s = softcap * np.tanh(s / softcap)
            s = np.where(visible, s, -np.inf)
            m = s.max(axis=1, keepdims=True)
            e = np.exp(s - np.where(np.isfinite(m), m, 0.0))
            total = e.sum(axis=1, keepdims=True)
            out[b, h] = np.where(total > 0, (e / np.maximum(total, 1e-300)) @ vals[h // G], 0.0)
    return out, kc_out, vc_out


def make_inputs(case, dtype, seed):
    B, Hq, Hkv, N, D, S = case
    rng = np.random.default_rng(seed)

    def normal(*shape):
        return rng.standard_normal(shape).astype(dtype)

    past = rng.integers(0, S - N + 1, size=B).astype(np.int64)
    past[0] = S - N  # a full cache ...
    past[-1] = min(past[-1], 3)  # ... and a nearly empty one in the same batch (ragged)
    mask = rng.random((B, N, N)) < 0.5
    mask |= np.eye(N, dtype=bool)[None]
    return dict(
        query=normal(B, Hq, N, D),
        key=normal(B, Hkv, N, D),
        value=normal(B, Hkv, N, D),
        key_cache=normal(B, Hkv, S, D),
        value_cache=normal(B, Hkv, S, D),
        past_len=past,
        tree_mask=mask,
    )


def check_caches(x, kc_out, vc_out):
    """New rows at [P, P+N); every other slot bit-identical to the input cache."""
    _, want_k, want_v = reference(**x)
    np.testing.assert_array_equal(kc_out, want_k)
    np.testing.assert_array_equal(vc_out, want_v)


def assert_close(out, ref, dtype):
    err = np.abs(out.astype(np.float64) - ref).max()
    assert err <= ATOL[dtype], f"max abs error {err:.3g} > {ATOL[dtype]} ({np.dtype(dtype).name})"


# ---- op identity -------------------------------------------------------------------------------


def test_op_identity_matches_header():
    text = OPS_HEADER.read_text()
    defines = dict(re.findall(r"#define (REDRAFTER_\w+) (\S+)", text))
    assert defines["REDRAFTER_OP_DOMAIN"] == f'"{OP_DOMAIN}"'
    assert defines["REDRAFTER_TREE_ATTENTION_OP"] == f'"{TREE_ATTENTION}"'
    assert defines["REDRAFTER_KV_COMMIT_OP"] == f'"{KV_COMMIT}"'
    assert int(defines["REDRAFTER_OP_VERSION"]) == OP_VERSION


def test_library_path_env_override(monkeypatch, tmp_path, lib):
    monkeypatch.setenv(ops.LIBRARY_ENV, str(tmp_path / "missing.so"))
    with pytest.raises(RuntimeUnavailableError, match="make ops"):
        ops.library_path()
    monkeypatch.delenv(ops.LIBRARY_ENV)
    assert ops.library_path() == REPO / "build" / "ops" / ops.LIBRARY_NAME


# ---- C ABI: CPU kernel and the host emulation of the CUDA kernel -------------------------------


@pytest.mark.parametrize("isa", ["best", "avx2", "base"])  # the run-time clones of the kernel
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_cpu_kernel_matches_reference(lib, case, dtype, isa, monkeypatch):
    if isa != "best":
        monkeypatch.setenv("REDRAFTER_CPU_ISA", isa)  # read by the library at each call
    x = make_inputs(case, dtype, seed=1)
    ref, _, _ = reference(**x)
    kc, vc = x["key_cache"].copy(), x["value_cache"].copy()
    out = ops.tree_attention_host(lib, **{**x, "key_cache": kc, "value_cache": vc})
    assert_close(out, ref, dtype)
    check_caches(x, kc, vc)  # written in place


@pytest.mark.parametrize("num_sms", [1, 132])  # one split per row chunk; many key splits
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_cuda_tile_math_emulated_on_host(lib, case, dtype, num_sms):
    """The CUDA kernel's plan, tiles and __host__ __device__ tile math, run on the host."""
    x = make_inputs(case, dtype, seed=2)
    ref, _, _ = reference(**x)
    kc_out, vc_out = np.zeros_like(x["key_cache"]), np.zeros_like(x["value_cache"])
    out = ops.tree_attention_host(
        lib, **x, key_cache_out=kc_out, value_cache_out=vc_out, emulate_cuda_sms=num_sms
    )
    assert_close(out, ref, dtype)
    check_caches(x, kc_out, vc_out)  # not in place: full copy, then the new rows


def test_cpu_kernel_copies_when_not_in_place(lib):
    x = make_inputs((2, 6, 3, 5, 16, 40), np.float32, seed=3)
    before = x["key_cache"].copy()
    kc_out, vc_out = np.zeros_like(x["key_cache"]), np.zeros_like(x["value_cache"])
    out = ops.tree_attention_host(lib, **x, key_cache_out=kc_out, value_cache_out=vc_out)
    assert_close(out, reference(**x)[0], np.float32)
    check_caches(x, kc_out, vc_out)
    np.testing.assert_array_equal(x["key_cache"], before)  # the input is left alone


def test_explicit_scale_and_threads(lib):
    x = make_inputs((2, 4, 2, 6, 16, 3000), np.float32, seed=4)
    ref, _, _ = reference(**x, scale=0.37)
    for threads in (1, 3):
        kc, vc = x["key_cache"].copy(), x["value_cache"].copy()
        out = ops.tree_attention_host(
            lib, **{**x, "key_cache": kc, "value_cache": vc}, scale=0.37, threads=threads
        )
        assert_close(out, ref, np.float32)


def test_row_without_visible_keys_is_zero(lib):
    x = make_inputs((1, 2, 1, 3, 8, 10), np.float32, seed=5)
    x["past_len"][:] = 0
    x["tree_mask"][0, 1, :] = False  # token 1 sees nothing
    for sms in (None, 132):
        out = ops.tree_attention_host(lib, **x, emulate_cuda_sms=sms)
        assert np.all(out[0, :, 1] == 0) and np.all(np.isfinite(out))


@pytest.mark.parametrize("sms", [None, 132])
def test_rejects_past_len_beyond_capacity(lib, sms):
    x = make_inputs((2, 4, 2, 5, 8, 20), np.float32, seed=6)
    x["past_len"][1] = 16  # 16 + 5 > 20
    with pytest.raises(ValueError, match=r"past_len\[1\] = 16 .* S = 20"):
        ops.tree_attention_host(lib, **x, emulate_cuda_sms=sms)
    x["past_len"][1] = -1
    with pytest.raises(ValueError, match="past_len"):
        ops.tree_attention_host(lib, **x)


def test_rejects_bad_head_ratio(lib):
    x = make_inputs((1, 4, 2, 2, 8, 8), np.float32, seed=7)
    x["query"] = np.zeros((1, 3, 2, 8), np.float32)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        ops.tree_attention_host(lib, **x)


# ---- KVCommit ------------------------------------------------------------------------------------


def commit_inputs(seed, *, lead=(3, 2), B=3, Hkv=2, S=20, D=12, K=5, dtype=np.float32):
    rng = np.random.default_rng(seed)
    cache = rng.standard_normal((*lead, B, Hkv, S, D)).astype(dtype)
    past = rng.integers(0, S - K + 1, size=B).astype(np.int64)
    count = rng.integers(0, K + 1, size=B).astype(np.int64)
    count[0] = K
    # Accepted packed slots: strictly increasing, so source[k] >= k; padded with k past count.
    source = np.tile(np.arange(K, dtype=np.int64), (B, 1))
    for b in range(B):
        picks = np.sort(rng.choice(np.arange(S - past[b]), size=count[b], replace=False))
        source[b, : count[b]] = picks
    return cache, past, source, count


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("lead", [(), (4, 2)], ids=["per-layer", "stacked"])
def test_kv_commit_matches_reference(lib, lead, dtype):
    cache, past, source, count = commit_inputs(8, lead=lead, dtype=dtype)
    want = cache.copy()
    apply_commit(want, past, source, count)
    ops.kv_commit_host(lib, cache, past, source, count)  # in place
    np.testing.assert_array_equal(cache, want)


def test_kv_commit_not_in_place_and_rejects_bad_source(lib):
    cache, past, source, count = commit_inputs(9)
    want = cache.copy()
    apply_commit(want, past, source, count)
    out = ops.kv_commit_host(lib, cache, past, source, count, cache_out=np.zeros_like(cache))
    np.testing.assert_array_equal(out, want)
    source[0, 2] = 1  # < its destination index 2
    with pytest.raises(ValueError, match=r"source\[0, 2\] = 1"):
        ops.kv_commit_host(lib, cache, past, source, count)


# ---- ONNX Runtime (CPU provider) ---------------------------------------------------------------

TREE_INPUTS = ["query", "key", "value", "key_cache", "value_cache", "past_len", "tree_mask"]
TREE_OUTPUTS = ["output", "key_cache_out", "value_cache_out"]


def tree_attention_model(dtype, scale=None, version=1, **extra) -> bytes:
    """One TreeAttention node in domain `redrafter` of `version`, with symbolic dims: version 1
    head-major and rotated, version 2 token-major (QW = Hq*D, KW = Hkv*D) plus cos and sin."""
    t = ELEM[dtype]
    heads = ["B", "Hq", "N", "D"]
    dims = {
        "query": heads if version == 1 else ["B", "N", "QW"],
        "key": ["B", "Hkv", "N", "D"] if version == 1 else ["B", "N", "KW"],
        "value": ["B", "Hkv", "N", "D"] if version == 1 else ["B", "N", "KW"],
        "key_cache": ["B", "Hkv", "S", "D"],
        "value_cache": ["B", "Hkv", "S", "D"],
    }
    inputs = [helper.make_tensor_value_info(n, t, d) for n, d in dims.items()]
    inputs += [
        helper.make_tensor_value_info("past_len", TensorProto.INT64, ["B"]),
        helper.make_tensor_value_info("tree_mask", TensorProto.BOOL, ["B", "N", "N"]),
    ]
    names = TREE_INPUTS
    if version == 2:
        inputs += [helper.make_tensor_value_info(n, t, ["B", "N", "D"]) for n in ("cos", "sin")]
        names = [*TREE_INPUTS, "cos", "sin"]
    outputs = [
        helper.make_tensor_value_info("output", t, dims["query"]),
        helper.make_tensor_value_info("key_cache_out", t, ["B", "Hkv", "S", "D"]),
        helper.make_tensor_value_info("value_cache_out", t, ["B", "Hkv", "S", "D"]),
    ]
    attrs = {} if scale is None else {"scale": float(scale)}
    attrs |= extra  # window, softcap
    node = helper.make_node(TREE_ATTENTION, names, TREE_OUTPUTS, domain=OP_DOMAIN, **attrs)
    return _model(node, inputs, outputs, version)


def kv_commit_model(dtype, rank) -> bytes:
    t = ELEM[dtype]
    cache_dims = [f"L{i}" for i in range(rank - 4)] + ["B", "Hkv", "S", "D"]
    inputs = [
        helper.make_tensor_value_info("cache", t, cache_dims),
        helper.make_tensor_value_info("past_len", TensorProto.INT64, ["B"]),
        helper.make_tensor_value_info("source", TensorProto.INT64, ["B", "K"]),
        helper.make_tensor_value_info("count", TensorProto.INT64, ["B"]),
    ]
    outputs = [helper.make_tensor_value_info("cache_out", t, cache_dims)]
    node = helper.make_node(
        KV_COMMIT, ["cache", "past_len", "source", "count"], ["cache_out"], domain=OP_DOMAIN
    )
    return _model(node, inputs, outputs)


def _model(node, inputs, outputs, version=1) -> bytes:
    graph = helper.make_graph([node], "redrafter_op", inputs, outputs)
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(OP_DOMAIN, version)],
    )
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def session(model: bytes) -> ort.InferenceSession:
    so = ort.SessionOptions()
    assert ops.register(so, required=True)
    sess = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
    assert sess.get_providers()[0] == "CPUExecutionProvider"
    return sess


def run_bound(sess, x, *, shared: bool):
    """Runs TreeAttention through IO binding. shared: one OrtValue per cache bound as input and
    as output (the in-place pattern); else ORT allocates the cache outputs."""
    binding = sess.io_binding()
    for name in ("query", "key", "value", "past_len", "tree_mask", "cos", "sin"):
        if name in x:
            binding.bind_cpu_input(name, x[name])
    binding.bind_output("output")
    for name in ("key_cache", "value_cache"):
        value = ort.OrtValue.ortvalue_from_numpy(x[name])
        binding.bind_ortvalue_input(name, value)
        if shared:
            binding.bind_ortvalue_output(f"{name}_out", value)
        else:
            binding.bind_output(f"{name}_out")
    sess.run_with_iobinding(binding)
    return binding.copy_outputs_to_cpu()


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_ort_in_place_matches_reference(lib, case, dtype):
    sess = session(tree_attention_model(dtype))
    x = make_inputs(case, dtype, seed=10)
    ref, kc_want, vc_want = reference(**x)
    outputs = run_bound(sess, x, shared=True)
    assert_close(outputs[0], ref, dtype)
    # The numpy buffers themselves got the new rows; every other row is bit-identical.
    np.testing.assert_array_equal(x["key_cache"], kc_want)
    np.testing.assert_array_equal(x["value_cache"], vc_want)


def test_ort_not_shared_falls_back_to_a_copy(lib, capfd):
    sess = session(tree_attention_model(np.float32, scale=0.25))
    x = make_inputs((2, 6, 3, 5, 16, 40), np.float32, seed=11)
    before = x["key_cache"].copy()
    ref, kc_want, vc_want = reference(**x, scale=0.25)
    out, kc_out, vc_out = run_bound(sess, x, shared=False)
    assert_close(out, ref, np.float32)
    np.testing.assert_array_equal(kc_out, kc_want)
    np.testing.assert_array_equal(vc_out, vc_want)
    np.testing.assert_array_equal(x["key_cache"], before)
    assert "copies the whole cache" in capfd.readouterr().err  # the one-time warning


def test_ort_plain_run_matches_reference(lib):
    sess = session(tree_attention_model(np.float16))
    x = make_inputs((3, 6, 2, 13, 24, 64), np.float16, seed=12)
    ref, kc_want, _ = reference(**x)
    out, kc_out, _ = sess.run(None, x)
    assert_close(out, ref, np.float16)
    np.testing.assert_array_equal(kc_out, kc_want)


def test_ort_rejects_past_len_beyond_capacity(lib):
    sess = session(tree_attention_model(np.float32))
    x = make_inputs((2, 4, 2, 5, 8, 20), np.float32, seed=13)
    x["past_len"][0] = 17
    with pytest.raises(Exception, match=r"past_len\[0\] = 17 with N = 5 .* S = 20"):
        sess.run(None, x)


def test_ort_rejects_bad_mask_shape(lib):
    sess = session(tree_attention_model(np.float32))
    x = make_inputs((2, 4, 2, 5, 8, 20), np.float32, seed=14)
    x["tree_mask"] = np.ones((2, 5, 4), bool)
    with pytest.raises(Exception, match=r"'tree_mask' has shape \[2, 5, 4\], expected \[2, 5, 5\]"):
        sess.run(None, x)


def with_portable_body(model: bytes, version=1, **features) -> bytes:
    """The same node plus the exporter's portable function body (redrafter.export);
    `features`: window=True / softcap=True for the body that honours those attributes."""
    export = pytest.importorskip(
        "redrafter.export.tree_attention", reason="the ONNX export module is not in this checkout"
    )
    proto = onnx.load_from_string(model)
    proto.opset_import[0].version = 18  # the body needs opset >= 18
    proto.functions.append(export.function_body(18, version, **features))
    return proto.SerializeToString()


@pytest.mark.parametrize("case", [CASES[1], CASES[3], CASES[5]], ids=str)
def test_portable_body_and_native_kernel_agree(lib, case, capfd):
    """CPU kernel == portable ONNX body == numpy reference; with the library registered, the
    native kernel (not the body) runs: its one-time copy warning shows it."""
    model = with_portable_body(tree_attention_model(np.float32, scale=0.3))
    x = make_inputs(case, np.float32, seed=16)
    ref, kc_want, _ = reference(**x, scale=0.3)
    portable = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    out_body, kc_body, _ = portable.run(None, x)
    assert_close(out_body, ref, np.float32)
    np.testing.assert_array_equal(kc_body, kc_want)
    capfd.readouterr()
    out_native, kc_native, _ = run_bound(session(model), x, shared=False)
    assert "copies the whole cache" in capfd.readouterr().err
    assert_close(out_native, ref, np.float32)
    np.testing.assert_array_equal(kc_native, kc_want)


# ---- TreeAttention version 2: token-major projections, rotary inside -----------------------------


def rotary_inputs(case, dtype, seed):
    """Version 2's inputs for `case` and what version 1 (the numpy reference) sees for them:
    (inputs, head-major rotated inputs). Angles of positions up to ~1000, as a decode has."""
    x = make_inputs(case, dtype, seed)
    B, Hq, Hkv, N, D, _ = case
    rng = np.random.default_rng(seed + 1)
    angles = rng.uniform(0, 1000, (B, N, 1)) * (1e-4 ** (np.arange(D // 2) / (D // 2)))
    angles = np.concatenate([angles, angles], axis=-1)  # (B, N, D): halves equal, as HF's
    cos, sin = np.cos(angles).astype(dtype), np.sin(angles).astype(dtype)

    def tokens(heads):  # (B, H, N, D) -> (B, N, H*D)
        return np.ascontiguousarray(heads.transpose(0, 2, 1, 3).reshape(B, N, -1))

    def rotated(heads):  # x·cos + rotate_half(x)·sin in float32, rounded once (the kernels')
        f = heads.astype(np.float32)
        half = np.concatenate([-f[..., D // 2 :], f[..., : D // 2]], axis=-1)
        c, s = cos.astype(np.float32)[:, None], sin.astype(np.float32)[:, None]
        return (f * c + half * s).astype(dtype)

    v2 = {**x, "query": tokens(x["query"]), "key": tokens(x["key"]), "value": tokens(x["value"])}
    v2 |= {"cos": cos, "sin": sin}
    heads = {**x, "query": rotated(x["query"]), "key": rotated(x["key"])}
    return v2, heads


def reference_v2(heads, **kw):
    """The numpy reference on the head-major rotated inputs, output merged to (B, N, Hq*D)."""
    out, kc, vc = reference(**heads, **kw)
    B, Hq, N, D = out.shape
    return out.transpose(0, 2, 1, 3).reshape(B, N, Hq * D), kc, vc


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_ort_v2_in_place_matches_reference(lib, case, dtype):
    sess = session(tree_attention_model(dtype, version=2))
    x, heads = rotary_inputs(case, dtype, seed=20)
    ref, kc_want, vc_want = reference_v2(heads)
    outputs = run_bound(sess, x, shared=True)
    assert outputs[0].shape == x["query"].shape
    assert_close(outputs[0], ref, dtype)
    # The rotated keys are what the cache keeps (bit-identical: same float ops, one rounding).
    np.testing.assert_array_equal(x["key_cache"], kc_want)
    np.testing.assert_array_equal(x["value_cache"], vc_want)


@pytest.mark.parametrize("case", [CASES[1], CASES[3], CASES[5]], ids=str)
def test_v2_portable_body_and_native_kernel_agree(lib, case, capfd):
    model = with_portable_body(tree_attention_model(np.float32, scale=0.3, version=2), 2)
    x, heads = rotary_inputs(case, np.float32, seed=21)
    ref, kc_want, _ = reference_v2(heads, scale=0.3)
    portable = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    out_body, kc_body, _ = portable.run(None, x)
    assert_close(out_body, ref, np.float32)
    np.testing.assert_allclose(kc_body, kc_want, rtol=0, atol=1e-6)  # ORT may fuse mul-add
    capfd.readouterr()
    out_native, kc_native, _ = run_bound(session(model), x, shared=False)
    assert "copies the whole cache" in capfd.readouterr().err  # the native kernel ran
    assert_close(out_native, ref, np.float32)
    np.testing.assert_array_equal(kc_native, kc_want)


def test_ort_v2_rejects_a_query_width_that_is_not_whole_heads(lib):
    sess = session(tree_attention_model(np.float32, version=2))
    x, _ = rotary_inputs((2, 4, 2, 3, 8, 20), np.float32, seed=22)
    x["query"] = x["query"][..., :-3].copy()  # 29 columns: not a multiple of D = 8
    with pytest.raises(
        Exception, match=r"query width 29 must be a multiple of the cache's head dim 8"
    ):
        sess.run(None, x)


def test_ort_v1_node_still_runs_beside_v2(lib):
    """Bundles exported before version 2 keep running on this library."""
    x = make_inputs((2, 6, 3, 5, 16, 40), np.float32, seed=23)
    ref, _, _ = reference(**x)
    out, _, _ = session(tree_attention_model(np.float32, version=1)).run(None, x)
    assert_close(out, ref, np.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_ort_kv_commit_in_place(lib, dtype):
    sess = session(kv_commit_model(dtype, rank=6))
    cache, past, source, count = commit_inputs(15, lead=(4, 2), dtype=dtype)
    want = cache.copy()
    apply_commit(want, past, source, count)
    value = ort.OrtValue.ortvalue_from_numpy(cache)
    binding = sess.io_binding()
    binding.bind_ortvalue_input("cache", value)
    binding.bind_ortvalue_output("cache_out", value)
    for name, arr in (("past_len", past), ("source", source), ("count", count)):
        binding.bind_cpu_input(name, arr)
    sess.run_with_iobinding(binding)
    np.testing.assert_array_equal(cache, want)  # the numpy buffer itself


# ---- CUDA kernels (a CUDA device only) -----------------------------------------------------------


def _cuda_or_skip(lib):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip(
            "no CUDA device on this machine: the CUDA kernels are checked by the host "
            "emulation test here and by benchmarks/tree_attention_cuda.py on a GPU"
        )
    if not lib.rd_has_cuda_kernels():
        pytest.fail("a CUDA device is present but the library was built without nvcc")
    return torch


def _cuda_attention(lib, torch, function, x, case, dtype, extra=(), window=0, softcap=0.0):
    """One C ABI TreeAttention call (`function`: rd_tree_attention_cuda or its version-2
    sibling, whose cos and sin come as `extra` input names) on device copies of `x`, on the
    current stream; returns the output (host) and the device inputs (the caches written)."""
    dev = {k: torch.from_numpy(v).cuda() for k, v in x.items() if k != "past_len"}
    out = torch.full_like(dev["query"], float("nan"))
    B, Hq, Hkv, N, D, S = case
    ptrs = [dev[k].data_ptr() for k in TREE_INPUTS if k != "past_len"]
    rc = getattr(lib, function)(
        1 if dtype == np.float32 else 10,
        B,
        Hq,
        Hkv,
        N,
        D,
        S,
        0.0,
        window,
        softcap,
        *ptrs[:5],
        x["past_len"].ctypes.data,
        ptrs[5],
        out.data_ptr(),
        dev["key_cache"].data_ptr(),
        dev["value_cache"].data_ptr(),
        *[dev[k].data_ptr() for k in extra],
        torch.cuda.current_stream().cuda_stream,
    )
    assert rc == 0, lib.rd_last_error().decode()
    torch.cuda.synchronize()
    return out.cpu().numpy(), dev


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_cuda_kernel_matches_reference(lib, case, dtype):
    torch = _cuda_or_skip(lib)
    x = make_inputs(case, dtype, seed=20)
    ref, kc_want, vc_want = reference(**x)
    out, dev = _cuda_attention(lib, torch, "rd_tree_attention_cuda", x, case, dtype)
    assert_close(out, ref, dtype)
    np.testing.assert_array_equal(dev["key_cache"].cpu().numpy(), kc_want)
    np.testing.assert_array_equal(dev["value_cache"].cpu().numpy(), vc_want)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_cuda_v2_matches_reference(lib, case, dtype):
    """Version 2's prologue/epilogue kernels around the CUDA kernel."""
    torch = _cuda_or_skip(lib)
    x, heads = rotary_inputs(case, dtype, seed=24)
    ref, kc_want, vc_want = reference_v2(heads)
    out, dev = _cuda_attention(
        lib, torch, "rd_tree_attention_rotary_cuda", x, case, dtype, extra=("cos", "sin")
    )
    assert_close(out, ref, dtype)
    # nvcc contracts the rotary's mul-add into an FMA: the rotated keys may differ in the last bit.
    tol = {np.float32: 1e-6, np.float16: 2e-3}[dtype]
    np.testing.assert_allclose(dev["key_cache"].cpu().numpy(), kc_want, rtol=tol, atol=tol)
    np.testing.assert_array_equal(dev["value_cache"].cpu().numpy(), vc_want)


def test_cuda_kv_commit_matches_reference(lib):
    torch = _cuda_or_skip(lib)
    cache, past, source, count = commit_inputs(21, lead=(4, 2), dtype=np.float16)
    want = cache.copy()
    apply_commit(want, past, source, count)
    dev = torch.from_numpy(cache).cuda()
    *_, B, Hkv, S, D = cache.shape
    rc = lib.rd_kv_commit_cuda(
        10,
        8,
        B,
        Hkv,
        S,
        D,
        source.shape[1],
        dev.data_ptr(),
        dev.data_ptr(),
        past.ctypes.data,
        source.ctypes.data,
        count.ctypes.data,
        torch.cuda.current_stream().cuda_stream,
    )
    assert rc == 0, lib.rd_last_error().decode()
    np.testing.assert_array_equal(dev.cpu().numpy(), want)


# ---- batch invariance: what lossless speculation on int8-quantized activations needs ---------


@pytest.mark.parametrize("isa", ["best", "avx2", "base"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("past", [60, 1020])  # one key split; a chain across the 1024 boundary
@pytest.mark.parametrize("window", [0, 7, 70])  # none; inside one tile; across tiles and splits
def test_cpu_kernel_gives_a_row_the_same_bits_in_a_chain_and_alone(
    lib, dtype, isa, past, window, monkeypatch
):
    """N chained queries verified in one call give bit-for-bit what each gives when run alone
    after the previous ones were written to the cache (tiles and key splits sit at absolute key
    positions, never chosen from N), with or without a sliding window."""
    if isa != "best":
        monkeypatch.setenv("REDRAFTER_CPU_ISA", isa)
    rng = np.random.default_rng(3)
    B, Hq, Hkv, D, N = 1, 6, 2, 32, 9
    S = past + N + 4
    q = rng.standard_normal((B, Hq, N, D)).astype(dtype)
    k = rng.standard_normal((B, Hkv, N, D)).astype(dtype)
    v = rng.standard_normal((B, Hkv, N, D)).astype(dtype)
    caches = [rng.standard_normal((B, Hkv, S, D)).astype(dtype) for _ in range(2)]
    kc, vc = caches[0].copy(), caches[1].copy()
    mask = np.tril(np.ones((B, N, N), bool))
    chain = ops.tree_attention_host(lib, q, k, v, kc, vc, np.array([past]), mask, window=window)
    kc, vc = caches[0].copy(), caches[1].copy()
    alone = [
        ops.tree_attention_host(
            lib,
            *(np.ascontiguousarray(x[:, :, i : i + 1]) for x in (q, k, v)),
            kc,
            vc,
            np.array([past + i]),
            np.ones((B, 1, 1), bool),
            window=window,
        )
        for i in range(N)
    ]
    np.testing.assert_array_equal(chain, np.concatenate(alone, axis=2))


def _matmul_nbits_model(
    tmp_path: Path, K: int, N: int, *, symmetric: bool, block: int, method: str = "rtn"
) -> Path:
    """One MatMul of a random (K, N) weight, quantized by ONNX Runtime's own quantizer (HQQ:
    float zero points)."""
    from onnx import numpy_helper

    from redrafter.export.quantize import quantization, quantize_graph

    w = np.random.default_rng(K + N).standard_normal((K, N)).astype(np.float32) * 0.05
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["A", "W"], ["Y"])],
        "matmul",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", K])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", N])],
        [numpy_helper.from_array(w, "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    q = quantization("int4", block_size=block, symmetric=symmetric, method=method)
    path = tmp_path / f"matmul-{K}-{N}-{symmetric}-{block}-{method}.onnx"
    onnx.save(quantize_graph(model, q), str(path))
    return path


@pytest.mark.parametrize(
    "K, N, symmetric, block, method",
    [
        (64, 48, True, 32, "rtn"),
        (100, 200, False, 32, "rtn"),
        (96, 130, True, 64, "rtn"),
        (128, 40, False, 128, "rtn"),
        (100, 200, False, 32, "hqq"),  # float zero points
        (128, 40, False, 64, "hqq"),
    ],
)
def test_matmul_int4_matches_matmul_nbits_bit_for_bit_across_rows(
    lib, tmp_path, monkeypatch, K, N, symmetric, block, method
) -> None:
    """redrafter::MatMulInt4 (swapped in for MatMulNBits by the runtime) agrees with ONNX
    Runtime's kernel to the rounding of int8 activations, and every row's bits are the same
    whether it runs alone or with others, on the AVX-512 VNNI path and the portable loop."""
    from redrafter.runtimes.onnxruntime import EXTERNAL_DATA_FOLDER, with_int4_kernel

    path = _matmul_nbits_model(tmp_path, K, N, symmetric=symmetric, block=block, method=method)
    if method == "hqq":
        inits = {t.name: t for t in onnx.load(str(path)).graph.initializer}
        zp = [t for name, t in inits.items() if "zero_points" in name]
        assert zp and all(t.data_type == TensorProto.FLOAT for t in zp)
    swapped = with_int4_kernel(path)
    assert swapped is not None
    assert [node.op_type for node in onnx.load_from_string(swapped).graph.node] == ["MatMulInt4"]

    def session(model) -> ort.InferenceSession:
        options = ort.SessionOptions()
        ops.register(options, required=True)
        options.add_session_config_entry(EXTERNAL_DATA_FOLDER, str(tmp_path))
        return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])

    a = np.random.default_rng(7).standard_normal((7, K)).astype(np.float32)
    a[3, :32] = 0.0  # an all-zero activation block
    reference = session(str(path)).run(None, {"A": a})[0]
    outputs = {}
    for isa in ("best", "base"):
        if isa == "base":
            monkeypatch.setenv("REDRAFTER_CPU_ISA", "base")
        ours = session(swapped)
        together = ours.run(None, {"A": a})[0]
        alone = np.concatenate([ours.run(None, {"A": a[i : i + 1]})[0] for i in range(len(a))])
        np.testing.assert_array_equal(together, alone)
        outputs[isa] = together
    np.testing.assert_array_equal(outputs["best"], outputs["base"])
    assert np.abs(outputs["best"] - reference).max() < 0.02 * np.abs(reference).max()


def _cpu_flags() -> set[str]:
    """The CPU's feature flags as Linux reports them (empty elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((x for x in text.splitlines() if x.startswith("flags")), "")
    return set(line.split(":", 1)[-1].split())


CPU_FLAGS = _cpu_flags()
HAS_VNNI = "avx512_vnni" in CPU_FLAGS
HAS_AMX = {"amx_tile", "amx_int8"} <= CPU_FLAGS
# MatMulInt4's code paths (REDRAFTER_CPU_ISA; "best" = unset: matmul_int4.h says which)
INT4_ISAS = [
    "best",
    "base",
    pytest.param(
        "vnni", marks=pytest.mark.skipif(not HAS_VNNI, reason="this CPU has no AVX-512 VNNI")
    ),
    pytest.param(
        "amx", marks=pytest.mark.skipif(not HAS_AMX, reason="this CPU has no AMX-TILE/AMX-INT8")
    ),
]


def matmul_int4_model(
    K: int,
    N: int,
    *,
    block: int,
    zeros: str,
    bias: bool,
    seed: int | None = None,
    nodes: int = 1,
    split: list[int] | None = None,
    outputs: int | None = None,
) -> bytes:
    """`nodes` chained redrafter::MatMulInt4 nodes over the same random 4-bit codes, scales,
    zero points (`zeros`: "none", "uint8" packed 4-bit, or "float") and bias (initializers),
    A (M, K) -> Y (M, N) (K == N when chained); `seed` picks the weights (default: from K, N).
    `split` (one node): the `split` attribute, outputs Y0.. of those widths (`outputs`: how
    many, default len(split))."""
    from onnx import numpy_helper

    rng = np.random.default_rng(K * 7 + N if seed is None else seed)
    KB = -(-K // block)
    weights = {
        "B": rng.integers(0, 256, (N, KB, block // 2), dtype=np.uint8),
        "scales": rng.uniform(0.002, 0.02, N * KB).astype(np.float32),
    }
    if zeros == "uint8":
        weights["zero_points"] = rng.integers(0, 256, N * -(-KB // 2), dtype=np.uint8)
    elif zeros == "float":  # e.g. a GGUF Q4_1 block's -min / d: anywhere, not only 0..15
        weights["zero_points"] = rng.uniform(-20, 20, N * KB).astype(np.float32)
    if bias:
        weights["bias"] = rng.standard_normal(N).astype(np.float32)
    names = [
        "A",
        "B",
        "scales",
        "zero_points" if zeros != "none" else "",
        "",
        "bias" if bias else "",
    ]
    while not names[-1]:
        names.pop()
    assert nodes == 1 or K == N
    links = ["A", *(f"h{i}" for i in range(1, nodes)), "Y"]
    graph_nodes = [
        helper.make_node(
            "MatMulInt4",
            [x, *names[1:]],
            [y],
            domain=OP_DOMAIN,
            K=K,
            N=N,
            bits=4,
            block_size=block,
        )
        for x, y in zip(links, links[1:], strict=False)
    ]
    graph_outputs = [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", N])]
    if split is not None or outputs is not None:
        assert nodes == 1
        count = len(split or []) if outputs is None else outputs
        names_out = [f"Y{j}" for j in range(count)]
        del graph_nodes[0].output[:]
        graph_nodes[0].output.extend(names_out)
        if split is not None:
            graph_nodes[0].attribute.append(helper.make_attribute("split", split))
        graph_outputs = [
            helper.make_tensor_value_info(y, TensorProto.FLOAT, None) for y in names_out
        ]
    graph = helper.make_graph(
        graph_nodes,
        "matmul_int4",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", K])],
        graph_outputs,
        [numpy_helper.from_array(v, k) for k, v in weights.items()],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(OP_DOMAIN, 1)]
    )
    model.ir_version = 8
    return model.SerializeToString()


def int4_activations(M: int, K: int) -> np.ndarray:
    """(M, K) float32 with an all-zero 32-block, one lone spike and rows of different scale."""
    a = np.random.default_rng(M + K).standard_normal((M, K)).astype(np.float32)
    a *= np.geomspace(0.01, 10, M, dtype=np.float32)[:, None]
    a[min(3, M - 1), :32] = 0.0
    a[M // 2, K // 3] = 50.0
    return a


def test_matmul_int4_split_outputs_are_the_columns_bit_for_bit(lib) -> None:
    """With `split`, one node writes its columns to several outputs: each is exactly its slice of
    the unsplit product, at every row count; a split that does not match N or the outputs is a
    one-line error."""
    import onnxruntime as ort

    K, N = 128, 160
    sizes = [64, 48, 48]  # q/k/v-like
    sessions = {}
    for name, model in {
        "whole": matmul_int4_model(K, N, block=32, zeros="uint8", bias=True),
        "split": matmul_int4_model(K, N, block=32, zeros="uint8", bias=True, split=sizes),
    }.items():
        options = ort.SessionOptions()
        ops.register(options, required=True)
        sessions[name] = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    for M in (1, 2, 5, 8, 9):
        a = int4_activations(M, K)
        (whole,) = sessions["whole"].run(None, {"A": a})
        parts = sessions["split"].run(None, {"A": a})
        assert [p.shape for p in parts] == [(M, w) for w in sizes]
        np.testing.assert_array_equal(np.concatenate(parts, axis=1), whole)
    for bad, outputs, message in [
        ([64, 48, 40], None, "summing to N = 160"),
        ([64, 96], 3, "must give 3 positive widths"),
        (None, 2, "2 outputs need a `split` attribute"),
    ]:
        options = ort.SessionOptions()
        ops.register(options, required=True)
        model = matmul_int4_model(
            K, N, block=32, zeros="uint8", bias=True, split=bad, outputs=outputs
        )
        sess = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        with pytest.raises(Exception, match=message):
            sess.run(None, {"A": int4_activations(2, K)})
    assert ops.matmul_int4_max_outputs() == 4


def _with_folds(model: bytes, K: int, N: int, *, folded: bool, split: bool = False) -> bytes:
    """matmul_int4_model's one node with the float steps around a projection: Y = MatMulInt4(A
    * G) + R, either as standard Mul and Add nodes (folded=False) or in the node itself, its
    inputs 7 (`gate`) and 6 (`residual`). `split`: a split node (residual with it: an error)."""
    m = onnx.load_from_string(model)
    g = m.graph
    node = g.node[0]
    g.input.extend(
        [
            # shapes unstated, so a wrong one reaches the kernel's own check
            helper.make_tensor_value_info("G", TensorProto.FLOAT, None),
            helper.make_tensor_value_info("R", TensorProto.FLOAT, None),
        ]
    )
    if folded:
        node.input.extend([""] * (6 - len(node.input)) + ["R", "G"])
        return m.SerializeToString()
    node.input[0] = "AG"
    node.output[0] = "P"
    g.node.insert(0, helper.make_node("Mul", ["A", "G"], ["AG"]))
    g.node.append(helper.make_node("Add", ["P", "R"], ["Y"]))
    return m.SerializeToString()


def test_matmul_int4_residual_and_gate_inputs_keep_the_bits_of_add_and_mul_nodes(lib) -> None:
    """Inputs 6 (`residual`) and 7 (`gate`) do inside the node what a residual Add after it and
    a SwiGLU Mul before it did: the same bits at every row count; a residual or gate of another
    shape, or a residual on a split node, is a one-line error."""
    import onnxruntime as ort

    K, N = 96, 80
    base = matmul_int4_model(K, N, block=32, zeros="uint8", bias=True)
    sessions = {}
    for folded in (False, True):
        options = ort.SessionOptions()
        ops.register(options, required=True)
        sessions[folded] = ort.InferenceSession(
            _with_folds(base, K, N, folded=folded), options, providers=["CPUExecutionProvider"]
        )
    rng = np.random.default_rng(8)
    for M in (1, 4, 5, 9):
        feeds = {
            "A": int4_activations(M, K),
            "G": rng.standard_normal((M, K)).astype(np.float32),
            "R": rng.standard_normal((M, N)).astype(np.float32) * 3,
        }
        (want,) = sessions[False].run(None, feeds)
        (got,) = sessions[True].run(None, feeds)
        np.testing.assert_array_equal(got, want)
    feeds = {"A": int4_activations(2, K), "G": np.ones((2, K), np.float32)}
    with pytest.raises(Exception, match="input 'residual' has shape"):
        sessions[True].run(None, {**feeds, "R": np.ones((2, N - 1), np.float32)})
    with pytest.raises(Exception, match="input 'gate' has shape"):
        sessions[True].run(
            None, {**feeds, "G": np.ones((1, K), np.float32), "R": np.ones((2, N), np.float32)}
        )
    options = ort.SessionOptions()
    ops.register(options, required=True)
    split = matmul_int4_model(K, N, block=32, zeros="uint8", bias=True, split=[40, 40])
    sess = ort.InferenceSession(
        _with_folds(split, K, N, folded=True), options, providers=["CPUExecutionProvider"]
    )
    with pytest.raises(Exception, match="residual needs a single output"):
        sess.run(None, {**feeds, "R": np.ones((2, N), np.float32)})
    assert ops.matmul_int4_max_inputs() == 8


@pytest.mark.parametrize(
    "K, N, block, zeros, bias",
    [
        (64, 48, 32, "none", False),  # one group of 3 tiles (an odd tile count: AMX pairs tiles)
        (100, 200, 32, "uint8", True),  # K past the last full sub-block, N past the last tile
        (224, 130, 64, "none", True),  # 7 sub-blocks (AMX pairs them), 9 tiles: a group + 1
        (256, 40, 128, "uint8", False),  # 4 sub-blocks per block, asymmetric
        (100, 200, 32, "float", True),  # float zero points (GGUF Q4_1, HQQ), K and N ragged
        (256, 130, 64, "float", False),  # float zero points, 2 sub-blocks per block
    ],
)
def test_matmul_int4_paths_agree_bit_for_bit_for_every_row_count(
    lib, monkeypatch, K, N, block, zeros, bias
) -> None:
    """AMX-INT8, AVX-512 VNNI, the portable loop and the default choice among them give the
    same bits for 1..33 rows (AMX and VNNI both take rows 8 at a time), and every row the bits
    it gets alone: the integer sub-block sums are exact and the float steps are one fixed order."""
    sess = session(matmul_int4_model(K, N, block=block, zeros=zeros, bias=bias))
    a = int4_activations(33, K)
    outputs = {}
    for isa in ("best", "base", "vnni", "amx"):
        if (isa == "vnni" and not HAS_VNNI) or (isa == "amx" and not HAS_AMX):
            continue  # the other paths still agree; test_matmul_int4_isa_forcing says why
        monkeypatch.setenv("REDRAFTER_CPU_ISA", isa)
        together = sess.run(None, {"A": a})[0]
        for m in range(1, 33):
            np.testing.assert_array_equal(
                sess.run(None, {"A": a[:m]})[0], together[:m], err_msg=f"{isa}: first {m} rows"
            )
        for i in range(len(a)):
            np.testing.assert_array_equal(
                sess.run(None, {"A": a[i : i + 1]})[0][0], together[i], err_msg=f"{isa}: row {i}"
            )
        outputs[isa] = together
    for isa, out in outputs.items():
        np.testing.assert_array_equal(out, outputs["base"], err_msg=f"{isa} vs base")


@pytest.mark.parametrize("zeros", ["none", "uint8", "float"])
def test_matmul_int4_nodes_over_the_same_weights_share_one_packing(lib, zeros) -> None:
    """Nodes reading the same initializers (a drafter's unrolled steps) share one packed weight
    and give what the one-node graph gives step by step; sessions over other weights at the same
    shape, made while the first lives or after it is gone, never reuse its packing."""
    K = N = 96
    a = int4_activations(5, K)

    def single(seed: int) -> ort.InferenceSession:
        return session(matmul_int4_model(K, N, block=32, zeros=zeros, bias=True, seed=seed))

    chained = session(matmul_int4_model(K, N, block=32, zeros=zeros, bias=True, seed=1, nodes=3))
    one, other = single(1), single(2)
    want = a
    for _ in range(3):
        want = one.run(None, {"A": want})[0]
    np.testing.assert_array_equal(chained.run(None, {"A": a})[0], want)
    first, second = one.run(None, {"A": a})[0], other.run(None, {"A": a})[0]
    assert not np.array_equal(first, second)  # the two weights differ
    del chained, one, other  # their packed copies go with their kernels
    for seed, expected in ((2, second), (1, first), (2, second)):
        np.testing.assert_array_equal(single(seed).run(None, {"A": a})[0], expected)


@pytest.mark.parametrize("isa", INT4_ISAS)
def test_matmul_int4_lm_head_width(lib, monkeypatch, isa) -> None:
    """The LM head's shape (K 576 -> N 49152: 384 groups of 8 tiles) at the row counts a tree
    verification uses gives the portable loop's bits on each path."""
    sess = session(matmul_int4_model(576, 49152, block=32, zeros="none", bias=False))
    a = int4_activations(17, 576)
    monkeypatch.setenv("REDRAFTER_CPU_ISA", "base")
    expected = sess.run(None, {"A": a})[0]
    monkeypatch.setenv("REDRAFTER_CPU_ISA", isa)
    for m in (1, 2, 6, 17):
        np.testing.assert_array_equal(
            sess.run(None, {"A": a[:m]})[0], expected[:m], err_msg=f"{isa}: {m} rows"
        )


@pytest.mark.parametrize("isa", ["vnni", "amx"])
def test_matmul_int4_isa_forcing(lib, monkeypatch, isa) -> None:
    """Forcing a path runs it where the CPU has it and fails loudly where not (never a silent
    fallback, so the tests above prove which path ran)."""
    monkeypatch.setenv("REDRAFTER_CPU_ISA", isa)
    sess = session(matmul_int4_model(64, 48, block=32, zeros="none", bias=False))
    a = int4_activations(4, 64)
    if {"vnni": HAS_VNNI, "amx": HAS_AMX}[isa]:
        assert sess.run(None, {"A": a})[0].shape == (4, 48)
    else:
        with pytest.raises(Exception, match=f"REDRAFTER_CPU_ISA={isa}"):
            sess.run(None, {"A": a})


@pytest.mark.parametrize("isa", ["best", "base"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("past", [60, 62, 1020])  # within a tile, across a tile, across a split
@pytest.mark.parametrize("window", [0, 2, 66])  # none; shorter than the tree; across a tile
def test_cpu_kernel_gives_a_tree_node_the_bits_of_its_path_decoded_alone(
    lib, dtype, isa, past, window, monkeypatch
):
    """In a branching tree (two beams sharing a root), each node gets bit for bit what it gets
    as a one-token step once its ancestors are committed: visible new keys are folded at their
    committed positions, not at their slots."""
    if isa != "best":
        monkeypatch.setenv("REDRAFTER_CPU_ISA", isa)
    rng = np.random.default_rng(5)
    B, Hq, Hkv, D, N = 1, 6, 2, 32, 5
    S = past + N + 8
    q, k, v = (rng.standard_normal(s).astype(dtype) for s in [(B, Hq, N, D), *[(B, Hkv, N, D)] * 2])
    caches = [rng.standard_normal((B, Hkv, S, D)).astype(dtype) for _ in range(2)]
    paths = [[0, 1, 2], [0, 3, 4]]  # slots 3 and 4: the second beam, at depths 1 and 2
    mask = np.zeros((B, N, N), bool)
    for path in paths:
        for depth, slot in enumerate(path):
            mask[0, slot, path[: depth + 1]] = True
    kc, vc = caches[0].copy(), caches[1].copy()
    tree = ops.tree_attention_host(lib, q, k, v, kc, vc, np.array([past]), mask, window=window)
    for path in paths:
        kc, vc = caches[0].copy(), caches[1].copy()
        for depth, slot in enumerate(path):
            one = [np.ascontiguousarray(x[:, :, slot : slot + 1]) for x in (q, k, v)]
            out = ops.tree_attention_host(
                lib,
                *one,
                kc,
                vc,
                np.array([past + depth]),
                np.ones((B, 1, 1), bool),
                window=window,
            )
            np.testing.assert_array_equal(out[:, :, 0], tree[:, :, slot])


# ---- sliding window and soft-capping (Mistral/Qwen2 and Gemma's local layers; Gemma 2) --------


def random_trees(rng, B, N):
    """Ancestor-or-self masks (B, N, N) of random trees: node j's parent is an earlier node."""
    mask = np.zeros((B, N, N), bool)
    for b in range(B):
        for j in range(N):
            if j:
                mask[b, j] = mask[b, rng.integers(0, j)]
            mask[b, j, j] = True
    return mask


# (case, window): a window of 1 (itself only), windows shorter than the tree (trees straddle the
# window's edge), longer than a CPU tile (64), a CUDA stride (128) or the whole cache, and
# queries far past the window (P up to 700).
WINDOW_CASES = [
    ((1, 1, 1, 1, 8, 20), 1),
    ((3, 6, 2, 13, 24, 64), 4),
    ((2, 8, 1, 7, 16, 50), 17),
    ((2, 9, 3, 1, 64, 700), 100),
    ((1, 9, 3, 64, 64, 300), 70),
    ((2, 4, 2, 3, 20, 30), 2),
    ((2, 4, 2, 5, 16, 600), 1000),
]


def window_inputs(case, dtype, seed):
    x = make_inputs(case, dtype, seed)
    x["tree_mask"] = random_trees(np.random.default_rng(seed), case[0], case[3])
    return x


def test_window_keeps_the_query_and_the_window_minus_one_keys_before_it(lib):
    """transformers' convention, checked by hand: with P = 5 committed keys and a chain of 3 new
    tokens (positions 5, 6, 7) and window 3, position p sees p-2, p-1, p. Zero queries weigh
    every visible key equally and one-hot values (value of position t = e_t) show which."""
    torch = pytest.importorskip("torch")
    from redrafter.models.attention import attend

    B, Hq, Hkv, N, D, S, P = 1, 2, 1, 3, 8, 8, 5
    third = 1 / 3
    EXPECTED = np.array(
        [
            [0, 0, 0, third, third, third, 0, 0],  # position 5
            [0, 0, 0, 0, third, third, third, 0],  # position 6
            [0, 0, 0, 0, 0, third, third, third],  # position 7
        ]
    )
    rng = np.random.default_rng(0)
    eye = np.eye(D, dtype=np.float32)
    x = dict(
        query=np.zeros((B, Hq, N, D), np.float32),
        key=rng.standard_normal((B, Hkv, N, D)).astype(np.float32),
        value=np.ascontiguousarray(eye[None, None, P : P + N]),
        key_cache=rng.standard_normal((B, Hkv, S, D)).astype(np.float32),
        value_cache=np.ascontiguousarray(np.where(np.arange(S)[:, None] < P, eye, 0)[None, None]),
        past_len=np.array([P]),
        tree_mask=np.tril(np.ones((B, N, N), bool)),
    )
    got = {
        "cpu": ops.tree_attention_host(lib, **{k: v.copy() for k, v in x.items()}, window=3),
        "cuda_emulated": ops.tree_attention_host(
            lib, **{k: v.copy() for k, v in x.items()}, window=3, emulate_cuda_sms=1
        ),
        "torch": attend(**{k: torch.from_numpy(v.copy()) for k, v in x.items()}, window=3)[
            0
        ].numpy(),
    }
    for name, out in got.items():
        for h in range(Hq):
            np.testing.assert_allclose(out[0, h], EXPECTED, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("softcap", [0.0, 2.5])
@pytest.mark.parametrize("isa", ["best", "base"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize(("case", "window"), WINDOW_CASES, ids=str)
def test_cpu_kernel_window_and_softcap_match_reference(
    lib, case, window, dtype, isa, softcap, monkeypatch
):
    if isa != "best":
        monkeypatch.setenv("REDRAFTER_CPU_ISA", isa)
    x = window_inputs(case, dtype, seed=30)
    ref, _, _ = reference(**x, window=window, softcap=softcap)
    kc, vc = x["key_cache"].copy(), x["value_cache"].copy()
    out = ops.tree_attention_host(
        lib, **{**x, "key_cache": kc, "value_cache": vc}, window=window, softcap=softcap
    )
    assert_close(out, ref, dtype)
    check_caches(x, kc, vc)


@pytest.mark.parametrize("num_sms", [1, 132])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize(("case", "window"), WINDOW_CASES, ids=str)
def test_cuda_tile_math_window_and_softcap_emulated_on_host(lib, case, window, dtype, num_sms):
    x = window_inputs(case, dtype, seed=31)
    ref, _, _ = reference(**x, window=window, softcap=3.0)
    out = ops.tree_attention_host(lib, **x, window=window, softcap=3.0, emulate_cuda_sms=num_sms)
    assert_close(out, ref, dtype)


@pytest.mark.parametrize("case", [(2, 6, 2, 13, 24, 64), (1, 2, 1, 400, 16, 450)], ids=str)
@pytest.mark.parametrize("sms", [None, 132])
def test_window_positions_come_from_the_mask_for_any_mask(lib, sms, case):
    """The contract defines a new token's position by its mask row (P + visible new - 1) for
    any mask, trees or not, and every implementation follows it. With 400 new tokens the
    windows start tiles past P while a row still sees new keys whose slot (or fold rank) lies
    before its window: no tile holding new keys may be skipped."""
    x = make_inputs(case, np.float32, seed=32)  # random (non-tree) masks
    ref, _, _ = reference(**x, window=5)
    out = ops.tree_attention_host(lib, **x, window=5, emulate_cuda_sms=sms)
    assert_close(out, ref, np.float32)


@pytest.mark.parametrize("sms", [None, 132])
def test_rejects_a_negative_window_or_softcap(lib, sms):
    x = make_inputs((1, 2, 1, 2, 8, 10), np.float32, seed=33)
    with pytest.raises(ValueError, match="window must be >= 0"):
        ops.tree_attention_host(lib, **x, window=-1, emulate_cuda_sms=sms)
    with pytest.raises(ValueError, match="softcap must be a finite number >= 0"):
        ops.tree_attention_host(lib, **x, softcap=-1.0, emulate_cuda_sms=sms)


@pytest.mark.parametrize(("case", "window"), WINDOW_CASES[1:6], ids=str)
def test_torch_reference_window_and_softcap_match_numpy(case, window):
    torch = pytest.importorskip("torch")
    from redrafter.models.attention import attend

    x = window_inputs(case, np.float32, seed=34)
    ref, kc_want, _ = reference(**x, window=window, softcap=1.5)
    t = {k: torch.from_numpy(v.copy()) for k, v in x.items()}
    out, kc, _ = attend(**t, window=window, softcap=1.5)
    assert_close(out.numpy(), ref, np.float32)
    np.testing.assert_array_equal(kc.numpy(), kc_want)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize(("case", "window"), [WINDOW_CASES[1], WINDOW_CASES[4]], ids=str)
def test_ort_v2_window_and_softcap_body_and_native_kernel_agree(lib, case, window, dtype, capfd):
    """A version-2 node with `window` and `softcap`: the portable body (stock ORT) and the
    native kernel both match the reference; the copy warning shows the native kernel ran."""
    node = tree_attention_model(dtype, scale=0.3, version=2, window=window, softcap=4.0)
    model = with_portable_body(node, 2, window=True, softcap=True)
    x, heads = rotary_inputs(case, dtype, seed=35)
    trees = random_trees(np.random.default_rng(35), case[0], case[3])
    x["tree_mask"] = heads["tree_mask"] = trees
    ref, _, _ = reference_v2(heads, scale=0.3, window=window, softcap=4.0)
    portable = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    assert_close(portable.run(None, x)[0], ref, dtype)
    capfd.readouterr()
    out_native = run_bound(session(model), x, shared=False)[0]
    assert "copies the whole cache" in capfd.readouterr().err
    assert_close(out_native, ref, dtype)


def test_portable_body_without_the_attributes_reads_them_as_off(lib):
    """A node that sets neither attribute runs the windowed, capped body as plain attention
    (the body's defaults), as the native kernel does."""
    node = tree_attention_model(np.float32, scale=0.3, version=2)
    model = with_portable_body(node, 2, window=True, softcap=True)
    x, heads = rotary_inputs(CASES[1], np.float32, seed=36)
    ref, _, _ = reference_v2(heads, scale=0.3)
    portable = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    assert_close(portable.run(None, x)[0], ref, np.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize(("case", "window"), WINDOW_CASES, ids=str)
def test_cuda_kernel_window_and_softcap_match_reference(lib, case, window, dtype):
    torch = _cuda_or_skip(lib)
    x = window_inputs(case, dtype, seed=37)
    ref, kc_want, _ = reference(**x, window=window, softcap=3.0)
    out, dev = _cuda_attention(
        lib, torch, "rd_tree_attention_cuda", x, case, dtype, window=window, softcap=3.0
    )
    assert_close(out, ref, dtype)
    np.testing.assert_array_equal(dev["key_cache"].cpu().numpy(), kc_want)
