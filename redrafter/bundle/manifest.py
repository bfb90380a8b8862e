"""The manifest, typed: frozen dataclasses read from and written to manifest.json. Readers use
these fields; nobody outside `redrafter.bundle` indexes the raw JSON.

The JSON keeps the field names below (format version 1); `Manifest.from_dict` checks types and
names the field that is wrong, so a hand-edited or foreign manifest fails with one clear line.
"""

from __future__ import annotations

import dataclasses
import posixpath
from typing import Any

from redrafter.bundle.names import FORMAT_VERSION, OP_DOMAIN, OP_VERSIONS, TARGETS
from redrafter.config import BaseModelConfig, BeamShape, DrafterConfig
from redrafter.errors import RedrafterError


class BundleError(RedrafterError):
    """A bundle is missing, incomplete, tampered with, or from an unknown format version."""


def _get(raw: Any, key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if not isinstance(raw, dict) or key not in raw:
        raise BundleError(f"{where}: manifest field {key!r} is missing; re-export the bundle")
    value = raw[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise BundleError(f"{where}: manifest field {key!r} = {value!r} has the wrong type")
    return value


def check_relative_path(rel: str, where: str) -> str:
    """A path inside the bundle: relative, POSIX, normalised, no '..' and no empty parts."""
    if (
        not isinstance(rel, str)
        or not rel
        or rel.startswith("/")
        or "\\" in rel
        or posixpath.normpath(rel) != rel
        or rel.split("/")[0] == ".."
    ):
        raise BundleError(
            f"{where}: manifest path {rel!r} is not a normalised path inside the bundle; "
            "re-export the bundle"
        )
    return rel


@dataclasses.dataclass(frozen=True)
class FileRecord:
    """One checksummed file of the bundle."""

    sha256: str
    bytes: int


@dataclasses.dataclass(frozen=True)
class Source:
    """Where an exported checkpoint came from, so `validate` can rebuild the torch reference."""

    path: str
    bytes: int


@dataclasses.dataclass(frozen=True)
class DrafterGraph:
    """The ONNX drafter graph exported for one static beam shape."""

    beam: BeamShape
    file: str


@dataclasses.dataclass(frozen=True)
class OnnxRecord:
    opset: int
    ir_version: int


@dataclasses.dataclass(frozen=True)
class OpRecord:
    """The custom op the graphs use: `redrafter::TreeAttention` at some version."""

    domain: str
    name: str
    version: int


@dataclasses.dataclass(frozen=True)
class Parity:
    """Export-time tensor parity: passed, and the max-abs error per '<graph>.<output>'."""

    passed: bool
    max_abs: dict[str, float]
    runtime: str | None = None  # the candidate, when not ONNX Runtime (Core ML: coreml-mil)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], where: str) -> Parity:
        passed = _get(raw, "passed", bool, where)
        errors = {k[: -len(".max_abs")]: float(v) for k, v in raw.items() if k.endswith(".max_abs")}
        runtime = raw.get("runtime")
        return cls(passed, errors, None if runtime is None else str(runtime))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {} if self.runtime is None else {"runtime": self.runtime}
        out["passed"] = self.passed
        out.update({f"{k}.max_abs": v for k, v in self.max_abs.items()})
        return out


@dataclasses.dataclass(frozen=True)
class CoreMLRecord:
    """The Core ML programs: batch 1, a stateful base with `capacity` cache slots taking up to
    `max_tokens` tokens per call, committing `commit_length` rows; `files` name -> package."""

    deployment_target: str
    coremltools: str
    batch: int
    capacity: int
    max_tokens: int
    commit_length: int
    compute_precision: str  # float16 | float32 (the KV states are float16 always)
    state_dtype: str
    state_split: bool  # two fp16 states (hi, lo) per cache: fp32 precision
    files: dict[str, str]
    seconds: dict[str, float]
    parity: Parity | None = None

    @classmethod
    def from_dict(cls, raw: dict[str, Any], where: str) -> CoreMLRecord:
        w = f"{where} (coreml)"
        files = _get(raw, "files", dict, w)
        for rel in files.values():
            check_relative_path(rel, w)
        parity = raw.get("parity")
        return cls(
            deployment_target=_get(raw, "deployment_target", str, w),
            coremltools=_get(raw, "coremltools", str, w),
            batch=_get(raw, "batch", int, w),
            capacity=_get(raw, "capacity", int, w),
            max_tokens=_get(raw, "max_tokens", int, w),
            commit_length=_get(raw, "commit_length", int, w),
            compute_precision=_get(raw, "compute_precision", str, w),
            state_dtype=_get(raw, "state_dtype", str, w),
            state_split=_get(raw, "state_split", bool, w),
            files={str(k): str(v) for k, v in files.items()},
            seconds={str(k): float(v) for k, v in _get(raw, "seconds", dict, w).items()},
            parity=None if parity is None else Parity.from_dict(parity, w),
        )

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["parity"] = None if self.parity is None else self.parity.to_dict()
        if self.parity is None:
            del out["parity"]
        return out


@dataclasses.dataclass(frozen=True)
class Quantization:
    """How the graphs' weights were quantized (None in the manifest: float weights)."""

    weights: str  # int4 | int8
    block_size: int
    symmetric: bool
    accuracy_level: int
    # rtn (round to nearest) | hqq (half-quadratic, float zero points) | gguf (the GGUF base's
    # own Q4_0/Q4_1 blocks, the rest rtn)
    method: str = "rtn"

    @classmethod
    def from_dict(cls, raw: dict[str, Any], where: str) -> Quantization:
        w = f"{where} (quantization)"
        return cls(
            weights=_get(raw, "weights", str, w),
            block_size=_get(raw, "block_size", int, w),
            symmetric=_get(raw, "symmetric", bool, w),
            accuracy_level=_get(raw, "accuracy_level", int, w),
            method=_get(raw, "method", str, w) if "method" in raw else "rtn",
        )


@dataclasses.dataclass(frozen=True)
class Manifest:
    """manifest.json: what the bundle holds and how it was made. `files` lists every file of the
    bundle but the manifest itself, each with its sha256 and size."""

    base_config: BaseModelConfig
    base_source: Source | None
    drafter_config: DrafterConfig | None
    drafter_source: Source | None
    beam: BeamShape  # the default beam shape
    drafters: tuple[DrafterGraph, ...]  # ONNX drafter graphs, the default's first
    packing: str  # dedup | full
    dtype: str  # ONNX weights and caches: float32 | float16
    targets: tuple[str, ...]
    onnx: OnnxRecord | None
    coreml: CoreMLRecord | None
    custom_op: OpRecord
    files: dict[str, FileRecord]
    parity: Parity | None = None
    quantization: Quantization | None = None
    export_seconds: dict[str, float] = dataclasses.field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    redrafter_version: str = ""
    exporter: str = ""  # fingerprint of the exporting code (see store.exporter_fingerprint)

    @property
    def total_bytes(self) -> int:
        return sum(f.bytes for f in self.files.values())

    @classmethod
    def from_dict(cls, raw: Any, where: str) -> Manifest:
        """Parse and check the JSON object; every problem is a one-line `BundleError`. Total:
        any JSON value (a list, wrong types, missing or unknown values at any depth) gives a
        `RedrafterError` (a `BundleError`, or the config's own `ConfigError`), never a
        TypeError, KeyError, AttributeError or ValueError."""
        try:
            return cls._parse(raw, where)
        except RedrafterError:
            raise
        except (TypeError, KeyError, AttributeError, ValueError, IndexError, OverflowError) as e:
            raise BundleError(
                f"{where}: malformed manifest ({type(e).__name__}: {e}); re-export the bundle"
            ) from None

    @classmethod
    def _parse(cls, raw: Any, where: str) -> Manifest:
        version = raw.get("format_version") if isinstance(raw, dict) else None
        if version != FORMAT_VERSION:
            raise BundleError(
                f"{where}: bundle format version {version!r} is not supported (this "
                f"redrafter reads version {FORMAT_VERSION}); re-export the bundle"
            )
        op = _get(raw, "custom_op", dict, where)
        if op.get("domain") != OP_DOMAIN or op.get("version") not in OP_VERSIONS:
            raise BundleError(
                f"{where}: unknown custom-op domain {op.get('domain')!r} version "
                f"{op.get('version')!r}; re-export with this redrafter"
            )
        base = _get(raw, "base", dict, where)
        drafter = raw.get("drafter")
        beam = _get(raw, "beam", dict, where)
        drafters = []
        for d in _get(raw, "drafters", list, where):
            file = check_relative_path(_get(d, "file", str, where), where)
            drafters.append(DrafterGraph(_beam(d, where), file))
        targets = tuple(_get(raw, "targets", list, where))
        if not targets or any(t not in TARGETS for t in targets):
            raise BundleError(f"{where}: manifest targets {list(targets)!r} are not known")
        onnx, coreml, quant = raw.get("onnx"), raw.get("coreml"), raw.get("quantization")
        parity = raw.get("parity")
        files = {}
        for rel, meta in _get(raw, "files", dict, where).items():
            files[check_relative_path(rel, where)] = FileRecord(
                _get(meta, "sha256", str, where), _get(meta, "bytes", int, where)
            )
        packing, dtype = _get(raw, "packing", str, where), _get(raw, "dtype", str, where)
        if packing not in ("dedup", "full"):
            raise BundleError(f"{where}: manifest packing {packing!r} is not dedup or full")
        if dtype not in ("float32", "float16"):
            raise BundleError(f"{where}: manifest dtype {dtype!r} is not float32 or float16")
        return cls(
            base_config=BaseModelConfig.from_dict(_get(base, "config", dict, where), where=where),
            base_source=_source(base.get("source"), where),
            drafter_config=None
            if drafter is None
            else DrafterConfig.from_dict(_get(drafter, "config", dict, where), where=where),
            drafter_source=None if drafter is None else _source(drafter.get("source"), where),
            beam=_beam(beam, where),
            drafters=tuple(drafters),
            packing=packing,
            dtype=dtype,
            targets=targets,
            onnx=None
            if onnx is None
            else OnnxRecord(_get(onnx, "opset", int, where), _get(onnx, "ir_version", int, where)),
            coreml=None if coreml is None else CoreMLRecord.from_dict(coreml, where),
            custom_op=OpRecord(op["domain"], str(op.get("name", "")), op["version"]),
            files=files,
            parity=None if parity is None else Parity.from_dict(parity, where),
            quantization=None if quant is None else Quantization.from_dict(quant, where),
            export_seconds={str(k): float(v) for k, v in (raw.get("export_seconds") or {}).items()},
            format_version=version,
            redrafter_version=str(raw.get("redrafter_version", "")),
            exporter=str(raw.get("exporter", "")),
        )

    def to_dict(self) -> dict[str, Any]:
        """The JSON object (field order as written since format version 1)."""

        def model(config: Any, source: Source | None) -> dict[str, Any]:
            out: dict[str, Any] = {"config": config.to_dict()}
            if source is not None:
                out["source"] = dataclasses.asdict(source)
            return out

        return {
            "format_version": self.format_version,
            "redrafter_version": self.redrafter_version,
            "exporter": self.exporter,
            "base": model(self.base_config, self.base_source),
            "drafter": None
            if self.drafter_config is None
            else model(self.drafter_config, self.drafter_source),
            "beam": {"width": self.beam.width, "length": self.beam.length},
            "drafters": [
                {"width": d.beam.width, "length": d.beam.length, "file": d.file}
                for d in self.drafters
            ],
            "packing": self.packing,
            "dtype": self.dtype,
            "targets": list(self.targets),
            "onnx": None if self.onnx is None else dataclasses.asdict(self.onnx),
            "coreml": None if self.coreml is None else self.coreml.to_dict(),
            "custom_op": dataclasses.asdict(self.custom_op),
            "quantization": None
            if self.quantization is None
            else dataclasses.asdict(self.quantization),
            "export_seconds": self.export_seconds,
            "parity": None if self.parity is None else self.parity.to_dict(),
            "files": {k: dataclasses.asdict(v) for k, v in self.files.items()},
        }


def _beam(raw: Any, where: str) -> BeamShape:
    return BeamShape(_get(raw, "width", int, where), _get(raw, "length", int, where))


def _source(raw: Any, where: str) -> Source | None:
    if raw is None:
        return None
    return Source(_get(raw, "path", str, where), _get(raw, "bytes", int, where))
