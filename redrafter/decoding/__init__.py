"""Runtime-agnostic decoding: numpy only (no torch, onnxruntime or coremltools imports), so the
same driver serves every runtime."""
