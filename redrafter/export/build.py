"""`redrafter export`: checkpoints -> a bundle (DESIGN.md §5), written atomically."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from redrafter.config import BeamShape
from redrafter.decoding.tree import Packing
from redrafter.errors import ConfigError, TokenizerError
from redrafter.export.bundle import Bundle, atomic_directory, load_bundle, write_manifest

TARGETS = ("onnx", "coreml")


@dataclasses.dataclass(frozen=True)
class ExportOptions:
    """What to export: targets, weight dtype, the drafter graph's static beam shape, packing."""

    targets: tuple[str, ...] = ("onnx",)
    dtype: str = "float32"
    beam: BeamShape = BeamShape()
    packing: Packing = "dedup"
    extra_beams: tuple[BeamShape, ...] = ()  # more drafter graphs, e.g. for a benchmark grid
    coreml_dtype: str = "float16"  # Core ML compute precision (its KV states are fp16 always)

    @property
    def beams(self) -> tuple[BeamShape, ...]:
        """Every beam shape to export a drafter graph for; the first is the default."""
        return tuple(dict.fromkeys((self.beam, *self.extra_beams)))

    def __post_init__(self) -> None:
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown or not self.targets:
            raise ConfigError(
                f"export target(s) {unknown or '(none)'} not supported; "
                f"supported: {', '.join(TARGETS)}"
            )
        if self.dtype not in ("float32", "float16"):
            raise ConfigError(f"dtype {self.dtype!r} must be float32 or float16")
        if self.coreml_dtype not in ("float32", "float16"):
            raise ConfigError(f"coreml_dtype {self.coreml_dtype!r} must be float32 or float16")
        if self.packing not in ("dedup", "full"):
            raise ConfigError(f"packing {self.packing!r} must be dedup or full")


def _source_record(path: Path) -> dict[str, Any]:
    """Where the reference checkpoint lives, so `validate` can rebuild the torch reference."""
    path = path.resolve()
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())
    return {"path": str(path), "bytes": sum(p.stat().st_size for p in files)}


def export_bundle(
    base_path: str | Path,
    out: str | Path,
    *,
    drafter_path: str | Path | None = None,
    options: ExportOptions = ExportOptions(),
    overwrite: bool = False,
    progress: Callable[[str], None] = lambda message: None,
) -> Bundle:
    """Load the checkpoints, export every target graph, copy the tokenizer, check export-time
    parity on random inputs, checksum everything, and rename the bundle into place."""
    from redrafter.export.onnx import SharedWeights, drafter_graph_name, export_base, export_drafter
    from redrafter.models.checkpoints import check_drafter_fits, load_base, load_drafter
    from redrafter.models.tokenizer import load_tokenizer, save_tokenizer

    start = time.perf_counter()
    base = load_base(base_path)
    drafter = None
    if drafter_path is not None:
        drafter = load_drafter(drafter_path)
        check_drafter_fits(base.config, drafter.config)
    try:
        tokenizer = load_tokenizer(base_path)
    except TokenizerError:
        tokenizer = None
    progress(f"loaded checkpoints in {time.perf_counter() - start:.1f} s")
    timings: dict[str, float] = {}
    with atomic_directory(Path(out), overwrite=overwrite) as tmp:
        drafters = []
        if "onnx" in options.targets:
            (tmp / "onnx").mkdir()
            weights = SharedWeights(tmp / "onnx" / "weights.data")
            t = time.perf_counter()
            weights.save(export_base(base, dtype=options.dtype), tmp / "onnx" / "base.onnx")
            timings["base_onnx_seconds"] = round(time.perf_counter() - t, 2)
            progress(f"exported onnx/base.onnx in {timings['base_onnx_seconds']} s")
            if drafter is not None:
                t = time.perf_counter()
                for beam in options.beams:
                    name = drafter_graph_name(beam)
                    graph = export_drafter(drafter, base, beam, dtype=options.dtype)
                    weights.save(graph, tmp / "onnx" / name)
                    drafters.append(
                        {"width": beam.width, "length": beam.length, "file": f"onnx/{name}"}
                    )
                    progress(f"exported onnx/{name}")
                timings["drafter_onnx_seconds"] = round(time.perf_counter() - t, 2)
        coreml = None
        if "coreml" in options.targets:
            from redrafter.export.coreml import export_coreml

            coreml = export_coreml(
                base,
                drafter,
                tmp / "coreml",
                beam=options.beam,
                dtype=options.coreml_dtype,
                progress=progress,
            )
        if tokenizer is not None:
            save_tokenizer(tokenizer, tmp / "tokenizer")
        from redrafter.export import tree_attention as ta

        fields: dict[str, Any] = {
            "base": {"config": base.config.to_dict(), "source": _source_record(Path(base_path))},
            "drafter": None
            if drafter is None
            else {"config": drafter.config.to_dict(), "source": _source_record(Path(drafter_path))},
            "beam": {"width": options.beam.width, "length": options.beam.length},
            "drafters": drafters,
            "packing": options.packing,
            "dtype": options.dtype,
            "targets": list(options.targets),
            "onnx": {"opset": 18, "ir_version": 10} if "onnx" in options.targets else None,
            "coreml": coreml,
            "custom_op": {"domain": ta.DOMAIN, "name": ta.OP_NAME, "version": ta.OP_VERSION},
            "export_seconds": timings,
        }
        write_manifest(tmp, fields)
        # Export-time parity: the bundle against the torch modules it came from.
        from redrafter.validate.tensors import check_tensor_parity

        if "onnx" in options.targets:
            fields["parity"] = check_tensor_parity(load_bundle(tmp), base, drafter).summary()
        if coreml is not None:  # the converted programs, through the MIL evaluator
            from redrafter.export.coreml import export_time_parity

            coreml["parity"] = export_time_parity(load_bundle(tmp), base, drafter)
            fields.setdefault("parity", coreml["parity"])
        write_manifest(tmp, fields)
        progress(f"export-time parity: {fields['parity']}")
    return load_bundle(out)
