"""The CLI through click's CliRunner: generate (speculative and autoregressive, text and ids,
JSON and stats), init-drafter, and one-line errors with exit code 2 for bad input."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from redrafter.cli import main
from redrafter.models.checkpoints import load_drafter

from conftest import tiny_base, write_hf_checkpoint


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    base_dir = write_hf_checkpoint(tiny_base(), root / "base")
    runner = CliRunner()
    result = runner.invoke(
        main,
        [
            "init-drafter",
            "--base",
            str(base_dir),
            "--out",
            str(root / "drafter"),
            "--seed",
            "3",
            "--exit-dim",
            "40",
        ],
    )
    assert result.exit_code == 0, result.output
    return base_dir, root / "drafter"


def _run(args: list[str]):
    return CliRunner().invoke(main, args)


def test_init_drafter_writes_apple_layout(checkpoints) -> None:
    _, drafter_dir = checkpoints
    config = json.loads((drafter_dir / "config.json").read_text())
    assert config["model_type"] == "recurrent_drafting_drafter"
    assert config["exit_dim"] == 40 and config["vocab_size"] == 61
    drafter = load_drafter(drafter_dir)
    assert "input_proj.weight" in drafter.state_dict()  # exit_dim != 2 * hidden


@pytest.mark.parametrize(
    "beam",
    [
        ["--beam-width", "1", "--beam-length", "2"],
        ["--beam-width", "3", "--beam-length", "4"],
        ["--beam-width", "2", "--beam-length", "4", "--prompt-lookup"],
        ["--beam-width", "2", "--beam-length", "4", "--prompt-lookup", "--min-draft-prob", "0.1"],
    ],
)
def test_generate_json_speculative_equals_autoregressive(checkpoints, beam) -> None:
    base_dir, drafter_dir = checkpoints
    common = [
        "generate",
        "--base",
        str(base_dir),
        "--prompt-ids",
        "3,4,5,6",
        "--max-new-tokens",
        "12",
        "--json",
    ]
    ar = _run([*common, "--autoregressive"])
    spec = _run([*common, "--drafter", str(drafter_dir), *beam, "--packing", "full"])
    assert ar.exit_code == 0 and spec.exit_code == 0, ar.output + spec.output
    ar_out, spec_out = json.loads(ar.output), json.loads(spec.output)
    assert spec_out["token_ids"] == ar_out["token_ids"]
    assert len(ar_out["token_ids"]) == 12
    assert ar_out["stats"]["tokens_per_step"] == 1.0
    for key in ("steps", "tokens_per_step", "tokens_per_second"):
        assert key in spec_out["stats"]


def test_generate_in_bfloat16_tracks_float32(checkpoints) -> None:
    """--dtype casts the torch runtime's weights and cache; the outputs stay fp32 numpy, so
    the driver is unchanged. bf16 keeps 8 bits of mantissa: the first tokens agree."""
    base_dir, drafter_dir = checkpoints
    common = ["generate", "--base", str(base_dir), "--prompt-ids", "3,4,5,6", "--json"]
    common += ["--max-new-tokens", "4"]
    fp32 = _run([*common, "--autoregressive"])
    bf16 = _run([*common, "--dtype", "bfloat16", "--drafter", str(drafter_dir)])
    assert fp32.exit_code == 0 and bf16.exit_code == 0, fp32.output + bf16.output
    assert json.loads(bf16.output)["token_ids"][:2] == json.loads(fp32.output)["token_ids"][:2]


def test_generate_streams_text_and_prints_stats(checkpoints) -> None:
    base_dir, drafter_dir = checkpoints
    result = _run(
        [
            "generate",
            "--base",
            str(base_dir),
            "--drafter",
            str(drafter_dir),
            "--prompt",
            "w1 w2 w3",
            "--max-new-tokens",
            "6",
            "--stats",
        ]
    )
    assert result.exit_code == 0, result.output
    assert "tokens/step" in result.output
    words = result.output.splitlines()[0].split()
    assert len(words) == 6 and all(w.startswith("w") or w.startswith("[") for w in words)


def test_generate_sampling_is_seeded(checkpoints) -> None:
    base_dir, drafter_dir = checkpoints
    args = [
        "generate",
        "--base",
        str(base_dir),
        "--drafter",
        str(drafter_dir),
        "--prompt-ids",
        "3,4",
        "--max-new-tokens",
        "10",
        "--temperature",
        "0.8",
        "--seed",
        "7",
        "--json",
    ]
    for rule in ("exact", "apple"):
        a = _run([*args, "--acceptance", rule])
        b = _run([*args, "--acceptance", rule])
        assert a.exit_code == 0, a.output
        assert json.loads(a.output)["token_ids"] == json.loads(b.output)["token_ids"]


@pytest.mark.parametrize(
    "args,message",
    [
        (["--base", "/nonexistent", "--autoregressive", "--prompt-ids", "1"], "not found"),
        (["--prompt-ids", "1,x", "--autoregressive"], "comma-separated"),
        (["--prompt-ids", "1", "--greedy", "--temperature", "1", "--autoregressive"], "exclude"),
        (["--prompt-ids", "1"], "needs --drafter"),
        (["--prompt-ids", "1", "--prompt", "w1", "--autoregressive"], "exactly one"),
        (["--prompt-ids", "1,2,500", "--autoregressive"], "outside the vocab"),
        (
            ["--prompt-ids", ",".join(["3"] * 250), "--autoregressive", "--max-new-tokens", "20"],
            "context",
        ),
        (["--prompt-ids", "1", "--autoregressive", "--max-new-tokens", "0"], "max-new-tokens"),
        (["--prompt-ids", "1", "--autoregressive", "--beam-width", "0"], "beam-width"),
        (["--prompt-ids", "1", "--autoregressive", "--device", "cuda"], "no CUDA device"),
        (["--bundle", "/b", "--prompt-ids", "1", "--dtype", "float16"], "exported in"),
        (["--prompt-ids", "1", "--autoregressive", "--min-draft-prob", "1.5"], "min-draft-prob"),
    ],
)
def test_bad_input_is_one_line_exit_2(checkpoints, args, message) -> None:
    base_dir, _ = checkpoints
    if "--base" not in args and "--bundle" not in args:
        args = ["--base", str(base_dir), *args]
    result = _run(["generate", *args])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output


def test_drafter_that_does_not_fit_is_rejected(checkpoints, tmp_path) -> None:
    base_dir, _ = checkpoints
    other = write_hf_checkpoint(tiny_base(vocab_size=70), tmp_path / "other")
    assert _run(["init-drafter", "--base", str(other), "--out", str(tmp_path / "d")]).exit_code == 0
    result = _run(
        [
            "generate",
            "--base",
            str(base_dir),
            "--drafter",
            str(tmp_path / "d"),
            "--prompt-ids",
            "1,2",
        ]
    )
    assert result.exit_code == 2
    assert "vocab" in result.output and "Traceback" not in result.output


def test_unknown_model_type_is_rejected(tmp_path) -> None:
    folder = write_hf_checkpoint(tiny_base(), tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    result = _run(["generate", "--base", str(folder), "--autoregressive", "--prompt-ids", "1"])
    assert result.exit_code == 2
    assert "unsupported model_type 'gpt2'" in result.output
