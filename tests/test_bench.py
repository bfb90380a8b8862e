"""`redrafter bench` on a tiny bundle: every JSON field present, ratios consistent with the raw
timings, plot written, bad arguments rejected with exit 2. No timing assertions."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

from redrafter.bench.beams import select_beams
from redrafter.bench.harness import run_configs, runs_in, speculative_grid
from redrafter.bench.report import bench_payload, bench_title
from redrafter.build import ExportOptions, export_bundle
from redrafter.cli import main
from redrafter.config import BeamShape
from redrafter.errors import ConfigError
from redrafter.models.checkpoints import save_drafter
from redrafter.runtimes.torch import TorchRuntime

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


# -- the library behind `bench` -------------------------------------------------------------------
GRID = [BeamShape(1, 3), BeamShape(2, 3), BeamShape(2, 4)]


@pytest.mark.parametrize(
    "widths,lengths,any_shape,expected",
    [
        (None, None, False, GRID),
        ([2], None, False, [BeamShape(2, 3), BeamShape(2, 4)]),
        (None, [3], False, [BeamShape(1, 3), BeamShape(2, 3)]),
        ([2, 1], [3], False, [BeamShape(1, 3), BeamShape(2, 3)]),  # the bundle's order
        ([3], [2, 5], True, [BeamShape(3, 2), BeamShape(3, 5)]),  # any shape: the product
        ([2], None, True, [BeamShape(2, 3), BeamShape(2, 4)]),  # one list: the bundle's graphs
    ],
)
def test_select_beams(widths, lengths, any_shape, expected) -> None:
    assert select_beams(GRID, widths, lengths, any_shape=any_shape) == expected


@pytest.mark.parametrize(
    "available,widths,lengths,message",
    [
        ([], None, None, "this bundle has no drafter graph: nothing to compare"),
        (
            GRID,
            [2, 8],
            [3],
            "the bundle has no drafter graph for (W, L) [(8, 3)]; re-export with "
            "--beam-width 2,8 --beam-length 3",
        ),
        (GRID, [5], None, "no beam shape selected; check --beam-width/--beam-length"),
    ],
)
def test_select_beams_errors(available, widths, lengths, message) -> None:
    with pytest.raises(ConfigError) as info:
        select_beams(available, widths, lengths)
    assert str(info.value) == message


def test_runs_in_counts_the_runs_run_configs_reports() -> None:
    base = tiny_base(seed=1)
    runtime = TorchRuntime(base, tiny_drafter(base))
    spec = speculative_grid([BeamShape(2, 3)], max_new_tokens=3, prompt_lookup=(False, True))
    names: list[str] = []
    run_configs(runtime, [[3, 4, 5]], spec, repeats=2, on_run=names.append)
    assert len(names) == runs_in(spec, 2) == 9


def test_bench_title_and_payload() -> None:
    bundle = SimpleNamespace(root=Path("/b/tiny"), dtype="float16")
    runtime = SimpleNamespace(name="onnxruntime", implementation="native")
    results = {"autoregressive": {"speedup": 1.0}}
    run = dict(device="cuda", prompts=4, max_new_tokens=8)
    assert bench_title(bundle, runtime, **run) == (
        "tiny: onnxruntime (native, cuda), 4 prompts x 8 tokens"
    )
    assert bench_payload(bundle, runtime, results, **run, repeats=2) == {
        "bundle": "/b/tiny",
        "runtime": "onnxruntime",
        "implementation": "native",
        "device": "cuda",
        "dtype": "float16",
        "prompts": 4,
        "max_new_tokens": 8,
        "repeats": 2,
        "results": results,
    }
    eager = SimpleNamespace(name="torch")  # a runtime that does not name its implementation
    assert bench_payload(bundle, eager, {}, **run, repeats=1)["implementation"] == "eager"


def test_validate_reads_prompts_as_bench_does(grid_bundle, tmp_path) -> None:
    """validate and bench share the prompt reading (--prompts file, else the defaults)."""
    prompts, report = tmp_path / "prompts.txt", tmp_path / "report.json"
    prompts.write_text("w1 w2 w3\nw4 w5\n")
    args = ["validate", "--bundle", str(grid_bundle.root), "--max-new-tokens", "4"]
    result = CliRunner().invoke(main, [*args, "--prompts", str(prompts), "--json", str(report)])
    assert result.exit_code == 0, result.output
    assert json.loads(report.read_text())["token_parity"] == "2/2"
    missing = CliRunner().invoke(main, [*args, "--prompts", str(tmp_path / "none.txt")])
    assert missing.exit_code == 2 and "not found" in missing.output
