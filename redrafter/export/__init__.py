"""Export: PyTorch models -> ONNX graphs (and Core ML programs) -> a checksummed bundle."""
