"""A prefill chunk folded into a decode step (one pass, every weight read once) gives each row what the
two separate passes give: the same logits and the same keys and values in the cache, bitwise where the
projections are batch-invariant (bf16 on the AMX kernel), to rounding with torch's fp32 kernels."""

from __future__ import annotations

import time
from contextlib import contextmanager

import httpx
import pytest
import torch

from qwenserve.app import create_app
from qwenserve.config import Settings
from qwenserve.engine import Engine, native
from qwenserve.engine.pacing import PrefillPacer

from .helpers import InProcessServer, RunningStream, chat_body

POISON_SEED = 666


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def decoder(request, random_text_ckpt):
    engine = Engine(Settings(model_repo_id=str(random_text_ckpt), device_map="cpu", torch_dtype=request.param,
                             kv_cache_tokens=64, max_concurrent_requests=3, _env_file=None))
    engine.start()
    assert engine.ready.wait(120), engine.error
    yield engine.decoder
    engine.stop()


def exact(decoder) -> bool:
    return decoder.cache.keys[0].dtype == torch.bfloat16 and native.library() is not None


def same(decoder, mine: torch.Tensor, theirs: torch.Tensor) -> bool:
    if exact(decoder):
        return torch.equal(mine, theirs)
    return torch.allclose(mine.float(), theirs.float(), atol=1e-4, rtol=1e-4)


def cache_state(decoder) -> list[torch.Tensor]:
    cache = decoder.cache
    return [t[:, :, : cache.tokens].clone() for t in cache.keys + cache.values]  # the sink left out


def restore(decoder, state: list[torch.Tensor]) -> None:
    cache = decoder.cache
    for buffer, saved in zip(cache.keys + cache.values, state):
        buffer[:, :, : cache.tokens] = saved


@torch.inference_mode()
def test_folded_pass_equals_the_step_and_the_chunk_apart(decoder):
    """Slots 0 and 2 decode (prompts of 5 and 9 tokens); slot 1, between them, has 4 of its 10 prompt
    tokens in and takes the other 6: its decode position writes to the sink."""
    decoder.prefill([0, 1, 2], [[11, 12, 13, 14, 15], [21, 22, 23, 24], list(range(31, 40))], [0, 0, 0])
    step = (torch.tensor([16, 0, 40]), torch.tensor([5, 0, 9]), torch.tensor([5, decoder.cache.sink, 9]), 10)
    chunk = ([1], [[25, 26, 27, 28, 29, 30]], [4])
    before = cache_state(decoder)
    stepped, chunked = decoder.decode(*step), decoder.prefill(*chunk)
    apart = cache_state(decoder)
    restore(decoder, before)
    folded_step, folded_chunk = decoder.decode_and_prefill(step, chunk)
    assert folded_step.shape == stepped.shape and folded_chunk.shape == chunked.shape
    assert same(decoder, folded_step[[0, 2]], stepped[[0, 2]]) and same(decoder, folded_chunk, chunked)
    assert all(same(decoder, mine, theirs) for mine, theirs in zip(cache_state(decoder), apart))
    assert not torch.equal(folded_chunk, folded_step[[0]])  # the parts did not read each other's rows


def greedy(server, content: str, max_tokens: int) -> str:
    body = chat_body(content, max_tokens=max_tokens, temperature=0)
    message = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=120).json()["choices"][0]["message"]
    return (message.get("reasoning_content") or "") + (message.get("content") or "")


def test_a_failing_folded_pass_runs_the_step_and_the_chunk_apart(endless_ckpt, caplog):
    """A prompt arriving while a stream decodes is folded into its steps; when that pass fails, the
    step and the chunk run apart and both replies are what they are alone (the stream, cancelled once
    the prompt is answered, a prefix of its reply alone)."""
    app = create_app(Settings(model_repo_id=str(endless_ckpt), device_map="cpu", _env_file=None))
    server = InProcessServer(app)
    try:
        stream_alone, prompt_alone = greedy(server, "first", 1000), greedy(server, "second " * 40, 5)
        decoder, attempts = app.state.services.engine.decoder, []

        def failing(*args):
            attempts.append(args)
            raise RuntimeError("injected fault")

        decoder.decode_and_prefill = failing
        runner = RunningStream(server.url, "folding-runner", max_tokens=1000, ready_after=3, content="first")
        assert runner.start()
        try:
            assert greedy(server, "second " * 40, 5) == prompt_alone
        finally:
            runner.stop()
        streamed = runner.text()
        assert len(streamed) > 10 and stream_alone.startswith(streamed)
        assert attempts and any("running them apart" in r.getMessage() for r in caplog.records)
    finally:
        server.stop()


def counted_folds(monkeypatch) -> list:
    """The arguments of every folded pass the engine runs."""
    folds, real_fold = [], Engine._fold

    def fold(self, *args):
        folds.append(args)
        return real_fold(self, *args)

    monkeypatch.setattr(Engine, "_fold", fold)
    return folds


@contextmanager
def beside_a_stream(ckpt, session_id: str):
    """An in-process server on `ckpt` with a greedy stream decoding; at the end the stream is cancelled
    and the server stopped."""
    settings = Settings(model_repo_id=str(ckpt), device_map="cpu", _env_file=None)
    server = InProcessServer(create_app(settings, Engine(settings)))
    runner = RunningStream(server.url, session_id, max_tokens=1000, ready_after=3)
    try:
        assert runner.start()
        yield server, runner
    finally:
        runner.stop()
        server.stop()


def test_a_failing_chunk_folded_into_a_step_fails_its_request_alone(endless_ckpt, monkeypatch):
    """A prompt whose chunk fails arrives while a stream decodes: the folded pass fails, the chunk is
    retried alone and fails its request (500), and the stream goes on."""
    real_inputs, folds = Engine._chunk_inputs, counted_folds(monkeypatch)

    def chunk_inputs(rows, width):
        if any(row.job.params.seed == POISON_SEED for row in rows):
            raise RuntimeError("injected prefill fault")
        return real_inputs(rows, width)

    monkeypatch.setattr(Engine, "_chunk_inputs", staticmethod(chunk_inputs))
    with beside_a_stream(endless_ckpt, "folding-survivor") as (server, runner):
        failed = httpx.post(server.url + "/v1/chat/completions", timeout=60,
                            json=chat_body(max_tokens=5, temperature=0, seed=POISON_SEED))
        seen = len(runner.data)
        deadline = time.monotonic() + 30
        while len(runner.data) < seen + 5 and time.monotonic() < deadline:
            time.sleep(0.05)
    assert failed.status_code == 500 and failed.json()["error"]["code"] == "generation_failed"
    assert folds and len(runner.data) >= seen + 5
    assert "error" not in runner.data[-2]  # the stream ended by the cancel, not by the fault


def test_no_fold_before_a_step_was_measured(endless_ckpt, monkeypatch):
    """A folded chunk is charged the pass beyond the step estimate, and folding never measures a step:
    with no step measured (here: never), chunks run as passes of their own and the prompt still loads."""
    folds = counted_folds(monkeypatch)
    monkeypatch.setattr(PrefillPacer, "observe_step", lambda self, seconds: None)
    with beside_a_stream(endless_ckpt, "unmeasured") as (server, _):
        reply = httpx.post(server.url + "/v1/chat/completions", timeout=60,
                           json=chat_body("tick " * 600, max_tokens=2, temperature=0)).json()
    assert reply["usage"]["completion_tokens"] == 2 and folds == []
