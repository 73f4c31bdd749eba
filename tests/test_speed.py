"""The fast paths stay exact: the slot KV cache, batched and chunked prefill, the bf16 and int8 kernels,
the compiled decode step, and seeded sampling that continues exactly from stored tokens. Speed itself
is measured by `make bench`, never asserted here."""

from __future__ import annotations

import asyncio
import logging
import threading
import time

import httpx
import pytest
import torch

from qwenserve.config import Settings
from qwenserve.engine import Engine
from qwenserve.engine import native
from qwenserve.engine.kernels import Int8Linear, PackedEmbedding, PackedLinear, RowLinear, prepare_linears
from qwenserve.sampling import SamplingParams, step_seed

from .helpers import RunningStream, chat_body, read_sse

PROMPTS = ["alpha beta", "gamma delta epsilon zeta", "eta", "theta iota kappa lambda mu nu xi omicron pi rho"]
LONG_PROMPT = " ".join(["tick tock tack"] * 100)


def greedy(server, content: str, max_tokens: int = 24) -> str:
    body = chat_body(content, max_tokens=max_tokens, temperature=0)
    reply = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=120).json()
    return reply["choices"][0]["message"]["content"]


def concurrently(server, contents: list[str], stagger: float = 0.0) -> list[str]:
    results = [None] * len(contents)

    def run(i):
        results[i] = greedy(server, contents[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(contents))]
    for thread in threads:
        thread.start()
        time.sleep(stagger)
    for thread in threads:
        thread.join()
    return results


@pytest.fixture(scope="module")
def fp32_server(server_factory_module, random_text_ckpt):
    return server_factory_module(random_text_ckpt, TORCH_DTYPE="float32")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_batched_greedy_equals_solo(server_factory, random_text_ckpt, fp32_server, dtype):
    """Random weights: every token depends on attention over the right slot, positions and mask."""
    server = fp32_server if dtype == "float32" else server_factory(random_text_ckpt, TORCH_DTYPE=dtype)
    solo = [greedy(server, p) for p in PROMPTS]
    assert len(set(solo)) == len(solo)  # the prompts lead to different texts
    assert concurrently(server, PROMPTS) == solo  # prefilled together, decoded together
    assert concurrently(server, PROMPTS * 2, stagger=0.05) == solo * 2  # joining and leaving mid-flight


def test_chunked_prefill_equals_one_pass(server_factory, random_text_ckpt, fp32_server):
    chunked = server_factory(random_text_ckpt, TORCH_DTYPE="float32", PREFILL_CHUNK_TOKENS=16)
    assert greedy(chunked, LONG_PROMPT) == greedy(fp32_server, LONG_PROMPT)
    assert concurrently(chunked, [LONG_PROMPT, PROMPTS[0]]) == [greedy(fp32_server, LONG_PROMPT),
                                                               greedy(fp32_server, PROMPTS[0])]


def test_running_stream_keeps_going_while_a_long_prompt_prefills(server_factory, endless_ckpt):
    """With 16-token chunks, a ~1,500-token prompt takes ~100 loop turns to prefill; a running stream
    gets a token in each of them (with one whole-prompt prefill it would get none meanwhile)."""
    server = server_factory(endless_ckpt, PREFILL_CHUNK_TOKENS=16)
    runner = RunningStream(server.url, "runner", max_tokens=20000, ready_after=5)
    assert runner.start()
    sent = time.monotonic()
    reply = httpx.post(server.url + "/v1/chat/completions", timeout=120,
                       json=chat_body(LONG_PROMPT * 5, max_tokens=1, temperature=0)).json()
    answered = time.monotonic()
    runner.stop()
    assert reply["usage"]["prompt_tokens"] > 1400
    assert sum(sent < t < answered for t in runner.arrivals) >= 50


def test_prompt_plus_max_tokens_must_fit_a_slot(server_factory, text_ckpt):
    server = server_factory(text_ckpt, KV_CACHE_TOKENS=64)
    prompt_tokens = httpx.post(server.url + "/v1/chat/completions", json=chat_body(max_tokens=1),
                               timeout=60).json()["usage"]["prompt_tokens"]
    room = 64 - prompt_tokens
    health = httpx.get(server.url + "/health").json()
    assert health["kvCache"]["tokensPerSlot"] == 64 and health["kvCache"]["bytes"] > 0
    assert health["quantization"] == "none" and health["compiled"] is False
    fits = httpx.post(server.url + "/v1/chat/completions", json=chat_body(max_tokens=room), timeout=60)
    assert fits.status_code == 200 and fits.json()["usage"]["total_tokens"] <= 64
    over = httpx.post(server.url + "/v1/chat/completions", json=chat_body(max_tokens=room + 1), timeout=60)
    assert over.status_code == 400
    assert over.json()["error"]["param"] == "max_tokens" and "KV_CACHE_TOKENS" in over.json()["error"]["message"]
    too_long = httpx.post(server.url + "/v1/chat/completions", json=chat_body("word " * 80), timeout=60)
    assert too_long.status_code == 400 and too_long.json()["error"]["code"] == "context_length_exceeded"


def test_int8_weights_keep_the_designed_reply(server_factory, text_ckpt):
    plain = greedy(server_factory(text_ckpt, TORCH_DTYPE="bfloat16"), "hi", 50)
    quantized = server_factory(text_ckpt, TORCH_DTYPE="bfloat16", QUANTIZATION="int8")
    assert httpx.get(quantized.url + "/health").json()["quantization"] == "int8"
    assert greedy(quantized, "hi", 50) == plain
    assert plain == "Hello from a text model."


def test_int8_and_row_kernels_match_linear():
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 512, bias=False).to(torch.bfloat16)
    for rows in (1, 3):
        x = torch.randn(rows, 1, 256, dtype=torch.bfloat16)
        reference = linear(x).float()
        assert torch.allclose(RowLinear(linear)(x).float(), reference, rtol=0.02, atol=0.02)
        error = (Int8Linear.quantize(linear)(x).float() - reference).abs().max() / reference.abs().max()
        assert error < 0.02


needs_amx = pytest.mark.skipif(native.library() is None, reason="no AMX (or no C compiler) on this machine")


@needs_amx
def test_packed_kernel_matches_linear_and_ignores_the_batch():
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 80, bias=True).to(torch.bfloat16)  # 80 outputs: four tiles and one more
    packed = PackedLinear.pack(linear)
    x = torch.randn(37, 96, dtype=torch.bfloat16)  # more than one block of 16 rows
    out = packed(x)
    reference = linear(x).float()
    assert (out.float() - reference).abs().max() / reference.abs().max() < 0.01
    for row in (0, 16, 36):  # a row alone gives exactly what it gave in the batch
        assert torch.equal(packed(x[row:row + 1]), out[row:row + 1])
    assert torch.equal(packed.rows(16, 48)(x), out[:, 16:48])
    int8 = PackedLinear.pack_int8(linear)  # the same int8 arithmetic as torch's int8 kernel
    reference = Int8Linear.quantize(linear)(x).float()
    assert (int8(x).float() - reference).abs().max() / reference.abs().max() < 0.01
    assert torch.equal(int8(x[5:6]), int8(x)[5:6])


@needs_amx
def test_tied_embedding_reads_the_packed_head():
    class Text(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed_tokens = torch.nn.Embedding(64, 32).to(torch.bfloat16)
            self.layers = []

    class Owner(torch.nn.Module):
        def __init__(self, text):
            super().__init__()
            self.lm_head = torch.nn.Linear(32, 64, bias=False).to(torch.bfloat16)
            self.lm_head.weight = text.embed_tokens.weight

    text = Text()
    owner = Owner(text)
    table = text.embed_tokens.weight.detach().clone()
    text.layers = [_layer_stub()]
    prepare_linears(text, owner, "none")
    assert isinstance(text.embed_tokens, PackedEmbedding) and isinstance(owner.lm_head, PackedLinear)
    ids = torch.tensor([[0, 5, 63], [17, 17, 2]])
    assert torch.equal(text.embed_tokens(ids), table[ids])
    with pytest.raises(IndexError):
        text.embed_tokens(torch.tensor([64]))


def _layer_stub() -> torch.nn.Module:
    """A decoder layer's projections (names as in Qwen3), for prepare_linears."""
    layer, attn, mlp = torch.nn.Module(), torch.nn.Module(), torch.nn.Module()
    for parent, names, shape in ((attn, ("q_proj", "k_proj", "v_proj", "o_proj"), (32, 32)),
                                 (mlp, ("gate_proj", "up_proj"), (64, 32)), (mlp, ("down_proj",), (32, 64))):
        for name in names:
            setattr(parent, name, torch.nn.Linear(shape[1], shape[0], bias=False).to(torch.bfloat16))
    layer.self_attn, layer.mlp = attn, mlp
    return layer


def test_bf16_server_reports_its_kernels(server_factory, random_text_ckpt):
    server = server_factory(random_text_ckpt, TORCH_DTYPE="bfloat16", MAX_CONCURRENT_REQUESTS=2,
                            KV_CACHE_TOKENS=256)
    health = httpx.get(server.url + "/health").json()
    assert health["kernels"] == ("amx+layer-ops" if native.library() is not None else "torch")


@pytest.mark.parametrize("setting", ["1"])
def test_compiled_decode_equals_eager(server_factory, random_text_ckpt, fp32_server, setting):
    compiled = server_factory(random_text_ckpt, TORCH_DTYPE="float32", COMPILE=setting, MAX_CONCURRENT_REQUESTS=4,
                              KV_CACHE_TOKENS=256)
    assert "decode step compiled" in compiled.log_path.read_text()
    assert httpx.get(compiled.url + "/health").json()["compiled"] is True
    assert [greedy(compiled, p) for p in PROMPTS[:2]] == [greedy(fp32_server, p) for p in PROMPTS[:2]]


def test_compile_failure_falls_back_to_eager(random_text_ckpt, monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(torch, "compile", broken)
    engine = Engine(Settings(model_repo_id=str(random_text_ckpt), device_map="cpu", compile="1",
                             kv_cache_tokens=128, max_concurrent_requests=2, _env_file=None))
    with caplog.at_level(logging.ERROR, logger="qwenserve.engine"):
        engine.start()
        assert engine.ready.wait(120), engine.error
    try:
        assert engine.decoder.decode_step == engine.decoder.decode
        assert sum("decoding runs eagerly" in r.getMessage() for r in caplog.records) == 1
        assert run(engine, [], SamplingParams(max_new_tokens=3, temperature=0))[-1].completion_tokens == 3
    finally:
        engine.stop()


def run(engine, resume_ids, params):
    async def go():
        prompt = await asyncio.to_thread(engine.build_prompt, [{"role": "user", "content": "hi"}], {})
        return [output async for output in engine.submit(prompt, params, resume_ids)]

    return asyncio.run(go())


def test_sampled_generation_continues_exactly_from_stored_tokens(random_text_ckpt):
    """Each draw depends on (seed, step) only: a generation resumed from its first k tokens goes on
    with exactly the tokens the uninterrupted one produced."""
    engine = Engine(Settings(model_repo_id=str(random_text_ckpt), device_map="cpu", kv_cache_tokens=256,
                             max_concurrent_requests=2, _env_file=None))
    engine.start()
    assert engine.ready.wait(120), engine.error
    try:
        params = SamplingParams(max_new_tokens=30, temperature=1.0, seed=1234)
        whole = [t for o in run(engine, [], params) for t in o.token_ids]
        assert len(whole) >= 10
        again = [t for o in run(engine, [], params) for t in o.token_ids]
        assert again == whole
        for k in (1, 7):
            rest = [t for o in run(engine, whole[:k], params) if o.kind != "replay" for t in o.token_ids]
            assert whole[:k] + rest == whole, k
        other = [t for o in run(engine, [], SamplingParams(max_new_tokens=30, temperature=1.0, seed=1235))
                 for t in o.token_ids]
        assert other != whole
    finally:
        engine.stop()


def test_step_seeds_differ_by_step_and_seed():
    seeds = {step_seed(seed, step) for seed in range(50) for step in range(50)}
    assert len(seeds) == 2500 and all(0 <= s < 2 ** 63 for s in seeds)


def test_stream_after_a_long_prompt_reads_normally(server_factory, endless_ckpt):
    """A prompt longer than one chunk streams like any other (role chunk, deltas, [DONE])."""
    server = server_factory(endless_ckpt, PREFILL_CHUNK_TOKENS=16)
    with httpx.stream("POST", server.url + "/v1/chat/completions", timeout=120,
                      json=chat_body(LONG_PROMPT, stream=True, max_tokens=6, temperature=0)) as response:
        sse = read_sse(response.iter_lines())
    assert sse.events[-1][1] == "[DONE]" and sse.indices == list(range(len(sse.events)))


def test_image_rows_keep_their_rope_offsets(random_vl_ckpt):
    """A prompt with an image (multimodal positions, its own rope delta) decoded in a batch beside a
    text row gives exactly Transformers' own `generate` for it alone (random weights)."""
    from PIL import Image
    from transformers import AutoModelForImageTextToText

    engine = Engine(Settings(model_repo_id=str(random_vl_ckpt), device_map="cpu", kv_cache_tokens=512,
                             max_concurrent_requests=4, _env_file=None))
    engine.start()
    assert engine.ready.wait(120), engine.error
    image = Image.new("RGB", (96, 64), (200, 30, 30))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is it?"}]}]
    params = SamplingParams(max_new_tokens=12, temperature=0)

    async def together():
        text_prompt = await asyncio.to_thread(engine.build_prompt, [{"role": "user", "content": "hi"}], {})
        image_prompt = await asyncio.to_thread(engine.build_prompt, messages, {}, images=[image])
        beside = engine.submit(text_prompt, SamplingParams(max_new_tokens=40, temperature=0))
        outputs = [o async for o in engine.submit(image_prompt, params)]
        _ = [o async for o in beside]
        return image_prompt, [t for o in outputs for t in o.token_ids]

    try:
        prompt, ours = asyncio.run(together())
    finally:
        engine.stop()
    model = AutoModelForImageTextToText.from_pretrained(random_vl_ckpt).eval()
    ids = torch.tensor([prompt.input_ids])
    with torch.inference_mode():
        theirs = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **prompt.media_inputs,
                                max_new_tokens=12, do_sample=False)[0, ids.shape[1]:].tolist()
    assert prompt.media_inputs and ours == theirs
