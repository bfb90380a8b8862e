"""redrafter: ReDrafter speculative decoding for ONNX Runtime and Core ML, one driver."""

from redrafter.config import BaseModelConfig, BeamShape, DrafterConfig, SamplingParams
from redrafter.errors import RedrafterError

__version__ = "0.1.0"

__all__ = [
    "BaseModelConfig",
    "BeamShape",
    "DrafterConfig",
    "RedrafterError",
    "SamplingParams",
    "__version__",
]
