"""`redrafter.demo.ensure_drafter` with a recipe: one drafter folder per recipe, the base's
answers cached by the fields that shape them and shared between recipes that differ only in
training (benchmarks/large_drafter.py relies on both)."""

from __future__ import annotations

import collections
import gzip
import hashlib
import json

import redrafter.train.prompts as prompts
from redrafter import demo

from conftest import tiny_base, write_hf_checkpoint


def _shared_data(folder):
    (folder / "jargon-file").mkdir(parents=True)
    entries = [{"term": f"w{i}", "text": f"w{i} w{i + 1}"} for i in range(40)]
    (folder / "jargon-file" / "entries.jsonl").write_text(
        "".join(json.dumps(e) + "\n" for e in entries)
    )
    (folder / "humaneval").mkdir()
    tasks = [
        {"prompt": f"def f{i}():\n    '''w{i} w3.'''\n", "entry_point": f"f{i}"} for i in range(20)
    ]
    with gzip.open(folder / "humaneval" / "HumanEval.jsonl.gz", "wt") as f:
        f.writelines(json.dumps(t) + "\n" for t in tasks)
    return folder


def test_ensure_drafter_caches_per_recipe_and_shares_answers(tmp_path, monkeypatch):
    gguf_like = write_hf_checkpoint(tiny_base(), tmp_path / "base")  # any base format loads
    data = _shared_data(tmp_path / "data")
    monkeypatch.setattr(prompts, "find_shared_data", lambda *a, **k: data)
    cache = tmp_path / "cache"
    small = {
        **demo.RECIPE,
        "train_prompts": 6,
        "heldout_prompts": 2,
        "seq_len": 8,
        "epochs": 1,
        "batch_size": 16,
        "draft_vocab": None,
    }
    first = demo.ensure_drafter(gguf_like, cache, small)
    state = json.loads((first / "trainer_state.json").read_text())
    assert state["step"] == state["total_steps"] > 0
    assert state["options"]["num_layers"] == small["num_layers"]
    answers = list((cache / "examples").iterdir())
    assert len(answers) == 1
    stamp = (answers[0] / "meta.json").stat().st_mtime_ns

    trained_at = (first / "model.safetensors").stat().st_mtime_ns
    assert demo.ensure_drafter(gguf_like, cache, small) == first
    assert (first / "model.safetensors").stat().st_mtime_ns == trained_at  # cached: not retrained

    deeper = demo.ensure_drafter(gguf_like, cache, {**small, "num_layers": 2})
    assert deeper != first
    assert json.loads((deeper / "trainer_state.json").read_text())["options"]["num_layers"] == 2
    assert list((cache / "examples").iterdir()) == answers  # same answers, reused
    assert (answers[0] / "meta.json").stat().st_mtime_ns == stamp

    more = demo.ensure_drafter(gguf_like, cache, {**small, "train_prompts": 8})
    assert more not in (first, deeper)
    assert len(list((cache / "examples").iterdir())) == 2  # more prompts: new answers


def test_training_prompts_grow_past_one_question_per_term_and_keep_smaller_sets(tmp_path):
    """Counts beyond one question per Jargon term ask about the same terms in other templates'
    words; counts one pass covers get exactly the prompts earlier versions gave (their cached
    answers are keyed by the count, not the prompts), pinned by the old code's digests."""
    data = _shared_data(tmp_path / "data")  # 36 training terms, 6 code tasks, 90 general

    def digest(count: int) -> str:
        texts = [f"{p.chat}{p.text}" for p in prompts.training_prompts(data, count=count)]
        return hashlib.sha256("\n".join(texts).encode()).hexdigest()[:16]

    assert digest(30) == "8f4b467c55e6d835" and digest(60) == "cd3fefa1874acaef"
    large = prompts.training_prompts(data, count=250)  # before: at most 138 distinct
    assert len({p.text for p in large}) == 250
    asked = collections.Counter(p.text.split("'")[1] for p in large if "'w" in p.text)
    assert max(asked.values()) > 1  # the same term, other words
