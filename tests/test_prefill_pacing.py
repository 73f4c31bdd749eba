"""Prefill chunks sized by time while streams decode (PREFILL_STALL_FACTOR): the pacer's arithmetic,
the setting's bounds, and a long prompt arriving beside a running stream on a real engine (the order
of its passes and steps, never their timings: those are `make bench`'s)."""

from __future__ import annotations

import statistics
import time

import httpx
import pytest
from pydantic import ValidationError

from qwenserve import checkpoints
from qwenserve.app import create_app
from qwenserve.config import Settings
from qwenserve.engine import Engine
from qwenserve.engine.pacing import MIN_CHUNK_TOKENS, PrefillPacer

from .helpers import InProcessServer, RunningStream, chat_body

# ---- the pacer ------------------------------------------------------------------------------------


def measured(step: float = 0.010, token: float = 0.0001, chunk: int = 512, factor: float = 2.0) -> PrefillPacer:
    pacer = PrefillPacer(chunk, factor)
    pacer.observe_step(step)
    pacer.observe_prefill(512, token * 512)
    return pacer


def test_budget_is_the_stall_factor_times_a_step_in_tokens():
    assert measured().budget(paced=True) == 200  # 2 x 10 ms / 0.1 ms a token
    assert measured(factor=0.5).budget(paced=True) == 50


def test_budget_stays_between_the_minimum_and_the_chunk_setting():
    assert measured(token=0.01).budget(paced=True) == MIN_CHUNK_TOKENS == 16  # 2 tokens' worth
    assert measured(token=0.000001).budget(paced=True) == 512
    assert measured(token=0.000001, chunk=64).budget(paced=True) == 64


def test_nothing_decoding_takes_the_whole_chunk_setting():
    assert measured(token=0.01).budget(paced=False) == 512
    assert PrefillPacer(300, 2.0).budget(paced=False) == 300


def test_only_a_long_prompt_among_as_many_decoding_rows_is_paced():
    pacer = PrefillPacer(512, 2.0)
    assert pacer.paces(decoding_rows=8, waiting_rows=1, longest_prompt=4000)
    assert pacer.paces(decoding_rows=2, waiting_rows=2, longest_prompt=600)
    assert not pacer.paces(decoding_rows=2, waiting_rows=14, longest_prompt=4000)  # a burst joins at once
    assert not pacer.paces(decoding_rows=8, waiting_rows=1, longest_prompt=512)  # short: one pass
    assert not pacer.paces(decoding_rows=0, waiting_rows=1, longest_prompt=4000)  # nobody to protect


def test_factor_zero_turns_pacing_off():
    assert measured(token=0.01, factor=0).budget(paced=True) == 512
    assert PrefillPacer(512, 0).budget(paced=True) == 512


def test_decoding_before_any_measurement_probes_with_the_minimum():
    """A media row can decode before any text prefill was measured: one small pass, then the estimate."""
    pacer = PrefillPacer(512, 2.0)
    assert pacer.budget(paced=True) == MIN_CHUNK_TOKENS
    pacer.observe_step(0.010)
    assert pacer.budget(paced=True) == MIN_CHUNK_TOKENS
    pacer.observe_prefill(MIN_CHUNK_TOKENS, MIN_CHUNK_TOKENS * 0.0001)
    assert pacer.budget(paced=True) == 2 * MIN_CHUNK_TOKENS  # the estimate allows 200: doubling first


def test_a_dearer_prefill_is_followed_at_once_a_cheaper_one_gradually():
    pacer = measured()
    pacer.observe_prefill(100, 0.020)  # 0.2 ms a token: later chunks attend to more keys
    assert pacer.token_seconds == pytest.approx(0.0002)
    assert pacer.budget(paced=True) == 100
    pacer.observe_prefill(100, 0.010)  # back to 0.1 ms: half of the way
    assert pacer.token_seconds == pytest.approx(0.00015)


def test_paced_passes_grow_by_doubling_after_one_that_was_not_paced():
    """A cost measured on other passes (short prompts prefilled together) must not size one big pass."""
    pacer = PrefillPacer(512, 2.0)
    pacer.observe_step(1.0)
    pacer.observe_prefill(256, 0.0256, paced=False)  # 0.1 ms a token: the estimate allows 512
    sizes = []
    for _ in range(6):
        sizes.append(pacer.budget(paced=True))
        pacer.observe_prefill(sizes[-1], sizes[-1] * 0.0001)
    assert sizes == [16, 32, 64, 128, 256, 512]


def test_a_few_slow_steps_do_not_move_the_step_estimate_a_lasting_change_does():
    pacer = measured()
    for _ in range(4):
        pacer.observe_step(0.010)
    for _ in range(4):
        pacer.observe_step(0.050)  # a noisy neighbour
    assert pacer.step_seconds == pytest.approx(0.010)
    pacer.observe_step(0.050)  # the batch grew: followed after half the steps kept
    assert pacer.step_seconds == pytest.approx(0.050)


def simulate(prompt: int, step: float, fixed: float, per_token: float, per_key: float,
             factor: float = 2.0, chunk: int = 512) -> list[tuple[int, float]]:
    """A prompt prefilled beside decoding rows, with a pass costing `fixed` + tokens x (per_token +
    per_key x keys attended): the (chunk, seconds) of every pass. The pacer last saw a 512-token pass
    at the start of a prompt (the running rows' own prompts, prefilled while nothing decoded)."""
    pacer = PrefillPacer(chunk, factor)
    pacer.observe_prefill(512, fixed + 512 * (per_token + per_key * 256), paced=False)
    pacer.observe_step(step)
    passes, done = [], 0
    while done < prompt:
        tokens = min(pacer.budget(paced=True), prompt - done)
        seconds = fixed + tokens * (per_token + per_key * (done + tokens / 2))
        pacer.observe_prefill(tokens, seconds)
        pacer.observe_step(step)
        passes.append((tokens, seconds))
        done += tokens
    return passes


@pytest.mark.parametrize("fixed,per_token,per_key", [
    (0.002, 0.0030, 0.0),  # compute-bound: the bench model on this CPU (a 512-token chunk ~1.8 s)
    (0.002, 0.0020, 0.0000005),  # attention growing with the keys: 2 x the cost per token at 4,000
    (0.040, 0.0030, 0.0000005),  # a per-pass cost of 40% of a step
])
def test_a_long_prompt_stalls_the_streams_about_the_factor_times_a_step(fixed, per_token, per_key):
    """With a 100 ms step and the factor 2, every pass of a 4,000-token prompt costs about 200 ms
    (the first, sized from a pass at other sizes, up to a third more), where a 512-token pass costs
    1.5-3 s; and the prompt still progresses by at least MIN_CHUNK_TOKENS a pass."""
    passes = simulate(4000, step=0.100, fixed=fixed, per_token=per_token, per_key=per_key)
    assert sum(tokens for tokens, _ in passes) == 4000
    assert all(tokens >= MIN_CHUNK_TOKENS for tokens, _ in passes[:-1])
    assert passes[0][1] <= 0.200 * 1.35
    assert all(seconds <= 0.200 * 1.1 for _, seconds in passes[2:])
    assert statistics.median(seconds for _, seconds in passes) >= 0.200 * 0.8  # the budget is used


# ---- the setting ---------------------------------------------------------------------------------


def test_stall_factor_setting_default_and_bounds(monkeypatch):
    assert Settings(_env_file=None).prefill_stall_factor == 1.0
    assert Settings(_env_file=None, prefill_stall_factor=0).prefill_stall_factor == 0  # the limit: off
    with pytest.raises(ValidationError, match="prefill_stall_factor"):
        Settings(_env_file=None, prefill_stall_factor=-0.01)
    monkeypatch.setenv("PREFILL_STALL_FACTOR", "0.75")
    assert Settings(_env_file=None).prefill_stall_factor == 0.75
    monkeypatch.setenv("PREFILL_STALL_FACTOR", "-1")
    with pytest.raises(ValidationError):
        Settings(_env_file=None)  # the server refuses to start


# ---- a long prompt beside a running stream -------------------------------------------------------

LONG_PROMPT = " ".join(["tick tock tack"] * 500)  # ~1,500 tokens


@pytest.fixture(scope="module")
def wide_endless_ckpt(ckpt_dir):
    """The endless model with wider layers (512, MLP 2048): its steps and passes cost compute, not
    mostly Python as the default test model's (~3 ms a step), so machine noise weighs less."""
    return checkpoints.build_vl_checkpoint(ckpt_dir / "vl-endless-wide", endless=True, hidden=512,
                                           intermediate=2048, heads=8, kv_heads=4, head_dim=64)


@pytest.fixture
def paced_server(wide_endless_ckpt, monkeypatch):
    """An in-process engine whose prefill chunks are recorded in order: (time, rows x padded width,
    decode rows in the same pass: 0 for a pass of its own)."""
    chunks: list[tuple[float, int, int]] = []
    real_prefill, real_fold = Engine._prefill_logits, Engine._fold

    def prefill(self, group, width):
        logits = real_prefill(self, group, width)
        chunks.append((time.monotonic(), len(group) * width, 0))
        return logits

    def fold(self, batch, rows, group, width, paced):
        real_fold(self, batch, rows, group, width, paced)
        chunks.append((time.monotonic(), len(group) * width, len(rows)))

    monkeypatch.setattr(Engine, "_prefill_logits", prefill)
    monkeypatch.setattr(Engine, "_fold", fold)
    # Without pacing the prompt would go in three 512-token passes, each stalling the stream.
    settings = Settings(model_repo_id=str(wide_endless_ckpt), device_map="cpu", prefill_chunk_tokens=512,
                        kv_cache_tokens=4096, max_concurrent_requests=4, _env_file=None)
    server = InProcessServer(create_app(settings, Engine(settings)))
    yield server, chunks
    server.stop()


def test_a_long_prompt_arriving_is_cut_by_time_and_rides_along_the_streams_steps(paced_server):
    """A stream decodes; a ~1,500-token prompt arrives. Its prefill is cut into small chunks (the
    pacer's budget, not PREFILL_CHUNK_TOKENS), each folded into a decode step of the stream, whose
    client gets its tokens meanwhile. How long those passes take is `make bench`'s to measure (timed
    assertions fail on a shared machine); the pacer's arithmetic is tested above."""
    server, recorded = paced_server
    runner = RunningStream(server.url, "pacing-runner", max_tokens=4000, ready_after=60)  # cancelled
    try:
        assert runner.start()
        sent = time.monotonic()
        reply = httpx.post(server.url + "/v1/chat/completions", timeout=120,
                           json=chat_body(LONG_PROMPT, max_tokens=1, temperature=0)).json()
        answered = time.monotonic()
    finally:
        runner.stop()
    assert reply["usage"]["prompt_tokens"] > 1400
    during = [(at, size, rows) for at, size, rows in recorded if sent < at < answered]
    chunks = [size for _, size, _ in during]
    assert sum(chunks) >= reply["usage"]["prompt_tokens"] and len(chunks) >= 6, chunks
    assert statistics.median(chunks) <= 256, chunks  # against three 512-token passes without pacing
    assert all(rows == 1 for _, _, rows in during), during  # each with the stream's step
    # delivered meanwhile (read by a thread of this process, which shares the CPU with the server: some
    # may be read only after the reply)
    arrived = [at for at in runner.arrivals if during[0][0] < at < answered]
    assert len(arrived) >= len(chunks) // 2, (len(arrived), len(chunks))
