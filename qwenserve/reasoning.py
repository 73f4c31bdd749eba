"""Splits Qwen3 `<think>` output into reasoning and content, incrementally."""

from __future__ import annotations

THINK_START = "<think>"
THINK_END = "</think>"


def prompt_opens_reasoning(prompt_text: str) -> bool:
    """Qwen3 thinking templates end the prompt with an open `<think>`: output starts as reasoning."""
    return prompt_text.rfind(THINK_START) > prompt_text.rfind(THINK_END)


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag`."""
    for size in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-size:]):
            return size
    return 0


class ReasoningSplitter:
    """Feed text deltas; get (reasoning, content) deltas. Holds back only a partial tag.

    Leading newlines of the content right after `</think>` are dropped, as the template's
    separator is not part of the answer.
    """

    def __init__(self, in_reasoning: bool):
        self.in_reasoning = in_reasoning
        self.seen_output = False
        self.content_started = not in_reasoning
        self._pending = ""
        self.reasoning_used = in_reasoning

    def feed(self, text: str) -> tuple[str, str]:
        self._pending += text
        reasoning, content = [], []
        while self._pending:
            if self.in_reasoning:
                self.seen_output = True
                at = self._pending.find(THINK_END)
                if at >= 0:
                    reasoning.append(self._pending[:at])
                    self._pending = self._pending[at + len(THINK_END):]
                    self.in_reasoning = False
                    self.content_started = False
                    continue
                keep = _partial_suffix(self._pending, THINK_END)
                reasoning.append(self._pending[:len(self._pending) - keep])
                self._pending = self._pending[len(self._pending) - keep:]
                break
            if not self.seen_output:
                # A model whose template did not open <think> may emit it itself as its first text.
                stripped = self._pending.lstrip()
                if stripped.startswith(THINK_START):
                    self._pending = stripped[len(THINK_START):]
                    self.in_reasoning = self.reasoning_used = True
                    continue
                if not stripped or THINK_START.startswith(stripped):
                    break
            self.seen_output = True
            content.append(self._take_content(self._pending))
            self._pending = ""
        return "".join(reasoning), "".join(content)

    def _take_content(self, text: str) -> str:
        if not self.content_started:
            text = text.lstrip("\n")
            self.content_started = bool(text)
        return text

    def flush(self) -> tuple[str, str]:
        rest, self._pending = self._pending, ""
        if self.in_reasoning:
            return rest, ""
        return "", self._take_content(rest)
