"""PyTorch reference models and their checkpoint loaders."""
