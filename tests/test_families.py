"""Qwen3 (per-head q/k RMSNorm, a head_dim that is not hidden/heads), Phi-3/3.5 (fused qkv and
gate_up tensors, LongRoPE), Mistral and Qwen2 with a sliding window of 8 (per layer for Qwen2),
and Gemma 2 / Gemma 3 text (scaled embeddings, (1 + w) norms, GeGLU, sliding layers beside
global ones, Gemma 2's soft-capping, Gemma 3's q/k norms and local rotary base; Gemma 3's
image-text model as its language model) against
transformers' own models, end to end: tiny random models that
transformers builds and saves, loaded by `load_base`, must emit the tokens of transformers'
greedy `generate` (autoregressive, speculative, and speculative with whole beams accepted) in
the torch reference, through an exported ONNX bundle on ONNX Runtime (with `validate`) and
through the Core ML program's MIL evaluator. The LongRoPE model switches to its long factors at
position 32, which two of the three prompts cross; its truth is transformers' model decoding
greedily with its cache kept, which is `generate` up to the switch-over (models/llama.py
explains the per-position rule and why `generate` departs after it).
Logits per family and cached-vs-uncached live in test_llama_vs_transformers.py; configs and
loader errors are at the end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3Config,
    Gemma3ForCausalLM,
    Gemma3ForConditionalGeneration,
    Gemma3TextConfig,
    MistralConfig,
    MistralForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    SiglipVisionConfig,
)

from redrafter.config import BaseModelConfig, BeamShape
from redrafter.decoding import AUTOREGRESSIVE, DecodeOptions, decode
from redrafter.errors import CheckpointError, ConfigError, UnsupportedModelError
from redrafter.models.checkpoints import load_base, load_base_config, save_drafter
from redrafter.models.llama import rope_inv_freq
from redrafter.runtimes.torch import TorchRuntime

from conftest import OracleDrafts, collect, tiny_drafter
from test_llama_vs_transformers import PHI3_IDS, SIZES, full_forward, longrope, randomized

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SWITCH = 32  # LongRoPE's original_max_position_embeddings here: prompts + tokens cross it
WINDOW = 8  # sliding window of the windowed families: prompts + tokens run 3-5x past it
# No special token ids (PHI3_IDS) for the families added since: `generate`'s min_new_tokens
# suppresses EOS, which a tiny random model may well rank first.
# Gemma: head_dim 24 and query_pre_attn_scalar 32 (the scale is not 1/sqrt(head_dim)); one
# sliding layer, one global. Gemma 3's global layer rotates with base 1e6 and linear scaling,
# its sliding one with base 1e4; Gemma 2's caps are low enough to bend these models' scores.
GEMMA = dict(**SIZES, **PHI3_IDS, head_dim=24, query_pre_attn_scalar=32, sliding_window=WINDOW)
GEMMA3_ROPE = {
    "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
    "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
}
FAMILIES = {
    "gemma2": lambda: Gemma2ForCausalLM(
        Gemma2Config(**GEMMA, attn_logit_softcapping=2.0, final_logit_softcapping=5.0)
    ),
    "gemma3": lambda: Gemma3ForCausalLM(
        Gemma3TextConfig(
            **GEMMA,
            layer_types=["sliding_attention", "full_attention"],
            rope_parameters=GEMMA3_ROPE,
        )
    ),
    # Gemma 3's image-text model (4B, 12B, 27B): the same language model under other names,
    # beside a vision tower that text decoding leaves out.
    "gemma3-image-text": lambda: Gemma3ForConditionalGeneration(
        Gemma3Config(
            text_config=Gemma3TextConfig(
                **GEMMA,
                layer_types=["sliding_attention", "full_attention"],
                rope_parameters=GEMMA3_ROPE,
            ),
            vision_config=SiglipVisionConfig(
                hidden_size=16,
                intermediate_size=32,
                num_hidden_layers=1,
                num_attention_heads=2,
                image_size=28,
                patch_size=14,
            ),
            mm_tokens_per_image=4,
            boi_token_index=SIZES["vocab_size"] - 3,
            eoi_token_index=SIZES["vocab_size"] - 2,
            image_token_index=SIZES["vocab_size"] - 1,
        )
    ),
    "mistral-window": lambda: MistralForCausalLM(
        MistralConfig(**SIZES, **PHI3_IDS, sliding_window=WINDOW)
    ),
    # max_window_layers=1: layer 0 attends to everything, layer 1 through the window.
    "qwen2-window": lambda: Qwen2ForCausalLM(
        Qwen2Config(
            **SIZES,
            **PHI3_IDS,
            use_sliding_window=True,
            sliding_window=WINDOW,
            max_window_layers=1,
        )
    ),
    "qwen3": lambda: Qwen3ForCausalLM(Qwen3Config(**SIZES, head_dim=24)),
    "phi3": lambda: Phi3ForCausalLM(Phi3Config(**SIZES, **PHI3_IDS)),
    "phi3-longrope": lambda: Phi3ForCausalLM(
        Phi3Config(
            **SIZES,
            **PHI3_IDS,
            original_max_position_embeddings=SWITCH,
            rope_scaling=longrope(SWITCH),
        )
    ),
}
BEAM = BeamShape(3, 4)
_ids = torch.Generator().manual_seed(7)
PROMPTS = [
    torch.randint(0, SIZES["vocab_size"], (n,), generator=_ids).tolist() for n in (6, 21, 13)
]
NEW_TOKENS = 20  # the 21- and 13-token prompts run past SWITCH


def hf_checkpoint(name: str, folder: Path) -> tuple[torch.nn.Module, Path]:
    """A random transformers model of family `name`, saved by `save_pretrained` to `folder`."""
    hf = randomized(FAMILIES[name](), seed=3)
    hf.save_pretrained(folder)
    return hf, folder


def hf_generate(hf: torch.nn.Module, prompt: list[int], new_tokens: int) -> list[int]:
    """transformers' own greedy, cached `generate`: the tokens after the prompt."""
    ids = torch.tensor([prompt])  # (1, T)
    with torch.no_grad():
        out = hf.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
        )  # (1, T + new_tokens)
    return out[0, len(prompt) :].tolist()


def hf_cached_greedy(hf: torch.nn.Module, prompt: list[int], new_tokens: int) -> list[int]:
    """Greedy decoding by transformers' model forward with its cache kept: the prompt in one
    call, then one token per call. This is `generate` except for Phi-3's override that drops
    the cache and recomputes the whole sequence with the long factors once it passes
    original_max_position_embeddings (`Phi3ForCausalLM.prepare_inputs_for_generation`), which
    our fixed-cache runtimes do not do (models/llama.py)."""
    ids = torch.tensor([prompt])  # (1, T)
    out, tokens = [], ids
    with torch.no_grad():
        result = hf(tokens, use_cache=True)
        for _ in range(new_tokens):
            token = result.logits[:, -1].argmax(-1, keepdim=True)  # (1, 1)
            out.append(int(token))
            result = hf(token, cache=result.past_key_values, use_cache=True)
    return out


def assert_same_tokens(got: list[list[int]], want: list[list[int]], what: str) -> None:
    for row, (g, w) in enumerate(zip(got, want, strict=True)):
        first = next((j for j, (a, b) in enumerate(zip(g, w, strict=False)) if a != b), None)
        assert g == w, f"{what}, row {row}: first diverging token at {first}: {g} != {w}"


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    """(name, transformers model, its folder, a drafter folder, the truth: `generate`'s tokens
    for PROMPTS), one checkpoint per family for the module."""
    name = request.param
    root = tmp_path_factory.mktemp(name)
    hf, folder = hf_checkpoint(name, root / "base")
    save_drafter(tiny_drafter(load_base(folder), seed=5), root / "drafter")
    # LongRoPE past its switch-over: transformers' model with its cache kept, not `generate`
    # (hf_cached_greedy; test_phi3_generate_departs_only_past_the_switch shows where).
    greedy = hf_cached_greedy if name == "phi3-longrope" else hf_generate
    truth = [greedy(hf, p, NEW_TOKENS) for p in PROMPTS]
    return name, hf, folder, root / "drafter", truth


def test_torch_reference_decodes_transformers_tokens(family) -> None:
    """Autoregressive, speculative (a random drafter: short accepts) and oracle-drafted
    speculative decoding (whole beams accepted, so trees and commits straddle the LongRoPE
    switch-over) of a ragged batch all emit `generate`'s tokens."""
    name, _, folder, drafter_dir, truth = family
    from redrafter.models.checkpoints import load_drafter

    base = load_base(folder)
    runtime = TorchRuntime(base, load_drafter(drafter_dir))
    ar = collect(decode(runtime, PROMPTS, AUTOREGRESSIVE.replace(max_new_tokens=NEW_TOKENS)), 3)
    assert_same_tokens(ar, truth, f"{name} autoregressive")
    options = DecodeOptions(max_new_tokens=NEW_TOKENS, beam=BEAM)
    spec = collect(decode(runtime, PROMPTS, options), 3)
    assert_same_tokens(spec, truth, f"{name} speculative")
    oracle = OracleDrafts(runtime, PROMPTS, truth, seed=1)
    steps = list(decode(oracle, PROMPTS, options))
    assert_same_tokens(collect(steps, 3), truth, f"{name} oracle-drafted speculative")
    assert len(steps) < NEW_TOKENS * 0.7, "the oracle should get multi-token accepts"


def test_teacher_answers_are_transformers_tokens(family) -> None:
    """Drafter training's teacher (continuous batching over 2 slots, one-token attention with
    each layer's window and soft-cap) answers PROMPTS with `generate`'s tokens: the answers run
    2.5x past the window, so a teacher attending to the whole cache would depart."""
    from redrafter.train.answers import generate_answers

    name, _, folder, _, truth = family
    traces = generate_answers(
        load_base(folder), PROMPTS, max_new_tokens=NEW_TOKENS, eos_token_ids=(), slots=2
    )
    assert_same_tokens([t[1].tolist() for t in traces], truth, f"{name} teacher answers")


def test_longrope_switches_tables_per_position(tmp_path: Path) -> None:
    """Our one uncached pass over 40 tokens equals transformers' cached pass (a prompt of
    SWITCH - 8 tokens, then one token per call, as `generate` runs), position by position; and
    the long table matters exactly from SWITCH on."""
    hf, folder = hf_checkpoint("phi3-longrope", tmp_path / "m")
    ours = load_base(folder)
    assert ours.config.rope_long_from == SWITCH
    assert ours.config.rope_attention_factor == pytest.approx((1 + np.log(4) / np.log(32)) ** 0.5)
    T, T0 = 40, SWITCH - 8
    ids = torch.randint(0, SIZES["vocab_size"], (1, T), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        out = hf(ids[:, :T0], use_cache=True)
        steps, cache = [out.logits], out.past_key_values
        for p in range(T0, T):
            out = hf(ids[:, p : p + 1], cache=cache, use_cache=True)
            steps.append(out.logits)
            cache = out.past_key_values
        expected = torch.cat(steps, dim=1)  # (1, T, V)
        got = full_forward(ours, ids)  # (1, T, V)
        err = (got - expected).abs().amax(dim=-1)[0]  # (T,)
        assert err.max() < 2e-5, f"max |ours - transformers| per position: {err.tolist()}"
        ours.inv_freq_long = ours.inv_freq.clone()  # short factors everywhere
        short = full_forward(ours, ids)
    changed = (short - got).abs().amax(dim=-1)[0] > 1e-3  # (T,)
    assert not changed[:SWITCH].any() and changed[SWITCH:].all()


def test_phi3_generate_departs_only_past_the_switch(tmp_path: Path) -> None:
    """`generate` and the kept-cache greedy loop agree on every token predicted from at most
    SWITCH positions (so both rotate the same way until then); Phi-3's `generate` then
    recomputes the sequence with the long factors, and its later tokens differ here."""
    hf, _ = hf_checkpoint("phi3-longrope", tmp_path / "m")
    for prompt in PROMPTS:
        want, got = hf_generate(hf, prompt, NEW_TOKENS), hf_cached_greedy(hf, prompt, NEW_TOKENS)
        agree = max(0, SWITCH - len(prompt) + 1)  # tokens predicted from <= SWITCH positions
        assert got[:agree] == want[:agree]
        if agree < NEW_TOKENS:
            assert got[agree:] != want[agree:]


# -- exported ------------------------------------------------------------------------------------
def test_onnx_bundle_decodes_transformers_tokens(family, tmp_path: Path) -> None:
    """Export (the export-time parity check included), then ONNX Runtime's greedy speculative
    and oracle-drafted tokens are `generate`'s, and `validate` passes against the reference."""
    from redrafter.build import ExportOptions, export_bundle
    from redrafter.models.checkpoints import load_pair
    from redrafter.runtimes.onnxruntime import OnnxRuntime
    from redrafter.validate.report import validate_bundle

    name, _, folder, drafter_dir, truth = family
    bundle = export_bundle(
        folder, tmp_path / "bundle", drafter_path=drafter_dir, options=ExportOptions(beam=BEAM)
    )
    assert bundle.manifest.parity is not None and bundle.manifest.parity.passed
    assert bundle.base_config == load_base_config(folder)  # the manifest round-trips the config
    runtime = OnnxRuntime(bundle)
    options = DecodeOptions(max_new_tokens=NEW_TOKENS, beam=BEAM)
    assert_same_tokens(collect(decode(runtime, PROMPTS, options), 3), truth, f"{name} on ORT")
    oracle = OracleDrafts(runtime, PROMPTS, truth, seed=2)
    got = collect(decode(oracle, PROMPTS, options), 3)
    assert_same_tokens(got, truth, f"{name} on ORT, oracle-drafted")
    report = validate_bundle(
        bundle,
        candidate=runtime,
        reference=TorchRuntime(*load_pair(folder, drafter_dir)),
        prompts=PROMPTS[1:],
        max_new_tokens=NEW_TOKENS,
    )
    assert report.passed, report.to_dict()
    if name.endswith("-window") or name.startswith("gemma"):  # the body's window and softcap
        portable = OnnxRuntime(bundle, native=False)
        assert portable.implementation == "portable"
        got = collect(decode(portable, PROMPTS, options), 3)
        assert_same_tokens(got, truth, f"{name} on ORT, portable body")
    config = bundle.base_config
    if any(config.layer_window(i) for i in range(config.num_hidden_layers)):
        _old_graphs_are_refused(bundle, tmp_path)


def _old_graphs_are_refused(bundle, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A windowed model's graph without the window attributes (a bundle exported before the
    window was part of TreeAttention) would attend past the window: the runtime refuses it."""
    import types

    import onnx

    from redrafter.errors import RuntimeUnavailableError
    from redrafter.runtimes.onnxruntime import check_windows

    model = onnx.load(str(bundle.path("onnx/base.onnx")), load_external_data=False)
    for node in model.graph.node:
        kept = [a for a in node.attribute if a.name != "window"]
        del node.attribute[:]
        node.attribute.extend(kept)
    onnx.save(model, str(tmp_path / "old.onnx"))
    old = types.SimpleNamespace(
        base_config=bundle.base_config, root=bundle.root, path=lambda _: tmp_path / "old.onnx"
    )
    check_windows(bundle)  # the bundle as exported passes
    with pytest.raises(RuntimeUnavailableError, match="ignores this model's sliding window"):
        check_windows(old)  # type: ignore[arg-type]


def test_the_window_changes_the_tokens(tmp_path: Path) -> None:
    """The windowed families' truth depends on the window: the same weights attending to every
    position (the window dropped from every layer) emit other tokens, so the tests above see it."""
    for name in ("mistral-window", "qwen2-window"):
        hf, folder = hf_checkpoint(name, tmp_path / name)
        base = load_base(folder)
        windows = [layer.self_attn.op_attributes.get("window", 0) for layer in base.model.layers]
        assert windows == ([WINDOW, WINDOW] if name == "mistral-window" else [0, WINDOW])
        for layer in base.model.layers:
            layer.self_attn.op_attributes.pop("window", None)
        runtime = TorchRuntime(base, tiny_drafter(base, seed=5))
        options = AUTOREGRESSIVE.replace(max_new_tokens=NEW_TOKENS)
        unwindowed = collect(decode(runtime, PROMPTS, options), 3)
        assert unwindowed != [hf_generate(hf, p, NEW_TOKENS) for p in PROMPTS]


def test_gemma_features_are_exercised(tmp_path: Path) -> None:
    """Each Gemma feature changes these tiny models' logits by far more than the parity
    tolerances, so the family tests above would catch any of them missing or wrong: dropping
    the window, the score cap, the attention scale or Gemma 3's local rotary base moves them."""
    ids = torch.randint(0, SIZES["vocab_size"], (1, 40), generator=torch.Generator().manual_seed(1))
    for name, features in (
        ("gemma2", ("window", "softcap", "scale")),
        ("gemma3", ("window", "scale")),
    ):
        _, folder = hf_checkpoint(name, tmp_path / name)
        ours = load_base(folder)
        with torch.no_grad():
            full = full_forward(ours, ids)
            for feature in features:
                attrs = [layer.self_attn.op_attributes for layer in ours.model.layers]
                saved = [dict(a) for a in attrs]
                assert any(feature in a for a in attrs), f"{name} has no {feature}"
                for a in attrs:
                    a.pop(feature, None)
                moved = (full_forward(ours, ids) - full).abs().max().item()
                assert moved > 0.1, f"{name} without {feature}: logits moved only {moved:.3g}"
                for a, s in zip(attrs, saved, strict=True):
                    a.update(s)
            if name == "gemma3":
                assert ours.local_rope == [True, False]
                ours.local_rope = [False, False]
                assert (full_forward(ours, ids) - full).abs().max().item() > 0.1


def test_gemma3_transformers4_config_reads_as_the_new_one(tmp_path: Path) -> None:
    """A transformers-4 Gemma 3 config (rope_theta, rope_local_base_freq, rope_scaling and
    sliding_window_pattern at the top) gives the same model as transformers 5's
    (per-layer-type rope_parameters and layer_types)."""
    new = _raw("gemma3", tmp_path)
    old = {k: v for k, v in new.items() if k not in ("rope_parameters", "layer_types")}
    old |= {
        "rope_theta": 1_000_000.0,
        "rope_local_base_freq": 10_000.0,
        "rope_scaling": {"rope_type": "linear", "factor": 8.0},
        "sliding_window_pattern": 2,
    }
    a, b = BaseModelConfig.from_dict(new), BaseModelConfig.from_dict(old)
    assert [a.layer_window(i) for i in range(2)] == [b.layer_window(i) for i in range(2)]
    assert [a.layer_window(i) for i in range(2)] == [WINDOW, 0]
    assert a.rope_theta == b.rope_theta == 1_000_000.0
    assert a.rope_local_base_freq == b.rope_local_base_freq == 10_000.0
    assert a.attention_scale == b.attention_scale == 32**-0.5
    for local in (False, True):
        assert torch.equal(rope_inv_freq(a, local=local), rope_inv_freq(b, local=local))
    assert BaseModelConfig.from_dict(a.to_dict()) == a  # what a bundle's manifest stores


# Google's gemma-3-4b-it config.json as transformers 4.50 wrote it: the text_config holds only
# what differs from Gemma3TextConfig's defaults; the top level ends turns at <end_of_turn>.
GEMMA3_4B_CONFIG = {
    "architectures": ["Gemma3ForConditionalGeneration"],
    "model_type": "gemma3",
    "eos_token_id": [1, 106],
    "image_token_index": 262144,
    "mm_tokens_per_image": 256,
    "text_config": {
        "hidden_size": 2560,
        "intermediate_size": 10240,
        "model_type": "gemma3_text",
        "num_hidden_layers": 34,
        "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
        "sliding_window": 1024,
    },
    "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 1152},
}


def test_gemma3_image_text_sparse_config_reads_as_transformers_reads_it() -> None:
    """The 4B's sparse config gives the language model transformers builds from it: sizes,
    heads, every layer's window (every 6th global), both rotary bases and the scaling, the
    attention scale, tied embeddings, and the top level's end-of-turn id."""
    ours = BaseModelConfig.from_dict(GEMMA3_4B_CONFIG)
    theirs = Gemma3Config(**GEMMA3_4B_CONFIG).text_config
    assert ours.model_type == "gemma3_text"
    for field in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "hidden_activation",
        "rms_norm_eps",
        "query_pre_attn_scalar",
        "max_position_embeddings",
        "final_logit_softcapping",
        "attn_logit_softcapping",
        "tie_word_embeddings",
    ):
        assert getattr(ours, field) == getattr(theirs, field), field
    windows = [ours.layer_window(i) for i in range(34)]
    assert windows == [0 if t == "full_attention" else 1024 for t in theirs.layer_types]
    assert windows[:6] == [1024] * 5 + [0]  # by hand: layers 6, 12, ... are global
    rope = theirs.rope_parameters
    assert ours.rope_theta == rope["full_attention"]["rope_theta"] == 1_000_000.0
    assert ours.rope_local_base_freq == rope["sliding_attention"]["rope_theta"] == 10_000.0
    assert ours.rope_scaling["factor"] == rope["full_attention"]["factor"] == 8.0
    assert ours.attention_scale == 256**-0.5
    assert ours.eos_token_ids == (1, 106)
    assert BaseModelConfig.from_dict(ours.to_dict()) == ours  # what a bundle's manifest stores


def test_gemma3_text_defaults_are_transformers_defaults() -> None:
    """GEMMA3_TEXT_DEFAULTS fills what a sparse text_config leaves out: it must stay what
    transformers' Gemma3TextConfig assumes (a changed default there fails here)."""
    from redrafter.config import GEMMA3_TEXT_DEFAULTS

    theirs = Gemma3TextConfig()
    derived = {
        "rope_theta": theirs.rope_parameters["full_attention"]["rope_theta"],
        "rope_local_base_freq": theirs.rope_parameters["sliding_attention"]["rope_theta"],
        "sliding_window_pattern": theirs.layer_types.index("full_attention") + 1,
    }
    for field, value in GEMMA3_TEXT_DEFAULTS.items():
        want = derived[field] if field in derived else getattr(theirs, field)
        assert value == want, f"{field}: ours {value!r}, transformers {want!r}"


def test_gemma3_image_text_weights_under_either_naming(tmp_path: Path) -> None:
    """The language model loads from transformers 4.50's names (`language_model.model.`, what
    save_pretrained writes) and from 4.52's (`model.language_model.`) alike, the vision tensors
    left out; a tensor of neither the text model nor the vision side is named."""
    from safetensors.torch import load_file, save_file

    _, folder = hf_checkpoint("gemma3-image-text", tmp_path / "m")
    weights = load_file(str(folder / "model.safetensors"))
    assert any(k.startswith("vision_tower.") for k in weights)
    want = load_base(folder).state_dict()
    renamed = {
        k.replace("language_model.model.", "model.language_model.", 1)
        .replace("vision_tower.", "model.vision_tower.", 1)
        .replace("multi_modal_projector.", "model.multi_modal_projector.", 1): v
        for k, v in weights.items()
    }
    assert "model.language_model.norm.weight" in renamed
    save_file(renamed, str(folder / "model.safetensors"))
    got = load_base(folder).state_dict()
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want)
    save_file(
        {**renamed, "audio_tower.proj.weight": torch.zeros(2)}, str(folder / "model.safetensors")
    )
    with pytest.raises(CheckpointError, match="audio_tower.proj.weight"):
        load_base(folder)


def test_coreml_program_decodes_transformers_tokens(family, tmp_path: Path) -> None:
    """The float32 Core ML programs through coremltools' MIL evaluator: tensors match the torch
    reference, and greedy speculative tokens of the prompt that crosses the switch-over are
    `generate`'s."""
    pytest.importorskip("coremltools", reason="Core ML export needs coremltools (macOS or Linux)")
    from redrafter.build import ExportOptions, export_bundle
    from redrafter.models.checkpoints import load_pair
    from redrafter.runtimes.coreml_mil import CoreMLMilRuntime
    from redrafter.validate.tensors import compare_runtimes

    name, _, folder, drafter_dir, truth = family
    options = ExportOptions(targets=("coreml",), beam=BEAM, coreml_dtype="float32")
    bundle = export_bundle(folder, tmp_path / "bundle", drafter_path=drafter_dir, options=options)
    runtime = CoreMLMilRuntime(bundle)
    report = compare_runtimes(
        runtime, TorchRuntime(*load_pair(folder, drafter_dir)), dtype="float32", beam=BEAM
    )
    assert report.passed, report.checks
    assert max(c.max_abs for c in report.checks) < 1e-4
    n = 12  # the MIL evaluator is slow; 21 + 12 tokens still cross SWITCH
    got = collect(decode(runtime, PROMPTS[1:2], DecodeOptions(max_new_tokens=n, beam=BEAM)), 1)
    assert_same_tokens(got, [truth[1][:n]], f"{name} on the Core ML MIL evaluator")


# -- configs and loading -------------------------------------------------------------------------
def _raw(name: str, tmp_path: Path) -> dict:
    _, folder = hf_checkpoint(name, tmp_path / name)
    return json.loads((folder / "config.json").read_text())


def test_phi3_old_su_config_reads_as_the_new_one(tmp_path: Path) -> None:
    """A transformers-4 Phi-3 config.json (`rope_scaling` of type `su`, `rope_theta` at the top)
    gives the same model as the transformers-5 one (`rope_parameters`)."""
    new = _raw("phi3-longrope", tmp_path)
    rope = new["rope_parameters"]
    old = {
        **{k: v for k, v in new.items() if k != "rope_parameters"},
        "rope_theta": rope["rope_theta"],
        "rope_scaling": {
            "type": "su",
            "short_factor": rope["short_factor"],
            "long_factor": rope["long_factor"],
        },
    }
    a, b = BaseModelConfig.from_dict(new), BaseModelConfig.from_dict(old)
    assert a.rope_type == b.rope_type == "longrope"
    assert a.rope_long_from == b.rope_long_from == SWITCH
    assert a.rope_attention_factor == b.rope_attention_factor
    for long in (False, True):
        assert torch.equal(rope_inv_freq(a, long=long), rope_inv_freq(b, long=long))
    assert BaseModelConfig.from_dict(a.to_dict()) == a  # what a bundle's manifest stores


def test_qwen3_window_is_ignored_unless_enabled(tmp_path: Path) -> None:
    """Qwen's window applies only with use_sliding_window (false by default), from layer
    max_window_layers on; it never caps the context."""
    raw = _raw("qwen3", tmp_path)
    raw.pop("layer_types", None)  # the family's rule, not transformers' written-out list
    off = {**raw, "sliding_window": 16, "max_window_layers": 1}
    for config in (off, {**off, "use_sliding_window": False}):
        c = BaseModelConfig.from_dict(config)
        assert [c.layer_window(i) for i in range(2)] == [0, 0]
    on = BaseModelConfig.from_dict({**off, "use_sliding_window": True})
    assert [on.layer_window(i) for i in range(2)] == [0, 16]
    assert on.context_length == SIZES["max_position_embeddings"]
    assert BaseModelConfig.from_dict(on.to_dict()) == on  # what a bundle's manifest stores


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"sliding_window": 0}, "sliding_window=0"),
        ({"layer_types": ["full_attention"]}, "layer_types="),
        ({"layer_types": ["sliding_attention", "local"]}, "layer_types="),
        ({"max_window_layers": -1}, "max_window_layers=-1"),
        ({"model_type": "gemma2", "use_bidirectional_attention": True}, "bidirectional"),
        ({"model_type": "gemma2", "hidden_activation": "relu"}, "'relu' for gemma2"),
        ({"model_type": "gemma2", "attn_logit_softcapping": -1}, "attn_logit_softcapping=-1"),
        ({"model_type": "gemma2", "query_pre_attn_scalar": 0}, "query_pre_attn_scalar=0"),
        ({"rope_scaling": {"rope_type": "linear"}}, "factor=None"),
    ],
)
def test_bad_window_and_gemma_configs_name_the_field(change, message, tmp_path: Path) -> None:
    raw = {**_raw("mistral-window", tmp_path), **change}
    with pytest.raises((ConfigError, UnsupportedModelError)) as info:
        BaseModelConfig.from_dict(raw)
    assert message in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        (
            {"model_type": "gpt2"},
            UnsupportedModelError,
            "supported: llama, mistral, qwen2, qwen3, phi3, gemma2, gemma3_text, gemma3",
        ),
        ({"model_type": "gemma3"}, ConfigError, "model_type 'gemma3' needs a 'text_config'"),
        (
            {"model_type": "gemma3", "text_config": {"model_type": "siglip_text_model"}},
            UnsupportedModelError,
            "text_config.model_type 'siglip_text_model' is not 'gemma3_text'",
        ),
        ({"partial_rotary_factor": 0.75}, UnsupportedModelError, "partial_rotary_factor=0.75"),
        ({"rope_scaling": {"type": "yarn", "factor": 2.0}}, ConfigError, "short_factor"),
        ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, UnsupportedModelError, "'dynamic'"),
        ({"rope_scaling": longrope(SWITCH, head_dim=8)}, ConfigError, "short_factor (4 values)"),
        (
            {"rope_scaling": {**longrope(SWITCH), "long_factor": [1.0] * 7 + [float("nan")]}},
            ConfigError,
            "long_factor",
        ),
        (
            {"rope_scaling": {**longrope(SWITCH), "attention_factor": -1}},
            ConfigError,
            "attention_factor=-1",
        ),
        (
            {"original_max_position_embeddings": 0},
            ConfigError,
            "original_max_position_embeddings=0",
        ),
    ],
)
def test_bad_family_configs_name_the_field(change, error, message, tmp_path: Path) -> None:
    raw = {**_raw("phi3", tmp_path), **change}
    raw.pop("rope_parameters", None)  # the change's rope_scaling is the one read
    with pytest.raises(error) as info:
        BaseModelConfig.from_dict(raw)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_phi3_loader_checks_the_fused_tensors(tmp_path: Path) -> None:
    """The split map's hard checks: a missing or mis-shaped fused tensor is named."""
    from safetensors.torch import load_file, save_file

    _, folder = hf_checkpoint("phi3", tmp_path / "m")
    weights = load_file(folder / "model.safetensors")
    name = "model.layers.1.self_attn.qkv_proj.weight"
    save_file({k: v for k, v in weights.items() if k != name}, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.") + " \\("):
        load_base(folder)
    bad = {**weights, name: weights[name][:-16]}  # one KV head's v rows short
    save_file(bad, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"qkv_proj\.weight \(112, 64\) != \(128, 64\)"):
        load_base(folder)
