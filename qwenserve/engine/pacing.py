"""How many prompt tokens the next prefill pass may take (issue 10, point 4).

While rows decode, a prefill chunk rides along their decode step (one pass, see `loop.py`), so its
work is added to every running stream's inter-token gap. The chunk is therefore sized by time: it may
add at most PREFILL_STALL_FACTOR times a decode step, and a gap stays near (1 + factor) steps. Both
costs are measured online, on this machine and this model, as the loop runs:

- the decode step: the median of the last `STEPS_KEPT` steps, so a few slow steps (a noisy neighbour:
  the development VM showed 25-67% of its time stolen by its host) do not move it, and a batch that
  grows is followed within half as many steps. An exponential average sat 25% above the running
  streams' median gap in one bench run (noise is all upward), and the gaps during a long prompt with it;
- the prefill cost per token (rows x padded width, what a pass computes): it follows a rise at once
  and a fall by an exponential average (weight `FALL_WEIGHT`). A rise is what makes a gap too long:
  later chunks of a long prompt attend to more keys and cost more per token. Consecutive chunks differ
  by one chunk's worth of keys (tens of tokens next to hundreds or thousands), so the last pass's cost
  predicts the next one's within a few percent, and taking every rise at once keeps that lag to one
  chunk. A fall (a short prompt after a long one, noise ending) is trusted gradually.

A chunk riding along a step is charged what that pass took beyond the step estimate: its own tokens'
work, what it adds to the running rows' gaps. A pass of its own (nothing decoding) also has a fixed
cost (every weight read once, whatever the chunk), which its per-token rate spreads over its tokens;
that rate overestimates a folded chunk's, and the estimate falls to the folded rate gradually.

Passes that are not paced (`paces`: nothing decoding, short prompts, a burst of arrivals) take
PREFILL_CHUNK_TOKENS (the prompts' first tokens as soon as possible; the pass is still measured).
Decoding but a cost not measured yet (a media prompt decoding before any text prefill or step):
`MIN_CHUNK_TOKENS`, a cheap probe, then the measurement. PREFILL_STALL_FACTOR=0 turns pacing off:
chunks are always PREFILL_CHUNK_TOKENS."""

from __future__ import annotations

import statistics
import time
from collections import deque

import torch

# The smallest paced chunk: the smallest PREFILL_CHUNK_TOKENS the settings accept, so that a prompt
# always progresses (a 4,000-token prompt in at most 250 turns). Below it, the per-pass cost (every
# weight read once) dominates: smaller chunks would barely shorten a gap but would slow the prompt.
MIN_CHUNK_TOKENS = 16
STEPS_KEPT = 9  # decode steps whose median is the step estimate
FALL_WEIGHT = 0.5  # weight of a new per-token prefill cost when it is lower than the estimate


class PrefillPacer:
    """The decode step and per-token prefill estimates, and the chunk budget they give."""

    def __init__(self, chunk_tokens: int, stall_factor: float):
        self.chunk_tokens = chunk_tokens
        self.stall_factor = stall_factor
        self.step_seconds: float | None = None
        self._steps: deque[float] = deque(maxlen=STEPS_KEPT)
        self.token_seconds: float | None = None
        self.paced_tokens: int | None = None  # the last paced pass (None: the last pass was not paced)

    def observe_step(self, seconds: float) -> None:
        self._steps.append(seconds)
        self.step_seconds = statistics.median(self._steps)

    def observe_prefill(self, tokens: int, seconds: float, paced: bool = True) -> None:
        self.paced_tokens = tokens if paced else None
        rate = seconds / max(tokens, 1)
        previous = self.token_seconds
        if previous is None or rate >= previous:
            self.token_seconds = rate
        else:
            self.token_seconds = previous + FALL_WEIGHT * (rate - previous)

    def paces(self, decoding_rows: int, waiting_rows: int, longest_prompt: int) -> bool:
        """Whether the next pass is paced: only for a long prompt (longer than one PREFILL_CHUNK_TOKENS
        pass, counted whole, so that its last part is paced too) among at least as many decoding rows
        as wait. Pacing short prompts or a burst of arrivals into many small chunks cost more than it
        saved (measured when every chunk was a pass of its own): a burst (16 requests sent together:
        the first one or two decode before the rest are admitted) joined over many turns with the batch
        part-empty (16 streams at 0.6x raw `generate`, bench model fp32), and on the real-size model 8
        streams took 7.6 s to their first tokens. A short prompt's pass is one short stall."""
        return decoding_rows > 0 and decoding_rows >= waiting_rows and longest_prompt > self.chunk_tokens

    def budget(self, paced: bool) -> int:
        """Tokens (rows x padded width) the next prefill pass may take (`paced`: as `paces` said)."""
        if not paced or self.stall_factor == 0:
            return self.chunk_tokens
        if self.step_seconds is None or self.token_seconds is None:
            return min(MIN_CHUNK_TOKENS, self.chunk_tokens)
        tokens = int(self.stall_factor * self.step_seconds / max(self.token_seconds, 1e-9))
        return max(MIN_CHUNK_TOKENS, min(tokens, self.chunk_tokens, self._slow_start()))

    def _slow_start(self) -> int:
        """At most twice the last paced pass, from MIN_CHUNK_TOKENS after a pass that was not paced. A
        cost measured on other passes (short prompts prefilled together, at the start of their slots) can
        be far below a long prompt's, and one pass sized by it stalled 8 streams for 2.2 s (bench model
        fp32, 4,000-token prompt): growing by doubling, no pass runs over by more than twice."""
        return 2 * self.paced_tokens if self.paced_tokens else MIN_CHUNK_TOKENS


class Stopwatch:
    """Seconds since it was made; on a GPU it first waits for the queued work (timings of launches
    alone would be charged to whatever synchronizes next, the decode step)."""

    def __init__(self):
        self.started = time.perf_counter()

    def seconds(self, result: torch.Tensor | None = None) -> float:
        if result is not None and result.device.type == "cuda":
            torch.cuda.synchronize(result.device)
        return time.perf_counter() - self.started
