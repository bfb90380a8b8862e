"""The `redrafter` command line: a thin layer over the library. Bad input prints one line and
exits with code 2 (click's own usage errors already do)."""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import click

from redrafter.config import BeamShape, SamplingParams
from redrafter.errors import RedrafterError


class _Group(click.Group):
    """Turns every `RedrafterError` into `error: <message>` and exit code 2, no traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except RedrafterError as e:
            click.echo(f"error: {e}", err=True)
            ctx.exit(2)


@click.group(cls=_Group)
@click.version_option(package_name="redrafter")
def main() -> None:
    """ReDrafter speculative decoding: export, run, validate and benchmark."""


def _parse_list(text: str, flag: str, cast: type, noun: str) -> list[Any]:
    """'1,2,4' -> [1, 2, 4] (duplicates dropped), or a usage error naming the flag."""
    try:
        values = [cast(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise click.BadParameter(
            f"{text!r} is not a comma-separated list of {noun}", param_hint=flag
        ) from None
    if not values:
        raise click.BadParameter(f"{text!r}: give at least one value", param_hint=flag)
    return list(dict.fromkeys(values))


def _parse_ints(text: str, flag: str, *, minimum: int) -> list[int]:
    """'1,2,4' -> [1, 2, 4], each >= minimum."""
    values = _parse_list(text, flag, int, "integers")
    if min(values) < minimum:
        raise click.BadParameter(f"{text!r}: each value must be >= {minimum}", param_hint=flag)
    return values


def _parse_probs(text: str, flag: str) -> list[float]:
    """'0,0.25' -> [0.0, 0.25], each in [0, 1)."""
    values = _parse_list(text, flag, float, "numbers")
    if not all(0.0 <= v < 1.0 for v in values):
        raise click.BadParameter(f"{text!r}: each value must be in [0, 1)", param_hint=flag)
    return values


def _parse_ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a comma-separated list of integers") from None
    if not ids:
        raise click.BadParameter("give at least one token id, e.g. 1,2,3")
    return ids


@main.command()
@click.option(
    "--base",
    "base_path",
    type=click.Path(),
    help="Base model: HF folder, .gguf file or llama2.c .bin (torch runtime).",
)
@click.option(
    "--drafter",
    "drafter_path",
    type=click.Path(),
    help="ReDrafter drafter folder (Apple's layout), for --base.",
)
@click.option(
    "--bundle",
    "bundle_path",
    type=click.Path(),
    help="An exported bundle (from `redrafter export`), instead of --base/--drafter.",
)
@click.option("--prompt", help="Prompt text.")
@click.option("--prompt-ids", help="Prompt as comma-separated token ids, e.g. 1,2,3.")
@click.option("--chat", is_flag=True, help="Wrap the prompt in the model's chat template.")
@click.option("--max-new-tokens", default=64, show_default=True, type=click.IntRange(min=1))
@click.option(
    "--beam-width", type=click.IntRange(min=1), help="Beams drafted per step [4, or the bundle's]."
)
@click.option(
    "--beam-length",
    type=click.IntRange(min=2),
    help="Tokens per beam, counting the LLM's own [4, or the bundle's].",
)
@click.option("--greedy", is_flag=True, help="Greedy decoding (the default without --temperature).")
@click.option(
    "--temperature",
    type=click.FloatRange(min=0, min_open=True),
    help="Sample at this temperature (top-50 warped).",
)
@click.option("--seed", type=int, help="Random seed for sampling.")
@click.option(
    "--acceptance",
    type=click.Choice(["exact", "apple"]),
    default="exact",
    show_default=True,
    help="Sampling acceptance rule.",
)
@click.option(
    "--packing",
    type=click.Choice(["dedup", "full"]),
    help="Tree packing: dedup shared prefixes, or keep all W*L [dedup, or the bundle's].",
)
@click.option(
    "--prompt-lookup",
    is_flag=True,
    help="Add a prompt-lookup draft (the text's own n-gram continuation) as one more beam.",
)
@click.option(
    "--min-draft-prob",
    type=click.FloatRange(0.0, 1.0, max_open=True),
    default=0.0,
    show_default=True,
    help="Cut each drafter beam before its first draft whose cumulative draft probability is "
    "below this (fewer tree tokens: pays off where verification is compute-bound, e.g. CPUs).",
)
@click.option("--autoregressive", is_flag=True, help="Run the plain autoregressive baseline.")
@click.option(
    "--runtime",
    type=click.Choice(["torch", "onnxruntime", "coreml", "coreml-mil"]),
    help="Runtime [torch for --base, onnxruntime for --bundle]. coreml: Apple's runtime "
    "(macOS 15+); coreml-mil: the converted Core ML program evaluated in numpy (slow; checks "
    "the conversion, not Apple's runtime or the Neural Engine).",
)
@click.option(
    "--device",
    type=click.Choice(["cpu", "cuda"]),
    default="cpu",
    show_default=True,
    help="Device for the runtime (cuda: ORT CUDA provider, or torch on CUDA).",
)
@click.option(
    "--dtype",
    type=click.Choice(["float32", "float16", "bfloat16"]),
    help="With --base: the torch runtime's weights and KV cache [float32] (half: for CUDA). "
    "A bundle has the dtype it was exported in.",
)
@click.option("--stats", is_flag=True, help="Print tokens/step, tokens/s and acceptance to stderr.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
def generate(
    base_path: str | None,
    drafter_path: str | None,
    bundle_path: str | None,
    prompt: str | None,
    prompt_ids: str | None,
    chat: bool,
    max_new_tokens: int,
    beam_width: int | None,
    beam_length: int | None,
    greedy: bool,
    temperature: float | None,
    seed: int | None,
    acceptance: str,
    packing: str | None,
    prompt_lookup: bool,
    min_draft_prob: float,
    autoregressive: bool,
    runtime: str | None,
    device: str,
    dtype: str | None,
    stats: bool,
    as_json: bool,
) -> None:
    """Generate text with speculative decoding (or the autoregressive baseline)."""
    from redrafter.decoding import DecodeOptions
    from redrafter.pipeline import from_checkpoints, load

    if (prompt is None) == (prompt_ids is None):
        raise click.UsageError("give exactly one of --prompt TEXT or --prompt-ids 1,2,3")
    if greedy and temperature is not None:
        raise click.UsageError("--greedy and --temperature exclude each other")
    if chat and prompt_ids is not None:
        raise click.UsageError("--chat applies to --prompt text, not --prompt-ids")
    if (base_path is None) == (bundle_path is None):
        raise click.UsageError("give exactly one of --base PATH (checkpoints) or --bundle DIR")
    if bundle_path is not None:
        if drafter_path is not None:
            raise click.UsageError("--drafter goes with --base; a bundle carries its drafter")
        if dtype is not None:
            raise click.UsageError(
                "--dtype goes with --base; a bundle runs in the dtype it was exported in "
                "(redrafter export --dtype)"
            )
        pipe = load(bundle_path, runtime=runtime or "onnxruntime", device=device)
    else:
        if runtime == "onnxruntime":
            raise click.UsageError(
                "--runtime onnxruntime needs --bundle DIR (make one with `redrafter export`)"
            )
        if not autoregressive and drafter_path is None:
            raise click.UsageError(
                "speculative decoding needs --drafter (or pass --autoregressive)"
            )
        pipe = from_checkpoints(
            base_path or "",
            drafter=None if autoregressive else drafter_path,
            device=device,
            dtype=dtype or "float32",
        )
    d = pipe.defaults
    if not autoregressive and bundle_path is not None and not d.speculative:
        raise click.UsageError("this bundle has no drafter; pass --autoregressive")
    options = DecodeOptions(
        max_new_tokens=max_new_tokens,
        beam=BeamShape(beam_width or d.beam.width, beam_length or d.beam.length),
        sampling=SamplingParams(temperature=temperature or 0.0, seed=seed, acceptance=acceptance),  # type: ignore[arg-type]
        packing=packing or d.packing,  # type: ignore[arg-type]
        speculative=not autoregressive,
        prompt_lookup=prompt_lookup,
        min_draft_prob=min_draft_prob,
    )
    the_prompt = prompt if prompt is not None else _parse_ids(prompt_ids or "")
    _run(pipe, the_prompt, options, chat=chat, show_stats=stats, as_json=as_json)


def _run(
    pipe: Any, prompt: Any, options: Any, *, chat: bool, show_stats: bool, as_json: bool
) -> None:
    """Stream one prompt's generation to stdout (text, or ids without a tokenizer)."""
    from redrafter.decoding.stats import summarize
    from redrafter.models.tokenizer import StreamDecoder

    stream = (
        None
        if as_json or pipe.tokenizer is None
        else StreamDecoder(pipe.tokenizer, skip_special_tokens=True)
    )
    steps, ids = [], []
    start = time.perf_counter()
    for step in pipe.stream([prompt], options, chat=chat):
        steps.append(step)
        ids.extend(step.new_tokens[0])
        if stream is not None:
            click.echo(stream.push(step.new_tokens[0]), nl=False)
            sys.stdout.flush()  # stream as tokens are accepted
        elif not as_json:
            click.echo(" ".join(map(str, step.new_tokens[0])) + " ", nl=False)
    wall = time.perf_counter() - start
    summary = summarize(steps, beam_length=options.beam_length)
    summary["wall_seconds"] = wall
    summary["runtime"] = pipe.runtime.name
    summary["implementation"] = getattr(pipe.runtime, "implementation", "eager")
    if as_json:
        text = (
            None if pipe.tokenizer is None else pipe.tokenizer.decode(ids, skip_special_tokens=True)
        )
        click.echo(json.dumps({"token_ids": ids, "text": text, "stats": summary}))
        return
    if stream is not None:
        click.echo(stream.flush(), nl=False)
    click.echo()
    sys.stdout.flush()
    if show_stats:
        _print_stats(summary, options)


def _print_stats(s: dict[str, Any], options: Any) -> None:
    mode = (
        f"speculative W={options.beam.width} L={options.beam.length}"
        if options.speculative
        else "autoregressive"
    )
    lines = [
        f"[{s['runtime']} {s['implementation']}, {mode}] "
        f"{s['generated_tokens']} tokens in {s['steps']} steps: "
        f"{s['tokens_per_step']:.2f} tokens/step, {s['tokens_per_second']:.1f} tokens/s "
        f"(prefill {1000 * s['prefill_seconds']:.0f} ms)",
        "time by phase: "
        + ", ".join(f"{k} {1000 * v:.0f} ms" for k, v in s["seconds_by_phase"].items()),
    ]
    if s["acceptance_histogram"]:
        lines.append("steps by accepted drafts (0, 1, ...): " + str(s["acceptance_histogram"]))
    click.echo("\n".join(lines), err=True)


@main.command()
@click.option(
    "--base",
    "base_path",
    required=True,
    type=click.Path(),
    help="Base model: HF folder, .gguf file or llama2.c .bin.",
)
@click.option(
    "--drafter",
    "drafter_path",
    type=click.Path(),
    help="ReDrafter drafter folder (Apple's layout); omit for an autoregressive bundle.",
)
@click.option("--out", "out_dir", required=True, type=click.Path(), help="Bundle directory.")
@click.option(
    "--target",
    default="onnx",
    show_default=True,
    help="Comma-separated targets: onnx, coreml (Core ML is float16, batch 1).",
)
@click.option(
    "--dtype",
    type=click.Choice(["float32", "float16"]),
    default="float32",
    show_default=True,
    help="ONNX weights and caches.",
)
@click.option(
    "--coreml-dtype",
    type=click.Choice(["float32", "float16"]),
    default="float16",
    show_default=True,
    help="Core ML compute precision.",
)
@click.option(
    "--beam-width",
    default="4",
    show_default=True,
    help="Beam width(s) of the drafter graphs, e.g. 4 or 1,2,4 (the first is the default).",
)
@click.option(
    "--beam-length",
    default="4",
    show_default=True,
    help="Beam length(s), counting the LLM's token, e.g. 4 or 3,4,5 (the first is the default).",
)
@click.option("--packing", type=click.Choice(["dedup", "full"]), default="dedup", show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace an existing bundle at --out.")
def export(
    base_path: str,
    drafter_path: str | None,
    out_dir: str,
    target: str,
    dtype: str,
    coreml_dtype: str,
    beam_width: str,
    beam_length: str,
    packing: str,
    overwrite: bool,
) -> None:
    """Export checkpoints to a bundle (ONNX graphs with redrafter::TreeAttention, tokenizer,
    checksummed manifest), written to a temp dir and renamed into place."""
    from redrafter.build import ExportOptions, export_bundle

    widths = _parse_ints(beam_width, "--beam-width", minimum=1)
    lengths = _parse_ints(beam_length, "--beam-length", minimum=2)
    beams = [BeamShape(w, n) for w in widths for n in lengths]
    options = ExportOptions(
        targets=tuple(t.strip() for t in target.split(",") if t.strip()),
        dtype=dtype,
        coreml_dtype=coreml_dtype,
        beam=beams[0],
        extra_beams=tuple(beams[1:]),
        packing=packing,  # type: ignore[arg-type]
    )
    bundle = export_bundle(
        base_path,
        out_dir,
        drafter_path=drafter_path,
        options=options,
        overwrite=overwrite,
        progress=lambda m: click.echo(m, err=True),
    )
    m = bundle.manifest
    parity = "ok" if m.parity is not None and m.parity.passed else "FAILED"
    click.echo(
        f"wrote bundle {out_dir} ({m.total_bytes / 1e6:.1f} MB, "
        f"{len(m.files)} files, export-time parity {parity})"
    )


@main.command()
@click.option("--bundle", "bundle_path", required=True, type=click.Path(), help="Bundle directory.")
@click.option(
    "--runtime",
    type=click.Choice(["onnxruntime", "coreml", "coreml-mil"]),
    default="onnxruntime",
    show_default=True,
    help="coreml: Apple's runtime (macOS 15+); coreml-mil: the converted Core ML program "
    "evaluated op by op in numpy on any OS (checks the conversion, not Apple's runtime or the "
    "Neural Engine).",
)
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option(
    "--base",
    "base_path",
    type=click.Path(),
    help="Reference base checkpoint [the one recorded in the manifest].",
)
@click.option(
    "--drafter",
    "drafter_path",
    type=click.Path(),
    help="Reference drafter [the one recorded in the manifest].",
)
@click.option(
    "--prompts",
    "prompts_file",
    type=click.Path(),
    help="Prompts: a text file (one per line) or JSONL with a 'prompt' field.",
)
@click.option("--chat", is_flag=True, help="Wrap each prompt in the chat template.")
@click.option("--max-new-tokens", default=32, show_default=True, type=click.IntRange(min=1))
@click.option("--json", "json_out", type=click.Path(), help="Write the JSON report here.")
def validate(
    bundle_path: str,
    runtime: str,
    device: str,
    base_path: str | None,
    drafter_path: str | None,
    prompts_file: str | None,
    chat: bool,
    max_new_tokens: int,
    json_out: str | None,
) -> None:
    """Prove parity of a bundle against the PyTorch reference: tensors per graph and greedy
    tokens per prompt. Exit 0 pass, 1 parity failure, 2 bad input."""
    from redrafter.pipeline import load, reference_runtime
    from redrafter.validate.prompts import read_prompts
    from redrafter.validate.report import DEFAULT_PROMPTS, validate_bundle

    pipe = load(bundle_path, runtime=runtime, device=device)
    bundle = pipe.runtime.bundle  # type: ignore[attr-defined]
    reference = reference_runtime(bundle, base=base_path, drafter=drafter_path)
    texts = read_prompts(prompts_file) if prompts_file else list(DEFAULT_PROMPTS)
    if pipe.tokenizer is None:
        if prompts_file is not None:
            raise click.UsageError("this bundle has no tokenizer, so text prompts cannot be used")
        V = bundle.base_config.vocab_size
        prompts = [[(7 * i + j) % V for j in range(1, 9)] for i in range(4)]
    else:
        prompts = [pipe.encode(t, chat=chat) for t in texts]
    report = validate_bundle(
        bundle,
        candidate=pipe.runtime,
        reference=reference,
        prompts=prompts,
        max_new_tokens=max_new_tokens,
        eos_token_ids=pipe.eos_token_ids,
    )
    click.echo(report.table())
    if json_out:
        report.save(json_out)
    sys.exit(0 if report.passed else 1)


@main.command()
@click.option("--bundle", "bundle_path", required=True, type=click.Path(), help="Bundle directory.")
@click.option(
    "--runtime",
    type=click.Choice(["onnxruntime", "torch"]),
    default="onnxruntime",
    show_default=True,
    help="torch = the reference rebuilt from the bundle's sources.",
)
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option(
    "--native/--portable",
    "native",
    default=None,
    help="ONNX Runtime TreeAttention: the native library or the portable body [native when built].",
)
@click.option(
    "--prompts",
    "prompts_file",
    type=click.Path(),
    help="Prompts: a text file (one per line) or JSONL with a 'prompt' field.",
)
@click.option("--chat", is_flag=True, help="Wrap each prompt in the chat template.")
@click.option("--max-new-tokens", default=64, show_default=True, type=click.IntRange(min=1))
@click.option("--beam-width", default=None, help="Comma list, e.g. 1,2,4 [the bundle's graphs].")
@click.option("--beam-length", default=None, help="Comma list, e.g. 3,4,5 [the bundle's graphs].")
@click.option("--repeats", default=3, show_default=True, type=click.IntRange(min=1))
@click.option("--json", "json_out", type=click.Path(), help="Write the JSON results here.")
@click.option("--plot", "plot_out", type=click.Path(), help="Write a PNG speed-up plot here.")
@click.option(
    "--prompt-lookup",
    type=click.Choice(["off", "on", "both"]),  # keys of harness.PROMPT_LOOKUP_SETTINGS
    default="off",
    show_default=True,
    help="Speculative runs without, with, or both without and with the prompt-lookup beam.",
)
@click.option(
    "--min-draft-prob",
    default="0",
    show_default=True,
    help="Comma list of draft-probability floors (0 = keep every draft), e.g. 0,0.25: each "
    "speculative configuration runs once per floor.",
)
def bench(
    bundle_path: str,
    runtime: str,
    device: str,
    native: bool | None,
    prompts_file: str | None,
    chat: bool,
    max_new_tokens: int,
    beam_width: str | None,
    beam_length: str | None,
    repeats: int,
    json_out: str | None,
    plot_out: str | None,
    prompt_lookup: str,
    min_draft_prob: str,
) -> None:
    """Speculative vs autoregressive decoding on the same runtime and prompts, side by side:
    tokens/s, tokens/step, ms/step by phase, latency percentiles, peak RSS, speed-up."""
    from rich.progress import Progress

    from redrafter.bench.harness import PROMPT_LOOKUP_SETTINGS, run_configs, speculative_grid
    from redrafter.bench.report import markdown_table, plot_speedup, save_json
    from redrafter.pipeline import load, reference_runtime
    from redrafter.validate.prompts import read_prompts
    from redrafter.validate.report import DEFAULT_PROMPTS

    if runtime == "torch" and native is not None:
        raise click.UsageError("--native/--portable apply to --runtime onnxruntime")
    pipe = load(bundle_path, runtime="onnxruntime", device=device, native=native)
    bundle = pipe.runtime.bundle  # type: ignore[attr-defined]
    rt = pipe.runtime if runtime == "onnxruntime" else reference_runtime(bundle)
    available = list(bundle.drafter_graphs)
    if not available:
        raise click.UsageError("this bundle has no drafter graph: nothing to compare")
    widths = _parse_ints(beam_width, "--beam-width", minimum=1) if beam_width else None
    lengths = _parse_ints(beam_length, "--beam-length", minimum=2) if beam_length else None
    beams = [
        b
        for b in available
        if (widths is None or b.width in widths) and (lengths is None or b.length in lengths)
    ]
    wanted = {(w, n) for w in (widths or []) for n in (lengths or [])}
    missing = sorted(wanted - {(b.width, b.length) for b in available})
    if runtime == "onnxruntime" and missing:
        raise click.UsageError(
            f"the bundle has no drafter graph for (W, L) {missing}; re-export with "
            f"--beam-width {beam_width} --beam-length {beam_length}"
        )
    if runtime == "torch" and wanted:
        beams = [BeamShape(w, n) for w, n in sorted(wanted)]
    if not beams:
        raise click.UsageError("no beam shape selected; check --beam-width/--beam-length")
    texts = read_prompts(prompts_file) if prompts_file else list(DEFAULT_PROMPTS)
    prompts = [pipe.encode(t, chat=chat) for t in texts]
    lookups = PROMPT_LOOKUP_SETTINGS[prompt_lookup]
    floors = _parse_probs(min_draft_prob, "--min-draft-prob")
    total = (repeats + 1) * (len(beams) * len(lookups) * len(floors) + 1)
    with Progress(transient=True) as progress:
        task = progress.add_task("benchmarking", total=total)
        spec = speculative_grid(
            beams,
            max_new_tokens=max_new_tokens,
            packing=bundle.packing,
            prompt_lookup=lookups,
            min_draft_prob=floors,
        )
        results = run_configs(
            rt,
            prompts,
            spec,
            repeats=repeats,
            eos_token_ids=pipe.eos_token_ids,
            on_run=lambda name: progress.update(task, advance=1, description=name),
        )
    implementation = getattr(rt, "implementation", "eager")
    title = (
        f"{bundle.root.name}: {rt.name} ({implementation}, {device}), "
        f"{len(prompts)} prompts x {max_new_tokens} tokens"
    )
    click.echo(title)
    click.echo(markdown_table(results))
    payload = {
        "bundle": str(bundle.root),
        "runtime": rt.name,
        "implementation": implementation,
        "device": device,
        "dtype": bundle.dtype,
        "prompts": len(prompts),
        "max_new_tokens": max_new_tokens,
        "repeats": repeats,
        "results": results,
    }
    if json_out:
        save_json(payload, json_out)
    if plot_out:
        plot_speedup(results, plot_out, title=title)


@main.command("train-drafter")
@click.option("--base", "base_path", required=True, type=click.Path(), help="Frozen base model.")
@click.option(
    "--data",
    "data_paths",
    required=True,
    multiple=True,
    type=click.Path(),
    help="Text or JSONL(.gz) file; repeat for more. JSONL text from --text-field.",
)
@click.option("--out", "out_dir", required=True, type=click.Path(), help="Drafter folder.")
@click.option(
    "--mode",
    type=click.Choice(["ce", "distill"]),
    default="distill",
    show_default=True,
    help="ce: Apple's recipe, the data's next tokens; distill: the base's own answers to the "
    "data's records as prompts (+ KL with --kl-weight).",
)
@click.option("--steps", type=click.IntRange(min=1), help="Optimizer steps (wins over --epochs).")
@click.option("--epochs", type=click.FloatRange(min=0, min_open=True), help="[1] Passes over data.")
@click.option(
    "--batch-size", default=256, show_default=True, type=click.IntRange(min=1),
    help="Context positions per step.",
)  # fmt: skip
@click.option(
    "--seq-len", default=128, show_default=True, type=click.IntRange(min=2),
    help="ce: chunk length; distill: most tokens the base generates per prompt.",
)  # fmt: skip
@click.option("--lr", default=3e-3, show_default=True, type=click.FloatRange(min=0, min_open=True))
@click.option(
    "--predict-tokens", default=5, show_default=True, type=click.IntRange(min=1),
    help="Drafter steps trained per context (beam length - 1).",
)  # fmt: skip
@click.option("--exit-dim", type=click.IntRange(min=1), help="Drafter width [base hidden size].")
@click.option("--num-layers", default=1, show_default=True, type=click.IntRange(min=0))
@click.option(
    "--draft-vocab", default=8192, show_default=True, type=click.IntRange(min=0),
    help="Tokens the head can draft (the most frequent targets); 0 = the full vocab.",
)  # fmt: skip
@click.option("--kl-weight", default=0.0, show_default=True, type=click.FloatRange(min=0))
@click.option("--chat", is_flag=True, help="distill: wrap each record in the chat template.")
@click.option("--text-field", help="JSONL field holding the text [text, prompt or content].")
@click.option("--max-records", type=click.IntRange(min=1), help="distill: use the first N only.")
@click.option("--eval-every", default=0, show_default=True, type=click.IntRange(min=0))
@click.option("--save-every", default=0, show_default=True, type=click.IntRange(min=0))
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--resume", is_flag=True, help="Continue the checkpoint in --out.")
@click.option("--cache-dir", type=click.Path(), help="Base outputs cache [~/.cache/redrafter].")
def train_drafter_cmd(**kw: Any) -> None:
    """Train a drafter for a frozen base model; saves Apple's layout to --out."""
    from pathlib import Path

    from redrafter.train.recipe import train_from_files
    from redrafter.train.trainer import TrainOptions

    options = TrainOptions(
        mode=kw["mode"],
        steps=kw["steps"],
        epochs=kw["epochs"],
        batch_size=kw["batch_size"],
        seq_len=kw["seq_len"],
        lr=kw["lr"],
        predict_tokens=kw["predict_tokens"],
        exit_dim=kw["exit_dim"],
        num_layers=kw["num_layers"],
        draft_vocab=kw["draft_vocab"] or None,
        kl_weight=kw["kl_weight"],
        eval_every=kw["eval_every"],
        save_every=kw["save_every"],
        seed=kw["seed"],
    )
    result, _ = train_from_files(
        kw["base_path"],
        kw["data_paths"],
        kw["out_dir"],
        options,
        chat=kw["chat"],
        field=kw["text_field"],
        max_records=kw["max_records"],
        resume=kw["resume"],
        cache_dir=Path(kw["cache_dir"]) if kw["cache_dir"] else None,
        log=lambda m: click.echo(m, err=True),
    )
    n = sum(p.numel() for p in result.drafter.parameters())
    tps = result.final_eval.get("eval_tokens_per_step")
    click.echo(
        f"wrote {kw['out_dir']} ({n / 1e6:.2f}M parameters, {result.steps} steps in "
        f"{result.seconds:.0f} s" + (f", held-out {tps:.2f} tokens/step" if tps else "") + ")"
    )


@main.command("init-drafter")
@click.option(
    "--base",
    "base_path",
    required=True,
    type=click.Path(),
    help="Base model the drafter must fit (HF folder, .gguf or llama2.c .bin).",
)
@click.option("--out", "out_dir", required=True, type=click.Path(), help="Output folder.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--exit-dim", type=click.IntRange(min=1), help="Drafter width (default 2*hidden).")
@click.option(
    "--num-layers",
    default=1,
    show_default=True,
    type=click.IntRange(min=0),
    help="Residual blocks in the drafter head.",
)
def init_drafter_cmd(
    base_path: str, out_dir: str, seed: int, exit_dim: int | None, num_layers: int
) -> None:
    """Write a randomly initialised drafter (Apple's layout) that fits a base model."""
    from redrafter.models.checkpoints import init_drafter, load_base_config, save_drafter

    config = load_base_config(base_path)
    drafter = init_drafter(config, seed=seed, exit_dim=exit_dim, num_layers=num_layers)
    save_drafter(drafter, out_dir)
    n = sum(p.numel() for p in drafter.parameters())
    click.echo(f"wrote {out_dir} ({n / 1e6:.2f}M parameters, exit_dim {drafter.config.exit_dim})")


if __name__ == "__main__":
    sys.exit(main())
