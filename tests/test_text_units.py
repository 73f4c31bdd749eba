"""Unit tests: the reasoning splitter and stop-string matching, fed token by token."""

from __future__ import annotations

import pytest

from qwenserve.checkpoints import build_tokenizer
from qwenserve.decoding import StopMatcher, TextPipeline
from qwenserve.reasoning import ReasoningSplitter, prompt_opens_reasoning


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def split_all(pieces, in_reasoning=True):
    splitter = ReasoningSplitter(in_reasoning)
    reasoning, content = [], []
    for piece in pieces:
        r, c = splitter.feed(piece)
        reasoning.append(r)
        content.append(c)
    r, c = splitter.flush()
    return "".join(reasoning + [r]), "".join(content + [c]), splitter


def test_prompt_opens_reasoning():
    assert prompt_opens_reasoning("<|im_start|>assistant\n<think>\n")
    assert not prompt_opens_reasoning("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert not prompt_opens_reasoning("<|im_start|>assistant\n")


@pytest.mark.parametrize("pieces", [
    ["I think", "</think>", "\n\nAnswer"],
    ["I think</th", "ink>\n", "\nAnswer"],
    ["I", " think<", "/", "think", ">", "\n\n", "Answer"],
    ["I think</think>\n\nAnswer"],
])
def test_split_across_pieces(pieces):
    reasoning, content, _ = split_all(pieces)
    assert (reasoning, content) == ("I think", "Answer")


def test_cut_before_end_tag_is_all_reasoning():
    reasoning, content, splitter = split_all(["still ", "thinking </thi"])
    assert reasoning == "still thinking </thi" and content == ""
    assert splitter.reasoning_used


def test_output_that_opens_its_own_think():
    reasoning, content, _ = split_all(["<th", "ink>hmm</think>", "ok"], in_reasoning=False)
    assert (reasoning, content) == ("hmm", "ok")


def test_plain_content_without_reasoning():
    reasoning, content, splitter = split_all(["Hello", " <b>world</b>"], in_reasoning=False)
    assert (reasoning, content) == ("", "Hello <b>world</b>")
    assert not splitter.reasoning_used


def test_pending_partial_think_is_released_as_content():
    reasoning, content, _ = split_all(["<thi"], in_reasoning=False)
    assert (reasoning, content) == ("", "<thi")


def test_reasoning_splitter_on_real_tokens(tokenizer):
    ids = tokenizer.encode("Let me think briefly</think>\n\nHello! I am", add_special_tokens=False)
    pipeline = TextPipeline(tokenizer, [])
    pieces = [pipeline.add(i) for i in ids]
    assert "</think>" in pieces  # one token
    assert split_all(pieces)[:2] == ("Let me think briefly", "Hello! I am")


def run_pipeline(tokenizer, text, stops):
    pipeline = TextPipeline(tokenizer, stops)
    out = []
    for token in tokenizer.encode(text, add_special_tokens=False):
        out.append(pipeline.add(token))
        if pipeline.stopped:
            break
    else:
        out.append(pipeline.finish())
    return out, pipeline.stopped


def test_stop_across_token_boundaries(tokenizer):
    out, stopped = run_pipeline(tokenizer, "Hello! I am a demo model.", ["lo! I"])
    assert stopped and "".join(out) == "Hel"
    assert all("lo" not in piece for piece in out)


def test_stop_at_start_and_first_of_several(tokenizer):
    assert run_pipeline(tokenizer, "Hello there", ["Hello"]) == ([""], True)
    out, _ = run_pipeline(tokenizer, "abc def ghi", ["ghi", " d"])
    assert "".join(out) == "abc"


def test_near_miss_is_released(tokenizer):
    out, stopped = run_pipeline(tokenizer, "a demo model.", ["model!"])
    assert not stopped and "".join(out) == "a demo model."


def test_multibyte_characters_are_never_split(tokenizer):
    text = "naïve 日本 🎉 done"
    out, _ = run_pipeline(tokenizer, text, [])
    assert "".join(out) == text
    assert all("\ufffd" not in piece for piece in out)


def test_stop_inside_multibyte_text(tokenizer):
    out, stopped = run_pipeline(tokenizer, "price: 5€ and more", ["€ and"])
    assert stopped and "".join(out) == "price: 5"


def test_stop_matcher_holds_only_possible_prefixes():
    matcher = StopMatcher(["END"])
    assert matcher.feed("abcE") == "abc"
    assert matcher.feed("x") == "Ex"
    assert matcher.feed("EN") == ""
    assert matcher.feed("D tail") == "" and matcher.stopped
