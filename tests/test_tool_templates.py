"""Tool-calling checkpoints with the real Qwen3 chat templates: exact replies from a greedy loop,
parsed as the server will parse them, and tool history rendered back as the model wrote it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qwenserve import checkpoints as ck
from qwenserve.decoding import TextPipeline
from qwenserve.reasoning import ReasoningSplitter, prompt_opens_reasoning
from qwenserve.tools import ToolCallParser, message_tool_calls, tool_fields

TEMPLATES = Path(__file__).resolve().parents[2] / "shared/fixtures/qwen3-templates"
TEXT_TEMPLATE = TEMPLATES / "qwen3.chat_template.jinja"
VL_TEMPLATE = TEMPLATES / "qwen3-vl-thinking.chat_template.jinja"
pytestmark = pytest.mark.skipif(not (TEXT_TEMPLATE.is_file() and VL_TEMPLATE.is_file()),
                                reason=f"the real Qwen3 chat templates are not in {TEMPLATES}")

TOOLS = [ck.WEATHER_TOOL, ck.TIME_TOOL, ck.SERVER_TIME_TOOL]
QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]
WEATHER = ("get_weather", '{"city": "Paris"}')

# name: (model kind, reply, expected reasoning or None, content, calls)
CASES = {
    "one_call": ("text", ck.TOOL_CALL_REPLY, None, "", [WEATHER]),
    "parallel": ("text", ck.PARALLEL_CALLS_REPLY, None, "Checking both.",
                 [WEATHER, ("get_time", '{"timezone": "Europe/Paris"}')]),
    "no_args": ("text", ck.NO_ARGS_CALL_REPLY, None, "", [("get_server_time", "{}")]),
    "think_then_call": ("vl", ck.THINK_THEN_CALL_REPLY, "The user asks about Paris.\n", "", [WEATHER]),
    "call_in_reasoning": ("vl", ck.CALL_IN_REASONING_REPLY, "I need the weather.", "", [WEATHER]),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Each case's checkpoint, built once and loaded back through `from_pretrained`."""
    from transformers import (AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor,
                              AutoTokenizer)

    root = tmp_path_factory.mktemp("tool-checkpoints")
    loaded = {}
    for name, (kind, reply, *_) in CASES.items():
        if kind == "text":
            path = ck.build_tool_text_checkpoint(root / name, TEXT_TEMPLATE, reply)
            loaded[name] = (AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path))
        else:
            path = ck.build_tool_vl_checkpoint(root / name, VL_TEMPLATE, reply)
            loaded[name] = (AutoProcessor.from_pretrained(path), AutoModelForImageTextToText.from_pretrained(path))
    return loaded


def render(renderer, messages, tools=TOOLS) -> str:
    return renderer.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=False)


def template_history(messages: list[dict]) -> list[dict]:
    """OpenAI history as the server will hand it to the template: role, content, tool fields."""
    return [{"role": m["role"], "content": m.get("content") or "", **tool_fields(m)} for m in messages]


def greedy(renderer, model, max_new_tokens: int = 40) -> tuple[str, list[int]]:
    import torch

    prompt = render(renderer, QUESTION)
    tokenizer = getattr(renderer, "tokenizer", renderer)
    ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False)
    return prompt, out[0, ids.shape[1]:].tolist()


def parse_like_the_server(tokenizer, ids: list[int], prompt: str):
    """Token by token, as ChatStream does: text pipeline, reasoning splitter, then the tool-call parser
    on both channels (the reasoning channel flushed once `</think>` ends it)."""
    pipeline, splitter = TextPipeline(tokenizer, []), ReasoningSplitter(prompt_opens_reasoning(prompt))
    parser = ToolCallParser("chatcmpl-test")
    reasoning, content = [], []

    def route(pieces: tuple[str, str]) -> None:
        reasoning.append(parser.feed(pieces[0], "reasoning")[0])
        content.append(parser.feed(pieces[1], "content")[0])
        if not splitter.in_reasoning:
            reasoning.append(parser.flush("reasoning"))

    for token in ids:
        route(splitter.feed(pipeline.add(token)))
    route(splitter.feed(pipeline.finish()))
    route(splitter.flush())
    content.append(parser.flush("content"))
    reasoning_text = "".join(reasoning) if splitter.reasoning_used else None
    return reasoning_text, "".join(content), parser.calls


@pytest.mark.parametrize("name", CASES)
def test_checkpoint_replies_exactly_and_parses(models, name):
    kind, reply, reasoning, content, calls = CASES[name]
    renderer, model = models[name]
    tokenizer = getattr(renderer, "tokenizer", renderer)
    prompt, ids = greedy(renderer, model)
    assert prompt.endswith("<|im_start|>assistant\n<think>\n" if kind == "vl" else "<|im_start|>assistant\n")
    assert ids[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokenizer.decode(ids, skip_special_tokens=True) == "".join(reply)
    got_reasoning, got_content, got_calls = parse_like_the_server(tokenizer, ids, prompt)
    assert (got_reasoning, got_content) == (reasoning, content)
    assert [(c.name, c.arguments) for c in got_calls] == calls


def test_tool_tags_are_added_tokens_that_survive_decoding(models):
    tokenizer = models["one_call"][0]
    ids = tokenizer("<tool_call>x</tool_call>", add_special_tokens=False)["input_ids"]
    assert tokenizer.convert_ids_to_tokens([ids[0], ids[-1]]) == ["<tool_call>", "</tool_call>"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "<tool_call>x</tool_call>"


def test_tools_system_turn_is_rendered_exactly(models):
    system = [{"role": "system", "content": "You are terse."}]
    prompt = render(models["one_call"][0], system + QUESTION, tools=[ck.WEATHER_TOOL])
    assert prompt == (
        "<|im_start|>system\nYou are terse.\n\n# Tools\n\nYou may call one or more functions to assist with the "
        "user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
        + json.dumps(ck.WEATHER_TOOL) +
        "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
        "<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": "
        "<args-json-object>}\n</tool_call><|im_end|>\n<|im_start|>user\nWhat is the weather in Paris?<|im_end|>\n"
        "<|im_start|>assistant\n")


def openai_turn(name: str) -> dict:
    """The assistant message a client gets back for a case (and sends back in its history),
    with arguments written compactly, as clients often re-serialize them."""
    _, reply, reasoning, content, calls = CASES[name]
    parser = ToolCallParser("chatcmpl-test")
    found = parser.feed("".join(reply).split("</think>")[-1])[1]
    tool_calls = message_tool_calls(found)
    for call in tool_calls:
        function = call["function"]
        function["arguments"] = json.dumps(json.loads(function["arguments"]), separators=(",", ":"))
    message = {"role": "assistant", "content": content or None, "tool_calls": tool_calls}
    if reasoning is not None:
        message["reasoning_content"] = reasoning
    return message


@pytest.mark.parametrize("name", ["one_call", "parallel", "no_args", "think_then_call"])
def test_history_renders_the_turn_as_the_model_wrote_it(models, name):
    kind, reply, *_ = CASES[name]
    renderer = models[name][0]
    turn = openai_turn(name)
    # The first response as a string, the second as text parts (joined with "\n").
    contents = ["18°C", [{"type": "text", "text": "14:00"}, {"type": "text", "text": "CET"}]]
    responses = [{"role": "tool", "tool_call_id": call["id"], "content": content}
                 for call, content in zip(turn["tool_calls"], contents)]
    rendered = render(renderer, template_history(QUESTION + [turn] + responses))
    texts = ["18°C", "14:00\nCET"][:len(responses)]
    answers = "".join(f"\n<tool_response>\n{text}\n</tool_response>" for text in texts)
    next_prompt = "<|im_start|>assistant\n<think>\n" if kind == "vl" else "<|im_start|>assistant\n"
    assert rendered == (render(renderer, QUESTION) + "".join(reply) + "<|im_end|>\n<|im_start|>user"
                        + answers + "<|im_end|>\n" + next_prompt)


def test_history_of_a_call_made_inside_reasoning(models):
    """The template writes calls after `</think>`: the turn is rendered in its canonical form."""
    renderer = models["call_in_reasoning"][0]
    turn = {"role": "assistant", "content": None, "reasoning_content": "I need the weather.",
            "tool_calls": message_tool_calls(ToolCallParser("s").feed("".join(ck.TOOL_CALL_REPLY))[1])}
    rendered = render(renderer, template_history(QUESTION + [turn, {"role": "tool", "content": "18°C"}]))
    assert rendered.endswith(
        "<|im_start|>assistant\n<think>\nI need the weather.\n</think>\n\n" + "".join(ck.TOOL_CALL_REPLY)
        + "<|im_end|>\n<|im_start|>user\n<tool_response>\n18°C\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n<think>\n")


def test_raw_openai_history_is_not_what_the_templates_need(models):
    """Why `tool_fields` exists: `content: null` breaks the text template, text parts are written
    as a Python list, and string arguments are written as sent."""
    tokenizer = models["one_call"][0]
    call = {"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}
    raw = QUESTION + [{"role": "assistant", "content": None, "tool_calls": [call]}]
    with pytest.raises(Exception):
        render(tokenizer, raw)
    raw[1]["content"] = ""
    raw.append({"role": "tool", "tool_call_id": "call_1", "content": [{"type": "text", "text": "18°C"}]})
    assert '"arguments": {"city":"Paris"}}' in render(tokenizer, raw)
    assert "[{'type': 'text'" in render(tokenizer, raw)
    shaped = render(tokenizer, template_history(raw))
    assert '"arguments": {"city": "Paris"}}' in shaped and "<tool_response>\n18°C\n</tool_response>" in shaped


def test_builders_refuse_a_chain_a_bigram_model_cannot_follow(tmp_path):
    with pytest.raises(ValueError):
        ck.build_tool_text_checkpoint(tmp_path / "bad", TEXT_TEMPLATE, ck.TOOL_CALL_REPLY + ["<tool_call>"])
