"""redrafter: ReDrafter speculative decoding for ONNX Runtime and Core ML, one driver."""

from redrafter.config import BaseModelConfig, BeamShape, DrafterConfig, SamplingParams
from redrafter.decoding import DecodeOptions, decode
from redrafter.errors import RedrafterError
from redrafter.version import __version__


def load(bundle, *, runtime: str = "onnxruntime", device: str = "cpu", native=None):  # type: ignore[no-untyped-def]
    """Load an exported bundle; see `redrafter.pipeline.load`."""
    from redrafter.pipeline import load as _load

    return _load(bundle, runtime=runtime, device=device, native=native)


def from_checkpoints(base, *, drafter=None, device: str = "cpu", dtype: str = "float32"):  # type: ignore[no-untyped-def]
    """Load checkpoints onto the torch runtime; see `redrafter.pipeline.from_checkpoints`."""
    from redrafter.pipeline import from_checkpoints as _from_checkpoints

    return _from_checkpoints(base, drafter=drafter, device=device, dtype=dtype)


__all__ = [
    "BaseModelConfig",
    "BeamShape",
    "DecodeOptions",
    "DrafterConfig",
    "RedrafterError",
    "SamplingParams",
    "__version__",
    "decode",
    "from_checkpoints",
    "load",
]
