"""Checkpoint loading: base models (Hugging Face folder here; GGUF in `gguf.py`, llama2.c `.bin`
in `llama2c.py`, dispatched by `load_base`) and ReDrafter drafters (Apple's layout, read and
written here).

Dimensions: V vocab, E hidden size, F MLP size, Lyr layers, Hq/Hkv heads, D head dim, X exit_dim.

Every loader maps names explicitly, compares the key set with the model's state dict exactly, checks
every shape and casts to fp32; nothing is unpickled. Phi-3's fused `qkv_proj` / `gate_up_proj`
tensors are split into Llama's names by `split_phi3`'s map; Qwen3's `q_norm` / `k_norm` keep HF's
names. Rotary layouts: our `Transformer` uses HF's
`rotate_half` (a head's rotary pairs are rows (j, j + D/2)). llama.cpp's GGUF (arch `llama`) and
llama2.c store q/k rows in Meta's interleaved layout (pairs are rows (2j, 2j + 1)), so those rows
are un-permuted on load. Verified facts: llama.cpp's `convert_hf_to_gguf.py` permutes q/k weights
and biases for `llama` but not for `qwen2` (which llama.cpp runs with NEOX = rotate_half rotary);
llama2.c's `run.c` rotates pairs (i, i+1), and its `export.py` applies `permute_reverse`
(HF -> interleaved) to HF weights before writing a `.bin`.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from redrafter.config import DRAFTER_MODEL_TYPE, BaseModelConfig, DrafterConfig
from redrafter.errors import (
    CheckpointError,
    ConfigError,
    DrafterMismatchError,
)
from redrafter.files import make_temp_dir, stale_copies, swap_into_place
from redrafter.models.drafter import Drafter
from redrafter.models.gguf import (
    GGUF_MAGIC,
    GgufBlocks,
    gguf_blocks,
    gguf_config,
    gguf_reader,
    gguf_weights,
)
from redrafter.models.llama import Transformer
from redrafter.models.llama2c import llama2c_header, llama2c_read

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
_ROTARY_INV_FREQ = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")
_FIX_CONFIG = "check that the config belongs to these weights, or re-export the checkpoint"


def _few(names: list[str], n: int = 4) -> str:
    return ", ".join(names[:n]) + (f" (+{len(names) - n} more)" if len(names) > n else "")


M = TypeVar("M", bound=nn.Module)


def expected_shapes(cls: type[nn.Module], config: Any) -> dict[str, tuple[int, ...]]:
    """The state-dict shapes of `cls(config)`, built on the meta device: nothing is allocated,
    so a config that promises huge tensors costs nothing until the file's tensors match it."""
    with torch.device("meta"):
        module = cls(config)
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def build_checked(cls: type[M], config: Any, weights: dict[str, torch.Tensor], where: str) -> M:
    """`cls(config)` holding `weights`: the names and shapes in the file are checked against the
    config *before* the module is allocated (a config.json with `vocab_size: 8000000` next to a
    tiny file is refused without allocating gigabytes), then loaded as fp32."""
    check_weights(expected_shapes(cls, config), weights, where)
    module = cls(config)
    load_checked(module, weights, where)
    return module


def check_weights(
    expected: dict[str, tuple[int, ...]], weights: dict[str, torch.Tensor], where: str
) -> None:
    """Raise CheckpointError unless `weights` has exactly the names and shapes `expected`."""
    missing = sorted(expected.keys() - weights.keys())
    unexpected = sorted(weights.keys() - expected.keys())
    if missing or unexpected:
        raise CheckpointError(
            f"{where}: tensor names do not match the config (missing: {_few(missing) or 'none'}; "
            f"unexpected: {_few(unexpected) or 'none'}); {_FIX_CONFIG}"
        )
    bad = [
        f"{k} {tuple(w.shape)} != {expected[k]}"
        for k, w in sorted(weights.items())
        if tuple(w.shape) != expected[k]
    ]
    if bad:
        raise CheckpointError(
            f"{where}: tensor shapes do not match the config: {_few(bad)}; {_FIX_CONFIG}"
        )


def load_checked(module: nn.Module, weights: dict[str, torch.Tensor], where: str) -> None:
    """Load `weights` into `module` after an exact key-set and per-tensor shape check (fp32)."""
    check_weights({k: tuple(v.shape) for k, v in module.state_dict().items()}, weights, where)
    # Integer tensors (a drafter's `draft_token_ids`) keep their dtype; weights become fp32.
    module.load_state_dict(
        {k: w.to(torch.float32) if w.is_floating_point() else w for k, w in weights.items()},
        strict=True,
    )


def _checkpoint_format(path: Path) -> str:
    """'hf' (folder), 'gguf' (by magic) or 'llama2c' (a .bin file)."""
    if path.is_dir():
        return "hf"
    if not path.exists():
        raise CheckpointError(
            f"{path}: not found; pass a Hugging Face checkpoint folder, a .gguf or a llama2.c .bin"
        )
    with open(path, "rb") as f:
        head = f.read(4)
    if head == GGUF_MAGIC:
        return "gguf"
    if head[:2] == b"PK":
        raise CheckpointError(
            f"{path} is a PyTorch pickle archive, which we never unpickle; re-save the model "
            "with save_pretrained(safe_serialization=True) and pass the folder"
        )
    if path.suffix == ".bin":
        return "llama2c"
    if path.name in (SAFETENSORS, SAFETENSORS_INDEX, "config.json"):
        raise CheckpointError(f"{path}: pass the folder holding it ({path.parent}), not the file")
    raise CheckpointError(
        f"{path}: unknown checkpoint format; pass a Hugging Face folder, a .gguf or a llama2.c .bin"
    )


def load_base_config(path: str | Path) -> BaseModelConfig:
    """The base model's config without reading its weights (any supported format)."""
    path = Path(path)
    kind = _checkpoint_format(path)
    if kind == "hf":
        return _hf_config(path)
    if kind == "gguf":
        return gguf_config(gguf_reader(path), path)
    return llama2c_header(path)[0]


def checkpoint_gguf_blocks(path: str | Path) -> list[GgufBlocks]:
    """A GGUF base's own Q4_0/Q4_1/Q8_0 matrices (`gguf_blocks`), for `--quantize-method gguf`;
    a one-line `ConfigError` for any other checkpoint, or a GGUF without 4-bit matrices."""
    path = Path(path)
    kind = _checkpoint_format(path)
    if kind != "gguf":
        raise ConfigError(
            f"--quantize-method gguf keeps a GGUF base's own 4-bit blocks, and {path} is not a "
            "GGUF file; use --quantize-method rtn"
        )
    blocks = gguf_blocks(path)
    if not any(b.bits == 4 for b in blocks):
        raise ConfigError(
            f"{path} has no Q4_0 or Q4_1 matrices to keep (other GGUF types, e.g. Q4_K, are "
            "not kept yet); use --quantize-method rtn"
        )
    return blocks


def load_base(path: str | Path) -> Transformer:
    """A base model from a HF folder, a `.gguf` or a llama2.c `.bin`; fp32, eval mode."""
    path = Path(path)
    kind = _checkpoint_format(path)
    if kind == "hf":
        config, weights = _hf_config(path), _hf_weights(path)
        weights = _sanitize_hf(weights, config, path)
    elif kind == "gguf":
        reader = gguf_reader(path)
        config = gguf_config(reader, path)
        weights = gguf_weights(reader, config)
    else:
        config, weights = llama2c_read(path)
    model = build_checked(Transformer, config, weights, str(path))
    return model.eval()


# --------------------------------------------------------------------------- Hugging Face


def _hf_config(folder: Path) -> BaseModelConfig:
    if not (folder / "config.json").is_file():
        raise CheckpointError(
            f"{folder}: no config.json; a Hugging Face checkpoint folder needs config.json "
            f"and {SAFETENSORS} (or {SAFETENSORS_INDEX} with its shards)"
        )
    return BaseModelConfig.from_json(folder / "config.json")


def read_safetensors(file: Path) -> dict[str, torch.Tensor]:
    """Every tensor of one safetensors file (CheckpointError if missing or corrupt)."""
    if not file.is_file():
        raise CheckpointError(f"{file}: not found; re-download or re-export the checkpoint")
    try:
        with safe_open(str(file), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(
            f"{file}: not a readable safetensors file ({e}); re-download or re-export it"
        ) from None


def _hf_weights(folder: Path) -> dict[str, torch.Tensor]:
    if (folder / SAFETENSORS).is_file():
        return read_safetensors(folder / SAFETENSORS)
    index = folder / SAFETENSORS_INDEX
    if not index.is_file():
        pickles = sorted(p.name for p in folder.glob("*.bin")) + sorted(
            p.name for p in folder.glob("*.pt*")
        )
        hint = f" (found {_few(pickles)}: pickles are never loaded)" if pickles else ""
        raise CheckpointError(
            f"{folder}: no {SAFETENSORS} or {SAFETENSORS_INDEX}{hint}; re-save the model with "
            "save_pretrained(safe_serialization=True)"
        )
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        assert isinstance(weight_map, dict)
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AssertionError):
        raise CheckpointError(
            f"{index}: not a valid index (needs a 'weight_map' object); re-export the checkpoint"
        ) from None
    weights: dict[str, torch.Tensor] = {}
    for shard in sorted({_shard_name(folder, index, v) for v in weight_map.values()}):
        for name, tensor in read_safetensors(folder / shard).items():
            if name in weights:
                raise CheckpointError(f"{folder}: tensor {name} appears in two shards; re-export")
            if weight_map.get(name) != shard:
                raise CheckpointError(
                    f"{folder / shard}: holds {name}, which {SAFETENSORS_INDEX} does not map to "
                    "this shard; re-export the checkpoint"
                )
            weights[name] = tensor
    absent = sorted(weight_map.keys() - weights.keys())
    if absent:
        raise CheckpointError(f"{index}: maps {_few(absent)} to shards that lack them; re-export")
    return weights


def _shard_name(folder: Path, index: Path, shard: Any) -> str:
    """A shard named by the index: a string, relative, normalised, a file inside the checkpoint
    folder (no '..', no subfolder escape, no symlink pointing out of it)."""
    fix = "the index must name shard files inside the checkpoint folder; re-export the checkpoint"
    if (
        not isinstance(shard, str)
        or not shard
        or "\\" in shard
        or "\x00" in shard
        or posixpath.isabs(shard)
        or posixpath.normpath(shard) != shard
        or shard.split("/")[0] in ("..", ".")
    ):
        raise CheckpointError(f"{index}: shard name {shard!r} is not a relative file name; {fix}")
    target = (folder / shard).resolve()  # follows symlinks, of the shard or a folder on the way
    if not target.is_relative_to(folder.resolve()):
        raise CheckpointError(f"{index}: shard {shard!r} resolves to {target}, outside; {fix}")
    return shard


def _sanitize_hf(
    weights: dict[str, torch.Tensor], config: BaseModelConfig, where: Path
) -> dict[str, torch.Tensor]:
    """HF quirks: drop old rotary caches; drop a redundant lm_head when embeddings are tied;
    split Phi-3's fused projections; take a Gemma 3 image-text checkpoint's language model."""
    weights = {k: v for k, v in weights.items() if not _ROTARY_INV_FREQ.fullmatch(k)}
    if config.model_type == "gemma3_text":
        weights = gemma3_language_model(weights)
    if config.model_type == "phi3":
        weights = split_phi3(weights, config, where)
    if config.tie_word_embeddings and "lm_head.weight" in weights:
        head = weights.pop("lm_head.weight")
        embed = weights.get("model.embed_tokens.weight")
        if embed is not None and head.shape != embed.shape:
            raise CheckpointError(
                f"{where}: lm_head.weight {tuple(head.shape)} differs from the tied embedding "
                f"{tuple(embed.shape)}; set tie_word_embeddings=false in config.json"
            )
    return weights


# A Gemma 3 image-text checkpoint's language model, under transformers 4.50-4.51's names
# (and those transformers 5 saves) or 4.52+'s, as the text model's names; the vision tower and
# the projector feed image features into the embeddings, which text decoding never does.
GEMMA3_LANGUAGE_MODEL = (
    ("language_model.model.", "model."),
    ("language_model.lm_head.", "lm_head."),
    ("model.language_model.", "model."),
)
GEMMA3_VISION = (
    "vision_tower.",
    "multi_modal_projector.",
    "model.vision_tower.",
    "model.multi_modal_projector.",
)


def gemma3_language_model(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The text model's tensors of a Gemma 3 checkpoint: an image-text one's language model
    renamed (`GEMMA3_LANGUAGE_MODEL`), its vision tensors dropped; a text-only checkpoint
    unchanged. Any other name is left for the key-set check to report."""
    if not any(k.startswith(("language_model.", "model.language_model.")) for k in weights):
        return weights
    out: dict[str, torch.Tensor] = {}
    for name, tensor in weights.items():
        if name.startswith(GEMMA3_VISION):
            continue
        for old, new in GEMMA3_LANGUAGE_MODEL:
            if name.startswith(old):
                name = new + name.removeprefix(old)
                break
        out[name] = tensor
    return out


def split_phi3(
    weights: dict[str, torch.Tensor], config: BaseModelConfig, where: Path | str
) -> dict[str, torch.Tensor]:
    """Phi-3's fused tensors under our (Llama) names, by this map, per layer i:

    model.layers.{i}.self_attn.qkv_proj.weight (Hq*D + 2*Hkv*D, E), rows in that order
        -> self_attn.q_proj.weight (Hq*D, E), k_proj.weight (Hkv*D, E), v_proj.weight (Hkv*D, E)
    model.layers.{i}.mlp.gate_up_proj.weight (2F, E), gate rows first (transformers'
    `gate, up = gate_up_proj(x).chunk(2, dim=-1)`)
        -> mlp.gate_proj.weight (F, E), mlp.up_proj.weight (F, E)

    Every fused tensor must be there with exactly that shape (CheckpointError naming it);
    the other names pass through to the key-set check."""
    E, F, D = config.hidden_size, config.intermediate_size, config.dim_per_head
    q_rows, kv_rows = config.num_attention_heads * D, config.kv_heads * D
    out = dict(weights)
    for i in range(config.num_hidden_layers):
        fused = {
            f"model.layers.{i}.self_attn.qkv_proj.weight": (
                (q_rows + 2 * kv_rows, E),
                {
                    "self_attn.q_proj": q_rows,
                    "self_attn.k_proj": kv_rows,
                    "self_attn.v_proj": kv_rows,
                },
            ),
            f"model.layers.{i}.mlp.gate_up_proj.weight": (
                (2 * F, E),
                {"mlp.gate_proj": F, "mlp.up_proj": F},
            ),
        }
        for name, (shape, parts) in fused.items():
            tensor = out.pop(name, None)
            if tensor is None:
                raise CheckpointError(
                    f"{where}: phi3 checkpoint lacks {name} (Phi-3 stores fused q/k/v and "
                    f"gate/up projections); {_FIX_CONFIG}"
                )
            if tuple(tensor.shape) != shape:
                raise CheckpointError(
                    f"{where}: {name} {tuple(tensor.shape)} != {shape}; {_FIX_CONFIG}"
                )
            pieces = torch.split(tensor, list(parts.values()), dim=0)  # rows, in the map's order
            for part, piece in zip(parts, pieces, strict=True):
                target = f"model.layers.{i}.{part}.weight"
                if target in out:
                    raise CheckpointError(
                        f"{where}: holds both {name} and {target}; re-export the checkpoint"
                    )
                out[target] = piece.contiguous()
    return out


# --------------------------------------------------------------------------- drafter


def check_drafter_fits(base_config: BaseModelConfig, drafter_config: DrafterConfig) -> None:
    """Raise DrafterMismatchError unless the drafter was built for this base model's sizes."""
    for field in ("hidden_size", "vocab_size"):
        base, draft = getattr(base_config, field), getattr(drafter_config, field)
        if base != draft:
            raise DrafterMismatchError(
                f"drafter {field}={draft} does not match the base model's {field}={base}; "
                "use a drafter trained for this base model (or init one for it)"
            )


def load_drafter(path: str | Path) -> Drafter:
    """A drafter from Apple's layout: `config.json` (model_type recurrent_drafting_drafter) +
    `model.safetensors` with Apple's tensor names; fp32, eval mode."""
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(
            f"{folder}: not a folder; pass a drafter folder with config.json and {SAFETENSORS}"
        )
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder}: no config.json; pass a ReDrafter drafter folder")
    config = DrafterConfig.from_json(folder / "config.json")
    drafter = build_checked(Drafter, config, read_safetensors(folder / SAFETENSORS), str(folder))
    ids = drafter.draft_token_ids
    if ids is not None and (
        ids.min() < 0 or ids.max() >= config.vocab_size or len(ids.unique()) != len(ids)
    ):
        raise CheckpointError(
            f"{folder}: draft_token_ids must be distinct token ids in [0, {config.vocab_size}); "
            "re-train or re-save the drafter"
        )
    return drafter.eval()


def load_pair(
    base_path: str | Path, drafter_path: str | Path | None = None
) -> tuple[Transformer, Drafter | None]:
    """A base model and, optionally, a drafter checked to fit it: what `export`, the library
    and `validate`'s reference load."""
    base = load_base(base_path)
    if drafter_path is None:
        return base, None
    drafter = load_drafter(drafter_path)
    check_drafter_fits(base.config, drafter.config)
    return base, drafter


def _is_drafter_dir(folder: Path) -> bool:
    try:
        raw = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return False
    return isinstance(raw, dict) and raw.get("model_type") == DRAFTER_MODEL_TYPE


def save_drafter(
    drafter: Drafter,
    out_dir: str | Path,
    *,
    extra_files: Callable[[Path], None] | None = None,
) -> Path:
    """Write `config.json` + `model.safetensors` atomically (temp folder, then rename); with
    `extra_files`, that callback writes more files (a training checkpoint's) into the temp
    folder first, so they are swapped in together.

    An existing `out_dir` is replaced only if it is empty or already a drafter checkpoint.
    A full or read-only disk is a one-line CheckpointError; nothing is left behind."""
    out = Path(out_dir)
    tmp: Path | None = None
    try:
        if out.exists() and not (out.is_dir() and (not any(out.iterdir()) or _is_drafter_dir(out))):
            raise CheckpointError(
                f"{out}: exists and is not a drafter checkpoint; refusing to overwrite it, "
                "choose another output path"
            )
        tmp = make_temp_dir(out)
        tensors = {k: v.detach().cpu().contiguous() for k, v in drafter.state_dict().items()}
        weights = (t for t in tensors.values() if t.is_floating_point())  # not draft_token_ids
        dtype = str(next(weights).dtype).removeprefix("torch.")
        config = {"architectures": ["Drafter"], **drafter.config.to_dict(), "torch_dtype": dtype}
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        save_file(tensors, str(tmp / SAFETENSORS), metadata={"format": "pt"})
        if extra_files is not None:
            extra_files(tmp)
        _fsync_tree(tmp)
        swap_into_place(tmp, out)
        tmp = None
        for stale in stale_copies(out):
            shutil.rmtree(stale, ignore_errors=True)
    except OSError as e:
        raise CheckpointError(
            f"{out}: cannot write the drafter ({e.strerror or e}); free disk space or choose a "
            "writable output folder"
        ) from None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _fsync_tree(folder: Path) -> None:
    """Flush the files of `folder` to disk before it is renamed into place."""
    for path in folder.iterdir():
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def init_drafter(
    base_config: BaseModelConfig,
    *,
    seed: int = 0,
    exit_dim: int | None = None,
    num_layers: int = 1,
) -> Drafter:
    """A randomly initialised drafter that fits `base_config` (exit_dim defaults to 2E).

    PyTorch's default Linear init (uniform, ±1/sqrt(fan_in)) gives logits of spread ~0.5 on
    unit-RMS inputs: distinct, non-degenerate draft distributions before any training. The
    global RNG is left untouched."""
    config = DrafterConfig(
        vocab_size=base_config.vocab_size,
        hidden_size=base_config.hidden_size,
        exit_dim=2 * base_config.hidden_size if exit_dim is None else exit_dim,
        num_draft_layers=num_layers,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        drafter = Drafter(config)
    return drafter.eval()
