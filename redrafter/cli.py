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
    required=True,
    type=click.Path(),
    help="Base model: HF folder, .gguf file or llama2.c .bin.",
)
@click.option(
    "--drafter",
    "drafter_path",
    type=click.Path(),
    help="ReDrafter drafter folder (Apple's layout). Needed unless --autoregressive.",
)
@click.option("--prompt", help="Prompt text.")
@click.option("--prompt-ids", help="Prompt as comma-separated token ids, e.g. 1,2,3.")
@click.option("--chat", is_flag=True, help="Wrap the prompt in the model's chat template.")
@click.option("--max-new-tokens", default=64, show_default=True, type=click.IntRange(min=1))
@click.option("--beam-width", default=4, show_default=True, type=click.IntRange(min=1))
@click.option("--beam-length", default=4, show_default=True, type=click.IntRange(min=2))
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
    default="dedup",
    show_default=True,
    help="Tree packing: dedup shared prefixes, or keep all W*L.",
)
@click.option("--autoregressive", is_flag=True, help="Run the plain autoregressive baseline.")
@click.option("--runtime", type=click.Choice(["torch"]), default="torch", show_default=True)
@click.option("--stats", is_flag=True, help="Print tokens/step, tokens/s and acceptance to stderr.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
def generate(
    base_path: str,
    drafter_path: str | None,
    prompt: str | None,
    prompt_ids: str | None,
    chat: bool,
    max_new_tokens: int,
    beam_width: int,
    beam_length: int,
    greedy: bool,
    temperature: float | None,
    seed: int | None,
    acceptance: str,
    packing: str,
    autoregressive: bool,
    runtime: str,
    stats: bool,
    as_json: bool,
) -> None:
    """Generate text with speculative decoding (or the autoregressive baseline)."""
    from redrafter.pipeline import GenerationOptions, from_checkpoints

    if (prompt is None) == (prompt_ids is None):
        raise click.UsageError("give exactly one of --prompt TEXT or --prompt-ids 1,2,3")
    if greedy and temperature is not None:
        raise click.UsageError("--greedy and --temperature exclude each other")
    if not autoregressive and drafter_path is None:
        raise click.UsageError("speculative decoding needs --drafter (or pass --autoregressive)")
    if chat and prompt_ids is not None:
        raise click.UsageError("--chat applies to --prompt text, not --prompt-ids")
    options = GenerationOptions(
        max_new_tokens=max_new_tokens,
        beam=BeamShape(beam_width, beam_length),
        sampling=SamplingParams(temperature=temperature or 0.0, seed=seed, acceptance=acceptance),  # type: ignore[arg-type]
        packing=packing,  # type: ignore[arg-type]
        speculative=not autoregressive,
    )
    pipe = from_checkpoints(
        base_path, drafter=None if autoregressive else drafter_path, runtime=runtime
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
    summary = summarize(steps, beam_length=options.beam.length if options.speculative else None)
    summary["wall_seconds"] = wall
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
        f"[{mode}] {s['generated_tokens']} tokens in {s['steps']} steps: "
        f"{s['tokens_per_step']:.2f} tokens/step, {s['tokens_per_second']:.1f} tokens/s "
        f"(prefill {1000 * s['prefill_seconds']:.0f} ms)",
        "time by phase: "
        + ", ".join(f"{k} {1000 * v:.0f} ms" for k, v in s["seconds_by_phase"].items()),
    ]
    if s["acceptance_histogram"]:
        lines.append("accepted drafts per step (0..L-1): " + str(s["acceptance_histogram"]))
    click.echo("\n".join(lines), err=True)


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
