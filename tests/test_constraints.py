"""Structured outputs (`qwenserve.constraints`): the interface on a small byte-level tokenizer, and a
designed bigram model driven by a plain greedy loop (forward, mask, argmax).

The designed model's next token depends only on the current one; tokens without a designed
preference have logit 0, so under a mask the argmax is the lowest allowed id, which in this
byte-level vocabulary spells forced text one character at a time. Preferences below are chosen so
that every run ends and its output is exact.
"""

from __future__ import annotations

import json
import threading

import jsonschema
import pytest
import torch

from examples.ktp_ocr import KTP_FORMAT, KTP_SCHEMA
from qwenserve import constraints
from qwenserve.checkpoints import build_tokenizer, design_weights, token_id
from qwenserve.constraints import (REASONING_NONE, REASONING_OPEN, REASONING_OPTIONAL, ConstraintError,
                                   ConstraintFactory, reasoning_mode, response_format_spec, tool_call_spec)

S = {"type": "string"}

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": S}, "required": ["city"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"timezone": S}, "required": ["timezone"], "additionalProperties": False}}}
TOOLS = [WEATHER, TIME]

WORDS = ['{"', "nik", '": "', "12", '"}', "BUDI", "UTC", "Hello", "Let", " me", " think", "\n\n"]
EXTRA_TOKENS = ["<tool_call>", "</tool_call>"]  # added, not special, as in Qwen3


def _tokenizer():
    tok = build_tokenizer(WORDS, thinking=True)
    tok.add_tokens(EXTRA_TOKENS)
    return tok


TOK = _tokenizer()
VOCAB = ((len(TOK) + 63) // 64) * 64 + 64  # the model's vocabulary is larger than the tokenizer's
EOS = token_id(TOK, "<|im_end|>")
EOS_IDS = {EOS, token_id(TOK, "<|endoftext|>")}


def tid(text: str) -> int:
    return TOK.convert_tokens_to_ids(text) if text in EXTRA_TOKENS else token_id(TOK, text)


def text_of(ids: list[int]) -> str:
    return TOK.decode([i for i in ids if i not in EOS_IDS], skip_special_tokens=False)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One-token forwards of a tiny model: threads only add overhead (tens of ms on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def factory():
    return ConstraintFactory(TOK, VOCAB, EOS_IDS)


@pytest.fixture(scope="module")
def model():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=VOCAB, hidden_size=VOCAB, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=512,
                         tie_word_embeddings=False, eos_token_id=EOS)
    return Qwen3ForCausalLM(config).eval()


def design(model, chain: list[str], prefs: dict[str, list[tuple[str, float]]] | None = None) -> None:
    """The model's own reply is `chain` (from "\\n", margin 100); `prefs` adds weaker next-token logits."""
    ids = [tid("\n")] + [tid(t) for t in chain]
    design_weights(model, dict(zip(ids[:-1], ids[1:])))
    with torch.no_grad():
        for src, options in (prefs or {}).items():
            for dst, logit in options:
                model.lm_head.weight[tid(dst), tid(src)] = logit


@torch.inference_mode()
def generate(model, constraint=None, max_tokens: int = 400) -> list[int]:
    """Greedy: forward the current token, mask, argmax, tell the constraint."""
    last, out = tid("\n"), []
    for _ in range(max_tokens):
        logits = model(input_ids=torch.tensor([[last]]), use_cache=False).logits[0, -1]
        if constraint is not None:
            logits = constraint.apply(logits)
        last = int(torch.argmax(logits))
        if constraint is not None:
            constraint.accept(last)
        out.append(last)
        if last in EOS_IDS:
            break
    return out


# Designs used by several tests.
PREFERS_BAD_KTP = (['{"', "nik", '": "', "12", '"}', "<|im_end|>"],  # {"nik": "12"}: too short, fields missing
                   {'"': [("BUDI", 10)], "BUDI": [('"', 10)]})
PREFERS_TEXT = (["Hello", "!", "<|im_end|>"],  # "Hello!": not JSON
                {'"': [("Hello", 10)], "!": [('"}', 20), ('"', 10)]})
THINKS_THEN_TEXT = (["Let", " me", " think", "</think>", "\n\n", "Hello", "!", "<|im_end|>"], PREFERS_TEXT[1])
OPENS_THINK = (["<think>"] + THINKS_THEN_TEXT[0], PREFERS_TEXT[1])
# The schema's order; "12" starts nik and tgl_lahir because the model follows '": "' with "12" (llguidance
# spells the forced text `": "` with that token), digits then fill the patterns with the lowest id, "0".
EXPECTED_KTP = {"nik": "1200000000000000", "nama": "BUDI", "tempat_lahir": "BUDI", "tgl_lahir": "12-00-0000",
                "jenis_kelamin": "LAKI-LAKI",
                "alamat": {"jalan": "BUDI", "rt_rw": "BUDI", "kel_desa": "BUDI", "kecamatan": "BUDI"},
                "agama": "BUDI", "status_perkawinan": "BUDI", "pekerjaan": "BUDI", "kewarganegaraan": "BUDI",
                "berlaku_hingga": "BUDI"}


# ---- the designed model under constraints -----------------------------------------------------
def test_schema_turns_a_violating_reply_into_a_valid_one(model, factory):
    design(model, *PREFERS_BAD_KTP)
    free = text_of(generate(model))
    assert free == '{"nik": "12"}'
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(json.loads(free), KTP_SCHEMA)

    ids = generate(model, factory.compile(response_format_spec(KTP_FORMAT)).matcher())
    assert ids[-1] in EOS_IDS
    assert text_of(ids) == json.dumps(EXPECTED_KTP)  # ", " and ": " and no other whitespace
    jsonschema.validate(json.loads(text_of(ids)), KTP_SCHEMA)


def test_json_object_gives_an_object(model, factory):
    design(model, *PREFERS_TEXT)
    assert text_of(generate(model)) == "Hello!"
    ids = generate(model, factory.compile(response_format_spec({"type": "json_object"})).matcher())
    assert ids[-1] in EOS_IDS
    assert json.loads(text_of(ids)) == {"Hello!": "Hello!"}


def test_named_tool_call_is_forced(model, factory):
    design(model, ["Hello", "!", "<|im_end|>"], {'"': [("UTC", 10)], "UTC": [('"', 10)]})
    spec = tool_call_spec(TOOLS, {"type": "function", "function": {"name": "get_time"}})
    ids = generate(model, factory.compile(spec).matcher())
    assert ids[0] == tid("<tool_call>") and ids[-2] == tid("</tool_call>")  # the tags as single tokens
    assert text_of(ids) == '<tool_call>\n{"name": "get_time", "arguments": {"timezone": "UTC"}}\n</tool_call>'
    call = json.loads(text_of(ids).split("\n")[1])
    jsonschema.validate(call["arguments"], TIME["function"]["parameters"])


def test_required_tool_calls_may_repeat_then_end(model, factory):
    prefs = {'"': [("UTC", 10)], "UTC": [('"', 10)], "</tool_call>": [("<|im_end|>", 10)]}
    design(model, ["Hello", "!", "<|im_end|>"], prefs)
    grammar = factory.compile(tool_call_spec(TOOLS, "required", parallel_tool_calls=True))
    ids = generate(model, grammar.matcher())
    assert text_of(ids) == '<tool_call>\n{"name": "get_time", "arguments": {"timezone": "UTC"}}\n</tool_call>'
    # A second call is allowed after the first ("\n" then <tool_call>), and so is the end.
    row = grammar.matcher()
    row.replay(ids[:-1])
    assert row.allows(tid("\n")) and row.allows(EOS) and not row.allows(tid("<tool_call>"))
    row.replay([tid("\n")])
    assert torch.nonzero(row.allowed_mask()).flatten().tolist() == [tid("<tool_call>")]
    single = factory.compile(tool_call_spec(TOOLS, "required", parallel_tool_calls=False)).matcher()
    single.replay(ids[:-1])
    assert single.finished and not single.allows(tid("\n"))


def test_reasoning_is_never_constrained(model, factory):
    design(model, *THINKS_THEN_TEXT)
    grammar = factory.compile(response_format_spec({"type": "json_object"}))
    row = grammar.matcher(REASONING_OPEN)
    mask = row.allowed_mask()
    assert row.in_reasoning and int((~mask).sum()) == len(EOS_IDS) and not any(mask[i] for i in EOS_IDS)
    ids = generate(model, row)
    assert text_of(ids) == 'Let me think</think>\n\n{"Hello!": "Hello!"}'


def test_model_may_open_reasoning_itself_when_the_template_did_not(model, factory):
    design(model, *OPENS_THINK)
    grammar = factory.compile(response_format_spec({"type": "json_object"}))
    ids = generate(model, grammar.matcher(REASONING_OPTIONAL))
    assert text_of(ids) == '<think>Let me think</think>\n\n{"Hello!": "Hello!"}'
    # A model that does not think is constrained from its first token, <think> included.
    ids = generate(model, grammar.matcher(REASONING_NONE))
    assert text_of(ids) == '{"Hello!": "Hello!"}'


def test_separator_after_reasoning_is_bounded(factory):
    row = factory.compile(response_format_spec({"type": "json_object"})).matcher(REASONING_OPEN)
    row.replay([tid("Let"), tid("</think>")])
    assert row.allows(tid("\n\n")) and row.allows(tid("{"))
    row.accept(tid("\n\n"))
    assert not row.allows(tid("\n")) and not row.allows(tid("\n\n"))
    with pytest.raises(ConstraintError):
        row.accept(tid("\n"))


def test_whitespace_cannot_run_away(model, factory, monkeypatch):
    schema = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "array", "items": {
        "type": "integer"}}}, "required": ["a", "b"], "additionalProperties": False}
    spec = response_format_spec({"type": "json_schema", "json_schema": {"name": "w", "schema": schema}})
    loves_space = {"{": [(" ", 50)], ",": [(" ", 50)], ":": [(" ", 50)], '"': [(" ", 50)], '": ': [(" ", 50), ("7", 10)],
                   " ": [(" ", 50), ("7", 10)], "[": [(" ", 50), ("7", 10)], "7": [(" ", 50), ("]", 10)]}
    design(model, ["{"], loves_space)
    assert text_of(generate(model, max_tokens=20)) == "{" + " " * 19
    ids = generate(model, factory.compile(spec).matcher())
    assert text_of(ids) == '{"a": 7, "b": [7]}' and ids[-1] in EOS_IDS
    # Control: the library's default (flexible whitespace) lets this model write spaces forever.
    monkeypatch.setattr(constraints, "JSON_OPTIONS", {})
    flexible = ConstraintFactory(TOK, VOCAB, EOS_IDS).compile(spec).matcher()
    assert text_of(generate(model, flexible, max_tokens=50)) == "{" + " " * 49


def test_replay_rebuilds_the_state(model, factory):
    # Cuts inside the answer; for the thinking row also inside reasoning, right after </think> and
    # after the separator.
    for (chain, prefs), spec, reasoning, cuts in [
            (PREFERS_BAD_KTP, response_format_spec(KTP_FORMAT), REASONING_NONE, (1, 100, -1)),
            (THINKS_THEN_TEXT, response_format_spec({"type": "json_object"}), REASONING_OPEN, (1, 4, 5, 8, -1))]:
        design(model, chain, prefs)
        grammar = factory.compile(spec)
        full = generate(model, grammar.matcher(reasoning))
        for cut in cuts:
            row = grammar.matcher(reasoning)
            row.replay(full[:cut])
            assert _continue(model, row, full[:cut][-1]) == full[cut:]


@torch.inference_mode()
def _continue(model, row, last: int) -> list[int]:
    out = []
    while last not in EOS_IDS:
        last = int(torch.argmax(row.apply(model(input_ids=torch.tensor([[last]]), use_cache=False).logits[0, -1])))
        row.accept(last)
        out.append(last)
    return out


@torch.inference_mode()
def test_rows_with_different_constraints_share_a_batch(model, factory):
    design(model, *PREFERS_TEXT)
    with torch.no_grad():
        model.lm_head.weight[tid("UTC"), tid('"')] = 5.0  # weaker than "Hello": only the tool call uses it
        model.lm_head.weight[tid('"'), tid("UTC")] = 10.0
    specs = [response_format_spec({"type": "json_object"}), None,
             tool_call_spec(TOOLS, {"type": "function", "function": {"name": "get_weather"}})]
    alone = [generate(model, factory.compile(s).matcher() if s else None) for s in specs]
    rows = [factory.compile(s).matcher() if s else None for s in specs]
    last, outs = [tid("\n")] * 3, [[], [], []]
    while any(not o or o[-1] not in EOS_IDS for o in outs):
        logits = model(input_ids=torch.tensor([[t] for t in last]), use_cache=False).logits[:, -1]
        for i, row in enumerate(rows):
            if outs[i] and outs[i][-1] in EOS_IDS:
                continue
            last[i] = int(torch.argmax(row.apply(logits[i]) if row else logits[i]))
            if row:
                row.accept(last[i])
            outs[i].append(last[i])
    assert outs == alone
    assert text_of(outs[2]) == '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Hello!"}}\n</tool_call>'


# ---- the interface -------------------------------------------------------------------------------
def test_eos_only_when_complete_and_then_only_eos(factory):
    row = factory.compile(response_format_spec(KTP_FORMAT)).matcher()
    ids = TOK.encode(json.dumps(EXPECTED_KTP), add_special_tokens=False)
    for token in ids:
        mask = row.allowed_mask()
        assert mask[token] and not mask[list(EOS_IDS)].any() and not row.complete
        row.accept(token)
    assert row.complete and row.finished
    assert set(torch.nonzero(row.allowed_mask()).flatten().tolist()) == EOS_IDS
    row.accept(EOS)


def test_mask_is_sized_by_the_model_vocabulary(factory):
    row = factory.compile(response_format_spec({"type": "json_object"})).matcher()
    mask = row.allowed_mask()
    assert mask.shape == (VOCAB,) and mask.dtype == torch.bool
    assert not mask[len(TOK):].any()
    assert torch.nonzero(mask).flatten().tolist() == [tid("{"), tid('{"')]
    logits = row.apply(torch.zeros(VOCAB))
    assert torch.isinf(logits[len(TOK):]).all() and logits[tid("{")] == 0


def test_allows_admits_the_mask_and_only_valid_tokens(factory):
    """`allows` admits every masked-in token; beyond the mask only other spellings of forced text
    (llguidance masks forced bytes to their canonical tokens, e.g. '{"' but not '{' before "nik")."""
    for spec, text in [(response_format_spec(KTP_FORMAT), json.dumps(EXPECTED_KTP)[:40]),
                       (tool_call_spec(TOOLS, "required"), '<tool_call>\n{"name": "get_time", "arg')]:
        grammar = factory.compile(spec)
        row, prefix = grammar.matcher(REASONING_OPTIONAL), []
        for token in TOK.encode(text, add_special_tokens=False):
            mask = row.allowed_mask()
            allowed = [i for i in range(VOCAB) if row.allows(i)]
            assert set(torch.nonzero(mask).flatten().tolist()) <= set(allowed)
            for extra in set(allowed) - set(torch.nonzero(mask).flatten().tolist()):
                probe = grammar.matcher(REASONING_OPTIONAL)
                probe.replay(prefix + [extra])  # raises if the grammar refuses it
            row.accept(token)
            prefix.append(token)
    assert not factory.compile(response_format_spec({"type": "json_object"})).matcher().allows(len(TOK) + 3)


def test_refused_token_raises(factory):
    row = factory.compile(response_format_spec({"type": "json_object"})).matcher()
    with pytest.raises(ConstraintError):
        row.accept(tid("Hello"))


def test_compile_is_cached_by_spec(factory):
    one = factory.compile(response_format_spec(KTP_FORMAT))
    same = json.loads(json.dumps(KTP_FORMAT))
    same["json_schema"]["name"] = "another name"  # only the schema matters
    assert factory.compile(response_format_spec(same)) is one
    # Property order is the output's key order, so a reordered schema is another grammar.
    reordered = {**KTP_SCHEMA, "properties": dict(reversed(list(KTP_SCHEMA["properties"].items())))}
    row = factory.compile(response_format_spec({"type": "json_schema", "json_schema": {"schema": reordered}})).matcher()
    row.replay(TOK.encode('{"berlaku_hingga": "', add_special_tokens=False))
    assert factory.compile(response_format_spec({"type": "json_object"})) is not one


def test_compile_from_a_worker_thread(model, factory):
    grammars = []
    worker = threading.Thread(target=lambda: grammars.append(factory.compile(
        response_format_spec({"type": "json_schema", "json_schema": {"schema": {"type": "array"}}}))))
    worker.start()
    worker.join()
    row = grammars[0].matcher()
    assert torch.nonzero(row.allowed_mask()).flatten().tolist() == [tid("[")]


@pytest.mark.parametrize("response_format, param", [
    ({"type": "json_schema", "json_schema": {"schema": {"type": "strin"}}}, "response_format.json_schema.schema"),
    ({"type": "json_schema", "json_schema": {"schema": {"$ref": "#/nowhere"}}}, "response_format.json_schema.schema"),
    ({"type": "json_schema", "json_schema": {"schema": {"not": {"type": "string"}}}},
     "response_format.json_schema.schema"),
    ({"type": "json_schema", "json_schema": {"schema": [1]}}, "response_format.json_schema.schema"),
    ({"type": "yaml"}, "response_format.type"),
])
def test_unusable_response_formats_are_clear_errors(factory, response_format, param):
    with pytest.raises(ConstraintError) as error:
        factory.compile(response_format_spec(response_format))
    assert error.value.param == param and str(error.value)


def test_tool_spec_errors_and_non_forced_choices(factory):
    assert tool_call_spec(TOOLS, "auto") is None and tool_call_spec(TOOLS, None) is None
    assert response_format_spec({"type": "text"}) is None and response_format_spec(None) is None
    with pytest.raises(ConstraintError) as error:
        tool_call_spec(TOOLS, {"type": "function", "function": {"name": "nope"}})
    assert error.value.param == "tool_choice"
    bad = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "x": {"type": "string", "format": "no-such-format"}}}}}
    with pytest.raises(ConstraintError) as error:
        factory.compile(tool_call_spec([WEATHER, bad], "required"))
    assert error.value.param == "tools[1].function.parameters"


def test_tool_without_parameters_gets_empty_arguments(factory):
    spec = tool_call_spec([{"type": "function", "function": {"name": "ping"}}], "required")
    row = factory.compile(spec).matcher()
    row.replay(TOK.encode('<tool_call>\n{"name": "ping", "arguments": {}}\n</tool_call>', add_special_tokens=False))
    assert row.complete


def test_reasoning_mode_from_prompts():
    opened = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n"
    closed = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    plain = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    history = "<|im_start|>assistant\n<think>\nx</think>\n\nok<|im_end|>\n" + plain
    assert reasoning_mode(opened, True) == REASONING_OPEN
    assert reasoning_mode(closed, True) == REASONING_NONE
    assert reasoning_mode(plain, True) == REASONING_OPTIONAL
    assert reasoning_mode(plain, False) == REASONING_NONE
    assert reasoning_mode(history, True) == REASONING_OPTIONAL


def test_reasoning_cannot_end_the_turn_before_the_answer(model, factory):
    """A model that would end its turn inside the reasoning must still reach the constrained answer."""
    prefs = {**PREFERS_TEXT[1], "Let": [("</think>", 10)]}
    design(model, ["<think>", "Let", "<|im_end|>"], prefs)
    free = generate(model)
    assert text_of(free) == "<think>Let" and free[-1] in EOS_IDS  # free: the turn ends inside the reasoning
    grammar = factory.compile(response_format_spec({"type": "json_object"}))
    ids = generate(model, grammar.matcher(REASONING_OPTIONAL), max_tokens=40)
    text = text_of(ids)
    assert text.startswith("<think>Let</think>") and ids[-1] in EOS_IDS
    assert isinstance(json.loads(text.split("</think>")[1]), dict)
