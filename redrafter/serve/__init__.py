"""`redrafter serve`: an OpenAI-compatible HTTP server over one pipeline (docs/serve.md).

Modules: `requests` (OpenAI bodies checked into `GenerationRequest`s, error bodies), `engine`
(the scheduler: `BatchEngine`, continuous batching from a bounded FIFO queue), `metrics`
(Prometheus text), `app` (the FastAPI routes). FastAPI and uvicorn come with the `[serve]`
extra; this module imports them only when a server is built."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from redrafter.decoding.lookup import MAX_NGRAM, MIN_NGRAM, SPAN_PER_NGRAM
from redrafter.decoding.options import DecodeOptions
from redrafter.errors import ConfigError
from redrafter.pipeline import Pipeline, check_options, decode_options, open_pipeline

if TYPE_CHECKING:
    from fastapi import FastAPI


@dataclasses.dataclass(frozen=True)
class ServeOptions:
    """How the server decodes (the same mode and beam for every request), how many requests
    decode together (`max_batch` rows of one continuous batch) and how many may wait."""

    beam_width: int | None = None  # None: the bundle's
    beam_length: int | None = None
    prompt_lookup: bool = False
    min_draft_prob: float = 0.0
    lookup_span: int = SPAN_PER_NGRAM
    lookup_min_ngram: int = MIN_NGRAM
    lookup_max_ngram: int = MAX_NGRAM
    autoregressive: bool = False
    max_queue: int = 64
    max_batch: int = 4
    # Speculate while at most this many rows decode (DecodeOptions.speculate_max_rows); None:
    # `default_speculate_max_rows` for the runtime's device.
    speculate_max_rows: int | None = None

    def __post_init__(self) -> None:
        if (
            not isinstance(self.max_batch, int)
            or isinstance(self.max_batch, bool)
            or self.max_batch < 1
        ):
            raise ConfigError(f"--max-batch {self.max_batch!r} must be an integer >= 1")
        if self.speculate_max_rows is not None and (
            not isinstance(self.speculate_max_rows, int)
            or isinstance(self.speculate_max_rows, bool)
            or self.speculate_max_rows < 1
        ):
            raise ConfigError(
                f"--speculate-max-rows {self.speculate_max_rows!r} must be an integer >= 1"
            )
        if self.max_queue < 1:
            raise ConfigError(f"max_queue {self.max_queue!r} must be >= 1")


def server_decode_options(pipe: Pipeline, serve: ServeOptions) -> DecodeOptions:
    """The decode options every request starts from, checked against the runtime (a beam the
    bundle has no drafter graph for, or speculation without a drafter, is a `ConfigError`)."""
    options = decode_options(
        pipe.defaults,
        beam_width=serve.beam_width,
        beam_length=serve.beam_length,
        speculative=pipe.defaults.speculative and not serve.autoregressive,
        prompt_lookup=serve.prompt_lookup,
        min_draft_prob=serve.min_draft_prob,
        lookup_span=serve.lookup_span,
        lookup_min_ngram=serve.lookup_min_ngram,
        lookup_max_ngram=serve.lookup_max_ngram,
    )
    limit = serve.speculate_max_rows
    if limit is None:
        limit = default_speculate_max_rows(getattr(pipe.runtime, "device", "cpu"))
    options = options.replace(speculate_max_rows=limit)
    check_options(pipe.runtime, options)
    return options


def default_speculate_max_rows(device: str) -> int | None:
    """How many decoding rows a server speculates for unless told: 1 on the CPU, where a
    verify is compute-bound, so a batch of trees costs about what its nodes cost and 2 or more
    rows decode faster one token each (benchmarks/RESULTS.md, issue 20); no limit on CUDA,
    where a verify of a few dozen tokens costs about what one token costs (not yet measured
    under a server: no GPU was lent to the session that set this)."""
    return 1 if device == "cpu" else None


def build_app(pipe: Pipeline, serve: ServeOptions, *, model: str) -> FastAPI:
    """The FastAPI app serving `pipe` under the model id `model`."""
    from redrafter.serve.app import create_app

    options = server_decode_options(pipe, serve)
    return create_app(
        pipe, options=options, model=model, max_queue=serve.max_queue, max_batch=serve.max_batch
    )


def require_server_packages() -> None:
    """Raise a one-line `ConfigError` when the `[serve]` extra is not installed."""
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise ConfigError(
            f"redrafter serve needs {e.name}, which is not installed; "
            "pip install 'redrafter[serve]'"
        ) from None


# `--workers N`: uvicorn starts N processes that import `worker_app` and call it; each reads
# what to serve from this variable (JSON) and loads its own runtime.
WORKER_CONFIG = "REDRAFTER_SERVE_WORKER"


def serve_bundle(
    bundle: str | Path,
    serve: ServeOptions,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    runtime: str | None = None,
    device: str = "cpu",
    threads: int | None = None,
    model: str | None = None,
    workers: int = 1,
) -> None:
    """Load `bundle` and serve it until interrupted. One process owns one runtime; `workers`
    > 1 has uvicorn's own process manager run that many such processes on one port (the
    kernel spreads connections over them), each loading the bundle (docs/serve.md)."""
    require_server_packages()
    import uvicorn

    if workers < 1:
        raise ConfigError(f"workers {workers!r} must be >= 1")
    config = {
        "bundle": str(Path(bundle).resolve()),
        "serve": dataclasses.asdict(serve),
        "runtime": runtime,
        "device": device,
        "threads": threads,
        "model": model or Path(bundle).resolve().name,
    }
    if workers > 1:
        # Checked once here, so a bad bundle or beam is one line, not N crashed workers.
        _app_from(config)
        os.environ[WORKER_CONFIG] = json.dumps(config)
        uvicorn.run(
            "redrafter.serve:worker_app",
            factory=True,
            workers=workers,
            host=host,
            port=port,
            log_level="info",
        )
        return
    uvicorn.run(_app_from(config), host=host, port=port, log_level="info")


def _app_from(config: dict) -> FastAPI:
    """The app a `serve_bundle` config describes (its own pipeline and runtime)."""
    pipe = open_pipeline(
        bundle=config["bundle"],
        runtime=config["runtime"],
        device=config["device"],
        threads=config["threads"],
    )
    return build_app(pipe, ServeOptions(**config["serve"]), model=config["model"])


def worker_app() -> FastAPI:
    """The app of one `--workers` process (uvicorn's factory), from `WORKER_CONFIG`."""
    raw = os.environ.get(WORKER_CONFIG)
    if not raw:
        raise ConfigError(f"{WORKER_CONFIG} is not set: start workers with `redrafter serve`")
    return _app_from(json.loads(raw))
