"""Which beam shapes `redrafter bench` runs: the bundle's drafter graphs, narrowed by the
requested widths and lengths (any shape at all on the torch reference, which needs no graph)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from redrafter.config import BeamShape
from redrafter.errors import ConfigError


def select_beams(
    available: Iterable[BeamShape],
    widths: Sequence[int] | None = None,
    lengths: Sequence[int] | None = None,
    *,
    any_shape: bool = False,
) -> list[BeamShape]:
    """The beam shapes to benchmark, in the bundle's order.

    `available`: the (W, L) shapes the bundle has drafter graphs for; `widths`/`lengths`: the
    values asked for (None = any). Without `any_shape` (ONNX Runtime runs only exported
    graphs), every asked (W, L) pair must have a graph. With `any_shape` (the torch reference
    drafts any shape) and both lists given, their product is the selection, sorted. Raises
    `ConfigError` for a bundle without drafter graphs, a missing shape, or an empty selection.
    """
    available = list(available)
    if not available:
        raise ConfigError("this bundle has no drafter graph: nothing to compare")
    beams = [
        b
        for b in available
        if (widths is None or b.width in widths) and (lengths is None or b.length in lengths)
    ]
    wanted = {(w, n) for w in (widths or []) for n in (lengths or [])}
    missing = sorted(wanted - {(b.width, b.length) for b in available})
    if missing and not any_shape:
        raise ConfigError(
            f"the bundle has no drafter graph for (W, L) {missing}; re-export with "
            f"--beam-width {_comma_list(widths)} --beam-length {_comma_list(lengths)}"
        )
    if any_shape and wanted:
        beams = [BeamShape(w, n) for w, n in sorted(wanted)]
    if not beams:
        raise ConfigError("no beam shape selected; check --beam-width/--beam-length")
    return beams


def _comma_list(values: Sequence[int] | None) -> str:
    """[1, 2, 4] -> '1,2,4', as the `--beam-width`/`--beam-length` flags take them."""
    return ",".join(str(v) for v in values or ())
