"""`make bench`: this server against raw batched `generate` on the same locally built checkpoint.

Builds (once) a Qwen3-VL checkpoint whose text model has about 140M parameters and designed weights
that never emit the end token, then measures in one run:
  ceiling  in-process `model.generate` on batches of 1, 8 and 16 identical prompts (greedy)
  server   `python main.py` on the same checkpoint: 1, 8 and 16 concurrent greedy streams, and 8
           streams with a JSON schema (constrained decoding) against 8 without
  memory   the server's peak RSS, and its RSS across two rounds of 1000 short requests
  peer     `transformers serve` on the same checkpoint, when it can run here
and prints a table with ratios to the ceiling (also written to bench-results/latest.md).
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
CHECKPOINT = ROOT / ".cache" / "bench-checkpoint"
RESULTS = ROOT / "bench-results"
TOKENS = int(os.environ.get("BENCH_TOKENS", "64"))
PROMPT = "Benchmark prompt: tell me a long story."
CONCURRENCY = (1, 8, 16)


def build_checkpoint() -> Path:
    if not (CHECKPOINT / "config.json").exists():
        from qwenserve.checkpoints import build_vl_checkpoint

        build_vl_checkpoint(CHECKPOINT, endless=True, hidden=1024, layers=11, heads=16, kv_heads=8, head_dim=64,
                            intermediate=3072)
    return CHECKPOINT


def raw_generate(path: Path) -> dict[int, float]:
    """Tokens/s of plain batched `generate` (the ceiling), and its time to first token for one prompt."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(path)
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": PROMPT}]}],
                                         tokenize=False, add_generation_prompt=True)
    results = {}
    with torch.inference_mode():
        for batch in CONCURRENCY:
            inputs = processor(text=[text] * batch, return_tensors="pt")
            model.generate(**inputs, max_new_tokens=4, do_sample=False)  # warm-up
            start = time.perf_counter()
            model.generate(**inputs, max_new_tokens=TOKENS, min_new_tokens=TOKENS, do_sample=False)
            results[batch] = batch * TOKENS / (time.perf_counter() - start)
        inputs = processor(text=[text], return_tensors="pt")
        start = time.perf_counter()
        model.generate(**inputs, max_new_tokens=1, do_sample=False)
        results["ttft"] = time.perf_counter() - start
    del model
    gc.collect()
    return results


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, ours: bool = True, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("server exited during start-up")
        try:
            response = httpx.get(url + "/health", timeout=2)
            if response.status_code == 200 and (not ours or response.json().get("modelReady")):
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(url)


# The constraint's cost: an answer that must match this schema. The bench model never writes JSON, so
# its choice is refused at every step and the full mask is built every step: the worst case.
SCHEMA_FORMAT = {"type": "json_schema", "json_schema": {"name": "story", "schema": {
    "type": "object", "properties": {"story": {"type": "string"}}, "required": ["story"]}}}
NO_THINKING = {"chat_template_kwargs": {"enable_thinking": False}}  # the answer (constrained) starts at once


def one_stream(url: str, model: str, max_tokens: int = TOKENS, **extra) -> tuple[float, float, float, int]:
    """(start, first token time, end, completion tokens) of one greedy stream."""
    body = {"model": model, "messages": [{"role": "user", "content": PROMPT}], "stream": True,
            "max_tokens": max_tokens, "temperature": 0, "stream_options": {"include_usage": True}, **extra}
    start = time.perf_counter()
    first, tokens, chunks = None, 0, 0
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as response:
        for line in response.iter_lines():
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[5:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            delta = chunk["choices"][0]["delta"] if chunk.get("choices") else {}
            if delta.get("content") or delta.get("reasoning_content"):
                chunks += 1
                first = first or time.perf_counter()
    # Servers that send no usage chunk: one text chunk per token.
    return start, first or time.perf_counter(), time.perf_counter(), tokens or chunks


def concurrent_streams(url: str, model: str, concurrency: int, **extra) -> tuple[float, list]:
    """Aggregate tokens/s of `concurrency` streams started together, and the runs."""
    with ThreadPoolExecutor(concurrency) as pool:
        runs = list(pool.map(lambda _: one_stream(url, model, **extra), range(concurrency)))
    begin, end = min(r[0] for r in runs), max(r[2] for r in runs)
    return sum(r[3] for r in runs) / (end - begin), runs


def measure_streams(url: str, model: str) -> dict:
    one_stream(url, model, 4)  # warm-up
    results = {}
    for concurrency in CONCURRENCY:
        results[concurrency], runs = concurrent_streams(url, model, concurrency)
        if concurrency == 1:
            results["ttft"] = runs[0][1] - runs[0][0]
    return results


def constraint_cost(url: str, model: str, rounds: int = 2) -> dict:
    """8 streams with a JSON schema against 8 without, interleaved, each the mean of `rounds`."""
    one_stream(url, model, 4, response_format=SCHEMA_FORMAT, **NO_THINKING)  # compiles the grammar
    plain, schema = [], []
    for _ in range(rounds):
        plain.append(concurrent_streams(url, model, 8, **NO_THINKING)[0])
        schema.append(concurrent_streams(url, model, 8, response_format=SCHEMA_FORMAT, **NO_THINKING)[0])
    return {"plain": sum(plain) / rounds, "schema": sum(schema) / rounds}


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def memory_growth(url: str, pid: int, requests: int = 1000) -> list[int]:
    """RSS after a warm-up, then after each of two rounds of `requests` short requests (16 at a time):
    a leak grows in both rounds; allocator warm-up only in the first."""
    body = {"model": "m", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 4, "temperature": 0}

    def run(count):
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(lambda _: httpx.post(url + "/v1/chat/completions", json=body, timeout=600), range(count)))

    run(100)
    readings = [rss_kib(pid)]
    for _ in range(2):
        run(requests)
        readings.append(rss_kib(pid))
    return readings


def serve_ours(path: Path) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MODEL_REPO_ID": str(path), "PORT": str(port), "HOST": "127.0.0.1",
           "DEVICE_MAP": "cpu", "MAX_CONCURRENT_REQUESTS": "16", "MAX_QUEUED_REQUESTS": "64"}
    log = open(RESULTS / "server.log", "w")
    proc = subprocess.Popen([sys.executable, str(ROOT / "main.py")], env=env, cwd=RESULTS, stdout=log,
                            stderr=subprocess.STDOUT)
    try:
        wait_ready(url, proc)
        results = measure_streams(url, "bench")
        results["constraint"] = constraint_cost(url, "bench")
        results["peak_rss_mib"] = rss_kib(proc.pid, "VmHWM") / 1024
        results["rss_mib"] = [kib / 1024 for kib in memory_growth(url, proc.pid)]
        return results
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def serve_transformers(path: Path) -> dict | str:
    """`transformers serve` on the same checkpoint, if this install can run it."""
    cli = shutil.which("transformers", path=str(Path(sys.executable).parent)) or shutil.which("transformers")
    if not cli:
        return "not installed"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(RESULTS / "transformers-serve.log", "w")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(RESULTS / "hf-cache")}
    (RESULTS / "hf-cache").mkdir(exist_ok=True)
    proc = subprocess.Popen([cli, "serve", str(path), "--port", str(port), "--host", "127.0.0.1", "--device", "cpu"],
                            env=env, cwd=RESULTS, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_ready(url, proc, ours=False, timeout=120)
        results = {}
        one_stream(url, str(path), 4)
        for concurrency in (1, 8):
            with ThreadPoolExecutor(concurrency) as pool:
                runs = list(pool.map(lambda _: one_stream(url, str(path)), range(concurrency)))
            begin, end = min(r[0] for r in runs), max(r[2] for r in runs)
            tokens = sum(r[3] for r in runs)
            results[concurrency] = tokens / (end - begin)
        return results
    except Exception as exc:  # reported in the table, never fatal to the benchmark
        return f"could not run here ({type(exc).__name__}; see bench-results/transformers-serve.log)"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def table(raw: dict, ours: dict, peer) -> str:
    import platform

    import torch

    lines = [f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
             f"({torch.get_num_threads()} threads); {TOKENS} tokens per stream, greedy.", "",
             "| measure | raw generate (ceiling) | this server | ratio | target |",
             "| --- | --- | --- | --- | --- |"]
    targets = {1: ">= 0.9", 8: ">= 0.7", 16: "above 8 streams"}
    for n in CONCURRENCY:
        label = "single stream tokens/s" if n == 1 else f"{n} streams, aggregate tokens/s"
        lines.append(f"| {label} | {raw[n]:.1f} | {ours[n]:.1f} | {ours[n] / raw[n]:.2f} | {targets[n]} |")
    lines.append(f"| time to first token, s | {raw['ttft']:.3f} | {ours['ttft']:.3f} | | |")
    lines.append(f"| peak RSS, MiB | | {ours['peak_rss_mib']:.0f} | | |")
    rss = " / ".join(f"{v:.0f}" for v in ours["rss_mib"])
    lines.append(f"| RSS after warm-up / +1000 / +2000 requests, MiB | | {rss} | | no growth |")
    cost = ours["constraint"]
    lines.append(f"| 8 streams without / with a JSON schema, tokens/s | | {cost['plain']:.1f} / {cost['schema']:.1f} | "
                 f"{cost['schema'] / cost['plain']:.2f} | >= 0.90 |")
    if isinstance(peer, dict):
        lines.append(f"| `transformers serve`, 1 / 8 streams tokens/s | | {peer[1]:.1f} / {peer[8]:.1f} | "
                     f"ours at 8: {ours[8] / peer[8]:.1f}x | |")
    else:
        lines.append(f"| `transformers serve` | | {peer} | | |")
    return "\n".join(lines)


def main() -> None:
    RESULTS.mkdir(exist_ok=True)
    path = build_checkpoint()
    print(f"checkpoint: {path}", flush=True)
    raw = raw_generate(path)
    print(f"raw generate: {raw}", flush=True)
    ours = serve_ours(path)
    print(f"server: {ours}", flush=True)
    peer = serve_transformers(path) if os.environ.get("BENCH_SKIP_PEER") != "1" else "skipped"
    report = table(raw, ours, peer)
    (RESULTS / "latest.md").write_text(report + "\n")
    print("\n" + report)


if __name__ == "__main__":
    main()
