"""`coreml-mil`: run a bundle's Core ML programs on any OS by evaluating their MIL operations in
numpy. It checks the *converted program* (what `ct.convert` produced and the .mlpackage holds,
states included), not Apple's runtime, its GPU kernels or the Neural Engine.

How: the saved .mlpackage's ML Program is read back into coremltools' Python MIL (`milproto`),
then its operations run in program order, each through its own `value_inference()` (the numpy
semantics coremltools uses for constant folding), with numpy fallbacks for the few ops that
have none or that infer from static shapes. `read_state` / `coreml_update_state` read and write
a dict of fp16 arrays, one dict per batch row. Each result is cast to the dtype the program
declares, so an fp16 program rounds where Core ML would store fp16 (matmuls accumulate in fp32,
as GPUs and the Neural Engine do). Slow (tens of ms per op-heavy call): for parity, not speed.

Dimensions: see runtimes/coreml.py.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from redrafter.bundle import Bundle
from redrafter.coremltools_support import import_coremltools, quiet
from redrafter.errors import RuntimeUnavailableError
from redrafter.runtimes.coreml import CoreMLProgramRuntime


class _Value:
    """Stands in for a MIL Var's symbolic value so `value_inference()` sees concrete inputs."""

    __slots__ = ("val",)

    def __init__(self, val: Any) -> None:
        self.val = val


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _sdpa(op: Any, x: dict[str, Any]) -> np.ndarray:
    """iOS18 scaled_dot_product_attention: softmax(q·kᵀ/√D + mask)·v, computed in fp32."""
    q, k, v = (x[n].astype(np.float32) for n in ("query", "key", "value"))
    scores = q @ np.swapaxes(k, -1, -2) / np.float32(np.sqrt(q.shape[-1]))  # (..., N, S)
    mask = x.get("attn_mask")
    if mask is not None:
        scores = np.where(mask, scores, -np.inf) if mask.dtype == bool else scores + mask
    scores = scores - scores.max(axis=-1, keepdims=True)
    weights = np.exp(scores)
    weights /= weights.sum(axis=-1, keepdims=True)
    return weights @ v


def _linear(op: Any, x: dict[str, Any]) -> np.ndarray:
    out = x["x"].astype(np.float32) @ x["weight"].T  # weight: float32 (see MilProgram.wide)
    return out + x["bias"].astype(np.float32) if x.get("bias") is not None else out


def _matmul(op: Any, x: dict[str, Any]) -> np.ndarray:
    a, b = x["x"].astype(np.float32), x["y"].astype(np.float32)
    if x.get("transpose_x") is not None and bool(x["transpose_x"]):
        a = np.swapaxes(a, -1, -2)
    if x.get("transpose_y") is not None and bool(x["transpose_y"]):
        b = np.swapaxes(b, -1, -2)
    return a @ b


def _reduce(op: Any, x: dict[str, Any]) -> np.ndarray:
    """reduce_*: numpy 2.4 rejects the numpy bool coremltools passes as `keepdims`."""
    axes = tuple(int(a) for a in x["axes"]) if x.get("axes") is not None else None
    return op.get_operator()(x["x"], axis=axes, keepdims=bool(x["keep_dims"]))


def _gather_nd(op: Any, x: dict[str, Any]) -> np.ndarray:
    """gather_nd: indices (..., K) pick along the first K dims after `batch_dims` leading ones."""
    data, indices = x["x"], x["indices"].astype(np.int64)
    batch_dims = int(x["batch_dims"]) if x.get("batch_dims") is not None else 0
    if batch_dims == 0:
        return data[tuple(np.moveaxis(indices, -1, 0))]
    batch = int(np.prod(data.shape[:batch_dims]))
    flat_data = data.reshape(batch, *data.shape[batch_dims:])
    flat_idx = indices.reshape(batch, *indices.shape[batch_dims:])
    out = np.stack([flat_data[i][tuple(np.moveaxis(flat_idx[i], -1, 0))] for i in range(batch)])
    return out.reshape(*indices.shape[:batch_dims], *out.shape[1:])


def _topk(op: Any, x: dict[str, Any]) -> Any:
    """topk with a defined tie-break, the lower index first (numpy's default sort is not
    stable; fp16 scores tie often). Our torch and numpy references break ties the same way;
    what Core ML's kernels do on a tie is not documented."""
    data, axis, k = x["x"], int(x["axis"]), int(x["k"])
    ascending = x.get("ascending") is not None and bool(x["ascending"])
    order = np.argsort(data if ascending else -data, axis=axis, kind="stable")
    indices = np.take(order, np.arange(k), axis=axis)
    values = np.take_along_axis(data, indices, axis=axis)
    return (values, indices.astype(np.int32)) if len(op.outputs) == 2 else values


# Ops whose value_inference is missing, reads static (symbolic) shapes, or is slow in fp16.
FALLBACKS: dict[str, Callable[[Any, dict[str, Any]], Any]] = {
    "shape": lambda op, x: np.array(x["x"].shape, dtype=np.int32),
    "silu": lambda op, x: x["x"] * _sigmoid(x["x"]),
    "sigmoid": lambda op, x: _sigmoid(x["x"]),
    "linear": _linear,
    "matmul": _matmul,
    "scaled_dot_product_attention": _sdpa,
    "gather_nd": _gather_nd,
    "topk": _topk,
    # Quantized weights (export --quantize): the dequantized constant, as Core ML computes it.
    "constexpr_blockwise_shift_scale": lambda op, x: op.materialized_val_inference(),
    **{f"reduce_{k}": _reduce for k in ("mean", "sum", "max", "min", "prod", "l2_norm")},
}


class MilProgram:
    """One function of a MIL program, evaluated op by op in numpy."""

    def __init__(self, program: Any, function: str = "main") -> None:
        from coremltools.converters.mil.mil import types

        self._types = types
        self.function = program.functions[function]
        self.inputs = dict(self.function.inputs)  # name -> Var (states included)
        self.state_names = [n for n, v in self.inputs.items() if types.is_state(v.sym_type)]
        self.outputs = [v.name for v in self.function.outputs]
        self.ops = list(self.function.operations)
        self.consts = {
            op.outputs[0].name: op.outputs[0].val for op in self.ops if op.op_type == "const"
        }
        # Linear weights widened to fp32 once: numpy's fp16 matmul is slow, and widening on
        # every call would dominate (results are cast back to the program's dtype after).
        weights = {op.inputs["weight"].name for op in self.ops if op.op_type == "linear"}
        self.wide = {n: v.astype(np.float32) for n, v in self.consts.items() if n in weights}
        # Vars with symbolic dims (the ranged N): value_inference often reads `x.shape`, so
        # while a call runs they get their concrete shape, restored afterwards.
        from coremltools.converters.mil.mil.types.symbolic import any_symbolic

        variables = [*self.inputs.values(), *(v for op in self.ops for v in op.outputs)]
        self.symbolic = {
            v.name for v in variables if types.is_tensor(v.sym_type) and any_symbolic(v.shape)
        }

    @classmethod
    def from_package(cls, path: Path) -> MilProgram:
        """Read a saved .mlpackage back into MIL (no Apple runtime needed)."""
        ct = import_coremltools()
        from coremltools.converters.mil.frontend.milproto.load import load

        with quiet():
            model = ct.models.MLModel(str(path), skip_model_load=True)
            spec = model.get_spec()
            program = load(spec, spec.specificationVersion, file_weights_dir=model.weights_dir)
        return cls(program)

    def state_shapes(self) -> dict[str, tuple[int, ...]]:
        return {
            n: tuple(self.inputs[n].sym_type.wrapped_type().get_shape()) for n in self.state_names
        }

    def input_dtype(self, name: str) -> np.dtype:
        return np.dtype(self._types.nptype_from_builtin(self.inputs[name].dtype))

    def new_state(self) -> dict[str, np.ndarray]:
        """Zeroed fp16 states, as `MLModel.make_state()` gives on macOS."""
        return {n: np.zeros(s, np.float16) for n, s in self.state_shapes().items()}

    def run(
        self, feeds: dict[str, np.ndarray], state: dict[str, np.ndarray] | None = None
    ) -> dict[str, np.ndarray]:
        """Evaluate with `feeds` (cast to the declared input dtypes); `state` is read and
        updated in place. Returns the function's outputs by name."""
        env: dict[str, Any] = dict(self.consts)
        for name in self.inputs:
            if name in self.state_names:
                if state is None or name not in state:
                    raise RuntimeUnavailableError(f"MIL program needs state {name!r}")
                continue
            env[name] = np.asarray(feeds[name]).astype(self.input_dtype(name))
        touched: list[tuple[Any, Any]] = []  # (var, its declared type) to restore
        # An fp16 program overflows where Core ML would too (LOG_0 + LOG_0 = -inf): no warnings.
        try:
            with np.errstate(all="ignore"):
                for op in self.ops:
                    if op.op_type == "const":
                        continue
                    values = self._evaluate(op, env, state, touched)
                    for var, value in zip(op.outputs, values, strict=True):
                        env[var.name] = value
                        self._bind(var, value, touched)
        finally:
            for var, declared in touched:  # the program is reused: leave no values behind
                var._sym_val, var._sym_type = None, declared
        return {name: env[name] for name in self.outputs}

    def _bind(self, var: Any, value: Any, touched: list) -> None:
        """Give `var` a concrete value (and shape) for its consumers' value_inference."""
        touched.append((var, var._sym_type))
        var._sym_val = _Value(value)
        if var.name in self.symbolic:
            var._sym_type = self._types.tensor(var.dtype, value.shape)

    def _evaluate(
        self, op: Any, env: dict[str, Any], state: dict[str, np.ndarray] | None, touched: list
    ) -> list[Any]:
        t = op.op_type
        if t == "read_state":
            assert state is not None
            return [state[op.inputs["input"].name]]
        if t == "coreml_update_state":
            assert state is not None
            value = env[op.inputs["value"].name].astype(np.float16)
            state[op.inputs["state"].name] = value
            return [value]
        raw: dict[str, Any] = {}
        for key, var in op.inputs.items():
            if isinstance(var, (list, tuple)):
                raw[key] = [env[v.name] for v in var]
                for v in var:
                    self._hold(v, env, touched)
            else:
                raw[key] = self.wide[var.name] if var.name in self.wide else env[var.name]
                self._hold(var, env, touched)
        if t in FALLBACKS:
            result: Any = FALLBACKS[t](op, raw)
        else:
            try:
                result = op.value_inference()
            except NotImplementedError:
                raise RuntimeUnavailableError(
                    f"the MIL evaluator has no implementation of op {t!r}; add one to "
                    "redrafter/runtimes/coreml_mil.py FALLBACKS"
                ) from None
        if result is None:  # value_inference declined (an input it could not read)
            raise RuntimeUnavailableError(
                f"the MIL evaluator could not evaluate op {op.name!r} ({t}); add a fallback to "
                "redrafter/runtimes/coreml_mil.py FALLBACKS"
            )
        results = list(result) if len(op.outputs) > 1 else [result]
        return [self._as_declared(var, r) for var, r in zip(op.outputs, results, strict=True)]

    def _hold(self, var: Any, env: dict[str, Any], touched: list) -> None:
        """Make a program input visible to value_inference (op outputs and consts are)."""
        if var.name in self.inputs and var._sym_val is None:
            self._bind(var, env[var.name], touched)

    def _as_declared(self, var: Any, value: Any) -> Any:
        """Cast to the var's declared dtype (fp16 programs round here) and check static dims."""
        types = self._types
        if types.is_tensor(var.sym_type) or types.is_scalar(var.sym_type):
            value = np.asarray(value).astype(types.nptype_from_builtin(var.dtype))
            shape = var.shape
            if value.ndim != len(shape) or any(
                isinstance(d, (int, np.integer)) and d != s
                for d, s in zip(shape, value.shape, strict=False)
            ):
                raise AssertionError(
                    f"MIL op {var.op.name} ({var.op.op_type}) gave shape {value.shape}, "
                    f"program declares {shape}"
                )
        return value


class CoreMLMilRuntime(CoreMLProgramRuntime):
    """A bundle's Core ML programs evaluated in numpy (see the module docstring): checks the
    converted program on Linux, not Apple's runtime or the Neural Engine."""

    name = "coreml-mil"
    implementation = "MIL evaluator"
    device = "cpu (numpy)"

    def __init__(self, bundle: Bundle | str | Path) -> None:
        super().__init__(bundle)
        self.base = MilProgram.from_package(self.package("base"))
        self.drafter = (
            MilProgram.from_package(self.package("drafter"))
            if self.has_package("drafter")
            else None
        )

    def _new_state(self) -> Any:
        return self.base.new_state()

    def _input_dtype(self, model: str, name: str) -> np.dtype:
        program = self.base if model == "base" else self.drafter
        assert program is not None
        return program.input_dtype(name)

    def _predict_base(self, feeds: dict[str, np.ndarray], state: Any) -> dict[str, np.ndarray]:
        return self.base.run(feeds, state)

    def _predict_drafter(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        assert self.drafter is not None
        return self.drafter.run(feeds)
