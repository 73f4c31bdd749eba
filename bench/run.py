"""`make bench`: decode speed against the bandwidth floor, raw `generate` and the goals of issue 10.

One run, one model in memory at a time, in this order:
  floors       the best memory read rate now (fp32 sum, fp32 matrix-vector), and per checkpoint the
               text-weight bytes a decode step reads in fp32, bf16 and int8 -> floor tokens/s
  bench model  (designed, 140M text parameters) and real-size (Qwen3-VL-2B shaped, random bf16),
               each in fp32 and bf16: raw `generate` (single, batch 16), this server (single, 8 and
               16 streams, time to first token, inter-token p50/p99 at 8 streams, the same while a
               4,000-token prompt arrives, per-token time early vs late in one long stream); then
               QUANTIZATION=int8 (single stream, greedy outputs against bf16 on 8 fixed prompts)
  kept         on the bench model in fp32: the JSON-schema constraint's cost, RSS over 2,000
               requests; `transformers serve` on the same checkpoint
  stores       16 streams on a tiny model: in memory, SQLite, Redis (events/s)
Prints every figure and writes bench-results/latest.md (the README copies it) and latest.json.
Knobs (BENCH_QUICK=1, BENCH_SKIP_REALSIZE=1, ...): see bench/plan.py.
"""

from __future__ import annotations

import json
import time
import traceback
from dataclasses import asdict
from pathlib import Path

from . import checkpoints, floors, measures, persistence, plan, raw, report
from .peer import transformers_serve
from .server import Unavailable, serving


def guarded(label: str, fn, *args, **kwargs):
    """fn's result, or "not available (reason)" when it fails: one failing measure never ends the bench."""
    start = time.monotonic()
    try:
        value = fn(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        if not isinstance(exc, Unavailable):
            reason = f"{type(exc).__name__}: {reason}"
            traceback.print_exc()
        value = f"not available ({reason})"
    if isinstance(value, dict):
        shown = {k: _short(v) for k, v in value.items()}
    elif isinstance(value, list):
        shown = f"{len(value)} items"
    else:
        shown = value
    print(f"  {label} ({time.monotonic() - start:.0f}s): {shown}", flush=True)
    return value


def _short(value):
    return round(value, 4) if isinstance(value, float) else value


def mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def server_plans(path: Path, dtype: str, params: int, counts: plan.Counts) -> list[dict]:
    """One server with KV_CACHE_TOKENS per slot for every measure when the KV cache fits in memory;
    otherwise a 16-slot server with a smaller cache for the throughput measures and a 9-slot one for
    the long prompt (8 running streams + 1). Each plan: {label, settings, measures}."""
    per_token = checkpoints.kv_bytes_per_token(path, dtype)
    weights = params * (4 if dtype == "float32" else 2)
    budget = int(mem_available() * 0.9) - weights - (2 << 30)
    tokens = plan.KV_CACHE_TOKENS

    def fit(slots: int) -> int:
        return min(tokens, max(0, budget // (slots * per_token)) // 256 * 256)

    both = {"main", "long_prompt"}
    if fit(plan.MAX_CONCURRENT) >= tokens:
        return [{"settings": {"KV_CACHE_TOKENS": str(tokens)}, "measures": both}]
    plans = [{"settings": {"KV_CACHE_TOKENS": str(fit(plan.MAX_CONCURRENT))}, "measures": {"main"}}]
    if fit(9) >= counts.long_prompt + 64:
        plans.append({"settings": {"KV_CACHE_TOKENS": str(fit(9)), "MAX_CONCURRENT_REQUESTS": "9"},
                      "measures": {"long_prompt"}})
    print(f"  memory: a {tokens}-token KV cache for 16 slots does not fit beside the weights; "
          f"servers: {[p['settings'] for p in plans]}", flush=True)
    return plans


def measure_dtype(name: str, path: Path, dtype: str, counts: plan.Counts, params: int, ckpt: dict) -> dict:
    run: dict = {"servers": []}
    run["raw"] = guarded(f"{name} {dtype} raw generate", raw.run, path, dtype, counts.streams,
                         plan.RESULTS / f"raw-{name}-{dtype}.log")
    for index, server_plan in enumerate(server_plans(path, dtype, params, counts)):
        label = f"{name}-{dtype}" + (f"-{index + 1}" if index else "")
        wanted = server_plan["measures"]
        kv_tokens = int(server_plan["settings"]["KV_CACHE_TOKENS"])
        try:
            with serving(label, path, TORCH_DTYPE=dtype, **server_plan["settings"]) as server:
                if "main" in wanted:
                    run["server"] = guarded(f"{label} streams", measures.throughput, server, counts)
                    run["long"] = guarded(f"{label} long stream", measures.long_stream, server, counts)
                    if dtype == "bfloat16":
                        ckpt["bf16_outputs"] = guarded(f"{label} greedy outputs", measures.greedy_outputs, server,
                                                       counts.compare)
                    if name == "bench" and dtype == "float32":
                        ckpt["constraint"] = guarded(f"{label} constraint cost", measures.constraint_cost, server,
                                                     counts.streams, plan.CONSTRAINT_ROUNDS)
                        ckpt["memory"] = guarded(f"{label} RSS over requests", measures.memory_growth, server,
                                                 plan.MEMORY_REQUESTS)
                if "long_prompt" in wanted:
                    baseline = run.get("server", {}).get("itl_p50") if isinstance(run.get("server"), dict) else None
                    run["long_prompt"] = guarded(f"{label} long prompt", measures.with_long_prompt, server, counts,
                                                 path, kv_tokens, baseline)
                run["servers"].append(report.describe_server(server))
        except Unavailable as exc:
            reason = f"not available ({exc})"
            print(f"  server {label}: {reason}", flush=True)
            run["servers"].append({"label": label, "settings": server_plan["settings"], "error": reason})
            for key in (["server", "long"] if "main" in wanted else []) + (
                    ["long_prompt"] if "long_prompt" in wanted else []):
                run.setdefault(key, reason)
    return run


def measure_int8(name: str, path: Path, counts: plan.Counts, ckpt: dict) -> dict:
    result: dict = {}
    label = f"{name}-int8"
    try:
        with serving(label, path, TORCH_DTYPE="bfloat16", QUANTIZATION="int8",
                     KV_CACHE_TOKENS=str(min(plan.KV_CACHE_TOKENS, 1024))) as server:
            result["single"] = guarded(f"{label} single stream", measures.single_stream, server, counts.streams)
            outputs = guarded(f"{label} greedy outputs", measures.greedy_outputs, server, counts.compare)
            reference = ckpt.get("bf16_outputs")
            if isinstance(outputs, list) and isinstance(reference, list):
                result["agreement"] = measures.agreement(reference, outputs)
            else:
                result["agreement"] = outputs if isinstance(outputs, str) else "not available (no bf16 outputs)"
            print(f"  {label} agreement with bf16: {result['agreement']}", flush=True)
            result["server"] = report.describe_server(server)
            if "int8" not in json.dumps(server.health).lower():
                result["note"] = "/health does not mention int8: check the server log that it was applied"
    except Unavailable as exc:
        result = {"single": f"not available ({exc})", "agreement": f"not available ({exc})",
                  "server": {"label": label, "error": str(exc)}}
        print(f"  server {label}: not available ({exc})", flush=True)
    return result


def measure_checkpoint(name: str, path: Path, counts: plan.Counts, rates: dict) -> dict:
    sizes = floors.weight_bytes(path)
    ckpt = {"path": str(path), "counts": asdict(counts), "bytes": sizes,
            "floor": {dtype: rates["best"] * 1e9 / sizes[dtype] for dtype in ("float32", "bfloat16", "int8")}
            if isinstance(rates, dict) else {}, "runs": {}}
    print(f"{name}: {sizes['parameters'] / 1e6:.0f}M text parameters read per token; floors {ckpt['floor']}",
          flush=True)
    for dtype in plan.DTYPES:
        ckpt["runs"][dtype] = measure_dtype(name, path, dtype, counts, sizes["all_parameters"], ckpt)
    if "bfloat16" in plan.DTYPES:
        ckpt["int8"] = measure_int8(name, path, counts, ckpt)
    return ckpt


def main() -> None:
    plan.RESULTS.mkdir(exist_ok=True)
    began = time.monotonic()
    results: dict = {"quick": plan.QUICK, "dtypes": plan.DTYPES, "checkpoints": {}, "phases": {},
                     "memory_requests": plan.MEMORY_REQUESTS, "persistence_tokens": plan.PERSISTENCE_TOKENS}

    def phase(name: str, fn, *args):
        start = time.monotonic()
        print(f"== {name}", flush=True)
        value = fn(*args)
        results["phases"][name] = time.monotonic() - start
        print(f"== {name}: {results['phases'][name] / 60:.1f} min (total {(time.monotonic() - began) / 60:.1f})",
              flush=True)
        return value

    results["floors"] = phase("floors", guarded, "read rates", floors.read_rates)
    bench = phase("bench checkpoint", checkpoints.bench_checkpoint)
    results["checkpoints"]["bench"] = phase("bench model", measure_checkpoint, "bench", bench, plan.bench_counts(),
                                            results["floors"])
    if plan.flag("BENCH_SKIP_PEER"):
        results["peer"] = "skipped"
    else:
        results["peer"] = phase("transformers serve", guarded, "transformers serve", transformers_serve, bench,
                                plan.bench_counts().streams)
    if plan.flag("BENCH_SKIP_REALSIZE"):
        results["checkpoints"]["realsize"] = "skipped (BENCH_SKIP_REALSIZE=1)"
    else:
        realsize = phase("real-size checkpoint", guarded, "build", checkpoints.realsize_checkpoint)
        if isinstance(realsize, Path):
            results["checkpoints"]["realsize"] = phase("real-size model", measure_checkpoint, "realsize", realsize,
                                                       plan.realsize_counts(), results["floors"])
        else:
            results["checkpoints"]["realsize"] = realsize
    if plan.flag("BENCH_SKIP_PERSISTENCE"):
        results["persistence"] = "skipped"
    else:
        tiny = phase("tiny checkpoint", checkpoints.tiny_checkpoint)
        results["persistence"] = phase("session stores", guarded, "session stores", persistence.stores, tiny,
                                       plan.PERSISTENCE_TOKENS, plan.PERSISTENCE_ROUNDS)
    results["total_seconds"] = time.monotonic() - began
    text = report.render(results)
    (plan.RESULTS / "latest.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    (plan.RESULTS / "latest.md").write_text(text + "\n")
    print("\n" + text)


if __name__ == "__main__":
    main()
