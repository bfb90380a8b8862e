"""Prompts as users give them: chats as message lists (library and `generate --messages`,
`--system`), no silent chat format for a tokenizer without a template, and several prompts
from a file decoded as one batch (`generate --prompts`). Bad input is one line, exit code 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from redrafter import pipeline
from redrafter.cli import main
from redrafter.config import BeamShape
from redrafter.decoding import DecodeOptions
from redrafter.errors import PromptError, TokenizerError
from redrafter.models.chat import Message, as_messages, read_messages
from redrafter.models.checkpoints import save_drafter
from redrafter.models.tokenizer import NoChatTemplateError, load_tokenizer
from redrafter.pipeline import Pipeline

from conftest import tiny_base, tiny_drafter, write_hf_checkpoint

# A chat template in the tiny word-level vocabulary (word wI has id I + 2): each turn is its
# role's word then its text, the reply starts after w4.
TEMPLATE = (
    "{% for m in messages %}{{ {'system': 'w1', 'user': 'w2', 'assistant': 'w3'}[m['role']] }} "
    "{{ m['content'] }} {% endfor %}{% if add_generation_prompt %}w4{% endif %}"
)
CHAT = [
    {"role": "system", "content": "w10"},
    {"role": "user", "content": "w11 w12"},
    {"role": "assistant", "content": "w13"},
    {"role": "user", "content": "w14"},
]
CHAT_IDS = [3, 12, 4, 13, 14, 5, 15, 4, 16, 6]  # w1 w10 w2 w11 w12 w3 w13 w2 w14 w4


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(base with a chat template, the same base without one, a drafter for both)."""
    root = tmp_path_factory.mktemp("chat")
    base = tiny_base()
    with_template = write_hf_checkpoint(base, root / "chat")
    config = {"chat_template": TEMPLATE}
    (with_template / "tokenizer_config.json").write_text(json.dumps(config))
    plain = write_hf_checkpoint(base, root / "plain")
    save_drafter(tiny_drafter(base), root / "drafter")
    return with_template, plain, root / "drafter"


def _run(args: list[str]):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(main, [str(a) for a in args])


def _one_line_error(result, *fragments: str) -> None:  # type: ignore[no-untyped-def]
    """Exit 2, no traceback, nothing on stdout, one `error:` line holding every fragment."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


# -- the library -----------------------------------------------------------------------------
def test_chats_render_through_the_template(models) -> None:
    tok = load_tokenizer(models[0])
    assert tok.encode_prompt(CHAT) == CHAT_IDS
    as_values = [Message(m["role"], m["content"]) for m in CHAT]
    assert tok.encode_prompt(as_values) == CHAT_IDS
    assert tok.encode_prompt(CHAT[1:2], system="w10") == CHAT_IDS[:5] + [6]
    assert tok.encode_prompt("w11 w12", chat=True) == [4, 13, 14, 6]
    assert tok.encode_prompt("w11 w12", system="w10") == [3, 12, 4, 13, 14, 6]
    assert tok.encode_prompt("w11 w12") == [13, 14]  # plain text: no template


def test_pipeline_encode_takes_text_ids_and_chats(models) -> None:
    pipe = Pipeline(runtime=None, tokenizer=load_tokenizer(models[0]))  # type: ignore[arg-type]
    assert pipe.encode([7, 8]) == [7, 8]
    assert pipe.encode("w11 w12") == [13, 14]
    assert pipe.encode("w11 w12", chat=True) == [4, 13, 14, 6]
    assert pipe.encode(CHAT) == pipe.encode(tuple(as_messages(CHAT))) == CHAT_IDS
    bare = Pipeline(runtime=None)  # type: ignore[arg-type]
    with pytest.raises(TokenizerError, match="no tokenizer"):
        bare.encode(CHAT)
    no_template = Pipeline(runtime=None, tokenizer=load_tokenizer(models[1]))  # type: ignore[arg-type]
    with pytest.raises(NoChatTemplateError, match=r"plain.*no chat template"):
        no_template.encode(CHAT)
    assert no_template.encode("w11 w12") == [13, 14]


def test_library_generate_decodes_a_chat_batch(models) -> None:
    """A message list is a prompt like any other: a batch mixing a chat, text and ids decodes
    each row as it would alone."""
    base, _, drafter = models
    pipe = pipeline.from_checkpoints(base, drafter=drafter)
    options = DecodeOptions(max_new_tokens=6, beam=BeamShape(2, 3))
    prompts = [CHAT, "w5 w6 w7", [9, 10, 11, 12, 13]]
    batch = pipe.generate(prompts, options)
    alone = [pipe.generate([p], options).token_ids[0] for p in prompts]
    assert batch.token_ids == alone
    assert pipe.generate([CHAT_IDS], options).token_ids[0] == alone[0]


@pytest.mark.parametrize(
    "chat, fragment",
    [
        ([], "no user message"),
        ([{"role": "system", "content": "x"}], "no user message"),
        ([{"role": "robot", "content": "x"}], "role 'robot' is not one of system, user"),
        ([{"role": "user"}], "exactly 'role' and 'content'"),
        ([{"role": "user", "content": "x", "name": "n"}], "exactly 'role' and 'content'"),
        ([{"role": "user", "content": 3}], "content 3 is not text"),
        (["hello"], "message 1 is 'hello'"),
        ([{"role": "user", "content": "x"}, {"role": "system", "content": "y"}], "message 2 is"),
        ([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], "last message"),
        ("hello", "list of messages"),
    ],
)
def test_bad_chats_are_one_line_errors(chat, fragment: str) -> None:
    with pytest.raises(PromptError) as info:
        as_messages(chat)
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_system_text_goes_first_once() -> None:
    user = [{"role": "user", "content": "x"}]
    assert as_messages(user, system="s") == (Message("system", "s"), Message("user", "x"))
    with pytest.raises(PromptError, match="already start with a system message"):
        as_messages(CHAT, system="s")


def test_read_messages_json_list_and_jsonl(tmp_path: Path) -> None:
    listed = tmp_path / "chat.json"
    listed.write_text(json.dumps(CHAT, indent=2))
    lines = tmp_path / "chat.jsonl"
    lines.write_text("\n".join(json.dumps(m) for m in CHAT[:2]) + "\n\n" + json.dumps(CHAT[2]))
    lines.write_text(lines.read_text() + "\n" + json.dumps(CHAT[3]) + "\n")
    expected = tuple(Message(m["role"], m["content"]) for m in CHAT)
    assert read_messages(listed) == read_messages(lines) == expected


@pytest.mark.parametrize(
    "text, fragments",
    [
        (None, ["not found"]),
        ("", ["has no messages"]),
        ("[]", ["has no messages"]),
        ('[{"role": "user", "content": "x"}', ["is not valid JSON"]),
        ('{"role": "user", "content": "x"}\n{"role": "user"', [":2 is not valid JSON"]),
        ('{"role": "user", "content": "x"}\n\n["x"]', [":3 is"]),
        ('{"role": "user", "content": "x"}\n{"role": "bot", "content": "y"}', [":2:", "'bot'"]),
        ('[{"role": "user", "content": "x"}, {"role": "x", "content": "y"}]', ["message 2"]),
        ('{"role": "assistant", "content": "x"}', ["no user message"]),
        (
            '{"role": "user", "content": "x"}\n{"role": "assistant", "content": "y"}',
            ["last message is the assistant's"],
        ),
    ],
)
def test_bad_messages_files_name_the_file_and_line(
    tmp_path: Path, text: str | None, fragments: list[str]
) -> None:
    path = tmp_path / "messages.jsonl"
    if text is not None:
        path.write_text(text)
    with pytest.raises(PromptError) as info:
        read_messages(path)
    message = str(info.value)
    assert str(path) in message and "\n" not in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def test_messages_file_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "m.json"
    path.write_bytes(b'[{"role": "user", "content": "caf\xe9"}]')
    with pytest.raises(PromptError, match="not UTF-8"):
        read_messages(path)


# -- the CLI ---------------------------------------------------------------------------------
def _generate(base: Path, drafter: Path | None, *args: str | Path):  # type: ignore[no-untyped-def]
    common = ["generate", "--base", base, "--max-new-tokens", "6"]
    if drafter is not None:
        common += ["--drafter", drafter, "--beam-width", "2", "--beam-length", "3"]
    return _run([*common, *args])


@pytest.mark.parametrize("form", ["json", "jsonl"])
def test_generate_messages_file_matches_the_library(models, tmp_path: Path, form: str) -> None:
    base, _, drafter = models
    path = tmp_path / f"chat.{form}"
    if form == "json":
        path.write_text(json.dumps(CHAT))
    else:
        path.write_text("".join(json.dumps(m) + "\n" for m in CHAT))
    pipe = pipeline.from_checkpoints(base, drafter=drafter)
    lib = pipe.generate([CHAT], DecodeOptions(max_new_tokens=6, beam=BeamShape(2, 3)))
    result = _generate(base, drafter, "--messages", path, "--json")
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert record["token_ids"] == lib.token_ids[0]
    assert record["text"] == lib.texts[0]  # type: ignore[index]


def test_generate_system_prompt_is_a_two_turn_chat(models) -> None:
    base, _, _ = models
    pipe = pipeline.from_checkpoints(base)
    chat = [{"role": "system", "content": "w10"}, {"role": "user", "content": "w11 w12"}]
    lib = pipe.generate([chat], pipe.defaults.replace(max_new_tokens=6))
    result = _generate(base, None, "--prompt", "w11 w12", "--system", "w10", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["token_ids"] == lib.token_ids[0]
    chat_only = _generate(base, None, "--prompt", "w11 w12", "--chat", "--json")
    expected = pipe.generate(["w11 w12"], pipe.defaults.replace(max_new_tokens=6), chat=True)
    assert json.loads(chat_only.stdout)["token_ids"] == expected.token_ids[0]
    # The same text without --chat decodes from other ids (no template around it).
    plain = _generate(base, None, "--prompt", "w11 w12", "--json")
    unwrapped = pipe.generate([[13, 14]], pipe.defaults.replace(max_new_tokens=6))
    assert json.loads(plain.stdout)["token_ids"] == unwrapped.token_ids[0]


@pytest.mark.parametrize("flags", [["--chat"], ["--system", "w10"], ["--messages", "CHAT"]])
def test_generate_chat_without_a_template_is_one_line(models, tmp_path: Path, flags) -> None:
    _, plain, _ = models
    chat_file = tmp_path / "chat.json"
    chat_file.write_text(json.dumps(CHAT))
    args = [chat_file if a == "CHAT" else a for a in flags]
    prompt = [] if "--messages" in flags else ["--prompt", "w11"]
    result = _generate(plain, None, *prompt, *args)
    _one_line_error(result, str(plain), "no chat template", "chat_template")


@pytest.mark.parametrize(
    "content, fragments",
    [
        (None, ["not found"]),
        ('[{"role": "robot", "content": "w1"}]', ["message 1", "'robot'"]),
        ('{"role": "user", "content": "w1"}\nnot json', [":2 is not valid JSON"]),
        ('[{"role": "user", "text": "w1"}]', ["exactly 'role' and 'content'"]),
        ('[{"role": "user", "content": "w1"}, {"role": "assistant", "content": "w2"}]', ["last"]),
    ],
)
def test_generate_bad_messages_file_is_one_line(
    models, tmp_path: Path, content: str | None, fragments: list[str]
) -> None:
    path = tmp_path / "m.json"
    if content is not None:
        path.write_text(content)
    _one_line_error(_generate(models[0], None, "--messages", path), str(path), *fragments)


def test_generate_system_twice_is_one_line(models, tmp_path: Path) -> None:
    path = tmp_path / "m.json"
    path.write_text(json.dumps(CHAT))
    result = _generate(models[0], None, "--messages", path, "--system", "w9")
    _one_line_error(result, "already start with a system message")


@pytest.mark.parametrize(
    "args, fragment",
    [
        ([], "give exactly one of --prompt TEXT, --prompt-ids"),
        (["--prompt", "w1", "--messages", "m.json"], "give exactly one of"),
        (["--prompt", "w1", "--prompts", "p.txt"], "give exactly one of"),
        (["--prompt-ids", "3,4", "--system", "w1"], "apply to text prompts"),
        (["--prompt-ids", "3,4", "--chat"], "apply to text prompts"),
    ],
)
def test_generate_prompt_options_exclude_each_other(models, args, fragment: str) -> None:
    result = _generate(models[0], None, *args)
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert fragment in result.output and result.stdout == ""


PROMPTS = ["w5 w6 w7 w8 w9", "w20", "w30 w31\\nw32"]  # as the file spells them


def _prompts_file(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(PROMPTS[:2]) + "\n\n" + PROMPTS[2] + "\n")
    return path


def test_generate_prompts_file_is_one_batch(models, tmp_path: Path) -> None:
    """Three prompts of different lengths decoded as one batch (speculatively): each row's
    output is the one it gets alone; --json is a list, text mode one block per prompt."""
    base, _, drafter = models
    texts = [p.replace("\\n", "\n") for p in PROMPTS]
    pipe = pipeline.from_checkpoints(base, drafter=drafter)
    options = DecodeOptions(max_new_tokens=6, beam=BeamShape(2, 3))
    alone = [pipe.generate([t], options) for t in texts]
    path = _prompts_file(tmp_path)
    result = _generate(base, drafter, "--prompts", path, "--json")
    assert result.exit_code == 0, result.output
    records = json.loads(result.stdout)
    assert [r["prompt"] for r in records] == texts
    assert [r["token_ids"] for r in records] == [g.token_ids[0] for g in alone]
    assert [r["text"] for r in records] == [g.texts[0] for g in alone]  # type: ignore[index]
    assert records[0]["stats"]["generated_tokens"] == 18  # the whole batch's: 3 rows x 6
    shown = _generate(base, drafter, "--prompts", path, "--stats")
    assert shown.exit_code == 0, shown.output
    blocks = [f"==> prompt {n} <==\n{g.texts[0]}\n" for n, g in enumerate(alone, 1)]  # type: ignore[index]
    assert shown.stdout == "\n".join(blocks)
    assert "tokens/step" in shown.stderr


def test_generate_prompts_speculating_below_a_row_limit_keeps_each_rows_tokens(
    models, tmp_path: Path
) -> None:
    """--speculate-max-rows 1: one token per prompt while several decode (here all three run
    to the same limit; tests/test_conformance.py mixes both kinds of step); every row's tokens
    are still those it gets alone. 0 is refused (exit 2)."""
    base, _, drafter = models
    texts = [p.replace("\\n", "\n") for p in PROMPTS]
    pipe = pipeline.from_checkpoints(base, drafter=drafter)
    alone = [
        pipe.generate([t], DecodeOptions(max_new_tokens=6, beam=BeamShape(2, 3))) for t in texts
    ]
    path = _prompts_file(tmp_path)
    result = _generate(base, drafter, "--prompts", path, "--json", "--speculate-max-rows", "1")
    assert result.exit_code == 0, result.output
    assert [r["token_ids"] for r in json.loads(result.stdout)] == [g.token_ids[0] for g in alone]
    bad = _generate(base, drafter, "--prompts", path, "--speculate-max-rows", "0")
    assert bad.exit_code == 2 and "Traceback" not in bad.output
    assert "--speculate-max-rows" in bad.output


def test_generate_prompts_file_with_system_chats_each(models, tmp_path: Path) -> None:
    base, _, _ = models
    pipe = pipeline.from_checkpoints(base)
    texts = [p.replace("\\n", "\n") for p in PROMPTS]
    chats = [[{"role": "system", "content": "w10"}, {"role": "user", "content": t}] for t in texts]
    lib = pipe.generate(chats, pipe.defaults.replace(max_new_tokens=6))
    result = _generate(
        base, None, "--prompts", _prompts_file(tmp_path), "--system", "w10", "--json"
    )
    assert result.exit_code == 0, result.output
    assert [r["token_ids"] for r in json.loads(result.stdout)] == lib.token_ids


@pytest.mark.parametrize(
    "name, content, fragment",
    [
        ("missing.txt", None, "not found"),
        ("empty.txt", "\n\n", "has no prompts"),
        ("bad.jsonl", '{"prompt": "w1"}\n{"prompt": 3}\n', ":2 has no string"),
    ],
)
def test_generate_bad_prompts_file_is_one_line(
    models, tmp_path: Path, name: str, content: str | None, fragment: str
) -> None:
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    _one_line_error(_generate(models[0], None, "--prompts", path), str(path), fragment)
