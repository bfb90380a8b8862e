"""The demo drafter: its recipe, the trained copy shipped in the package (`shipped.py`), training
it again on request (`ensure_drafter(..., retrain=True)`, cached and resumable) and finding a
trained one without training (`find_trained_drafter`, what the benchmarks use)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import click

from redrafter.demo import data as demo_data
from redrafter.errors import RedrafterError

# The demo drafter's recipe (benchmarks/RESULTS.md, "Drafter training", has the measurements
# behind each choice). The drafter it trains ships in the package (`shipped.py`): changing a value
# means retraining (`--retrain-drafter`, which trains under a new cache name; the base's answers
# are cached by the fields that shape them, DATA_FIELDS, and reused) and shipping the result.
RECIPE: dict[str, Any] = {
    "version": 1,
    "train_prompts": 4000,  # ~347k contexts, ~33 min of base answers on 2 cores: the data is
    "heldout_prompts": 8,  # what limits acceptance (10x the data: held-out top-1 0.46 -> 0.55)
    "seq_len": 128,  # most tokens per answer
    "predict_tokens": 4,  # drafts per beam: serves beam lengths up to 5
    "epochs": 4,
    "batch_size": 256,
    "lr": 3e-3,
    "draft_vocab": 2048,  # same held-out tokens/step as 8192, half the drafting time
    "num_layers": 1,
}
DATA_FIELDS = ("version", "train_prompts", "heldout_prompts", "seq_len", "predict_tokens")
# The same recipe distilled from the int4 bundle the drafter is deployed with (issue 22 item 3):
# the base's answers and hidden states come from that bundle's ONNX Runtime session
# (`train-drafter --teacher`), not from the fp32 GGUF, whose answers the int4 model leaves.
INT4_RECIPE: dict[str, Any] = {**RECIPE, "teacher": "int4"}
DRAFTER_ENV = "REDRAFTER_DRAFTER"


def say(message: str) -> None:
    """Progress for the person running the demo (stderr: stdout carries the results)."""
    click.echo(message, err=True)


def drafter_folder(gguf: Path, cache: Path, recipe: dict[str, Any] | None = None) -> Path:
    """Where the drafter of `recipe` (default RECIPE) for `gguf` is trained and cached:
    `<cache>/drafters/smollm2-135m-instruct-<key of the GGUF and the recipe>`."""
    from redrafter.train.recipe import cache_key, fingerprint

    key = cache_key(base=fingerprint(gguf), recipe=RECIPE if recipe is None else recipe)
    return cache / "drafters" / f"smollm2-135m-instruct-{key[:12]}"


def finished_drafter(folder: Path, *, require_state: bool = False) -> bool:
    """A complete drafter checkpoint whose training (if it left a trainer state, or always
    with `require_state`) ran to its last step: a half-trained, resumable checkpoint is
    neither reused nor benchmarked."""
    from redrafter.config import DRAFTER_MODEL_TYPE

    try:
        raw = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False
    if not (isinstance(raw, dict) and raw.get("model_type") == DRAFTER_MODEL_TYPE):
        return False
    if not (folder / "model.safetensors").is_file():
        return False
    state = folder / "trainer_state.json"
    if not state.is_file():
        return not require_state
    try:
        st = json.loads(state.read_text())
    except ValueError:
        return False
    return bool(st.get("step") == st.get("total_steps"))


# Seconds per unit on an idle 2-core CPU (benchmarks/RESULTS.md, "The demo drafter and `make
# demo`"): the base answers a prompt in 0.49 s by continuous batching (4,008 prompts in 1,968 s,
# fp32, 64 rows; lockstep batches of 32 took 0.72 s); a training step (batch 256, 1 ResBlock)
# takes ~0.065 s. The answer figure is set higher: an estimate that a busy machine still
# exceeds is better than one every run exceeds. The int4 bundle (INT4_RECIPE's teacher, on ONNX
# Runtime, 32 rows) answered 4,008 prompts in 915 s (0.23 s each), with longer answers: 399,485
# training contexts from 4,000 prompts.
ANSWER_SECONDS = 0.7
INT4_ANSWER_SECONDS = 0.3
STEP_SECONDS = 0.065
CONTEXTS_PER_PROMPT = 92.5  # training contexts per prompt (37,008 from 400; 347,498 from 4,000)
INT4_CONTEXTS_PER_PROMPT = 100.0


def training_estimate(recipe: dict[str, Any]) -> tuple[float, float]:
    """(base-answer seconds, training seconds) that `recipe` needs on an idle 2-core CPU."""
    int4 = recipe.get("teacher") == "int4"
    per_answer = INT4_ANSWER_SECONDS if int4 else ANSWER_SECONDS
    answers = (recipe["train_prompts"] + recipe["heldout_prompts"]) * per_answer
    contexts = recipe["train_prompts"] * (INT4_CONTEXTS_PER_PROMPT if int4 else CONTEXTS_PER_PROMPT)
    steps = recipe["epochs"] * -(-contexts // recipe["batch_size"])
    return answers, steps * STEP_SECONDS


def ensure_drafter(
    gguf: Path, cache: Path, recipe: dict[str, Any] | None = None, *, retrain: bool = False
) -> Path:
    """The demo drafter. For RECIPE (or INT4_RECIPE: distilled from the int4 bundle,
    `teacher_bundle`) without `retrain`: the trained copy shipped in the package,
    checked (its checksum, and that `gguf` is the GGUF it was trained for; `ShippedDrafterError`
    otherwise, never a silent training). With `retrain`, or another `recipe` (same keys as
    RECIPE): trained into the cache (a progress bar per phase, after an estimate of the time),
    then reused. An interrupted training resumes from its last checkpoint; the base's answers
    are cached apart and reused."""
    recipe = RECIPE if recipe is None else recipe
    if recipe in (RECIPE, INT4_RECIPE) and not retrain:
        from redrafter.demo.shipped import shipped_drafter, shipped_folder

        return shipped_drafter(gguf, recipe=recipe, folder=shipped_folder(recipe))
    from redrafter.train.recipe import (
        Prepared,
        TeacherJob,
        cache_key,
        fingerprint,
        prepare_teacher_data,
    )
    from redrafter.train.trainer import Heldout, TrainOptions, train_drafter

    data = {k: recipe[k] for k in DATA_FIELDS}
    if recipe.get("teacher"):  # fp32 recipes keep the keys they always had
        data["teacher"] = recipe["teacher"]
    data_key = cache_key(base=fingerprint(gguf), data=data)
    folder = drafter_folder(gguf, cache, recipe)
    if finished_drafter(folder, require_state=True):
        say(f"using the drafter trained earlier in {folder} (delete it to train again)")
        return folder
    texts = demo_data.find_shared_data()
    from redrafter.models.checkpoints import load_base
    from redrafter.models.tokenizer import load_tokenizer

    examples = cache / "examples" / data_key
    answers_s, train_s = training_estimate(recipe)
    answers_s = 0.0 if (examples / "meta.json").is_file() else answers_s
    say(
        f"training a drafter for {gguf.name} into {folder}: ~{(answers_s + train_s) / 60:.0f} "
        f"min on an idle 2-core CPU (1/2 base answers to {recipe['train_prompts']} prompts "
        f"~{answers_s / 60:.0f} min{', cached' if not answers_s else ''}; 2/2 training "
        f"~{train_s / 60:.0f} min); each phase shows a bar with its time left"
    )
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
    prepared = Prepared.load(examples)
    teacher, slots = None, 64
    if prepared is None and recipe.get("teacher"):
        from redrafter.train.runtime_answers import open_teacher

        teacher = open_teacher(teacher_bundle(gguf, cache, recipe["teacher"]), base.config)
        slots = 32  # int4 rows on 2 cores: 32 answered 64 prompts as fast as 16 (RESULTS.md)
    if prepared is None:
        start = time.perf_counter()
        say(f"1/2 base answers: {recipe['train_prompts']} + {recipe['heldout_prompts']} prompts")
        # by continuous batching (train-drafter's teacher data): 1.36-1.46x the lockstep
        # batches' speed, the same answers token for token (benchmarks/RESULTS.md, issue 21)
        prepared = prepare_teacher_data(
            base,
            tokenizer,
            demo_data.training_prompts(texts, count=recipe["train_prompts"]),
            demo_data.heldout_prompts(texts, count=recipe["heldout_prompts"]),
            options,
            TeacherJob(folder=cache / "teacher" / data_key, slots=slots),
            teacher=teacher,
        )
        prepared.summary["seconds"] = round(time.perf_counter() - start, 1)
        prepared.save(examples)
        say(f"base answers: {prepared.summary}")
    say(f"2/2 training: ~{train_s:.0f} s")
    resume = (folder / "trainer_state.json").is_file()
    result = train_drafter(
        base,
        prepared.train,
        folder,
        options,
        heldout=Heldout(prepared.heldout.examples),
        eos_token_ids=base.config.eos_token_ids,
        resume=resume,
        log=say,
    )
    say(f"trained in {result.seconds:.0f} s ({result.steps} steps)")
    if recipe in (RECIPE, INT4_RECIPE):  # how the retrained drafter replaces the shipped one
        flag = " --recipe int4" if recipe == INT4_RECIPE else ""
        say(f"to ship it in the package: python -m redrafter.demo.shipped --from {folder}{flag}")
    return folder


def teacher_bundle(gguf: Path, cache: Path, precision: str) -> Path:
    """The base-only bundle of `gguf` quantized to `precision` ('int4': block 32, symmetric, as
    `make demo` quantizes), exported once into the cache: the teacher of an int4 recipe. It
    holds no drafter, so its fingerprint (and the teacher data keyed by it) does not change
    when the drafter trained from it does."""
    from redrafter.build import ExportOptions, export_bundle
    from redrafter.bundle import load_bundle
    from redrafter.errors import RedrafterError as Error
    from redrafter.export.quantize import quantization
    from redrafter.train.recipe import cache_key, fingerprint

    key = cache_key(base=fingerprint(gguf), teacher=precision)[:12]
    folder = cache / "bundles" / f"smollm2-135m-instruct-teacher-{key}-{precision}"
    if (folder / "manifest.json").is_file():
        try:
            load_bundle(folder)
            return folder
        except Error:
            pass  # damaged: export again
    say(f"exporting the {precision} teacher bundle to {folder} (first run only)")
    export_bundle(
        gguf,
        folder,
        options=ExportOptions(quantization=quantization(precision)),
        overwrite=True,
        progress=lambda m: say(f"  {m}"),
    )
    return folder


def find_trained_drafter(precision: str = "fp32") -> Path | None:
    """The trained demo drafter, if there is one: $REDRAFTER_DRAFTER, else the drafter shipped
    in the package for a base of `precision` ('fp32', or 'int4': the one distilled from the
    int4 bundle; what `make demo` runs) when the demo GGUF is installed and is the one it was
    trained for, else the newest finished drafter under <cache>/drafters. Never trains; None
    when nothing is found."""
    from redrafter.demo.model import find_demo_gguf
    from redrafter.demo.shipped import shipped_drafter, shipped_folder
    from redrafter.train.recipe import default_cache_dir

    if os.environ.get(DRAFTER_ENV):
        return Path(os.environ[DRAFTER_ENV])
    recipe = INT4_RECIPE if precision == "int4" else RECIPE
    try:
        return shipped_drafter(find_demo_gguf(), recipe=recipe, folder=shipped_folder(recipe))
    except RedrafterError:  # no demo model, or another one: any finished drafter will do
        pass
    cache = default_cache_dir()
    found = [p for p in (cache / "drafters").glob("*") if p.is_dir() and finished_drafter(p)]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None
