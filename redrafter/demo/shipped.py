"""The trained demo drafter shipped inside the package (`shipped_drafter/`), so `make demo` needs
no training: the fp16 weights of the drafter `RECIPE` trains for the demo GGUF, checksummed, with
the recipe and the data digests that reproduce it (`metadata.json`) and its provenance and
licenses (`README.md`).

`shipped_drafter(gguf)` returns the folder once the weights' SHA-256 matches the metadata and
`gguf` is the file the drafter was trained for (by SHA-256: `recipe.fingerprint` holds a path and
an mtime, which differ on every machine). `python -m redrafter.demo.shipped --from DIR` rewrites
the folder from a drafter that `python -m redrafter.demo --retrain-drafter` trained: fp32 -> fp16
by `write_shipped`, never by hand.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

from redrafter.errors import CheckpointError

SHIPPED_DIR = Path(__file__).resolve().parent / "shipped_drafter"
# The same recipe distilled from the int4 bundle (`drafter.INT4_RECIPE`): what `make demo`'s int4
# bundle drafts with.
SHIPPED_INT4_DIR = Path(__file__).resolve().parent / "shipped_drafter_int4"
METADATA = "metadata.json"
WEIGHTS = "model.safetensors"
FIX = "reinstall redrafter (or `git checkout redrafter/demo/shipped_drafter`)"
# The recipe's fields a trainer state records (`TrainOptions`); the others shape the data.
TRAIN_FIELDS = (
    "epochs",
    "batch_size",
    "seq_len",
    "lr",
    "predict_tokens",
    "draft_vocab",
    "num_layers",
)
RETRAIN = "`python -m redrafter.demo --retrain-drafter` (`make demo RETRAIN=1`)"


class ShippedDrafterError(CheckpointError):
    """The shipped drafter is damaged, or does not belong to the base model at hand."""


@dataclasses.dataclass(frozen=True)
class ShippedMetadata:
    """`metadata.json`: what the shipped weights are and what made them."""

    weights_sha256: str  # of model.safetensors (fp16)
    base_name: str  # the GGUF file the drafter was trained for ...
    base_bytes: int
    base_sha256: str  # ... identified by content
    recipe: dict[str, Any]  # exactly `RECIPE` at training time
    data: dict[str, Any]  # file and prompt-list digests
    training: dict[str, Any]  # contexts, steps, seconds, held-out accuracy
    measured: list[dict[str, Any]]  # tokens/step figures with their source
    license: str

    @staticmethod
    def read(folder: Path = SHIPPED_DIR) -> ShippedMetadata:
        """The folder's metadata; a missing or malformed file is a one-line error."""
        path = folder / METADATA
        try:
            raw = json.loads(path.read_text())
            return ShippedMetadata(
                weights_sha256=raw["weights"]["sha256"],
                base_name=raw["base"]["file"],
                base_bytes=int(raw["base"]["bytes"]),
                base_sha256=raw["base"]["sha256"],
                recipe=dict(raw["recipe"]),
                data=dict(raw["data"]),
                training=dict(raw["training"]),
                measured=list(raw["measured"]),
                license=raw["license"],
            )
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ShippedDrafterError(
                f"{path}: unreadable shipped-drafter metadata ({e!r}); {FIX}"
            ) from None

    def to_json(self) -> dict[str, Any]:
        return {
            "weights": {"file": WEIGHTS, "sha256": self.weights_sha256, "dtype": "float16"},
            "base": {"file": self.base_name, "bytes": self.base_bytes, "sha256": self.base_sha256},
            "recipe": self.recipe,
            "data": self.data,
            "training": self.training,
            "measured": self.measured,
            "license": self.license,
        }


def shipped_folder(recipe: dict[str, Any]) -> Path:
    """Where the drafter of `recipe` ships: by the teacher it was distilled from (none: the
    fp32 GGUF itself; 'int4': its int4 bundle)."""
    return SHIPPED_INT4_DIR if recipe.get("teacher") == "int4" else SHIPPED_DIR


def is_shipped(drafter: Path) -> bool:
    return drafter.resolve() in (SHIPPED_DIR, SHIPPED_INT4_DIR)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def prompts_sha256(prompts: Any) -> str:
    """Digest of a prompt list (each prompt's chat flag and text, in order): pins the records a
    recipe draws from the data, so a change to `data.py`'s selection shows."""
    text = "\n".join(f"{int(p.chat)}\t{p.text}" for p in prompts)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def verify_weights(folder: Path = SHIPPED_DIR) -> ShippedMetadata:
    """The metadata, after checking that the weights file's SHA-256 matches it."""
    meta = ShippedMetadata.read(folder)
    weights = folder / WEIGHTS
    got = file_sha256(weights) if weights.is_file() else "missing"
    if got != meta.weights_sha256:
        raise ShippedDrafterError(
            f"{weights}: sha256 {got[:16]} does not match metadata.json's "
            f"{meta.weights_sha256[:16]} (damaged file); {FIX}, or retrain: {RETRAIN}"
        )
    return meta


def shipped_drafter(gguf: Path, *, recipe: dict[str, Any], folder: Path = SHIPPED_DIR) -> Path:
    """`folder`, checked: intact weights, trained with `recipe` for `gguf` (same size and
    SHA-256)."""
    meta = verify_weights(folder)
    if meta.recipe != recipe:
        changed = sorted(
            k
            for k in recipe.keys() | meta.recipe.keys()
            if k not in meta.recipe or k not in recipe or meta.recipe[k] != recipe[k]
        )
        raise ShippedDrafterError(
            f"the shipped drafter was trained with another recipe (differs in {', '.join(changed)})"
            f"; train it: {RETRAIN}, then ship it: python -m redrafter.demo.shipped --from DIR"
        )
    size = gguf.stat().st_size
    digest = file_sha256(gguf) if size == meta.base_bytes else f"{size} bytes"
    if digest != meta.base_sha256:
        raise ShippedDrafterError(
            f"{gguf}: not the GGUF the shipped drafter was trained for ({meta.base_name}, sha256 "
            f"{meta.base_sha256[:16]}; this one: {digest[:16]}); train one for it: {RETRAIN}"
        )
    return folder


def write_shipped(
    trained: Path, gguf: Path, out: Path, *, recipe: dict[str, Any], data_dir: Path
) -> ShippedMetadata:
    """Write `out` from the fp32 drafter `trained` (a finished `ensure_drafter` folder): its
    weights as fp16 (`draft_token_ids` stays int64), config.json saying so, and metadata.json
    with the digests of the weights, the base GGUF, the data files and the prompt lists.
    `out/README.md` (provenance, licenses) is written by hand and kept."""
    from safetensors.torch import save_file

    from redrafter.demo import data as demo_data
    from redrafter.models.checkpoints import read_safetensors

    state = json.loads((trained / "trainer_state.json").read_text())
    if state.get("step") != state.get("total_steps"):
        raise ShippedDrafterError(f"{trained}: training did not finish; finish it first")
    trained_with = state.get("options", {})
    differ = [k for k in TRAIN_FIELDS if trained_with.get(k) != recipe[k]]
    if differ:  # the metadata would name a recipe these weights did not come from
        raise ShippedDrafterError(
            f"{trained}: trained with other {', '.join(differ)} than the recipe; retrain it"
        )
    weights = read_safetensors(trained / WEIGHTS)
    half = {k: w.half() if w.is_floating_point() else w for k, w in weights.items()}
    out.mkdir(parents=True, exist_ok=True)
    save_file(half, str(out / WEIGHTS), metadata={"format": "pt"})
    (out / WEIGHTS).chmod(0o644)  # package data: readable by whoever installs it
    config = json.loads((trained / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "torch_dtype": "float16"}, indent=2))
    train_p = demo_data.training_prompts(data_dir, count=recipe["train_prompts"])
    held_p = demo_data.heldout_prompts(data_dir, count=recipe["heldout_prompts"])
    final = state["history"][-1] if state.get("history") else {}
    meta = ShippedMetadata(
        weights_sha256=file_sha256(out / WEIGHTS),
        base_name=gguf.name,
        base_bytes=gguf.stat().st_size,
        base_sha256=file_sha256(gguf),
        recipe=dict(recipe),
        data={
            str(demo_data.JARGON): file_sha256(data_dir / demo_data.JARGON),
            str(demo_data.HUMANEVAL): file_sha256(data_dir / demo_data.HUMANEVAL),
            "training_prompts": {"count": len(train_p), "sha256": prompts_sha256(train_p)},
            "heldout_prompts": {"count": len(held_p), "sha256": prompts_sha256(held_p)},
        },
        training={
            "contexts": state["examples"],
            "steps": state["step"],
            "train_seconds": state.get("train_seconds"),
            "bf16": state.get("bf16"),
            "fp32_weights_sha256": state.get("weights_sha256"),
            "parameters": sum(w.numel() for w in weights.values() if w.is_floating_point()),
            "heldout": {  # top-1 per draft position, and the whole chain right through it
                k.removeprefix("eval_"): round(v, 4)
                for k, v in final.items()
                if k.startswith(("eval_top1@", "eval_chain"))
            },
        },
        measured=[],
        license="Apache-2.0",
    )
    previous = out / METADATA
    if previous.is_file():  # measurements cited for the old weights stay only if they are these
        try:
            old = ShippedMetadata.read(out)
            if old.weights_sha256 == meta.weights_sha256:
                meta = dataclasses.replace(meta, measured=old.measured, license=old.license)
        except ShippedDrafterError:
            pass
    (out / METADATA).write_text(json.dumps(meta.to_json(), indent=2) + "\n")
    return meta


def main(argv: list[str] | None = None) -> None:
    """`python -m redrafter.demo.shipped --from DIR [--recipe fp32|int4] [--gguf FILE]`: rewrite
    the recipe's shipped folder."""
    from redrafter.demo.data import find_shared_data
    from redrafter.demo.drafter import INT4_RECIPE, RECIPE
    from redrafter.demo.model import find_demo_gguf

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--from", dest="trained", type=Path, required=True)
    parser.add_argument("--gguf", type=Path, default=None)
    parser.add_argument(
        "--recipe", choices=["fp32", "int4"], default="fp32", help="the teacher's precision"
    )
    parser.add_argument("--out", type=Path, default=None, help="[the recipe's shipped folder]")
    args = parser.parse_args(argv)
    recipe = INT4_RECIPE if args.recipe == "int4" else RECIPE
    gguf = args.gguf or find_demo_gguf()
    out = args.out or shipped_folder(recipe)
    meta = write_shipped(args.trained, gguf, out, recipe=recipe, data_dir=find_shared_data())
    print(json.dumps(meta.to_json(), indent=2))


if __name__ == "__main__":
    main()
