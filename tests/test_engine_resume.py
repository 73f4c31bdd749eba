"""The engine continuing a generation from stored tokens (what a restart does), on a real checkpoint."""

from __future__ import annotations

import asyncio

import pytest

from qwenserve.checkpoints import THINKING_REPLY, build_tokenizer, token_id
from qwenserve.config import Settings
from qwenserve.engine import Engine
from qwenserve.sampling import SamplingParams


@pytest.fixture(scope="module")
def engine(vl_ckpt):
    engine = Engine(Settings(model_repo_id=str(vl_ckpt), device_map="cpu", _env_file=None))
    engine.start()
    assert engine.ready.wait(120), engine.error
    yield engine
    engine.stop()


def run(engine, resume_ids, **params):
    async def go():
        prompt = await asyncio.to_thread(engine.build_prompt, [{"role": "user", "content": "hi"}], {})
        generation = engine.submit(prompt, SamplingParams(temperature=0, **params), resume_ids)
        return [output async for output in generation]

    return asyncio.run(go())


def reply_ids(count):
    tokenizer = build_tokenizer()
    return [token_id(tokenizer, word) for word in THINKING_REPLY[:count]]


def test_continues_after_stored_tokens(engine):
    outputs = run(engine, reply_ids(3), max_new_tokens=100)
    assert outputs[0].kind == "replay" and outputs[0].text == "Let me think"
    assert "".join(o.text for o in outputs if o.kind == "delta") == " briefly</think>\n\nHello! I am a demo model."
    assert outputs[-1].finish_reason == "stop" and outputs[-1].completion_tokens == 15


def test_tokens_that_reached_max_tokens_end_without_a_new_token(engine):
    outputs = run(engine, reply_ids(4), max_new_tokens=4)
    assert [o.kind for o in outputs] == ["replay", "finish"]
    assert outputs[-1].finish_reason == "length" and outputs[-1].completion_tokens == 4


def test_tokens_that_hit_a_stop_string_end_without_a_new_token(engine):
    outputs = run(engine, reply_ids(3), max_new_tokens=100, stop=[" think"])
    assert [o.kind for o in outputs] == ["replay", "finish"]
    assert outputs[0].text == "Let me" and outputs[-1].finish_reason == "stop"
