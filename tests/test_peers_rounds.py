"""Interleaved rounds (`benchmarks.peers --interleave`, `redrafter.bench.rounds`): rounds of one
repeat each merge into one result per engine with per-round figures aligned across engines, and
ratios taken per round; token agreement is recorded as digests, never raw ids. Hand-made
figures, no timing."""

from __future__ import annotations

import hashlib

import pytest

from redrafter.bench.prompts import split_every, spread
from redrafter.bench.rounds import merge_rounds, speedup_rounds_table, summarize_engines
from redrafter.bench.shapes import beams_text, parse_beams, with_graphs
from redrafter.bench.tokens import (
    Agreement,
    compare_digests,
    compare_tokens,
    digest_rows,
    token_digest,
)
from redrafter.config import BeamShape
from redrafter.errors import ConfigError


def _ours(ar: float, spec: float, *, ids: list[list[int]] | None = None) -> dict:
    step = {"ms_per_step": 20.0}
    native = {
        "autoregressive": {"tokens_per_second": ar, "speedup": 1.0, "tokens_per_step": 1.0, **step},
        "W1 L5": {"tokens_per_second": spec, "speedup": spec / ar, "tokens_per_step": 2.5, **step},
        "other_processes_cores": 0.01,
    }
    if ids is not None:
        native["token_digests"] = digest_rows(ids)
    return {"bundle": "b", "dtype": "float32", "label": "ours", "native": native}


def _peer(tps: float, ids: list[list[int]] | None = None) -> dict:
    return {
        "tokens_per_second": tps,
        "label": "genai",
        "decode_tokens": 10,
        "prefill_ms_mean": 1.0,
        "other_processes_cores": 0.0,
        "token_digests": digest_rows(ids or [[1, 2]]),
    }


def test_merge_rounds_keeps_rounds_aligned_and_pairs_ratios() -> None:
    # Round 2 runs on a slower machine: every engine slows, the per-round ratio does not.
    rounds = [
        {"ours": _ours(50.0, 100.0, ids=[[1, 2]]), "genai-fp32": _peer(50.0)},
        {"ours": _ours(40.0, 84.0), "genai-fp32": _peer(40.0)},
        {"ours": _ours(48.0, 90.0), "genai-fp32": _peer(45.0)},
    ]
    engines = merge_rounds(rounds)
    spec = engines["ours"]["native"]["W1 L5"]
    ar = engines["ours"]["native"]["autoregressive"]
    assert spec["tokens_per_second_repeats"] == [100.0, 84.0, 90.0]
    assert spec["tokens_per_second"] == 90.0 and ar["tokens_per_second"] == 48.0
    assert spec["speedup"] == pytest.approx(90.0 / 48.0)  # median over median, as run_configs
    assert spec["speedup_repeats"] == pytest.approx([2.0, 2.1, 90.0 / 48.0])
    assert engines["ours"]["native"]["token_digests"] == digest_rows([[1, 2]])  # first round's
    assert engines["genai-fp32"]["tokens_per_second_repeats"] == [50.0, 40.0, 45.0]

    summary = summarize_engines(engines, interleaved=True)
    ratios = summary["ratios"]["genai-fp32"]
    assert ratios["ours_spec_over_peer"] == round(90.0 / 45.0, 2)
    assert ratios["ours_spec_over_peer_rounds"] == [2.0, 2.1, 2.0]
    assert ratios["ours_spec_over_peer_median_round"] == 2.0
    assert summary["ours_best_speculative"]["config"] == "native W1 L5"
    peer_row = next(r for r in summary["rows"] if r["engine"] == "genai")
    assert peer_row["same_tokens_as_ours_ar"] == "1/1 identical"  # compared by digest
    assert "W1 L5 | 2.00x, 2.10x, 1.88x" in speedup_rounds_table(engines["ours"]["native"])


def test_merge_rounds_drops_an_engine_missing_from_a_round() -> None:
    rounds = [
        {"ours": _ours(50.0, 100.0, ids=[[1]]), "genai-fp32": _peer(50.0)},
        {"ours": _ours(40.0, 84.0)},  # the peer failed in this round
    ]
    engines = merge_rounds(rounds)
    assert set(engines) == {"ours"}  # a partial peer would misalign the per-round ratios


def test_summary_prefers_the_agreement_recorded_at_run_time() -> None:
    ours, theirs = [[5, 6, 7, 8], [1, 2]], [[5, 6, 9, 9], [1, 2]]
    peer = {**_peer(40.0, theirs), "agreement_with_ours_ar": compare_tokens(ours, theirs).to_dict()}
    engines = {"ours": _ours(50.0, 100.0, ids=ours), "llamacpp": peer}
    row = summarize_engines(engines)["rows"][-1]
    assert row["same_tokens_as_ours_ar"] == "1/2 identical, mean common prefix 2"


def test_token_digests_hold_no_ids_and_compare_like_the_ids() -> None:
    d = token_digest([504, 3575, 282])
    assert d == {"tokens_sha256": hashlib.sha256(b"504,3575,282").hexdigest(), "tokens": 3}
    a, b = [[1, 2, 3], [4, 5]], [[1, 2, 3], [7, 5]]
    assert compare_digests(digest_rows(a), digest_rows(b)) == Agreement(1, 2)
    assert compare_tokens(a, b) == Agreement(1, 2, 1.5)
    assert Agreement.from_dict(compare_tokens(a, b).to_dict()).text() == (
        "1/2 identical, mean common prefix 2"
    )


def test_beam_lists_parse_and_split_by_the_bundle_graphs() -> None:
    beams = parse_beams(" 4x5, 2X5 ")
    assert beams == [BeamShape(4, 5), BeamShape(2, 5)] and beams_text(beams) == "4x5,2x5"
    assert with_graphs(beams, [BeamShape(2, 5)]) == ([BeamShape(2, 5)], [BeamShape(4, 5)])
    with pytest.raises(ConfigError, match="WxL"):
        parse_beams("4x")


def test_heldout_choice_splits_every_nth_and_spreads_picks() -> None:
    kept, held = split_every(list(range(25)), 10)
    assert held == [0, 10, 20] and len(kept) == 22
    assert spread(list(range(40)), 4) == [0, 10, 20, 30]
    assert spread(list(range(40)), 2, offset=1) == [1, 21]
