"""OpenAI logprobs entries from the engine's numbers: each token's text and its real UTF-8 bytes.

Byte-level BPE tokenizers (Qwen3's) spell a token's bytes with printable stand-in characters; a
token may hold part of a character, so its bytes come from that table, not from decoding it."""

from __future__ import annotations

from functools import lru_cache


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-to-printable-character map, used by byte-level BPE."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))


class TokenBytes:
    """Token id -> its bytes and text, cached; shared by every request of one model."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.byte_of = {ch: b for b, ch in bytes_to_unicode().items()}
        self.added = {i: t.content for i, t in tokenizer.added_tokens_decoder.items()}
        self.special = set(tokenizer.all_special_ids)
        self._cache: dict[int, bytes] = {}

    def bytes(self, token_id: int) -> bytes:
        cached = self._cache.get(token_id)
        if cached is None:
            cached = self._cache[token_id] = self._bytes(token_id)
        return cached

    def _bytes(self, token_id: int) -> bytes:
        if token_id in self.added:
            return self.added[token_id].encode()
        piece = self.tokenizer.convert_ids_to_tokens(token_id)
        if isinstance(piece, str) and piece and all(ch in self.byte_of for ch in piece):
            return bytes(self.byte_of[ch] for ch in piece)
        return self.tokenizer.decode([token_id]).encode()

    def text(self, token_id: int) -> str:
        return self.bytes(token_id).decode("utf-8", errors="replace")

    def entry(self, token_id: int, logprob: float, top: list[tuple[int, float]]) -> dict:
        return {**self._one(token_id, logprob), "top_logprobs": [self._one(i, lp) for i, lp in top]}

    def _one(self, token_id: int, logprob: float) -> dict:
        data = self.bytes(token_id)
        # -9999 stands for "impossible", as OpenAI writes it: -inf is no JSON number.
        return {"token": data.decode("utf-8", errors="replace"), "logprob": max(logprob, -9999.0),
                "bytes": list(data)}
