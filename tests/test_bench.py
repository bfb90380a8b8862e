"""`redrafter bench` on a tiny bundle: every JSON field present, ratios consistent with the raw
timings, plot written, bad arguments rejected with exit 2. No timing assertions."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from redrafter.cli import main
from redrafter.config import BeamShape
from redrafter.export.build import ExportOptions, export_bundle
from redrafter.models.checkpoints import save_drafter

from conftest import tiny_base, tiny_drafter, write_hf_checkpoint

FIELDS = {
    "tokens_per_second",
    "tokens_per_step",
    "verified_per_step",
    "ms_per_step",
    "ms_per_step_by_phase",
    "token_latency_ms_p50",
    "token_latency_ms_p95",
    "peak_rss_mb",
    "speedup",
    "speedup_repeats",
    "tokens_per_second_repeats",
    "tokens",
}


@pytest.fixture(scope="module")
def grid_bundle(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    base = tiny_base(seed=1)
    base_dir = write_hf_checkpoint(base, root / "base")
    save_drafter(tiny_drafter(base), root / "drafter")
    options = ExportOptions(beam=BeamShape(1, 3), extra_beams=(BeamShape(2, 3), BeamShape(2, 4)))
    return export_bundle(base_dir, root / "bundle", drafter_path=root / "drafter", options=options)


def _bench(bundle, *args: str):
    return CliRunner().invoke(main, ["bench", "--bundle", str(bundle.root), *args])


def test_bench_json_markdown_and_plot(grid_bundle, tmp_path) -> None:
    out, plot = tmp_path / "bench.json", tmp_path / "bench.png"
    result = _bench(
        grid_bundle,
        "--max-new-tokens",
        "8",
        "--repeats",
        "2",
        "--json",
        str(out),
        "--plot",
        str(plot),
    )
    assert result.exit_code == 0, result.output
    assert "| autoregressive |" in result.output and "| W2 L4 |" in result.output
    data = json.loads(out.read_text())
    assert data["runtime"] == "onnxruntime" and data["repeats"] == 2
    results = data["results"]
    assert set(results) == {"autoregressive", "W1 L3", "W2 L3", "W2 L4"}
    ar = results["autoregressive"]["tokens_per_second"]
    for name, r in results.items():
        assert FIELDS <= set(r), name
        assert set(r["ms_per_step_by_phase"]) == {"draft", "verify", "accept_commit", "host"}
        assert len(r["tokens_per_second_repeats"]) == 2
        assert r["speedup"] == pytest.approx(r["tokens_per_second"] / ar)
        ar_repeats = results["autoregressive"]["tokens_per_second_repeats"]
        for paired, tps, base in zip(
            r["speedup_repeats"], r["tokens_per_second_repeats"], ar_repeats, strict=True
        ):
            assert paired == pytest.approx(tps / base)
        # The phases add up to the step time (host overhead is the remainder, never negative).
        assert sum(r["ms_per_step_by_phase"].values()) == pytest.approx(r["ms_per_step"], rel=0.05)
        assert r["token_latency_ms_p50"] <= r["token_latency_ms_p95"]
        # Four default prompts, no EOS in the tiny vocab; the prefill token is not a decode token.
        assert r["tokens"] == 4 * (8 - 1)
        # A step emits its accepted drafts and one more token; the LLM ran at least those
        # (the root and the accepted path) and at most the whole beam set.
        assert r["tokens_per_step"] <= r["verified_per_step"]
        if name != "autoregressive":
            w, n = r["beam_width"], r["beam_length"]
            assert r["verified_per_step"] <= w * n
    assert results["autoregressive"]["tokens_per_step"] == 1.0
    assert results["autoregressive"]["verified_per_step"] == 1.0
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_prompt_lookup_both(grid_bundle, tmp_path) -> None:
    out, plot = tmp_path / "bench.json", tmp_path / "bench.png"
    result = _bench(
        grid_bundle,
        "--beam-width",
        "2",
        "--beam-length",
        "3,4",
        "--max-new-tokens",
        "6",
        "--repeats",
        "1",
        "--prompt-lookup",
        "both",
        "--json",
        str(out),
        "--plot",
        str(plot),
    )
    assert result.exit_code == 0, result.output
    results = json.loads(out.read_text())["results"]
    assert set(results) == {
        "autoregressive",
        "W2 L3",
        "W2 L3 +lookup",
        "W2 L4",
        "W2 L4 +lookup",
    }
    for name, r in results.items():
        assert FIELDS <= set(r), name
        if name != "autoregressive":
            assert r["prompt_lookup"] == name.endswith("+lookup")
            assert (r["beam_width"], r["beam_length"]) == (2, int(name[4]))
    # Greedy either way: the same tokens, so the same count.
    assert len({r["tokens"] for r in results.values()}) == 1
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_draft_probability_floors(grid_bundle, tmp_path) -> None:
    out, plot = tmp_path / "bench.json", tmp_path / "bench.png"
    result = _bench(
        grid_bundle,
        "--beam-width",
        "2",
        "--beam-length",
        "4",
        "--max-new-tokens",
        "6",
        "--repeats",
        "1",
        "--min-draft-prob",
        "0,0.2",
        "--json",
        str(out),
        "--plot",
        str(plot),
    )
    assert result.exit_code == 0, result.output
    results = json.loads(out.read_text())["results"]
    assert set(results) == {"autoregressive", "W2 L4", "W2 L4 p>=0.2"}
    assert results["W2 L4"]["min_draft_prob"] == 0.0
    assert results["W2 L4 p>=0.2"]["min_draft_prob"] == 0.2
    assert len({r["tokens"] for r in results.values()}) == 1  # greedy: the same tokens
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_on_the_torch_reference_any_beam(grid_bundle) -> None:
    result = _bench(
        grid_bundle,
        "--runtime",
        "torch",
        "--beam-width",
        "3",
        "--beam-length",
        "2",
        "--max-new-tokens",
        "4",
        "--repeats",
        "1",
    )
    assert result.exit_code == 0, result.output
    assert "| W3 L2 |" in result.output


@pytest.mark.parametrize(
    "args,message",
    [
        (["--beam-width", "0"], "must be >= 1"),
        (["--beam-length", "x"], "comma-separated"),
        (["--beam-width", "8", "--beam-length", "3"], "re-export"),
        (["--repeats", "0"], "repeats"),
        (["--runtime", "torch", "--portable"], "--native/--portable"),
        (["--min-draft-prob", "1.5"], "[0, 1)"),
        (["--min-draft-prob", "a"], "comma-separated"),
    ],
)
def test_bench_bad_arguments_exit_2(grid_bundle, args, message) -> None:
    result = _bench(grid_bundle, *args)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
