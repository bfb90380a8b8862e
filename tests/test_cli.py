"""The CLI through click's CliRunner: generate (speculative and autoregressive, text and ids,
JSON and stats), init-drafter, and one-line errors with exit code 2 for bad input."""

from __future__ import annotations

import json
import re

import pytest
from click.testing import CliRunner

from redrafter import pipeline
from redrafter.cli import _SHARED, main
from redrafter.config import BeamShape
from redrafter.decoding import AUTOREGRESSIVE, DecodeOptions
from redrafter.errors import ConfigError, RuntimeUnavailableError, TokenizerError
from redrafter.models.checkpoints import load_drafter
from redrafter.pipeline import (
    Pipeline,
    decode_options,
    encode_prompts,
    generation_record,
    open_pipeline,
    run_stats,
    stats_text,
)

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
        ["--beam-width", "1", "--beam-length", "4", "--prompt-lookup", "--lookup-min-ngram", "2"],
        ["--beam-width", "1", "--beam-length", "3", "--prompt-lookup", "--lookup-max-ngram", "6"],
        ["--beam-width", "1", "--beam-length", "3", "--prompt-lookup", "--lookup-span", "2"],
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
        (["--prompt-ids", "1", "--autoregressive", "--lookup-min-ngram", "0"], "lookup-min-ngram"),
        (["--prompt-ids", "1", "--autoregressive", "--lookup-max-ngram", "33"], "lookup-max-ngram"),
        (["--prompt-ids", "1", "--autoregressive", "--lookup-span", "0"], "lookup-span"),
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


def test_generate_checks_base_versus_bundle_before_loading() -> None:
    """The library's ConfigError reaches the user as one `error:` line, exit code 2."""
    for args, message in [
        ([], "give exactly one of --base PATH (checkpoints) or --bundle DIR"),
        (["--bundle", "/b", "--drafter", "/d"], "--drafter goes with --base"),
        (["--base", "/m", "--runtime", "onnxruntime"], "--runtime onnxruntime needs --bundle"),
    ]:
        result = _run(["generate", "--prompt-ids", "1", *args])
        assert result.exit_code == 2, result.output
        assert result.output.startswith(f"error: {message}"), result.output


# -- shared options -------------------------------------------------------------------------------
def test_each_shared_option_serves_several_commands() -> None:
    commands = main.commands.values()
    for name, (decls, _) in _SHARED.items():
        users = [c.name for c in commands if any(decls[0] in p.opts for p in c.params)]
        assert len(users) >= 2, (name, users)
    # Per-command attributes stay the commands' own.
    defaults = {
        c: next(p.default for p in main.commands[c].params if p.name == "max_new_tokens")
        for c in ("generate", "validate", "bench")
    }
    assert defaults == {"generate": 64, "validate": 32, "bench": 64}
    bundle = {c.name: p.required for c in commands for p in c.params if p.name == "bundle_path"}
    assert bundle == {"generate": False, "validate": True, "bench": True, "serve": True}


# -- the library behind `generate` ----------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({}, "give exactly one of --base PATH (checkpoints) or --bundle DIR"),
        ({"base": "/m", "bundle": "/b"}, "give exactly one of --base PATH"),
        ({"bundle": "/b", "drafter": "/d"}, "--drafter goes with --base"),
        ({"bundle": "/b", "dtype": "float16"}, "runs in the dtype it was exported in"),
        ({"bundle": "/b", "runtime": "torch", "native": True}, "--native/--portable apply"),
        ({"base": "/m", "runtime": "onnxruntime"}, "--runtime onnxruntime needs --bundle DIR"),
        ({"base": "/m", "native": False}, "--native/--portable apply"),
        ({"base": "/m", "allow_fallback": True}, "--allow-cpu-fallback applies to"),
    ],
)
def test_open_pipeline_rejects_bad_combinations(kwargs, message) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        open_pipeline(**kwargs)  # nothing exists at these paths: checked before loading


def test_open_pipeline_on_a_bundle(monkeypatch) -> None:
    calls = []

    def fake_load(bundle, **kwargs):
        calls.append((bundle, kwargs))
        return Pipeline(runtime=None, defaults=AUTOREGRESSIVE)  # type: ignore[arg-type]

    monkeypatch.setattr(pipeline, "load", fake_load)
    pipe = open_pipeline(bundle="/b", native=False, autoregressive=True, threads=2)
    assert pipe.defaults is AUTOREGRESSIVE
    expected = {"runtime": "onnxruntime", "device": "cpu", "native": False}
    assert calls == [("/b", {**expected, "threads": 2, "allow_fallback": False})]
    # A bundle without a drafter decodes autoregressively, with or without the flag.
    assert not open_pipeline(bundle="/b", runtime="coreml-mil").defaults.speculative


def test_open_pipeline_on_checkpoints(checkpoints) -> None:
    base_dir, drafter_dir = checkpoints
    pipe = open_pipeline(base=base_dir, drafter=drafter_dir)
    assert pipe.runtime.name == "torch" and pipe.tokenizer is not None
    ar = open_pipeline(base=base_dir, drafter=drafter_dir, autoregressive=True, dtype="bfloat16")
    assert ar.runtime.name == "torch"
    with pytest.raises(RuntimeUnavailableError, match="needs an exported bundle"):
        open_pipeline(base=base_dir, runtime="coreml", autoregressive=True)


def test_decode_options_fill_in_the_pipeline_defaults() -> None:
    defaults = DecodeOptions(beam=BeamShape(2, 3), packing="full")
    options = decode_options(defaults, max_new_tokens=5)
    assert (options.beam, options.packing, options.max_new_tokens) == (BeamShape(2, 3), "full", 5)
    assert options.sampling.greedy and options.speculative
    options = decode_options(
        defaults,
        beam_width=1,
        beam_length=4,
        packing="dedup",
        temperature=0.5,
        seed=3,
        acceptance="apple",
        speculative=False,
        prompt_lookup=True,
        min_draft_prob=0.25,
    )
    assert options.beam == BeamShape(1, 4) and options.packing == "dedup"
    assert (options.sampling.temperature, options.sampling.seed) == (0.5, 3)
    assert options.sampling.acceptance == "apple" and not options.speculative
    assert options.prompt_lookup and options.min_draft_prob == 0.25


def test_run_stats_record_and_text(checkpoints) -> None:
    base_dir, drafter_dir = checkpoints
    pipe = open_pipeline(base=base_dir, drafter=drafter_dir)
    options = DecodeOptions(max_new_tokens=6, beam=BeamShape(2, 3))
    steps = list(pipe.stream([[3, 4, 5]], options))
    stats = run_stats(pipe, steps, options, wall_seconds=1.5)
    assert stats["wall_seconds"] == 1.5 and stats["generated_tokens"] == 6
    assert (stats["runtime"], stats["implementation"]) == ("torch", "eager")
    ids = [t for s in steps for t in s.new_tokens[0]]
    record = generation_record(pipe, ids, stats)
    assert record["token_ids"] == ids and record["stats"] is stats
    assert record["text"] == pipe.tokenizer.decode(ids, skip_special_tokens=True)
    assert json.loads(json.dumps(record)) == record
    text = stats_text(stats, options)
    assert text.startswith("[torch eager, speculative W=2 L=3] 6 tokens in ")
    assert "time by phase:" in text and "steps by accepted drafts" in text
    ar = stats_text(run_stats(pipe, steps, AUTOREGRESSIVE, wall_seconds=1.0), AUTOREGRESSIVE)
    assert ar.startswith("[torch eager, autoregressive]")


class _Tokenizer:
    eos_token_ids = ()

    def encode(self, text: str) -> list[int]:
        return [len(word) for word in text.split()]

    def chat_prompt(self, text: str) -> str:
        return "say " + text

    def encode_prompt(self, text: str, *, chat: bool = False) -> list[int]:
        return self.encode(self.chat_prompt(text) if chat else text)


def test_encode_prompts() -> None:
    pipe = Pipeline(runtime=None, tokenizer=_Tokenizer())  # type: ignore[arg-type]
    assert encode_prompts(pipe, None, defaults=["a bb", "ccc"]) == [[1, 2], [3]]
    assert encode_prompts(pipe, ["dddd"], defaults=["a"], chat=True) == [[3, 4]]
    assert encode_prompts(pipe, ["a"], synthetic_vocab=50) == [[1]]  # a tokenizer: text
    bare = Pipeline(runtime=None)  # type: ignore[arg-type]
    ids = encode_prompts(bare, None, defaults=["a"], synthetic_vocab=50)
    assert len(ids) == 4 and all(len(p) == 8 and max(p) < 50 for p in ids)
    with pytest.raises(TokenizerError, match="no tokenizer, so text prompts cannot be used"):
        encode_prompts(bare, ["a"], synthetic_vocab=50)
    with pytest.raises(TokenizerError, match="no tokenizer"):
        encode_prompts(bare, None, defaults=["a"])


# -- issue #17 / #16 ------------------------------------------------------------------------------
def test_no_drafter_decodes_autoregressively_in_cli_and_library(checkpoints) -> None:
    """A model without a drafter: the library defaults to autoregressive decoding, and the CLI
    does the same, saying so on stderr (it used to demand --autoregressive)."""
    base_dir, _ = checkpoints
    pipe = pipeline.from_checkpoints(base_dir)
    assert not pipe.defaults.speculative
    lib = pipe.generate([[3, 4, 5]], pipe.defaults.replace(max_new_tokens=5))
    args = ["generate", "--base", str(base_dir), "--prompt-ids", "3,4,5", "--max-new-tokens", "5"]
    result = _run([*args, "--json"])
    assert result.exit_code == 0, result.output
    assert "no drafter; decoding autoregressively" in result.stderr
    assert json.loads(result.stdout)["token_ids"] == lib.token_ids[0]
    with pytest.raises(ConfigError, match="no drafter"):
        pipe.generate([[3, 4]], DecodeOptions(max_new_tokens=2))  # explicitly speculative


def test_non_utf8_prompt_is_one_line_exit_2(checkpoints) -> None:
    base_dir, drafter_dir = checkpoints
    bad = b"caf\xe9".decode("utf-8", "surrogateescape")  # what Python makes of latin-1 argv
    result = _run(
        ["generate", "--base", str(base_dir), "--drafter", str(drafter_dir), "--prompt", bad]
    )
    assert result.exit_code == 2, result.output
    assert "not valid UTF-8" in result.output and "--prompt" in result.output
    assert "Traceback" not in result.output and result.stdout == ""


def test_threads_option_sets_the_torch_runtime_threads(checkpoints) -> None:
    import torch

    from redrafter.runtimes.torch import TorchRuntime, default_threads, torch_threads

    base_dir, drafter_dir = checkpoints
    assert default_threads() >= 1
    pipe = open_pipeline(base=base_dir, drafter=drafter_dir, threads=1)
    assert pipe.runtime.threads == 1
    # The library's entry points default to default_threads(); the bare runtime leaves torch's
    # process-wide count alone (callers that set it themselves keep it).
    assert open_pipeline(base=base_dir, drafter=drafter_dir).runtime.threads == default_threads()
    assert TorchRuntime(pipe.runtime.base).threads is None
    before = torch.get_num_threads()
    with torch_threads(before + 1):
        assert torch.get_num_threads() == before + 1
    assert torch.get_num_threads() == before
    seen = []
    inner = pipe.runtime.base.hidden_states

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return inner(*args, **kwargs)

    pipe.runtime.base.hidden_states = spy
    pipe.generate([[3, 4]], DecodeOptions(max_new_tokens=2, beam=BeamShape(2, 3)))
    assert seen and set(seen) == {1} and torch.get_num_threads() == before
    args = ["generate", "--base", str(base_dir), "--drafter", str(drafter_dir)]
    ok = _run([*args, "--prompt-ids", "3,4", "--max-new-tokens", "3", "--threads", "1"])
    assert ok.exit_code == 0, ok.output
    bad = _run([*args, "--prompt-ids", "3,4", "--threads", "0"])
    assert bad.exit_code == 2 and "--threads" in bad.output


def test_export_progress_is_quiet_off_a_terminal(checkpoints, tmp_path, monkeypatch) -> None:
    """Not a TTY (CliRunner): no progress lines, only the result. On a terminal each finished
    stage is printed under a spinner."""
    from rich.console import Console

    from redrafter import cli

    base_dir, drafter_dir = checkpoints
    args = ["export", "--base", str(base_dir), "--drafter", str(drafter_dir)]
    result = _run([*args, "--out", str(tmp_path / "b")])
    assert result.exit_code == 0, result.output
    assert result.stderr == "" and result.stdout.startswith("wrote bundle")
    printed = []
    monkeypatch.setattr(Console, "is_terminal", property(lambda self: True))
    monkeypatch.setattr(Console, "print", lambda self, *a, **k: printed.append(str(a[0])))
    with cli._stage_progress("exporting") as report:
        report("exported base.onnx in 1.0 s")
    assert printed and "exported base.onnx" in printed[0]


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--repetition-penalty", "0"], "repetition_penalty 0.0 must be a finite number > 0"),
        (["--presence-penalty", "3"], "presence_penalty 3.0 must be a finite number in [-2, 2]"),
        (["--frequency-penalty", "nan"], "frequency_penalty nan must be"),
    ],
)
def test_generate_bad_penalty_is_one_line_exit_2(flags: list[str], message: str) -> None:
    """Checked before any model loads (no --base here): one `error:` line, exit code 2."""
    result = _run(["generate", "--prompt-ids", "1", *flags])
    assert result.exit_code == 2, result.output
    assert result.output.count("\n") == 1 and result.output.startswith(f"error: {message}")


def test_generate_json_logprobs_with_penalties(checkpoints) -> None:
    """--logprobs adds one log-probability per emitted token to the JSON record; the same
    penalised greedy run speculative and autoregressive gives the same ids and log-probs."""
    base_dir, drafter_dir = checkpoints
    args = ["generate", "--base", str(base_dir), "--drafter", str(drafter_dir), "--json"]
    args += ["--prompt-ids", "3,4,5,3", "--max-new-tokens", "10"]
    plain = json.loads(_run(args).stdout)
    args += ["--logprobs", "--repetition-penalty", "1.3", "--presence-penalty", "0.5"]
    args += ["--frequency-penalty", "0.5"]
    spec, ar = _run(args), _run([*args, "--autoregressive"])
    assert spec.exit_code == 0 and ar.exit_code == 0, spec.output + ar.output
    first, second = json.loads(spec.stdout), json.loads(ar.stdout)
    assert first["token_ids"] == second["token_ids"] and len(first["token_ids"]) == 10
    assert len(first["logprobs"]) == 10 and all(lp <= 0 for lp in first["logprobs"])
    assert first["logprobs"] == pytest.approx(second["logprobs"], abs=1e-4)
    assert "logprobs" not in plain and plain["token_ids"] != first["token_ids"]


def test_generate_logprobs_needs_json(checkpoints) -> None:
    result = _run(["generate", "--prompt-ids", "1", "--logprobs"])
    assert result.exit_code == 2 and "--logprobs needs --json" in result.output


def test_generate_logprobs_for_a_prompts_batch(checkpoints, tmp_path) -> None:
    """--prompts --json --logprobs: each record carries its own row's log-probs, one per
    token, equal to that prompt decoded alone (the batch is ragged: rows of other lengths)."""
    base_dir, drafter_dir = checkpoints
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("w3 w4 w5 w3\nw7\nw9 w10 w11 w12 w13\n")
    args = ["generate", "--base", str(base_dir), "--drafter", str(drafter_dir), "--json"]
    args += ["--max-new-tokens", "8", "--logprobs", "--presence-penalty", "0.5"]
    batch = _run([*args, "--prompts", str(prompts)])
    assert batch.exit_code == 0, batch.output
    records = json.loads(batch.stdout)
    assert len(records) == 3
    for record in records:
        alone = json.loads(_run([*args, "--prompt", record["prompt"]]).stdout)
        assert record["token_ids"] == alone["token_ids"]
        assert len(record["logprobs"]) == len(record["token_ids"])
        assert record["logprobs"] == pytest.approx(alone["logprobs"], abs=1e-4)
