"""Generation stops (#18): custom stop ids, ignore_eos and stop strings, the same under
speculative and autoregressive decoding, on the tiny word-level checkpoints (text is the
words joined by spaces, e.g. 'w56 w45 w39')."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

import redrafter
from redrafter.cli import main
from redrafter.decoding.driver import decode
from redrafter.decoding.options import DecodeOptions
from redrafter.errors import ConfigError
from redrafter.pipeline import Pipeline

from conftest import OracleDrafts, collect

PROMPTS = ["w1 w2 w3", "w5"]  # ragged
MAX = 12
SPEC, AR = DecodeOptions(max_new_tokens=MAX), DecodeOptions(max_new_tokens=MAX, speculative=False)


@pytest.fixture(scope="module")
def pipe(tiny_checkpoints: tuple[Path, Path, Path], one_torch_thread: None) -> Pipeline:
    _, base_dir, drafter_dir = tiny_checkpoints
    return redrafter.from_checkpoints(base_dir, drafter=drafter_dir)


@pytest.fixture(scope="module")
def full(pipe: Pipeline) -> redrafter.pipeline.Generation:
    """The unstopped greedy generation (the tiny model has no EOS): what stops are cut from."""
    out = pipe.generate(PROMPTS, AR)
    assert all(len(t) == MAX for t in out.token_ids)
    return out


def cut_at(ids: list[int], stop: int) -> list[int]:
    """ids up to and including the first `stop` (all of them without one)."""
    return ids[: ids.index(stop) + 1] if stop in ids else ids


def test_stop_id_cuts_speculative_and_autoregressive_alike(pipe, full) -> None:
    stop = full.token_ids[1][3]  # row 1 stops at its 4th token; row 0 where the id first shows
    expected = [cut_at(row, stop) for row in full.token_ids]
    assert len(expected[1]) <= 4 < MAX
    for options in (SPEC, AR):
        got = pipe.generate(PROMPTS, options.replace(stop_token_ids=(stop,)))
        assert got.token_ids == expected, options.name


def test_stop_id_inside_a_multi_token_accept(pipe, full) -> None:
    """Oracle drafts make long accepts: a stop id inside one keeps exactly the tokens up to it."""
    ids = [pipe.encode(p) for p in PROMPTS]
    stop = full.token_ids[0][5]
    expected = [cut_at(row, stop) for row in full.token_ids]
    for seed in range(3):
        oracle = OracleDrafts(pipe.runtime, ids, full.token_ids, seed=seed)
        steps = list(decode(oracle, ids, SPEC.replace(stop_token_ids=(stop,))))
        assert collect(steps, 2) == expected


def test_ignore_eos_runs_to_max_new_tokens(pipe, full) -> None:
    eos = full.token_ids[0][1]
    with_eos = Pipeline(pipe.runtime, pipe.tokenizer, (eos,), pipe.defaults)
    for options in (SPEC, AR):
        stopped = with_eos.generate(PROMPTS, options)
        assert stopped.token_ids == [cut_at(r, eos) for r in full.token_ids]
        ignored = with_eos.generate(PROMPTS, options.replace(ignore_eos=True))
        assert ignored.token_ids == full.token_ids  # all MAX tokens
        other = full.token_ids[1][2]  # a custom stop id still stops with ignore_eos
        both = with_eos.generate(PROMPTS, options.replace(ignore_eos=True, stop_token_ids=(other,)))
        assert both.token_ids == [cut_at(r, other) for r in full.token_ids]


@pytest.mark.parametrize("where", ["inside", "across", "absent"])
def test_stop_strings(pipe, full, where: str) -> None:
    text0 = full.texts[0]
    words = text0.split(" ")
    stop = {
        "inside": words[2][1:],  # e.g. '39' of 'w39': inside one token
        "across": words[1][-1] + " " + words[2][:2],  # e.g. '5 w3': over a token boundary
        "absent": "no such text",
    }[where]
    results = [pipe.generate(PROMPTS, o, stop=(stop,)) for o in (SPEC, AR)]
    assert results[0].token_ids == results[1].token_ids
    assert results[0].texts == results[1].texts
    for b, (ids, text) in enumerate(zip(full.token_ids, full.texts, strict=True)):
        got_ids, got_text = results[1].token_ids[b], results[1].texts[b]
        at = text.find(stop)
        if at < 0:
            assert (got_ids, got_text) == (ids, text)
            continue
        assert got_text == text[:at]  # cut before the stop
        # Tokens whose text ends at or before the stop: the straddling token is dropped.
        assert pipe.tokenizer.decode(got_ids) == " ".join(text[:at].split(" ")[:-1]) or (
            at == 0 and got_ids == []
        )
    if where == "inside":  # hand-checkable: row 0 stops inside its 3rd word
        assert results[1].texts[0] == " ".join(words[:2]) + " w"
        assert results[1].token_ids[0] == full.token_ids[0][:2]
    if where == "across":
        assert results[1].texts[0] == words[0] + " " + words[1][:-1]
        assert results[1].token_ids[0] == full.token_ids[0][:1]


def test_stop_string_ends_decoding_early(pipe, full) -> None:
    """One prompt stopping at its 2nd word runs a few steps, not MAX."""
    stop = full.texts[0].split(" ")[1]
    for options in (SPEC, AR):
        out = pipe.generate(PROMPTS[:1], options, stop=(stop,))
        assert out.texts == [full.texts[0].split(" ")[0] + " "]
        assert out.stats["steps"] <= 3 < MAX


def test_stream_text_stops_like_generate(pipe, full) -> None:
    words = full.texts[0].split(" ")
    stop = words[3][:2] + "\n"  # never matches (no newline in word text): full text streams
    for s, expect in [(words[2], " ".join(words[:2]) + " "), (stop, full.texts[0])]:
        pieces = list(pipe.stream_text(PROMPTS[:1], SPEC, stop=(s,)))
        assert "".join(pieces) == expect


@pytest.mark.parametrize("bad", [("",), "w1"])
def test_bad_stop_strings(pipe, bad) -> None:
    with pytest.raises(ConfigError):
        pipe.generate(PROMPTS, AR, stop=bad)


def test_bad_stop_ids() -> None:
    with pytest.raises(ConfigError):
        DecodeOptions(stop_token_ids=(-1,))


@pytest.mark.parametrize("options", [SPEC, AR], ids=["speculative", "autoregressive"])
def test_stop_id_outside_the_vocab_is_refused_before_decoding(pipe, options) -> None:
    """An id the model cannot emit would never stop a row: refused in one line, naming it and
    the vocab, before any step runs (the last id of the vocab is fine)."""
    vocab = pipe.runtime.vocab_size
    with pytest.raises(ConfigError, match=rf"^stop token id\(s\) \[{vocab}\] are outside") as info:
        pipe.stream(PROMPTS, options.replace(stop_token_ids=(3, vocab)))
    assert f"[0, {vocab})" in str(info.value) and "\n" not in str(info.value)
    pipe.generate(PROMPTS, options.replace(stop_token_ids=(vocab - 1,)))


def test_cli_stops(tiny_checkpoints, pipe, full) -> None:
    _, base_dir, drafter_dir = tiny_checkpoints
    words = full.texts[0].split(" ")
    args = ["generate", "--base", str(base_dir), "--drafter", str(drafter_dir)]
    args += ["--prompt", PROMPTS[0], "--max-new-tokens", str(MAX)]
    runner = CliRunner()
    res = runner.invoke(main, [*args, "--stop", words[2], "--stop", "absent"])
    assert res.exit_code == 0, res.output
    assert res.stdout == " ".join(words[:2]) + " \n"
    res = runner.invoke(main, [*args, "--stop-id", str(full.token_ids[0][1]), "--json"])
    record = json.loads(res.stdout)
    assert record["token_ids"] == full.token_ids[0][:2]
    res = runner.invoke(main, [*args, "--ignore-eos", "--autoregressive", "--json"])
    assert json.loads(res.stdout)["token_ids"] == full.token_ids[0]
    for bad in (["--stop", ""], ["--stop-id", "-3"], ["--stop-id", "100000"]):
        res = runner.invoke(main, [*args, *bad])
        assert res.exit_code == 2
        assert res.stderr.startswith("error:") and res.stderr.count("\n") == 1
