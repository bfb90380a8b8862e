"""Runtimes: each implements `redrafter.decoding.runtime.Runtime` over its own tensors."""
