"""Shared fixtures: tiny random models built in-process (no network), and the session's
exported bundles of one tiny checkpoint (ONNX; Core ML float32), each exported once and shared by
test_onnx_bundle.py, test_coreml.py and the runtime conformance suite (test_conformance.py)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from redrafter.config import BaseModelConfig, BeamShape, DrafterConfig
from redrafter.decoding.output import Step
from redrafter.decoding.runtime import drafted_log_probs
from redrafter.models.drafter import Drafter
from redrafter.models.llama import Transformer

# The bundles' model: three layers and 1 KV head for 4 query heads (GQA repeat 4), so no two
# cache dimensions are equal and a transposed index fails; drafted as beams of 3 x 4.
BUNDLE_SHAPE: dict[str, Any] = dict(
    num_hidden_layers=3, num_key_value_heads=1, num_attention_heads=4
)
BUNDLE_BEAM = BeamShape(3, 4)


def tiny_base_config(**overrides) -> BaseModelConfig:
    fields = dict(
        model_type="llama",
        vocab_size=61,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
    )
    fields.update(overrides)
    return BaseModelConfig(**fields)


def tiny_base(seed: int = 0, **overrides) -> Transformer:
    """A random base model whose logits are peaked enough that greedy decoding has structure."""
    torch.manual_seed(seed)
    model = Transformer(tiny_base_config(**overrides)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.3)
    return model


def tiny_drafter(
    base: Transformer, seed: int = 1, exit_dim: int | None = None, layers: int = 1
) -> Drafter:
    torch.manual_seed(seed)
    c = base.config
    cfg = DrafterConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        exit_dim=exit_dim or 2 * c.hidden_size,
        num_draft_layers=layers,
    )
    drafter = Drafter(cfg).eval()
    with torch.no_grad():
        for p in drafter.parameters():
            p.normal_(0, 0.3)
    return drafter


def flat_tiny_pair() -> tuple[Transformer, Drafter]:
    """A 6-token base made flatter (many drafts right, many wrong) and its drafter, for the
    exactness tests of sampling and penalties: all short outcomes show up in a few thousand
    samples."""
    base = tiny_base(seed=5, vocab_size=6)
    with torch.no_grad():
        for p in base.parameters():
            p.mul_(0.5)
    return base, tiny_drafter(base, seed=6)


@pytest.fixture
def base() -> Transformer:
    return tiny_base()


@pytest.fixture
def drafter(base: Transformer) -> Drafter:
    return tiny_drafter(base)


WORDS = [f"w{i}" for i in range(59)]  # ids 2..60 in the tiny tokenizer below


def write_hf_checkpoint(model: Transformer, folder, *, tokenizer: bool = True):
    """Save `model` as a Hugging Face folder: config.json, model.safetensors and (optionally)
    a word-level tokenizer.json whose vocab fits the tiny vocab."""
    import json
    from pathlib import Path

    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models, pre_tokenizers

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = {k: v for k, v in model.config.to_dict().items() if v is not None}
    (folder / "config.json").write_text(json.dumps(config))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"))
    if tokenizer:
        vocab = {"[UNK]": 0, "[PAD]": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
        tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        tok.save(str(folder / "tokenizer.json"))
    return folder


class OracleDrafts:
    """Wraps a runtime so its drafts come from the known greedy continuation: beam w follows it
    for a random number of tokens, then goes wrong. Exercises long accepts, non-zero beams and
    real cache moves, which random drafters rarely reach."""

    def __init__(self, inner, prompts, truth, seed: int = 0) -> None:
        self.inner, self.truth = inner, truth
        self.lengths = np.array([len(p) for p in prompts])
        self.rng = np.random.default_rng(seed)
        self.name, self.vocab_size = "oracle", inner.vocab_size
        self.context_length = inner.context_length
        self.max_beam_length = inner.max_beam_length

    def reset(self, *, batch, capacity):
        self.inner.reset(batch=batch, capacity=capacity)

    def prefill(self, tokens, lengths):
        self.past = lengths.copy()
        return self.inner.prefill(tokens, lengths)

    def draft(self, context, first_token, beam):
        _, log_probs = self.inner.draft(context, first_token, beam)
        B, W, L = len(first_token), beam.width, beam.length
        beams = self.rng.integers(0, self.vocab_size, size=(B, W, L))
        beams[:, :, 0] = first_token[:, None]
        for b in range(B):
            done = int(self.past[b] - self.lengths[b])  # tokens committed since the prompt
            future = list(self.truth[b][done + 1 :]) + [0] * L
            for w in range(W):
                good = int(self.rng.integers(0, L))  # drafts that follow the truth
                beams[b, w, 1 : 1 + good] = future[:good]
                if good < L - 1 and beams[b, w, 1 + good] == future[good]:
                    beams[b, w, 1 + good] = (future[good] + 1) % self.vocab_size
        return beams, log_probs

    def draft_tokens(self, context, first_token, beam):
        beams, log_probs = self.draft(context, first_token, beam)
        return beams, drafted_log_probs(beams, log_probs)

    def verify(self, *args):
        return self.inner.verify(*args)

    def verify_greedy(self, *args):
        return self.inner.verify_greedy(*args)

    def commit(self, past_len, source, count):
        self.inner.commit(past_len, source, count)
        self.past = past_len + count


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """One torch thread for a module's tests: the tiny models' matmuls on 2 threads spend their
    time in OpenMP hand-offs (tens of times slower on a busy 2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def collect(steps: Iterable[Step], batch: int) -> list[list[int]]:
    """Each row's emitted tokens, concatenated over the steps of one decode."""
    steps = list(steps)
    return [sum((s.new_tokens[b] for s in steps), []) for b in range(batch)]


# -- the session's bundles: each exported once, shared by every module that runs them -----------
@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(root, base folder, drafter folder): a BUNDLE_SHAPE base (seed 2, with a tokenizer) and a
    drafter (seed 4, exit_dim 48) on disk, as `redrafter export` reads them."""
    from redrafter.models.checkpoints import save_drafter

    root = tmp_path_factory.mktemp("checkpoints")
    base = tiny_base(seed=2, **BUNDLE_SHAPE)
    base_dir = write_hf_checkpoint(base, root / "base")
    save_drafter(tiny_drafter(base, seed=4, exit_dim=48), root / "drafter")
    return root, base_dir, root / "drafter"


@pytest.fixture(scope="session")
def torch_reference(tiny_checkpoints: tuple[Path, Path, Path]):
    """The fp32 torch runtime over the checkpoints, loaded back from disk: the reference that
    every exported runtime's tokens and tensors are held to."""
    from redrafter.models.checkpoints import load_base, load_drafter
    from redrafter.runtimes.torch import TorchRuntime

    _, base_dir, drafter_dir = tiny_checkpoints
    return TorchRuntime(load_base(base_dir), load_drafter(drafter_dir))


@pytest.fixture(scope="session")
def onnx_bundle(tiny_checkpoints: tuple[Path, Path, Path]):
    """An ONNX-only float32 bundle of the checkpoints, beam BUNDLE_BEAM."""
    from redrafter.build import ExportOptions, export_bundle

    root, base_dir, drafter_dir = tiny_checkpoints
    options = ExportOptions(beam=BUNDLE_BEAM)
    return export_bundle(base_dir, root / "onnx-bundle", drafter_path=drafter_dir, options=options)


@pytest.fixture(scope="session")
def coreml_bundle32(tiny_checkpoints: tuple[Path, Path, Path]):
    """A Core ML-only bundle of the checkpoints computing in float32 (each cache as hi + lo fp16
    states), beam BUNDLE_BEAM. Skips without coremltools."""
    pytest.importorskip("coremltools", reason="Core ML export needs coremltools (macOS or Linux)")
    from redrafter.build import ExportOptions, export_bundle

    root, base_dir, drafter_dir = tiny_checkpoints
    options = ExportOptions(targets=("coreml",), beam=BUNDLE_BEAM, coreml_dtype="float32")
    return export_bundle(
        base_dir, root / "coreml-bundle32", drafter_path=drafter_dir, options=options
    )


def tiny_manifest(**changes: Any):  # type: ignore[no-untyped-def]
    """A valid `Manifest` of the tiny base config (ONNX target, no drafter, no files) that
    tests change field by field (`files=...`, `beam=...`) to build bundles by hand."""
    import dataclasses

    from redrafter.bundle import Manifest, OnnxRecord, OpRecord
    from redrafter.bundle import names as n

    manifest = Manifest(
        base_config=tiny_base_config(),
        base_source=None,
        drafter_config=None,
        drafter_source=None,
        beam=BeamShape(),
        drafters=(),
        packing="dedup",
        dtype="float32",
        targets=("onnx",),
        onnx=OnnxRecord(n.OPSET, n.IR_VERSION),
        coreml=None,
        custom_op=OpRecord(n.OP_DOMAIN, n.TREE_ATTENTION, n.OP_VERSION),
        files={},
    )
    return dataclasses.replace(manifest, **changes)
