"""`redrafter.demo.ensure_drafter` with a recipe: one drafter folder per recipe, the base's
answers cached by the fields that shape them and shared between recipes that differ only in
training (benchmarks.large_drafter relies on both); the demo's prompt choice (training vs
held-out entries) and its data lookup."""

from __future__ import annotations

import collections
import gzip
import hashlib
import json

import pytest

from redrafter import demo
from redrafter.demo import data as demo_data
from redrafter.errors import RedrafterError
from redrafter.train.prompts import Prompt, rotating_templates

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
    # The demo's prompts are chats: the tiny tokenizer needs a template (a plain one will do).
    template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    (gguf_like / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    data = _shared_data(tmp_path / "data")
    monkeypatch.setattr(demo_data, "find_shared_data", lambda *a, **k: data)
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
        texts = [f"{p.chat}{p.text}" for p in demo_data.training_prompts(data, count=count)]
        return hashlib.sha256("\n".join(texts).encode()).hexdigest()[:16]

    assert digest(30) == "8f4b467c55e6d835" and digest(60) == "cd3fefa1874acaef"
    large = demo_data.training_prompts(data, count=250)  # before: at most 138 distinct
    assert len({p.text for p in large}) == 250
    asked = collections.Counter(p.text.split("'")[1] for p in large if "'w" in p.text)
    assert max(asked.values()) > 1  # the same term, other words


def test_benchmark_and_heldout_prompts_never_come_from_training_entries(tmp_path):
    data = _shared_data(tmp_path / "data")
    trained = {p.text for p in demo_data.training_prompts(data, count=60)}
    held = demo_data.heldout_shared_prompts(3, 2, data_dir=data)
    assert [p.chat for p in held] == [True, True, True, False, False]
    assert held[0] == Prompt("Explain the computing slang term 'w0'.")
    assert [p.text.split("'")[1] for p in held[:3]] == ["w0", "w10", "w20"]  # every 10th entry
    assert held[3].text.startswith("def f6():")  # the first of the last 14 tasks
    assert not trained & {p.text for p in held}
    for p in demo_data.heldout_prompts(data, count=6):
        assert p.text not in trained
    shared = demo_data.shared_prompts(2, 1, offset=1, data_dir=data)
    assert [p.text for p in shared[:2]] == [
        "Explain the computing slang term 'w1'.",
        "Explain the computing slang term 'w21'.",
    ]


def test_missing_demo_data_is_one_line_naming_the_files_and_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("REDRAFTER_SHARED_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(RedrafterError) as err:
        demo.find_shared_data()
    message = str(err.value)
    assert "\n" not in message
    assert "entries.jsonl" in message and "HumanEval.jsonl.gz" in message
    assert "REDRAFTER_SHARED_DATA" in message


def test_rotating_templates_ask_each_record_in_each_template_once_per_pass():
    records = [{"term": "a"}, {"term": "b"}]
    got = rotating_templates(records, ("X {term}", "Y {term}"))
    assert [p.text for p in got] == ["X a", "Y b", "Y a", "X b"]
    plain = rotating_templates(records, ("X {term}",), chat=False)
    assert [(p.text, p.chat) for p in plain] == [("X a", False), ("X b", False)]
