"""The markdown report: figures side by side, the goals of issue 10 marked met or not met."""

from __future__ import annotations

import json
import math
import os
import platform
import time

from .server import Server

CHECKPOINT_NAMES = {"bench": "bench model", "realsize": "real-size"}
DTYPE_NAMES = {"float32": "fp32", "bfloat16": "bf16"}


def describe_server(server: Server) -> dict:
    return {"label": server.label, "settings": server.settings, "health": server.health,
            "load_s": round(server.load_seconds, 1), "peak_rss_mib": round(server.peak_rss_mib())}


def _ok(value) -> bool:
    return isinstance(value, (int, float)) and not math.isnan(value)


def _get(data, *keys):
    for key in keys:
        if not isinstance(data, dict) or key not in data:
            return None
        data = data[key]
    return data


def fmt(value, spec: str = ".1f") -> str:
    return format(value, spec) if _ok(value) else "n/a"


def _pair(a, b, spec: str = ".1f", sep: str = " / ") -> str:
    return f"{fmt(a, spec)}{sep}{fmt(b, spec)}" if _ok(a) or _ok(b) else "n/a"


def _ratio(num, den) -> float | None:
    return num / den if _ok(num) and _ok(den) and den else None


class Columns:
    """The (checkpoint, dtype) columns present in the results."""

    def __init__(self, results: dict):
        self.cols = []
        for name, ckpt in results["checkpoints"].items():
            if isinstance(ckpt, dict):
                for dtype in ckpt["runs"]:
                    self.cols.append((name, dtype, ckpt))

    def header(self) -> list[str]:
        names = [f"{CHECKPOINT_NAMES[n]} {DTYPE_NAMES.get(d, d)}" for n, d, _ in self.cols]
        return ["| measure | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]

    def row(self, label: str, cell) -> str:
        return f"| {label} | " + " | ".join(cell(n, d, c, c["runs"][d]) for n, d, c in self.cols) + " |"


def _speed_table(results: dict) -> list[str]:
    cols = Columns(results)
    if not cols.cols:
        return ["No checkpoint measured."]

    def single(n, d, c, r):
        value = _get(r, "server", "single")
        ratio = _ratio(value, c["floor"].get(d))
        return f"{fmt(value)} ({fmt(ratio, '.2f')} of floor)" if _ok(value) else "n/a"

    def streams16(n, d, c, r):
        value = _get(r, "server", "streams16")
        ratio = _ratio(value, _get(r, "raw", "batch16"))
        return f"{fmt(value)} ({fmt(ratio, '.2f')}x raw)" if _ok(value) else "n/a"

    def long_prompt(n, d, c, r):
        lp = r.get("long_prompt")
        if not isinstance(lp, dict):
            return "n/a"
        return (f"{fmt(lp['p50'] * 1e3, '.0f')} / {fmt(lp['p99'] * 1e3, '.0f')} / {fmt(lp['max'] * 1e3, '.0f')} "
                f"({lp['count']} gaps; prefill {fmt(lp['prefill_s'], '.1f')} s, {lp['prompt_tokens']} tokens)")

    def per_token(n, d, c, r):
        lg = r.get("long")
        if not isinstance(lg, dict):
            return "n/a"
        return f"{fmt(lg['early_ms'])} / {fmt(lg['late_ms'])} ({fmt(lg['ratio'], '.2f')}x)"

    def ms(v):
        return v * 1e3 if _ok(v) else None

    lines = cols.header() + [
        cols.row("text weights read per token, GB", lambda n, d, c, r: fmt(c["bytes"][d] / 1e9, ".2f")),
        cols.row("floor, tokens/s (best read rate / bytes)", lambda n, d, c, r: fmt(c["floor"].get(d))),
        cols.row("raw `generate`, single stream, tokens/s", lambda n, d, c, r: fmt(_get(r, "raw", "single"))),
        cols.row("this server, single stream, tokens/s", single),
        cols.row("raw `generate`, batch 16, tokens/s", lambda n, d, c, r: fmt(_get(r, "raw", "batch16"))),
        cols.row("this server, 8 streams, tokens/s", lambda n, d, c, r: fmt(_get(r, "server", "streams8"))),
        cols.row("this server, 16 streams, tokens/s", streams16),
        cols.row("time to first token, raw / server (1 stream), s",
                 lambda n, d, c, r: _pair(_get(r, "raw", "ttft"), _get(r, "server", "ttft"), ".3f")),
        cols.row("inter-token p50 / p99 at 8 streams, ms",
                 lambda n, d, c, r: _pair(ms(_get(r, "server", "itl_p50")), ms(_get(r, "server", "itl_p99")), ".0f")),
        cols.row("inter-token p50 / p99 / max at 8 streams while a long prompt arrives, ms", long_prompt),
        cols.row("per-token time early / late in one long stream, ms", per_token),
        cols.row("server peak RSS, MiB", lambda n, d, c, r: " / ".join(
            str(s.get("peak_rss_mib", "n/a")) for s in r.get("servers", [])) or "n/a"),
    ]
    return lines


def _int8_table(results: dict) -> list[str]:
    ckpts = [(n, c) for n, c in results["checkpoints"].items() if isinstance(c, dict) and "int8" in c]
    if not ckpts:
        return []
    lines = ["| measure | " + " | ".join(CHECKPOINT_NAMES[n] for n, _ in ckpts) + " |", "|---" * (len(ckpts) + 1) + "|"]

    def row(label, cell):
        lines.append(f"| {label} | " + " | ".join(cell(n, c) for n, c in ckpts) + " |")

    def single(n, c):
        value = _get(c, "int8", "single", "single")
        bf16 = _get(c, "runs", "bfloat16", "server", "single")
        return f"{fmt(value)} ({fmt(_ratio(value, bf16), '.2f')}x bf16)" if _ok(value) else "n/a"

    def agreement(n, c):
        a = _get(c, "int8", "agreement")
        if not isinstance(a, dict):
            return "n/a"
        return f"{fmt(a['mean_prefix'])} of {a['tokens']} tokens; {a['identical']}/{a['prompts']} prompts identical"

    row("int8 floor, tokens/s", lambda n, c: fmt(c["floor"].get("int8")))
    row("this server, single stream, tokens/s", single)
    row("greedy agreement with bf16 (mean tokens before the first difference)", agreement)
    notes = [f"- {CHECKPOINT_NAMES[n]}: {c['int8']['note']}" for n, c in ckpts if c["int8"].get("note")]
    return lines + ([""] + notes if notes else [])


def _stores_table(results: dict, tokens: int) -> list[str]:
    stores = results.get("persistence")
    if not isinstance(stores, dict):
        return [f"Session stores: {stores}"]
    memory = stores.get("memory")
    lines = [f"16 streams of {tokens} tokens on a tiny model, events/s (median of rounds):", "",
             "| store | events/s | ratio to memory |", "|---|---|---|"]
    for name in ("memory", "sqlite", "redis"):
        value = stores.get(name, "not measured")
        if _ok(value):
            lines.append(f"| {name} | {value:.0f} | {fmt(_ratio(value, memory), '.2f')} |")
        else:
            lines.append(f"| {name} | {value} | |")
    return lines


def goals(results: dict) -> list[tuple[str, str, bool | None]]:
    """(goal, measured, met) for each goal of issue 10 that this run could judge."""
    out = []
    ck = results["checkpoints"]

    def add(goal, measured_value, target, compare=">=", spec=".2f"):
        if not _ok(measured_value):
            out.append((goal, "n/a", None))
            return
        met = measured_value >= target if compare == ">=" else measured_value <= target
        out.append((goal, format(measured_value, spec), met))

    for name, minimum in (("bench", 0.6), ("realsize", 0.75)):
        c = ck.get(name)
        if isinstance(c, dict) and "bfloat16" in c["runs"]:
            value = _ratio(_get(c, "runs", "bfloat16", "server", "single"), c["floor"].get("bfloat16"))
            add(f"{CHECKPOINT_NAMES[name]}: single stream bf16 >= {minimum} of the floor", value, minimum)
    c = ck.get("realsize")
    if isinstance(c, dict) and "int8" in c:
        add("real-size: int8 single stream >= 1.5x bf16",
            _ratio(_get(c, "int8", "single", "single"), _get(c, "runs", "bfloat16", "server", "single")), 1.5)
    for name, c in ck.items():
        if isinstance(c, dict) and "bfloat16" in c["runs"]:
            r = c["runs"]["bfloat16"]
            add(f"{CHECKPOINT_NAMES[name]}: 16 streams bf16 >= 2x raw `generate` batch 16",
                _ratio(_get(r, "server", "streams16"), _get(r, "raw", "batch16")), 2.0)
    for name, c in ck.items():
        if not isinstance(c, dict):
            continue
        counts = c["counts"]
        for dtype, r in c["runs"].items():
            label = f"{CHECKPOINT_NAMES[name]} {DTYPE_NAMES.get(dtype, dtype)}"
            add(f"{label}: per-token time at {counts['long'] - counts['window'] + 1}-{counts['long']} "
                f"<= 1.25x that at 1-{counts['window']}", _get(r, "long", "ratio"), 1.25, "<=")
            add(f"{label}: inter-token p99 while a {counts['long_prompt']}-token prompt arrives <= 3x p50 without",
                _get(r, "long_prompt", "ratio"), 3.0, "<=")
    stores = results.get("persistence")
    if isinstance(stores, dict):
        add("16 persisted streams (SQLite) >= 0.9 of in-memory", _ratio(stores.get("sqlite"), stores.get("memory")),
            0.9)
    memory = _get(ck, "bench", "memory")
    if isinstance(memory, list) and len(memory) == 3:
        growth = memory[2] - memory[1]
        flat = growth <= max(32.0, 0.02 * memory[1])
        out.append(("resident memory flat over the second half of the requests (growth <= max(32 MiB, 2%))",
                    f"{growth:+.0f} MiB", flat))
    return out


def _unavailable(results: dict) -> list[str]:
    notes = []

    def walk(prefix, data):
        if isinstance(data, str) and data.startswith("not available"):
            notes.append(f"- {prefix}: {data}")
        elif isinstance(data, dict):
            for key, value in data.items():
                if key not in ("health", "settings"):
                    walk(f"{prefix} {key}".strip(), value)

    walk("", {k: v for k, v in results.items() if k != "phases"})
    return notes


def render(results: dict) -> str:
    import torch
    import transformers

    floors = results.get("floors")
    quick = " (BENCH_QUICK=1: smoke run, figures not meaningful)" if results.get("quick") else ""
    lines = [f"`make bench` on {time.strftime('%Y-%m-%d %H:%M')}{quick}, {results['total_seconds'] / 60:.0f} min.",
             (f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
              f"({torch.get_num_threads()} threads), transformers {transformers.__version__}. Greedy decoding."), ""]
    if isinstance(floors, dict):
        rates = "; ".join(f"{k}: {v:.1f} GB/s" for k, v in floors["rates"].items())
        lines += [(f"Memory read rates measured in this run: {rates}. Floor = best of the fp32 ones "
                   f"({floors['best']:.1f} GB/s) / text-weight bytes per token (decoder layers, final norm, "
                   "lm_head; tied embeddings counted once; KV cache reads not counted; int8: 1 byte per linear "
                   "weight of the decoder, lm_head and norms in bf16)."), ""]
    else:
        lines += [f"Memory read rates: {floors}", ""]
    lines += ["### Decode speed", ""] + _speed_table(results) + [""]
    for name, c in results["checkpoints"].items():
        if isinstance(c, dict):
            counts = c["counts"]
            lines.append(f"- {CHECKPOINT_NAMES[name]}: {counts['streams']} tokens per stream (raw and server, "
                         f"1, 8 and 16 streams); long stream {counts['long']} tokens (per-token time at positions "
                         f"1-{counts['window']} vs {counts['long'] - counts['window'] + 1}-{counts['long']}); "
                         f"long prompt {counts['long_prompt']} tokens arriving after 8 streams made 3 tokens "
                         f"(gaps overlapping its prefill); int8 comparison 8 prompts x {counts['compare']} tokens.")
        else:
            lines.append(f"- {name}: {c}")
    lines += [("- Single stream: decode tokens/s from the first to the last chunk (time to first token apart); "
               "8 and 16 streams and raw batch 16: all tokens / time from the first request to the last token."),
              "- Inter-token gaps come from the arrival times of stream chunks (one per token), per stream, pooled.",
              ""]
    int8 = _int8_table(results)
    if int8:
        lines += ["### int8 weight-only (`QUANTIZATION=int8`, bf16 base)", ""] + int8 + [""]
    tokens = results.get("persistence_tokens") or ""
    lines += ["### Session stores", ""] + _stores_table(results, tokens) + [""]
    lines += ["### Goals (issue 10)", "", "| goal | measured | met |", "|---|---|---|"]
    for goal, measured, met in goals(results):
        lines.append(f"| {goal} | {measured} | {'met' if met else 'not met' if met is False else 'n/a'} |")
    lines += [""] + _kept(results)
    servers = _servers(results)
    if servers:
        lines += ["", "### Servers (settings the bench set; /health as reported)", ""] + servers
    notes = _unavailable(results)
    if notes:
        lines += ["", "### Not available in this run", ""] + notes
    phases = ", ".join(f"{k} {v / 60:.1f} min" for k, v in results.get("phases", {}).items())
    lines += ["", f"Phases: {phases}."]
    return "\n".join(lines)


def _kept(results: dict) -> list[str]:
    bench = results["checkpoints"].get("bench")
    lines = ["### Other measures (bench model, fp32 server)", "", "| measure | value | target |", "|---|---|---|"]
    if isinstance(bench, dict):
        cost = bench.get("constraint")
        if isinstance(cost, dict):
            lines.append(f"| 8 streams without / with a JSON schema, tokens/s | {cost['plain']:.1f} / "
                         f"{cost['schema']:.1f} ({cost['schema'] / cost['plain']:.2f}) | >= 0.90 |")
        memory = bench.get("memory")
        if isinstance(memory, list):
            rss = " / ".join(f"{v:.0f}" for v in memory)
            requests = results.get("memory_requests", "")
            lines.append(f"| RSS after warm-up / +{requests} / +{2 * requests if requests else ''} requests, MiB "
                         f"| {rss} | flat |")
    peer = results.get("peer")
    ours8 = _get(bench, "runs", "float32", "server", "streams8") if isinstance(bench, dict) else None
    if isinstance(peer, dict):
        peer8 = peer.get(8) or peer.get("8")
        lines.append(f"| `transformers serve`, 1 / 8 streams, tokens/s (checkpoint dtype) | "
                     f"{fmt(peer.get(1) or peer.get('1'))} / {fmt(peer8)} | ours at 8 (fp32): "
                     f"{fmt(_ratio(ours8, peer8))}{'x' if _ratio(ours8, peer8) else ''} |")
    else:
        lines.append(f"| `transformers serve` | {peer} | |")
    return lines


def _servers(results: dict) -> list[str]:
    lines = []
    for c in results["checkpoints"].values():
        if not isinstance(c, dict):
            continue
        described = [s for r in c["runs"].values() for s in r.get("servers", [])]
        if isinstance(c.get("int8"), dict) and isinstance(c["int8"].get("server"), dict):
            described.append(c["int8"]["server"])
        for s in described:
            if "error" in s:
                lines.append(f"- `{s['label']}`: {s['error']}")
                continue
            settings = ", ".join(f"{k}={v}" for k, v in s["settings"].items() if k not in ("DEVICE_MAP",))
            lines.append(f"- `{s['label']}` ({settings}; ready in {s['load_s']} s): `{_health(s['health'])}`")
    return lines


def _health(health: dict) -> str:
    return json.dumps({k: v for k, v in health.items() if k not in ("ok", "modelId")}, separators=(",", ":"))
