"""Parity: tensors per graph and tokens per generation, against the PyTorch reference."""
