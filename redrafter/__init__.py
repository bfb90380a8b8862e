"""redrafter: ReDrafter speculative decoding for ONNX Runtime and Core ML, one driver."""

from redrafter.config import BaseModelConfig, BeamShape, DrafterConfig, SamplingParams
from redrafter.errors import RedrafterError
from redrafter.version import __version__


def load(bundle, *, runtime: str = "onnxruntime", device: str = "cpu", native=None):  # type: ignore[no-untyped-def]
    """Load an exported bundle; see `redrafter.pipeline.load`."""
    from redrafter.pipeline import load as _load

    return _load(bundle, runtime=runtime, device=device, native=native)


__all__ = [
    "BaseModelConfig",
    "BeamShape",
    "DrafterConfig",
    "RedrafterError",
    "SamplingParams",
    "__version__",
    "load",
]
