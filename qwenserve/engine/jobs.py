"""What a request holds while the engine works on it: the prompt, its admission slot, the job
(outputs to iterate, a cancel switch) and the outputs themselves."""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field

import torch

from ..sampling import SamplingParams


@dataclass
class Prompt:
    """What the model is fed: token ids plus the processor's media tensors."""
    input_ids: list[int]
    text: str
    media_inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    slot: "Slot | None" = None  # admission taken before the expensive work that built this prompt

    @property
    def has_media(self) -> bool:
        return bool(self.media_inputs)


@dataclass
class EngineOutput:
    kind: str  # "replay" (rebuilt state after a restart), "delta", "finish" or "error"
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
    choice: int = 0  # which of the request's n choices this output belongs to
    # With logprobs: per token of `token_ids`, (token id, its logprob, [(id, logprob) of the top ones]).
    logprobs: list[tuple[int, float, list[tuple[int, float]]]] | None = None


class Slot:
    """One unit of admission (running + waiting), taken before a request's expensive preparation so
    that an overloaded server refuses it (429) before fetching media or tokenizing."""

    def __init__(self, release, count: int = 1):
        self._release = release
        self.count = count  # one per choice: each choice is a row of the batch
        self.held = True

    def release(self) -> None:
        if self.held:
            self.held = False
            self._release(self.count)


class Generation:
    """A submitted job as seen from asyncio: outputs to iterate, a cancel switch."""

    def __init__(self, loop: asyncio.AbstractEventLoop, prompt: Prompt, params: SamplingParams,
                 resume_ids: list[int], choice: int = 0, outputs: asyncio.Queue | None = None):
        self.loop = loop
        self.prompt = prompt
        self.params = params
        self.resume_ids = resume_ids
        self.choice = choice
        self.cancel_event = threading.Event()
        self.outputs: asyncio.Queue[EngineOutput] = outputs if outputs is not None else asyncio.Queue()
        self.submitted_at = time.monotonic()
        self.first_token_at: float | None = None
        self.state = "queued"  # then "admitted" by the inference thread, or "ended"; guarded by the engine
        self.on_cancel = None  # set by the engine: ends a job that is still queued at once

    def cancel(self) -> None:
        self.cancel_event.set()
        if self.on_cancel:
            self.on_cancel(self)

    @property
    def cancelled(self) -> bool:
        return self.cancel_event.is_set()

    def emit(self, output: EngineOutput) -> None:
        output.choice = self.choice
        try:
            self.loop.call_soon_threadsafe(self.outputs.put_nowait, output)
        except RuntimeError:  # the event loop is closed: the server is shutting down
            self.cancel_event.set()

    def __aiter__(self):
        return self

    async def __anext__(self) -> EngineOutput:
        output = await self.outputs.get()
        if output.kind == "end":
            raise StopAsyncIteration
        return output


class Choices:
    """The n jobs of one request (one row each) as one generation: their outputs in the order they
    come, each tagged with its choice; cancel stops all; one failing choice stops the others."""

    def __init__(self, jobs: list[Generation], outputs: asyncio.Queue):
        self.jobs = jobs
        self.outputs = outputs
        self._running = len(jobs)

    def cancel(self) -> None:
        for job in self.jobs:
            job.cancel()

    @property
    def cancelled(self) -> bool:
        return any(job.cancelled for job in self.jobs)

    def __aiter__(self):
        return self

    async def __anext__(self) -> EngineOutput:
        while self._running:
            output = await self.outputs.get()
            if output.kind == "end":
                self._running -= 1
                continue
            if output.kind == "error":
                self.cancel()
            return output
        raise StopAsyncIteration
