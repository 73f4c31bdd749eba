"""Unit tests: the Qwen3 tool-call parser, fed whole, char by char and in odd splits."""

from __future__ import annotations

import json

import pytest

from qwenserve.tools import (ToolCallParser, call_id, message_tool_calls, parse_call, tool_call_deltas,
                             tool_fields)

WEATHER = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
TIME = '<tool_call>\n{"name": "get_time", "arguments": {"timezone": "Europe/Paris"}}\n</tool_call>'


def splits(text: str) -> list[list[str]]:
    """The same text whole, char by char, and in pieces of 2, 3, 5 and 7 characters."""
    ways = [[text], list(text)]
    for size in (2, 3, 5, 7):
        ways.append([text[i:i + size] for i in range(0, len(text), size)])
    return ways


def run(pieces: list[str], channel: str = "content", parser: ToolCallParser | None = None):
    """Feed pieces; return (text deltas, calls, parser). The flush's text is the last delta."""
    parser = parser or ToolCallParser("sess")
    deltas, calls = [], []
    for piece in pieces:
        text, new = parser.feed(piece, channel)
        deltas.append(text)
        calls.extend(new)
    deltas.append(parser.flush(channel))
    return deltas, calls, parser


def parsed(text: str, channel: str = "content"):
    """(content, [(name, arguments)]) of `text`, checked to be the same for every way of splitting it:
    content is the concatenation of the deltas, so an equal content means no tag leaked in any split."""
    results = set()
    for pieces in splits(text):
        deltas, calls, _ = run(pieces, channel)
        results.add(("".join(deltas), tuple((c.name, c.arguments) for c in calls)))
    assert len(results) == 1, results
    content, calls = results.pop()
    return content, list(calls)


def test_one_call():
    assert parsed(WEATHER) == ("", [("get_weather", '{"city": "Paris"}')])


def test_text_before_and_two_calls():
    text = "Checking both.\n" + WEATHER + "\n" + TIME + "\n"
    assert parsed(text) == ("Checking both.", [("get_weather", '{"city": "Paris"}'),
                                               ("get_time", '{"timezone": "Europe/Paris"}')])


def test_text_after_a_call_is_content_without_the_separator():
    content, calls = parsed(WEATHER + "\n\nDone, see above.\n")
    assert content == "Done, see above.\n" and calls == [("get_weather", '{"city": "Paris"}')]


@pytest.mark.parametrize("text", ["Hello", "Hello\n\n  world \n", "a < b and <b>bold</b> <tool", "x <tool_ca",
                                  "use <tool_call> tags", "</tool_call> alone", ""])
def test_text_without_calls_passes_unchanged(text):
    assert parsed(text) == (text, [])


@pytest.mark.parametrize("block", [
    "<tool_call>\nnot json\n</tool_call>",
    '<tool_call>\n{"arguments": {}}\n</tool_call>',                      # no name
    '<tool_call>\n{"name": 3, "arguments": {}}\n</tool_call>',            # name not a string
    '<tool_call>\n{"name": "f", "arguments": [1, 2]}\n</tool_call>',      # arguments not an object
    '<tool_call>\n{"name": "f", "arguments": "Paris"}\n</tool_call>',     # a string that is not JSON
    '<tool_call>\n{"name": "f", "arguments": {"x": NaN}}\n</tool_call>',  # not JSON
    '<tool_call>\n["f", {}]\n</tool_call>',
    '<tool_call>\n{"name": "f"} {"name": "g"}\n</tool_call>',
    "<tool_call>" + "[" * 100_000 + "</tool_call>",
])
def test_invalid_block_is_content_as_written(block):
    assert parsed("Before " + block + " after") == ("Before " + block + " after", [])


def test_invalid_block_between_calls_keeps_its_text():
    text = WEATHER + "\n<tool_call>oops</tool_call>\n" + TIME
    content, calls = parsed(text)
    assert content == "<tool_call>oops</tool_call>" and [n for n, _ in calls] == ["get_weather", "get_time"]


@pytest.mark.parametrize("arguments", ["{}", "null", '""', '"{}"'])
def test_no_arguments_are_an_empty_object(arguments):
    block = '<tool_call>\n{"name": "get_server_time", "arguments": ' + arguments + "}\n</tool_call>"
    assert parsed(block) == ("", [("get_server_time", "{}")])
    assert parsed('<tool_call>{"name": "get_server_time"}</tool_call>') == ("", [("get_server_time", "{}")])


def test_arguments_written_as_a_json_string_and_loose_whitespace():
    block = '<tool_call>  \n\t{ "name" : "f",\n "arguments" : "{\\"a\\": [1, \\"é\\"]}" }  \n\n</tool_call>'
    assert parsed(block) == ("", [("f", '{"a": [1, "é"]}')])


def test_arguments_are_reserialized_json():
    block = '<tool_call>{"name":"f","arguments":{"a":{"b":[1,2.5,true,null]},"t":"\\u00e9"}}</tool_call>'
    content, calls = parsed(block)
    assert calls == [("f", '{"a": {"b": [1, 2.5, true, null]}, "t": "é"}')]
    assert json.loads(calls[0][1]) == {"a": {"b": [1, 2.5, True, None]}, "t": "é"}


@pytest.mark.parametrize("tail", ["<tool_call>\n{\"name\": \"get_weather\", \"argu", "<tool_call>", "<tool_c"])
def test_unterminated_block_is_content_at_flush(tail):
    assert parsed("Hi " + tail) == ("Hi " + tail, [])


def test_tags_never_leak_before_the_block_closes():
    for pieces in splits("Checking.\n" + WEATHER):
        deltas, calls, _ = run(pieces)
        streamed = "".join(deltas)
        assert streamed == "Checking." and "<" not in streamed and len(calls) == 1


def test_call_inside_reasoning_counts_and_shares_the_numbering():
    parser = ToolCallParser("sess")
    reasoning, first, _ = run(list("I need the weather.\n" + WEATHER), "reasoning", parser)
    content, second, _ = run(list("\n\n" + TIME), "content", parser)
    assert "".join(reasoning) == "I need the weather." and "".join(content) == ""
    assert [(c.index, c.name) for c in first + second] == [(0, "get_weather"), (1, "get_time")]
    assert parser.calls == first + second


def test_ids_are_deterministic_and_unique():
    ids = [c.id for c in run([WEATHER + TIME])[1]]
    again = [c.id for c in run(list(WEATHER + TIME))[1]]
    other = [c.id for c in run([WEATHER + TIME], parser=ToolCallParser("other"))[1]]
    assert ids == again == [call_id("sess", 0), call_id("sess", 1)]
    assert len(set(ids + other)) == 4
    assert all(i.startswith("call_") and len(i) == 29 for i in ids)


def test_stream_deltas_add_up_to_the_message_tool_calls():
    calls = run(list("Checking both.\n" + WEATHER + "\n" + TIME + '\n<tool_call>{"name": "n"}</tool_call>'))[1]
    deltas = [d for call in calls for d in tool_call_deltas(call)]
    assert deltas[0] == {"index": 0, "id": call_id("sess", 0), "type": "function",
                         "function": {"name": "get_weather", "arguments": ""}}
    assert deltas[1] == {"index": 0, "function": {"arguments": '{"city": "Paris"}'}}
    assert deltas[5] == {"index": 2, "function": {"arguments": "{}"}}  # never lost for a tool without parameters
    joined: dict[int, dict] = {}
    for d in deltas:  # what an OpenAI client's accumulator does
        entry = joined.setdefault(d["index"], {"id": None, "name": "", "arguments": ""})
        entry["id"] = d.get("id", entry["id"])
        entry["name"] += d["function"].get("name", "")
        entry["arguments"] += d["function"]["arguments"]
    assert [{"id": e["id"], "type": "function", "function": {"name": e["name"], "arguments": e["arguments"]}}
            for e in joined.values()] == message_tool_calls(calls)


def test_parse_call_alone():
    assert parse_call(' {"name": "f", "arguments": {"a": 1}} ') == ("f", '{"a": 1}')
    assert parse_call("{}") is None


def test_tool_fields_shape_history_for_the_template():
    def call(i, name, arguments):
        return {"id": f"call_{i}", "type": "function", "function": {"name": name, "arguments": arguments}}

    assistant = {"role": "assistant", "content": None, "reasoning_content": "Think.",
                 "tool_calls": [call(1, "f", '{"a":1}'), call(2, "g", ""), call(3, "h", "{bad")]}
    assert tool_fields(assistant) == {
        "content": "", "reasoning_content": "Think.",
        "tool_calls": [call(1, "f", {"a": 1}), call(2, "g", {}), call(3, "h", "{bad")]}
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    tool = {"role": "tool", "tool_call_id": "call_1", "content": parts}
    assert tool_fields(tool) == {"content": "a\nb", "tool_call_id": "call_1"}
    assert tool_fields({"role": "user", "content": "hi"}) == {}
