"""The model: loaded once in the background, driven by one inference thread that batches requests.

Requests never call the model themselves. They submit a job and read its outputs from an
asyncio queue; the inference thread prefills new jobs at step boundaries, then runs one decode
step for every running job together (left-padded KV caches merged into one batch), and drops
finished or cancelled jobs without disturbing the others.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from .config import Settings
from .decoding import TextPipeline
from .protocol import APIError
from .sampling import RowSampler, SamplingParams

log = logging.getLogger("qwenserve.engine")


@dataclass
class Prompt:
    """What the model is fed: token ids plus the processor's media tensors."""
    input_ids: list[int]
    text: str
    media_inputs: dict[str, torch.Tensor] = field(default_factory=dict)

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


class Generation:
    """A submitted job as seen from asyncio: outputs to iterate, a cancel switch."""

    def __init__(self, loop: asyncio.AbstractEventLoop, prompt: Prompt, params: SamplingParams,
                 resume_ids: list[int]):
        self.loop = loop
        self.prompt = prompt
        self.params = params
        self.resume_ids = resume_ids
        self.cancel_event = threading.Event()
        self.outputs: asyncio.Queue[EngineOutput] = asyncio.Queue()
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


@dataclass
class Row:
    """One running job inside the batch."""
    job: Generation
    sampler: RowSampler
    pipeline: TextPipeline
    last_token: int
    next_position: int
    rope_delta: int
    generated: int = 0
    pending_ids: list[int] = field(default_factory=list)
    done: bool = False


class Batch:
    """Running rows with one merged, left-padded KV cache."""

    def __init__(self):
        self.rows: list[Row] = []
        self.cache = None
        self.mask: torch.Tensor | None = None

    def add(self, rows: list[Row], cache, mask: torch.Tensor) -> None:
        """Merge newly prefilled rows (their cache and left-padded mask) into the batch."""
        if not self.rows:
            self.rows, self.cache, self.mask = list(rows), cache, mask
            return
        width = max(self.mask.shape[1], mask.shape[1])
        self.mask = torch.cat([_pad_left(self.mask, width), _pad_left(mask, width)], dim=0)
        for mine, theirs in zip(self.cache.layers, cache.layers):
            mine.keys = torch.cat([_pad_left(mine.keys, width, dim=2), _pad_left(theirs.keys, width, dim=2)])
            mine.values = torch.cat([_pad_left(mine.values, width, dim=2),
                                     _pad_left(theirs.values, width, dim=2)])
        self.rows.extend(rows)

    def drop_done(self) -> None:
        keep = [i for i, row in enumerate(self.rows) if not row.done]
        if len(keep) == len(self.rows):
            return
        if not keep:
            self.rows, self.cache, self.mask = [], None, None
            return
        self.rows = [self.rows[i] for i in keep]
        self.mask = _keep_rows(self.cache, self.mask, keep)
        used = int(torch.nonzero(self.mask.sum(dim=0))[0])  # leading columns that are padding for all
        self.mask = self.mask[:, used:]
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys[:, :, used:], layer.values[:, :, used:]


def _keep_rows(cache, mask: torch.Tensor, keep: list[int]) -> torch.Tensor:
    """Keep only the given batch rows of a cache (in place) and return the matching mask rows."""
    index = torch.tensor(keep, device=mask.device)
    for layer in cache.layers:
        layer.keys, layer.values = layer.keys.index_select(0, index), layer.values.index_select(0, index)
    return mask.index_select(0, index)


def _pad_left(tensor: torch.Tensor, width: int, dim: int = 1) -> torch.Tensor:
    missing = width - tensor.shape[dim]
    if missing <= 0:
        return tensor
    pad = [0, 0] * (tensor.dim() - dim - 1) + [missing, 0]
    return F.pad(tensor, pad)


class Engine:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.model = None
        self.processor = None
        self.tokenizer = None
        self.is_multimodal = False
        self.context_length = 0
        self.vocab_size = 0
        self.eos_ids: set[int] = set()
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
            self._load()
        except Exception as exc:  # the error is reported by /health and every 503
            log.exception("model load failed")
            self.error = f"{type(exc).__name__}: {exc}"
            return
        self.ready.set()
        self._loop()

    def _load(self) -> None:
        from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText,
                                  AutoProcessor, AutoTokenizer)

        s = self.settings
        common = dict(token=s.hf_token, trust_remote_code=s.trust_remote_code)
        config = AutoConfig.from_pretrained(s.model_repo_id, **common)
        self.is_multimodal = getattr(config, "vision_config", None) is not None
        dtype = "auto" if s.torch_dtype == "auto" else getattr(torch, s.torch_dtype)
        load = dict(dtype=dtype, device_map=None if s.device_map in ("", "none") else s.device_map, **common)
        if self.is_multimodal:
            self.processor = AutoProcessor.from_pretrained(s.model_repo_id, **common)
            self.tokenizer = self.processor.tokenizer
            self.model = AutoModelForImageTextToText.from_pretrained(s.model_repo_id, **load)
        else:
            self.tokenizer = AutoTokenizer.from_pretrained(s.model_repo_id, **common)
            self.model = AutoModelForCausalLM.from_pretrained(s.model_repo_id, **load)
        self.model.eval()
        text_config = config.get_text_config()
        self.context_length = int(getattr(text_config, "max_position_embeddings", 0) or 32768)
        self.vocab_size = int(text_config.vocab_size)
        self.eos_ids = _eos_ids(self.model.generation_config.eos_token_id, self.tokenizer.eos_token_id)
        log.info("model %s loaded (%s)", s.model_repo_id, "image-text" if self.is_multimodal else "text")

    @property
    def device(self):
        return self.model.device

    def require_ready(self) -> None:
        if self.error:
            raise APIError(503, f"model failed to load: {self.error}", "service_unavailable", code="model_load_failed")
        if not self.ready.is_set():
            raise APIError(503, "model is still loading; retry shortly", "service_unavailable",
                           code="model_not_ready", headers={"Retry-After": "5"})

    # ---- prompts -------------------------------------------------------------------------
    def build_prompt(self, messages: list[dict], template_kwargs: dict[str, Any],
                     images: list | None = None, videos: list | None = None,
                     video_metadata: list | None = None) -> Prompt:
        """Chat template and tokenization (thread-safe; called off the event loop)."""
        if self.is_multimodal:
            text = self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                                      **template_kwargs)
            kwargs: dict[str, Any] = {}
            if images:
                kwargs["images"] = images
            if videos:
                kwargs["videos"] = videos
                kwargs["video_metadata"] = video_metadata
                kwargs["do_sample_frames"] = False  # frames were sampled by media.decode_video
                kwargs["cap_pixels_per_frame"] = True
            encoded = self.processor(text=[text], return_tensors="pt", **kwargs)
            ids = encoded.pop("input_ids")[0].tolist()
            encoded.pop("attention_mask", None)
            media = {k: v for k, v in encoded.items() if isinstance(v, torch.Tensor)}
            if not images and not videos:
                media = {}
            return Prompt(ids, text, media)
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                                  **template_kwargs)
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return Prompt(ids, text)

    # ---- submission ----------------------------------------------------------------------
    def submit(self, prompt: Prompt, params: SamplingParams, resume_ids: list[int] | None = None) -> Generation:
        self.require_ready()
        limit = self.settings.max_concurrent_requests + self.settings.max_queued_requests
        with self._in_flight_lock:
            if self._in_flight >= limit:
                if self.on_rejected:
                    self.on_rejected()
                raise APIError(429, f"server is at capacity ({limit} requests running or waiting); retry later",
                               "rate_limit_exceeded", code="server_overloaded", headers={"Retry-After": "1"})
            self._in_flight += 1
        job = Generation(asyncio.get_running_loop(), prompt, params, list(resume_ids or []))
        job.on_cancel = self._cancel_if_queued
        self._jobs.put(job)
        return job

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

    # ---- the inference loop --------------------------------------------------------------
    def _loop(self) -> None:
        batch = Batch()
        while not self._stopping.is_set():
            try:
                self._admit(batch)
                if batch.rows:
                    self._step(batch)
            except Exception as exc:
                log.exception("generation step failed")
                for row in batch.rows:
                    if not row.done:
                        self._fail(row.job, exc)
                batch = Batch()

    def _admit(self, batch: Batch) -> None:
        jobs = []
        while len(batch.rows) + len(jobs) < self.settings.max_concurrent_requests:
            try:
                wait = not batch.rows and not jobs
                jobs.append(self._jobs.get(timeout=0.2) if wait else self._jobs.get_nowait())
            except queue.Empty:
                break
        live = [job for job in jobs if self._claim(job) and not self._skip_cancelled(job)]
        # Text-only requests that arrive together prefill together; media ones alone (their vision
        # encoder and multimodal positions are per request).
        groups = [[job] for job in live if job.prompt.has_media]
        plain = [job for job in live if not job.prompt.has_media]
        if plain:
            groups.append(plain)
        for group in groups:
            try:
                rows, cache, mask = self._prefill(group)
            except Exception as exc:
                log.exception("prefill failed")
                for job in group:
                    self._fail(job, exc)
                continue
            if rows:
                batch.add(rows, cache, mask)
        self.running_count = len(batch.rows)
        self.waiting_count = max(0, self._in_flight - self.running_count)  # queue entries of ended jobs excluded

    def _skip_cancelled(self, job: Generation) -> bool:
        if job.cancelled:
            self._finish_job(job, "cancelled", len(job.resume_ids), [])
        return job.cancelled

    @torch.inference_mode()
    def _prefill(self, jobs: list[Generation]):
        """One forward pass over the jobs' prompts (left-padded); returns the rows still running."""
        sequences = [job.prompt.input_ids + job.resume_ids for job in jobs]
        width = max(len(seq) for seq in sequences)
        input_ids = torch.tensor([[0] * (width - len(seq)) + seq for seq in sequences], device=self.device)
        mask = torch.tensor([[0] * (width - len(seq)) + [1] * len(seq) for seq in sequences], device=self.device)
        if len(jobs) == 1 and jobs[0].prompt.has_media:
            media = {k: v.to(self.device) for k, v in jobs[0].prompt.media_inputs.items()}
            positions, delta = self._prefill_positions(input_ids, media)
            media.pop("mm_token_type_ids")
        else:
            positions, delta, media = (mask.cumsum(-1) - 1).clamp(min=0), 0, {}
        out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True,
                         logits_to_keep=1, **media)
        rows = []
        for i, (job, seq) in enumerate(zip(jobs, sequences)):
            row = Row(job=job, sampler=RowSampler(job.params, self.vocab_size, job.prompt.input_ids),
                      pipeline=TextPipeline(self.tokenizer, job.params.stop), last_token=seq[-1],
                      next_position=len(seq), rope_delta=delta, generated=len(job.resume_ids))
            rows.append(row)
            if self._replay(row):
                self._accept(row, row.sampler.sample(out.logits[i, -1]))
        keep = [i for i, row in enumerate(rows) if not row.done]
        if not keep:
            return [], None, None
        cache = out.past_key_values
        if len(keep) < len(rows):
            mask = _keep_rows(cache, mask, keep)
        return [rows[i] for i in keep], cache, mask

    def _prefill_positions(self, input_ids: torch.Tensor, media: dict[str, torch.Tensor]):
        """Qwen3-VL multimodal rope positions for one prompt, and its rope delta for decoding."""
        length = input_ids.shape[1]
        text_positions = torch.arange(length, device=self.device).view(1, 1, -1)
        token_types = media["mm_token_type_ids"]
        if token_types.shape[1] < length:  # resumed generations append text after the prompt
            token_types = F.pad(token_types, (0, length - token_types.shape[1]))
        vision_positions, deltas = self.model.model.get_rope_index(
            input_ids, token_types, image_grid_thw=media.get("image_grid_thw"),
            video_grid_thw=media.get("video_grid_thw"), attention_mask=torch.ones_like(input_ids))
        return torch.cat([text_positions, vision_positions.to(self.device)], dim=0), int(deltas.view(-1)[0])

    def _replay(self, row: Row) -> bool:
        """After a restart: rebuild the text state from the tokens produced before it. False when those
        tokens had already ended the generation (a crash between its last event and its final chunk)."""
        if not row.job.resume_ids:
            return True
        text = "".join(row.pipeline.add(t) for t in row.job.resume_ids)
        for t in row.job.resume_ids:
            row.sampler.observe(t)
        row.job.emit(EngineOutput("replay", text=text))
        if row.pipeline.stopped or row.job.resume_ids[-1] in self.eos_ids:
            self._finish(row, "stop")
        elif row.generated >= row.job.params.max_new_tokens:
            self._finish(row, "length")  # its held-back text went out with the last stored event
        return not row.done

    @torch.inference_mode()
    def _step(self, batch: Batch) -> None:
        for row in batch.rows:
            if row.job.cancelled:
                self._finish(row, "cancelled")
        batch.drop_done()
        if not batch.rows:
            return
        rows = batch.rows
        input_ids = torch.tensor([[r.last_token] for r in rows], device=self.device)
        mask = torch.cat([batch.mask, torch.ones(len(rows), 1, dtype=torch.long, device=self.device)], dim=1)
        positions = torch.tensor([[r.next_position] for r in rows], device=self.device)
        if self.is_multimodal:
            deltas = torch.tensor([[r.rope_delta] for r in rows], device=self.device)
            positions = torch.stack([positions] + [positions + deltas] * 3)
        out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                         past_key_values=batch.cache, use_cache=True)
        batch.mask = mask
        logits = out.logits[:, -1]
        for i, row in enumerate(rows):
            row.next_position += 1
            self._accept(row, row.sampler.sample(logits[i]))
        batch.drop_done()
        self.running_count = len(batch.rows)

    def _accept(self, row: Row, token: int) -> None:
        job = row.job
        if job.first_token_at is None:
            job.first_token_at = time.monotonic()
            if self.on_first_token:
                self.on_first_token(job.first_token_at - job.submitted_at)
        row.generated += 1
        row.pending_ids.append(token)
        row.last_token = token
        if token in self.eos_ids:
            self._finish(row, "stop", row.pipeline.finish())
            return
        row.sampler.observe(token)
        text = row.pipeline.add(token)
        if row.pipeline.stopped:
            self._finish(row, "stop", text)
        elif row.generated >= job.params.max_new_tokens:
            self._finish(row, "length", text + row.pipeline.finish())
        elif text:
            job.emit(EngineOutput("delta", text=text, token_ids=row.pending_ids))
            row.pending_ids = []

    def _finish(self, row: Row, reason: str, text: str = "") -> None:
        if text:
            row.job.emit(EngineOutput("delta", text=text, token_ids=row.pending_ids))
            row.pending_ids = []
        row.done = True
        self._finish_job(row.job, reason, row.generated, row.pending_ids)

    def _finish_job(self, job: Generation, reason: str, generated: int, ids: list[int]) -> None:
        if not self._end(job):
            return
        if self.on_finished:
            self.on_finished(reason, time.monotonic() - job.submitted_at, len(job.prompt.input_ids),
                             generated - len(job.resume_ids))
        job.emit(EngineOutput("finish", token_ids=ids, finish_reason=reason,
                              prompt_tokens=len(job.prompt.input_ids), completion_tokens=generated))
        job.emit(EngineOutput("end"))

    def _fail(self, job: Generation, exc: Exception) -> None:
        if not self._end(job):
            return
        job.emit(EngineOutput("error", error=f"generation failed: {type(exc).__name__}: {exc}"[:500]))
        job.emit(EngineOutput("end"))


def _eos_ids(*values) -> set[int]:
    ids: set[int] = set()
    for value in values:
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(v for v in value if isinstance(v, int))
    return ids
