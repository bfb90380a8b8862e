"""Writing and reading a bundle directory (docs/bundle.md): the atomic writer, checksums, and
the loader with every check a reader relies on.

A loaded `Bundle` promises: the manifest parses into a typed `Manifest` of a known format and
op version; every path it names is relative, normalised and inside the bundle; no file in the
bundle is a symlink; every graph a runtime opens is listed in `files`; and every listed file has
the recorded size and sha256.

The writer (`atomic_directory`) promises: `out` is, at every instant, absent, the previous
bundle, or the new complete one; `--overwrite` replaces only an existing bundle; new bundles get
the umask's mode; a full or read-only disk is a one-line `BundleError`; temp folders of killed
writers are cleaned by the next write to the same place.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from redrafter.bundle.manifest import BundleError, FileRecord, Manifest
from redrafter.bundle.names import BASE_ONNX, MANIFEST
from redrafter.config import BaseModelConfig, BeamShape, DrafterConfig
from redrafter.errors import RedrafterError
from redrafter.files import make_temp_dir, stale_copies, swap_into_place
from redrafter.version import __version__


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class OutputPathError(BundleError):
    """An export's output path holds something that is not a bundle (or holds its inputs)."""


def check_replaceable(out: Path) -> None:
    """Raise OutputPathError unless `out` may be replaced by an export: it must be an existing
    bundle (a real directory whose manifest.json parses as a bundle manifest), never a file,
    a symlink or any other directory (a model folder, a home directory)."""
    out = Path(out)
    fix = "choose a new --out path (--overwrite only replaces an existing bundle)"
    if out.is_symlink() or not out.is_dir():
        raise OutputPathError(f"{out} exists and is not a bundle directory; {fix}")
    try:
        Manifest.from_dict(json.loads((out / MANIFEST).read_text()), str(out))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, BundleError, RedrafterError):
        raise OutputPathError(
            f"{out} exists and is not a bundle this redrafter can replace (no readable "
            f"{MANIFEST}); {fix}, or delete it yourself"
        ) from None


@contextlib.contextmanager
def atomic_directory(out: Path, *, overwrite: bool) -> Iterator[Path]:
    """Yield a temp dir `.NAME.tmp-PID-*` beside `out`; on success rename it into place, on any
    failure remove it. An existing `out` is replaced only with `overwrite`, only if it is a
    bundle (`check_replaceable`), and only after the new one is complete. The new bundle gets
    the mode the umask gives a new folder. Temp folders of killed exports to the same `out`
    (`redrafter.files.stale_copies`) are removed after a successful write. A read-only or full
    disk is a one-line BundleError."""
    out = Path(out)
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise BundleError(f"{out} already exists; pass --overwrite to replace it")
        check_replaceable(out)
    tmp: Path | None = None
    try:
        tmp = make_temp_dir(out)
        yield tmp
        swap_into_place(tmp, out)
        tmp = None
        for stale in stale_copies(out):
            shutil.rmtree(stale, ignore_errors=True)
    except OSError as e:
        raise BundleError(
            f"{out}: cannot write the bundle ({e.strerror or e}: {e.filename or out}); free disk "
            "space or choose a writable --out"
        ) from None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def exporter_fingerprint() -> str:
    """A hash of the code that decides what an export writes (redrafter/models, redrafter/export,
    redrafter/bundle): caches of exported bundles (make demo, benchmarks) compare it to
    re-export after a change, since the version number does not move with every commit."""
    package = Path(__file__).resolve().parent.parent
    digest = hashlib.sha256()
    for folder in ("models", "export", "bundle"):
        for path in sorted((package / folder).glob("*.py")):
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def write_manifest(root: Path, manifest: Manifest) -> Manifest:
    """Checksum every file under `root`, write manifest.json there and return the manifest as
    written (with `files`, the version and the exporter fingerprint filled in)."""
    files = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST):
        rel = path.relative_to(root).as_posix()
        files[rel] = FileRecord(sha256(path), path.stat().st_size)
    manifest = dataclasses.replace(
        manifest, files=files, redrafter_version=__version__, exporter=exporter_fingerprint()
    )
    (root / MANIFEST).write_text(json.dumps(manifest.to_dict(), indent=2) + "\n")
    return manifest


@dataclasses.dataclass(frozen=True)
class Bundle:
    """A verified bundle on disk (see `load_bundle`)."""

    root: Path
    manifest: Manifest

    @property
    def base_config(self) -> BaseModelConfig:
        return self.manifest.base_config

    @property
    def drafter_config(self) -> DrafterConfig | None:
        return self.manifest.drafter_config

    @property
    def beam(self) -> BeamShape:
        return self.manifest.beam

    @property
    def drafter_graphs(self) -> dict[BeamShape, str]:
        """Beam shape -> the ONNX drafter graph exported for it (relative path)."""
        return {d.beam: d.file for d in self.manifest.drafters}

    @property
    def packing(self) -> str:
        return self.manifest.packing

    @property
    def dtype(self) -> str:
        """The ONNX graphs' float type (activations, caches; weights unless quantized)."""
        return self.manifest.dtype

    @property
    def precision(self) -> str:
        """What parity holds the ONNX graphs to: 'int4'/'int8' (quantized weights) or dtype."""
        q = self.manifest.quantization
        return self.manifest.dtype if q is None else q.weights

    def has(self, rel: str) -> bool:
        """Whether the bundle lists (and so has checked) the file `rel`."""
        return rel in self.manifest.files

    def has_tree(self, rel: str) -> bool:
        """Whether the bundle lists files under the directory `rel` (a Core ML package)."""
        return any(f.startswith(rel.rstrip("/") + "/") for f in self.manifest.files)

    def path(self, rel: str) -> Path:
        """The file `rel` of the bundle (or a listed directory); refuses anything unlisted, so a
        runtime never opens a file the checksums did not cover."""
        if not (self.has(rel) or self.has_tree(rel)):
            raise BundleError(
                f"{self.root}: {rel} is not listed in the manifest's files; re-export the bundle"
            )
        return self.root / rel


def _check_tree(root: Path) -> None:
    """No symlinks anywhere in the bundle: a link could point a checked name outside it."""
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            path = Path(dirpath) / name
            if path.is_symlink():
                raise BundleError(
                    f"{root}: {path.relative_to(root)} is a symlink; a bundle holds plain files "
                    "only (re-export it, or copy it with links resolved)"
                )


def _check_graphs_listed(root: Path, manifest: Manifest) -> None:
    """Every graph a runtime opens must be among the checksummed files."""
    wanted = [d.file for d in manifest.drafters]
    if "onnx" in manifest.targets:
        wanted.append(BASE_ONNX)
    for rel in wanted:
        if rel not in manifest.files:
            raise BundleError(
                f"{root}: graph {rel} is not listed (with a checksum) in the manifest's files; "
                "re-export the bundle"
            )
    if manifest.coreml is not None:
        for rel in manifest.coreml.files.values():
            if not any(f.startswith(rel + "/") for f in manifest.files):
                raise BundleError(
                    f"{root}: Core ML package {rel} has no files listed in the manifest; "
                    "re-export the bundle"
                )


def load_bundle(path: str | Path, *, verify_checksums: bool = True) -> Bundle:
    """Read and check a bundle (see the module docstring for what is checked)."""
    root = Path(path)
    mf = root / MANIFEST
    if not mf.is_file():
        raise BundleError(
            f"{root} is not a bundle ({MANIFEST} missing); create one with `redrafter export`"
        )
    try:
        raw = json.loads(mf.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{mf} is not valid JSON ({e}); re-export the bundle") from None
    manifest = Manifest.from_dict(raw, str(root))
    _check_tree(root)
    _check_graphs_listed(root, manifest)
    for rel, meta in manifest.files.items():
        file = root / rel
        if not file.is_file():
            raise BundleError(
                f"{root}: file {rel} listed in the manifest is missing; re-export the bundle"
            )
        if file.stat().st_size != meta.bytes or (verify_checksums and sha256(file) != meta.sha256):
            raise BundleError(
                f"{root}: checksum mismatch for {rel} (modified or truncated); re-export the bundle"
            )
    return Bundle(root, manifest)
