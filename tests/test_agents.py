"""Agents' features through the live server, on checkpoints rendered with the real Qwen3 chat
templates: tool calls (parsed, streamed, in reasoning, history), logprobs and n."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from qwenserve import checkpoints as ck

from .helpers import chat_body, read_sse, stream
from .test_errors import assert_envelope, post

TEMPLATES = Path(__file__).resolve().parents[2] / "shared/fixtures/qwen3-templates"
TEXT_TEMPLATE = TEMPLATES / "qwen3.chat_template.jinja"
VL_TEMPLATE = TEMPLATES / "qwen3-vl-thinking.chat_template.jinja"
needs_templates = pytest.mark.skipif(not (TEXT_TEMPLATE.is_file() and VL_TEMPLATE.is_file()),
                                     reason=f"the real Qwen3 chat templates are not in {TEMPLATES}")

TOOLS = [ck.WEATHER_TOOL, ck.TIME_TOOL]
WEATHER_CALL = {"name": "get_weather", "arguments": '{"city": "Paris"}'}
TIME_CALL = {"name": "get_time", "arguments": '{"timezone": "Europe/Paris"}'}


def ask(tools=TOOLS, **extra) -> dict:
    return chat_body("What is the weather in Paris?", tools=tools, **extra)


def calls_of(message: dict) -> list[dict]:
    return [{"name": c["function"]["name"], "arguments": c["function"]["arguments"]} for c in message["tool_calls"]]


def streamed_calls(chunks: list[dict]) -> tuple[list[dict], list[str]]:
    """Tool calls assembled from stream deltas the way OpenAI clients do, and their ids."""
    calls: dict[int, dict] = {}
    ids: dict[int, str] = {}
    for chunk in chunks:
        for choice in chunk.get("choices", []):
            for delta in choice["delta"].get("tool_calls") or []:
                call = calls.setdefault(delta["index"], {"name": "", "arguments": ""})
                if "id" in delta:
                    ids[delta["index"]] = delta["id"]
                    assert delta["type"] == "function" and delta["function"]["arguments"] == ""
                call["name"] += delta["function"].get("name", "")
                call["arguments"] += delta["function"].get("arguments", "")
    return [calls[i] for i in sorted(calls)], [ids[i] for i in sorted(ids)]


def finish_reasons(chunks: list[dict]) -> list[str]:
    return [c["choices"][0]["finish_reason"] for c in chunks if c.get("choices") and c["choices"][0]["finish_reason"]]


@pytest.fixture(scope="module")
def tool_servers(server_factory_module, ckpt_dir):
    """One live server per designed tool reply, built lazily."""
    builders = {
        "one_call": lambda p: ck.build_tool_text_checkpoint(p, TEXT_TEMPLATE, ck.TOOL_CALL_REPLY),
        "parallel": lambda p: ck.build_tool_text_checkpoint(p, TEXT_TEMPLATE, ck.PARALLEL_CALLS_REPLY),
        "no_args": lambda p: ck.build_tool_text_checkpoint(p, TEXT_TEMPLATE, ck.NO_ARGS_CALL_REPLY),
        "think_then_call": lambda p: ck.build_tool_vl_checkpoint(p, VL_TEMPLATE, ck.THINK_THEN_CALL_REPLY),
        "call_in_reasoning": lambda p: ck.build_tool_vl_checkpoint(p, VL_TEMPLATE, ck.CALL_IN_REASONING_REPLY),
    }
    started = {}

    def get(name: str):
        if name not in started:
            started[name] = server_factory_module(builders[name](ckpt_dir / f"tool-{name}"))
        return started[name]

    return get


# ---- tool calls ------------------------------------------------------------------------------------


@needs_templates
def test_a_tool_call_becomes_message_tool_calls(tool_servers):
    reply = post(tool_servers("one_call"), ask()).json()
    choice = reply["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] is None
    assert calls_of(choice["message"]) == [WEATHER_CALL]
    call = choice["message"]["tool_calls"][0]
    assert call["type"] == "function" and call["id"].startswith("call_") and len(call["id"]) == 29


@needs_templates
def test_the_sdk_reads_tool_calls(tool_servers):
    reply = tool_servers("one_call").client().chat.completions.create(
        model="m", messages=[{"role": "user", "content": "Weather in Paris?"}], tools=TOOLS, tool_choice="auto")
    call = reply.choices[0].message.tool_calls[0]
    assert (call.function.name, json.loads(call.function.arguments)) == ("get_weather", {"city": "Paris"})


@needs_templates
@pytest.mark.parametrize("name,content,calls", [
    ("one_call", None, [WEATHER_CALL]),
    ("parallel", "Checking both.", [WEATHER_CALL, TIME_CALL]),
    ("no_args", None, [{"name": "get_server_time", "arguments": "{}"}]),
])
def test_streamed_calls_equal_the_reply(tool_servers, name, content, calls):
    tools = TOOLS + [ck.SERVER_TIME_TOOL]
    server = tool_servers(name)
    reply = post(server, ask(tools)).json()["choices"][0]["message"]
    assert reply["content"] == content and calls_of(reply) == calls
    sse = stream(server.url, ask(tools, stream=True))[1]
    chunks = sse.chunks()
    assert streamed_calls(chunks)[0] == calls
    assert sse.text() == (content or "")
    assert not any("<tool" in (c["choices"][0]["delta"].get("content") or "") for c in chunks if c["choices"])
    assert finish_reasons(chunks) == ["tool_calls"]
    assert len(set(streamed_calls(chunks)[1])) == len(calls)


@needs_templates
def test_reasoning_then_call_and_call_inside_reasoning(tool_servers):
    then = post(tool_servers("think_then_call"), ask()).json()["choices"][0]
    assert then["message"]["reasoning_content"] == "The user asks about Paris.\n"
    assert calls_of(then["message"]) == [WEATHER_CALL] and then["finish_reason"] == "tool_calls"
    inside = post(tool_servers("call_in_reasoning"), ask()).json()["choices"][0]
    assert inside["message"]["reasoning_content"] == "I need the weather."
    assert calls_of(inside["message"]) == [WEATHER_CALL] and inside["message"]["content"] is None
    chunks = stream(tool_servers("call_in_reasoning").url, ask(stream=True))[1].chunks()
    assert streamed_calls(chunks)[0] == [WEATHER_CALL]
    reasoning = "".join(c["choices"][0]["delta"].get("reasoning_content") or "" for c in chunks if c["choices"])
    assert reasoning == "I need the weather."


@needs_templates
def test_tool_choice_none_and_no_tools_leave_the_text_alone(tool_servers):
    raw = "".join(ck.TOOL_CALL_REPLY)
    for body in (ask(tool_choice="none"), chat_body("What is the weather in Paris?")):
        choice = post(tool_servers("one_call"), body).json()["choices"][0]
        assert choice["message"]["content"] == raw and "tool_calls" not in choice["message"]
        assert choice["finish_reason"] == "stop"


@needs_templates
def test_history_with_calls_and_results_reaches_the_template(tool_servers):
    from transformers import AutoTokenizer

    server = tool_servers("one_call")
    history = [{"role": "user", "content": "Weather in Paris?"},
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "call_1", "type": "function", "function": WEATHER_CALL}]},
               {"role": "tool", "tool_call_id": "call_1", "content": [{"type": "text", "text": "18 C, sunny"}]}]
    reply = post(server, {"messages": history, "tools": TOOLS})
    assert reply.status_code == 200, reply.text
    tokenizer = AutoTokenizer.from_pretrained(server.env["MODEL_REPO_ID"])
    as_template_wants = [history[0], {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "18 C, sunny"}]
    text = tokenizer.apply_chat_template(as_template_wants, tools=TOOLS, add_generation_prompt=True, tokenize=False)
    assert "<tool_response>\n18 C, sunny\n</tool_response>" in text
    assert reply.json()["usage"]["prompt_tokens"] == len(tokenizer(text, add_special_tokens=False)["input_ids"])


@needs_templates
def test_resume_in_the_middle_of_a_tool_call_is_byte_identical(tool_servers):
    server = tool_servers("parallel")
    body = ask(stream=True, session_id="tools-resume")
    full = stream(server.url, body)[1]
    named = [i for i, (_, data) in enumerate(full.events) if '"tool_calls"' in data and '"name"' in data]
    cut = full.ids[named[0]]  # after the first call's name, before its arguments
    rest = stream(server.url, body, headers={"Last-Event-ID": cut})[1]
    assert full.events[named[0] + 1:] == rest.events
    again = httpx.get(server.url + "/v1/sessions/tools-resume/events", headers={"Last-Event-ID": "tools-resume:-1"},
                      timeout=30)
    assert read_sse(again).events == full.events


# ---- logprobs ----------------------------------------------------------------------------------------


def test_logprobs_are_aligned_with_the_content_tokens(text_server):
    reply = post(text_server, chat_body(logprobs=True, top_logprobs=2)).json()["choices"][0]
    entries = reply["logprobs"]["content"]
    assert [e["token"] for e in entries] == ck.TEXT_REPLY
    assert "".join(e["token"] for e in entries) == reply["message"]["content"]
    for entry in entries:
        assert entry["bytes"] == list(entry["token"].encode())
        assert entry["logprob"] == pytest.approx(0.0, abs=1e-6)  # the designed margin makes each certain
        assert len(entry["top_logprobs"]) == 2 and entry["top_logprobs"][0]["token"] == entry["token"]
        assert entry["top_logprobs"][1]["logprob"] < -50
    plain = post(text_server, chat_body()).json()["choices"][0]
    assert plain["logprobs"] is None


def test_streamed_logprobs_match_each_chunk(text_server):
    chunks = stream(text_server.url, chat_body(stream=True, logprobs=True))[1].chunks()
    tokens = []
    for chunk in chunks:
        choice = chunk["choices"][0]
        entries = (choice["logprobs"] or {}).get("content") or []
        assert "".join(e["token"] for e in entries) == (choice["delta"].get("content") or "")
        assert all(e["top_logprobs"] == [] for e in entries)
        tokens += [e["token"] for e in entries]
    assert tokens == ck.TEXT_REPLY


def test_logprobs_cover_the_answer_not_the_reasoning(vl_server):
    message = post(vl_server, chat_body(logprobs=True)).json()["choices"][0]
    assert message["message"]["reasoning_content"] == "Let me think briefly"
    tokens = [e["token"] for e in message["logprobs"]["content"]]
    assert "".join(tokens) == message["message"]["content"] == "Hello! I am a demo model."


def test_token_bytes_of_a_partial_character(text_ckpt):
    from transformers import AutoTokenizer

    from qwenserve.logprobs import TokenBytes, bytes_to_unicode

    tokenizer = AutoTokenizer.from_pretrained(text_ckpt)
    table = TokenBytes(tokenizer)
    first_byte_of_e_acute = tokenizer.convert_tokens_to_ids(bytes_to_unicode()[0xC3])
    assert table.bytes(first_byte_of_e_acute) == b"\xc3"
    assert table.entry(first_byte_of_e_acute, -1.5, [])["bytes"] == [0xC3]


# ---- n ---------------------------------------------------------------------------------------------------


def test_n_choices_in_a_reply_and_usage(text_server):
    reply = post(text_server, chat_body(n=3)).json()
    assert [c["index"] for c in reply["choices"]] == [0, 1, 2]
    assert {c["message"]["content"] for c in reply["choices"]} == {"Hello from a text model."}
    assert reply["usage"]["completion_tokens"] == 3 * (len(ck.TEXT_REPLY) + 1)


def test_n_at_the_limit_and_past_it(text_server):
    assert post(text_server, chat_body(n=4, max_tokens=2)).status_code == 200
    assert_envelope(post(text_server, chat_body(n=5, max_tokens=2)), 400, param="n")


def test_n_streamed_each_choice_with_its_index_and_finish(text_server):
    sse = stream(text_server.url, chat_body(n=3, stream=True, stream_options={"include_usage": True},
                                            session_id="three-choices"))[1]
    chunks = sse.chunks()
    texts, finishes = {}, {}
    for chunk in chunks[:-1]:
        (choice,) = chunk["choices"]
        texts[choice["index"]] = texts.get(choice["index"], "") + (choice["delta"].get("content") or "")
        if choice["finish_reason"]:
            finishes[choice["index"]] = choice["finish_reason"]
    assert texts == {i: "Hello from a text model." for i in range(3)}
    assert finishes == {0: "stop", 1: "stop", 2: "stop"}
    assert chunks[-1]["usage"]["completion_tokens"] == 3 * (len(ck.TEXT_REPLY) + 1)
    assert sse.indices == list(range(len(sse.events)))
    replay = httpx.get(text_server.url + "/v1/sessions/three-choices/events", timeout=30)
    assert read_sse(replay).events == sse.events


def test_choice_i_samples_with_seed_plus_i(server_factory_module, random_text_ckpt):
    server = server_factory_module(random_text_ckpt)
    body = chat_body(temperature=1.0, max_tokens=12)
    many = post(server, {**body, "n": 3, "seed": 5}).json()["choices"]
    singles = [post(server, {**body, "seed": 5 + i}).json()["choices"][0] for i in range(3)]
    assert [c["message"]["content"] for c in many] == [c["message"]["content"] for c in singles]
    assert len({c["message"]["content"] for c in many}) > 1


@needs_templates
def test_a_call_cut_by_max_tokens_is_text_with_finish_length(tool_servers):
    server = tool_servers("one_call")
    cut = "".join(ck.TOOL_CALL_REPLY[:2])
    choice = post(server, ask(max_tokens=2)).json()["choices"][0]
    assert (choice["message"]["content"], choice["finish_reason"]) == (cut, "length")
    assert "tool_calls" not in choice["message"]
    sse = stream(server.url, ask(max_tokens=2, stream=True))[1]
    assert sse.text() == cut and finish_reasons(sse.chunks()) == ["length"]


def test_n_choices_continue_after_kill_and_restart(server_factory, endless_ckpt, tmp_path):
    """One session holds all choices: after kill -9 each choice continues where it stopped."""
    from .test_persistence import read_then_kill

    server = server_factory(endless_ckpt, PERSIST_SESSIONS=1, SESSIONS_DB_PATH=tmp_path / "s.db",
                            CANCEL_AFTER_DISCONNECT_SECONDS=0)
    body = chat_body(n=2, stream=True, max_tokens=300, temperature=0, session_id="two-choices",
                     stream_options={"include_usage": True})
    seen = read_then_kill(server, body, {}, 60)
    server.start()
    rest = stream(server.url, body, headers={"Last-Event-ID": seen.ids[-1]}, timeout=300)[1]
    events = seen.events + rest.events
    assert [int(i.rsplit(":", 1)[1]) for i, _ in events] == list(range(len(events)))
    chunks = [json.loads(data) for _, data in events if data != "[DONE]"]
    texts = {0: "", 1: ""}
    for chunk in chunks[:-1]:
        (choice,) = chunk["choices"]
        texts[choice["index"]] += choice["delta"].get("reasoning_content") or ""
    assert texts[0] == texts[1] == " tick tock" * 150  # greedy: both choices follow the designed cycle
    assert chunks[-1]["usage"]["completion_tokens"] == 600
