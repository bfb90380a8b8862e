"""`redrafter serve` against a live server on 127.0.0.1, through the official `openai` client:
chat and text completions, streamed and not, give exactly what `Pipeline.generate` gives for the
same prompt; stop strings cut across token boundaries; 32 concurrent streaming clients on the
continuous batch get what they would get alone, a disconnecting client frees its row, a seeded
sample repeats exactly; bad requests get OpenAI-shaped 400/404/503 bodies; bad CLI flags exit 2."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from click.testing import CliRunner

pytest.importorskip("fastapi", reason="the server needs the [serve] extra")
openai = pytest.importorskip("openai", reason="the client tests need the official openai package")
import httpx  # noqa: E402
import uvicorn  # noqa: E402

from redrafter import pipeline  # noqa: E402
from redrafter.cli import main  # noqa: E402
from redrafter.decoding import DecodeOptions  # noqa: E402
from redrafter.errors import ConfigError  # noqa: E402
from redrafter.serve import (  # noqa: E402
    ServeOptions,
    default_speculate_max_rows,
    server_decode_options,
)
from redrafter.serve.app import create_app  # noqa: E402
from redrafter.serve.engine import batch_key, row_tokens_for  # noqa: E402
from redrafter.serve.requests import GenerationRequest  # noqa: E402

MODEL = "tiny"
# A chat template in the tiny word-level vocabulary (word wI has id I + 2), as tests/test_chat.py.
TEMPLATE = (
    "{% for m in messages %}{{ {'system': 'w1', 'user': 'w2', 'assistant': 'w3'}[m['role']] }} "
    "{{ m['content'] }} {% endfor %}{% if add_generation_prompt %}w4{% endif %}"
)
PROMPTS = [f"w{i} w{i + 7} w{i + 3}" for i in range(5, 13)]  # 8 distinct prompts


@pytest.fixture(scope="module")
def pipe(onnx_bundle) -> pipeline.Pipeline:  # type: ignore[no-untyped-def]
    """The tiny bundle on ONNX Runtime (one thread: the cores are shared), its tokenizer given
    a chat template (this pipeline's own tokenizer object: the bundle is untouched)."""
    pipe = pipeline.load(onnx_bundle.root, threads=1)
    pipe.tokenizer.chat_template = TEMPLATE
    return pipe


class LiveServer:
    """uvicorn serving an app on a free 127.0.0.1 port, in a background thread."""

    def __init__(self, app: Any) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        # Wait for startup (bounded: a server that never starts fails the test, not hangs it).
        for _ in range(600):
            if self.server.started:
                break
            self.thread.join(0.05)
        assert self.server.started, "uvicorn did not start"
        self.url = f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


@contextlib.contextmanager
def _serve(
    pipe: pipeline.Pipeline, *, max_queue: int = 64, max_batch: int = 4
) -> Iterator[LiveServer]:
    # Trees at every batch size (the CPU default speculates for one row only), so the tests
    # below hold batched speculation; test_the_cpu_default_* holds the default.
    serve = ServeOptions(max_queue=max_queue, speculate_max_rows=max_batch)
    options = server_decode_options(pipe, serve)
    app = create_app(pipe, options=options, model=MODEL, max_queue=max_queue, max_batch=max_batch)
    server = LiveServer(app)
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="module")
def server(pipe: pipeline.Pipeline) -> Iterator[LiveServer]:
    with _serve(pipe) as server:
        yield server


@pytest.fixture(scope="module")
def client(server: LiveServer) -> Any:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def _alone(
    pipe: pipeline.Pipeline, prompt: Any, *, max_tokens: int, chat: bool = False, stop=()
) -> pipeline.Generation:
    """The same request decoded directly by the pipeline: greedy, the server's decode mode."""
    base = server_decode_options(pipe, ServeOptions())
    options = dataclasses.replace(base, max_new_tokens=max_tokens)
    assert options.sampling.temperature == 0.0
    return pipe.generate([prompt], options, chat=chat, stop=stop)


def test_server_decodes_speculatively(pipe: pipeline.Pipeline) -> None:
    # The equality tests below hold the speculative path, not only the autoregressive one.
    assert server_decode_options(pipe, ServeOptions()).speculative
    assert not server_decode_options(pipe, ServeOptions(autoregressive=True)).speculative


def test_the_cpu_default_speculates_for_one_row(pipe: pipeline.Pipeline) -> None:
    """On the CPU a server speculates while one request decodes and verifies one token per
    row when more do (--speculate-max-rows); no limit on CUDA; an explicit value wins."""
    assert server_decode_options(pipe, ServeOptions()).speculate_max_rows == 1
    assert server_decode_options(pipe, ServeOptions(speculate_max_rows=3)).speculate_max_rows == 3
    assert default_speculate_max_rows("cuda") is None
    with pytest.raises(ConfigError, match="--speculate-max-rows 0 must be an integer >= 1"):
        ServeOptions(speculate_max_rows=0)


def test_a_default_server_mixes_one_token_and_tree_steps_losslessly(
    pipe: pipeline.Pipeline,
) -> None:
    """With the CPU default (trees for one decoding row only), 4 concurrent requests with
    different token limits first decode one token per row, then the last one speculates:
    every reply equals the same request decoded alone, and /metrics counts both kinds."""
    cases = [(i, (5, 9, 14, 24)[i]) for i in range(4)]
    want = [_alone(pipe, PROMPTS[p], max_tokens=m) for p, m in cases]
    options = server_decode_options(pipe, ServeOptions())
    app = create_app(pipe, options=options, model=MODEL, max_queue=8, max_batch=4)
    server = LiveServer(app)
    try:

        def one(case: tuple[int, int]) -> str:
            p, m = case
            client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
            reply = client.completions.create(
                model=MODEL, prompt=PROMPTS[p], max_tokens=m, temperature=0
            )
            return reply.choices[0].text

        with ThreadPoolExecutor(4) as pool:
            got = list(pool.map(one, cases))
        metrics = _metrics(server)
    finally:
        server.close()
    assert got == [w.texts[0] for w in want]
    steps = metrics["redrafter_decode_steps_total"]
    assert 0 < metrics["redrafter_speculative_steps_total"] < steps, metrics


def test_completion_equals_pipeline_generate(client: Any, pipe: pipeline.Pipeline) -> None:
    want = _alone(pipe, PROMPTS[0], max_tokens=12)
    got = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=12, temperature=0)
    assert got.choices[0].text == want.texts[0]
    assert got.usage.completion_tokens == len(want.token_ids[0])
    assert got.usage.prompt_tokens == len(pipe.encode(PROMPTS[0]))
    assert got.usage.total_tokens == got.usage.prompt_tokens + got.usage.completion_tokens
    assert got.choices[0].finish_reason == ("length" if len(want.token_ids[0]) == 12 else "stop")


def test_penalties_reach_the_decode(client: Any, pipe: pipeline.Pipeline) -> None:
    """presence/frequency penalties: the reply equals the pipeline's with the same penalties
    (greedy, applied per tree node), which repeats itself less than the unpenalised one."""
    base = server_decode_options(pipe, ServeOptions())
    sampling = dataclasses.replace(base.sampling, presence_penalty=2.0, frequency_penalty=1.5)
    options = dataclasses.replace(base, max_new_tokens=16, sampling=sampling)
    want = pipe.generate([PROMPTS[0]], options)
    got = client.completions.create(
        model=MODEL,
        prompt=PROMPTS[0],
        max_tokens=16,
        temperature=0,
        presence_penalty=2.0,
        frequency_penalty=1.5,
    )
    assert got.choices[0].text == want.texts[0]
    plain = _alone(pipe, PROMPTS[0], max_tokens=16).token_ids[0]
    penalised = want.token_ids[0]
    assert len(set(penalised)) / len(penalised) > len(set(plain)) / len(plain)


def test_vllm_sampling_fields_reach_the_decode(client: Any, pipe: pipeline.Pipeline) -> None:
    """top_k, min_p and repetition_penalty (vLLM's and llama.cpp's fields, sent through the
    openai client's `extra_body`) decode as the pipeline does with the same controls: greedy
    with the penalty, and a seeded sample with all three (a seeded row decodes alone)."""
    base = server_decode_options(pipe, ServeOptions())
    penalised = dataclasses.replace(base.sampling, repetition_penalty=3.0)
    want = pipe.generate(
        [PROMPTS[0]], dataclasses.replace(base, max_new_tokens=16, sampling=penalised)
    )
    got = client.completions.create(
        model=MODEL,
        prompt=PROMPTS[0],
        max_tokens=16,
        temperature=0,
        extra_body={"repetition_penalty": 3.0},
    )
    assert got.choices[0].text == want.texts[0]
    assert want.token_ids[0] != _alone(pipe, PROMPTS[0], max_tokens=16).token_ids[0]
    sampled = pipeline.sampling_params(
        temperature=1.0, seed=5, top_k=3, min_p=0.1, repetition_penalty=1.5
    )
    options = dataclasses.replace(base, max_new_tokens=16, sampling=sampled)
    want = pipe.generate([PROMPTS[1]], options)
    extra = {"top_k": 3, "min_p": 0.1, "repetition_penalty": 1.5}
    got = client.completions.create(
        model=MODEL, prompt=PROMPTS[1], max_tokens=16, temperature=1.0, seed=5, extra_body=extra
    )
    assert got.choices[0].text == want.texts[0]
    plain = pipe.generate(
        [PROMPTS[1]],
        dataclasses.replace(options, sampling=pipeline.sampling_params(temperature=1.0, seed=5)),
    )
    assert plain.token_ids[0] != want.token_ids[0]  # the controls changed this sample


def test_completion_stream_equals_pipeline_generate(client: Any, pipe: pipeline.Pipeline) -> None:
    want = _alone(pipe, PROMPTS[1], max_tokens=16)
    chunks = list(
        client.completions.create(
            model=MODEL, prompt=PROMPTS[1], max_tokens=16, temperature=0, stream=True
        )
    )
    assert len(chunks) > 2  # streamed piece by piece, not in one go
    assert "".join(c.choices[0].text for c in chunks) == want.texts[0]
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")
    assert chunks[-1].usage.completion_tokens == len(want.token_ids[0])
    assert all(c.usage is None for c in chunks[:-1])


def test_token_id_prompt(client: Any, pipe: pipeline.Pipeline) -> None:
    ids = [7, 9, 11, 13]
    want = _alone(pipe, ids, max_tokens=8)
    got = client.completions.create(model=MODEL, prompt=ids, max_tokens=8, temperature=0)
    assert got.choices[0].text == want.texts[0]
    assert got.usage.prompt_tokens == 4


def test_chat_equals_pipeline_generate(client: Any, pipe: pipeline.Pipeline) -> None:
    messages = [{"role": "system", "content": "w10"}, {"role": "user", "content": "w11 w12"}]
    want = _alone(pipe, messages, max_tokens=10, chat=True)
    got = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=10, temperature=0
    )
    assert got.choices[0].message.role == "assistant"
    assert got.choices[0].message.content == want.texts[0]
    assert got.usage.prompt_tokens == 6  # w1 w10 w2 w11 w12 w4: the template's ids
    assert got.usage.completion_tokens == len(want.token_ids[0])

    stream = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=10, temperature=0, stream=True
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want.texts[0]
    assert chunks[-1].usage.completion_tokens == len(want.token_ids[0])


@pytest.mark.parametrize("stream", [False, True])
def test_stop_string_across_tokens(client: Any, pipe: pipeline.Pipeline, stream: bool) -> None:
    full = _alone(pipe, PROMPTS[2], max_tokens=24).texts[0]
    words = full.split(" ")
    assert len(words) >= 6, f"the tiny model's reply is too short to cut: {full!r}"
    # The end of word 3, the space and the start of word 4: the stop spans two tokens.
    stop = words[3][1:] + " " + words[4][:2]
    want = _alone(pipe, PROMPTS[2], max_tokens=24, stop=[stop])
    assert len(want.texts[0]) < len(full)
    got = client.completions.create(
        model=MODEL, prompt=PROMPTS[2], max_tokens=24, temperature=0, stop=[stop], stream=stream
    )
    chunks = list(got) if stream else [got]
    assert "".join(c.choices[0].text for c in chunks) == want.texts[0]
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert chunks[-1].usage.completion_tokens == len(want.token_ids[0])


def test_concurrent_streams_match_alone(server: LiveServer, pipe: pipeline.Pipeline) -> None:
    want = [_alone(pipe, p, max_tokens=12).texts[0] for p in PROMPTS]

    def one(prompt: str) -> str:
        # One client per thread, as separate applications would be.
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        stream = client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=12, temperature=0, stream=True
        )
        return "".join(c.choices[0].text for c in stream)

    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        got = list(pool.map(one, PROMPTS))
    assert got == want


def test_seeded_sampling_repeats(client: Any) -> None:
    def sample() -> str:
        out = client.completions.create(
            model=MODEL, prompt=PROMPTS[3], max_tokens=10, temperature=1.0, top_p=0.9, seed=7
        )
        return out.choices[0].text

    assert sample() == sample()


def test_disconnected_stream_leaves_server_serving(server: LiveServer, client: Any) -> None:
    body = {"model": MODEL, "prompt": PROMPTS[4], "max_tokens": 64, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        next(r.iter_lines())  # read one event, then hang up mid-stream
    got = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=4, temperature=0)
    assert got.usage.completion_tokens >= 1
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"


def _metrics(server: LiveServer) -> dict[str, float]:
    text = httpx.get(f"{server.url}/metrics").text
    return {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }


def test_32_concurrent_async_streams_match_alone(
    server: LiveServer, pipe: pipeline.Pipeline
) -> None:
    """32 AsyncOpenAI clients stream at once (chat and text, 4 token limits) through the
    continuous batch (--max-batch 4, so rows join and leave between steps all along): every
    reply completes, each equals the same request decoded alone (no cross-talk between rows),
    and the batch really ran several rows per step."""
    messages = [[{"role": "user", "content": p}] for p in PROMPTS]
    cases = [(i % 8, (6, 12, 17, 24)[i % 4], i % 3 == 0) for i in range(32)]  # prompt, max, chat
    want = [
        _alone(pipe, messages[p] if chat else PROMPTS[p], max_tokens=m, chat=chat)
        for p, m, chat in cases
    ]
    before = _metrics(server)

    async def one(client: Any, p: int, m: int, chat: bool) -> tuple[str, Any]:
        common = {"model": MODEL, "max_tokens": m, "temperature": 0, "stream": True}
        if chat:
            stream = await client.chat.completions.create(messages=messages[p], **common)
        else:
            stream = await client.completions.create(prompt=PROMPTS[p], **common)
        parts, last = [], None
        async for chunk in stream:
            c = chunk.choices[0]
            parts.append((c.delta.content if chat else c.text) or "")
            last = chunk
        return "".join(parts), last

    async def run() -> list[tuple[str, Any]]:
        clients = [
            openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
            for _ in cases
        ]  # 32 applications, a connection each
        try:
            return await asyncio.gather(
                *(one(c, *case) for c, case in zip(clients, cases, strict=True))
            )
        finally:
            await asyncio.gather(*(c.close() for c in clients))

    got = asyncio.run(run())
    for (text, last), w, case in zip(got, want, cases, strict=True):
        assert text == w.texts[0], case
        assert last.choices[0].finish_reason in ("stop", "length")
        assert last.usage.completion_tokens == len(w.token_ids[0]), case
    after = _metrics(server)
    steps = after["redrafter_decode_steps_total"] - before["redrafter_decode_steps_total"]
    rows = after["redrafter_row_steps_total"] - before["redrafter_row_steps_total"]
    assert rows / steps > 2, f"{rows / steps:.2f} rows per step: the requests were not batched"
    assert after["redrafter_batch_rows"] in (0, 4)
    assert httpx.get(f"{server.url}/health").json() | {"pid": 0} == {
        "status": "ok",
        "model": MODEL,
        "queue_depth": 0,
        "running": 0,
        "pid": 0,
    }


@pytest.mark.parametrize(
    ("prompt", "max_tokens", "context", "want"),
    [(10, 20, 2048, 256), (100, 156, 2048, 256), (100, 157, 2048, 512), (900, 700, 2048, 2048)],
    ids=["short", "exactly-256", "one-over", "capped-at-context"],
)
def test_row_tokens_power_of_two_at_least_256(
    prompt: int, max_tokens: int, context: int, want: int
) -> None:
    request = GenerationRequest(
        (1,) * prompt, DecodeOptions(max_new_tokens=max_tokens), (), False, "completion"
    )
    assert row_tokens_for([request], context_length=context) == want


def test_batch_key_ignores_what_rows_may_differ_in_and_isolates_seeded_samples() -> None:
    greedy = DecodeOptions(max_new_tokens=5)
    sampling = dataclasses.replace(greedy.sampling, temperature=0.7)
    assert batch_key(greedy) == batch_key(greedy.replace(max_new_tokens=50))
    assert batch_key(greedy) != batch_key(greedy.replace(sampling=sampling))
    seeded = dataclasses.replace(sampling, seed=3)
    assert batch_key(greedy.replace(sampling=seeded)) is None  # shares with nobody
    ignored = dataclasses.replace(greedy.sampling, seed=3, top_p=0.5)  # greedy ignores them
    assert batch_key(greedy.replace(sampling=ignored)) == batch_key(greedy)
    penalised = dataclasses.replace(greedy.sampling, presence_penalty=1.0)  # not these
    assert batch_key(greedy.replace(sampling=penalised)) != batch_key(greedy)


class _SlowRuntime:
    """A runtime whose verify calls take at least 20 ms (else the runtime it wraps), so a
    decode outlives a client's hang-up."""

    def __init__(self, runtime: Any) -> None:
        self._runtime = runtime

    def __getattr__(self, name: str) -> Any:
        return getattr(self._runtime, name)

    def verify_greedy(self, *args: Any) -> Any:
        time.sleep(0.02)
        return self._runtime.verify_greedy(*args)


def test_disconnecting_client_frees_its_row(pipe: pipeline.Pipeline) -> None:
    """--max-batch 1: a client asking for 200 tokens hangs up after its first chunk; its row
    leaves the batch at the next step (far fewer than 200 tokens are generated), so the one
    row is free for the next request, which gets its reply alone, and the server stays up."""
    want = _alone(pipe, PROMPTS[0], max_tokens=6).texts[0]  # before `slow` shares the runtime
    slow = pipeline.Pipeline(
        _SlowRuntime(pipe.runtime), pipe.tokenizer, pipe.eos_token_ids, defaults=pipe.defaults
    )
    with _serve(slow, max_batch=1) as server:
        body = {"model": MODEL, "prompt": PROMPTS[4], "max_tokens": 200, "temperature": 0}
        with httpx.stream(
            "POST", f"{server.url}/v1/completions", json=body | {"stream": True}, timeout=60
        ) as r:
            assert r.status_code == 200
            next(r.iter_lines())  # one event, then hang up mid-stream
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        got = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=6, temperature=0)
        assert got.choices[0].text == want
        for _ in range(200):
            if httpx.get(f"{server.url}/health").json()["running"] == 0:
                break
            time.sleep(0.05)
        generated = _metrics(server)["redrafter_generated_tokens_total"]
        assert generated - got.usage.completion_tokens < 100, "the abandoned row ran on"
        assert httpx.get(f"{server.url}/health").json()["running"] == 0


def test_seeded_sample_repeats_under_load(server: LiveServer, client: Any) -> None:
    """A seeded sampled request decodes in a batch of its own: the same reply alone and while
    greedy streams keep the batch busy."""
    seeded = {"model": MODEL, "prompt": PROMPTS[3], "max_tokens": 10, "temperature": 1.0}
    seeded |= {"top_p": 0.9, "seed": 11}
    alone = client.completions.create(**seeded).choices[0].text

    def greedy(i: int) -> str:
        c = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        r = c.completions.create(model=MODEL, prompt=PROMPTS[i], max_tokens=20, temperature=0)
        return r.choices[0].text

    with ThreadPoolExecutor(5) as pool:
        busy = [pool.submit(greedy, i) for i in range(4)]
        loaded = pool.submit(lambda: client.completions.create(**seeded).choices[0].text)
        assert loaded.result() == alone
        assert all(f.result() for f in busy)


def test_max_batch_bad_value_is_one_line_exit_2(onnx_bundle) -> None:  # type: ignore[no-untyped-def]
    result = CliRunner().invoke(
        main, ["serve", "--bundle", str(onnx_bundle.root), "--max-batch", "0"]
    )
    assert result.exit_code == 2
    assert result.output.startswith("error: ") and result.output.count("\n") == 1
    assert "--max-batch 0" in result.output


def _post(server: LiveServer, path: str, body: Any) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, timeout=60)


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/completions", {"prompt": "w5"}, "model"),
        ("/v1/completions", {"model": MODEL, "prompt": ""}, "prompt"),
        ("/v1/completions", {"model": MODEL, "prompt": [5, 999]}, "prompt"),
        ("/v1/completions", {"model": MODEL, "prompt": "w5", "temperature": 3}, "temperature"),
        ("/v1/completions", {"model": MODEL, "prompt": "w5", "top_p": 0}, "top_p"),
        ("/v1/completions", {"model": MODEL, "prompt": "w5", "max_tokens": 0}, "max_tokens"),
        ("/v1/completions", {"model": MODEL, "prompt": "w5", "n": 2}, "n"),
        ("/v1/completions", {"model": MODEL, "prompt": "w5", "seed": -1}, "seed"),
        ("/v1/completions", {"model": MODEL, "prompt": "w5", "stop": [""]}, "stop"),
        ("/v1/completions", {"model": MODEL, "prompt": "w5", "stream": "yes"}, "stream"),
        ("/v1/completions", {"model": MODEL, "prompt": "w5", "logprobs": 2}, "logprobs"),
        (
            "/v1/completions",
            {"model": MODEL, "prompt": "w5", "presence_penalty": 2.5},
            "presence_penalty",
        ),
        (
            "/v1/completions",
            {"model": MODEL, "prompt": "w5", "frequency_penalty": "1"},
            "frequency_penalty",
        ),
        ("/v1/completions", {"model": MODEL, "prompt": "w5", "logit_bias": {"5": 1}}, "logit_bias"),
        ("/v1/completions", {"model": MODEL, "prompt": "w5", "top_k": -2}, "top_k"),
        ("/v1/completions", {"model": MODEL, "prompt": "w5", "top_k": 2.5}, "top_k"),
        ("/v1/completions", {"model": MODEL, "prompt": "w5", "min_p": 1}, "min_p"),
        (
            "/v1/completions",
            {"model": MODEL, "prompt": "w5", "repetition_penalty": 0},
            "repetition_penalty",
        ),
        ("/v1/chat/completions", {"model": MODEL, "messages": []}, "messages"),
        ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user"}]}, "messages[0]"),
        (
            "/v1/chat/completions",
            {"model": MODEL, "messages": [{"role": "assistant", "content": "w5"}]},
            "messages",
        ),
    ],
)
def test_bad_field_is_400_naming_it(server: LiveServer, path: str, body: Any, param: str) -> None:
    r = _post(server, path, body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"
    assert error["message"] and "Traceback" not in r.text


def test_not_json_is_400(server: LiveServer) -> None:
    r = httpx.post(f"{server.url}/v1/completions", content=b"{not json", timeout=60)
    assert r.status_code == 400
    assert "JSON" in r.json()["error"]["message"]


def test_unknown_model_is_404(server: LiveServer, client: Any) -> None:
    r = _post(server, "/v1/completions", {"model": "gpt-4", "prompt": "w5"})
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "w5"}])


def test_prompt_longer_than_context_is_400(server: LiveServer, pipe: pipeline.Pipeline) -> None:
    context = pipe.runtime.context_length
    long = " ".join(["w5"] * context)
    r = _post(server, "/v1/completions", {"model": MODEL, "prompt": long})
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "context_length_exceeded"
    assert r.json()["error"]["param"] == "prompt"
    fits = " ".join(["w5"] * (context - 4))
    r = _post(server, "/v1/completions", {"model": MODEL, "prompt": fits, "max_tokens": 5})
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "max_tokens"


def test_full_queue_is_503(pipe: pipeline.Pipeline) -> None:
    with _serve(pipe, max_queue=1) as server:
        # Hold the pipeline from this thread (an open stream holds its lock), so the server's
        # decode of request A waits, B waits in the queue, and C finds the queue full.
        held = pipe.stream([[5, 6, 7]], DecodeOptions(speculative=False, max_new_tokens=4))
        next(held)
        body = {"model": MODEL, "prompt": "w5 w6", "max_tokens": 3, "temperature": 0}
        results: dict[str, httpx.Response] = {}

        def send(name: str) -> None:
            results[name] = _post(server, "/v1/completions", body)

        def wait_for(waiting: int, running: int) -> None:
            for _ in range(600):
                health = httpx.get(f"{server.url}/health").json()
                if (health["queue_depth"], health["running"]) == (waiting, running):
                    return
                threading.Event().wait(0.05)
            raise AssertionError(f"the server never reached {waiting} waiting, {running} running")

        a = threading.Thread(target=send, args=("a",))
        a.start()
        wait_for(0, 1)
        b = threading.Thread(target=send, args=("b",))
        b.start()
        wait_for(1, 1)
        c = _post(server, "/v1/completions", body)
        held.close()  # type: ignore[attr-defined]
        a.join(60)
        b.join(60)
        assert c.status_code == 503
        assert c.json()["error"]["code"] == "queue_full"
        assert results["a"].status_code == results["b"].status_code == 200
        assert (
            results["a"].json()["choices"][0]["text"] == results["b"].json()["choices"][0]["text"]
        )
        metrics = httpx.get(f"{server.url}/metrics").text
        assert 'redrafter_requests_total{endpoint="completion",status="503"} 1' in metrics


def test_models_health_and_metrics(server: LiveServer, client: Any) -> None:
    assert [m.id for m in client.models.list()] == [MODEL]
    client.completions.create(model=MODEL, prompt=PROMPTS[5], max_tokens=6, temperature=0)
    health = httpx.get(f"{server.url}/health").json()
    assert health["status"] == "ok"
    r = httpx.get(f"{server.url}/metrics")
    assert r.headers["content-type"].startswith("text/plain")
    samples = {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in r.text.splitlines()
        if line and not line.startswith("#")
    }
    assert samples['redrafter_requests_total{endpoint="completion",status="200"}'] >= 1
    assert samples["redrafter_generated_tokens_total"] >= 6
    assert samples["redrafter_decode_steps_total"] >= 1
    assert samples["redrafter_tokens_per_step"] > 0
    assert samples["redrafter_queue_depth"] == 0
    assert 'redrafter_step_phase_seconds_total{phase="verify"}' in samples


@pytest.mark.parametrize(
    "flags",
    [
        ["--port", "70000"],
        ["--max-queue", "0"],
        ["--beam-width", "0"],
        ["--min-draft-prob", "1.5"],
        ["--lookup-min-ngram", "0"],
        ["--lookup-max-ngram", "40"],
        ["--runtime", "coreml"],
        ["--max-batch", "0"],
        ["--speculate-max-rows", "0"],
    ],
)
def test_serve_bad_flags_exit_2(onnx_bundle, flags: list[str]) -> None:  # type: ignore[no-untyped-def]
    result = CliRunner().invoke(main, ["serve", "--bundle", str(onnx_bundle.root), *flags])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output


def test_serve_bad_bundle_or_beam_exits_2(onnx_bundle, tmp_path) -> None:  # type: ignore[no-untyped-def]
    result = CliRunner().invoke(main, ["serve", "--bundle", str(tmp_path / "missing")])
    assert result.exit_code == 2
    assert result.output.startswith("error: ")
    # A beam this bundle has no drafter graph for is refused before the server starts.
    result = CliRunner().invoke(
        main, ["serve", "--bundle", str(onnx_bundle.root), "--beam-width", "7"]
    )
    assert result.exit_code == 2
    assert "no drafter graph" in result.output


def _start_cli_server(onnx_bundle, *flags: str) -> tuple[subprocess.Popen, str]:  # type: ignore[no-untyped-def]
    """`redrafter serve` as a user starts it, in a subprocess on a free port, once /health
    answers: (the process, its URL)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "redrafter.cli", "serve", "--bundle", str(onnx_bundle.root)]
    command += ["--port", str(port), "--threads", "1", "--model-name", MODEL, *flags]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    for _ in range(1200):  # bounded wait for startup (loading the runtime takes a while)
        if process.poll() is not None:
            raise AssertionError(process.stderr.read().decode())  # type: ignore[union-attr]
        try:
            if httpx.get(f"{url}/health").status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        threading.Event().wait(0.05)
    process.terminate()
    raise AssertionError("the server did not answer /health within 60 s")


def test_cli_serves_a_bundle(onnx_bundle) -> None:  # type: ignore[no-untyped-def]
    """`redrafter serve` itself, as a user starts it: a subprocess answering the client."""
    process, url = _start_cli_server(onnx_bundle)
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        got = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=5, temperature=0)
        assert got.usage.completion_tokens >= 1
    finally:
        process.terminate()
        process.wait(30)


def test_cli_workers_are_replicas_on_one_port(onnx_bundle) -> None:  # type: ignore[no-untyped-def]
    """`--workers 2`: uvicorn's process manager runs two processes, each with its own runtime,
    on one port. Both answer (two pids behind /health), and since the server keeps no state
    between requests, the same greedy request gets the same reply whichever answers."""
    process, url = _start_cli_server(onnx_bundle, "--workers", "2")
    try:
        pids: set[int] = set()
        for _ in range(400):  # a new connection each: the kernel picks the process
            pids.add(httpx.get(f"{url}/health", headers={"Connection": "close"}).json()["pid"])
            if len(pids) == 2:
                break
            threading.Event().wait(0.05)
        assert len(pids) == 2 and process.pid not in pids

        def ask(_: int) -> str:
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
            r = client.completions.create(
                model=MODEL, prompt=PROMPTS[1], max_tokens=6, temperature=0
            )
            return r.choices[0].text

        with ThreadPoolExecutor(4) as pool:
            replies = list(pool.map(ask, range(8)))
        assert len(set(replies)) == 1 and replies[0]
    finally:
        process.terminate()
        process.wait(30)
