"""Tokenizers: a byte-level BPE rebuilt from GGUF metadata, streaming decode, chat prompts."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import gguf
import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from redrafter.errors import TokenizerError
from redrafter.models.tokenizer import (
    NoChatTemplateError,
    StreamDecoder,
    Tokenizer,
    load_tokenizer,
)

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "def add(a, b):\n    return a + b\n",
    "In 2024 there were 365 days; in 1999, 365 too.",
    "hello hello hello world, the world says hello",
] * 20
TEXTS = [
    "the lazy fox",
    "Numbers 12345 and 3.14159 split digit by digit",
    "  leading spaces\n\n\ttabs and newlines  ",
    "café, naïve, 日本語, emoji 😀🎉",
    "<|im_start|>user\nhi there<|im_end|>\n",
    "def f(x):\n    return x * 2\n",
]
# SmolLM2's chat template (from its tokenizer_config.json).
SMOLLM_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def byte_char(b: int) -> str:
    """GPT-2's byte-to-unicode map: printable Latin-1 bytes stand for themselves, the rest are
    shifted to U+0100 and up, in byte order."""
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    if b in keep:
        return chr(b)
    return chr(256 + [x for x in range(256) if x not in keep].index(b))


@pytest.fixture(scope="module")
def source() -> HFTokenizer:
    """A small SmolLM-style tokenizer (single digits, GPT-2 byte level) trained on CORPUS."""
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIALS,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def write_gguf_tokenizer(
    source: HFTokenizer,
    path: Path,
    *,
    pre: str = "smollm",
    template: str | None = None,
    add_bos: bool | None = None,
    add_eos: bool | None = None,
) -> None:
    vocab = source.get_vocab(with_added_tokens=True)
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    assert [vocab[t] for t in tokens] == list(range(len(tokens)))
    merges = json.loads(source.to_str())["model"]["merges"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in merges]
    # A digit-pair merge that only a tokenizer which splits digits first will never apply.
    tokens, merges = [*tokens, "20"], [*merges, "2 0"]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types([3 if t in SPECIALS else 1 for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    if add_bos is not None:
        w.add_add_bos_token(add_bos)
    if add_eos is not None:
        w.add_add_eos_token(add_eos)
    if template is not None:
        w.add_chat_template(template)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def gguf_tokenizer(source: HFTokenizer, tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    path = tmp_path_factory.mktemp("gguf") / "tok.gguf"
    write_gguf_tokenizer(source, path, template=SMOLLM_TEMPLATE)
    return load_tokenizer(path)


def test_gguf_tokenizer_matches_source_and_round_trips(
    source: HFTokenizer, gguf_tokenizer: Tokenizer
) -> None:
    for text in TEXTS:
        ids = gguf_tokenizer.encode(text)
        assert ids == source.encode(text).ids, text
        assert gguf_tokenizer.decode(ids) == text
    assert gguf_tokenizer.encode("<|im_start|>x<|im_end|>")[::2] == [1, 2]  # specials stay whole
    digits = gguf_tokenizer.encode("2024")
    assert [gguf_tokenizer.decode([i]) for i in digits] == ["2", "0", "2", "4"]
    assert (gguf_tokenizer.bos_token_id, gguf_tokenizer.eos_token_ids) == (1, (2,))


def test_unknown_gguf_pre_falls_back_with_a_warning(
    source: HFTokenizer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "odd.gguf"
    write_gguf_tokenizer(source, path, pre="some-new-pre")
    with caplog.at_level(logging.WARNING):
        tok = load_tokenizer(path)
    assert "some-new-pre" in caplog.text
    assert tok.decode(tok.encode(TEXTS[3])) == TEXTS[3]


def test_stream_decoder_holds_back_split_characters(gguf_tokenizer: Tokenizer) -> None:
    byte_id = {b: gguf_tokenizer.token_to_id(byte_char(b)) for b in range(256)}
    stream = StreamDecoder(gguf_tokenizer)
    assert stream.push(gguf_tokenizer.encode("caf")) == "caf"
    e_acute = "é".encode()  # C3 A9: two byte tokens
    assert stream.push(byte_id[e_acute[0]]) == ""
    assert stream.push(byte_id[e_acute[1]]) == "é"
    grin = "😀".encode()  # F0 9F 98 80: four byte tokens
    pieces = [stream.push(byte_id[b]) for b in grin]
    assert pieces == ["", "", "", "😀"]
    assert stream.push(gguf_tokenizer.encode(" the end")) == " the end"
    assert stream.push(byte_id[0xE6]) == ""  # an unfinished character at the end
    assert stream.flush() == "\ufffd"


def test_stream_decoder_reassembles_every_text(gguf_tokenizer: Tokenizer) -> None:
    for text in TEXTS:
        stream = StreamDecoder(gguf_tokenizer)
        out = "".join(stream.push(i) for i in gguf_tokenizer.encode(text)) + stream.flush()
        assert out == text


def test_chat_without_a_template_is_an_error_not_chatml(
    source: HFTokenizer, tmp_path: Path
) -> None:
    """No chat template: asking for a chat is one line naming the checkpoint and the fix (it
    used to fall back to ChatML, silently wrong for most models); plain text still works."""
    source.save(str(tmp_path / "tokenizer.json"))
    tok = load_tokenizer(tmp_path)
    for chat in ("Hi?", [{"role": "user", "content": "Hi?"}]):
        with pytest.raises(NoChatTemplateError) as info:
            tok.encode_prompt(chat, chat=True)
        message = str(info.value)
        assert "\n" not in message and str(tmp_path) in message
        assert "no chat template" in message and "chat_template" in message
    assert tok.encode_prompt("Hi?") == source.encode("Hi?").ids


def test_chat_prompt_uses_the_checkpoint_template(gguf_tokenizer: Tokenizer) -> None:
    expected = (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
        "<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert gguf_tokenizer.chat_prompt("What is 2+2?") == expected


def test_chat_prompt_without_jinja2(gguf_tokenizer: Tokenizer, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "jinja2.sandbox", None)  # makes the import fail
    with pytest.raises(TokenizerError, match="need jinja2.*pip install jinja2"):
        gguf_tokenizer.chat_prompt("x")


def test_hf_folder_tokenizer(source: HFTokenizer, tmp_path: Path) -> None:
    source.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "bos_token": "<|im_start|>",
                "eos_token": {"content": "<|im_end|>"},
                "chat_template": SMOLLM_TEMPLATE,
            }
        )
    )
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    tok = load_tokenizer(tmp_path)
    assert (tok.bos_token_id, tok.eos_token_ids) == (1, (2, 0))
    assert tok.encode(TEXTS[1]) == source.encode(TEXTS[1]).ids
    assert tok.chat_prompt("q").startswith("<|im_start|>system\nYou are a helpful AI assistant")


def test_llama2c_bin_needs_a_tokenizer_json(source: HFTokenizer, tmp_path: Path) -> None:
    model = tmp_path / "stories.bin"
    model.write_bytes(b"\0" * 64)
    with pytest.raises(TokenizerError, match=r"stories\.bin.*tokenizer\.json.*--prompt-ids"):
        load_tokenizer(model)
    source.save(str(tmp_path / "tokenizer.json"))
    assert load_tokenizer(model).encode("the fox") == source.encode("the fox").ids


def test_missing_tokenizer_errors(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match="tokenizer.json"):
        load_tokenizer(tmp_path)
    with pytest.raises(TokenizerError, match="nothing.gguf"):
        load_tokenizer(tmp_path / "nothing.gguf")
    broken = tmp_path / "bad.gguf"
    broken.write_bytes(b"GGUF\x03\x00\x00\x00garbage")
    with pytest.raises(TokenizerError, match="bad.gguf"):
        load_tokenizer(broken)


def test_pipeline_stream_text_keeps_multibyte_characters(gguf_tokenizer: Tokenizer) -> None:
    """`Pipeline.stream_text`: one step per byte token splits every multi-byte character across
    steps; decoding each step alone garbles them, the streamed pieces concatenate to the full
    decode."""
    import numpy as np

    from redrafter.decoding.output import Step
    from redrafter.errors import ConfigError
    from redrafter.pipeline import Pipeline

    text = "café, 日本語 😀 done"
    byte_id = {b: gguf_tokenizer.token_to_id(byte_char(b)) for b in range(256)}
    ids = [byte_id[b] for b in text.encode()]
    pipe = Pipeline(runtime=None, tokenizer=gguf_tokenizer)  # type: ignore[arg-type]

    def fake_stream(prompts, options=None, *, chat=False):
        for t in ids:
            yield Step([[t]], np.zeros(1, np.int64), {}, "autoregressive")

    pipe.stream = fake_stream  # type: ignore[method-assign]
    naive = "".join(gguf_tokenizer.decode([t]) for t in ids)
    assert naive != text  # what the README's old example printed
    pieces = list(pipe.stream_text(["hi"]))
    assert "".join(pieces) == gguf_tokenizer.decode(ids) == text
    assert all("\ufffd" not in p for p in pieces) and len(pieces) > 1
    with pytest.raises(ConfigError, match="one prompt"):
        pipe.stream_text(["a", "b"])


# ------------------------------------------------------------ prompts as transformers encodes them


# A Llama-3-style template: the template writes the BOS itself, so a chat must not get a second.
BOS_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "the lazy fox?"},
    {"role": "assistant", "content": "hello world"},
    {"role": "user", "content": "café, naïve 12 + 34"},  # no "20" (see the GGUF test)
]
BOS, EOS = "<|endoftext|>", "<|im_end|>"  # ids 0 and 2 in `source`
POST_PROCESSORS = {
    "none": None,
    "byte-level": processors.ByteLevel(trim_offsets=False),  # SmolLM2's: adds nothing
    "bos": processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, 0)]
    ),
    "bos+eos": processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}",
        pair=f"{BOS} $A {EOS} $B {EOS}",
        special_tokens=[(BOS, 0), (EOS, 2)],
    ),
}


def _ids(encoded) -> list[int]:  # type: ignore[no-untyped-def]
    """transformers 5 returns a BatchEncoding from apply_chat_template, 4 a list."""
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


@pytest.mark.parametrize("flags", [{}, {"add_bos_token": True}, {"add_bos_token": False}])
@pytest.mark.parametrize("post", list(POST_PROCESSORS))
def test_prompts_encode_as_transformers_does(
    source: HFTokenizer, tmp_path: Path, post: str, flags: dict
) -> None:
    """Plain text gets exactly the special tokens `tokenizer(text)` adds (tokenizer.json's
    post-processor: transformers ignores tokenizer_config's add_bos_token beside a
    tokenizer.json), a chat exactly `apply_chat_template`'s ids (no BOS on top of the
    template's)."""
    from transformers import AutoTokenizer

    inner = HFTokenizer.from_str(source.to_str())
    inner.post_processor = POST_PROCESSORS[post]
    inner.save(str(tmp_path / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS}
    config |= {"chat_template": BOS_TEMPLATE, **flags}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    theirs = AutoTokenizer.from_pretrained(str(tmp_path))
    ours = load_tokenizer(tmp_path)
    for text in TEXTS:
        assert ours.encode_prompt(text) == theirs(text)["input_ids"], text
    expected = {"none": [], "byte-level": [], "bos": [0], "bos+eos": [0, 2]}[post]
    assert [t for t in ours.encode_prompt("the fox") if t in (0, 2)] == expected
    chat = ours.encode_prompt(CHAT)
    assert chat == _ids(theirs.apply_chat_template(CHAT, add_generation_prompt=True))
    assert chat.count(0) == 1 and chat[0] == 0  # the template's BOS, once
    user_turn = ours.encode_prompt("the lazy fox?", chat=True, system="Be brief.")
    assert user_turn == _ids(theirs.apply_chat_template(CHAT[:2], add_generation_prompt=True))


@pytest.mark.parametrize(
    "add_bos, add_eos", [(None, None), (True, False), (False, True), (True, True)]
)
def test_gguf_prompts_encode_as_transformers_does(
    source: HFTokenizer, tmp_path: Path, add_bos: bool | None, add_eos: bool | None
) -> None:
    """A GGUF's tokenizer.ggml.add_bos_token/add_eos_token decide what a plain prompt gets,
    as in transformers' own GGUF loader (and llama.cpp); a chat gets only the template's.
    (No text here has the digits "20": transformers' GGUF loader does not split digits for
    `tokenizer.ggml.pre == "smollm"`, llama.cpp and SmolLM2's tokenizer.json, like us, do.)"""
    from transformers import AutoTokenizer

    path = tmp_path / "tok.gguf"
    write_gguf_tokenizer(source, path, template=BOS_TEMPLATE, add_bos=add_bos, add_eos=add_eos)
    theirs = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    ours = load_tokenizer(path)
    for text in TEXTS:
        assert ours.encode_prompt(text) == theirs(text)["input_ids"], text
    ids = ours.encode_prompt("the fox")
    assert (ids[0] == 1, ids[-1] == 2) == (bool(add_bos), bool(add_eos))  # BOS 1, EOS 2 here
    chat = ours.encode_prompt(CHAT)
    assert chat == _ids(theirs.apply_chat_template(CHAT, add_generation_prompt=True))
    assert chat[-1] != 2  # no EOS after the generation prompt
