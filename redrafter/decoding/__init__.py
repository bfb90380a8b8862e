"""Runtime-agnostic decoding: numpy only (no torch, onnxruntime or coremltools imports), so the
same driver serves every runtime. `decode(runtime, prompts, options)` is the entry point."""

from redrafter.decoding.driver import decode
from redrafter.decoding.options import AUTOREGRESSIVE, DecodeOptions

__all__ = ["AUTOREGRESSIVE", "DecodeOptions", "decode"]
