"""The bundle (DESIGN.md §5): a directory written atomically, with a checksummed manifest.

manifest.json   format version, configs, beam shape, dtype, opset, custom-op domain/version,
                sha256 and size of every file, export-time parity summary
tokenizer/      tokenizer.json (+ tokenizer_config.json)
onnx/           base.onnx (+ .data), drafter.onnx (+ .data)
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from redrafter.config import BaseModelConfig, BeamShape, DrafterConfig
from redrafter.errors import RedrafterError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
KNOWN_OP_DOMAINS = {("redrafter", 1), ("redrafter", 2)}  # 1: head-major; 2: + rotary, layout


class BundleError(RedrafterError):
    """A bundle is missing, incomplete, tampered with, or from an unknown format version."""


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@contextlib.contextmanager
def atomic_directory(out: Path, *, overwrite: bool) -> Iterator[Path]:
    """Yield a temp dir beside `out`; on success rename it into place, on any failure remove it.
    An existing `out` is replaced only with `overwrite`, and only after the new one is complete."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise BundleError(f"{out} already exists; pass --overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def exporter_fingerprint() -> str:
    """A hash of the code that decides what an export writes (redrafter/models, redrafter/export):
    caches of exported bundles (make demo, benchmarks) compare it to re-export after a change,
    since the version number does not move with every commit."""
    package = Path(__file__).resolve().parent.parent
    digest = hashlib.sha256()
    for folder in ("models", "export"):
        for path in sorted((package / folder).glob("*.py")):
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def write_manifest(root: Path, fields: dict[str, Any]) -> dict[str, Any]:
    """Checksum every file under `root` and write manifest.json there."""
    files = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST):
        rel = path.relative_to(root).as_posix()
        files[rel] = {"sha256": sha256(path), "bytes": path.stat().st_size}
    from redrafter import __version__

    manifest = {
        "format_version": FORMAT_VERSION,
        "redrafter_version": __version__,
        "exporter": exporter_fingerprint(),
        **fields,
        "files": files,
    }
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


@dataclasses.dataclass(frozen=True)
class Bundle:
    """A verified bundle on disk."""

    root: Path
    manifest: dict[str, Any]

    @property
    def base_config(self) -> BaseModelConfig:
        return BaseModelConfig.from_dict(self.manifest["base"]["config"], where=str(self.root))

    @property
    def drafter_config(self) -> DrafterConfig | None:
        raw = self.manifest.get("drafter")
        return None if raw is None else DrafterConfig.from_dict(raw["config"], where=str(self.root))

    @property
    def beam(self) -> BeamShape:
        b = self.manifest["beam"]
        return BeamShape(int(b["width"]), int(b["length"]))

    @property
    def drafter_graphs(self) -> dict[BeamShape, str]:
        """Beam shape -> the drafter graph exported for it (relative path)."""
        return {
            BeamShape(int(d["width"]), int(d["length"])): d["file"]
            for d in self.manifest.get("drafters") or []
        }

    @property
    def packing(self) -> str:
        return str(self.manifest["packing"])

    @property
    def dtype(self) -> str:
        return str(self.manifest["dtype"])

    def path(self, rel: str) -> Path:
        return self.root / rel

    def has(self, rel: str) -> bool:
        return rel in self.manifest["files"]


def load_bundle(path: str | Path, *, verify_checksums: bool = True) -> Bundle:
    """Read and check a bundle: manifest present and parseable, known format version and op
    domain, every listed file present with the recorded size and sha256."""
    root = Path(path)
    mf = root / MANIFEST
    if not mf.is_file():
        raise BundleError(
            f"{root} is not a bundle ({MANIFEST} missing); create one with `redrafter export`"
        )
    try:
        manifest = json.loads(mf.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{mf} is not valid JSON ({e}); re-export the bundle") from None
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise BundleError(
            f"{root}: bundle format version {version!r} is not supported (this "
            f"redrafter reads version {FORMAT_VERSION}); re-export the bundle"
        )
    op = manifest.get("custom_op", {})
    if (op.get("domain"), op.get("version")) not in KNOWN_OP_DOMAINS:
        raise BundleError(
            f"{root}: unknown custom-op domain {op.get('domain')!r} version "
            f"{op.get('version')!r}; re-export with this redrafter"
        )
    for rel, meta in manifest.get("files", {}).items():
        file = root / rel
        if not file.is_file():
            raise BundleError(
                f"{root}: file {rel} listed in the manifest is missing; re-export the bundle"
            )
        if file.stat().st_size != meta["bytes"] or (
            verify_checksums and sha256(file) != meta["sha256"]
        ):
            raise BundleError(
                f"{root}: checksum mismatch for {rel} (modified or truncated); re-export the bundle"
            )
    return Bundle(root, manifest)
