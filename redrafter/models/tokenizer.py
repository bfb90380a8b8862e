"""Tokenizers for every checkpoint format we load, behind one small class.

`load_tokenizer(path)` accepts a Hugging Face folder (`tokenizer.json` [+ `tokenizer_config.json`]),
a `.gguf` file (a byte-level BPE tokenizer is rebuilt from its `tokenizer.ggml.*` metadata), or a
llama2.c `.bin` (which carries no tokenizer: a `tokenizer.json` must sit next to it).

Prompts are encoded as transformers encodes them (`Tokenizer.encode_prompt`): plain text as
`tokenizer(text)` does, with the special tokens the tokenizer adds (e.g. Llama's BOS): those of
tokenizer.json's post-processor (transformers 5 ignores tokenizer_config.json's `add_bos_token`
when a tokenizer.json exists; checkpoints saved by transformers 4 keep the two in step), or of
a GGUF's `tokenizer.ggml.add_bos_token`/`add_eos_token`; a chat (`Message`s) as
`apply_chat_template(messages, add_generation_prompt=True)` does (the checkpoint's template,
whose text carries any BOS itself). A tokenizer without a chat template refuses chats.

`StreamDecoder` turns token ids arriving one step at a time into text that is safe to print: it
holds back a piece whose last character is U+FFFD, i.e. a multi-byte UTF-8 character whose bytes
are split over tokens that have not all arrived yet.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors

from redrafter.errors import TokenizerError
from redrafter.models.chat import Chat, Message, as_messages

log = logging.getLogger(__name__)

# The most characters a chat template may render beyond the messages themselves: a template
# from an untrusted checkpoint that loops to build a huge prompt is stopped here.
MAX_TEMPLATE_OVERHEAD = 1 << 20


class NoTokenizerError(TokenizerError):
    """The checkpoint has no tokenizer (as opposed to a corrupt one)."""


class NoChatTemplateError(TokenizerError):
    """A chat prompt was asked of a tokenizer that has no chat template."""


REPLACEMENT_CHAR = "\ufffd"
GGUF_CONTROL_TOKEN = 3  # llama.cpp's LLAMA_TOKEN_TYPE_CONTROL: special tokens
GGUF_USER_DEFINED_TOKEN = 4  # LLAMA_TOKEN_TYPE_USER_DEFINED: added, never split

# llama.cpp `tokenizer.ggml.pre` names whose split regex we reproduce before the GPT-2 byte map.
# `smollm` is verified against SmolLM2's tokenizer.json (Digits(individual) then ByteLevel);
# the two regexes below are the published Llama-3 / Qwen2 ones (digits in runs of 1-3 / single).
_LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_REGEX = _LLAMA3_REGEX.replace(r"\p{N}{1,3}", r"\p{N}")
_GPT2_PRES = ("default", "gpt2", "gpt-2")


def _gguf_pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    """The pre-tokenizer llama.cpp applies for `tokenizer.ggml.pre == pre`."""
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":
        digits = pre_tokenizers.Digits(individual_digits=True)
        return pre_tokenizers.Sequence([digits, byte_level])
    regex = {"llama-bpe": _LLAMA3_REGEX, "llama3": _LLAMA3_REGEX, "qwen2": _QWEN2_REGEX}.get(pre)
    if regex is not None:
        split = pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False)
        no_regex = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        return pre_tokenizers.Sequence([split, no_regex])
    if pre not in _GPT2_PRES:
        log.warning("GGUF tokenizer.ggml.pre=%r is not known; using plain GPT-2 byte-level", pre)
    return byte_level


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the special ids and chat template decoding needs."""

    def __init__(
        self,
        inner: tokenizers.Tokenizer,
        *,
        bos_token_id: int | None = None,
        eos_token_ids: Sequence[int] = (),
        chat_template: str | None = None,
        source: str | None = None,
    ) -> None:
        self.inner = inner
        self.bos_token_id = bos_token_id
        self.eos_token_ids: tuple[int, ...] = tuple(dict.fromkeys(int(t) for t in eos_token_ids))
        self.chat_template = chat_template
        self.source = source  # where it was loaded from, for error messages

    @property
    def vocab_size(self) -> int:
        return self.inner.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`. Special tokens written in the text (`<|im_start|>`) are always
        recognised; `add_special_tokens` adds the post-processor's extras (e.g. a BOS)."""
        return list(self.inner.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = False) -> str:
        return self.inner.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.inner.token_to_id(token)

    def encode_prompt(
        self, prompt: str | Chat, *, chat: bool = False, system: str | None = None
    ) -> list[int]:
        """The ids a prompt decodes from, as transformers makes them: text alone as
        `tokenizer(text)` does (with the special tokens the tokenizer adds, e.g. a BOS); a chat
        (a message list, or text with `chat` or a `system` text: one user turn) rendered by
        `chat_prompt` and encoded as `apply_chat_template` does, adding nothing (the template
        writes any BOS itself)."""
        if isinstance(prompt, str) and not chat and system is None:
            return self.encode(prompt, add_special_tokens=True)
        return self.encode(self.chat_prompt(prompt, system=system))

    def chat_prompt(self, chat: str | Chat, *, system: str | None = None) -> str:
        """The checkpoint's chat template rendered for a conversation, ending where the
        assistant's reply starts (`add_generation_prompt`). `chat`: a message list
        (`as_messages`), or the text of one user turn; `system`: a system turn put first.
        A tokenizer without a chat template raises `NoChatTemplateError` (no format is
        guessed: a wrong one would silently degrade every answer)."""
        if isinstance(chat, str):
            chat = [Message("user", chat)]
        messages = as_messages(chat, system=system)
        if self.chat_template is None:
            where = f"{self.source}: " if self.source else ""
            raise NoChatTemplateError(
                f"{where}this tokenizer has no chat template, so it cannot build chat prompts; "
                "prompt with plain text (no --chat, --system or --messages), or add the "
                "model's chat_template to its tokenizer_config.json"
            )
        records = [{"role": m.role, "content": m.content} for m in messages]
        return _render_template(self.chat_template, records, self._special_strings())

    def _special_strings(self) -> dict[str, str]:
        out = {}
        if self.bos_token_id is not None:
            out["bos_token"] = self.inner.id_to_token(self.bos_token_id) or ""
        if self.eos_token_ids:
            out["eos_token"] = self.inner.id_to_token(self.eos_token_ids[0]) or ""
        return out


def _render_template(
    template: str, messages: list[dict[str, str]], specials: dict[str, str]
) -> str:
    """Render a HF chat template in jinja2's sandbox, with the environment transformers gives
    templates (trimmed blocks, loop controls, `raise_exception`, `strftime_now`, a `tojson`
    that keeps non-ASCII text)."""
    try:
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise TokenizerError(
            "chat templates need jinja2, which is not installed; pip install jinja2"
        ) from None

    def raise_exception(message: str) -> None:
        raise TokenizerError(f"chat template refused the prompt: {message}")

    def tojson(
        x: Any, ensure_ascii: bool = False, indent: int | None = None, sort_keys: bool = False
    ) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.filters["tojson"] = tojson
    limit = MAX_TEMPLATE_OVERHEAD + 2 * sum(len(m["content"]) for m in messages)
    try:
        pieces, size = [], 0
        stream = env.from_string(template).generate(
            messages=messages, add_generation_prompt=True, **specials
        )
        for piece in stream:
            size += len(piece)
            if size > limit:
                raise TokenizerError(
                    f"chat template rendered more than {limit} characters; the checkpoint's "
                    "chat_template is broken or hostile (fix it, or prompt without --chat)"
                )
            pieces.append(piece)
        return "".join(pieces)
    except TemplateError as e:
        raise TokenizerError(
            f"chat template failed to render ({e}); fix the checkpoint's chat_template"
        ) from None


class StreamDecoder:
    """Incremental detokenizer: `push(ids)` returns only text that is new and stable.

    Decoding a window of recent tokens (not one token alone) keeps context-dependent pieces right
    (SentencePiece's leading space, byte-level merges); text ending in U+FFFD is an incomplete
    UTF-8 character and is held back until its remaining bytes arrive.
    """

    def __init__(self, tokenizer: Tokenizer, *, skip_special_tokens: bool = False) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self._prefix = 0  # start of the window re-decoded for context
        self._read = 0  # ids before this are already emitted

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, ids: int | Iterable[int]) -> str:
        """Add token id(s); return the text they complete (possibly empty)."""
        self.ids.extend([ids] if isinstance(ids, int) else [int(i) for i in ids])
        seen = self._decode(self.ids[self._prefix : self._read])
        full = self._decode(self.ids[self._prefix :])
        if len(full) <= len(seen) or full.endswith(REPLACEMENT_CHAR):
            return ""
        self._prefix, self._read = self._read, len(self.ids)
        return full[len(seen) :]

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character decodes as U+FFFD)."""
        seen = self._decode(self.ids[self._prefix : self._read])
        full = self._decode(self.ids[self._prefix :])
        self._prefix = self._read = len(self.ids)
        return full[len(seen) :]


# --------------------------------------------------------------------------- loading


def load_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer of a checkpoint: HF folder, `tokenizer.json`, `.gguf` or llama2.c `.bin`."""
    path = Path(path)
    if path.is_dir():
        if not (path / "tokenizer.json").is_file():
            raise NoTokenizerError(
                f"{path}: no tokenizer.json; save the tokenizer there "
                "(AutoTokenizer.save_pretrained) or pass --prompt-ids"
            )
        return _load_hf(path)
    if path.name.endswith(".json") and path.is_file():
        return _load_hf(path.parent, tokenizer_json=path)
    if path.suffix == ".gguf" and path.is_file():
        return _load_gguf(path)
    if path.suffix == ".bin" and path.is_file():
        if (path.parent / "tokenizer.json").is_file():
            return _load_hf(path.parent)
        raise NoTokenizerError(
            f"{path}: a llama2.c checkpoint has no tokenizer; put a tokenizer.json next to it "
            "or pass --prompt-ids"
        )
    if not path.exists():
        raise NoTokenizerError(f"{path}: not found; pass a checkpoint folder, .gguf or .bin")
    raise NoTokenizerError(
        f"{path}: cannot find a tokenizer here; pass a folder with tokenizer.json, a .gguf, "
        "or a llama2.c .bin with tokenizer.json beside it"
    )


def find_tokenizer(path: str | Path) -> Tokenizer | None:
    """The checkpoint's tokenizer, or None when it has none (token-id prompts still work).
    A tokenizer that is there but corrupt (unreadable tokenizer.json, bad tokenizer_config.json)
    is a `TokenizerError`, not None."""
    try:
        return load_tokenizer(path)
    except NoTokenizerError:
        return None


def _read_json_opt(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{path}: not valid JSON ({e}); fix or delete it") from None
    return raw if isinstance(raw, dict) else {}


def _token_str(value: Any) -> str | None:
    """`"<s>"` or `{"content": "<s>", ...}` (both appear in tokenizer_config.json)."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _ids(value: Any) -> list[int]:
    if isinstance(value, bool) or value is None:
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [int(v) for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


def _load_hf(folder: Path, tokenizer_json: Path | None = None) -> Tokenizer:
    tokenizer_json = tokenizer_json or folder / "tokenizer.json"
    try:
        inner = tokenizers.Tokenizer.from_file(str(tokenizer_json))
    except Exception as e:  # the Rust side raises a bare Exception on malformed files
        raise TokenizerError(
            f"{tokenizer_json}: cannot be read ({e}); re-save it with AutoTokenizer"
        ) from None
    tok_cfg = _read_json_opt(folder / "tokenizer_config.json")
    model_cfg = _read_json_opt(folder / "config.json")
    gen_cfg = _read_json_opt(folder / "generation_config.json")

    def id_of(key: str) -> list[int]:
        name = _token_str(tok_cfg.get(key))
        tid = inner.token_to_id(name) if name is not None else None
        return [] if tid is None else [tid]

    bos = id_of("bos_token") or _ids(model_cfg.get("bos_token_id"))
    eos = id_of("eos_token") + _ids(model_cfg.get("eos_token_id"))
    eos += _ids(gen_cfg.get("eos_token_id"))
    template = tok_cfg.get("chat_template")
    if isinstance(template, list):  # older format: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    jinja_file = folder / "chat_template.jinja"  # where transformers >= 4.43 saves it
    if not isinstance(template, str) and jinja_file.is_file():
        template = jinja_file.read_text()
    return Tokenizer(
        inner,
        bos_token_id=bos[0] if bos else None,
        eos_token_ids=eos,
        chat_template=template if isinstance(template, str) else None,
        source=str(folder if tokenizer_json == folder / "tokenizer.json" else tokenizer_json),
    )


def _add_special_tokens(
    inner: tokenizers.Tokenizer, *, bos: tuple[str, int] | None, eos: tuple[str, int] | None
) -> None:
    """Make `inner.encode(text, add_special_tokens=True)` put `bos` (token, id) before the
    text and `eos` after it (None: not that one), as transformers' `update_post_processor`
    does."""
    specials = [t for t in (bos, eos) if t is not None]

    def around(seq: str, type_id: int) -> str:  # e.g. "<s>:0 $A:0"
        parts = ([bos[0]] if bos else []) + [f"${seq}"] + ([eos[0]] if eos else [])
        return " ".join(f"{p}:{type_id}" for p in parts)

    inner.post_processor = processors.TemplateProcessing(
        single=around("A", 0),
        pair=f"{around('A', 0)} {around('B', 1)}",
        special_tokens=list(dict.fromkeys(specials)),  # type: ignore[arg-type]
    )


def _load_gguf(path: Path) -> Tokenizer:
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
    except Exception as e:  # gguf raises ValueError/struct errors on damaged files
        raise TokenizerError(f"{path}: not a readable GGUF file ({e}); re-download it") from None

    def meta(key: str, default: Any = None) -> Any:
        field = reader.fields.get(key)
        return default if field is None else field.contents()

    kind = meta("tokenizer.ggml.model")
    if kind != "gpt2":
        if (path.parent / "tokenizer.json").is_file():
            return _load_hf(path.parent)
        raise NoTokenizerError(
            f"{path}: GGUF tokenizer model {kind!r} is not supported (only byte-level BPE 'gpt2'); "
            "put the model's tokenizer.json next to the .gguf"
        )
    tokens: list[str] = meta("tokenizer.ggml.tokens")
    merges: list[str] = meta("tokenizer.ggml.merges", [])
    types: list[int] = meta("tokenizer.ggml.token_type", [1] * len(tokens))
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    if len(vocab) != len(tokens):
        log.warning(
            "%s: %d duplicate token strings; keeping the first id of each",
            path,
            len(tokens) - len(vocab),
        )
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    inner = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False))
    inner.pre_tokenizer = _gguf_pre_tokenizer(str(meta("tokenizer.ggml.pre", "default")))
    inner.decoder = decoders.ByteLevel()
    added = [
        AddedToken(tokens[i], special=(t == GGUF_CONTROL_TOKEN), normalized=False)
        for i, t in enumerate(types)
        if t in (GGUF_CONTROL_TOKEN, GGUF_USER_DEFINED_TOKEN)
    ]
    inner.add_special_tokens([a for a in added if a.special])
    inner.add_tokens([a for a in added if not a.special])
    bos, eos = meta("tokenizer.ggml.bos_token_id"), meta("tokenizer.ggml.eos_token_id")
    # llama.cpp and transformers add BOS/EOS to a plain prompt as these flags say; a byte-level
    # ('gpt2') vocabulary without them adds neither.
    add_bos = bos is not None and meta("tokenizer.ggml.add_bos_token", False)
    add_eos = eos is not None and meta("tokenizer.ggml.add_eos_token", False)
    if add_bos or add_eos:
        # The metadata's ids, not the token strings' (a GGUF may spell two tokens alike).
        _add_special_tokens(
            inner,
            bos=(tokens[int(bos)], int(bos)) if add_bos else None,
            eos=(tokens[int(eos)], int(eos)) if add_eos else None,
        )
    return Tokenizer(
        inner,
        bos_token_id=None if bos is None else int(bos),
        eos_token_ids=[int(t) for t in (eos, meta("tokenizer.ggml.eot_token_id")) if t is not None],
        chat_template=meta("tokenizer.chat_template"),
        source=str(path),
    )


def save_tokenizer(tokenizer: Tokenizer, folder: str | Path) -> None:
    """Write `tokenizer.json` + `tokenizer_config.json` (+ `generation_config.json` for every
    stop id) so that `load_tokenizer(folder)` gives back the same ids, specials and template."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.inner.save(str(folder / "tokenizer.json"))
    config: dict[str, Any] = {}
    if tokenizer.bos_token_id is not None:
        config["bos_token"] = tokenizer.inner.id_to_token(tokenizer.bos_token_id)
    if tokenizer.eos_token_ids:
        config["eos_token"] = tokenizer.inner.id_to_token(tokenizer.eos_token_ids[0])
    if tokenizer.chat_template is not None:
        config["chat_template"] = tokenizer.chat_template
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = {"eos_token_id": list(tokenizer.eos_token_ids)}
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
