"""The ONNX Runtime runtime: runs a bundle's base.onnx and drafter.onnx on the CPU or CUDA
execution provider, with preallocated caches bound through IO binding.

Dimensions: Lyr layers, B batch, Hkv KV heads, S cache capacity, D head dim, T/N new tokens,
W beam width, L beam length, E hidden, V vocab, P committed length per row.

Caches live in one stacked buffer (Lyr, 2, B, Hkv, S, D) per slot; each layer's key and value
are bound by address. With the native TreeAttention library the output `present_*` is bound to
the same buffer as the input `past_*`, so the kernel writes N rows in place (docs/design.md §9).
The portable function body cannot write in place safely (ORT does not know the two alias), so
it ping-pongs between two buffers and copies the cache once per call.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from redrafter import ops
from redrafter.bundle import Bundle, load_bundle
from redrafter.bundle import names as n
from redrafter.config import BeamShape, DrafterConfig
from redrafter.decoding.runtime import argmax_tokens, check_rows, drafted_log_probs
from redrafter.errors import ConfigError, RuntimeUnavailableError

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
NP_DTYPES = {"float32": np.float32, "float16": np.float16}
# ONNX Runtime's names of the element types the graphs' host-read outputs have.
ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64}
PREFILL_CHUNK = 128  # prompt tokens per base call: bounds the (B, T, V) logits of a prefill
# redrafter::MatMulInt4 (custom_ops/matmul_int4): the native library's int4 kernel, which takes
# com.microsoft::MatMulNBits' inputs. ORT's own kernel is not batch-invariant at int8 compute and
# expands the blocks to fp32 from two rows on at fp32 compute; ours is neither (matmul_int4.h).
MATMUL_INT4 = "MatMulInt4"
EXTERNAL_DATA_FOLDER = "session.model_external_initializers_file_folder_path"


def with_int4_kernel(path: Path, *, max_outputs: int = 1, max_inputs: int = 6) -> bytes | None:
    """The graph at `path` with every 4-bit `MatMulNBits` the native kernel takes (blocks of a
    multiple of 32, zero points none, packed 4-bit or float32, no act-order `g_idx`) turned into
    `redrafter::MatMulInt4`, serialized with its weights still external; None when it has none.
    The bundle on disk is never changed: the swap is this runtime's choice of kernel.

    `max_outputs` (`ops.matmul_int4_max_outputs()` of the library that will run it): a swapped
    node whose only reader is a `Split` of the last axis into at most that many outputs takes
    the Split's outputs itself (its `split` attribute), and the Split goes. `max_inputs`
    (`ops.matmul_int4_max_inputs()`): from 8, a residual Add after a swapped node and a SwiGLU
    Mul before one fold into it too (`fold_residuals`, `fold_gates`)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    # zero points the kernel takes: packed 4-bit (uint8) or float32 (GGUF Q4_1 blocks, HQQ)
    zero_types = (onnx.TensorProto.UINT8, onnx.TensorProto.FLOAT)
    other_inits = {t.name for t in model.graph.initializer if t.data_type not in zero_types}
    swapped = 0
    for node in model.graph.node:
        if node.op_type != "MatMulNBits" or node.domain != "com.microsoft":
            continue
        attrs = {a.name: a.i for a in node.attribute}
        inputs = list(node.input) + [""] * (6 - len(node.input))
        if (
            attrs.get("bits", 4) != 4
            or attrs.get("block_size", 0) % 32
            or inputs[4]
            or inputs[3] in other_inits
        ):
            continue
        node.domain, node.op_type = n.OP_DOMAIN, MATMUL_INT4
        kept = [a for a in node.attribute if a.name in ("K", "N", "block_size", "bits")]
        del node.attribute[:]
        node.attribute.extend(kept)
        swapped += 1
    if not swapped:
        return None
    if max_outputs > 1:
        fold_splits(model, max_outputs)
    if max_inputs >= 8:
        fold_residuals(model)
        fold_gates(model)
    if not any(o.domain == n.OP_DOMAIN for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(n.OP_DOMAIN, 1))
    return model.SerializeToString()


def _same_shape(graph: Any, a: str, b: str) -> bool:
    """Whether the graph's shape records give tensors `a` and `b` one and the same shape (every
    dimension the same number or the same symbol): an elementwise node over them broadcasts
    nothing. Unrecorded or unknown dimensions count as different."""
    shapes = {
        v.name: v.type.tensor_type.shape for v in (*graph.value_info, *graph.input, *graph.output)
    }
    if a not in shapes or b not in shapes:
        return False
    dims = [[d.dim_param or d.dim_value or None for d in shapes[x].dim] for x in (a, b)]
    return bool(dims[0]) and dims[0] == dims[1] and None not in dims[0]


@dataclasses.dataclass(frozen=True)
class _GraphIndex:
    """Who reads and who makes each tensor of a graph, its initializers and its outputs, taken
    once before a fold pass changes the graph (a pass reads them for nodes it has not touched)."""

    readers: dict[str, list[Any]]
    made_by: dict[str, Any]
    inits: set[str]
    outputs: set[str]

    @classmethod
    def of(cls, graph: Any) -> _GraphIndex:
        readers: dict[str, list[Any]] = {}
        for node in graph.node:
            for name in node.input:
                readers.setdefault(name, []).append(node)
        return cls(
            readers,
            {o: node for node in graph.node for o in node.output},
            {t.name for t in graph.initializer},
            {o.name for o in graph.output},
        )


def _elementwise(node: Any, op_type: str) -> bool:
    return node.op_type == op_type and node.domain in ("", "ai.onnx") and len(node.input) == 2


def fold_splits(model: Any, max_outputs: int) -> None:
    """Give each `redrafter::MatMulInt4` read only by a `Split` of its last axis (sizes from a
    constant; a fused projection's q/k/v or gate/up, `export.quantize.fuse_sibling_matmuls`)
    the Split's outputs and a `split` attribute, and drop the Split, in place. The kernel writes
    the same columns to the same outputs: the split is copies, never arithmetic."""
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    index = _GraphIndex.of(graph)
    inits = {t.name: t for t in graph.initializer}
    dropped = []
    for node in graph.node:
        if node.op_type != MATMUL_INT4 or node.domain != n.OP_DOMAIN:
            continue
        y = node.output[0]
        users = index.readers.get(y, [])
        if len(users) != 1 or y in index.outputs:
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


def fold_residuals(model: Any) -> None:
    """Hand each residual `Add(stream, y)` whose `y` is a one-output `redrafter::MatMulInt4`'s,
    read by that Add alone, to the MatMulInt4 (its input 6, `residual`), and drop the Add, in
    place: the kernel adds the stream to its product with the same one rounding. Only an Add
    whose inputs have the same recorded shape folds (no broadcast), and only one reading no
    initializer (a bias stays a bias)."""
    graph = model.graph
    index = _GraphIndex.of(graph)
    dropped = []
    for add in graph.node:
        if not _elementwise(add, "Add") or any(i in index.inits for i in add.input):
            continue
        for side in (0, 1):
            y, stream = add.input[side], add.input[1 - side]
            mm = index.made_by.get(y)
            if (
                mm is None
                or mm.op_type != MATMUL_INT4
                or mm.domain != n.OP_DOMAIN
                or len(mm.output) != 1
                or any(a.name == "split" for a in mm.attribute)
                or len(mm.input) > 6
                or index.readers.get(y) != [add]
                or y in index.outputs
                or not _same_shape(graph, y, stream)
            ):
                continue
            mm.input.extend([""] * (6 - len(mm.input)) + [stream])
            del mm.output[:]
            mm.output.extend(add.output)
            dropped.append(add)
            break
    for add in dropped:
        graph.node.remove(add)


def fold_gates(model: Any) -> None:
    """Hand each `Mul(a, b)` read only by a `redrafter::MatMulInt4` as its A (a SwiGLU's
    act(gate) * up before the down projection) to that MatMulInt4 (A = a, input 7 `gate` = b),
    and drop the Mul, in place: the kernel forms the product with the same one rounding. Only a
    Mul of two same-shaped activations (no initializer, no broadcast) folds."""
    graph = model.graph
    index = _GraphIndex.of(graph)
    dropped = []
    for mm in graph.node:
        if mm.op_type != MATMUL_INT4 or mm.domain != n.OP_DOMAIN or len(mm.input) > 7:
            continue
        mul = index.made_by.get(mm.input[0])
        if (
            mul is None
            or not _elementwise(mul, "Mul")
            or any(i in index.inits for i in mul.input)
            or index.readers.get(mul.output[0]) != [mm]
            or mul.output[0] in index.outputs
            or not _same_shape(graph, mul.input[0], mul.input[1])
            or not _same_shape(graph, mul.input[0], mul.output[0])
        ):
            continue
        mm.input[0] = mul.input[0]
        mm.input.extend([""] * (7 - len(mm.input)) + [mul.input[1]])
        dropped.append(mul)
    for mul in dropped:
        graph.node.remove(mul)


def check_windows(bundle: Bundle) -> None:
    """Refuse a bundle whose base graph does not give each layer the sliding window its config
    has (exported before the window was part of TreeAttention): such a graph attends past the
    window, silently wrong once a sequence outgrows it."""
    config = bundle.base_config
    want = [config.layer_window(i) for i in range(config.num_hidden_layers)]
    if not any(want):
        return
    import onnx

    model = onnx.load(str(bundle.path(n.BASE_ONNX)), load_external_data=False)
    got = [
        next((a.i for a in node.attribute if a.name == "window"), 0)
        for node in model.graph.node
        if node.op_type == n.TREE_ATTENTION and node.domain == n.OP_DOMAIN
    ]
    if got != want:
        raise RuntimeUnavailableError(
            f"{bundle.root}: its attention graph ignores this model's sliding window (exported "
            "before windows were part of TreeAttention); re-export the bundle with `redrafter "
            "export`"
        )


# A drafter whose beam step takes fewer multiply-adds than this runs on one intra-op thread on
# the CPU. Its pool never spins (see OnnxRuntime), so every op worth splitting wakes a sleeping
# thread, which cost more than the split saved: with SmolLM2-135M's drafter (2.5 M per step,
# ~130 small ops per W1 L5 draft) the draft phase took 1.03 ms a step on one thread against
# 1.20 ms on two, int4, 2 cores (benchmarks/results/drafter_threads.json). A large model's
# drafter keeps every thread.
ONE_THREAD_DRAFT_MACS = 8_000_000


def drafter_threads(
    threads: int | None, config: DrafterConfig | None, width: int, device: str
) -> int | None:
    """Intra-op threads for a drafter session of beam `width`: 1 for a small drafter on the
    CPU (ONE_THREAD_DRAFT_MACS), else `threads` (None: ONNX Runtime's default)."""
    if config is None or device != "cpu":
        return threads
    head = config.draft_vocab_size or config.vocab_size
    H = config.hidden_size
    # The RNN's two projections, the exit layers' (input twice as wide), the head.
    per_beam = H * H * (2 + 2 * config.num_draft_layers) + config.exit_dim * head
    return 1 if width * per_beam < ONE_THREAD_DRAFT_MACS else threads


def session_options(threads: int | None, library: Path | None, *, spin: bool) -> ort.SessionOptions:
    """Session options: `threads` intra-op threads, the native op library, thread spinning."""
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    if library is not None:
        options.register_custom_ops_library(str(library))
    if not spin:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


class OnnxRuntime:
    """Runs a bundle with ONNX Runtime. `implementation` says which TreeAttention ran:
    'native' (the C++/CUDA library) or 'portable' (the ONNX function body).

    `threads`: intra-op threads per session (None: ONNX Runtime's default, one per physical
    core). `draft_threads`: the drafter sessions' (None: `drafter_threads`, one thread for a
    small drafter on the CPU, else `threads`). `device='cuda'` raises `RuntimeUnavailableError`
    when the CUDA execution provider does not become active, unless `allow_fallback` (then it
    runs on the CPU with a warning).

    `int4_kernel`: run a float32 int4 bundle's MatMulNBits nodes with the native library's
    `redrafter::MatMulInt4` on the CPU (None: whenever the library is loaded; False: ONNX
    Runtime's own kernel). `self.int4` says which ran: 'redrafter', 'onnxruntime' or None.
    `fold_int4`: let that kernel take in the Splits, residual Adds and SwiGLU Muls around it, as
    far as the library can (`with_int4_kernel`; the same bits either way); False keeps them as
    nodes (the baseline of `benchmarks.bundle_ab --baseline-unfolded`).

    `device_commit`: move accepted cache rows with a commit graph run by ONNX Runtime where the
    caches live (`commit_graph`) instead of numpy on the host (None: on CUDA only, where the
    host cannot reach the caches; True on the CPU runs the very graphs CUDA runs, for tests)."""

    name = "onnxruntime"

    def __init__(
        self,
        bundle: Bundle | str | Path,
        *,
        device: str = "cpu",
        native: bool | None = None,
        threads: int | None = None,
        allow_fallback: bool = False,
        int4_kernel: bool | None = None,
        device_commit: bool | None = None,
        draft_threads: int | None = None,
        fold_int4: bool = True,
    ) -> None:
        for name, value in (("threads", threads), ("draft_threads", draft_threads)):
            if value is not None and (isinstance(value, bool) or value < 1):
                raise ConfigError(f"{name} {value!r} must be an integer >= 1 (e.g. --threads 1)")
        self.threads = threads
        self.bundle = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
        if device not in PROVIDERS:
            raise RuntimeUnavailableError(f"device {device!r} must be 'cpu' or 'cuda'")
        if not self.bundle.has(n.BASE_ONNX):
            raise RuntimeUnavailableError(
                f"{self.bundle.root} has no ONNX graphs; export with --target onnx"
            )
        config = self.bundle.base_config
        self.vocab_size = config.vocab_size
        self.context_length = config.context_length
        self.max_beam_length: int | None = None  # commit moves any number of rows
        self.num_layers = config.num_hidden_layers
        self.cache_shape = (config.kv_heads, config.dim_per_head)
        self.dtype = NP_DTYPES[self.bundle.dtype]
        library = ops.library_path() if native is not False else None
        if native and library is None:
            raise RuntimeUnavailableError(
                "the native TreeAttention library is not built; run `make ops` "
                "(or drop --native to use the portable ONNX body)"
            )
        self.implementation = "native" if library is not None else "portable"
        check_windows(self.bundle)
        # The drafter's intra-op threads must not spin after a run: ORT gives each session its
        # own pool, and spinning drafter threads would keep the cores from the verification
        # that follows (on 2 cores that doubled verify time: benchmarks/RESULTS.md).
        options = session_options(threads, library, spin=True)
        self._draft_threads, self._library = draft_threads, library  # for the drafter sessions
        providers = (
            [PROVIDERS[device], "CPUExecutionProvider"] if device == "cuda" else [PROVIDERS["cpu"]]
        )
        if int4_kernel and (library is None or device != "cpu" or self.bundle.dtype != "float32"):
            raise RuntimeUnavailableError(
                "the native int4 kernel runs float32 bundles on the CPU with the native library "
                "built (`make ops`); drop --int4-kernel to use ONNX Runtime's MatMulNBits"
            )
        self._int4 = int4_kernel is not False and library is not None and device == "cpu"
        self._int4 = self._int4 and self.bundle.dtype == "float32"
        # How many outputs (its Split folding) and inputs (residual, gate) this library's
        # MatMulInt4 takes, asked once.
        fold = self._int4 and fold_int4
        self._int4_outputs = ops.matmul_int4_max_outputs(library) if fold else 1
        self._int4_inputs = ops.matmul_int4_max_inputs(library) if fold else 6
        self.int4: str | None = None
        self.base = self._session(self.bundle.path(n.BASE_ONNX), options, providers)
        self._providers = providers
        self._drafters: dict[BeamShape, ort.InferenceSession] = {}  # opened on first use
        active = self.base.get_providers()[0]
        self.device = "cuda" if active == PROVIDERS["cuda"] else "cpu"
        if device == "cuda" and self.device != "cuda":
            # ORT falls back silently when CUDA libraries are missing: an error unless allowed.
            if not allow_fallback:
                raise RuntimeUnavailableError(
                    f"device 'cuda' requested but ONNX Runtime runs on {active} (available: "
                    f"{', '.join(ort.get_available_providers())}); install onnxruntime-gpu "
                    "with its CUDA libraries, use --device cpu, or pass --allow-cpu-fallback"
                )
            print(
                f"warning: CUDA requested but ONNX Runtime is running on {active} "
                f"(available: {', '.join(ort.get_available_providers())})",
                file=sys.stderr,
            )
        self.ort_device = "cuda" if self.device == "cuda" else "cpu"
        # Graphs exported before next_tokens / draft_log_probs existed: argmax / gather on host.
        self._next_tokens = n.NEXT_TOKENS in {o.name for o in self.base.get_outputs()}
        # (dtype, trailing dims) of the outputs read on the host, which _run_base binds to
        # numpy arrays of its own: get_outputs() would wrap every bound output, the 2 x layers
        # caches too (~0.1 ms a call on this CPU, 1 % of an int4 verify).
        self._host_outputs = {
            o.name: (ORT_TYPES[o.type], tuple(o.shape[2:]))
            for o in self.base.get_outputs()
            if o.name in (n.NEXT_TOKENS, n.LOGITS, n.HIDDEN_STATES)
        }
        if any(not isinstance(d, int) for _, dims in self._host_outputs.values() for d in dims):
            raise RuntimeUnavailableError(
                f"{self.bundle.root}: the base graph's logits/hidden_states have symbolic "
                "vocabulary or hidden sizes (not an export of this redrafter); re-export the "
                "bundle with `redrafter export`"
            )
        self._commit: ort.InferenceSession | None = None
        if device_commit if device_commit is not None else self.device == "cuda":
            graph = commit_graph(self.implementation, self.bundle.dtype)
            self._commit = ort.InferenceSession(graph, options, providers=providers)
        self._past = n.cache_names(self.num_layers, n.PAST)
        self._present = n.cache_names(self.num_layers, n.PRESENT)
        self.buffers: list[ort.OrtValue] = []  # one or two stacked caches
        self.arrays: list[np.ndarray] = []  # their numpy views, on the CPU
        self.live = 0  # which buffer holds the committed cache
        # One IO binding per live buffer and first output (logits or next_tokens), its 2 x layers
        # cache bindings made once: binding them from Python costs ~1.8 ms per call (8 % of a
        # SmolLM2-135M step on 2 cores).
        self._bindings: dict[tuple[int, str, int], tuple[ort.IOBinding, int]] = {}

    @property
    def beams(self) -> frozenset[BeamShape]:
        """The beam shapes this bundle has drafter graphs for (empty without a drafter)."""
        return frozenset(self.bundle.drafter_graphs)

    # -- caches -----------------------------------------------------------------------------
    def reset(self, *, batch: int, capacity: int) -> None:
        shape = (self.num_layers, 2, batch, *self.cache_shape[:1], capacity, self.cache_shape[1])
        if self.buffers and tuple(self.buffers[0].shape()) == shape:
            return  # reuse: stale slots past P are masked, never read
        count = 1 if self.implementation == "native" else 2
        if self.device == "cpu":
            # OrtValues wrap the numpy memory (no copy), so commit can move rows with numpy.
            self.arrays = [np.zeros(shape, self.dtype) for _ in range(count)]
            self.buffers = [ort.OrtValue.ortvalue_from_numpy(a) for a in self.arrays]
        else:
            self.arrays = []
            self.buffers = [
                ort.OrtValue.ortvalue_from_shape_and_type(shape, self.dtype, "cuda", 0)
                for _ in range(count)
            ]
        self.live = 0
        self._bindings = {}  # new buffers: bind them afresh

    def _layer_address(self, buffer: ort.OrtValue, index: int) -> int:
        """Address of layer index//2's key (even) or value (odd) inside a stacked buffer."""
        shape = buffer.shape()
        per = int(np.prod(shape[2:])) * np.dtype(self.dtype).itemsize
        return buffer.data_ptr() + index * per

    def _bind_caches(self, io: ort.IOBinding, row: int | None = None, rows: int = 0) -> int:
        """Bind every layer's past_* to the live buffer and present_* to the output buffer;
        with `row`, only that row of the batch (B = 1 in the graph: a row of one layer's
        (B, Hkv, S, D) cache is contiguous); with `rows`, rows [0, rows) (a continuous batch's
        span, contiguous too). Returns the output buffer's index."""
        src = self.buffers[self.live]
        dst_index = self.live if len(self.buffers) == 1 else 1 - self.live
        dst = self.buffers[dst_index]
        shape = list(src.shape()[2:])  # (B, Hkv, S, D)
        offset = 0
        if row is not None:
            offset = row * int(np.prod(shape[1:])) * np.dtype(self.dtype).itemsize
            shape[0] = 1
        elif rows:
            shape[0] = rows
        elem = self.dtype
        for i, (past, present) in enumerate(zip(self._past, self._present, strict=True)):
            at = self._layer_address(src, i) + offset
            io.bind_input(past, self.ort_device, 0, elem, shape, at)
            at = self._layer_address(dst, i) + offset
            io.bind_output(present, self.ort_device, 0, elem, shape, at)
        return dst_index

    # -- the four calls -----------------------------------------------------------------------
    def _run_base(
        self,
        tokens: np.ndarray,
        positions: np.ndarray,
        mask: np.ndarray,
        past_len: np.ndarray,
        *,
        greedy: bool = False,
        row: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """One base call: logits (B, T, V), or with `greedy` each token's argmax (B, T), and the
        hidden states (B, T, E), on the host. With `greedy` the logits stay where ORT made them
        (unbound: never copied off a GPU) and only next_tokens comes back. With `row`, the call
        (B = 1) runs on that row of the caches alone."""
        first = n.NEXT_TOKENS if greedy and self._next_tokens else n.LOGITS
        if row is not None:  # one row of the batch: a binding of its own (prefill is rare)
            io = self.base.io_binding()
            new_live = self._bind_caches(io, row)
        else:
            B = len(tokens)  # rows [0, B) of the batch (a continuous batch's span: runtime.py)
            if (self.live, first, B) not in self._bindings:
                io = self.base.io_binding()
                self._bindings[self.live, first, B] = io, self._bind_caches(io, rows=B)
            io, new_live = self._bindings[self.live, first, B]
        # Rebound on every call, to fresh host arrays of this call's shape that ORT writes into.
        scores = self._bind_host_output(io, first, tokens.shape)  # (B, T) or (B, T, V)
        hidden = self._bind_host_output(io, n.HIDDEN_STATES, tokens.shape)  # (B, T, E)
        io.bind_cpu_input(n.INPUT_IDS, np.ascontiguousarray(tokens, dtype=np.int64))
        io.bind_cpu_input(n.POSITION_IDS, np.ascontiguousarray(positions, dtype=np.int64))
        io.bind_cpu_input(n.TREE_MASK, np.ascontiguousarray(mask, dtype=bool))
        io.bind_cpu_input(n.PAST_LEN, np.ascontiguousarray(past_len, dtype=np.int64))
        self.base.run_with_iobinding(io)
        if row is None:
            self.live = new_live
        elif new_live != self.live:  # portable body: bring the row back to the live buffer
            self.arrays[self.live][:, :, row] = self.arrays[new_live][:, :, row]
        if greedy and first == n.LOGITS:
            scores = argmax_tokens(scores)
        return scores, hidden

    def _bind_host_output(self, io: ort.IOBinding, name: str, lead: tuple[int, ...]) -> np.ndarray:
        """A new host array (*lead, *the output's trailing dims) bound as output `name`: ORT
        writes the result there (copied off the device when the graph runs on one)."""
        dtype, trailing = self._host_outputs[name]
        out = np.empty((*lead, *trailing), dtype=dtype)
        io.bind_output(name, "cpu", 0, dtype, list(out.shape), out.ctypes.data)
        return out

    def prefill(self, tokens: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self._prefill(tokens, lengths)

    def prefill_rows(
        self, rows: np.ndarray, tokens: np.ndarray, lengths: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        if not self.buffers:
            raise ConfigError("call reset() before prefill_rows()")
        check_rows(rows, batch=self.buffers[0].shape()[2], prompts=len(tokens))
        if len(self.buffers) == 2 and self.device != "cpu":
            raise RuntimeUnavailableError(
                "prefilling one row of a running batch on CUDA needs the native op library "
                "(the portable body writes a second buffer): build it with `make ops`"
            )
        out = [
            self._prefill(tokens[r : r + 1], lengths[r : r + 1], row=int(b))
            for r, b in enumerate(rows)
        ]
        return np.concatenate([o[0] for o in out]), np.concatenate([o[1] for o in out])

    def _prefill(
        self, tokens: np.ndarray, lengths: np.ndarray, row: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Prompts (B, T) in 128-token chunks into the caches at [0, T) (with `row`: B = 1,
        into that row alone): logits (B, V) and hidden (B, E) at each row's last token."""
        B, T = tokens.shape
        logits = np.zeros((B, self.vocab_size), np.float32)
        hidden: np.ndarray | None = None
        for start in range(0, T, PREFILL_CHUNK):
            chunk = tokens[:, start : start + PREFILL_CHUNK]  # (B, C)
            C = chunk.shape[1]
            causal = np.broadcast_to(np.tril(np.ones((C, C), bool)), (B, C, C))
            out_logits, out_hidden = self._run_base(
                chunk,
                np.arange(start, start + C)[None].repeat(B, 0),
                causal,
                np.full(B, start, np.int64),
                row=row,
            )
            if hidden is None:
                hidden = np.zeros((B, out_hidden.shape[-1]), np.float32)
            last = lengths - 1 - start  # (B,) each row's last prompt token, if in this chunk
            here = (last >= 0) & (last < C)
            logits[here] = out_logits[here, last[here]]
            hidden[here] = out_hidden[here, last[here]]
        assert hidden is not None
        return logits, hidden

    def draft(
        self, context: np.ndarray, first_token: np.ndarray, beam: BeamShape
    ) -> tuple[np.ndarray, np.ndarray]:
        beams, log_probs = self._run_drafter(beam, context, first_token, n.LOG_PROBS)
        return beams, log_probs  # (B, W, L), (B, W, L-1, V)

    def draft_tokens(
        self, context: np.ndarray, first_token: np.ndarray, beam: BeamShape
    ) -> tuple[np.ndarray, np.ndarray]:
        session = self._drafter_session(beam)
        if n.DRAFT_LOG_PROBS in {o.name for o in session.get_outputs()}:
            return self._run_drafter(beam, context, first_token, n.DRAFT_LOG_PROBS)
        beams, log_probs = self._run_drafter(beam, context, first_token, n.LOG_PROBS)
        return beams, drafted_log_probs(beams, log_probs)  # (B, W, L), (B, W, L-1)

    def _run_drafter(
        self, beam: BeamShape, context: np.ndarray, first_token: np.ndarray, scores: str
    ) -> tuple[np.ndarray, np.ndarray]:
        """Beams and one log-prob output (`scores`) of the drafter graph; only those two leave
        the device the graph runs on."""
        beams, log_probs = self._drafter_session(beam).run(
            [n.BEAMS, scores],
            {n.CONTEXT: context.astype(np.float32), n.FIRST_TOKEN: first_token.astype(np.int64)},
        )
        return beams, log_probs

    def _drafter_session(self, beam: BeamShape) -> ort.InferenceSession:
        graphs = self.bundle.drafter_graphs
        if not graphs:
            raise RuntimeUnavailableError(
                f"{self.bundle.root} has no drafter graph; export with --drafter "
                "(or decode with --autoregressive)"
            )
        if beam not in graphs:
            shapes = ", ".join(f"{b.width}x{b.length}" for b in graphs)
            raise RuntimeUnavailableError(
                f"this bundle has drafter graphs for beam width x length {shapes}, not "
                f"{beam.width}x{beam.length}; re-export with --beam-width/--beam-length"
            )
        if beam not in self._drafters:
            threads = self._draft_threads or drafter_threads(
                self.threads, self.bundle.drafter_config, beam.width, self.device
            )
            options = session_options(threads, self._library, spin=False)
            self._drafters[beam] = self._session(
                self.bundle.path(graphs[beam]), options, self._providers
            )
        return self._drafters[beam]

    def _session(
        self, path: Path, options: ort.SessionOptions, providers: list[str]
    ) -> ort.InferenceSession:
        """A session for one graph of the bundle, with the native int4 kernel swapped in when
        this runtime uses it and the graph has 4-bit MatMulNBits nodes."""
        graph = (
            with_int4_kernel(path, max_outputs=self._int4_outputs, max_inputs=self._int4_inputs)
            if self._int4
            else None
        )
        if graph is None:
            if self.int4 is None and self.bundle.precision == "int4":
                self.int4 = "onnxruntime"
            return ort.InferenceSession(str(path), options, providers=providers)
        self.int4 = "redrafter"
        # The serialized graph keeps its weights external: tell ORT where they lie.
        options.add_session_config_entry(EXTERNAL_DATA_FOLDER, str(path.parent))
        return ort.InferenceSession(graph, options, providers=providers)

    def verify(
        self, tokens: np.ndarray, positions: np.ndarray, tree_mask: np.ndarray, past_len: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        return self._run_base(tokens, positions, tree_mask, past_len)

    def verify_greedy(
        self, tokens: np.ndarray, positions: np.ndarray, tree_mask: np.ndarray, past_len: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        return self._run_base(tokens, positions, tree_mask, past_len, greedy=True)

    def commit(self, past_len: np.ndarray, source: np.ndarray, count: np.ndarray) -> None:
        if self._commit is not None:
            self._commit_on_device(past_len, source, count)
            return
        cache = self.arrays[self.live]  # (Lyr, 2, B, Hkv, S, D), the memory ORT reads
        for b in range(len(past_len)):
            P, c = int(past_len[b]), int(count[b])
            if c == 0 or np.array_equal(source[b, :c], np.arange(c)):
                continue  # the accepted path already sits at [P, P+c)
            row = cache[:, :, b]  # (Lyr, 2, Hkv, S, D) view; a scalar b next to the fancy
            # index below would move the gathered axis to the front (numpy's rule)
            row[:, :, :, P : P + c] = row[:, :, :, P + source[b, :c]]

    def _commit_on_device(
        self, past_len: np.ndarray, source: np.ndarray, count: np.ndarray
    ) -> None:
        """Run the commit graph on the caches where they live: in place through the native
        KVCommit op (one buffer), or from the live buffer into the other one (portable)."""
        assert self._commit is not None
        B, K = source.shape
        moved = count > 0
        if not any(
            moved[b] and not np.array_equal(source[b, : count[b]], np.arange(count[b]))
            for b in range(B)
        ):
            return  # every accepted path already sits where it belongs
        src = self.buffers[self.live]
        dst_index = self.live if len(self.buffers) == 1 else 1 - self.live
        shape = [src.shape()[0] * 2, *src.shape()[2:]]  # (Lyr*2, B, Hkv, S, D)
        io = self._commit.io_binding()
        io.bind_input(COMMIT_CACHE, self.ort_device, 0, self.dtype, shape, src.data_ptr())
        dst = self.buffers[dst_index]
        io.bind_output(COMMIT_OUT, self.ort_device, 0, self.dtype, shape, dst.data_ptr())
        past = np.ascontiguousarray(past_len, dtype=np.int64)
        if self.implementation == "native":  # KVCommit(cache, past_len, source, count)
            io.bind_cpu_input(COMMIT_PAST_LEN, past)
            io.bind_cpu_input(COMMIT_SOURCE, np.ascontiguousarray(source, dtype=np.int64))
            io.bind_cpu_input(COMMIT_COUNT, np.ascontiguousarray(count, dtype=np.int64))
        else:  # absolute slots: row b's slot P+k takes slot P+source[b, k] for k < count[b]
            k = np.arange(K)[None]  # (1, K)
            to = past[:, None] + k  # (B, K)
            frm = np.where(k < count[:, None], past[:, None] + source, to)  # (B, K) rest stay
            io.bind_cpu_input(COMMIT_FROM_SLOTS, np.ascontiguousarray(frm, dtype=np.int64))
            io.bind_cpu_input(COMMIT_TO_SLOTS, np.ascontiguousarray(to, dtype=np.int64))
        self._commit.run_with_iobinding(io)
        self.live = dst_index


# The commit graph's names (an in-memory graph of this runtime, not part of the bundle).
COMMIT_CACHE, COMMIT_OUT = "cache", "cache_out"
COMMIT_PAST_LEN, COMMIT_SOURCE, COMMIT_COUNT = "past_len", "source", "count"
COMMIT_FROM_SLOTS, COMMIT_TO_SLOTS = "from_slots", "to_slots"


def commit_graph(implementation: str, dtype: str) -> bytes:
    """The graph that moves accepted cache rows on the device, over a stacked cache
    (Z, B, Hkv, S, D) with Z = layers x 2 (docs/design.md §6):

    - 'native': one `redrafter::KVCommit` node (cache, past_len, source, count), bound in place;
    - 'portable': standard ops only, for ONNX Runtime without the native library: gather the
      rows at `from_slots` (B, K) along S and scatter them to `to_slots` (B, K), writing a new
      cache (the runtime's second buffer). Unmoved slots pass `from == to`."""
    from onnx import TensorProto as T
    from onnx import helper as h

    elem = T.FLOAT if dtype == "float32" else T.FLOAT16
    cache_dims = ["Z", "B", "H", "S", "D"]
    cache = h.make_tensor_value_info(COMMIT_CACHE, elem, cache_dims)
    out = h.make_tensor_value_info(COMMIT_OUT, elem, cache_dims)
    if implementation == "native":
        inputs = [cache] + [
            h.make_tensor_value_info(name, T.INT64, dims)
            for name, dims in (
                (COMMIT_PAST_LEN, ["B"]),
                (COMMIT_SOURCE, ["B", "K"]),
                (COMMIT_COUNT, ["B"]),
            )
        ]
        nodes = [
            h.make_node(
                n.KV_COMMIT,
                [COMMIT_CACHE, COMMIT_PAST_LEN, COMMIT_SOURCE, COMMIT_COUNT],
                [COMMIT_OUT],
                domain=n.OP_DOMAIN,
            )
        ]
        opsets = [h.make_opsetid("", n.OPSET), h.make_opsetid(n.OP_DOMAIN, 1)]
    else:
        inputs = [cache] + [
            h.make_tensor_value_info(name, T.INT64, ["B", "K"])
            for name in (COMMIT_FROM_SLOTS, COMMIT_TO_SLOTS)
        ]
        nodes = [
            h.make_node("Shape", [COMMIT_CACHE], ["shape"]),  # (5,) Z, B, H, S, D
            h.make_node("Shape", [COMMIT_FROM_SLOTS], ["k_shape"]),  # (2,) B, K
            h.make_node("Constant", [], ["k_axis"], value=h.make_tensor("", T.INT64, [1], [1])),
            h.make_node("Gather", ["k_shape", "k_axis"], ["k"]),  # (1,) K
            h.make_node("Constant", [], ["zbh"], value=h.make_tensor("", T.INT64, [3], [0, 1, 2])),
            h.make_node("Gather", ["shape", "zbh"], ["zbh_dims"]),  # (3,) Z, B, H
            h.make_node("Constant", [], ["d"], value=h.make_tensor("", T.INT64, [1], [4])),
            h.make_node("Gather", ["shape", "d"], ["d_dim"]),  # (1,) D
            h.make_node("Concat", ["zbh_dims", "k", "d_dim"], ["rows_shape"], axis=0),
            h.make_node("Constant", [], ["unsq"], value=h.make_tensor("", T.INT64, [3], [0, 2, 4])),
            # (B, K) -> (1, B, 1, K, 1) -> (Z, B, H, K, D): the slot index per moved element
            h.make_node("Unsqueeze", [COMMIT_FROM_SLOTS, "unsq"], ["from_5d"]),
            h.make_node("Unsqueeze", [COMMIT_TO_SLOTS, "unsq"], ["to_5d"]),
            h.make_node("Expand", ["from_5d", "rows_shape"], ["from_idx"]),
            h.make_node("Expand", ["to_5d", "rows_shape"], ["to_idx"]),
            h.make_node("GatherElements", [COMMIT_CACHE, "from_idx"], ["rows"], axis=3),
            h.make_node("ScatterElements", [COMMIT_CACHE, "to_idx", "rows"], [COMMIT_OUT], axis=3),
        ]
        opsets = [h.make_opsetid("", n.OPSET)]
    graph = h.make_graph(nodes, "kv_commit", inputs, [out])
    model = h.make_model(graph, opset_imports=opsets)
    model.ir_version = n.IR_VERSION
    return model.SerializeToString()
