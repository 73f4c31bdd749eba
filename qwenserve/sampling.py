"""Per-request sampling over one row of logits: penalties, temperature, top-k, top-p, seed."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch


# Finite bounds for logits after penalties: temperature (>= MIN_TEMPERATURE) then scales them without
# reaching inf, and softmax stays a distribution.
LOGIT_LIMIT = 1e4
SEED_SPAN = 2 ** 64  # seeds wrap within what torch.Generator accepts
MASK64 = 2 ** 64 - 1


def step_seed(seed: int, step: int) -> int:
    """The seed of one step's draw: a function of the request's seed and the step number only
    (splitmix64 of both), so a generation continued after a crash, restart or takeover draws exactly
    what an uninterrupted one would."""
    z = (seed + 0x9E3779B97F4A7C15 * (step + 1)) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return (z ^ (z >> 31)) >> 1  # 63 bits


def _is_distribution(probs: torch.Tensor) -> bool:
    total = float(probs.sum())
    return bool(torch.isfinite(probs).all()) and total > 0 and bool((probs >= 0).all())


@dataclass
class SamplingParams:
    max_new_tokens: int
    temperature: float = 0.7
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logprobs: bool = False
    top_logprobs: int = 0
    constraint: Any = None  # makes a row's matcher (constraints.RowConstraint): each choice gets its own

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def for_choice(self, index: int) -> "SamplingParams":
        """Choice i of n samples with seed + i, so that each choice differs and each is reproducible."""
        if self.seed is None or index == 0:
            return self
        return replace(self, seed=(self.seed + index) % SEED_SPAN)


class RowSampler:
    """Sampling state of one request: its generator and the counts of tokens it produced."""

    def __init__(self, params: SamplingParams, vocab_size: int, prompt_ids: list[int]):
        self.params = params
        self.generator = torch.Generator() if params.seed is not None else None
        self.counts = torch.zeros(vocab_size, dtype=torch.float32)
        self.prompt_mask = None
        if params.repetition_penalty != 1.0:
            self.prompt_mask = torch.zeros(vocab_size, dtype=torch.bool)
            self.prompt_mask[torch.tensor([i for i in prompt_ids if i < vocab_size], dtype=torch.long)] = True

    def observe(self, token_id: int) -> None:
        if token_id < self.counts.shape[0]:
            self.counts[token_id] += 1

    @property
    def plain_greedy(self) -> bool:
        return self.params.greedy and not self._penalized

    @property
    def _penalized(self) -> bool:
        p = self.params
        return bool(p.presence_penalty or p.frequency_penalty or p.repetition_penalty != 1.0)

    def sample(self, logits: torch.Tensor, step: int = 0) -> int:
        """The token for generation step `step` (tokens produced before it, resumed ones included)."""
        p = self.params
        logits = logits[: self.counts.shape[0]]
        if self.plain_greedy:
            return int(torch.argmax(logits))  # on the model's device, no copy
        # Sampling state (counts, seeded generator) lives on the CPU, whatever the model's device.
        logits = self._penalize(logits.float().cpu())
        if p.greedy:
            return int(torch.argmax(logits))
        logits = logits / p.temperature
        if p.top_k and p.top_k > 0 and p.top_k < logits.shape[0]:
            kth = torch.topk(logits, p.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if p.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            cumulative = torch.cumsum(sorted_probs, dim=-1)
            drop = cumulative - sorted_probs > p.top_p
            sorted_probs[drop] = 0.0
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        if not _is_distribution(probs):  # the model's own logits overflowed: take the best finite token
            return int(torch.argmax(logits))
        return int(torch.multinomial(probs, 1, generator=self._generator_at(step)))

    def _generator_at(self, step: int) -> torch.Generator | None:
        if self.generator is None:  # no seed: the process's random state
            return None
        return self.generator.manual_seed(step_seed(self.params.seed, step))

    def _penalize(self, logits: torch.Tensor) -> torch.Tensor:
        penalized = self._penalties(logits)
        return torch.nan_to_num(penalized, nan=float("-inf"), posinf=LOGIT_LIMIT).clamp(max=LOGIT_LIMIT)

    def _penalties(self, logits: torch.Tensor) -> torch.Tensor:
        p = self.params
        if p.repetition_penalty != 1.0:
            seen = self.prompt_mask | (self.counts > 0)
            penalized = torch.where(logits > 0, logits / p.repetition_penalty, logits * p.repetition_penalty)
            logits = torch.where(seen, penalized, logits)
        if p.frequency_penalty:
            logits = logits - p.frequency_penalty * self.counts
        if p.presence_penalty:
            logits = logits - p.presence_penalty * (self.counts > 0).float()
        return logits
