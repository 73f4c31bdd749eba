"""Token ids to text, incrementally: UTF-8-safe detokenizing and stop-string matching."""

from __future__ import annotations


class IncrementalDetokenizer:
    """Emits text only once it is complete (no half UTF-8 characters)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        # Decode a small window: some tokenizers change the text of earlier tokens by context.
        before = self._decode(self.ids[self.prefix_offset:self.read_offset])
        after = self._decode(self.ids[self.prefix_offset:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            return after[len(before):]
        return ""

    def flush(self) -> str:
        """Text still undecided at the end (an incomplete character is emitted as is)."""
        before = self._decode(self.ids[self.prefix_offset:self.read_offset])
        after = self._decode(self.ids[self.prefix_offset:])
        self.prefix_offset = self.read_offset = len(self.ids)
        return after[len(before):] if len(after) > len(before) else ""


class StopMatcher:
    """Finds stop strings across deltas; holds back text that may still become a stop."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self._held = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        if not self.stops:
            return text
        buffer = self._held + text
        hits = [(buffer.find(s), s) for s in self.stops if s in buffer]
        if hits:
            at = min(hits)[0]
            self._held = ""
            self.stopped = True
            return buffer[:at]
        keep = self._longest_stop_prefix_suffix(buffer)
        self._held = buffer[len(buffer) - keep:]
        return buffer[:len(buffer) - keep]

    def _longest_stop_prefix_suffix(self, buffer: str) -> int:
        longest = 0
        for stop in self.stops:
            for size in range(min(len(stop) - 1, len(buffer)), longest, -1):
                if stop.startswith(buffer[-size:]):
                    longest = size
                    break
        return longest

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held


class TextPipeline:
    """Token by token: detokenize, then match stops. Deterministic, so replaying the same ids
    rebuilds the same state (used to continue a generation after a restart)."""

    def __init__(self, tokenizer, stops: list[str]):
        self.detok = IncrementalDetokenizer(tokenizer)
        self.stops = StopMatcher(stops)

    @property
    def stopped(self) -> bool:
        return self.stops.stopped

    def add(self, token_id: int) -> str:
        return self.stops.feed(self.detok.add(token_id))

    def finish(self) -> str:
        """End of generation without a stop string: release what was held back."""
        if self.stops.stopped:
            return ""
        tail = self.stops.feed(self.detok.flush())
        return tail if self.stops.stopped else tail + self.stops.flush()
