"""What one `make bench` run measures, and the environment knobs that shorten it.

Defaults run everything (about half an hour on the 2-core development CPU). Knobs:
  BENCH_QUICK=1              smoke run: a few tokens per measure, short prompts, few requests
  BENCH_SKIP_REALSIZE=1      skip the real-size (Qwen3-VL-2B shaped) checkpoint
  BENCH_SKIP_PEER=1          skip `transformers serve`
  BENCH_SKIP_PERSISTENCE=1   skip the session-store comparison
  BENCH_DTYPES=float32,bfloat16   the dtypes measured on each checkpoint
  BENCH_TOKENS               tokens per stream on the bench model (single, 8 and 16 streams, raw)
  BENCH_LONG_TOKENS          the bench model's one long stream (per-token time early vs late)
  BENCH_REALSIZE_TOKENS, BENCH_REALSIZE_LONG_TOKENS   the same for the real-size checkpoint
  BENCH_LONG_PROMPT_TOKENS   the prompt that arrives while 8 streams run (4,000)
  BENCH_KV_CACHE_TOKENS      KV_CACHE_TOKENS given to the servers (5120; lowered where RAM is short)
  BENCH_START_TIMEOUT        seconds a server may take to load (and compile) before it counts as failed
Server settings not named here (COMPILE, PREFILL_CHUNK_TOKENS, ...) pass through from the environment,
so the bench measures the defaults unless the caller sets them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache"
RESULTS = ROOT / "bench-results"

QUICK = os.environ.get("BENCH_QUICK") == "1"


def flag(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0", "false", "no")


def number(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    return int(value) if value.strip() else default


@dataclass(frozen=True)
class Counts:
    """Token counts of one checkpoint's measures (printed with the table)."""

    streams: int      # tokens per stream: single, 8 and 16 streams, raw single and raw batch 16
    long: int         # the one long stream: per-token time at positions 1..window vs long-window+1..long
    window: int
    long_prompt: int  # tokens of the prompt that arrives while 8 streams run
    compare: int      # tokens per prompt of the int8 / bf16 comparison (8 prompts)

    def describe(self) -> str:
        return (f"{self.streams} tokens per stream (raw and server), long stream {self.long} tokens "
                f"(positions 1-{self.window} vs {self.long - self.window + 1}-{self.long}), "
                f"long prompt {self.long_prompt} tokens, int8/bf16 comparison 8 prompts x {self.compare} tokens")


def bench_counts() -> Counts:
    if QUICK:
        return Counts(streams=number("BENCH_TOKENS", 16), long=number("BENCH_LONG_TOKENS", 96), window=16,
                      long_prompt=number("BENCH_LONG_PROMPT_TOKENS", 1000), compare=16)
    return Counts(streams=number("BENCH_TOKENS", 64), long=number("BENCH_LONG_TOKENS", 1024), window=64,
                  long_prompt=number("BENCH_LONG_PROMPT_TOKENS", 4000), compare=64)


def realsize_counts() -> Counts:
    # fp32 decodes at ~2-3 tokens/s at this size on 2 cores: counts keep each measure meaningful but bounded.
    if QUICK:
        return Counts(streams=number("BENCH_REALSIZE_TOKENS", 6), long=number("BENCH_REALSIZE_LONG_TOKENS", 24),
                      window=8, long_prompt=number("BENCH_LONG_PROMPT_TOKENS", 500), compare=6)
    return Counts(streams=number("BENCH_REALSIZE_TOKENS", 32), long=number("BENCH_REALSIZE_LONG_TOKENS", 256),
                  window=64, long_prompt=number("BENCH_LONG_PROMPT_TOKENS", 4000), compare=32)


DTYPES = [d.strip() for d in os.environ.get("BENCH_DTYPES", "float32,bfloat16").split(",") if d.strip()]
KV_CACHE_TOKENS = number("BENCH_KV_CACHE_TOKENS", 5120)
START_TIMEOUT = number("BENCH_START_TIMEOUT", 1200)
MEMORY_REQUESTS = 100 if QUICK else 1000      # per round, two rounds, after a warm-up of 100
PERSISTENCE_TOKENS = 64 if QUICK else 256     # per stream, 16 streams, tiny model
PERSISTENCE_ROUNDS = 1 if QUICK else 3
CONSTRAINT_ROUNDS = 1 if QUICK else 2
MAX_CONCURRENT = 16
