"""Drafter training (redrafter/train): the indexing that makes trained drafts acceptable, the
reduced draft vocabulary, the loss falling, a trained drafter accepted by the real driver,
resuming, Apple's layout, and one-line errors for bad data. Tiny models, one thread."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

from redrafter.cli import main
from redrafter.config import LOG_0, BeamShape, DrafterConfig
from redrafter.decoding.beam_search import beam_search
from redrafter.models.checkpoints import check_drafter_fits, load_drafter
from redrafter.models.drafter import Drafter, warp_log_probs
from redrafter.train.evaluate import heldout_metrics, tokens_per_step
from redrafter.train.loss import unroll
from redrafter.train.teacher import distill_examples, examples_from_trace, teacher_forced
from redrafter.train.trainer import TrainOptions, build_drafter, train_drafter
from redrafter.train.vocab import choose_draft_vocab

from conftest import WORDS, tiny_base, write_hf_checkpoint

APPLE_NAMES = {
    "lm_head.0.linear.weight",
    "lm_head.0.linear.bias",
    "lm_head.1.weight",
    "rnn_u.weight",
    "rnn_u.bias",
    "rnn_w.weight",
    "input_proj.weight",
    "input_proj.bias",
}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matmuls on 2 threads spend their time in OpenMP hand-offs (60x slower on a busy
    machine); one thread keeps this file fast."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, 61, (5,), generator=g).tolist() for _ in range(n)]


@pytest.fixture(scope="module")
def distilled():
    """A tiny base, its greedy answers to 8 prompts, and a drafter trained on them (K=3)."""
    torch.set_num_threads(1)
    base = tiny_base()
    prompts = _prompts(8)
    examples, answers = distill_examples(
        base, prompts, predict_tokens=3, max_new_tokens=40, eos_token_ids=(), top_c=4
    )
    options = TrainOptions(
        mode="distill", steps=250, batch_size=64, lr=1e-2, predict_tokens=3, init="random",
        draft_vocab=48, eval_beam=BeamShape(4, 4), eval_max_new_tokens=32, bf16=False,
    )  # fmt: skip
    return base, prompts, examples, answers, options


# --------------------------------------------------------------------------- indexing


def test_examples_follow_apples_indexing() -> None:
    """Context j reads x_{t+1} = next[j] first and predicts next[j+1], next[j+2], ...; the
    teacher row for step k is the distribution of next[j+k]."""
    contexts = torch.arange(3.0)[:, None].expand(3, 2)  # (n=3, E=2)
    next_tokens = torch.tensor([5, 6, 7])
    top_ids = torch.tensor([[50], [60], [70]])
    ex = examples_from_trace(
        contexts, next_tokens, predict_tokens=2, top_ids=top_ids, top_logp=torch.zeros(3, 1)
    )
    assert ex.tokens.tolist() == [[5, 6, 7], [6, 7, -1], [7, -1, -1]]
    assert ex.teacher_ids is not None
    assert ex.teacher_ids[:, :, 0].tolist() == [[60, 70], [70, -1], [-1, -1]]


def test_generated_answers_match_greedy_decoding() -> None:
    """The distillation targets are exactly the driver's greedy autoregressive tokens."""
    from redrafter.decoding import AUTOREGRESSIVE, decode
    from redrafter.runtimes.torch import TorchRuntime

    base = tiny_base()
    prompts = [[3, 4, 5], [9, 8, 7, 6, 10]]
    _, answers = distill_examples(
        base, prompts, predict_tokens=2, max_new_tokens=12, eos_token_ids=()
    )
    for p, answer in zip(prompts, answers, strict=True):
        steps = decode(TorchRuntime(base), [p], AUTOREGRESSIVE.replace(max_new_tokens=12))
        assert sum((s.new_tokens[0] for s in steps), []) == answer


@pytest.mark.parametrize("scale", [None, 0.3])
@pytest.mark.parametrize(("window", "softcap"), [(0, 0.0), (1, 0.0), (4, 0.0), (4, 2.0), (0, 2.0)])
def test_one_token_attention_is_attend(window: int, softcap: float, scale) -> None:
    """The teacher's one-token attention is the model's `attend` with the same attributes: rows
    at positions 0, 3 and 9 (a window of 4 hides most of the last row's cache, none of the
    first's), grouped queries, the new key/value written in place at each row's slot."""
    from redrafter.models.attention import attend
    from redrafter.train.teacher import decode_attention

    g = torch.Generator().manual_seed(0)
    B, Hq, Hkv, S, D = 3, 4, 2, 12, 8
    past = torch.tensor([0, 3, 9])
    q, k, v = (torch.randn(B, h, 1, D, generator=g) for h in (Hq, Hkv, Hkv))
    cache = torch.randn(2, B, Hkv, S, D, generator=g)  # slots past P hold junk, never read
    one = torch.ones(B, 1, 1, dtype=torch.bool)
    attrs = dict(scale=scale, window=window, softcap=softcap)
    want, want_k, want_v = attend(q, k, v, *cache.clone(), past, one, **attrs)
    got, got_k, got_v = decode_attention(q, k, v, *cache.clone(), past, one, **attrs)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    assert torch.equal(got_k, want_k) and torch.equal(got_v, want_v)
    if window or softcap:  # the attributes matter here: dropping them moves the output
        plain = decode_attention(q, k, v, *cache.clone(), past, one, scale=scale)[0]
        assert (plain - want).abs().max() > 1e-2


@pytest.mark.parametrize("draft_vocab", [None, 40])
def test_training_unroll_is_what_the_beam_search_computes(draft_vocab) -> None:
    """W=1 beam search from (h, g0) equals the teacher-forced unroll fed the beam's own
    tokens: same logits per step, so what training teaches is what inference drafts."""
    base = tiny_base()
    config = DrafterConfig(
        vocab_size=61, hidden_size=32, exit_dim=24, num_draft_layers=1,
        draft_vocab_size=draft_vocab,
    )  # fmt: skip
    torch.manual_seed(0)
    drafter = Drafter(config).eval()
    if drafter.draft_token_ids is not None:
        drafter.draft_token_ids.copy_(torch.randperm(61)[:draft_vocab].sort().values)
    context, g0 = torch.randn(2, 32), torch.tensor([3, 17])
    with torch.no_grad():
        beams, history = drafter.beam_search(context, g0, base.embed_weight, BeamShape(1, 5))
        logits = unroll(drafter, context, beams[:, 0], base.embed_weight)  # (2, 4, Vd)
    logp = warp_log_probs(logits)
    if drafter.draft_token_ids is not None:
        logp = torch.full((2, 4, 61), LOG_0).index_copy(2, drafter.draft_token_ids, logp)
    torch.testing.assert_close(logp, history[:, 0], atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- draft vocab


def test_choose_draft_vocab_by_frequency_then_low_ids() -> None:
    targets = torch.tensor([[7, 7, 7, 3], [3, 9, -1, -1]])  # counts: 7x3, 3x2, 9x1
    ids, coverage = choose_draft_vocab(targets, vocab_size=12, size=4, always=[11])
    assert ids.tolist() == [3, 7, 9, 11]  # 11 forced in; sorted ascending
    assert coverage == 1.0
    ids, coverage = choose_draft_vocab(targets, vocab_size=12, size=3, always=[])
    assert ids.tolist() == [3, 7, 9]
    ids, _ = choose_draft_vocab(targets, vocab_size=12, size=5, always=[])
    assert ids.tolist() == [0, 1, 3, 7, 9]  # free slots go to the lowest unseen ids
    ids, coverage = choose_draft_vocab(targets, vocab_size=12, size=1, always=[])
    assert ids.tolist() == [7] and coverage == pytest.approx(3 / 6)


@pytest.mark.parametrize("W,L", [(1, 2), (4, 4), (3, 5)])
def test_reduced_vocab_beam_search_matches_numpy_and_returns_full_vocab(W, L) -> None:
    base = tiny_base(vocab_size=97)
    config = DrafterConfig(
        vocab_size=97, hidden_size=32, exit_dim=24, num_draft_layers=1, draft_vocab_size=20
    )
    torch.manual_seed(0)
    drafter = Drafter(config).eval()
    with torch.no_grad():
        for p in drafter.parameters():
            p.normal_(0, 0.3)
    ids = torch.randperm(97)[:20]
    drafter.draft_token_ids.copy_(ids)  # type: ignore[union-attr]
    context, g0 = torch.randn(2, 32), torch.tensor([3, 50])
    with torch.no_grad():
        beams, logp = drafter.beam_search(context, g0, base.embed_weight, BeamShape(W, L))
    weights = {k: v.detach().double().numpy() for k, v in drafter.state_dict().items()}
    ref_beams, ref_logp = beam_search(
        weights,
        base.embed_weight.detach().double().numpy(),
        context.double().numpy(),
        g0.numpy(),
        BeamShape(W, L),
    )
    np.testing.assert_array_equal(beams.numpy(), ref_beams)
    assert logp.shape == (2, W, L - 1, 97)
    live = ref_logp > LOG_0 / 2
    np.testing.assert_allclose(logp.numpy()[live], ref_logp[live], atol=1e-4)
    assert set(beams[:, :, 1:].flatten().tolist()) <= set(ids.tolist())
    outside = np.setdiff1d(np.arange(97), ids.numpy())
    assert (logp.numpy()[..., outside] == LOG_0).all()
    np.testing.assert_allclose(logp.exp().sum(-1).numpy(), 1.0, rtol=1e-5)


def test_reduced_vocab_drafter_exports_to_onnx_with_parity(tmp_path: Path) -> None:
    import onnx
    import onnxruntime as ort

    from redrafter.export.onnx import export_drafter

    base = tiny_base()
    drafter, _ = build_drafter(
        base,
        examples_from_trace(torch.zeros(4, 32), torch.tensor([5, 6, 7, 8]), predict_tokens=2),
        TrainOptions(draft_vocab=30, init="random"),
    )
    drafter.eval()
    beam = BeamShape(3, 4)
    path = tmp_path / "drafter.onnx"
    onnx.save_model(export_drafter(drafter, base, beam), str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    context = np.random.default_rng(0).standard_normal((2, 32)).astype(np.float32)
    g0 = np.array([4, 9])
    feeds = {"context": context, "first_token": g0}
    got_beams, got_logp = session.run(["beams", "log_probs"], feeds)
    with torch.no_grad():
        beams, logp = drafter.beam_search(
            torch.from_numpy(context), torch.from_numpy(g0), base.embed_weight, beam
        )
    np.testing.assert_array_equal(got_beams, beams.numpy())
    np.testing.assert_allclose(got_logp, logp.numpy(), atol=1e-4)


# --------------------------------------------------------------------------- training


def test_loss_falls_on_a_memorisable_corpus(tmp_path: Path) -> None:
    """CE (Apple's recipe) on a corpus that repeats one 12-token phrase: the drafter memorises
    the phrase, so its loss collapses and its chain accuracy nears 1."""
    from redrafter.train.vocab import head_index

    base = tiny_base()
    phrase = torch.tensor([5, 9, 13, 2, 40, 33, 21, 8, 17, 50, 11, 29])
    chunks = phrase.repeat(8).view(4, 24)  # (N=4, T=24)
    examples = teacher_forced(base, chunks, predict_tokens=3)
    options = TrainOptions(steps=80, batch_size=32, lr=1e-2, predict_tokens=3, bf16=False)
    untrained, _ = build_drafter(base, examples, options)
    index = head_index(untrained.draft_token_ids, 61)
    before = heldout_metrics(untrained, examples, base.embed_weight, index)
    result = train_drafter(base, examples, tmp_path / "d", options, progress=False)
    after = heldout_metrics(result.drafter, examples, base.embed_weight, index)
    assert after["loss"] < 0.2 * before["loss"]
    assert after["chain3"] > 0.9


def test_trained_drafter_is_accepted_by_the_driver(distilled, tmp_path: Path) -> None:
    """Distilled on the base's own answers, the drafter's drafts get accepted: > 2 tokens per
    step with W=4, L=4 on those prompts (at most 4), where the untrained one gets ~1."""
    base, prompts, examples, _, options = distilled
    untrained, _ = build_drafter(base, examples, options)
    beam, eos = BeamShape(4, 4), ()
    before = tokens_per_step(base, untrained, prompts, beam=beam, max_new_tokens=32)
    result = train_drafter(base, examples, tmp_path / "d", options, progress=False)
    after = tokens_per_step(base, result.drafter, prompts, beam=beam, max_new_tokens=32,
                            eos_token_ids=eos)  # fmt: skip
    assert before["tokens_per_step"] < 1.3
    assert after["tokens_per_step"] > 2.0
    # The saved drafter is the trained one, and decoding with it stays exact (greedy parity).
    loaded = load_drafter(tmp_path / "d")
    again = tokens_per_step(base, loaded, prompts, beam=beam, max_new_tokens=32)
    assert again == after


def test_resume_gives_the_uninterrupted_result(distilled, tmp_path: Path) -> None:
    base, _, examples, _, options = distilled
    short = TrainOptions(**{**options.__dict__, "steps": 12, "kl_weight": 0.5})
    whole = train_drafter(base, examples, tmp_path / "whole", short, progress=False)
    cut = train_drafter(base, examples, tmp_path / "cut", short, progress=False, stop_after=5)
    assert cut.steps == 5
    state = json.loads((tmp_path / "cut" / "trainer_state.json").read_text())
    assert state["step"] == 5 and state["total_steps"] == 12
    resumed = train_drafter(base, examples, tmp_path / "cut", short, progress=False, resume=True)
    assert resumed.steps == 12
    for (name, a), b in zip(
        whole.drafter.state_dict().items(), resumed.drafter.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=name)
    assert resumed.history[-1]["train_loss"] == pytest.approx(whole.history[-1]["train_loss"])


@pytest.mark.parametrize("draft_vocab", [None, 48])
def test_saved_drafter_is_in_apples_layout(distilled, tmp_path: Path, draft_vocab) -> None:
    base, _, examples, _, options = distilled
    options = TrainOptions(**{**options.__dict__, "steps": 2, "draft_vocab": draft_vocab,
                              "exit_dim": 24})  # fmt: skip
    train_drafter(base, examples, tmp_path / "d", options, progress=False)
    config = json.loads((tmp_path / "d" / "config.json").read_text())
    assert config["model_type"] == "recurrent_drafting_drafter"
    assert (config["vocab_size"], config["hidden_size"], config["exit_dim"]) == (61, 32, 24)
    with safe_open(str(tmp_path / "d" / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())  # noqa: SIM118
        head = tuple(f.get_slice("lm_head.1.weight").get_shape())
    if draft_vocab is None:
        assert names == APPLE_NAMES and "draft_vocab_size" not in config
        assert head == (61, 24)
    else:  # Apple's names plus the id map; the config says how many rows the head has
        assert names == APPLE_NAMES | {"draft_token_ids"}
        assert config["draft_vocab_size"] == 48 and head == (48, 24)
    drafter = load_drafter(tmp_path / "d")
    check_drafter_fits(base.config, drafter.config)


# --------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    return write_hf_checkpoint(tiny_base(), tmp_path_factory.mktemp("base") / "base")


def test_cli_trains_a_loadable_drafter(base_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "prompts.jsonl"
    lines = [json.dumps({"prompt": " ".join(WORDS[i : i + 4])}) for i in range(0, 40, 4)]
    data.write_text("\n".join(lines) + "\n")
    out = tmp_path / "drafter"
    args = ["train-drafter", "--base", str(base_dir), "--data", str(data), "--out", str(out),
            "--steps", "5", "--batch-size", "16", "--seq-len", "8", "--predict-tokens", "3",
            "--draft-vocab", "32", "--cache-dir", str(tmp_path / "cache")]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "wrote" in result.output and load_drafter(out).config.draft_vocab_size == 32
    again = CliRunner().invoke(main, [*args, "--resume", "--steps", "7"])
    assert again.exit_code == 0, again.output
    assert "cached base outputs" in again.output and "resuming" in again.output
    assert json.loads((out / "trainer_state.json").read_text())["step"] == 7


def test_cli_distills_a_windowed_base(tmp_path: Path) -> None:
    """`train-drafter` on a Mistral checkpoint whose window (4) is a quarter of the answers
    (16 tokens): the teacher data holds the base's own greedy answers, which the window
    changes, and the drafter trains."""
    from redrafter.decoding import AUTOREGRESSIVE, decode
    from redrafter.runtimes.torch import TorchRuntime
    from redrafter.train.teacher_data import load_examples

    base = tiny_base(model_type="mistral", sliding_window=4)
    folder = write_hf_checkpoint(base, tmp_path / "mistral")
    prompts = [WORDS[i : i + 4] for i in range(0, 40, 4)]
    data = tmp_path / "prompts.txt"
    data.write_text("\n".join(" ".join(p) for p in prompts) + "\n")
    args = ["train-drafter", "--base", str(folder), "--data", str(data), "--out",
            str(tmp_path / "d"), "--steps", "3", "--batch-size", "16", "--seq-len", "16",
            "--predict-tokens", "2", "--draft-vocab", "32", "--teacher-data",
            str(tmp_path / "teacher"), "--cache-dir", str(tmp_path / "cache")]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert load_drafter(tmp_path / "d").config.hidden_size == 32
    answers = [  # 9 training prompts, 1 held out
        answer
        for part in ("train", "heldout")
        for answer in load_examples(tmp_path / "teacher" / part, predict_tokens=2)[1]
    ]
    ids = [[WORDS.index(w) + 2 for w in p] for p in prompts]  # the word-level tokenizer's ids

    def greedy() -> list[list[int]]:
        options = AUTOREGRESSIVE.replace(max_new_tokens=16)
        return [sum((s.new_tokens[0] for s in decode(TorchRuntime(base), [p], options)), [])
                for p in ids]  # fmt: skip

    truth = greedy()
    assert sorted(answers) == sorted(truth)
    for layer in base.model.layers:
        layer.self_attn.op_attributes.pop("window")
    assert greedy() != truth  # the window shapes these answers


@pytest.mark.parametrize(
    "name,content,mode,message",
    [
        ("empty.txt", b"", "ce", "empty.txt: the file is empty"),
        ("latin1.txt", "caf\u00e9 w1 w2".encode("latin-1"), "ce", "latin1.txt: not UTF-8"),
        ("short.txt", b"w1 w2 w3", "ce", "short.txt: 3 tokens, fewer than --seq-len 16"),
        ("bad.jsonl", b'{"text": "w1"}\nnot json\n', "distill", "bad.jsonl:2: not valid JSON"),
        ("nofield.jsonl", b'{"title": "w1"}\n', "distill", "nofield.jsonl:1: no text field"),
    ],
)
def test_bad_data_files_give_one_line_errors(
    base_dir: Path, tmp_path: Path, name: str, content: bytes, mode: str, message: str
) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    args = ["train-drafter", "--base", str(base_dir), "--data", str(path), "--out",
            str(tmp_path / "d"), "--mode", mode, "--seq-len", "16", "--steps", "1"]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]
    assert not (tmp_path / "d").exists()


# -- issue #17: one data format (a prompt per line), zero usable prompts is one line, exit 2 ------
def test_text_data_is_one_record_per_line(tmp_path: Path) -> None:
    from redrafter.train.data import DataError, read_records

    three = tmp_path / "three.txt"
    three.write_text("w1 w2\nw3 w4\n\nw5 w6\\nw7\n")
    assert read_records(three) == ["w1 w2", "w3 w4", "w5 w6\nw7"]  # as --prompts reads it
    assert read_records(three, data_format="paragraphs") == ["w1 w2\nw3 w4", "w5 w6\\nw7"]
    from redrafter.validate.prompts import read_prompts

    assert read_prompts(three) == read_records(three)
    with pytest.raises(DataError, match="'csv' is not one of auto, lines, paragraphs, jsonl"):
        read_records(three, data_format="csv")


def test_cli_distills_a_plain_text_file_line_by_line(base_dir: Path, tmp_path: Path) -> None:
    """80 lines, no blank line: 80 prompts (it used to be one over-long record, every prompt
    skipped, and a torch.cat traceback)."""
    data = tmp_path / "train.txt"
    data.write_text("\n".join(" ".join(WORDS[i % 50 : i % 50 + 5]) for i in range(80)) + "\n")
    args = ["train-drafter", "--base", str(base_dir), "--data", str(data), "--out",
            str(tmp_path / "d"), "--steps", "2", "--batch-size", "16", "--seq-len", "8",
            "--predict-tokens", "2", "--draft-vocab", "32",
            "--cache-dir", str(tmp_path / "cache")]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "skipped_long_prompts 0" in result.output
    held = min(8, 80 // 20)
    assert f"train_prompts {80 - held}" in result.output


def test_cli_no_usable_prompt_is_one_line_exit_2(base_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "long.txt"
    data.write_text(" ".join(WORDS * 6) + "\n")  # one prompt of 354 tokens > the limit
    args = ["train-drafter", "--base", str(base_dir), "--data", str(data), "--out",
            str(tmp_path / "d"), "--steps", "2", "--seq-len", "8",
            "--cache-dir", str(tmp_path / "cache")]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert lines[-1].startswith("error: no usable training prompts: 1 read") and (
        "248-token prompt limit" in lines[-1]
    )
    assert "Traceback" not in result.output and not (tmp_path / "d").exists()
