"""Structured outputs: JSON schemas, JSON objects and forced tool calls as a per-row token mask.

`ConstraintFactory` is built once per model (it indexes the vocabulary); `compile(spec)` turns a
spec (from `response_format_spec` or `tool_call_spec`) into a cached `Grammar`; each row gets its
own `RowConstraint` from `grammar.matcher(reasoning)`, which the decode loop asks for a mask before
sampling and tells every token it accepts. Only this module knows the library (llguidance).

Reasoning is never constrained, but it cannot end the turn: a row whose prompt opened `<think>`
(or whose model opens it as its first token) may write anything but the end token until
`</think>`; then up to two newlines (the template's separator) may precede the answer, which the
grammar constrains from its first token.
"""

from __future__ import annotations

import copy
import json
import threading
from collections import OrderedDict
from functools import cached_property

import llguidance
import numpy as np
import torch

# Fixed separators and no other whitespace between JSON tokens: Qwen3 otherwise can emit
# whitespace forever under a JSON constraint. ", " and ": " are what the chat template's `tojson` writes.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
ERROR_CHARS = 500

REASONING_NONE = "none"  # constrained from the first token
REASONING_OPEN = "open"  # the prompt opened <think>: unconstrained until </think>
REASONING_OPTIONAL = "optional"  # the model may open <think> as its first token

THINK_START, THINK_END = "<think>", "</think>"
TOOL_CALL_START, TOOL_CALL_END = "<tool_call>", "</tool_call>"
SEPARATOR_NEWLINES = 2


class ConstraintError(ValueError):
    """A spec that cannot be enforced (the API answers 400 with `param`), or a token it refuses."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


# ---- specs: canonical dicts, the cache key ------------------------------------------------
def response_format_spec(response_format: dict | None) -> dict | None:
    """`response_format` as OpenAI sends it -> a JSON spec, or None for plain text."""
    kind = (response_format or {}).get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"kind": "json", "schema": {"type": "object"}}
    if kind == "json_schema":
        schema = (response_format.get("json_schema") or {}).get("schema", {"type": "object"})
        if not isinstance(schema, dict):
            raise ConstraintError("json_schema.schema must be a JSON object", "response_format.json_schema.schema")
        return {"kind": "json", "schema": schema}
    raise ConstraintError(f"unsupported response_format type {kind!r}", "response_format.type")


def tool_call_spec(tools: list[dict] | None, tool_choice, parallel_tool_calls: bool = True) -> dict | None:
    """Forced tool calls (`tool_choice` "required" or a named function) -> a spec; None otherwise."""
    if tool_choice is None or tool_choice in ("auto", "none"):
        return None
    functions = [tool.get("function") or {} for tool in tools or [] if tool.get("type", "function") == "function"]
    if not functions:
        raise ConstraintError("tool_choice requires tools", "tool_choice")
    if isinstance(tool_choice, dict):
        name = (tool_choice.get("function") or {}).get("name") or tool_choice.get("name")
        functions = [f for f in functions if f.get("name") == name]
        if not functions:
            raise ConstraintError(f"tool_choice names {name!r}, which is not among the tools", "tool_choice")
        multiple = False
    elif tool_choice == "required":
        multiple = parallel_tool_calls
    else:
        raise ConstraintError(f"unsupported tool_choice {tool_choice!r}", "tool_choice")
    calls = [{"name": f["name"], "parameters": f.get("parameters") or {"type": "object", "properties": {}}}
             for f in functions]
    return {"kind": "tool_calls", "tools": calls, "multiple": multiple}


def reasoning_mode(prompt_text: str, model_may_think: bool) -> str:
    """How a row starts, from the prompt's last assistant turn (Qwen3 templates)."""
    tail = prompt_text[max(prompt_text.rfind("<|im_start|>assistant"), 0):]
    if tail.rfind(THINK_START) > tail.rfind(THINK_END):
        return REASONING_OPEN
    if THINK_END in tail or not model_may_think:
        return REASONING_NONE  # enable_thinking=false closed the reasoning in the prompt
    return REASONING_OPTIONAL


# ---- compiling -------------------------------------------------------------------------------
class ConstraintFactory:
    """Vocabulary index (built once, ~1-5 s for 151k tokens) and a cache of compiled grammars.

    `compile` is thread-safe (worker threads); matchers are used by one thread each.
    """

    def __init__(self, tokenizer, vocab_size: int, eos_ids, cache_size: int = 256):
        if len(tokenizer) > vocab_size:
            raise ValueError(f"tokenizer has {len(tokenizer)} tokens, more than the model's {vocab_size}")
        self.vocab_size = vocab_size
        self.eos_ids = sorted(eos_ids)
        backend = copy.copy(tokenizer.backend_tokenizer)
        backend.no_padding()
        backend.no_truncation()
        self._tokenizer = llguidance.LLTokenizer(backend.to_str(), n_vocab=vocab_size, eos_token=self.eos_ids)
        self._ids = {text: _single_token(tokenizer, text) for text in
                     (THINK_START, THINK_END, TOOL_CALL_START, TOOL_CALL_END)}
        newlines = {_single_token(tokenizer, "\n" * n): n for n in range(1, SEPARATOR_NEWLINES + 1)}
        self._newlines = {token: n for token, n in newlines.items() if token is not None}
        self._cache: OrderedDict[str, Grammar] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    @cached_property
    def reasoning_mask(self) -> torch.Tensor:
        """While a row reasons: anything but the end of turn."""
        mask = torch.ones(self.vocab_size, dtype=torch.bool)
        mask[[i for i in self.eos_ids if i < self.vocab_size]] = False
        return mask

    @property
    def may_think(self) -> bool:
        """The vocabulary has `<think>`: a model whose template did not open it may open it itself."""
        return self._ids[THINK_START] is not None

    def compile(self, spec: dict) -> Grammar:
        """A compiled grammar for a spec (cached by its compact JSON); ConstraintError if unusable.
        Keys keep their order: a schema's property order is the order the output follows."""
        key = json.dumps(spec, separators=(",", ":"), ensure_ascii=False)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        grammar = Grammar(self, self._build(spec))
        with self._lock:
            self._cache[key] = grammar
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return grammar

    def _build(self, spec: dict) -> llguidance.LLMatcher:
        if spec.get("kind") == "json":
            param = "response_format.json_schema.schema"
            return self._matcher(self._json_grammar(spec["schema"], param), param)
        if spec.get("kind") == "tool_calls":
            for i, tool in enumerate(spec["tools"]):  # each alone first, so that an error names its tool
                param = f"tools[{i}].function.parameters"
                self._matcher(self._json_grammar(tool["parameters"], param), param)
            return self._matcher(llguidance.LLMatcher.grammar_from_lark(self._tool_lark(spec)), "tools")
        raise ConstraintError(f"unknown constraint kind {spec.get('kind')!r}")

    @staticmethod
    def _json_grammar(schema, param: str) -> str:
        if not isinstance(schema, dict):
            raise ConstraintError("a JSON schema must be a JSON object", param)
        try:
            return llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=JSON_OPTIONS)
        except ValueError as exc:
            raise ConstraintError(f"invalid JSON schema: {exc}"[:ERROR_CHARS], param) from None

    def _tool_lark(self, spec: dict) -> str:
        """`<tool_call>\\n{"name": "NAME", "arguments": ARGS}\\n</tool_call>`, calls joined by "\\n"
        as the Qwen3 template writes them; the tags as their single tokens when the vocabulary has them."""
        start, end, tail = self._tag(TOOL_CALL_START), self._tag(TOOL_CALL_END), _lark_string("}\n")
        lines = ['start: call ("\\n" call)*' if spec["multiple"] else "start: call",
                 "call: " + " | ".join(f"call_{i}" for i in range(len(spec["tools"])))]
        for i, tool in enumerate(spec["tools"]):
            head = '\n{"name": ' + json.dumps(tool["name"], ensure_ascii=False) + ', "arguments": '
            lines.append(f'call_{i}: {start} {_lark_string(head)} args_{i} {tail} {end}')
            schema = {**tool["parameters"], "x-guidance": JSON_OPTIONS}
            lines.append(f"args_{i}: %json {json.dumps(schema, ensure_ascii=False)}")
        return "\n".join(lines) + "\n"

    def _tag(self, text: str) -> str:
        token = self._ids[text]
        return f"<[{token}]>" if token is not None else _lark_string(text)

    def _matcher(self, grammar_text: str, param: str) -> llguidance.LLMatcher:
        matcher = llguidance.LLMatcher(self._tokenizer, grammar_text, log_level=0)
        if matcher.is_error():
            raise ConstraintError(f"unsupported JSON schema: {matcher.get_error()}"[:ERROR_CHARS], param)
        return matcher


def _single_token(tokenizer, text: str) -> int | None:
    ids = tokenizer.encode(text, add_special_tokens=False)
    return ids[0] if len(ids) == 1 else None


def _lark_string(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


class Grammar:
    """A compiled spec; a pristine matcher that rows copy (cheap: the lexer and tables are shared)."""

    def __init__(self, factory: ConstraintFactory, prototype: llguidance.LLMatcher):
        self.factory = factory
        self._prototype = prototype

    def matcher(self, reasoning: str = REASONING_NONE) -> RowConstraint:
        return RowConstraint(self.factory, self._prototype.deep_copy(), reasoning)


# ---- one row -----------------------------------------------------------------------------------
# Phases of a row: reasoning (no mask) -> separator (newlines or the answer) -> answer (grammar).
_FIRST, _REASONING, _SEPARATOR, _ANSWER = "first", "reasoning", "separator", "answer"


class RowConstraint:
    """Per-row state: ask `apply(logits)` (or `allowed_mask()`) before sampling, `accept(token)` after."""

    def __init__(self, factory: ConstraintFactory, matcher: llguidance.LLMatcher, reasoning: str):
        self._factory = factory
        self._matcher = matcher
        self._phase = {REASONING_OPEN: _REASONING, REASONING_OPTIONAL: _FIRST,
                       REASONING_NONE: _ANSWER}[reasoning]
        self._newlines = 0
        self._mask: torch.Tensor | None = None

    @property
    def in_reasoning(self) -> bool:
        return self._phase == _REASONING

    @property
    def complete(self) -> bool:
        """The answer satisfies the grammar: EOS is allowed."""
        return self._phase == _ANSWER and self._matcher.is_accepting()

    @property
    def finished(self) -> bool:
        """Nothing but EOS can follow."""
        return self._phase == _ANSWER and self._matcher.is_stopped()

    def allowed_mask(self) -> torch.Tensor:
        """Bool mask over the model's vocabulary (CPU). While reasoning every token but the end of
        turn is allowed: the answer must still come. Cached until the next `accept`, so it may be
        computed ahead, e.g. during the forward pass."""
        if self._phase == _REASONING:
            return self._factory.reasoning_mask
        if self._mask is None:
            self._mask = self._compute_mask()
        return self._mask

    def allows(self, token_id: int) -> bool:
        """Whether the grammar accepts `token_id` next, without computing a mask (a few µs): a greedy
        row can keep its argmax when allowed and call `apply` only when not. It may admit a token the
        mask leaves out: another spelling of text the grammar forces (the mask keeps the canonical one)."""
        factory = self._factory
        if self._phase == _REASONING:
            return token_id not in factory.eos_ids
        if token_id in factory.eos_ids:
            return self._matcher.is_accepting()
        if self._phase == _FIRST and token_id == factory._ids[THINK_START]:
            return True
        if self._phase == _SEPARATOR and self._newlines + factory._newlines.get(token_id, 99) <= SEPARATOR_NEWLINES:
            return True
        return self._matcher.validate_tokens([token_id]) == 1

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """One row of logits with disallowed tokens at -inf."""
        mask = self.allowed_mask().to(logits.device, non_blocking=True)
        if logits.shape[-1] != mask.shape[0]:
            mask = _resize(mask, logits.shape[-1])
        return torch.where(mask, logits, float("-inf"))

    def accept(self, token_id: int) -> None:
        """Advance with the sampled token; ConstraintError if the grammar refuses it."""
        self._mask = None
        ids = self._factory._ids
        if self._phase == _REASONING:
            if token_id == ids[THINK_END]:
                self._phase = _SEPARATOR
            return
        if self._phase == _FIRST and token_id == ids[THINK_START]:
            self._phase = _REASONING
            return
        if self._phase == _SEPARATOR and token_id in self._factory._newlines:
            self._newlines += self._factory._newlines[token_id]
            if self._newlines <= SEPARATOR_NEWLINES:
                return
        self._phase = _ANSWER
        if not self._matcher.consume_token(token_id):
            raise ConstraintError(f"token {token_id} violates the constraint: {self._matcher.get_error()}"
                                  [:ERROR_CHARS])

    def replay(self, token_ids) -> None:
        """Rebuild the state from stored ids (a restarted generation)."""
        for token_id in token_ids:
            self.accept(token_id)

    def _compute_mask(self) -> torch.Tensor:
        factory = self._factory
        if self._matcher.is_error():
            raise ConstraintError(f"constraint failed: {self._matcher.get_error()}"[:ERROR_CHARS])
        packed = np.frombuffer(self._matcher.compute_bitmask(), dtype=np.uint8)
        bits = np.unpackbits(packed, bitorder="little")[:factory.vocab_size]  # bit k of word w = token 32w+k
        mask = torch.from_numpy(bits).view(torch.bool)
        if self._phase == _FIRST and factory._ids[THINK_START] is not None:
            mask[factory._ids[THINK_START]] = True
        if self._phase == _SEPARATOR:
            for token_id, count in factory._newlines.items():
                if self._newlines + count <= SEPARATOR_NEWLINES:
                    mask[token_id] = True
        return mask


def _resize(mask: torch.Tensor, size: int) -> torch.Tensor:
    """Logits wider than the vocabulary (never expected): the extra ids are disallowed."""
    if size < mask.shape[0]:
        return mask[:size]
    return torch.cat([mask, torch.zeros(size - mask.shape[0], dtype=torch.bool, device=mask.device)])
