"""Teacher data from an exported bundle (`train-drafter --teacher BUNDLE`, issue 22 item 3): the
answers, hidden states and top-C log-probs of the model the drafter will be deployed with, made
through the Runtime protocol. Pinned here: the answers equal the bundle's own greedy
autoregressive decoding prompt by prompt (rows refilled, rows above the busiest one skipped),
the contexts and log-probs are the runtime's, the folder records and checks the bundle, and the
CLI trains from it or refuses in one line. Tiny random models, an int4 bundle."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

from redrafter.build import ExportOptions, export_bundle
from redrafter.bundle import Bundle
from redrafter.cli import main
from redrafter.decoding import DecodeOptions, decode
from redrafter.export.quantize import quantization
from redrafter.models.checkpoints import load_base
from redrafter.runtimes.onnxruntime import OnnxRuntime
from redrafter.train.runtime_answers import (
    BundleTeacher,
    TeacherBundleError,
    bundle_fingerprint,
    open_teacher,
    runtime_answers,
)
from redrafter.train.teacher_data import (
    TeacherDataError,
    TeacherSettings,
    build_teacher_data,
    load_examples,
)

from conftest import WORDS, collect

EOS = 4  # the tiny int4 model ends 5 of these 11 answers early with it


@pytest.fixture(scope="module")
def teacher_bundle(tiny_checkpoints: tuple[Path, Path, Path]) -> Bundle:
    """The tiny base's int4 bundle without a drafter: what a teacher needs."""
    root, base_dir, _ = tiny_checkpoints
    options = ExportOptions(quantization=quantization("int4", block_size=16))
    return export_bundle(base_dir, root / "int4-teacher", options=options)


def _prompts(n: int) -> list[list[int]]:
    """n prompts of 1..9 tokens (ids 8..60: no EOS inside a prompt)."""
    rng = np.random.default_rng(3)
    return [rng.integers(8, 61, size=int(rng.integers(1, 10))).tolist() for _ in range(n)]


@pytest.mark.parametrize("native", [False, True], ids=["portable", "native"])
@pytest.mark.parametrize("slots", [1, 4])
def test_answers_are_the_bundles_own_greedy_decoding(teacher_bundle, native, slots) -> None:
    """11 prompts, EOS ends some answers early (rows refilled): each answer is the bundle's
    greedy autoregressive decoding of that prompt alone, EOS kept; context 0 is the prefill's
    hidden state at the prompt's last token and its top-C log-probs are the prefill logits'."""
    from redrafter import ops

    if native and ops.library_path() is None:
        pytest.skip("native op library not built (make ops)")
    runtime = OnnxRuntime(teacher_bundle, native=native)
    prompts = _prompts(11)
    traces = runtime_answers(
        runtime, prompts, max_new_tokens=12, eos_token_ids=(EOS,), top_c=3, slots=slots
    )
    lengths = [len(t[1]) for t in traces]
    assert min(lengths) < 12 == max(lengths), lengths  # some end at EOS, some at the limit
    for i, (prompt, (hidden, nxt, top_ids, top_logp)) in enumerate(
        zip(prompts, traces, strict=True)
    ):
        options = DecodeOptions(speculative=False, max_new_tokens=12)
        alone = collect(decode(runtime, [prompt], options), 1)[0]
        expected = alone[: alone.index(EOS) + 1] if EOS in alone else alone
        assert nxt.tolist() == expected, f"prompt {i}"
        runtime.reset(batch=1, capacity=32)
        logits, h = runtime.prefill(np.array([prompt]), np.array([len(prompt)]))  # (1, V), (1, E)
        np.testing.assert_allclose(hidden[0].numpy(), h[0], atol=1e-4, rtol=1e-4)
        logp = torch.log_softmax(torch.from_numpy(logits[0]), -1)
        assert top_ids[0].tolist() == logp.topk(3).indices.tolist()
        np.testing.assert_allclose(top_logp[0].numpy(), logp.topk(3).values.numpy(), atol=1e-4)
        assert hidden.shape == (len(nxt), teacher_bundle.base_config.hidden_size)


def test_greedy_only_answers_skip_the_logits(teacher_bundle) -> None:
    """top_c 0 (the demo recipe): the same answers, no log-probs."""
    runtime = OnnxRuntime(teacher_bundle)
    prompts = _prompts(5)
    with_top = runtime_answers(runtime, prompts, max_new_tokens=8, eos_token_ids=(EOS,), top_c=2)
    plain = runtime_answers(runtime, prompts, max_new_tokens=8, eos_token_ids=(EOS,))
    for a, b in zip(with_top, plain, strict=True):
        assert a[1].tolist() == b[1].tolist() and b[2] is None and b[3] is None
        np.testing.assert_allclose(a[0].numpy(), b[0].numpy(), atol=1e-5)


def test_bundle_teacher_data_is_recorded_and_never_mixed_with_the_torch_bases(
    teacher_bundle, tiny_checkpoints, tmp_path: Path
) -> None:
    _, base_dir, _ = tiny_checkpoints
    base = load_base(base_dir)
    teacher = open_teacher(teacher_bundle.root, base.config)
    assert teacher.precision == "int4" and teacher.fingerprint == bundle_fingerprint(teacher_bundle)
    prompts = _prompts(6)
    settings = TeacherSettings(max_new_tokens=5, eos_token_ids=(EOS,), shard_prompts=4)
    folder = build_teacher_data(teacher, prompts, tmp_path / "t", settings, slots=3)
    record = json.loads((folder / "manifest.json").read_text())
    assert (record["base_dtype"], record["base"]) == ("bundle:int4", teacher.fingerprint)
    with safe_open(str(folder / "shard-00001.safetensors"), "pt") as f:
        assert f.metadata()["base_dtype"] == "bundle:int4"
    _, answers = load_examples(folder, predict_tokens=2)
    direct = runtime_answers(teacher.runtime, prompts, max_new_tokens=5, eos_token_ids=(EOS,))
    assert answers == [t[1].tolist() for t in direct]
    # The fp32 checkpoint's answers are another teacher's, both ways round.
    with pytest.raises(TeacherDataError, match=r"another --base-dtype .*'bundle:int4'"):
        build_teacher_data(base, prompts, folder, settings)
    made = build_teacher_data(base, prompts, tmp_path / "fp32", settings, slots=3)
    with pytest.raises(TeacherDataError, match=r"'float32', this run's is 'bundle:int4'"):
        build_teacher_data(teacher, prompts, made, settings)
    # Another bundle of the same shape (fp32 weights) is another teacher too.
    other = BundleTeacher(teacher.runtime, "0" * 16, "int4")
    with pytest.raises(TeacherDataError, match="another base"):
        build_teacher_data(other, prompts, folder, settings)


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("teacher-prompts") / "prompts.jsonl"
    lines = [json.dumps({"prompt": " ".join(WORDS[(5 * i) % 50 : (5 * i) % 50 + 2 + i % 4])})
             for i in range(24)]  # fmt: skip
    path.write_text("\n".join(lines) + "\n")
    return path


def _args(base: Path, prompts: Path, out: Path, cache: Path, *more: str) -> list[str]:
    return ["train-drafter", "--base", str(base), "--data", str(prompts), "--out", str(out),
            "--cache-dir", str(cache), "--batch-size", "16", "--seq-len", "8",
            "--predict-tokens", "3", "--draft-vocab", "32", "--teacher-slots", "4",
            "--no-bf16", "--steps", "6", *more]  # fmt: skip


def test_cli_trains_from_the_teacher_bundle(
    teacher_bundle, tiny_checkpoints, prompts_file, tmp_path: Path
) -> None:
    _, base_dir, _ = tiny_checkpoints
    out, cache = tmp_path / "drafter", tmp_path / "cache"
    args = _args(base_dir, prompts_file, out, cache, "--teacher", str(teacher_bundle.root))
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert (out / "model.safetensors").is_file() and "wrote" in result.output
    manifests = list((cache / "teacher").glob("*/train/manifest.json"))
    assert len(manifests) == 1
    assert json.loads(manifests[0].read_text())["base_dtype"] == "bundle:int4"
    # Without --teacher the same command is another teacher: another cache folder.
    result = CliRunner().invoke(main, _args(base_dir, prompts_file, tmp_path / "d2", cache))
    assert result.exit_code == 0, result.output
    assert len(list((cache / "teacher").glob("*/train/manifest.json"))) == 2


def test_cli_refuses_a_teacher_of_another_model_or_mode_in_one_line(
    teacher_bundle, prompts_file, tmp_path: Path
) -> None:
    from conftest import tiny_base, write_hf_checkpoint

    other = write_hf_checkpoint(tiny_base(), tmp_path / "other")  # 2 layers; the bundle's has 3
    out = tmp_path / "d"
    result = CliRunner().invoke(
        main, _args(other, prompts_file, out, tmp_path / "c", "--teacher", str(teacher_bundle.root))
    )
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines() == [
        f"error: {teacher_bundle.root}: the teacher bundle's base has num_hidden_layers 3, "
        "--base has 2; pass a bundle exported from --base"
    ]
    assert not out.exists()
    result = CliRunner().invoke(
        main,
        _args(
            other,
            prompts_file,
            out,
            tmp_path / "c",
            "--mode",
            "ce",
            "--teacher",
            str(teacher_bundle.root),
        ),  # fmt: skip
    )
    assert result.exit_code == 2, result.output
    assert "only --mode distill" in result.output and len(result.output.strip().splitlines()) == 1
    assert not out.exists()


def test_open_teacher_checks_the_shape_before_running(teacher_bundle) -> None:
    from conftest import tiny_base_config

    with pytest.raises(TeacherBundleError, match="vocab_size 61, --base has 99"):
        open_teacher(teacher_bundle.root, tiny_base_config(vocab_size=99))
