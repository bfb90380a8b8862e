"""Beam-shape lists as the benchmark scripts take them (`--beams 4x5,2x5`: W x L pairs), and
which of them a bundle can run (ONNX Runtime drafts only with exported drafter graphs)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from redrafter.config import BeamShape
from redrafter.errors import ConfigError


def parse_beams(text: str) -> list[BeamShape]:
    """'4x5,2x5' -> [BeamShape(4, 5), BeamShape(2, 5)], in the given order. Raises
    `ConfigError` naming the expected form for anything else."""
    beams = []
    for part in text.split(","):
        w, _, n = part.strip().lower().partition("x")
        if not (w.isdigit() and n.isdigit()):
            raise ConfigError(f"beam shapes {text!r}: use WxL pairs, e.g. 4x4,4x5")
        beams.append(BeamShape(int(w), int(n)))
    return beams


def beams_text(beams: Iterable[BeamShape]) -> str:
    """The inverse of `parse_beams`: [BeamShape(4, 5), BeamShape(2, 5)] -> '4x5,2x5'."""
    return ",".join(f"{b.width}x{b.length}" for b in beams)


def with_graphs(
    beams: Sequence[BeamShape], available: Iterable[BeamShape]
) -> tuple[list[BeamShape], list[BeamShape]]:
    """(usable, missing): the requested shapes that have a drafter graph in `available` (a
    bundle's `drafter_graphs`), in the requested order, and those that have none."""
    have = set(available)
    return [b for b in beams if b in have], [b for b in beams if b not in have]
