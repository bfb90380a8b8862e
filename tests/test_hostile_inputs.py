"""Hostile and malformed inputs (issue #16): each case builds its input here, from the tiny
models of conftest.py, and checks that it is refused with one `RedrafterError` line (never a
traceback, an allocator failure or a deleted user folder), or, for concurrent callers, that a
pipeline serialises them. See docs/security.md for the threat model."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from redrafter.build import export_bundle
from redrafter.bundle import Manifest, atomic_directory, write_manifest
from redrafter.bundle.manifest import BundleError
from redrafter.bundle.names import (
    BASE_ONNX,
)
from redrafter.bundle.store import OutputPathError, load_bundle
from redrafter.config import BaseModelConfig, BeamShape, SamplingParams
from redrafter.decoding.options import DecodeOptions
from redrafter.errors import CheckpointError, ConfigError, RedrafterError, TokenizerError
from redrafter.files import stale_copies
from redrafter.models import checkpoints
from redrafter.models.checkpoints import init_drafter, load_base, save_drafter
from redrafter.models.tokenizer import find_tokenizer, load_tokenizer
from redrafter.pipeline import Pipeline

from conftest import tiny_base, tiny_base_config, tiny_manifest, write_hf_checkpoint


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matmuls run fastest on one torch thread (see conftest.one_torch_thread)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def one_line(error: BaseException) -> str:
    message = str(error)
    assert "\n" not in message and message, message
    return message


# --------------------------------------------------------------------------- option values


@pytest.mark.parametrize(
    "make",
    [
        lambda: SamplingParams(seed=-5),
        lambda: SamplingParams(seed=2**64),
        lambda: SamplingParams(seed=1.5),  # type: ignore[arg-type]
        lambda: SamplingParams(temperature=float("nan")),
        lambda: SamplingParams(temperature=float("inf")),
        lambda: SamplingParams(temperature=-1.0),
        lambda: DecodeOptions(min_draft_prob=float("nan")),
        lambda: DecodeOptions(min_draft_prob=float("inf")),
        lambda: DecodeOptions(min_draft_prob=-0.1),
        lambda: DecodeOptions(max_new_tokens=0),
    ],
)
def test_bad_option_values_are_refused_where_built(make: Any) -> None:
    with pytest.raises(ConfigError) as info:
        make()
    one_line(info.value)


def test_good_option_values_pass() -> None:
    SamplingParams(seed=0, temperature=0.7)
    SamplingParams(seed=np.int64(3), temperature=np.float32(0.5))
    DecodeOptions(max_new_tokens=np.int64(4), min_draft_prob=0.25)


# --------------------------------------------------------------------------- manifests


def manifest_dict() -> dict[str, Any]:
    """A well-formed manifest dict (one listed file) to break in the cases below."""
    from redrafter.bundle import FileRecord

    return tiny_manifest(files={BASE_ONNX: FileRecord("0" * 64, 1)}).to_dict()


def _set(raw: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    node = raw
    *parents, last = path.split(".")
    for key in parents:
        node = node[key]
    if value is KeyError:
        del node[last]
    else:
        node[last] = value
    return raw


MALFORMED = [
    ("files", []),
    ("files", {BASE_ONNX: {"sha256": "0" * 64}}),  # no bytes
    ("files", {BASE_ONNX: ["x"]}),
    ("base", KeyError),
    ("base", []),
    ("base.config", "nope"),
    ("base.config.vocab_size", "big"),
    ("base.config.hidden_size", None),
    ("dtype", "float64"),
    ("packing", "weird"),
    ("custom_op", []),
    ("custom_op", None),
    ("beam", {"width": "2", "length": 3}),
    ("drafters", [1, 2]),
    ("drafters", [{"width": 1, "length": 2, "file": "../x.onnx"}]),
    ("targets", [[]]),
    ("targets", "onnx"),
    ("onnx", {"opset": "18"}),
    ("drafter", 5),
    ("drafter", {"config": {"model_type": "recurrent_drafting_drafter"}}),
    ("parity", {"passed": True, "a.max_abs": "abc"}),
    ("parity", []),
    ("quantization", {"weights": 4}),
    ("coreml", {"files": []}),
    ("export_seconds", {"a": "x"}),
    ("export_seconds", [1]),
]


@pytest.mark.parametrize("path,value", MALFORMED, ids=[f"{p}={v!r}"[:40] for p, v in MALFORMED])
def test_malformed_manifest_is_one_bundle_error(path: str, value: Any) -> None:
    raw = _set(manifest_dict(), path, value)
    with pytest.raises(RedrafterError) as info:
        Manifest.from_dict(raw, "m")
    one_line(info.value)


@pytest.mark.parametrize("raw", [[], [1, 2], "x", 3, None, True, {}, {"format_version": 1}])
def test_any_json_value_as_manifest_is_a_bundle_error(raw: Any) -> None:
    with pytest.raises(BundleError) as info:
        Manifest.from_dict(raw, "m")
    one_line(info.value)


def test_tiny_manifest_parses() -> None:
    assert Manifest.from_dict(manifest_dict(), "m").dtype == "float32"


# --------------------------------------------------------------------------- sharded index


def _sharded(tmp_path: Path, weight_map_value: Any) -> Path:
    """A HF folder whose index maps every tensor to `weight_map_value`, and a real shard
    `outside.safetensors` in the folder's parent holding all the tensors."""
    folder = write_hf_checkpoint(tiny_base(), tmp_path / "base", tokenizer=False)
    (folder / "model.safetensors").rename(tmp_path / "outside.safetensors")
    names = list(tiny_base().state_dict())
    index = {"weight_map": {n: weight_map_value for n in names}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


@pytest.mark.parametrize(
    "shard",
    ["../outside.safetensors", "/etc/passwd", "./x.safetensors", "a//b", "", 5, None, ["x"]],
)
def test_shard_names_must_be_relative_strings_inside_the_folder(tmp_path: Path, shard) -> None:
    folder = _sharded(tmp_path, shard)
    with pytest.raises(CheckpointError) as info:
        load_base(folder)
    assert "shard name" in one_line(info.value) or "index" in str(info.value)


def test_shard_symlink_escaping_the_folder_is_refused(tmp_path: Path) -> None:
    folder = _sharded(tmp_path, "shard.safetensors")
    (folder / "shard.safetensors").symlink_to(tmp_path / "outside.safetensors")
    with pytest.raises(CheckpointError) as info:
        load_base(folder)
    assert "outside" in one_line(info.value)
    shutil.copy(tmp_path / "outside.safetensors", tmp_path / "inside.safetensors")
    (folder / "shard.safetensors").unlink()
    (folder / "shard.safetensors").symlink_to(folder / "model-real.safetensors")
    shutil.move(tmp_path / "inside.safetensors", folder / "model-real.safetensors")
    load_base(folder)  # a link that stays inside is fine


# --------------------------------------------------------------------------- size bombs


def test_huge_vocab_in_config_is_refused_before_allocating(tmp_path: Path) -> None:
    """A tiny checkpoint whose config says vocab_size 2M (under the cap): refused by the shape
    check in a child process whose peak memory stays below what the two 2M x 32 fp32 tables
    (512 MB) would add to torch's own ~300 MB, so an allocation before the check fails the
    test. Past the cap (8M) it is a ConfigError from the config alone."""
    folder = write_hf_checkpoint(tiny_base(), tmp_path / "base", tokenizer=False)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "vocab_size": 2_000_000}))
    code = (
        "from redrafter.errors import CheckpointError\n"
        "from redrafter.models.checkpoints import load_base\n"
        "try:\n"
        f"    load_base({str(folder)!r})\n"
        "except CheckpointError as e:\n"
        "    print('refused:', e)\n"
        # VmHWM: this process image's peak RSS (ru_maxrss would carry the parent's across exec)
        "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0]\n"
        "print('peak_kb', int(hwm.split()[1]))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    ).stdout
    assert "refused:" in out and "do not match the config" in out, out
    peak_kb = int(out.split("peak_kb")[1])
    assert peak_kb < 650_000, out
    (folder / "config.json").write_text(json.dumps({**config, "vocab_size": 8_000_000}))
    with pytest.raises(ConfigError) as info:
        load_base(folder)
    assert "exceeds the limit" in one_line(info.value)


@pytest.mark.parametrize(
    "field,value",
    [
        ("vocab_size", 10**12),
        ("hidden_size", 10**9),
        ("num_hidden_layers", 10**7),
        ("max_position_embeddings", 10**12),
        ("intermediate_size", 10**10),
    ],
)
def test_absurd_config_sizes_are_one_line_config_errors(field: str, value: int) -> None:
    with pytest.raises(ConfigError) as info:
        BaseModelConfig(**{**tiny_base_config().to_dict(), field: value})
    assert "exceeds the limit" in one_line(info.value)


def test_drafter_exit_dim_is_capped() -> None:
    with pytest.raises(ConfigError) as info:
        init_drafter(tiny_base_config(), exit_dim=10**9)
    assert "exit_dim" in one_line(info.value)


def test_drafter_config_exit_dim_mismatching_its_file_is_refused(tmp_path: Path) -> None:
    from redrafter.models.checkpoints import load_drafter

    save_drafter(init_drafter(tiny_base_config()), tmp_path / "d")
    config = json.loads((tmp_path / "d" / "config.json").read_text())
    (tmp_path / "d" / "config.json").write_text(json.dumps({**config, "exit_dim": 100_000}))
    with pytest.raises(CheckpointError) as info:
        load_drafter(tmp_path / "d")
    one_line(info.value)


# --------------------------------------------------------------------------- tokenizers


def test_corrupt_tokenizer_is_reported_as_corrupt(tmp_path: Path) -> None:
    folder = write_hf_checkpoint(tiny_base(), tmp_path / "base")
    assert find_tokenizer(folder) is not None
    (folder / "tokenizer.json").write_text('{"model": {"type": "WordLevel", "vocab": ')
    with pytest.raises(TokenizerError) as info:
        find_tokenizer(folder)
    assert "cannot be read" in one_line(info.value)
    (folder / "tokenizer.json").unlink()
    assert find_tokenizer(folder) is None  # no tokenizer at all: id prompts still work


def test_chat_template_output_is_capped(tmp_path: Path) -> None:
    folder = write_hf_checkpoint(tiny_base(), tmp_path / "base")
    bomb = "{% for i in range(100000) %}{% for j in range(100000) %}w1 {% endfor %}{% endfor %}"
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": bomb}))
    tokenizer = load_tokenizer(folder)
    start = time.perf_counter()
    with pytest.raises(TokenizerError) as info:
        tokenizer.chat_prompt("w2 w3")
    assert "rendered more than" in one_line(info.value)
    assert time.perf_counter() - start < 10


# --------------------------------------------------------------------------- export's --out


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    return write_hf_checkpoint(tiny_base(), tmp_path / "base")


def test_overwrite_refuses_the_input_checkpoint(checkpoint: Path) -> None:
    before = sorted(p.name for p in checkpoint.iterdir())
    for out in (checkpoint, checkpoint.parent):
        with pytest.raises(OutputPathError) as info:
            export_bundle(checkpoint, out, overwrite=True)
        assert "input checkpoint" in one_line(info.value)
    assert sorted(p.name for p in checkpoint.iterdir()) == before


def test_overwrite_refuses_anything_but_a_bundle(tmp_path: Path, checkpoint: Path) -> None:
    user = tmp_path / "notes"
    user.mkdir()
    (user / "todo.txt").write_text("keep me")
    file = tmp_path / "file.txt"
    file.write_text("keep me too")
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "manifest.json").write_text("[1, 2]")
    link = tmp_path / "link"
    link.symlink_to(user)
    for out in (user, file, fake, link):
        with pytest.raises(OutputPathError) as info:
            export_bundle(checkpoint, out, overwrite=True)
        assert "not a" in one_line(info.value)
    assert (user / "todo.txt").read_text() == "keep me"
    assert file.read_text() == "keep me too"


def _write_tiny_bundle(tmp: Path, marker: str) -> None:
    (tmp / BASE_ONNX).parent.mkdir(parents=True)
    (tmp / BASE_ONNX).write_text(marker)
    write_manifest(tmp, Manifest.from_dict({**manifest_dict(), "files": {}}, "m"))


def test_atomic_directory_respects_the_umask_and_cleans_stale_writers(tmp_path: Path) -> None:
    out = tmp_path / "b"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    stale = tmp_path / f".b.tmp-{dead}-abc"
    stale.mkdir()
    live = tmp_path / f".b.tmp-{os.getppid()}-abc"  # a live process's: left alone
    live.mkdir()
    foreign = tmp_path / ".b.tmp-notapid"
    foreign.mkdir()
    previous = os.umask(0o027)
    try:
        with atomic_directory(out, overwrite=False) as tmp:
            _write_tiny_bundle(tmp, "new")
    finally:
        os.umask(previous)
    assert (out.stat().st_mode & 0o777) == 0o750
    assert load_bundle(out).has(BASE_ONNX)
    assert not stale.exists() and live.exists() and foreign.exists()
    assert stale_copies(out) == []


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS])
def test_full_or_read_only_disk_is_one_line(tmp_path: Path, code: int, monkeypatch) -> None:
    out = tmp_path / "b"
    with pytest.raises(BundleError) as info:
        with atomic_directory(out, overwrite=False) as tmp:
            raise OSError(code, os.strerror(code), str(tmp / "x"))
    assert os.strerror(code) in one_line(info.value)
    assert not out.exists() and list(tmp_path.iterdir()) == []

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise OSError(code, os.strerror(code), str(out))

    monkeypatch.setattr(checkpoints, "save_file", refuse)
    with pytest.raises(CheckpointError) as info2:
        save_drafter(init_drafter(tiny_base_config()), tmp_path / "d")
    assert os.strerror(code) in one_line(info2.value)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- concurrent callers


PROMPTS = [[3, 7, 9], [5, 11, 2, 8, 40, 33, 21], [12], [30, 31, 32, 33, 34]]


def _concurrent_matches_sequential(pipe: Pipeline, rounds: int = 2) -> None:
    options = DecodeOptions(max_new_tokens=12, beam=BeamShape(3, 4))
    expected = [pipe.generate([p], options).token_ids[0] for p in PROMPTS]
    results: dict[tuple[int, int], list[int]] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(PROMPTS))

    def worker(i: int) -> None:
        try:
            barrier.wait()
            for r in range(rounds):
                if r % 2:  # a stream iterator holds the lock for its whole life
                    steps = list(pipe.stream([PROMPTS[i]], options))
                    results[i, r] = sum((s.new_tokens[0] for s in steps), [])
                else:
                    results[i, r] = pipe.generate([PROMPTS[i]], options).token_ids[0]
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    for (i, _), got in results.items():
        assert got == expected[i], i
    assert len(results) == len(PROMPTS) * rounds


def test_threads_on_one_torch_pipeline(torch_reference) -> None:
    _concurrent_matches_sequential(Pipeline(torch_reference))


def test_threads_on_one_onnxruntime_pipeline(onnx_bundle) -> None:
    from redrafter.runtimes.onnxruntime import OnnxRuntime

    _concurrent_matches_sequential(Pipeline(OnnxRuntime(onnx_bundle, native=False)))


def test_stream_releases_the_lock_on_close_and_refuses_reentry(torch_reference) -> None:
    pipe = Pipeline(torch_reference)
    options = DecodeOptions(max_new_tokens=8, beam=BeamShape(2, 3))
    stream = pipe.stream([PROMPTS[0]], options)
    next(stream)
    with pytest.raises(ConfigError) as info:
        pipe.generate([PROMPTS[1]], options)  # same thread, own stream still open
    one_line(info.value)
    stream.close()
    assert pipe.generate([PROMPTS[1]], options).token_ids[0]
    unstarted = pipe.stream([PROMPTS[0]], options)  # never started: holds nothing
    assert pipe.generate([PROMPTS[1]], options).token_ids[0]
    del unstarted


@pytest.mark.parametrize(
    "field,value,error",
    [
        ("vocab_size", 1_500_000, CheckpointError),  # under the cap: the shape check refuses
        ("vocab_size", 4_000_000_000, ConfigError),
        ("intermediate_size", 4_000_000_000, ConfigError),
        ("max_position_embeddings", 4_000_000_000, ConfigError),
    ],
)
def test_gguf_metadata_sizes(tmp_path: Path, field: str, value: int, error: type) -> None:
    """GGUF metadata that disagrees with the file's tensors, or is absurd, is one line."""
    import dataclasses
    from types import SimpleNamespace

    from test_checkpoints import write_gguf

    model = tiny_base()
    fields = {f.name: getattr(model.config, f.name) for f in dataclasses.fields(model.config)}
    config = SimpleNamespace(**{**fields, field: value}, kv_heads=model.config.kv_heads)
    write_gguf(SimpleNamespace(config=config, state_dict=model.state_dict), tmp_path / "m.gguf")
    with pytest.raises(error) as info:
        load_base(tmp_path / "m.gguf")
    one_line(info.value)
