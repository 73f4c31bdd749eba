"""Chat completions through the real server on designed checkpoints, with the openai SDK and httpx."""

from __future__ import annotations

import httpx
import pytest
from transformers import AutoTokenizer

from .helpers import chat_body, stream

THINKING_CONTENT = "Hello! I am a demo model."
THINKING_REASONING = "Let me think briefly"


def prompt_token_count(ckpt, messages, **template_kwargs) -> int:
    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **template_kwargs)
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def test_health_and_models(vl_server, vl_ckpt):
    health = httpx.get(vl_server.url + "/health").json()
    assert {k: health[k] for k in ("ok", "modelReady", "modelId", "error")} == \
        {"ok": True, "modelReady": True, "modelId": vl_ckpt.name, "error": None}
    assert health["kvCache"]["slots"] == 16 and health["dtype"] == "torch.float32"
    assert health["quantization"] == "none" and health["compiled"] is False
    models = vl_server.client().models.list()
    assert [m.id for m in models.data] == [vl_ckpt.name]


def test_non_stream_reply_with_reasoning_and_usage(vl_server, vl_ckpt):
    messages = [{"role": "user", "content": "hi"}]
    reply = vl_server.client().chat.completions.create(model="whatever", messages=messages)
    choice = reply.choices[0]
    assert reply.object == "chat.completion"
    assert reply.model == vl_ckpt.name
    assert choice.message.role == "assistant"
    assert choice.message.content == THINKING_CONTENT
    assert choice.message.reasoning_content == THINKING_REASONING
    assert choice.finish_reason == "stop"
    # 14 designed tokens and the end-of-turn token.
    assert reply.usage.completion_tokens == 15
    assert reply.usage.prompt_tokens == prompt_token_count(vl_ckpt, messages)
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 15


def test_stream_with_sdk(vl_server):
    chunks = list(vl_server.client().chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hi"}], stream=True,
        stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    reasoning = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks if c.choices)
    assert content == THINKING_CONTENT
    assert reasoning == THINKING_REASONING
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == ["stop"]
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 15


def test_stream_event_ids_and_done(vl_server):
    response, sse = stream(vl_server.url, chat_body(stream=True, session_id="ids-1"))
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["cache-control"] == "no-cache"
    assert response.headers["x-accel-buffering"] == "no"
    assert sse.events[-1][1] == "[DONE]"
    assert sse.ids == [f"ids-1:{i}" for i in range(len(sse.events))]
    assert all(c["id"] == "ids-1" for c in sse.chunks())
    # Without include_usage there is no usage chunk: the finish chunk comes right before [DONE].
    assert sse.chunks()[-1]["choices"][0]["finish_reason"] == "stop"


def test_server_makes_a_session_id(vl_server):
    _, sse = stream(vl_server.url, chat_body(stream=True))
    session_id = sse.ids[0].rsplit(":", 1)[0]
    assert session_id.startswith("chatcmpl-")
    assert all(i.startswith(session_id + ":") for i in sse.ids)
    assert sse.chunks()[0]["id"] == session_id


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
def test_max_tokens_gives_length(vl_server, field):
    reply = httpx.post(vl_server.url + "/v1/chat/completions", json=chat_body(**{field: 3}), timeout=30).json()
    assert reply["choices"][0]["finish_reason"] == "length"
    assert reply["usage"]["completion_tokens"] == 3
    assert reply["choices"][0]["message"]["reasoning_content"] == "Let me think"
    assert reply["choices"][0]["message"]["content"] == ""


def test_default_max_tokens_from_settings(server_factory, vl_ckpt):
    server = server_factory(vl_ckpt, MAX_TOKENS=4)
    reply = server.client().chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    assert reply.usage.completion_tokens == 4 and reply.choices[0].finish_reason == "length"


def test_stop_string_across_tokens(vl_server):
    client = vl_server.client()
    # "lo! I" spans the tokens "Hello", "!" and " I".
    reply = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], stop="lo! I")
    assert reply.choices[0].message.content == "Hel"
    assert reply.choices[0].finish_reason == "stop"
    chunks = list(client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}],
                                                 stop=["zzz", "lo! I"], stream=True))
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(pieces) == "Hel"
    assert not any("lo" in p for p in pieces)  # the held-back "lo" never leaked


def test_stop_string_that_never_matches_releases_held_text(vl_server):
    reply = vl_server.client().chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hi"}], stop=["model!"])
    assert reply.choices[0].message.content == THINKING_CONTENT


def test_enable_thinking_false_reaches_template(vl_server, vl_ckpt):
    messages = [{"role": "user", "content": "hi"}]
    reply = vl_server.client().chat.completions.create(
        model="m", messages=messages, extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert reply.choices[0].message.content == THINKING_CONTENT
    assert getattr(reply.choices[0].message, "reasoning_content", None) is None
    assert reply.usage.prompt_tokens == prompt_token_count(vl_ckpt, messages, enable_thinking=False)
    assert reply.usage.completion_tokens == 9


def test_multi_turn_with_system_and_assistant(vl_server, vl_ckpt):
    messages = [{"role": "system", "content": "You are terse."},
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "Hello."},
                {"role": "developer", "content": "Be kind."},
                {"role": "user", "content": [{"type": "text", "text": "again"}]}]
    reply = vl_server.client().chat.completions.create(model="m", messages=messages)
    assert reply.choices[0].message.content == THINKING_CONTENT
    expected = [dict(m, role="system") if m["role"] == "developer" else m for m in messages]
    assert reply.usage.prompt_tokens == prompt_token_count(vl_ckpt, expected)


def test_text_only_model(text_server, text_ckpt):
    messages = [{"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "text", "text": "there"}]}]
    reply = text_server.client().chat.completions.create(model="m", messages=messages)
    assert reply.choices[0].message.content == "Hello from a text model."
    assert getattr(reply.choices[0].message, "reasoning_content", None) is None
    assert reply.usage.prompt_tokens == prompt_token_count(text_ckpt, [{"role": "user", "content": "hi\nthere"}])
    chunks = list(text_server.client().chat.completions.create(model="m", messages=messages, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Hello from a text model."


def test_seed_makes_sampling_repeatable(server_factory, random_text_ckpt):
    server = server_factory(random_text_ckpt)
    client = server.client()

    def sample(seed):
        return client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}],
                                              temperature=1.0, seed=seed, max_tokens=24).choices[0].message.content

    assert sample(7) == sample(7)
    assert len({sample(7), sample(8), sample(9)}) > 1
    greedy = [client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}],
                                             temperature=0, max_tokens=16).choices[0].message.content
              for _ in range(2)]
    assert greedy[0] == greedy[1]


def test_top_k_one_is_greedy(server_factory, random_text_ckpt):
    server = server_factory(random_text_ckpt)
    client = server.client()
    ask = dict(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=16)
    greedy = client.chat.completions.create(temperature=0, **ask).choices[0].message.content
    for seed in (1, 2, 3):
        assert client.chat.completions.create(temperature=1.5, seed=seed, extra_body={"top_k": 1},
                                              **ask).choices[0].message.content == greedy
        assert client.chat.completions.create(temperature=1.5, seed=seed, top_p=1e-6,
                                              **ask).choices[0].message.content == greedy


def test_penalties_change_the_choice(endless_server):
    client = endless_server.client()
    ask = dict(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=8, temperature=0)

    def reasoning(**extra):
        return client.chat.completions.create(**ask, **extra).choices[0].message.reasoning_content

    # The endless checkpoint prefers " tock" after " tick" by one logit over " tack".
    assert reasoning() == " tick tock" * 4
    assert "tack" in reasoning(frequency_penalty=2.0)
    assert "tack" in reasoning(presence_penalty=2.0)
    assert "tack" in reasoning(extra_body={"repetition_penalty": 1.5})
    assert reasoning(presence_penalty=0.5) == " tick tock" * 4


def test_context_limit(server_factory, small_context_ckpt):
    server = server_factory(small_context_ckpt)
    client = server.client()
    # The prompt "hi" takes 21 tokens of the 40-token context: 19 more fit, 20 are a 400; without
    # max_tokens, generation is clipped to the rest.
    for max_tokens in (19, None):
        reply = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}],
                                               **({"max_tokens": max_tokens} if max_tokens else {}))
        assert reply.choices[0].finish_reason == "length"
        assert reply.usage.prompt_tokens + reply.usage.completion_tokens == 40
    over = httpx.post(server.url + "/v1/chat/completions", json=chat_body("hi", max_tokens=20))
    assert over.status_code == 400 and over.json()["error"]["param"] == "max_tokens"
    # 19 prompt characters more leave exactly 0 tokens: the prompt alone does not fit.
    fits = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi" + "x" * 18}])
    assert fits.usage.prompt_tokens == 39 and fits.usage.completion_tokens == 1
    response = httpx.post(server.url + "/v1/chat/completions", json=chat_body("hi" + "x" * 19))
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "context_length_exceeded"
