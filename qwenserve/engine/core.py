"""The engine as the request side sees it: loading in the background, readiness, admission
(slots: running + waiting, 429 beyond), submission, cancel, and ending a job exactly once.
The inference loop itself is in `loop.py`."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time

from ..config import Settings
from ..protocol import APIError
from ..sampling import SamplingParams
from .jobs import Choices, EngineOutput, Generation, Prompt, Slot
from .loading import LoadedModel, load_model
from .loop import InferenceLoop
from .runtime import build_decoder

log = logging.getLogger("qwenserve.engine")


class Engine(InferenceLoop):
    def __init__(self, settings: Settings):
        self.settings = settings
        self.loaded: LoadedModel | None = None
        self.decoder = None  # runtime.TextDecoder: kernels, KV cache, decode step
        self.error: str | None = None
        self.created = int(time.time())  # reported as the model's `created` in /v1/models
        self.ready = threading.Event()
        self._jobs: queue.Queue[Generation] = queue.Queue()
        self._in_flight = 0
        self._in_flight_lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self.running_count = 0
        self.waiting_count = 0
        self.on_first_token = None  # metrics hooks (called on the inference thread, except on_rejected)
        self.on_finished = None
        self.on_rejected = None

    # ---- loading -------------------------------------------------------------------------
    @property
    def model_id(self) -> str:
        return self.settings.model_id

    def start(self) -> None:
        """Load the model and run the inference loop, both on the inference thread."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="inference", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _run(self) -> None:
        try:
            loaded = load_model(self.settings)
            self.decoder = build_decoder(loaded, self.settings)
            self.loaded = loaded
        except Exception as exc:  # the error is reported by /health and every 503
            log.exception("model load failed")
            self.error = f"{type(exc).__name__}: {exc}"
            return
        self.ready.set()
        self._loop()

    # What the request side needs to know of the model (valid once `ready` is set).
    @property
    def model(self):
        return self.loaded.model if self.loaded else None

    @property
    def is_multimodal(self) -> bool:
        return bool(self.loaded and self.loaded.is_multimodal)

    @property
    def context_length(self) -> int:
        """Tokens one row may hold: the model's context, within a KV cache slot."""
        return min(self.loaded.context_length, self.settings.kv_cache_tokens) if self.loaded else 0

    @property
    def runtime(self) -> dict:
        """What decoding runs on, once loaded (for /health): the KV cache as allocated at start-up,
        the weights' dtype and quantization, and whether the decode step is compiled."""
        if not self.decoder or not self.loaded:
            return {}
        return {"kvCache": self.decoder.cache.describe(), "dtype": str(self.decoder.cache.keys[0].dtype),
                "quantization": self.loaded.quantization, "kernels": self.loaded.kernels,
                "compiled": self.decoder.decode_step != self.decoder.decode}

    @property
    def constraints(self):
        return self.loaded.constraints if self.loaded else None

    @property
    def may_think(self) -> bool:
        return bool(self.loaded and self.loaded.may_think)

    @property
    def token_bytes(self):
        return self.loaded.token_bytes

    @property
    def template_variables(self) -> frozenset[str] | None:
        return self.loaded.template_variables if self.loaded else None

    def build_prompt(self, *args, **kwargs) -> Prompt:
        """Chat template and tokenization (thread-safe; called off the event loop)."""
        return self.loaded.build_prompt(*args, **kwargs)

    def require_ready(self) -> None:
        if self.error:
            raise APIError(503, f"model failed to load: {self.error}", "service_unavailable", code="model_load_failed")
        if not self.ready.is_set():
            raise APIError(503, "model is still loading; retry shortly", "service_unavailable",
                           code="model_not_ready", headers={"Retry-After": "5"})

    # ---- submission ----------------------------------------------------------------------
    def reserve(self, force: bool = False, rows: int = 1) -> Slot:
        """Admission: `rows` slots (one per choice) among MAX_CONCURRENT_REQUESTS + MAX_QUEUED_REQUESTS,
        or a 429 at once. `force` admits a generation that was admitted before a restart."""
        self.require_ready()
        limit = self.settings.max_concurrent_requests + self.settings.max_queued_requests
        with self._in_flight_lock:
            if self._in_flight + rows > limit and not force:
                if self.on_rejected:
                    self.on_rejected()
                raise APIError(429, f"server is at capacity ({limit} requests running or waiting); retry later",
                               "rate_limit_exceeded", code="server_overloaded", headers={"Retry-After": "1"})
            self._in_flight += rows
        return Slot(self._release_slots, rows)

    def _release_slots(self, rows: int) -> None:
        with self._in_flight_lock:
            self._in_flight -= rows

    def submit(self, prompt: Prompt, params: SamplingParams,
               resume_ids: list[int] | dict[int, list[int]] | None = None, n: int = 1) -> Choices:
        """Queue a prepared prompt as n rows; their slots (reserved by `prepare`, or taken now) are freed
        as each ends. `resume_ids`: the tokens produced before a restart, as a list for one choice or as
        {choice: ids} for the choices still to finish."""
        resumes = resume_ids if isinstance(resume_ids, dict) else \
            {i: list(resume_ids or []) if i == 0 else [] for i in range(n)}
        slot = prompt.slot
        if slot is None or not slot.held or slot.count != len(resumes):
            if slot is not None:
                slot.release()
            slot = self.reserve(rows=len(resumes))
        slot.held = False  # from here on each job's end releases its row
        prompt.slot = None
        loop, outputs = asyncio.get_running_loop(), asyncio.Queue()
        jobs = [Generation(loop, prompt, params.for_choice(i), ids, i, outputs) for i, ids in resumes.items()]
        for job in jobs:
            job.on_cancel = self._cancel_if_queued
            self._jobs.put(job)
        return Choices(jobs, outputs)

    def _cancel_if_queued(self, job: Generation) -> None:
        """A job cancelled before it reached the batch ends now and frees its slot; its queue entry is
        skipped when the inference thread gets to it."""
        with self._in_flight_lock:
            queued = job.state == "queued"
        if queued:
            self._finish_job(job, "cancelled", len(job.resume_ids), [])

    def _claim(self, job: Generation) -> bool:
        with self._in_flight_lock:
            if job.state != "queued":
                return False
            job.state = "admitted"
            return True

    def _end(self, job: Generation) -> bool:
        """Mark a job ended exactly once (the inference thread and a cancel may race); frees its slot."""
        with self._in_flight_lock:
            if job.state == "ended":
                return False
            job.state = "ended"
            self._in_flight -= 1
            return True

    def _finish_job(self, job: Generation, reason: str, generated: int, ids: list[int],
                    logprobs: list | None = None) -> None:
        if not self._end(job):
            return
        if self.on_finished:
            self.on_finished(reason, time.monotonic() - job.submitted_at, len(job.prompt.input_ids),
                             generated - len(job.resume_ids))
        job.emit(EngineOutput("finish", token_ids=ids, finish_reason=reason, logprobs=logprobs,
                              prompt_tokens=len(job.prompt.input_ids), completion_tokens=generated))
        job.emit(EngineOutput("end"))

    def _fail(self, job: Generation, exc: Exception) -> None:
        if not self._end(job):
            return
        job.emit(EngineOutput("error", error=f"generation failed: {type(exc).__name__}: {exc}"[:500]))
        job.emit(EngineOutput("end"))
