"""`make demo` (`python -m redrafter.demo`): the demo drafter shipped in the package (or retrained
on request), the ONNX bundle exported once, validated against the PyTorch reference, then a few
prompts never trained on, speculative vs autoregressive, on ONNX Runtime (CPU) and the torch
runtime."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import click

from redrafter.config import BeamShape
from redrafter.demo.drafter import INT4_RECIPE, ensure_drafter, say
from redrafter.demo.model import find_demo_gguf

# On a 2-core CPU a verification of N tree tokens costs ~1.3x a one-token step at N=5 and
# ~1.8x at N=20 (benchmarks/RESULTS.md, "Peers"), so narrow beams win here; the others are
# timed too. The lookup beam adds 0.3-0.9 tokens/step on held-out prompts for a few tree tokens.
BEAM = BeamShape(width=1, length=5)
OTHER_BEAMS = (BeamShape(1, 4), BeamShape(2, 4), BeamShape(4, 5))
LOOKUP = True  # add the prompt-lookup beam (decoding/lookup.py) in the headline runs
# Every speculative run cuts drafter beams below 25 % cumulative draft probability
# (decoding/prune.py): +0.1-0.2x on this CPU, where each verified token costs ~1 ms.
MIN_DRAFT_PROB = 0.25
# An int4 bundle's tree tokens are dearer (a one-token step costs ~1/4 of fp32's, a tree token
# about as much as on fp32): drafter beams cut below 40 %, no lookup drafts from a lone matching
# token, 3 drafts per matched token. 1.06x the fp32 settings' speed on the int4 demo bundle
# (benchmarks/RESULTS.md, issue 22, "Tree settings for int4").
INT4_TREE = {"min_draft_prob": 0.4, "lookup_span": 3, "lookup_min_ngram": 2}
DEMO_PROMPTS = (  # none of these, nor their templates, is in the training prompts
    "Write a Python function that returns the factorial of n.",
    "Why is the sky blue?",
    "Write a Python function that checks whether a string is a palindrome.",
)
MAX_NEW_TOKENS = 64
VALIDATE_PROMPTS = 3
VALIDATE_TOKENS = 24


def ensure_bundle(gguf: Path, drafter: Path, cache: Path, *, quantize: str | None = None) -> Any:
    """The ONNX bundle of base + drafter (beam `BEAM`), exported once and cached; with
    `quantize` ('int4'), its weight-only quantized twin (block 32, symmetric, fp32 compute)."""
    from redrafter.build import ExportOptions, export_bundle
    from redrafter.bundle import exporter_fingerprint, load_bundle
    from redrafter.errors import RedrafterError as Error
    from redrafter.export.quantize import quantization

    suffix = f"-{quantize}" if quantize else ""
    folder = cache / "bundles" / f"{bundle_prefix(drafter)}-w{BEAM.width}l{BEAM.length}{suffix}"
    if (folder / "manifest.json").is_file():
        try:
            bundle = load_bundle(folder)
            source = bundle.manifest.drafter_source
            same_drafter = source is not None and source.path == str(drafter.resolve())
            if same_drafter and bundle.manifest.exporter == exporter_fingerprint():
                return bundle
        except Error:
            pass  # damaged: export again (as after a change to the exporter or the drafter)
    say(f"exporting the ONNX bundle to {folder} (first run only)")
    start = time.perf_counter()
    q = quantization(quantize) if quantize else None
    extra = () if quantize else OTHER_BEAMS  # the int4 twin runs the headline shape only
    bundle = export_bundle(
        gguf,
        folder,
        drafter_path=drafter,
        options=ExportOptions(beam=BEAM, extra_beams=extra, quantization=q),
        overwrite=True,
        progress=lambda m: say(f"  {m}"),
    )
    say(f"exported in {time.perf_counter() - start:.0f} s")
    return bundle


def bundle_prefix(drafter: Path) -> str:
    """The bundle cache name for `drafter`: a trained folder's own name (it holds the recipe's
    key); for the shipped drafter, whose path never changes, its weights' digest, so a new
    version of the package exports a new bundle."""
    from redrafter.demo.shipped import ShippedMetadata, is_shipped

    if is_shipped(drafter):
        digest = ShippedMetadata.read(drafter.resolve()).weights_sha256[:12]
        return f"smollm2-135m-instruct-shipped-{digest}"
    return drafter.name


def describe(drafter: Path) -> str:
    """How `drafter` came about, from its trainer state (trained here) or the shipped metadata."""
    from redrafter.demo.shipped import ShippedMetadata, is_shipped

    if is_shipped(drafter):
        training = ShippedMetadata.read(drafter.resolve()).training
        return (
            f"shipped in the package (fp16; retrain with --retrain-drafter), trained "
            f"{training['train_seconds']:.0f} s on {training['contexts']} contexts"
        )
    state = json.loads((drafter / "trainer_state.json").read_text())
    return f"trained {state.get('train_seconds', 0):.0f} s on {state['examples']} contexts"


def main(*, retrain_drafter: bool = False) -> None:
    """Take the shipped drafter (or train it again: `retrain_drafter`), export (once), validate,
    then generate speculatively vs autoregressively."""
    from redrafter.pipeline import Pipeline, load, reference_runtime
    from redrafter.train.recipe import default_cache_dir
    from redrafter.validate.report import validate_bundle

    start = time.perf_counter()
    gguf = find_demo_gguf()
    cache = default_cache_dir()
    drafter = ensure_drafter(gguf, cache, retrain=retrain_drafter)
    bundle = ensure_bundle(gguf, drafter, cache)
    config = bundle.drafter_config
    size = (drafter / "model.safetensors").stat().st_size
    say(
        f"drafter {drafter.name}: exit_dim {config.exit_dim}, {config.num_draft_layers} layer(s), "
        f"draft vocab {config.draft_vocab_size}, {size / 1e6:.1f} MB; {describe(drafter)}"
    )

    pipe = load(bundle.root, runtime="onnxruntime")
    reference = reference_runtime(bundle)  # the torch modules the bundle came from
    say("validating the bundle against the PyTorch reference ...")
    report = validate_bundle(
        bundle,
        candidate=pipe.runtime,
        reference=reference,
        prompts=[pipe.encode(p, chat=True) for p in DEMO_PROMPTS[:VALIDATE_PROMPTS]],
        max_new_tokens=VALIDATE_TOKENS,
        eos_token_ids=pipe.eos_token_ids,
    )
    click.echo(report.table())
    if not report.passed:
        raise SystemExit(1)

    impl = getattr(pipe.runtime, "implementation", "-")
    main_label = _label(BEAM, LOOKUP)
    click.echo(
        f"\nONNX Runtime CPU ({impl} TreeAttention), greedy, ReDrafter {main_label}, "
        f"drafts below {MIN_DRAFT_PROB:g} probability pruned"
    )
    torch_pipe = Pipeline(reference, pipe.tokenizer, pipe.eos_token_ids)
    ort_configs = [(None, False), (BEAM, LOOKUP), (BEAM, not LOOKUP)]
    ort_configs += [(b, lookup) for b in OTHER_BEAMS for lookup in (False, True)]
    runs: dict[tuple[str, str], list[Any]] = {}
    engines = (
        ("onnxruntime", pipe, ort_configs),
        ("torch", torch_pipe, [(None, False), (BEAM, LOOKUP)]),
    )
    for _, p, configs in engines:
        _warm_up(p, [_options(beam, lookup) for beam, lookup in configs])
    for prompt in DEMO_PROMPTS:
        click.echo(f"\n>>> {prompt}")
        for name, p, configs in engines:
            for beam, lookup in configs:
                key = (name, _label(beam, lookup))
                runs.setdefault(key, []).append(
                    p.generate([prompt], _options(beam, lookup), chat=True)
                )
        ar = runs[("onnxruntime", "autoregressive")][-1]
        spec = runs[("onnxruntime", main_label)][-1]
        assert spec.texts is not None
        click.echo(spec.texts[0].strip())
        same = "identical to" if spec.token_ids == ar.token_ids else "DIFFERENT from"
        speedup = spec.stats["tokens_per_second"] / max(ar.stats["tokens_per_second"], 1e-9)
        click.echo(
            f"[{spec.stats['tokens_per_step']:.2f} tokens/step | speculative "
            f"{spec.stats['tokens_per_second']:.1f} tok/s vs autoregressive "
            f"{ar.stats['tokens_per_second']:.1f} tok/s = {speedup:.2f}x | tokens {same} "
            "autoregressive]"
        )
    click.echo(f"\nall prompts, {MAX_NEW_TOKENS} new tokens at most, greedy:")
    click.echo(f"{'runtime':>12} {'decoding':>24} {'tokens/step':>11} {'tok/s':>7} {'speed-up':>8}")
    for (name, label), group in runs.items():
        rate = _rate(group)
        base_rate = _rate(runs[(name, "autoregressive")])
        steps = sum(r.stats["steps"] for r in group)
        per_step = sum(r.stats["tokens_per_step"] * r.stats["steps"] for r in group) / steps
        shown = label if label == "autoregressive" else f"ReDrafter {label}"
        click.echo(
            f"{name:>12} {shown:>24} {per_step:>11.2f} {rate:>7.1f} "
            f"{rate / max(base_rate, 1e-9):>7.2f}x"
        )
    ar_step = _per_step(runs[("onnxruntime", "autoregressive")], ("verify",))
    spec_step = _per_step(runs[("onnxruntime", main_label)], ("draft", "verify"))
    click.echo(
        f"On this machine a {main_label} step (draft + verify) costs {spec_step:.0f} ms against "
        f"{ar_step:.0f} ms for one autoregressive step, so speculation pays above "
        f"{spec_step / ar_step:.2f} tokens/step (benchmarks/RESULTS.md, 'Drafter training')."
    )
    # The int4 bundle drafts with the drafter distilled from the int4 model (INT4_RECIPE).
    show_int4(gguf, ensure_drafter(gguf, cache, INT4_RECIPE, retrain=retrain_drafter), cache,
              bundle, reference, pipe)  # fmt: skip
    click.echo(f"(demo took {time.perf_counter() - start:.0f} s)")


def show_int4(gguf: Path, drafter: Path, cache: Path, fp32: Any, reference: Any, pipe: Any) -> None:
    """The int4 bundle next to fp32: size on disk, drift against the fp32 reference
    (teacher-forced over the demo prompts and their fp32 answers), and autoregressive vs
    speculative speed on the same prompts; speculation must stay lossless on int4 too.
    `drafter`: the int4 bundle's, distilled from the int4 model itself (issue 22 item 3)."""
    from redrafter.pipeline import load
    from redrafter.validate.drift import measure_drift

    int4 = ensure_bundle(gguf, drafter, cache, quantize="int4")
    q_pipe = load(int4.root, runtime="onnxruntime")
    ar, spec_fp32 = _options(None, False), _options(BEAM, LOOKUP)
    spec_int4 = spec_fp32.replace(**INT4_TREE)
    _warm_up(q_pipe, [ar, spec_int4])  # pipe, the fp32 one, ran its options already
    texts, rows = [], []
    for p, bundle, spec in ((pipe, fp32, spec_fp32), (q_pipe, int4, spec_int4)):
        runs: dict[str, list[Any]] = {"ar": [], "spec": []}
        for prompt in DEMO_PROMPTS:
            runs["ar"].append(p.generate([prompt], ar, chat=True))
            runs["spec"].append(p.generate([prompt], spec, chat=True))
            if p is pipe:  # the fp32 answers: the drift texts
                texts.append(p.encode(prompt, chat=True) + runs["ar"][-1].token_ids[0])
        pairs = zip(runs["ar"], runs["spec"], strict=True)
        same = all(a.token_ids == s.token_ids for a, s in pairs)
        steps = sum(r.stats["steps"] for r in runs["spec"])
        per_step = sum(r.stats["tokens_per_step"] * r.stats["steps"] for r in runs["spec"]) / steps
        rows.append((bundle, _rate(runs["ar"]), _rate(runs["spec"]), per_step, same, spec.name))
    drift = measure_drift(q_pipe.runtime, reference, texts, precision="int4")
    click.echo(
        f"\nint4 weights (export --quantize int4), {MAX_NEW_TOKENS} new tokens at most, greedy, "
        f"ReDrafter; the int4 bundle's drafter {drafter.name}: "
        f"{describe(drafter)}, distilled from the int4 model's own answers:"
    )
    click.echo(
        f"{'bundle':>8} {'size MB':>8} {'AR tok/s':>9} {'spec tok/s':>10} {'tokens/step':>11} "
        f"{'speed-up':>8}  speculative tokens; settings"
    )
    for bundle, ar_rate, spec_rate, per_step, same, name in rows:
        click.echo(
            f"{bundle.precision:>8} {bundle.manifest.total_bytes / 1e6:>8.1f} {ar_rate:>9.1f} "
            f"{spec_rate:>10.1f} {per_step:>11.2f} {spec_rate / max(ar_rate, 1e-9):>7.2f}x  "
            f"{'identical to' if same else 'DIFFERENT from'} its autoregressive; {name}"
        )
    click.echo(
        f"int4 drift against the fp32 reference over {drift.positions} positions (the prompts "
        f"and their fp32 answers, teacher-forced): top-1 agreement {drift.top1:.3f}, mean KL "
        f"{drift.mean_kl:.3f} nats"
    )


def _options(beam: BeamShape | None, lookup: bool) -> Any:
    """The demo's greedy DecodeOptions: speculative with `beam` (autoregressive for None)."""
    from redrafter.decoding import DecodeOptions

    return DecodeOptions(
        max_new_tokens=MAX_NEW_TOKENS,
        beam=beam or BEAM,
        speculative=beam is not None,
        prompt_lookup=lookup,
        min_draft_prob=MIN_DRAFT_PROB,
    )


def _warm_up(pipe: Any, options: list[Any]) -> None:
    """A few tokens with each of `options` before anything is timed: a session's first runs
    (and a drafter graph's session, opened on first use) cost far more than later ones, and
    would otherwise land in whichever timed run came first."""
    for o in options:
        pipe.generate([DEMO_PROMPTS[0]], dataclasses.replace(o, max_new_tokens=4), chat=True)


def _label(beam: BeamShape | None, lookup: bool) -> str:
    if beam is None:
        return "autoregressive"
    return f"W{beam.width} L{beam.length}" + (" +lookup" if lookup else "")


def _per_step(runs: list[Any], phases: tuple[str, ...]) -> float:
    """Mean milliseconds per decode step spent in `phases`."""
    seconds = sum(r.stats["seconds_by_phase"].get(p, 0.0) for r in runs for p in phases)
    return 1000 * seconds / max(sum(r.stats["steps"] for r in runs), 1)


def _rate(runs: list[Any]) -> float:
    """Decode-phase tokens/s over several generations (the prefill excluded, as per run)."""
    tokens = sum(r.stats["tokens_per_second"] * r.stats["decode_seconds"] for r in runs)
    return tokens / max(sum(r.stats["decode_seconds"] for r in runs), 1e-9)
