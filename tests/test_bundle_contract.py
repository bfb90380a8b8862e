"""The bundle contract (redrafter/bundle/, docs/bundle.md): the typed manifest round-trips
through JSON, and the loader refuses every way a manifest could point outside the bundle or
skip the checksums. Bundles here are hand-made (placeholder graph files): the loader checks
names, paths and checksums, not graph contents."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from redrafter.bundle import (
    BundleError,
    DrafterGraph,
    Manifest,
    load_bundle,
    write_manifest,
)
from redrafter.bundle import names as n
from redrafter.config import BeamShape

from conftest import tiny_manifest

BEAM = BeamShape(2, 3)


def make_bundle(root: Path) -> Manifest:
    """A bundle directory with placeholder graphs, a valid checksummed manifest."""
    (root / n.ONNX_DIR).mkdir(parents=True)
    for rel in (n.BASE_ONNX, n.drafter_graph_file(BEAM), n.WEIGHTS_DATA):
        (root / rel).write_bytes(rel.encode())
    manifest = tiny_manifest(beam=BEAM, drafters=(DrafterGraph(BEAM, n.drafter_graph_file(BEAM)),))
    return write_manifest(root, manifest)


def edit_manifest(root: Path, change) -> None:  # type: ignore[no-untyped-def]
    raw = json.loads((root / n.MANIFEST).read_text())
    change(raw)
    (root / n.MANIFEST).write_text(json.dumps(raw))


def test_manifest_round_trips_through_json(tmp_path: Path) -> None:
    written = make_bundle(tmp_path / "b")
    loaded = load_bundle(tmp_path / "b")
    assert loaded.manifest == written
    assert Manifest.from_dict(written.to_dict(), "x") == written
    assert loaded.drafter_graphs == {BEAM: "onnx/drafter-w2-l3.onnx"}
    assert loaded.manifest.total_bytes == sum(f.bytes for f in written.files.values())


@pytest.mark.parametrize(
    "bad",
    ["../../x/drafter.onnx", "/etc/passwd", "onnx/../../drafter.onnx", "onnx//d.onnx", "./a"],
)
def test_drafter_graph_paths_stay_inside(tmp_path: Path, bad: str) -> None:
    make_bundle(tmp_path / "b")
    edit_manifest(tmp_path / "b", lambda m: m["drafters"][0].update(file=bad))
    with pytest.raises(BundleError, match="not a normalised path inside the bundle"):
        load_bundle(tmp_path / "b")


@pytest.mark.parametrize("bad", ["/etc/passwd", "../outside.data"])
def test_listed_files_stay_inside(tmp_path: Path, bad: str) -> None:
    make_bundle(tmp_path / "b")
    entry = {"sha256": "0" * 64, "bytes": 1}
    edit_manifest(tmp_path / "b", lambda m: m["files"].update({bad: entry}))
    with pytest.raises(BundleError, match="inside the bundle"):
        load_bundle(tmp_path / "b")


def test_a_graph_left_out_of_the_checksums_is_refused(tmp_path: Path) -> None:
    make_bundle(tmp_path / "b")
    edit_manifest(tmp_path / "b", lambda m: m["files"].pop("onnx/drafter-w2-l3.onnx"))
    with pytest.raises(BundleError, match="not listed"):
        load_bundle(tmp_path / "b")


def test_symlinks_are_refused(tmp_path: Path) -> None:
    make_bundle(tmp_path / "b")
    outside = tmp_path / "elsewhere.onnx"
    outside.write_bytes(b"x")
    (tmp_path / "b" / "onnx" / "extra.onnx").symlink_to(outside)
    with pytest.raises(BundleError, match="symlink"):
        load_bundle(tmp_path / "b")


def test_tampering_is_refused(tmp_path: Path) -> None:
    make_bundle(tmp_path / "b")
    (tmp_path / "b" / n.BASE_ONNX).write_bytes(b"changed!" * 2)
    with pytest.raises(BundleError, match="checksum mismatch for onnx/base.onnx"):
        load_bundle(tmp_path / "b")


def test_a_missing_or_mistyped_field_is_named(tmp_path: Path) -> None:
    make_bundle(tmp_path / "b")
    edit_manifest(tmp_path / "b", lambda m: m.pop("packing"))
    with pytest.raises(BundleError, match="'packing' is missing"):
        load_bundle(tmp_path / "b")
    make_bundle(tmp_path / "c")
    edit_manifest(tmp_path / "c", lambda m: m["beam"].update(width="2"))
    with pytest.raises(BundleError, match="'width' = '2' has the wrong type"):
        load_bundle(tmp_path / "c")


def test_unlisted_files_cannot_be_opened(tmp_path: Path) -> None:
    make_bundle(tmp_path / "b")
    bundle = load_bundle(tmp_path / "b")
    assert bundle.path(n.BASE_ONNX) == tmp_path / "b" / n.BASE_ONNX
    with pytest.raises(BundleError, match="not listed"):
        bundle.path("onnx/other.onnx")
