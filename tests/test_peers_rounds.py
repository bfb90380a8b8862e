"""benchmarks/peers.py --interleave: rounds of one repeat each merge into one result per engine
with per-round figures aligned across engines, and ratios taken per round. Hand-made figures,
no timing."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import peers  # noqa: E402


def _ours(ar: float, spec: float, *, ids: list[int] | None = None) -> dict:
    step = {"ms_per_step": 20.0}
    native = {
        "autoregressive": {"tokens_per_second": ar, "speedup": 1.0, "tokens_per_step": 1.0, **step},
        "W1 L5": {"tokens_per_second": spec, "speedup": spec / ar, "tokens_per_step": 2.5, **step},
        "other_processes_cores": 0.01,
    }
    if ids is not None:
        native["token_ids"] = ids
    return {"bundle": "b", "dtype": "float32", "label": "ours", "native": native}


def _peer(tps: float) -> dict:
    return {
        "tokens_per_second": tps,
        "label": "genai",
        "decode_tokens": 10,
        "prefill_ms_mean": 1.0,
        "other_processes_cores": 0.0,
        "token_ids": [[1, 2]],
    }


def test_merge_rounds_keeps_rounds_aligned_and_pairs_ratios() -> None:
    # Round 2 runs on a slower machine: every engine slows, the per-round ratio does not.
    rounds = [
        {"ours": _ours(50.0, 100.0, ids=[[1, 2]]), "genai-fp32": _peer(50.0)},
        {"ours": _ours(40.0, 84.0), "genai-fp32": _peer(40.0)},
        {"ours": _ours(48.0, 90.0), "genai-fp32": _peer(45.0)},
    ]
    engines = peers.merge_rounds(rounds)
    spec = engines["ours"]["native"]["W1 L5"]
    ar = engines["ours"]["native"]["autoregressive"]
    assert spec["tokens_per_second_repeats"] == [100.0, 84.0, 90.0]
    assert spec["tokens_per_second"] == 90.0 and ar["tokens_per_second"] == 48.0
    assert spec["speedup"] == pytest.approx(90.0 / 48.0)  # median over median, as run_bench has
    assert spec["speedup_repeats"] == pytest.approx([2.0, 2.1, 90.0 / 48.0])
    assert engines["ours"]["native"]["token_ids"] == [[1, 2]]  # first round's
    assert engines["genai-fp32"]["tokens_per_second_repeats"] == [50.0, 40.0, 45.0]

    payload = {"engines": engines, "interleaved": True}
    ratios = peers.summarize(payload)["ratios"]["genai-fp32"]
    assert ratios["ours_spec_over_peer"] == round(90.0 / 45.0, 2)
    assert ratios["ours_spec_over_peer_rounds"] == [2.0, 2.1, 2.0]
    assert ratios["ours_spec_over_peer_median_round"] == 2.0


def test_merge_rounds_drops_an_engine_missing_from_a_round() -> None:
    rounds = [
        {"ours": _ours(50.0, 100.0, ids=[[1]]), "genai-fp32": _peer(50.0)},
        {"ours": _ours(40.0, 84.0)},  # the peer failed in this round
    ]
    engines = peers.merge_rounds(rounds)
    assert set(engines) == {"ours"}  # a partial peer would misalign the per-round ratios
