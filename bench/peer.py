"""`transformers serve` on the same checkpoint (the closest peer on our stack), when it can run here."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
from pathlib import Path

from .plan import RESULTS
from .server import chat_body, concurrent, free_port, stop, wait_ready


def transformers_serve(path: Path, tokens: int) -> dict | str:
    cli = shutil.which("transformers", path=str(Path(sys.executable).parent)) or shutil.which("transformers")
    if not cli:
        return "not installed"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = RESULTS / "transformers-serve.log"
    (RESULTS / "hf-cache").mkdir(exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(RESULTS / "hf-cache")}
    with open(log, "w") as out:
        proc = subprocess.Popen([cli, "serve", str(path), "--port", str(port), "--host", "127.0.0.1",
                                 "--device", "cpu"], env=env, cwd=RESULTS, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_ready(url, proc, log, timeout=120, ours=False)
        body = {**chat_body(tokens), "model": str(path)}
        asyncio.run(concurrent(url, 1, {**body, "max_tokens": 4}))
        return {n: asyncio.run(concurrent(url, n, body))[0] for n in (1, 8)}
    except Exception as exc:  # noqa: BLE001 - reported in the table, never fatal to the benchmark
        return f"could not run here ({type(exc).__name__}; see bench-results/transformers-serve.log)"
    finally:
        stop(proc)
