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
from redrafter.bench.report import bench_payload, bench_title, speedup_figure
from redrafter.build import ExportOptions, export_bundle
from redrafter.cli import main
from redrafter.config import BeamShape
from redrafter.errors import ConfigError, RuntimeUnavailableError
from redrafter.models.checkpoints import save_drafter
from redrafter.runtimes.onnxruntime import OnnxRuntime
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
        "--prompt-lookup",
        "on",
        "--lookup-min-ngram",
        "2",
        "--lookup-max-ngram",
        "5",
        "--lookup-span",
        "3",
        "--json",
        str(out),
        "--plot",
        str(plot),
    )
    assert result.exit_code == 0, result.output
    results = json.loads(out.read_text())["results"]
    spec = ["W2 L4 +lookup span3 2-5gram", "W2 L4 +lookup span3 2-5gram p>=0.2"]
    assert set(results) == {"autoregressive", *spec}
    assert results[spec[0]]["min_draft_prob"] == 0.0
    assert results[spec[1]]["min_draft_prob"] == 0.2
    assert all(results[name]["lookup_min_ngram"] == 2 for name in spec)
    assert all(results[name]["lookup_max_ngram"] == 5 for name in spec)
    assert all(results[name]["lookup_span"] == 3 for name in spec)
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
        (["--lookup-min-ngram", "0"], "lookup-min-ngram"),
        (["--prompt-lookup", "on", "--lookup-min-ngram", "4"], "lookup_min_ngram 4 is above"),
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
    from redrafter.export.quantize import quantization

    q = quantization("int4")
    bundle = SimpleNamespace(
        root=Path("/b/tiny"),
        dtype="float16",
        precision="int4",
        manifest=SimpleNamespace(quantization=q),
    )
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
        "threads": None,  # the runtime's default (ONNX Runtime: one per physical core)
        "dtype": "float16",
        "precision": "int4",
        "quantization": {
            "weights": "int4",
            "block_size": 32,
            "symmetric": True,
            "accuracy_level": 1,
            "method": "rtn",
        },
        "prompts": 4,
        "max_new_tokens": 8,
        "repeats": 2,
        "results": results,
    }
    eager = SimpleNamespace(name="torch")  # a runtime that does not name its implementation
    assert bench_payload(bundle, eager, {}, **run, repeats=1)["implementation"] == "eager"
    one = SimpleNamespace(name="torch", threads=1)
    assert bench_payload(bundle, one, {}, **run, repeats=1)["threads"] == 1


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


# -- issue #17: token-id prompts, threads, writable outputs, every drafter graph validated --------
def test_bench_takes_token_id_prompts_and_records_threads(grid_bundle, tmp_path) -> None:
    """bench --prompt-ids (repeatable, or @FILE): no tokenizer needed; --threads lands in JSON."""
    ids = tmp_path / "ids.txt"
    ids.write_text("3,4,5\n\n6, 7\n")
    out = tmp_path / "b.json"
    result = _bench(
        grid_bundle,
        *("--prompt-ids", "1,2,3", "--prompt-ids", f"@{ids}", "--threads", "1"),
        *("--max-new-tokens", "4", "--repeats", "1", "--beam-width", "1", "--json", str(out)),
    )
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["prompts"] == 3 and data["threads"] == 1
    assert data["results"]["autoregressive"]["tokens"] == 3 * (4 - 1)
    for args, message in [
        (["--prompt-ids", "1,x"], "comma-separated"),
        (["--prompt-ids", f"@{tmp_path / 'none.txt'}"], "cannot read"),
        (["--prompt-ids", "1", "--chat"], "--prompt-ids excludes"),
        (["--threads", "0"], "threads"),
    ]:
        bad = _bench(grid_bundle, *args)
        assert bad.exit_code == 2 and message in bad.output, bad.output
        assert "Traceback" not in bad.output


def test_bench_without_tokenizer_names_the_real_flag() -> None:
    """The no-tokenizer error names --prompt-ids, which bench now has."""
    from redrafter.errors import TokenizerError
    from redrafter.pipeline import Pipeline, encode_prompts

    bare = Pipeline(runtime=None)  # type: ignore[arg-type]
    with pytest.raises(TokenizerError, match="--prompt-ids"):
        encode_prompts(bare, ["text"], synthetic_vocab=50)
    assert "--prompt-ids" in {o for p in main.commands["bench"].params for o in p.opts}


@pytest.mark.parametrize("flag", ["--json", "--plot"])
def test_bench_checks_output_paths_before_running(tmp_path, flag) -> None:
    """An unwritable --json/--plot path fails at once (exit 2, the path named), not after the
    run: checked before the bundle is even opened."""
    missing = tmp_path / "no-such-dir" / "out"
    result = CliRunner().invoke(
        main, ["bench", "--bundle", str(tmp_path / "no-bundle"), flag, str(missing)]
    )
    assert result.exit_code == 2, result.output
    assert str(missing) in result.output and flag in result.output
    assert "Traceback" not in result.output
    folder = CliRunner().invoke(main, ["validate", "--bundle", "/b", "--json", str(tmp_path)])
    assert folder.exit_code == 2 and "is a directory" in folder.output


def test_validate_compares_every_drafter_graph(grid_bundle, tmp_path) -> None:
    report = tmp_path / "report.json"
    result = CliRunner().invoke(
        main,
        [
            *("validate", "--bundle", str(grid_bundle.root), "--max-new-tokens", "3"),
            *("--prompt-ids", "3,4,5", "--json", str(report), "--threads", "1"),
        ],
    )
    assert result.exit_code == 0, result.output
    data = json.loads(report.read_text())
    assert data["drafter_graphs"] == ["1x3", "2x3", "2x4"]
    checked = {(c["beam"], c["output"]) for c in data["tensors"] if c["graph"] == "drafter"}
    assert checked == {(b, o) for b in ("1x3", "2x3", "2x4") for o in ("beams", "log_probs")}
    assert "drafter 2x4" in result.output and "drafter graphs compared: 1x3, 2x3, 2x4" in (
        result.output
    )


def test_generate_refuses_a_missing_beam_shape_before_any_output(grid_bundle) -> None:
    result = CliRunner().invoke(
        main,
        ["generate", "--bundle", str(grid_bundle.root), "--prompt", "w1 w2", "--beam-width", "3"],
    )
    assert result.exit_code == 2, result.output
    assert result.stdout == ""  # nothing decoded, not even the prefill token
    assert "beam 3x3" in result.output and "1x3, 2x3, 2x4" in result.output


def test_onnxruntime_cuda_without_cuda_is_an_error_unless_allowed(grid_bundle) -> None:
    probe = OnnxRuntime(grid_bundle, device="cuda", allow_fallback=True)
    if probe.device == "cuda":
        pytest.skip("CUDA is active here: no fallback to test")
    assert probe.device == "cpu"
    with pytest.raises(RuntimeUnavailableError, match="--allow-cpu-fallback"):
        OnnxRuntime(grid_bundle, device="cuda")
    args = ["generate", "--bundle", str(grid_bundle.root), "--prompt-ids", "1,2"]
    args += ["--max-new-tokens", "2", "--device", "cuda"]
    refused = CliRunner().invoke(main, args)
    assert refused.exit_code == 2 and "--allow-cpu-fallback" in refused.output
    allowed = CliRunner().invoke(main, [*args, "--allow-cpu-fallback"])
    assert allowed.exit_code == 0, allowed.output
    assert "warning: CUDA requested" in allowed.stderr


def test_plot_shares_one_colour_scale_and_fits_its_title(tmp_path) -> None:
    import matplotlib.pyplot as plt

    def row(w: int, n: int, lookup: bool, speedup: float) -> dict:
        return {"beam_width": w, "beam_length": n, "prompt_lookup": lookup, "speedup": speedup}

    results = {
        "autoregressive": {"speedup": 1.0},
        "a": row(1, 3, False, 1.2),
        "b": row(1, 3, True, 2.5),
        "c": row(2, 3, True, 0.7),
    }
    title = "a-rather-long-bundle-name: onnxruntime (native, cpu), 8 prompts x 128 tokens"
    for res in (results, {"autoregressive": {"speedup": 1.0}, "a": row(1, 3, False, 1.2)}):
        fig = speedup_figure(res, title=title)
        images = [im for ax in fig.axes for im in ax.get_images()]
        assert len({(im.norm.vmin, im.norm.vmax) for im in images}) == 1  # one scale
        assert images[0].norm.vmin <= min(r["speedup"] for r in res.values())
        assert images[0].norm.vmax >= max(r["speedup"] for r in res.values())
        fig.canvas.draw()
        box = fig._suptitle.get_window_extent()
        assert box.x0 >= 0 and box.x1 <= fig.bbox.x1  # the title is not clipped
        plt.close(fig)
