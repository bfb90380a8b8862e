"""`redrafter export`: checkpoints -> a bundle (docs/design.md §5), written atomically, with
export-time parity. It runs the exporters and then runtimes on what they wrote, so it sits
above both `redrafter.export` and `redrafter.runtimes`."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path

import onnx

from redrafter.bundle import (
    Bundle,
    DrafterGraph,
    Manifest,
    OnnxRecord,
    OpRecord,
    Quantization,
    Source,
    atomic_directory,
    load_bundle,
    write_manifest,
)
from redrafter.bundle.names import (
    BASE_ONNX,
    IR_VERSION,
    ONNX_DIR,
    OP_DOMAIN,
    OP_VERSION,
    OPSET,
    TARGETS,
    TOKENIZER_DIR,
    TREE_ATTENTION,
    WEIGHTS_DATA,
    drafter_graph_file,
)
from redrafter.bundle.store import OutputPathError, check_replaceable
from redrafter.config import BeamShape
from redrafter.decoding.tree import Packing
from redrafter.errors import ConfigError
from redrafter.export.coreml import export_coreml
from redrafter.export.onnx import SharedWeights, export_base, export_drafter
from redrafter.export.quantize import quantize_graph
from redrafter.models.checkpoints import checkpoint_gguf_blocks, load_pair
from redrafter.models.tokenizer import find_tokenizer, save_tokenizer
from redrafter.validate.tensors import coreml_export_parity, onnx_export_parity


@dataclasses.dataclass(frozen=True)
class ExportOptions:
    """What to export: targets, weight dtype, the drafter graphs' beam shapes, packing, and
    weight-only quantization."""

    targets: tuple[str, ...] = ("onnx",)
    dtype: str = "float32"
    beam: BeamShape = BeamShape()
    packing: Packing = "dedup"
    extra_beams: tuple[BeamShape, ...] = ()  # more drafter graphs, e.g. for a benchmark grid
    coreml_dtype: str = "float16"  # Core ML compute precision (its KV states are fp16 always)
    quantization: Quantization | None = None  # weight-only int4/int8 (export/quantize.py)

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
        q = self.quantization
        if q is not None and q.method != "rtn" and "coreml" in self.targets:
            raise ConfigError(
                f"quantization method {q.method!r} applies to ONNX graphs; Core ML programs are "
                "quantized by coremltools' linear quantizer (use --quantize-method rtn)"
            )


def _source(path: Path) -> Source:
    """Where the reference checkpoint lives, so `validate` can rebuild the torch reference."""
    path = path.resolve()
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())
    return Source(str(path), sum(p.stat().st_size for p in files))


def check_output_path(out: Path, inputs: list[Path], *, overwrite: bool) -> None:
    """Refuse an `--out` that is, or contains, an input checkpoint (replacing it would delete
    the model being exported), and, for an existing `--out`, anything but a replaceable bundle
    (`check_replaceable`; without `overwrite` an existing path is refused by the writer)."""
    target = out.resolve()
    for path in inputs:
        source = path.resolve()
        if source == target or source.is_relative_to(target):
            raise OutputPathError(
                f"--out {out} is or contains the input checkpoint {path}; choose an --out "
                "outside the checkpoint folders"
            )
    if overwrite and (out.exists() or out.is_symlink()):
        check_replaceable(out)


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
    inputs = [Path(p) for p in (base_path, drafter_path) if p is not None]
    check_output_path(Path(out), inputs, overwrite=overwrite)
    start = time.perf_counter()
    base, drafter = load_pair(base_path, drafter_path)
    tokenizer = find_tokenizer(base_path)
    progress(f"loaded checkpoints in {time.perf_counter() - start:.1f} s")
    timings: dict[str, float] = {}
    q = options.quantization

    blocks = checkpoint_gguf_blocks(base_path) if q is not None and q.method == "gguf" else []

    def quantized(graph: onnx.ModelProto) -> onnx.ModelProto:
        return graph if q is None else quantize_graph(graph, q, blocks=blocks)

    with atomic_directory(Path(out), overwrite=overwrite) as tmp:
        drafters = []
        if "onnx" in options.targets:
            (tmp / ONNX_DIR).mkdir()
            weights = SharedWeights(tmp / WEIGHTS_DATA)
            t = time.perf_counter()
            weights.save(quantized(export_base(base, dtype=options.dtype)), tmp / BASE_ONNX)
            timings["base_onnx_seconds"] = round(time.perf_counter() - t, 2)
            progress(f"exported {BASE_ONNX} in {timings['base_onnx_seconds']} s")
            if drafter is not None:
                t = time.perf_counter()
                for beam in options.beams:
                    graph = DrafterGraph(beam, drafter_graph_file(beam))
                    exported = export_drafter(drafter, base, beam, dtype=options.dtype)
                    weights.save(quantized(exported), tmp / graph.file)
                    drafters.append(graph)
                    progress(f"exported {graph.file}")
                timings["drafter_onnx_seconds"] = round(time.perf_counter() - t, 2)
        coreml = None
        if "coreml" in options.targets:
            coreml = export_coreml(
                base,
                drafter,
                tmp,
                beam=options.beam,
                dtype=options.coreml_dtype,
                progress=progress,
                quantization=q,
            )
        if tokenizer is not None:
            save_tokenizer(tokenizer, tmp / TOKENIZER_DIR)
        manifest = Manifest(
            base_config=base.config,
            base_source=_source(Path(base_path)),
            drafter_config=None if drafter is None else drafter.config,
            drafter_source=None if drafter_path is None else _source(Path(drafter_path)),
            beam=options.beam,
            drafters=tuple(drafters),
            packing=options.packing,
            dtype=options.dtype,
            targets=options.targets,
            onnx=OnnxRecord(OPSET, IR_VERSION) if "onnx" in options.targets else None,
            coreml=coreml,
            custom_op=OpRecord(OP_DOMAIN, TREE_ATTENTION, OP_VERSION),
            files={},
            quantization=q,
            export_seconds=timings,
        )
        manifest = write_manifest(tmp, manifest)
        # Export-time parity: the bundle against the torch modules it came from.
        parity = None
        if "onnx" in options.targets:
            parity = onnx_export_parity(load_bundle(tmp), base, drafter)
        if coreml is not None:  # the converted programs, through the MIL evaluator
            coreml = dataclasses.replace(
                coreml, parity=coreml_export_parity(load_bundle(tmp), base, drafter)
            )
            parity = parity or coreml.parity
        write_manifest(tmp, dataclasses.replace(manifest, coreml=coreml, parity=parity))
        progress(f"export-time parity: {parity.to_dict() if parity else None}")
    return load_bundle(out)
