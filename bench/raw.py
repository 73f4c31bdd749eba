"""Raw `generate` (the reference), run in a child process so that its model's memory is freed after.

`python -m bench.raw PATH DTYPE TOKENS` prints one JSON line:
  single    decode tokens/s of one greedy stream: (TOKENS - 1) / (last token - first token)
  ttft      seconds from calling `generate` to the first token (prompt as the server's single stream)
  batch16   aggregate tokens/s of `generate` on 16 identical prompts, TOKENS each, prefill included
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from .plan import ROOT

PROMPT = "Benchmark prompt: tell me a long story."


class TokenTimes:
    """A `generate` streamer that only records when each new token arrives (the prompt comes first)."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def measure(path: str, dtype: str, tokens: int) -> dict:
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(path)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=getattr(torch, dtype)).eval()
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": PROMPT}]}],
                                         tokenize=False, add_generation_prompt=True)
    greedy = {"do_sample": False, "max_new_tokens": tokens, "min_new_tokens": tokens}
    result = {"threads": torch.get_num_threads()}
    with torch.inference_mode():
        one = processor(text=[text], return_tensors="pt")
        model.generate(**one, do_sample=False, max_new_tokens=4)  # warm-up
        streamer = TokenTimes()
        start = time.perf_counter()
        model.generate(**one, streamer=streamer, **greedy)
        first, last = streamer.times[1], streamer.times[-1]
        result["single"] = (len(streamer.times) - 2) / (last - first)
        result["ttft"] = first - start
        batch = processor(text=[text] * 16, return_tensors="pt")
        model.generate(**batch, do_sample=False, max_new_tokens=2)  # warm-up at this batch size
        start = time.perf_counter()
        out = model.generate(**batch, **greedy)
        result["batch16"] = 16 * (out.shape[1] - batch["input_ids"].shape[1]) / (time.perf_counter() - start)
    return result


def run(path: Path, dtype: str, tokens: int, log: Path) -> dict:
    """Runs `measure` in a child process; raises with the log's tail when it fails."""
    with open(log, "w") as out:
        proc = subprocess.run([sys.executable, "-m", "bench.raw", str(path), dtype, str(tokens)], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=out, text=True, timeout=3600, check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = log.read_text()[-300:].strip().splitlines()
        raise RuntimeError(f"raw generate exited {proc.returncode}: {tail[-1] if tail else 'no output'}")
    return json.loads(lines[-1])


if __name__ == "__main__":
    print(json.dumps(measure(sys.argv[1], sys.argv[2], int(sys.argv[3]))), flush=True)
