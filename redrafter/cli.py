"""The `redrafter` command line: a thin layer over the library. Bad input prints one line and
exits with code 2 (click's own usage errors already do).

Options that several commands take are declared once, in `_SHARED` (a command adds its own help,
default or type through `_option`); what the commands do lives in the library
(`redrafter.pipeline`, `redrafter.bench`)."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click

from redrafter.config import BeamShape
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


# -- parsing comma lists ---------------------------------------------------------------------
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
    """'1, 2,3' -> [1, 2, 3] (a prompt's token ids), or a usage error."""
    try:
        ids = [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a comma-separated list of integers") from None
    if not ids:
        raise click.BadParameter("give at least one token id, e.g. 1,2,3")
    return ids


def _check_utf8(text: str, flag: str) -> None:
    """A usage error (exit 2) when command-line text is not valid UTF-8: Python hands such
    bytes over as lone surrogates, which no tokenizer can encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = text[e.start : e.end].encode("utf-8", "surrogateescape")
        raise click.BadParameter(
            f"not valid UTF-8 text (byte {bad[:1].hex()} at character {e.start}); pass UTF-8 "
            "text, or the token ids with --prompt-ids",
            param_hint=flag,
        ) from None


def _check_writable(path: str | None, flag: str) -> None:
    """A usage error (exit 2) naming `path` unless a file can be written there: checked before
    a long run, not after it."""
    if path is None:
        return
    target = Path(path)
    parent = target.parent if str(target.parent) else Path(".")
    if target.is_dir():
        problem = "is a directory"
    elif not parent.is_dir():
        problem = f"its folder {parent} does not exist"
    elif target.exists() and not os.access(target, os.W_OK):
        problem = "is not writable"
    elif not target.exists() and not os.access(parent, os.W_OK | os.X_OK):
        problem = f"its folder {parent} is not writable"
    else:
        return
    raise click.BadParameter(
        f"cannot write {path}: {problem}; pass a file path in a writable folder", param_hint=flag
    )


def _read_id_prompts(values: tuple[str, ...]) -> list[list[int]]:
    """Repeated --prompt-ids values as id prompts: each '1,2,3' is one prompt; '@FILE' reads
    FILE, one comma-separated id list per non-blank line."""
    prompts: list[list[int]] = []
    for value in values:
        if not value.startswith("@"):
            prompts.append(_parse_ids(value))
            continue
        path = Path(value[1:])
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise click.BadParameter(
                f"cannot read {path} ({e}); pass a UTF-8 text file with one comma-separated id "
                "list per line",
                param_hint="--prompt-ids",
            ) from None
        found = [_parse_ids(line) for line in lines if line.strip()]
        if not found:
            raise click.BadParameter(
                f"{path} has no id prompts; put one comma-separated id list per line",
                param_hint="--prompt-ids",
            )
        prompts += found
    return prompts


@contextlib.contextmanager
def _stage_progress(what: str) -> Iterator[Callable[[str], None]]:
    """A progress callback for a long job reporting finished stages: on a terminal, a rich
    spinner with the elapsed time above the finished stages; quiet when stderr is not a TTY."""
    from rich.console import Console

    console = Console(stderr=True)
    if not console.is_terminal:
        yield lambda message: None
        return
    start = time.perf_counter()
    with console.status(f"{what}...") as status:

        def report(message: str) -> None:
            console.print(f"[dim]{time.perf_counter() - start:6.1f} s[/dim]  {message}")
            status.update(f"{what} (last: {message})...")

        yield report


def _ints(minimum: int) -> Callable[[click.Context, click.Parameter, Any], Any]:
    """A click callback: a comma list (str) -> list[int], each >= minimum; None stays None."""

    def parse(ctx: click.Context, param: click.Parameter, value: str | None) -> list[int] | None:
        return None if value is None else _parse_ints(value, param.opts[0], minimum=minimum)

    return parse


def _probs(ctx: click.Context, param: click.Parameter, value: str) -> list[float]:
    """A click callback: a comma list (str) -> list[float], each in [0, 1)."""
    return _parse_probs(value, param.opts[0])


# -- options several commands take, each declared once -------------------------------------------
# name -> (flag and parameter name, click attributes); `_option` adds a command's own.
_PATH = click.Path()
_PROMPT_IDS_LIST = (  # validate and bench: several prompts
    "A prompt as token ids, e.g. 1,2,3, or @FILE (one id list per line); repeatable. "
    "Instead of --prompts, e.g. for a bundle without a tokenizer."
)
_SHARED: dict[str, tuple[tuple[str, ...], dict[str, Any]]] = {
    "base": (("--base", "base_path"), {"type": _PATH}),
    "drafter": (("--drafter", "drafter_path"), {"type": _PATH}),
    "bundle": (
        ("--bundle", "bundle_path"),
        {"type": _PATH, "required": True, "help": "Bundle directory."},
    ),
    "out": (("--out", "out_dir"), {"type": _PATH, "required": True}),
    "runtime": (("--runtime",), {}),
    "device": (("--device",), {"choices": ["cpu", "cuda"], "default": "cpu"}),
    "dtype": (("--dtype",), {}),
    "prompts": (
        ("--prompts", "prompts_file"),
        {
            "type": _PATH,
            "help": "Prompts file: text, one prompt per line (write a newline inside a prompt "
            "as \\n), or .jsonl with a 'prompt' or 'text' field per line.",
        },
    ),
    "prompt-ids": (
        ("--prompt-ids",),
        {"help": "Prompt as comma-separated token ids, e.g. 1,2,3."},
    ),
    "threads": (
        ("--threads",),
        {
            "type": click.IntRange(min=1),
            "help": "Intra-op threads of the runtime [torch: half the usable cores, at most 8; "
            "onnxruntime: its default, one per physical core]. 1 is fastest on busy shared cores.",
        },
    ),
    "allow-cpu-fallback": (
        ("--allow-cpu-fallback",),
        {
            "is_flag": True,
            "help": "With --device cuda: run ONNX Runtime on the CPU (with a warning) when its "
            "CUDA provider is unavailable, instead of exiting with an error.",
        },
    ),
    "chat": (("--chat",), {"is_flag": True, "help": "Wrap each prompt in the chat template."}),
    "max-new-tokens": (("--max-new-tokens",), {"type": click.IntRange(min=1)}),
    # Comma lists (export, bench) parsed to list[int]; generate takes one int instead.
    "beam-width": (("--beam-width",), {"callback": _ints(1)}),
    "beam-length": (("--beam-length",), {"callback": _ints(2)}),
    "packing": (("--packing",), {"choices": ["dedup", "full"]}),
    "prompt-lookup": (("--prompt-lookup",), {}),
    "min-draft-prob": (("--min-draft-prob",), {}),
    "lookup-min-ngram": (
        ("--lookup-min-ngram",),
        {
            "type": click.IntRange(1, 32),
            "default": 1,
            "help": "Prompt lookup drafts only from suffix matches of at least this many tokens. "
            "A lone recurring token predicts its old continuation poorly: 2 pays where tree "
            "tokens are dear, e.g. an int4 bundle on a CPU (docs/algorithm.md).",
        },
    ),
    "lookup-span": (
        ("--lookup-span",),
        {
            "type": click.IntRange(1, 64),
            "default": 4,
            "help": "Prompt-lookup drafts per matched token: a suffix match of n tokens drafts "
            "span x n of what followed it.",
        },
    ),
    "lookup-max-ngram": (
        ("--lookup-max-ngram",),
        {
            "type": click.IntRange(1, 32),
            "default": 3,
            "help": "The longest suffix match prompt lookup seeks: a match of n tokens drafts "
            "lookup-span x n, so a longer limit drafts further into a repeated passage.",
        },
    ),
    "seed": (("--seed",), {"type": int}),
    "json": (("--json", "json_out"), {"type": _PATH}),
    "exit-dim": (("--exit-dim",), {"type": click.IntRange(min=1)}),
    "num-layers": (("--num-layers",), {"type": click.IntRange(min=0), "default": 1}),
}


def _option(
    name: str, help: str | None = None, *, dest: str | None = None, **attrs: Any
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The shared option `name` of `_SHARED` as a click decorator. `help` (if given) and
    `attrs` are this command's; `dest` renames the parameter; `choices` becomes a
    `click.Choice`; a flag drops the shared type; a default other than None shows in --help."""
    decls, shared = _SHARED[name]
    attrs = {**shared, **attrs}
    if help is not None:
        attrs["help"] = help
    if attrs.get("is_flag"):
        attrs.pop("type", None)
    if "choices" in attrs:
        attrs["type"] = click.Choice(list(attrs.pop("choices")))
    if attrs.get("default") is not None and not attrs.get("is_flag"):
        attrs.setdefault("show_default", True)
    return click.option(*(decls[:1] + ((dest,) if dest else decls[1:])), **attrs)


# -- commands ------------------------------------------------------------------------------------
@main.command()
@_option("base", "Base model: HF folder, .gguf file or llama2.c .bin (torch runtime).")
@_option("drafter", "ReDrafter drafter folder (Apple's layout), for --base.")
@_option(
    "bundle",
    "An exported bundle (from `redrafter export`), instead of --base/--drafter.",
    required=False,
)
@click.option("--prompt", help="Prompt text.")
@_option("prompt-ids")
@_option(
    "prompts",
    "Several prompts, decoded as one batch: a text file, one prompt per line (write a newline "
    "inside a prompt as \\n), or .jsonl with a 'prompt' or 'text' field per line (the format "
    "of validate/bench --prompts). Prints each output (--json: a list).",
)
@click.option(
    "--messages",
    "messages_file",
    type=_PATH,
    help='A chat to answer: a JSON list of {"role": ..., "content": ...} messages (roles '
    "system, user, assistant; ending with a user turn), or JSONL with one message per line.",
)
@click.option(
    "--system",
    help="A system message put before the prompt(s), which then go into the chat template.",
)
@_option("chat", "Wrap the prompt(s) in the model's chat template (as one user turn).")
@_option("max-new-tokens", default=64)
@_option(
    "beam-width",
    "Beams drafted per step [4, or the bundle's].",
    type=click.IntRange(min=1),
    callback=None,
)
@_option(
    "beam-length",
    "Tokens per beam, counting the LLM's own [4, or the bundle's].",
    type=click.IntRange(min=2),
    callback=None,
)
@click.option("--greedy", is_flag=True, help="Greedy decoding (the default without --temperature).")
@click.option(
    "--temperature",
    type=click.FloatRange(min=0, min_open=True),
    help="Sample at this temperature (top-50 warped unless --top-k says otherwise).",
)
# Plain floats and ints, not click ranges: SamplingParams checks them, so a bad value is one
# `error:` line (exit 2) before any model loads, like every other library-checked value.
@click.option(
    "--top-k",
    type=int,
    help="With --temperature: sample from the LLM's k most probable tokens [50, Apple's].",
)
@click.option(
    "--top-p",
    type=float,
    default=1.0,
    show_default=True,
    help="With --temperature: nucleus sampling, the most probable tokens up to this "
    "cumulative probability, in (0, 1] (after the temperature and --top-k).",
)
@click.option(
    "--min-p",
    type=float,
    default=0.0,
    show_default=True,
    help="With --temperature: drop tokens less probable than this times the most probable "
    "one, in [0, 1) (after --top-p). Speculative decoding with --acceptance exact keeps "
    "every control exact.",
)
@click.option(
    "--repetition-penalty",
    type=float,
    default=1.0,
    show_default=True,
    help="Divide the logits of tokens already in the prompt or output by this (multiply when "
    "negative), > 0; greedy too (transformers' repetition_penalty).",
)
@click.option(
    "--presence-penalty",
    type=float,
    default=0.0,
    show_default=True,
    help="Subtract this from the logits of tokens already generated, in [-2, 2]; greedy too.",
)
@click.option(
    "--frequency-penalty",
    type=float,
    default=0.0,
    show_default=True,
    help="Subtract this times each token's count in the output so far, in [-2, 2]; greedy too.",
)
@click.option(
    "--logprobs",
    is_flag=True,
    help="With --json: each token's log-probability under the controlled distribution.",
)
@_option("seed", "Random seed for sampling.")
@click.option(
    "--acceptance",
    type=click.Choice(["exact", "apple"]),
    default="exact",
    show_default=True,
    help="Sampling acceptance rule.",
)
@_option(
    "packing", "Tree packing: dedup shared prefixes, or keep all W*L [dedup, or the bundle's]."
)
@_option(
    "prompt-lookup",
    "Add a prompt-lookup draft (the text's own n-gram continuation) as one more beam.",
    is_flag=True,
)
@_option(
    "min-draft-prob",
    "Cut each drafter beam before its first draft whose cumulative draft probability is "
    "below this (fewer tree tokens: pays off where verification is compute-bound, e.g. CPUs).",
    type=click.FloatRange(0.0, 1.0, max_open=True),
    default=0.0,
)
@_option("lookup-span")
@_option("lookup-min-ngram")
@_option("lookup-max-ngram")
@click.option(
    "--speculate-max-rows",
    type=click.IntRange(min=1),
    help="With --prompts: draft and verify trees only while at most this many prompts are "
    "still decoding; steps with more decode one token per prompt without the drafter (on a "
    "CPU a batch's trees cost more than they accept: 1 is usually fastest) [no limit].",
)
@click.option(
    "--autoregressive",
    is_flag=True,
    help="Run the plain autoregressive baseline (the default for a model without a drafter).",
)
@_option(
    "runtime",
    "Runtime [torch for --base, onnxruntime for --bundle]. coreml: Apple's runtime "
    "(macOS 15+); coreml-mil: the converted Core ML program evaluated in numpy (slow; checks "
    "the conversion, not Apple's runtime or the Neural Engine).",
    choices=["torch", "onnxruntime", "coreml", "coreml-mil"],
)
@_option("device", "Device for the runtime (cuda: ORT CUDA provider, or torch on CUDA).")
@_option("allow-cpu-fallback")
@_option("threads")
@_option(
    "dtype",
    "With --base: the torch runtime's weights and KV cache [float32] (half: for CUDA). "
    "A bundle has the dtype it was exported in.",
    choices=["float32", "float16", "bfloat16"],
)
@click.option(
    "--stop",
    multiple=True,
    help="Stop as soon as the text contains TEXT (repeatable); the output ends before it.",
)
@click.option(
    "--stop-id",
    "stop_ids",
    type=int,
    multiple=True,
    help="Stop at this token id, kept (repeatable).",
)
@click.option("--ignore-eos", is_flag=True, help="Do not stop at EOS (--stop-id still stops).")
@click.option("--stats", is_flag=True, help="Print tokens/step, tokens/s and acceptance to stderr.")
@_option("json", "Print one JSON object instead of text.", dest="as_json", is_flag=True)
def generate(
    base_path: str | None,
    drafter_path: str | None,
    bundle_path: str | None,
    prompt: str | None,
    prompt_ids: str | None,
    prompts_file: str | None,
    messages_file: str | None,
    system: str | None,
    chat: bool,
    max_new_tokens: int,
    beam_width: int | None,
    beam_length: int | None,
    greedy: bool,
    temperature: float | None,
    top_k: int | None,
    top_p: float,
    min_p: float,
    repetition_penalty: float,
    presence_penalty: float,
    frequency_penalty: float,
    logprobs: bool,
    seed: int | None,
    acceptance: str,
    packing: str | None,
    prompt_lookup: bool,
    min_draft_prob: float,
    lookup_span: int,
    lookup_min_ngram: int,
    lookup_max_ngram: int,
    speculate_max_rows: int | None,
    autoregressive: bool,
    runtime: str | None,
    device: str,
    allow_cpu_fallback: bool,
    threads: int | None,
    dtype: str | None,
    stop: tuple[str, ...],
    stop_ids: tuple[int, ...],
    ignore_eos: bool,
    stats: bool,
    as_json: bool,
) -> None:
    """Generate text with speculative decoding (or the autoregressive baseline; a model
    without a drafter decodes autoregressively, saying so on stderr)."""
    from redrafter.decoding.options import DecodeOptions
    from redrafter.pipeline import (
        check_options,
        check_stops,
        decode_options,
        open_pipeline,
        sampling_params,
    )

    # Checked before any model loads, so a bad value is one `error:` line at once.
    check_stops(stop)
    DecodeOptions(stop_token_ids=stop_ids, ignore_eos=ignore_eos)

    # Checked before anything else, so a bad --top-p is reported without loading a model.
    sampling_params(
        temperature=temperature,
        seed=seed,
        acceptance=acceptance,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        repetition_penalty=repetition_penalty,
        presence_penalty=presence_penalty,
        frequency_penalty=frequency_penalty,
    )
    if logprobs and not as_json:
        raise click.UsageError("--logprobs needs --json (the log-probs go in its records)")
    if greedy and temperature is not None:
        raise click.UsageError("--greedy and --temperature exclude each other")
    # Read and check the prompts before any model loads: a bad file is one line at once.
    the_prompts, texts = _generate_prompts(
        prompt, prompt_ids, prompts_file, messages_file, system, chat
    )
    pipe = open_pipeline(
        base=base_path,
        drafter=drafter_path,
        bundle=bundle_path,
        runtime=runtime,
        device=device,
        dtype=dtype,
        autoregressive=autoregressive,
        threads=threads,
        allow_fallback=allow_cpu_fallback,
    )
    # Encoded now, so a prompt the tokenizer refuses (a chat without a chat template) is one
    # line before any note or output.
    the_prompts = [pipe.encode(p, chat=chat) for p in the_prompts]
    if not autoregressive and not pipe.defaults.speculative:
        autoregressive = True
        click.echo(
            "note: this model has no drafter; decoding autoregressively (pass --drafter, or "
            "export the bundle with --drafter, for speculative decoding)",
            err=True,
        )
    options = decode_options(
        pipe.defaults,
        max_new_tokens=max_new_tokens,
        beam_width=beam_width,
        beam_length=beam_length,
        temperature=temperature,
        seed=seed,
        acceptance=acceptance,
        packing=packing,
        speculative=not autoregressive,
        prompt_lookup=prompt_lookup,
        min_draft_prob=min_draft_prob,
        lookup_span=lookup_span,
        lookup_min_ngram=lookup_min_ngram,
        lookup_max_ngram=lookup_max_ngram,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        stop_token_ids=stop_ids,
        ignore_eos=ignore_eos,
        repetition_penalty=repetition_penalty,
        presence_penalty=presence_penalty,
        frequency_penalty=frequency_penalty,
        logprobs=logprobs,
    ).replace(speculate_max_rows=speculate_max_rows)
    check_options(pipe.runtime, options)  # e.g. a beam shape the bundle lacks: before any output
    if texts is not None:
        _run_batch(pipe, the_prompts, texts, options, show_stats=stats, as_json=as_json, stop=stop)
        return
    # The prompt is token ids by now (its chat template, if any, already applied).
    _run(pipe, the_prompts[0], options, chat=False, show_stats=stats, as_json=as_json, stop=stop)


def _generate_prompts(
    prompt: str | None,
    prompt_ids: str | None,
    prompts_file: str | None,
    messages_file: str | None,
    system: str | None,
    chat: bool,
) -> tuple[list[Any], list[str] | None]:
    """`generate`'s prompts from exactly one of --prompt, --prompt-ids, --prompts and
    --messages, with --system (if given) put first as a system turn of each: (the prompts, as
    `Pipeline.encode` takes them; the prompts file's texts, or None when not decoding one)."""
    from redrafter.models.chat import Message, as_messages, read_messages
    from redrafter.validate.prompts import read_prompts

    given = [prompt, prompt_ids, prompts_file, messages_file]
    if sum(v is not None for v in given) != 1:
        raise click.UsageError(
            "give exactly one of --prompt TEXT, --prompt-ids 1,2,3, --prompts FILE or "
            "--messages FILE"
        )
    if prompt_ids is not None and (chat or system is not None):
        raise click.UsageError("--chat and --system apply to text prompts, not --prompt-ids")
    if system is not None:
        _check_utf8(system, "--system")
    if prompt_ids is not None:
        return [_parse_ids(prompt_ids)], None
    if messages_file is not None:
        return [as_messages(read_messages(messages_file), system=system)], None
    if prompt is not None:
        _check_utf8(prompt, "--prompt")
        texts = [prompt]
    else:
        texts = read_prompts(prompts_file or "")
    prompts: list[Any] = list(texts)
    if system is not None:  # a chat of one user turn after the system one
        prompts = [as_messages([Message("user", t)], system=system) for t in texts]
    return prompts, (texts if prompts_file is not None else None)


def _run_batch(
    pipe: Any,
    prompts: list[list[int]],
    texts: list[str],
    options: Any,
    *,
    show_stats: bool,
    as_json: bool,
    stop: tuple[str, ...] = (),
) -> None:
    """Decode several prompts (the token ids of `texts`) as one batch (`Pipeline.generate`,
    rows of any lengths), then print each output under a `==> prompt N <==` line, or (--json)
    one JSON list of `generation_record`s, each with its `prompt` text; the stats are the
    whole batch's."""
    from redrafter.pipeline import generation_record, implementation_of, stats_text

    start = time.perf_counter()
    out = pipe.generate(prompts, options, stop=stop)
    summary = {  # what `run_stats` adds, for a decode run by `generate`
        **out.stats,
        "wall_seconds": time.perf_counter() - start,
        "runtime": pipe.runtime.name,
        "implementation": implementation_of(pipe.runtime),
    }
    outputs = out.texts
    assert outputs is not None  # text prompts were encoded, so the pipeline has a tokenizer
    if as_json:
        records = [
            {"prompt": text, **generation_record(pipe, ids, summary, text=output)}
            for text, ids, output in zip(texts, out.token_ids, outputs, strict=True)
        ]
        if out.logprobs is not None:
            for record, lp in zip(records, out.logprobs, strict=True):
                record["logprobs"] = lp
        click.echo(json.dumps(records))
        return
    for n, output in enumerate(outputs, 1):
        if n > 1:
            click.echo()
        click.echo(f"==> prompt {n} <==")
        click.echo(output)
    if show_stats:
        click.echo(stats_text(summary, options), err=True)


def _run(
    pipe: Any,
    prompt: Any,
    options: Any,
    *,
    chat: bool,
    show_stats: bool,
    as_json: bool,
    stop: tuple[str, ...] = (),
) -> None:
    """Stream one prompt's generation to stdout (text, or ids without a tokenizer), then the
    JSON object (--json) or the stats (--stats, to stderr). `stop`: stop strings, ending the
    decode at the first one (`Pipeline.generate`'s rule for the text and ids)."""
    from redrafter.errors import TokenizerError
    from redrafter.models.tokenizer import StreamDecoder
    from redrafter.pipeline import StopScan, generation_record, run_stats, stats_text

    if stop and pipe.tokenizer is None:
        raise TokenizerError("--stop needs a tokenizer; use --stop-id for token ids")
    scan = StopScan(pipe.tokenizer, stop) if stop else None
    stream = (
        None
        if as_json or pipe.tokenizer is None or scan is not None
        else StreamDecoder(pipe.tokenizer, skip_special_tokens=True)
    )
    steps, ids, sent = [], [], 0
    start = time.perf_counter()
    decoding = pipe.stream([prompt], options, chat=chat)
    try:
        for step in decoding:
            steps.append(step)
            ids.extend(step.new_tokens[0])
            if scan is not None:
                scan.push(step.new_tokens[0])
                if not as_json:  # only text that can no longer turn into a stop
                    click.echo(scan.text[sent : scan.safe_length()], nl=False)
                    sent = max(sent, scan.safe_length())
                    sys.stdout.flush()
                if scan.stopped:
                    break  # closing the stream below ends the decode here
            elif stream is not None:
                click.echo(stream.push(step.new_tokens[0]), nl=False)
                sys.stdout.flush()  # stream as tokens are accepted
            elif not as_json:
                click.echo(" ".join(map(str, step.new_tokens[0])) + " ", nl=False)
    finally:
        decoding.close()
    summary = run_stats(pipe, steps, options, wall_seconds=time.perf_counter() - start)
    if scan is not None:
        scan.finish()
        ids = scan.kept_ids()
    if as_json:
        text = None if scan is None else scan.text
        record = generation_record(pipe, ids, summary, text=text)
        if options.logprobs:  # cut with the ids where a stop string ended them
            record["logprobs"] = sum((s.logprobs[0] for s in steps), [])[: len(ids)]
        click.echo(json.dumps(record))
        return
    if scan is not None:
        click.echo(scan.text[sent:], nl=False)
    if stream is not None:
        click.echo(stream.flush(), nl=False)
    click.echo()
    sys.stdout.flush()
    if show_stats:
        click.echo(stats_text(summary, options), err=True)


@main.command()
@_option("base", "Base model: HF folder, .gguf file or llama2.c .bin.", required=True)
@_option("drafter", "ReDrafter drafter folder (Apple's layout); omit for an autoregressive bundle.")
@_option("out", "Bundle directory.")
@click.option(
    "--target",
    default="onnx",
    show_default=True,
    help="Comma-separated targets: onnx, coreml (Core ML is float16, batch 1).",
)
@_option("dtype", "ONNX weights and caches.", choices=["float32", "float16"], default="float32")
@click.option(
    "--coreml-dtype",
    type=click.Choice(["float32", "float16"]),
    default="float16",
    show_default=True,
    help="Core ML compute precision.",
)
@_option(
    "beam-width",
    "Beam width(s) of the drafter graphs, e.g. 4 or 1,2,4 (the first is the default).",
    default="4",
)
@_option(
    "beam-length",
    "Beam length(s), counting the LLM's token, e.g. 4 or 3,4,5 (the first is the default).",
    default="4",
)
@_option("packing", default="dedup")
@click.option(
    "--quantize",
    type=click.Choice(["none", "int4", "int8"]),
    default="none",
    show_default=True,
    help="Weight-only quantization of the ONNX graphs (MatMulNBits; int4 also the embedding); "
    "activations, KV cache and attention stay --dtype.",
)
@click.option(
    "--quantize-method",
    type=click.Choice(["rtn", "hqq", "gguf"]),
    default="rtn",
    show_default=True,
    help="--quantize int4 algorithm (ONNX): rtn (round to nearest per block), hqq (fitted "
    "float zero points) or gguf (a GGUF base's own Q4_0/Q4_1/Q8_0 blocks, kept exactly, not "
    "rounded twice; other types by rtn). docs/parity.md compares their drift.",
)
@click.option(
    "--block-size",
    type=int,
    default=32,
    show_default=True,
    help="--quantize block size (a power of two >= 16).",
)
@click.option(
    "--symmetric/--asymmetric",
    default=True,
    show_default=True,
    help="--quantize: symmetric blocks, or with a zero point per block.",
)
@click.option(
    "--accuracy-level",
    type=int,
    default=1,
    show_default=True,
    help="--quantize: MatMulNBits compute type (0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8). 4 "
    "decodes ~30 % faster per token on CPUs but rounds one-token and multi-token calls "
    "differently, so speculative tokens are no longer identical to autoregressive ones.",
)
@click.option("--overwrite", is_flag=True, help="Replace an existing bundle at --out.")
def export(
    base_path: str,
    drafter_path: str | None,
    out_dir: str,
    target: str,
    dtype: str,
    coreml_dtype: str,
    beam_width: list[int],
    beam_length: list[int],
    packing: str,
    quantize: str,
    quantize_method: str,
    block_size: int,
    symmetric: bool,
    accuracy_level: int,
    overwrite: bool,
) -> None:
    """Export checkpoints to a bundle (ONNX graphs with redrafter::TreeAttention, tokenizer,
    checksummed manifest), written to a temp dir and renamed into place."""
    from redrafter.build import ExportOptions, export_bundle
    from redrafter.export.quantize import quantization

    beams = [BeamShape(w, n) for w in beam_width for n in beam_length]
    q = None
    if quantize != "none":
        q = quantization(
            quantize,
            block_size=block_size,
            symmetric=symmetric,
            accuracy_level=accuracy_level,
            method=quantize_method,
        )
    options = ExportOptions(
        targets=tuple(t.strip() for t in target.split(",") if t.strip()),
        dtype=dtype,
        coreml_dtype=coreml_dtype,
        beam=beams[0],
        extra_beams=tuple(beams[1:]),
        packing=packing,  # type: ignore[arg-type]
        quantization=q,
    )
    with _stage_progress(f"exporting {out_dir}") as progress:
        bundle = export_bundle(
            base_path,
            out_dir,
            drafter_path=drafter_path,
            options=options,
            overwrite=overwrite,
            progress=progress,
        )
    m = bundle.manifest
    parity = "ok" if m.parity is not None and m.parity.passed else "FAILED"
    click.echo(
        f"wrote bundle {out_dir} ({m.total_bytes / 1e6:.1f} MB, "
        f"{len(m.files)} files, export-time parity {parity})"
    )


def _prompt_ids(
    pipe: Any,
    prompts_file: str | None,
    chat: bool,
    *,
    synthetic_vocab: int | None = None,
    id_prompts: tuple[str, ...] = (),
) -> list[list[int]]:
    """--prompt-ids (token ids, no tokenizer needed), else --prompts (or the default prompts)
    as token ids, for validate and bench; see `redrafter.pipeline.encode_prompts`."""
    from redrafter.pipeline import encode_prompts
    from redrafter.validate.prompts import read_prompts
    from redrafter.validate.report import DEFAULT_PROMPTS

    if id_prompts:
        if prompts_file or chat:
            raise click.UsageError("--prompt-ids excludes --prompts and --chat")
        return [pipe.encode(ids) for ids in _read_id_prompts(id_prompts)]
    texts = read_prompts(prompts_file) if prompts_file else None
    return encode_prompts(
        pipe, texts, defaults=DEFAULT_PROMPTS, chat=chat, synthetic_vocab=synthetic_vocab
    )


@main.command()
@_option("bundle")
@_option(
    "runtime",
    "coreml: Apple's runtime (macOS 15+); coreml-mil: the converted Core ML program "
    "evaluated op by op in numpy on any OS (checks the conversion, not Apple's runtime or the "
    "Neural Engine).",
    choices=["onnxruntime", "coreml", "coreml-mil"],
    default="onnxruntime",
)
@_option("device")
@_option("allow-cpu-fallback")
@_option("threads")
@_option("base", "Reference base checkpoint [the one recorded in the manifest].")
@_option("drafter", "Reference drafter [the one recorded in the manifest].")
@_option("prompts")
@_option("prompt-ids", _PROMPT_IDS_LIST, multiple=True)
@_option("chat")
@_option("max-new-tokens", default=32)
@_option("json", "Write the JSON report here.")
def validate(
    bundle_path: str,
    runtime: str,
    device: str,
    allow_cpu_fallback: bool,
    threads: int | None,
    base_path: str | None,
    drafter_path: str | None,
    prompts_file: str | None,
    prompt_ids: tuple[str, ...],
    chat: bool,
    max_new_tokens: int,
    json_out: str | None,
) -> None:
    """Prove parity of a bundle against the PyTorch reference: tensors for the base graph and
    every drafter graph, greedy tokens per prompt. Exit 0 pass, 1 parity failure, 2 bad input."""
    from redrafter.pipeline import load, reference_runtime
    from redrafter.validate.report import validate_bundle

    _check_writable(json_out, "--json")
    pipe = load(
        bundle_path,
        runtime=runtime,
        device=device,
        threads=threads,
        allow_fallback=allow_cpu_fallback,
    )
    bundle = pipe.runtime.bundle  # type: ignore[attr-defined]
    reference = reference_runtime(bundle, base=base_path, drafter=drafter_path, threads=threads)
    prompts = _prompt_ids(
        pipe,
        prompts_file,
        chat,
        synthetic_vocab=bundle.base_config.vocab_size,
        id_prompts=prompt_ids,
    )
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
@_option("bundle")
@_option(
    "runtime",
    "torch = the reference rebuilt from the bundle's sources.",
    choices=["onnxruntime", "torch"],
    default="onnxruntime",
)
@_option("device")
@_option("allow-cpu-fallback")
@_option("threads")
@click.option(
    "--native/--portable",
    "native",
    default=None,
    help="ONNX Runtime TreeAttention: the native library or the portable body [native when built].",
)
@_option("prompts")
@_option("prompt-ids", _PROMPT_IDS_LIST, multiple=True)
@_option("chat")
@_option("max-new-tokens", default=64)
@_option("beam-width", "Comma list, e.g. 1,2,4 [the bundle's graphs].")
@_option("beam-length", "Comma list, e.g. 3,4,5 [the bundle's graphs].")
@click.option("--repeats", default=3, show_default=True, type=click.IntRange(min=1))
@_option("json", "Write the JSON results here.")
@click.option("--plot", "plot_out", type=click.Path(), help="Write a PNG speed-up plot here.")
@_option(
    "prompt-lookup",
    "Speculative runs without, with, or both without and with the prompt-lookup beam.",
    choices=["off", "on", "both"],  # keys of harness.PROMPT_LOOKUP_SETTINGS
    default="off",
)
@_option(
    "min-draft-prob",
    "Comma list of draft-probability floors (0 = keep every draft), e.g. 0,0.25: each "
    "speculative configuration runs once per floor.",
    default="0",
    callback=_probs,
)
@_option("lookup-span")
@_option("lookup-min-ngram")
@_option("lookup-max-ngram")
def bench(
    bundle_path: str,
    runtime: str,
    device: str,
    allow_cpu_fallback: bool,
    threads: int | None,
    native: bool | None,
    prompts_file: str | None,
    prompt_ids: tuple[str, ...],
    chat: bool,
    max_new_tokens: int,
    beam_width: list[int] | None,
    beam_length: list[int] | None,
    repeats: int,
    json_out: str | None,
    plot_out: str | None,
    prompt_lookup: str,
    min_draft_prob: list[float],
    lookup_span: int,
    lookup_min_ngram: int,
    lookup_max_ngram: int,
) -> None:
    """Speculative vs autoregressive decoding on the same runtime and prompts, side by side:
    tokens/s, tokens/step, ms/step by phase, latency percentiles, peak RSS, speed-up."""
    from rich.progress import Progress

    from redrafter.bench.beams import select_beams
    from redrafter.bench.harness import (
        PROMPT_LOOKUP_SETTINGS,
        run_configs,
        runs_in,
        speculative_grid,
    )
    from redrafter.bench.report import (
        bench_payload,
        bench_title,
        markdown_table,
        plot_speedup,
        save_json,
    )
    from redrafter.pipeline import load, reference_runtime

    if runtime == "torch" and native is not None:
        raise click.UsageError("--native/--portable apply to --runtime onnxruntime")
    _check_writable(json_out, "--json")
    _check_writable(plot_out, "--plot")
    pipe = load(
        bundle_path,
        runtime="onnxruntime",
        device=device,
        native=native,
        threads=threads,
        allow_fallback=allow_cpu_fallback,
    )
    bundle = pipe.runtime.bundle  # type: ignore[attr-defined]
    rt = pipe.runtime if runtime == "onnxruntime" else reference_runtime(bundle, threads=threads)
    beams = select_beams(
        bundle.drafter_graphs, beam_width, beam_length, any_shape=runtime == "torch"
    )
    prompts = _prompt_ids(pipe, prompts_file, chat, id_prompts=prompt_ids)
    spec = speculative_grid(
        beams,
        max_new_tokens=max_new_tokens,
        packing=bundle.packing,
        prompt_lookup=PROMPT_LOOKUP_SETTINGS[prompt_lookup],
        min_draft_prob=min_draft_prob,
        lookup_span=lookup_span,
        lookup_min_ngram=lookup_min_ngram,
        lookup_max_ngram=lookup_max_ngram,
    )
    with Progress(transient=True) as progress:
        task = progress.add_task("benchmarking", total=runs_in(spec, repeats))
        results = run_configs(
            rt,
            prompts,
            spec,
            repeats=repeats,
            eos_token_ids=pipe.eos_token_ids,
            on_run=lambda name: progress.update(task, advance=1, description=name),
        )
    n = len(prompts)
    title = bench_title(bundle, rt, device=device, prompts=n, max_new_tokens=max_new_tokens)
    click.echo(title)
    click.echo(markdown_table(results))
    if json_out:
        payload = bench_payload(
            bundle,
            rt,
            results,
            device=device,
            prompts=n,
            max_new_tokens=max_new_tokens,
            repeats=repeats,
        )
        save_json(payload, json_out)
    if plot_out:
        plot_speedup(results, plot_out, title=title)


@main.command("train-drafter")
@_option("base", "Frozen base model.", required=True)
@click.option(
    "--data",
    "data_paths",
    required=True,
    multiple=True,
    type=click.Path(),
    help="Text file (one record per line, \\n for a newline inside one) or JSONL(.gz) (one "
    "record per line, text from --text-field); repeat for more. The format --prompts reads.",
)
@click.option(
    "--format",
    "data_format",
    type=click.Choice(["auto", "lines", "paragraphs", "jsonl"]),
    default="auto",
    show_default=True,
    help="How --data files split into records. auto: JSONL by the file name (.jsonl, .json, "
    "optionally .gz), else lines; paragraphs: blank-line-separated (prose corpora for --mode ce).",
)
@_option("out", "Drafter folder.")
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
@_option("exit-dim", "Drafter width [base hidden size].")
@_option("num-layers")
@click.option(
    "--draft-vocab", default=8192, show_default=True, type=click.IntRange(min=0),
    help="Tokens the head can draft (the most frequent targets); 0 = the full vocab.",
)  # fmt: skip
@click.option("--kl-weight", default=0.0, show_default=True, type=click.FloatRange(min=0))
@_option("chat", "distill: wrap each record in the chat template.")
@click.option("--text-field", help="JSONL field holding the text [text, prompt or content].")
@click.option("--max-records", type=click.IntRange(min=1), help="distill: use the first N only.")
@click.option("--eval-every", default=0, show_default=True, type=click.IntRange(min=0))
@click.option("--save-every", default=0, show_default=True, type=click.IntRange(min=0))
@_option("seed", default=0)
@click.option("--resume", is_flag=True, help="Continue the checkpoint in --out.")
@click.option(
    "--stop-after", type=click.IntRange(min=1),
    help="Checkpoint and stop at this step of the schedule (resume later with --resume).",
)  # fmt: skip
@click.option("--cache-dir", type=click.Path(), help="Base outputs cache [~/.cache/redrafter].")
@click.option(
    "--teacher-data", type=click.Path(),
    help="distill: folder of the base's answers (safetensors shards + manifest.json), made once "
    "and reused; another base's is refused [under --cache-dir].",
)  # fmt: skip
@click.option(
    "--teacher", "teacher_bundle", type=click.Path(),
    help="distill: an exported bundle of --base (e.g. its int4 bundle) whose ONNX Runtime "
    "session gives the answers and hidden states the drafter learns from, so it learns the "
    "model it will be deployed with [--base itself].",
)  # fmt: skip
@click.option(
    "--teacher-slots", default=64, show_default=True, type=click.IntRange(min=1),
    help="distill: prompts each process answers at once (KV-cache rows).",
)  # fmt: skip
@click.option(
    "--shard-prompts", default=256, show_default=True, type=click.IntRange(min=1),
    help="distill: prompts per teacher data shard (the unit of work split across processes).",
)  # fmt: skip
@click.option(
    "--bf16/--no-bf16", default=None,
    help="bf16 autocast for the drafter's forward [on for CUDA and CPUs with native bf16]; "
    "--no-bf16 keeps fp32, so runs at different world sizes agree to float rounding.",
)  # fmt: skip
@click.option(
    "--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
    help="Where the base and drafter run; under torchrun cuda means one GPU per process "
    "(NCCL), cpu uses gloo.",
)  # fmt: skip
@click.option(
    "--shard-base", is_flag=True,
    help="Under torchrun: shard the frozen base across the processes (FSDP2), each holding "
    "~1/N of it, for a base that does not fit one device; needs N >= 2.",
)  # fmt: skip
@click.option(
    "--base-dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32",
    show_default=True,
    help="The dtype the base runs in (the drafter trains in fp32). Greedy answers in bf16/fp16 "
    "are another teacher's than fp32's: teacher data is never reused across dtypes.",
)  # fmt: skip
def train_drafter_cmd(**kw: Any) -> None:
    """Train a drafter for a frozen base model; saves Apple's layout to --out.

    Under `torchrun --nproc-per-node N -m redrafter train-drafter ...` the N processes share the
    work: --batch-size stays the global batch, so any N trains the same drafter. --shard-base
    also splits the base across them (docs/drafter_training.md, "Sharding the base")."""
    from pathlib import Path

    from redrafter.train.distributed import process_group
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
        bf16=kw["bf16"],
    )
    with process_group(kw["device"]) as ranks:
        result, _ = train_from_files(
            kw["base_path"],
            kw["data_paths"],
            kw["out_dir"],
            options,
            chat=kw["chat"],
            field=kw["text_field"],
            data_format=kw["data_format"],
            max_records=kw["max_records"],
            resume=kw["resume"],
            cache_dir=Path(kw["cache_dir"]) if kw["cache_dir"] else None,
            teacher_data=Path(kw["teacher_data"]) if kw["teacher_data"] else None,
            teacher_slots=kw["teacher_slots"],
            shard_prompts=kw["shard_prompts"],
            stop_after=kw["stop_after"],
            shard=kw["shard_base"],
            base_dtype=kw["base_dtype"],
            teacher_bundle=Path(kw["teacher_bundle"]) if kw["teacher_bundle"] else None,
            ranks=ranks,
            log=lambda m: click.echo(m, err=True),
        )
    if not ranks.is_main:
        return
    n = sum(p.numel() for p in result.drafter.parameters())
    tps = result.final_eval.get("eval_tokens_per_step")
    click.echo(
        f"wrote {kw['out_dir']} ({n / 1e6:.2f}M parameters, {result.steps} steps in "
        f"{result.seconds:.0f} s" + (f", held-out {tps:.2f} tokens/step" if tps else "") + ")"
    )


@main.command("init-drafter")
@_option(
    "base", "Base model the drafter must fit (HF folder, .gguf or llama2.c .bin).", required=True
)
@_option("out", "Output folder.")
@_option("seed", default=0)
@_option("exit-dim", "Drafter width (default 2*hidden).")
@_option("num-layers", "Residual blocks in the drafter head.")
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


@main.command()
@_option("bundle")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@_option(
    "runtime",
    "Runtime [onnxruntime]; torch = the reference rebuilt from the bundle's sources.",
    choices=["onnxruntime", "torch"],
)
@_option("device")
@_option("threads")
@_option(
    "beam-width",
    "Beams drafted per step [the bundle's].",
    type=click.IntRange(min=1),
    callback=None,
)
@_option(
    "beam-length",
    "Tokens per beam, counting the LLM's own [the bundle's].",
    type=click.IntRange(min=2),
    callback=None,
)
@_option("prompt-lookup", "Add a prompt-lookup draft as one more beam.", is_flag=True)
@_option(
    "min-draft-prob",
    "Cut each drafter beam before its first draft whose cumulative probability is below this.",
    type=click.FloatRange(0.0, 1.0, max_open=True),
    default=0.0,
)
@_option("lookup-span")
@_option("lookup-min-ngram")
@_option("lookup-max-ngram")
@click.option("--autoregressive", is_flag=True, help="Serve the autoregressive baseline.")
@click.option(
    "--max-queue",
    default=64,
    show_default=True,
    type=click.IntRange(min=1),
    help="Requests that may wait for the decoder; more get 503.",
)
@click.option(
    "--max-batch",
    default=4,
    show_default=True,
    type=int,
    help="Requests decoded together: rows of the continuous batch (docs/serve.md).",
)
@click.option(
    "--speculate-max-rows",
    type=click.IntRange(min=1),
    help="Speculate only while at most this many requests decode; steps with more decode one "
    "token per request without the drafter [1 on the CPU, where a batch's trees cost more "
    "than they accept; no limit on CUDA]. Set it to --max-batch to always speculate.",
)
@click.option("--model-name", help="The model id clients send [the bundle folder's name].")
@click.option(
    "--workers",
    default=1,
    show_default=True,
    type=click.IntRange(min=1),
    help="Processes serving the one port, each with its own runtime (uvicorn's workers); "
    "give each --threads so they do not oversubscribe the cores.",
)
def serve(
    bundle_path: str,
    host: str,
    port: int,
    runtime: str | None,
    device: str,
    threads: int | None,
    beam_width: int | None,
    beam_length: int | None,
    prompt_lookup: bool,
    min_draft_prob: float,
    lookup_span: int,
    lookup_min_ngram: int,
    lookup_max_ngram: int,
    autoregressive: bool,
    max_queue: int,
    max_batch: int,
    speculate_max_rows: int | None,
    model_name: str | None,
    workers: int,
) -> None:
    """Serve a bundle over HTTP with OpenAI's API (/v1/chat/completions, /v1/completions),
    with continuous batching (docs/serve.md). Needs the [serve] extra."""
    from redrafter.serve import ServeOptions, serve_bundle

    options = ServeOptions(
        beam_width=beam_width,
        beam_length=beam_length,
        prompt_lookup=prompt_lookup,
        min_draft_prob=min_draft_prob,
        lookup_span=lookup_span,
        lookup_min_ngram=lookup_min_ngram,
        lookup_max_ngram=lookup_max_ngram,
        autoregressive=autoregressive,
        max_queue=max_queue,
        max_batch=max_batch,
        speculate_max_rows=speculate_max_rows,
    )
    serve_bundle(
        bundle_path,
        options,
        host=host,
        port=port,
        runtime=runtime,
        device=device,
        threads=threads,
        model=model_name,
        workers=workers,
    )


if __name__ == "__main__":
    sys.exit(main())
