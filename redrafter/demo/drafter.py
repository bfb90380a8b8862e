"""The demo drafter: its recipe, training it once (`ensure_drafter`, cached and resumable) and
finding a trained one without training (`find_trained_drafter`, what the benchmarks use)."""

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


def ensure_drafter(gguf: Path, cache: Path, recipe: dict[str, Any] | None = None) -> Path:
    """The demo drafter (or one trained with another `recipe`, same keys as RECIPE), trained
    on first use (a progress bar per phase), then cached. An interrupted training resumes
    from its last checkpoint; the base's answers are cached apart and reused."""
    recipe = RECIPE if recipe is None else recipe
    from redrafter.train.recipe import Prepared, cache_key, fingerprint, prepare_distill
    from redrafter.train.trainer import Heldout, TrainOptions, train_drafter

    data_key = cache_key(base=fingerprint(gguf), data={k: recipe[k] for k in DATA_FIELDS})
    folder = drafter_folder(gguf, cache, recipe)
    if finished_drafter(folder, require_state=True):
        return folder
    data = demo_data.find_shared_data()
    from redrafter.models.checkpoints import load_base
    from redrafter.models.tokenizer import load_tokenizer

    say(f"training a drafter for {gguf.name} (first run only; cached in {folder})")
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
        held = demo_data.heldout_prompts(data, count=recipe["heldout_prompts"])
        prepared = prepare_distill(
            base,
            tokenizer,
            demo_data.training_prompts(data, count=recipe["train_prompts"]),
            (),
            options,
            heldout_prompts=held,
            batch_size=32,
        )
        prepared.summary["seconds"] = round(time.perf_counter() - start, 1)
        prepared.save(examples)
        say(f"base answers: {prepared.summary}")
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
    return folder


def find_trained_drafter() -> Path | None:
    """The trained demo drafter, if there is one: $REDRAFTER_DRAFTER, else the folder
    `make demo` trains into (`drafter_folder` of the demo GGUF and RECIPE), else the newest
    finished drafter under <cache>/drafters. Never trains; None when nothing is found."""
    from redrafter.demo.model import find_demo_gguf
    from redrafter.train.recipe import default_cache_dir

    if os.environ.get(DRAFTER_ENV):
        return Path(os.environ[DRAFTER_ENV])
    cache = default_cache_dir()
    try:
        folder = drafter_folder(find_demo_gguf(), cache)
        if finished_drafter(folder):
            return folder
    except RedrafterError:  # no demo model installed: any finished drafter will do
        pass
    found = [p for p in (cache / "drafters").glob("*") if p.is_dir() and finished_drafter(p)]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None
