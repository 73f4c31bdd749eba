"""Measures taken on one running server (see server.serving); each returns plain numbers for the report."""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from pathlib import Path
from statistics import fmean

import httpx

from .plan import Counts
from .server import (
    Server,
    StreamRun,
    Unavailable,
    chat_body,
    client,
    complete,
    concurrent,
    percentile,
    rss_kib,
    stream,
)


def throughput(server: Server, counts: Counts) -> dict:
    """Single stream (decode tokens/s and time to first token), 8 and 16 streams (aggregate tokens/s,
    prefill included, as raw generate at batch 16), inter-token gaps at 8 streams, pooled."""
    body = chat_body(counts.streams)
    asyncio.run(concurrent(server.url, 16, chat_body(4)))  # warm-up at the largest batch
    result = single_stream(server, counts.streams)
    result["streams8"], runs = asyncio.run(concurrent(server.url, 8, body))
    gaps = [end - start for run in runs for start, end in run.gaps()]
    result["itl_p50"], result["itl_p99"] = percentile(gaps, 50), percentile(gaps, 99)
    result["itl_count"] = len(gaps)
    result["ttft8"] = fmean(run.ttft for run in runs)
    result["streams16"], _ = asyncio.run(concurrent(server.url, 16, body))
    return result


def single_stream(server: Server, tokens: int) -> dict:
    """Decode tokens/s of one stream, (chunks - 1) / (last chunk - first chunk), and its time to first token."""
    asyncio.run(concurrent(server.url, 1, chat_body(4)))  # warm-up
    _, (one,) = asyncio.run(concurrent(server.url, 1, chat_body(tokens)))
    if len(one.times) < 2:
        raise Unavailable(f"single stream produced {len(one.times)} text chunks")
    return {"single": (len(one.times) - 1) / (one.times[-1] - one.times[0]), "ttft": one.ttft,
            "chunks_per_token": len(one.times) / max(one.tokens, 1)}


def long_stream(server: Server, counts: Counts) -> dict:
    """One stream of `counts.long` tokens: mean time per token at positions 1..window and at the last window."""
    _, (run,) = asyncio.run(concurrent(server.url, 1, chat_body(counts.long)))
    times, window = run.times, counts.window
    if len(times) < counts.long:
        raise Unavailable(f"{len(times)} text chunks for {counts.long} tokens")
    early = (times[window - 1] - times[0]) / (window - 1)
    late = (times[-1] - times[-1 - window]) / window
    return {"early_ms": early * 1000, "late_ms": late * 1000, "ratio": late / early, "tokens": run.tokens}


def long_prompt_text(model: Path, tokens: int, seed: int = 0) -> str:
    """Random lowercase words that the checkpoint's tokenizer reads as `tokens` tokens."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    rng = random.Random(seed)
    words = []
    while True:
        words.extend("".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9)))
                     for _ in range(max(64, tokens // 4)))
        ids = tokenizer(" ".join(words), add_special_tokens=False)["input_ids"]
        if len(ids) >= tokens:
            return tokenizer.decode(ids[:tokens])


async def _wait(condition, tasks, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        for task in tasks:
            if task.done() and task.exception():
                raise task.exception()
        if time.monotonic() > deadline:
            raise Unavailable(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


async def _cancel_sessions(http, url: str, ids: list[str]) -> None:
    for sid in ids:
        try:
            await http.post(f"{url}/v1/cancel/{sid}")
        except httpx.HTTPError as exc:  # the stream's own task reports what went wrong
            print(f"  cancel {sid}: {exc!r}", flush=True)


async def _with_long_prompt(url: str, text: str, room: int, running: int, before: int, after: int,
                            timeout: float) -> tuple[list[StreamRun], StreamRun, float]:
    async with client() as http:
        ids = [f"bench-{uuid.uuid4().hex[:12]}-{i}" for i in range(running)]
        runs = [StreamRun(0.0) for _ in ids]
        tasks = [asyncio.create_task(stream(http, url, chat_body(room, session_id=sid), run))
                 for sid, run in zip(ids, runs)]
        long = StreamRun(0.0)
        try:
            await _wait(lambda: all(len(r.times) >= before for r in runs), tasks, timeout, "the running streams")
            submitted = time.perf_counter()
            tasks.append(asyncio.create_task(stream(http, url, chat_body(4, prompt=text), long)))
            await _wait(lambda: long.times, tasks, timeout, "the long prompt's first token")
            first = long.times[0]
            await _wait(lambda: all(sum(t > first for t in r.times) >= after for r in runs), tasks, timeout,
                        "the running streams after the long prompt")
        except BaseException:
            for task in tasks:
                task.cancel()
            await _cancel_sessions(http, url, ids)
            raise
        await _cancel_sessions(http, url, ids)
        await asyncio.gather(*tasks)
    return runs, long, submitted


def with_long_prompt(server: Server, counts: Counts, model: Path, kv_tokens: int, baseline_p50: float | None) -> dict:
    """8 streams run; after a few tokens one request with a long prompt arrives. The running streams'
    inter-token gaps that overlap its prefill (from its submission to its first token), pooled."""
    text = long_prompt_text(model, counts.long_prompt)
    room = max(64, min(kv_tokens - 64, 4096))
    asyncio.run(concurrent(server.url, 8, chat_body(4)))  # warm-up (this server may be fresh)
    runs, long, submitted = asyncio.run(_with_long_prompt(server.url, text, room, running=8, before=3, after=2,
                                                          timeout=1800))
    first = long.times[0]
    during = [end - start for run in runs for start, end in run.gaps() if end > submitted and start < first]
    before = [end - start for run in runs for start, end in run.gaps() if end <= submitted]
    result = {"prefill_s": first - submitted, "prompt_tokens": long.prompt_tokens, "count": len(during),
              "p50": percentile(during, 50), "p99": percentile(during, 99), "max": max(during),
              "p50_before": percentile(before, 50) if before else float("nan")}
    if baseline_p50:
        result["ratio"] = result["p99"] / baseline_p50
    return result


COMPARE_PROMPTS = [
    "Write a haiku about the sea.", "What is the capital of France?", "Explain recursion to a child.",
    "List three prime numbers.", "Translate 'good morning' into Spanish.", "Describe a cat in one sentence.",
    "Why is the sky blue?", "Give me a word that rhymes with light.",
]


def greedy_outputs(server: Server, tokens: int) -> list[list[str]]:
    """The tokens (logprobs entries) of greedy answers to the fixed prompts, one request at a time."""
    async def run():
        outputs = []
        async with client() as http:
            for prompt in COMPARE_PROMPTS:
                body = chat_body(tokens, prompt=prompt, stream=False, logprobs=True,
                                 chat_template_kwargs={"enable_thinking": False})
                reply = await complete(http, server.url, body)
                entries = ((reply["choices"][0].get("logprobs") or {}).get("content")) or []
                outputs.append([entry["token"] for entry in entries])
        return outputs

    return asyncio.run(run())


def agreement(reference: list[list[str]], other: list[list[str]]) -> dict:
    """Tokens equal before the first difference, per prompt, averaged; and how many prompts match whole."""
    prefixes = []
    for a, b in zip(reference, other):
        same = 0
        while same < min(len(a), len(b)) and a[same] == b[same]:
            same += 1
        prefixes.append(same)
    return {"mean_prefix": fmean(prefixes), "identical": sum(a == b for a, b in zip(reference, other)),
            "prompts": len(prefixes), "tokens": max((len(a) for a in reference), default=0)}


# ---- kept from the earlier bench -------------------------------------------------------------------

# The constraint's cost: an answer that must match this schema. The bench model never writes JSON, so
# its choice is refused at every step and the full mask is built every step: the worst case.
SCHEMA_FORMAT = {"type": "json_schema", "json_schema": {"name": "story", "schema": {
    "type": "object", "properties": {"story": {"type": "string"}}, "required": ["story"]}}}
NO_THINKING = {"chat_template_kwargs": {"enable_thinking": False}}  # the answer (constrained) starts at once


def constraint_cost(server: Server, tokens: int, rounds: int) -> dict:
    """8 streams with a JSON schema against 8 without, interleaved, each the mean of `rounds`."""
    asyncio.run(concurrent(server.url, 1, chat_body(4, response_format=SCHEMA_FORMAT, **NO_THINKING)))
    plain, schema = [], []
    for _ in range(rounds):
        plain.append(asyncio.run(concurrent(server.url, 8, chat_body(tokens, **NO_THINKING)))[0])
        schema.append(asyncio.run(concurrent(server.url, 8, chat_body(tokens, response_format=SCHEMA_FORMAT,
                                                                      **NO_THINKING)))[0])
    return {"plain": fmean(plain), "schema": fmean(schema)}


def memory_growth(server: Server, requests: int) -> list[float]:
    """RSS (MiB) after a warm-up of 100 requests, then after each of two rounds of `requests` short
    requests (16 at a time): a leak grows in both rounds; allocator warm-up only in the first."""
    body = chat_body(4, stream=False)

    async def run(count: int) -> None:
        gate = asyncio.Semaphore(16)
        async with client() as http:
            async def one():
                async with gate:
                    await complete(http, server.url, body)
            await asyncio.gather(*(one() for _ in range(count)))

    asyncio.run(run(100))
    readings = [rss_kib(server.proc.pid) / 1024]
    for _ in range(2):
        asyncio.run(run(requests))
        readings.append(rss_kib(server.proc.pid) / 1024)
    return readings
