"""Core ML export (docs/design.md §4, Core ML bullet): the base model as a *stateful* ML Program
whose KV cache lives in Core ML states, and the drafter's whole beam search as a stateless one.

Dimensions: N new tokens (a ranged input dimension, 1..N_max), S cache capacity (fixed: Core ML
states have a fixed shape), L beam length (= rows moved by a commit), W beam width, Lyr layers,
Hq/Hkv heads, D head dim, E hidden, V vocab. Batch is 1: a runtime keeps one state per row.

base.mlpackage     inputs  input_ids (1,N) int32, position_ids (1,N) int32,
                           tree_mask (1,N,N) float32 (1 = may attend; Core ML has no bool inputs),
                           past_len (1,) int32 committed length P,
                           commit_from (L,) int32, commit_at (1,) int32 the previous step's commit
                   states  key_cache_{i}, value_cache_{i} (1,Hkv,S,D) float16, i < Lyr
                   outputs logits (1,N,V) float32, hidden_states (1,N,E) float32
drafter.mlpackage  inputs  context (1,E) float32, first_token (1,) int32
                   outputs beams (1,W,L) int32, log_probs (1,W,L-1,V) float32

One base call = commit then verify, both on the states, with no host round trip of the cache:
1. commit (§3.6) of the previous step: rows `commit_from` (absolute slots; identity past the
   accepted count) are gathered and written at [commit_at, commit_at+L): `gather → slice_update`;
2. the N tokens run through the layers; each layer's `redrafter::tree_attention` (the same torch
   op the ONNX export uses) is lowered by `_tree_attention_to_mil` to `slice_update` of K/V at
   [P, P+N) plus iOS18 `scaled_dot_product_attention` with a boolean (1,1,N,S) mask;
3. the updated caches are written back: `read_state → … → coreml_update_state`.

Why fp16 states even in a float32 export: Core ML (iOS18) supports only fp16 states, and
coremltools silently casts fp32 buffers to fp16, so we register them as fp16 ourselves. The
float32 program keeps each cache as two fp16 states (hi + lo, see `StatefulBase`), so its
cached K/V keep fp32 precision; the float16 program keeps one. docs/coreml.md has the details.
"""

from __future__ import annotations

import copy
import functools
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from redrafter.bundle.manifest import CoreMLRecord, Quantization
from redrafter.bundle.names import (
    BASE_OUTPUTS,
    BEAMS,
    COREML_DIR,
    DRAFTER_OUTPUTS,
    coreml_package,
    state_names,
)
from redrafter.config import BeamShape
from redrafter.coremltools_support import import_coremltools, quiet
from redrafter.errors import RedrafterError
from redrafter.export import tree_attention as ta  # noqa: F401  (registers redrafter::tree_attention)
from redrafter.models.attention import with_rotary_layout
from redrafter.models.drafter import Drafter
from redrafter.models.llama import Transformer

DEPLOYMENT_TARGET = "iOS18"  # ML Program with states: iOS 18 / macOS 15 and later
DEFAULT_CAPACITY = 1024  # cache slots S (capped at the model's context length)
PREFILL_TOKENS = 64  # N_max is max(PREFILL_TOKENS, W*L): prefill runs in chunks of N_max


class CoreMLExportError(RedrafterError):
    """coremltools could not convert a model we expected to convert."""


# -- the custom op, lowered to MIL -----------------------------------------------------------------
_REGISTERED = False


def register_converters() -> None:
    """Teach coremltools `redrafter::tree_attention` (idempotent; done at export, not import)."""
    global _REGISTERED
    if _REGISTERED:
        return
    import_coremltools()
    from coremltools.converters.mil.frontend.torch.torch_op_registry import register_torch_op

    register_torch_op(_tree_attention_to_mil, torch_alias=["redrafter::tree_attention"])
    register_torch_op(_log_softmax_to_mil, torch_alias=["log_softmax"], override=True)
    register_torch_op(_gelu_to_mil, torch_alias=["gelu"], override=True)
    _REGISTERED = True


def _gelu_to_mil(context: Any, node: Any) -> None:
    """gelu, honouring `approximate="tanh"` (Gemma's GeGLU). coremltools 9.0 reads it only as a
    positional input; torch.export passes it as a keyword, so the tanh form silently became the
    exact erf form (~1e-3 off on a tiny Gemma's logits)."""
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.frontend.torch.ops import _get_inputs, _get_kwinputs

    inputs = _get_inputs(context, node, expected=[1, 2])
    approximate = inputs[1] if len(inputs) == 2 else None
    if approximate is None:
        found = _get_kwinputs(context, node, "approximate")
        approximate = found[0] if found else None
    # A positional input is a const Var; a keyword one arrives as the plain string.
    tanh = getattr(approximate, "val", approximate) == "tanh"
    mode = "TANH_APPROXIMATION" if tanh else "EXACT"
    context.add(mb.gelu(x=inputs[0], mode=mode, name=node.name))


def _log_softmax_to_mil(context: Any, node: Any) -> None:
    """log_softmax as x - max - log(sum(exp(x - max))). coremltools 9.0 lowers it to
    log(softmax(x)): in fp16 every log-prob below about -16.6 underflows (softmax values go
    subnormal), and `log`'s epsilon turns masked entries (LOG_0) into about -103."""
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.frontend.torch.ops import _get_inputs

    inputs = _get_inputs(context, node, min_expected=2)
    x, axis = inputs[0], int(inputs[1].val)
    shifted = mb.sub(x=x, y=mb.reduce_max(x=x, axes=[axis], keep_dims=True))
    total = mb.reduce_sum(x=mb.exp(x=shifted), axes=[axis], keep_dims=True)  # >= 1: log is safe
    context.add(mb.sub(x=shifted, y=mb.log(x=total), name=node.name))


def _tree_attention_to_mil(context: Any, node: Any) -> None:
    """`redrafter::tree_attention` → MIL, same semantics as models/attention.py (batch 1):
    K/V written at [P, P+N) with `slice_update`, then iOS18 `scaled_dot_product_attention` over
    all S slots with the boolean mask `slot < P  or  (P <= slot < P+N and tree_mask[i, slot-P])`.
    KV heads are repeated for GQA. SDPA's scale is fixed at 1/sqrt(D): no `scale=`, so Core ML
    can use the fused op; another scale is folded into the query. A sliding `window` narrows
    the mask (models/attention.py: positions P + depth, depth from the tree mask's rows);
    `softcap` has no fused form, so a capped layer spells out matmul, tanh, softmax, matmul."""
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.frontend.torch.ops import _get_inputs

    inputs = _get_inputs(context, node, expected=[8, 9, 10])
    q, k, v, kc, vc, past_len, tree_mask, scale = inputs[:8]
    window = int(inputs[8].val) if len(inputs) > 8 else 0
    softcap = float(inputs[9].val) if len(inputs) > 9 else 0.0
    B, Hq, _, D = q.shape  # (1, Hq, N, D); N may be symbolic
    _, Hkv, S, _ = kc.shape  # (1, Hkv, S, D)
    if B != 1:
        raise CoreMLExportError(f"Core ML tree attention is batch 1 (states are), got batch {B}")
    p = mb.squeeze(x=mb.slice_by_size(x=past_len, begin=[0], size=[1]))  # () int32, P
    n = mb.slice_by_size(x=mb.shape(x=k), begin=[2], size=[1])  # (1,) N
    zero = np.zeros(1, np.int32)
    begin = mb.concat(values=[zero, zero, mb.expand_dims(x=p, axes=[0]), zero], axis=0)
    p_plus_n = mb.add(x=mb.expand_dims(x=p, axes=[0]), y=n)  # (1,) P + N
    end = mb.concat(
        values=[np.array([1, Hkv], np.int32), p_plus_n, np.array([D], np.int32)], axis=0
    )
    k_new = mb.slice_update(x=kc, update=mb.cast(x=k, dtype=_mil_dtype(kc)), begin=begin, end=end)
    v_new = mb.slice_update(x=vc, update=mb.cast(x=v, dtype=_mil_dtype(vc)), begin=begin, end=end)
    # The mask over cache slots: rel = slot - P; committed slots (rel < 0) are visible to all.
    rel = mb.sub(x=mb.range_1d(start=0, end=S, step=1), y=p)  # (S,)
    n_scalar = mb.squeeze(x=n)
    is_new = mb.logical_and(x=mb.greater_equal(x=rel, y=0), y=mb.less(x=rel, y=n_scalar))  # (S,)
    j = mb.maximum(x=mb.minimum(x=rel, y=mb.sub(x=n_scalar, y=1)), y=0)  # (S,) new-token index
    # gather has no bool variant: go through int32.
    tree = mb.cast(
        x=mb.gather(x=mb.cast(x=tree_mask, dtype="int32"), indices=j, axis=2), dtype="bool"
    )
    mask = mb.logical_or(x=mb.less(x=rel, y=0), y=mb.logical_and(x=tree, y=is_new))  # (1, N, S)
    if window > 0:
        depth = mb.sub(
            x=mb.reduce_sum(x=mb.cast(x=tree_mask, dtype="int32"), axes=[2], keep_dims=False),
            y=1,
        )  # (1, N) ancestors of each new token
        new_pos = mb.add(x=mb.gather(x=depth, indices=j, axis=1), y=p)  # (1, S) P + depth(j)
        key_pos = mb.select(cond=is_new, a=new_pos, b=mb.range_1d(start=0, end=S, step=1))
        before = mb.sub(x=mb.add(x=depth, y=p), y=np.int32(window))  # (1, N) query pos - window
        in_window = mb.greater(
            x=mb.expand_dims(x=key_pos, axes=[1]), y=mb.expand_dims(x=before, axes=[2])
        )  # (1, N, S)
        mask = mb.logical_and(x=mask, y=in_window)
    mask = mb.expand_dims(x=mask, axes=[1])  # (1, 1, N, S)
    rep = Hq // Hkv

    def repeat_kv(x: Any) -> Any:  # (1, Hkv, S, D) -> (1, Hq, S, D); head h reads h // rep
        if rep == 1:
            return x
        x = mb.tile(x=mb.expand_dims(x=x, axes=[2]), reps=[1, 1, rep, 1, 1])  # (1,Hkv,rep,S,D)
        return mb.reshape(x=x, shape=[1, Hq, S, D])

    dtype = _mil_dtype(q)
    keys = repeat_kv(mb.cast(x=k_new, dtype=dtype))  # (1, Hq, S, D)
    values = repeat_kv(mb.cast(x=v_new, dtype=dtype))
    if softcap > 0:  # Gemma 2: scores capped before the mask, softmax in float32
        qf = mb.cast(x=q, dtype="fp32")
        scores = mb.mul(
            x=mb.matmul(x=qf, y=mb.cast(x=keys, dtype="fp32"), transpose_y=True),
            y=np.float32(scale.val),
        )  # (1, Hq, N, S)
        scores = mb.mul(x=mb.tanh(x=mb.real_div(x=scores, y=np.float32(softcap))), y=softcap)
        scores = mb.select(cond=mask, a=scores, b=np.float32(-np.inf))
        probs = mb.softmax(x=scores, axis=-1)
        out = mb.cast(x=mb.matmul(x=probs, y=mb.cast(x=values, dtype="fp32")), dtype=dtype)
        context.add((out, k_new, v_new), torch_name=node.name)
        return
    factor = float(scale.val) * math.sqrt(D)
    if abs(factor - 1.0) > 1e-7:
        q = mb.mul(x=q, y=np.float32(factor))
    out = mb.scaled_dot_product_attention(
        query=q, key=keys, value=values, attn_mask=mask
    )  # (1, Hq, N, D)
    context.add((out, k_new, v_new), torch_name=node.name)


def _mil_dtype(var: Any) -> str:
    from coremltools.converters.mil.mil import types

    return types.builtin_to_string(var.dtype)


# -- the modules that get converted ------------------------------------------------------------
def _tree_attention(
    *args: torch.Tensor, scale: float, window: int = 0, softcap: float = 0.0
) -> tuple[torch.Tensor, ...]:
    """`Attention.op` for Core ML: the functional custom op, as in the ONNX export."""
    return torch.ops.redrafter.tree_attention(*args, scale, window, softcap)


class StatefulBase(nn.Module):
    """The base model with its KV cache in fp16 buffers (Core ML states), the previous step's
    commit applied first. Runs eagerly too (the same math as the program), which tests use.

    `split=True` (float32 export) keeps each cache as two fp16 states, hi = fp16(x) and
    lo = fp16(x - hi): hi + lo carries ~22 mantissa bits, so the float32 program matches torch
    to fp32 rounding (one fp16 state would round every cached K/V to 11 bits, enough to flip
    greedy tokens). The float16 export keeps one state per cache."""

    def __init__(
        self, base: Transformer, *, capacity: int, commit_length: int, split: bool = False
    ) -> None:
        super().__init__()
        c = base.config
        self.base = copy.deepcopy(base).eval().float()
        self.capacity, self.commit_length, self.split = capacity, commit_length, split
        scale = 1.0 / math.sqrt(c.dim_per_head)
        for layer in self.base.model.layers:
            # Core ML lowers op version 1 (the composite above); the head split, rotary and
            # head merge of version 2 stay torch ops around it, which Core ML compiles itself.
            layer.self_attn.op = with_rotary_layout(functools.partial(_tree_attention, scale=scale))
        shape = (1, c.kv_heads, capacity, c.dim_per_head)  # (1, Hkv, S, D)
        for name in state_names(c.num_hidden_layers, split=split):
            self.register_buffer(name, torch.zeros(shape, dtype=torch.float16))

    def _read(self, name: str) -> torch.Tensor:
        """A cache as float32 (1, Hkv, S, D): `read_state → cast` (+ the lo half when split)."""
        cache = getattr(self, name).float()
        return cache + getattr(self, _lo(name)).float() if self.split else cache

    def _write(self, name: str, value: torch.Tensor) -> None:
        """Store a float32 cache (1, Hkv, S, D): `cast → coreml_update_state` (hi, then lo)."""
        hi = value.half()  # explicit: coremltools tracks buffers in fp32, so re-reading the
        getattr(self, name).copy_(hi)  # state after the copy would not see the rounding
        if self.split:
            getattr(self, _lo(name)).copy_(value - hi.float())  # the rounding error, in fp16

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        tree_mask: torch.Tensor,
        past_len: torch.Tensor,
        commit_from: torch.Tensor,
        commit_at: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """input_ids, position_ids (1, N); tree_mask (1, N, N) bool; past_len (1,) P;
        commit_from (L,) absolute source slots; commit_at (1,). Returns logits (1, N, V) and
        hidden states (1, N, E), both float32."""
        S, L = self.capacity, self.commit_length
        n = self.base.config.num_hidden_layers
        names = [(f"key_cache_{i}", f"value_cache_{i}") for i in range(n)]
        at = commit_at[0].item()
        torch._check(at >= 0)  # the checks let torch.export (and so Core ML) slice at a runtime
        torch._check(at + L <= S)  # offset: gather → slice_update
        caches = []
        for pair in names:
            kv = tuple(self._read(name) for name in pair)
            for cache in kv:
                cache[:, :, at : at + L, :] = cache[:, :, commit_from, :]  # (1, Hkv, L, D)
            caches.append(kv)
        logits, hidden, caches = self.base(input_ids, position_ids, tree_mask, past_len, caches)
        for pair, kv in zip(names, caches, strict=True):
            for name, cache in zip(pair, kv, strict=True):
                self._write(name, cache)
        return logits.float(), hidden.float()


def _lo(name: str) -> str:
    return name.replace("_cache_", "_cache_lo_")


class DraftStep(nn.Module):
    """One step's beam search (L-1 drafter steps unrolled at a static beam shape), batch 1."""

    def __init__(self, drafter: Drafter, embed_weight: torch.Tensor, beam: BeamShape) -> None:
        super().__init__()
        self.drafter, self.beam = copy.deepcopy(drafter).eval().float(), beam
        self.embed_weight = nn.Parameter(embed_weight.detach().float().clone(), requires_grad=False)

    def forward(
        self, context: torch.Tensor, first_token: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """context (1, E), first_token (1,) -> beams (1, W, L), log_probs (1, W, L-1, V)."""
        beams, log_probs = self.drafter.beam_search(
            context, first_token, self.embed_weight, self.beam
        )
        return beams, log_probs.float()


# -- conversion ----------------------------------------------------------------------------------
def base_max_tokens(beam: BeamShape, capacity: int) -> int:
    """N_max, the ranged N dimension's upper bound: a whole tree or a prefill chunk."""
    return min(capacity, max(PREFILL_TOKENS, beam.width * beam.length))


def _torch_export(module: nn.Module, args: tuple, dynamic_shapes: Any) -> Any:
    try:
        with quiet(), torch.no_grad():
            program = torch.export.export(module, args, dynamic_shapes=dynamic_shapes, strict=False)
            return program.run_decompositions({})
    except Exception as e:  # torch.export raises many types; name the module and the cause
        raise CoreMLExportError(f"torch.export of {type(module).__name__} failed: {e}") from e


def export_program_base(
    base: Transformer, *, capacity: int, beam: BeamShape, split: bool = False
) -> Any:
    """torch.export of `StatefulBase` with a ranged N (1..N_max)."""
    module = StatefulBase(base, capacity=capacity, commit_length=beam.length, split=split)
    N = 3
    args = (
        torch.zeros(1, N, dtype=torch.int64),
        torch.arange(N)[None],
        torch.ones(1, N, N, dtype=torch.bool).tril(),
        torch.tensor([1]),
        torch.arange(beam.length),
        torch.tensor([0]),
    )
    n = torch.export.Dim("tokens", min=1, max=base_max_tokens(beam, capacity))
    dynamic = ({1: n}, {1: n}, {1: n, 2: n}, None, None, None)
    return _torch_export(module, args, dynamic)


def export_program_drafter(drafter: Drafter, base: Transformer, beam: BeamShape) -> Any:
    module = DraftStep(drafter, base.embed_weight, beam)
    args = (torch.zeros(1, base.config.hidden_size), torch.zeros(1, dtype=torch.int64))
    return _torch_export(module, args, None)


def convert(
    program: Any, *, dtype: str, outputs: tuple[str, ...], convert_to: str = "mlprogram"
) -> Any:
    """ct.convert an ExportedProgram to an iOS18 ML Program (`convert_to="milinternal"` returns
    the MIL program instead). float16 computes in fp16 except RMSNorm statistics and RoPE
    angles (see `_Fp16Selector`); float32 computes in fp32. States are fp16 either way; inputs
    and outputs keep their dtypes (float outputs are float32)."""
    ct = import_coremltools()
    register_converters()
    precision = (
        ct.precision.FLOAT32
        if dtype == "float32"
        else ct.transform.FP16ComputePrecision(op_selector=_Fp16Selector())
    )
    # coremltools' fp16 pipeline casts runtime int32 gather indices, gather_nd data and topk
    # indices to int16/uint16 (an ANE nicety): token ids past 32767 then wrap (SmolLM2's vocab
    # is 49152) and top-k over W*V past 65535 cannot be indexed. Keep integers 32-bit.
    pipeline = ct.PassPipeline.DEFAULT
    pipeline.remove_passes(["common::add_int16_cast"])
    try:
        with quiet():
            return ct.convert(
                program,
                convert_to=convert_to,
                pass_pipeline=pipeline,
                minimum_deployment_target=getattr(ct.target, DEPLOYMENT_TARGET),
                compute_precision=precision,
                outputs=[
                    ct.TensorType(name=n, dtype=np.int32 if n == BEAMS else np.float32)
                    for n in outputs
                ],
                skip_model_load=True,
            )
    except Exception as e:  # coremltools raises many types; name the cause
        raise CoreMLExportError(f"Core ML conversion failed: {type(e).__name__}: {e}") from e


class _Fp16Selector:
    """Which ops FP16ComputePrecision may cast to fp16 (True) and which stay fp32 (False),
    mirroring the fp32 islands of the torch model (llama.py):

    * RMSNorm's statistics (`pow → reduce_mean → add eps → rsqrt → mul`): the residual stream
      of real models exceeds 256, and 256² overflows fp16 (SmolLM2-135M: inf at layer 3, logits
      off by 30 without this);
    * the RoPE angles `position * inv_freq` and their cos/sin: fp16 positions lose integers past
      2048 and an fp16 angle near 1000 is off by up to 0.25 rad.

    Ops are visited in program order, so each op's producers have been classified already."""

    def __init__(self) -> None:
        self.fp32: dict[str, str] = {}  # op name -> why: "rope" | "norm"

    def __call__(self, op: Any) -> bool:
        inputs = []
        for value in op.inputs.values():
            inputs += list(value) if isinstance(value, (list, tuple)) else [value]
        producers = [v.op for v in inputs if v.op is not None]
        kinds = {self.fp32.get(p.name) for p in producers}
        t = op.op_type
        if any(v.name == "position_ids" for v in inputs) or "rope" in kinds:
            if t not in ("cos", "sin"):  # stop at cos/sin: their consumers run in fp16
                self.fp32[op.name] = "rope"
            return False
        norm_chain = {p.op_type for p in producers if self.fp32.get(p.name) == "norm"}
        if (
            t in ("pow", "rsqrt")
            or (t in ("reduce_mean", "add") and norm_chain & {"pow", "reduce_mean"})
            or (t == "mul" and "rsqrt" in norm_chain)
        ):
            self.fp32[op.name] = "norm"
            return False
        return True


# Weights with fewer elements stay float (norms); every matrix of a real model is larger.
WEIGHT_THRESHOLD = 512


def quantize_weights(model: Any, q: Quantization) -> Any:
    """Block-wise int4/int8 weights for an iOS18 ML Program, by coremltools' own linear
    quantizer (`constexpr_blockwise_shift_scale` ops that Core ML dequantizes on load or
    on the fly); blocks of `q.block_size` along each weight's input axis."""
    ct = import_coremltools()
    config = ct.optimize.coreml.OptimizationConfig(
        global_config=ct.optimize.coreml.OpLinearQuantizerConfig(
            mode="linear_symmetric" if q.symmetric else "linear",
            dtype=q.weights,
            granularity="per_block",
            block_size=q.block_size,
            weight_threshold=WEIGHT_THRESHOLD,
        )
    )
    try:
        with quiet():
            return ct.optimize.coreml.linear_quantize_weights(model, config)
    except Exception as e:  # coremltools raises many types; name the cause
        raise CoreMLExportError(
            f"Core ML weight quantization failed: {type(e).__name__}: {e}"
        ) from e


def export_coreml(
    base: Transformer,
    drafter: Drafter | None,
    root: Path,
    *,
    beam: BeamShape,
    dtype: str = "float16",
    capacity: int | None = None,
    progress: Any = lambda message: None,
    quantization: Quantization | None = None,
) -> CoreMLRecord:
    """Write the bundle's coreml/base.mlpackage (and drafter.mlpackage) under `root` and return
    the manifest's Core ML record: deployment target, capacity, N_max, commit length, dtypes,
    files, times."""
    ct = import_coremltools()
    if dtype not in ("float16", "float32"):
        raise CoreMLExportError(f"Core ML dtype {dtype!r} must be float16 or float32")
    S = min(capacity or DEFAULT_CAPACITY, base.config.context_length)
    if S <= beam.width * beam.length:
        raise CoreMLExportError(
            f"Core ML cache capacity {S} is too small for beam {beam.width}x{beam.length}; "
            f"use at least {beam.width * beam.length + 1}"
        )
    (root / COREML_DIR).mkdir(parents=True, exist_ok=True)
    split = dtype == "float32"
    graphs = [
        (
            "base",
            lambda: export_program_base(base, capacity=S, beam=beam, split=split),
            BASE_OUTPUTS,
        )
    ]
    if drafter is not None:
        graphs.append(
            ("drafter", lambda: export_program_drafter(drafter, base, beam), DRAFTER_OUTPUTS)
        )
    files, seconds = {}, {}
    for name, make_program, outputs in graphs:
        start = time.perf_counter()
        model = convert(make_program(), dtype=dtype, outputs=outputs)
        if quantization is not None:
            model = quantize_weights(model, quantization)
        files[name] = coreml_package(name)
        path = root / files[name]
        with quiet():
            model.save(str(path))
        seconds[name] = round(time.perf_counter() - start, 2)
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        progress(f"exported {files[name]} ({size / 1e6:.1f} MB) in {seconds[name]} s")
    return CoreMLRecord(
        deployment_target=DEPLOYMENT_TARGET,
        coremltools=ct.__version__,
        batch=1,
        capacity=S,
        max_tokens=base_max_tokens(beam, S),
        commit_length=beam.length,
        compute_precision=dtype,
        state_dtype="float16",
        state_split=split,  # two fp16 states (hi, lo) per cache: fp32 precision
        files=files,
        seconds=seconds,
    )
