"""The inference loop, run by one thread that owns the model. Each turn: admit queued jobs into free
slots of the KV cache, then one chunk of waiting prompts and one decode step for every decoding row,
each sampled with its own parameters. While rows decode, the chunk rides along their step in one pass
(`TextDecoder.decode_and_prefill`: every weight read once) and is sized by time (`pacing.py`), so a
long prompt loads in chunks instead of stalling every stream. A failure is contained: a failing
folded pass runs its step and chunk apart, a failing prefill group is retried row by row, and a row
whose sampling fails is failed alone."""

from __future__ import annotations

import logging
import queue
import time

import torch
import torch.nn.functional as F

from ..decoding import TextPipeline
from ..sampling import RowSampler
from .batch import Batch, Row
from .jobs import EngineOutput, Generation
from .pacing import PrefillPacer, Stopwatch

log = logging.getLogger("qwenserve.engine")


def token_logprobs(logits: torch.Tensor, token: int, top: int) -> tuple[int, float, list[tuple[int, float]]]:
    """The chosen token's log-softmax over the raw logits, and the `top` best (id, logprob)."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    best = torch.topk(logprobs, top) if top else None
    pairs = list(zip(best.indices.tolist(), best.values.tolist())) if best is not None else []
    return token, float(logprobs[token]), pairs


class InferenceLoop:
    """Mixed into `Engine`; uses its `loaded` model, `decoder`, job queue, settings and `_finish_job`/`_fail`."""

    def _loop(self) -> None:
        batch = Batch(self.decoder.cache)
        self.pacer = PrefillPacer(self.settings.prefill_chunk_tokens, self.settings.prefill_stall_factor)
        while not self._stopping.is_set():
            try:
                self._admit(batch)
                self._turn(batch)
                batch.drop_done()
                self.running_count = len(batch.rows)
            except Exception as exc:
                log.exception("generation step failed")
                for row in batch.rows:
                    if not row.done:
                        self._fail(row.job, exc)
                batch.release_all()

    # ---- admission -----------------------------------------------------------------------
    def _admit(self, batch: Batch) -> None:
        jobs = []
        while len(jobs) < batch.cache.free_slots:
            try:
                wait = not batch.rows and not jobs
                jobs.append(self._jobs.get(timeout=0.2) if wait else self._jobs.get_nowait())
            except queue.Empty:
                break
        for job in jobs:
            if self._claim(job) and not self._skip_cancelled(job):
                self._start_row(batch, job)
        self.running_count = len(batch.rows)
        self.waiting_count = max(0, self._in_flight - self.running_count)  # queue entries of ended jobs excluded

    def _skip_cancelled(self, job: Generation) -> bool:
        if job.cancelled:
            self._finish_job(job, "cancelled", len(job.resume_ids), [])
        return job.cancelled

    def _start_row(self, batch: Batch, job: Generation) -> None:
        """A row in a free slot: its sampler, text pipeline and constraint, the state rebuilt from
        tokens produced before a restart, and a media prompt's prefill (not chunked: the vision
        tower and multimodal positions need the whole prompt). A failure here fails this job alone."""
        row = Row(job=job, slot=batch.cache.take(), prefill=job.prompt.input_ids + job.resume_ids,
                  generated=len(job.resume_ids))
        batch.add(row)
        try:
            row.sampler = RowSampler(job.params, self.loaded.vocab_size, job.prompt.input_ids)
            row.pipeline = TextPipeline(self.loaded.tokenizer, job.params.stop)
            if job.params.constraint is not None:
                row.constraint = job.params.constraint()
            if self._replay(row) and job.prompt.has_media:
                self._prefill_media(row)
        except Exception as exc:
            self._fail_row(row, exc)

    @torch.inference_mode()
    def _prefill_media(self, row: Row) -> None:
        sequence = row.prefill
        input_ids = torch.tensor([sequence], device=self.loaded.device)
        media = {k: v.to(self.loaded.device) for k, v in row.job.prompt.media_inputs.items()}
        positions, row.rope_delta = self._prefill_positions(input_ids, media)
        media.pop("mm_token_type_ids")
        out = self.loaded.model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                position_ids=positions, use_cache=True, logits_to_keep=1, **media)
        self.decoder.cache.load(row.slot, out.past_key_values, len(sequence))
        row.prefill, row.length = [], len(sequence)
        self._accept(row, self._choose(row, out.logits[0, -1].float()))

    def _prefill_positions(self, input_ids: torch.Tensor, media: dict[str, torch.Tensor]):
        """Qwen3-VL multimodal rope positions for one prompt, and its rope delta for decoding."""
        length = input_ids.shape[1]
        text_positions = torch.arange(length, device=self.loaded.device).view(1, 1, -1)
        token_types = media["mm_token_type_ids"]
        if token_types.shape[1] < length:  # resumed generations append text after the prompt
            token_types = F.pad(token_types, (0, length - token_types.shape[1]))
        vision_positions, deltas = self.loaded.model.model.get_rope_index(
            input_ids, token_types, image_grid_thw=media.get("image_grid_thw"),
            video_grid_thw=media.get("video_grid_thw"), attention_mask=torch.ones_like(input_ids))
        return torch.cat([text_positions, vision_positions.to(self.loaded.device)], dim=0), int(deltas.view(-1)[0])

    def _replay(self, row: Row) -> bool:
        """After a restart: rebuild the text state from the tokens produced before it. False when those
        tokens had already ended the generation (a crash between its last event and its final chunk)."""
        if not row.job.resume_ids:
            return True
        text = "".join(row.pipeline.add(t) for t in row.job.resume_ids)
        for t in row.job.resume_ids:
            row.sampler.observe(t)
        if row.constraint is not None:
            row.constraint.replay(row.job.resume_ids)  # the matcher continues where the stored tokens left it
        row.job.emit(EngineOutput("replay", text=text))
        if row.pipeline.stopped or row.job.resume_ids[-1] in self.loaded.eos_ids:
            self._finish(row, "stop")
        elif row.generated >= row.job.params.max_new_tokens:
            self._finish(row, "length")  # its held-back text went out with the last stored event
        return not row.done

    def _uncancelled(self, rows: list[Row]) -> list[Row]:
        """The rows whose cancel event is not set; the others finish (reason `cancelled`) here."""
        for row in rows:
            if row.job.cancelled:
                self._finish(row, "cancelled")
        return [row for row in rows if not row.done]

    def _turn(self, batch: Batch) -> None:
        """One chunk of waiting prompts and one decode step: in one pass where the decoder folds them
        (every weight read once for both), else the chunk's pass, then the step."""
        chunk = self._next_chunk(batch)
        rows = self._uncancelled(batch.decoding()) if chunk else []
        # A step of its own first when none was measured (a media row decoding before any step): a
        # folded chunk is charged the pass beyond the step estimate, and folding never measures one.
        if chunk and rows and self.decoder.folds and self.pacer.step_seconds is not None:
            self._fold(batch, rows, *chunk)
            return
        if chunk:
            self._prefill_group(*chunk)
        self._step(batch)

    # ---- chunked prefill -----------------------------------------------------------------
    def _next_chunk(self, batch: Batch) -> tuple[list[Row], int, bool] | None:
        """Up to the pacer's budget (rows x padded width; PREFILL_CHUNK_TOKENS when no row decodes) of
        waiting prompts for one pass: (rows, width, whether paced), or None when no prompt waits."""
        waiting = self._uncancelled(batch.prefilling())
        if not waiting:
            return None
        decoding = sum(1 for row in batch.rows if row.decoding)
        longest = max(row.length + len(row.prefill) for row in waiting)
        paced = self.pacer.paces(decoding, len(waiting), longest)
        budget = self.pacer.budget(paced=paced)
        group, width = [waiting[0]], min(len(waiting[0].prefill), budget)
        for row in waiting[1:]:
            wider = max(width, min(len(row.prefill), budget))
            if (len(group) + 1) * wider > budget:
                break
            group, width = group + [row], wider
        return group, width, paced

    def _prefill_group(self, group: list[Row], width: int, paced: bool = False) -> None:
        try:
            watch = Stopwatch()
            logits = self._prefill_logits(group, width)
            self.pacer.observe_prefill(len(group) * width, watch.seconds(logits), paced)
        except Exception as exc:
            if len(group) > 1:
                for row in group:
                    self._prefill_group([row], min(width, len(row.prefill)), paced)
                return
            log.exception("prefill failed")
            self._fail_row(group[0], exc)
            return
        self._take_chunk(group, width, logits)

    def _take_chunk(self, group: list[Row], width: int, logits: torch.Tensor) -> None:
        """The chunk is in the rows' slots; a row whose prompt is complete gets its first token."""
        for i, row in enumerate(group):
            taken = row.prefill[:width]
            row.prefill, row.length = row.prefill[width:], row.length + len(taken)
            if not row.prefill:
                self._sample_and_accept(row, logits[i])

    @torch.inference_mode()
    def _prefill_logits(self, group: list[Row], width: int) -> torch.Tensor:
        return self.decoder.prefill(*self._chunk_inputs(group, width))

    @staticmethod
    def _chunk_inputs(group: list[Row], width: int) -> tuple[list[int], list[list[int]], list[int]]:
        return [row.slot for row in group], [row.prefill[:width] for row in group], [row.length for row in group]

    # ---- decoding ------------------------------------------------------------------------
    @torch.inference_mode()
    def _step(self, batch: Batch) -> None:
        rows = self._uncancelled(batch.decoding())
        if not rows:
            return
        watch = Stopwatch()
        logits = self.decoder.decode_step(*batch.step_inputs(rows, self.loaded.device))
        self._take_step(rows, logits)
        self.pacer.observe_step(watch.seconds())

    def _take_step(self, rows: list[Row], logits: torch.Tensor) -> None:
        best = logits.argmax(dim=-1).tolist()  # every greedy row in one op
        for row in rows:
            row.length += 1
            self._sample_and_accept(row, logits[row.slot], best[row.slot])

    @torch.inference_mode()
    def _fold(self, batch: Batch, rows: list[Row], group: list[Row], width: int, paced: bool) -> None:
        """The decode step and the chunk in one pass. The chunk is charged what the pass took beyond a
        step (the pacer's estimate from steps alone): that is what it adds to the running rows' gaps.
        A failure runs them apart, where a failing chunk is retried row by row (the pass's cache writes
        are rewritten the same)."""
        watch = Stopwatch()
        try:
            decoded, prefilled = self.decoder.decode_and_prefill(batch.step_inputs(rows, self.loaded.device),
                                                                 self._chunk_inputs(group, width))
            seconds = watch.seconds(prefilled)  # on a GPU, where the pass's errors surface
        except Exception:
            log.exception("a decode step with a prefill chunk failed; running them apart")
            self._prefill_group(group, width, paced)
            self._step(batch)
            return
        self.pacer.observe_prefill(len(group) * width, max(seconds - self.pacer.step_seconds, 0), paced)
        self._take_step(rows, decoded)
        self._take_chunk(group, width, prefilled)

    def _sample_and_accept(self, row: Row, logits: torch.Tensor, best: int | None = None) -> None:
        """One row's sampling and text work: a failure here fails that row alone."""
        try:
            self._accept(row, self._choose(row, logits, best))
        except Exception as exc:
            self._fail_row(row, exc)

    def _choose(self, row: Row, logits: torch.Tensor, best: int | None = None) -> int:
        """The row's next token: the constraint's mask (if any) before sampling; logprobs (if asked)
        from the raw logits, as the model gave them. `best`: the logits' argmax, when already known."""
        sampler, step = row.sampler, row.generated
        if sampler.plain_greedy:
            token = int(torch.argmax(logits)) if best is None else best
            if row.constraint is not None and not row.constraint.allows(token):  # masked only when refused
                token = int(torch.argmax(row.constraint.apply(logits)))
        elif row.constraint is None:
            token = sampler.sample(logits, step)
        else:
            token = sampler.sample(row.constraint.apply(logits), step)
        if row.constraint is not None:
            row.constraint.accept(token)
        if row.job.params.logprobs:
            row.pending_logprobs.append(token_logprobs(logits, token, row.job.params.top_logprobs))
        return token

    def _fail_row(self, row: Row, exc: Exception) -> None:
        log.exception("generation failed for one request; the rest of the batch goes on")
        row.done = True
        self._fail(row.job, exc)

    def _accept(self, row: Row, token: int) -> None:
        job = row.job
        if job.first_token_at is None:
            job.first_token_at = time.monotonic()
            if self.on_first_token:
                self.on_first_token(job.first_token_at - job.submitted_at)
        row.generated += 1
        row.pending_ids.append(token)
        row.last_token = token
        if token in self.loaded.eos_ids:
            self._finish(row, "stop", row.pipeline.finish())
            return
        row.sampler.observe(token)
        text = row.pipeline.add(token)
        if row.pipeline.stopped:
            self._finish(row, "stop", text)
        elif row.generated >= job.params.max_new_tokens:
            self._finish(row, "length", text + row.pipeline.finish())
        elif text:
            self._emit_delta(row, text)

    def _emit_delta(self, row: Row, text: str) -> None:
        row.job.emit(EngineOutput("delta", text=text, token_ids=row.pending_ids,
                                  logprobs=row.pending_logprobs if row.job.params.logprobs else None))
        row.pending_ids, row.pending_logprobs = [], []

    def _finish(self, row: Row, reason: str, text: str = "") -> None:
        if text:
            self._emit_delta(row, text)
        row.done = True
        self._finish_job(row.job, reason, row.generated, row.pending_ids,
                         row.pending_logprobs if row.job.params.logprobs else None)
