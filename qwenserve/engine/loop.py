"""The inference loop, run by one thread that owns the model: admit queued jobs at step
boundaries (text jobs arriving together prefill together, media jobs alone), then one decode step
for every running row, each sampled with its own parameters. A failure is contained: a failing
group prefill is retried job by job, and a row whose sampling fails is failed alone."""

from __future__ import annotations

import logging
import queue
import time

import torch
import torch.nn.functional as F

from ..decoding import TextPipeline
from ..sampling import RowSampler
from .batch import Batch, Row, _keep_rows
from .jobs import EngineOutput, Generation

log = logging.getLogger("qwenserve.engine")


def token_logprobs(logits: torch.Tensor, token: int, top: int) -> tuple[int, float, list[tuple[int, float]]]:
    """The chosen token's log-softmax over the raw logits, and the `top` best (id, logprob)."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    best = torch.topk(logprobs, top) if top else None
    pairs = list(zip(best.indices.tolist(), best.values.tolist())) if best is not None else []
    return token, float(logprobs[token]), pairs


class InferenceLoop:
    """Mixed into `Engine`; uses its `loaded` model, job queue, settings and `_finish_job`/`_fail`."""

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
            self._prefill_into(batch, group)
        self.running_count = len(batch.rows)
        self.waiting_count = max(0, self._in_flight - self.running_count)  # queue entries of ended jobs excluded

    def _prefill_into(self, batch: Batch, group: list[Generation]) -> None:
        """Prefill a group; if the group's pass fails, each job is tried alone so that only the job
        that causes the failure fails."""
        try:
            rows, cache, mask = self._prefill(group)
        except Exception as exc:
            if len(group) > 1:
                for job in group:
                    self._prefill_into(batch, [job])
                return
            log.exception("prefill failed")
            self._fail(group[0], exc)
            return
        if rows:
            batch.add(rows, cache, mask)

    def _skip_cancelled(self, job: Generation) -> bool:
        if job.cancelled:
            self._finish_job(job, "cancelled", len(job.resume_ids), [])
        return job.cancelled

    @torch.inference_mode()
    def _prefill(self, jobs: list[Generation]):
        """One forward pass over the jobs' prompts (left-padded); returns the rows still running."""
        sequences = [job.prompt.input_ids + job.resume_ids for job in jobs]
        width = max(len(seq) for seq in sequences)
        input_ids = torch.tensor([[0] * (width - len(seq)) + seq for seq in sequences], device=self.loaded.device)
        mask = torch.tensor([[0] * (width - len(seq)) + [1] * len(seq) for seq in sequences], device=self.loaded.device)
        if len(jobs) == 1 and jobs[0].prompt.has_media:
            media = {k: v.to(self.loaded.device) for k, v in jobs[0].prompt.media_inputs.items()}
            positions, delta = self._prefill_positions(input_ids, media)
            media.pop("mm_token_type_ids")
        else:
            positions, delta, media = (mask.cumsum(-1) - 1).clamp(min=0), 0, {}
        out = self.loaded.model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True,
                         logits_to_keep=1, **media)
        rows = [self._start_row(job, seq, delta, out.logits[i, -1])
                for i, (job, seq) in enumerate(zip(jobs, sequences))]
        keep = [i for i, row in enumerate(rows) if not row.done]
        if not keep:
            return [], None, None
        cache = out.past_key_values
        if len(keep) < len(rows):
            mask = _keep_rows(cache, mask, keep)
        return [rows[i] for i in keep], cache, mask

    def _start_row(self, job: Generation, sequence: list[int], rope_delta: int, logits: torch.Tensor) -> Row:
        """A prefilled job's row with its first token; a failure here fails this job alone."""
        row = Row(job=job, sampler=None, pipeline=None, last_token=sequence[-1], next_position=len(sequence),
                  rope_delta=rope_delta, generated=len(job.resume_ids))
        try:
            row.sampler = RowSampler(job.params, self.loaded.vocab_size, job.prompt.input_ids)
            row.pipeline = TextPipeline(self.loaded.tokenizer, job.params.stop)
            if job.params.constraint is not None:
                row.constraint = job.params.constraint()
            if self._replay(row):
                self._accept(row, self._choose(row, logits))
        except Exception as exc:
            self._fail_row(row, exc)
        return row

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

    @torch.inference_mode()
    def _step(self, batch: Batch) -> None:
        for row in batch.rows:
            if row.job.cancelled:
                self._finish(row, "cancelled")
        batch.drop_done()
        if not batch.rows:
            return
        rows = batch.rows
        input_ids = torch.tensor([[r.last_token] for r in rows], device=self.loaded.device)
        mask = torch.cat([batch.mask, torch.ones(len(rows), 1, dtype=torch.long, device=self.loaded.device)], dim=1)
        positions = torch.tensor([[r.next_position] for r in rows], device=self.loaded.device)
        if self.loaded.is_multimodal:
            deltas = torch.tensor([[r.rope_delta] for r in rows], device=self.loaded.device)
            positions = torch.stack([positions] + [positions + deltas] * 3)
        out = self.loaded.model(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                         past_key_values=batch.cache, use_cache=True)
        batch.mask = mask
        logits = out.logits[:, -1]
        for i, row in enumerate(rows):
            row.next_position += 1
            self._sample_and_accept(row, logits[i])
        batch.drop_done()
        self.running_count = len(batch.rows)

    def _sample_and_accept(self, row: Row, logits: torch.Tensor) -> None:
        """One row's sampling and text work: a failure here fails that row alone."""
        try:
            self._accept(row, self._choose(row, logits))
        except Exception as exc:
            self._fail_row(row, exc)

    def _choose(self, row: Row, logits: torch.Tensor) -> int:
        """The row's next token: the constraint's mask (if any) before sampling; logprobs (if asked)
        from the raw logits, as the model gave them."""
        if row.constraint is None:
            token = row.sampler.sample(logits)
        elif row.sampler.plain_greedy:  # the mask only when the grammar refuses the model's choice
            token = int(torch.argmax(logits))
            if not row.constraint.allows(token):
                token = int(torch.argmax(row.constraint.apply(logits)))
        else:
            token = row.sampler.sample(row.constraint.apply(logits))
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
