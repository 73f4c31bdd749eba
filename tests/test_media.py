"""Images and videos through the real server on a Qwen3-VL checkpoint: every accepted form, every refusal."""

from __future__ import annotations

import httpx
import pytest

from .helpers import LiveServer, stream
from .mediafiles import (MediaHost, b64, data_url, jpeg_with_orientation, mp4, pixel_bomb_png, png,
                         truncated_jpeg)

REPLY = "Hello! I am a demo model."
MAX_MEDIA_BYTES = 200_000


def padded_png(size: int) -> bytes:
    """A valid PNG of exactly `size` bytes (decoders ignore bytes after IEND)."""
    data = png()
    return data + b"\0" * (size - len(data))


@pytest.fixture(scope="module")
def host():
    files = {"red.png": png(), "clip.mp4": mp4(2.0), "exact.png": padded_png(MAX_MEDIA_BYTES),
             "over.png": padded_png(MAX_MEDIA_BYTES + 1)}
    server = MediaHost(files)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def second_host():
    server = MediaHost({"red.png": png()}, host="127.0.0.2")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def local_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("allowed-media")
    (root / "pic.png").write_bytes(png())
    (root / "sub").mkdir()
    (root / "sub" / "clip.mp4").write_bytes(mp4(1.0))
    outside = tmp_path_factory.mktemp("outside")
    (outside / "secret.png").write_bytes(png())
    (root / "escape.png").symlink_to(outside / "secret.png")
    return root


@pytest.fixture(scope="module")
def media_server(request, log_dir, vl_ckpt, local_dir):
    server = LiveServer(vl_ckpt, log_dir, MEDIA_ALLOW_PRIVATE_NETWORKS=1, ALLOWED_LOCAL_MEDIA_PATH=local_dir,
                        MAX_IMAGES_PER_REQUEST=3, MAX_VIDEOS_PER_REQUEST=1, MAX_IMAGE_PIXELS=1_000_000,
                        MAX_MEDIA_BYTES=MAX_MEDIA_BYTES, MAX_VIDEO_SECONDS=3, MEDIA_FETCH_TIMEOUT_SECONDS=2,
                        MEDIA_MAX_REDIRECTS=2, MAX_VIDEO_FRAMES=4, MAX_REQUEST_BYTES=10_000_000)
    request.addfinalizer(server.stop)
    return server


@pytest.fixture(scope="module")
def strict_server(request, log_dir, vl_ckpt):
    """Defaults for addresses, except that 127.0.0.2 is an allowed network."""
    server = LiveServer(vl_ckpt, log_dir, MEDIA_ALLOWED_NETWORKS="127.0.0.2/32", MEDIA_MAX_REDIRECTS=2)
    request.addfinalizer(server.stop)
    return server


def ask(server, *parts, text="What is this?", **extra):
    body = {"model": "m", "messages": [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}],
            **extra}
    return httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)


def image_url(url, **options):
    return {"type": "image_url", "image_url": {"url": url, **options}}


def video_url(url, **options):
    return {"type": "video_url", "video_url": {"url": url, **options}}


def ok(response) -> dict:
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["choices"][0]["message"]["content"] == REPLY
    return body


def refused(response, code=None, param="messages[0].content[0]", fragment="") -> dict:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param
    if code:
        assert error["code"] == code
    assert fragment in error["message"]
    return error


def prompt_tokens(response) -> int:
    return ok(response)["usage"]["prompt_tokens"]


def test_every_image_form(media_server, host):
    text_only = prompt_tokens(ask(media_server))
    forms = [
        image_url(data_url(png(), "image/png")),
        {"type": "image_url", "image_url": data_url(png(), "image/png")},
        image_url(host.url + "/file/red.png"),
        {"type": "input_image", "b64_json": b64(png())},
        {"type": "input_image", "image": b64(png())},
        {"type": "input_image", "image": data_url(png(), "image/png")},
    ]
    counts = {prompt_tokens(ask(media_server, form)) for form in forms}
    assert len(counts) == 1 and counts.pop() > text_only  # same image, same tokens, more than text alone


def test_local_files_inside_the_allowed_directory(media_server, local_dir):
    assert prompt_tokens(ask(media_server, image_url(f"file://{local_dir}/pic.png"))) > 0
    assert prompt_tokens(ask(media_server, image_url(str(local_dir / "pic.png")))) > 0
    assert prompt_tokens(ask(media_server, video_url(f"file://{local_dir}/sub/clip.mp4"))) > 0


@pytest.mark.parametrize("source", ["file:///etc/passwd", "/etc/passwd", "file://{root}/../outside/secret.png",
                                    "{root}/sub/../../outside/secret.png", "file://{root}/escape.png",
                                    "file://{root}/missing.png"])
def test_local_escapes_are_refused(media_server, local_dir, source):
    refused(ask(media_server, image_url(source.format(root=local_dir))))


def test_local_files_refused_when_not_configured(strict_server):
    refused(ask(strict_server, image_url("file:///etc/passwd")), "local_media_disabled")
    refused(ask(strict_server, image_url("/etc/passwd")), "local_media_disabled")


def test_several_images_and_streaming(media_server):
    one = prompt_tokens(ask(media_server, image_url(data_url(png(), "image/png")), text="hi"))
    three = prompt_tokens(ask(media_server, *[image_url(data_url(png(), "image/png"))] * 3, text="hi"))
    assert three > one
    body = {"model": "m", "stream": True, "stream_options": {"include_usage": True}, "messages": [
        {"role": "user", "content": [image_url(data_url(png(), "image/png")), {"type": "text", "text": "hi"}]}]}
    _, sse = stream(media_server.url, body)
    assert sse.text() == REPLY
    assert sse.chunks()[-1]["usage"]["prompt_tokens"] == one


def test_images_in_several_messages(media_server):
    body = {"model": "m", "messages": [
        {"role": "user", "content": [image_url(data_url(png(), "image/png")), {"type": "text", "text": "a"}]},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": [{"type": "text", "text": "and"}, image_url(data_url(png(), "image/png"))]}]}
    ok(httpx.post(media_server.url + "/v1/chat/completions", json=body, timeout=60))


def test_exif_orientation_is_applied(media_server):
    # Token counts cannot see a rotation, so the decoder is checked directly, then the server path.
    from qwenserve.config import Settings
    from qwenserve.media.images import decode_image
    from qwenserve.media.parts import MediaPart

    part = MediaPart("image", "p", "")
    assert decode_image(jpeg_with_orientation(60, 40, 6), part, Settings(_env_file=None)).size == (40, 60)
    assert decode_image(jpeg_with_orientation(60, 40, 1), part, Settings(_env_file=None)).size == (60, 40)
    ok(ask(media_server, image_url(data_url(jpeg_with_orientation(60, 40, 6), "image/jpeg"))))


def test_every_video_form(media_server, host):
    clip = mp4(2.0)
    text_only = prompt_tokens(ask(media_server))
    forms = [video_url(data_url(clip, "video/mp4")), {"type": "video_url", "video_url": data_url(clip, "video/mp4")},
             video_url(host.url + "/file/clip.mp4"), {"type": "input_video", "b64_json": b64(clip)},
             {"type": "input_video", "video": b64(clip)}, {"type": "input_video", "video": data_url(clip, "video/mp4")}]
    counts = {prompt_tokens(ask(media_server, form)) for form in forms}
    assert len(counts) == 1 and counts.pop() > text_only


def test_video_tokens_follow_max_video_frames(media_server, vl_server):
    clip = video_url(data_url(mp4(2.0), "video/mp4"))
    four_frames = prompt_tokens(ask(media_server, clip))      # MAX_VIDEO_FRAMES=4
    sixteen_frames = prompt_tokens(ask(vl_server, clip))      # default 16
    assert sixteen_frames > four_frames
    # A client may ask for fewer frames, never for more.
    fewer = prompt_tokens(ask(vl_server, video_url(data_url(mp4(2.0), "video/mp4"), max_frames=4)))
    assert fewer == four_frames
    assert prompt_tokens(ask(media_server, video_url(data_url(mp4(2.0), "video/mp4"), max_frames=64))) == four_frames
    assert prompt_tokens(ask(media_server, video_url(data_url(mp4(2.0), "video/mp4"), fps=1000))) == four_frames


def test_client_pixel_budget_only_lowers(media_server):
    big = data_url(png(200, 200), "image/png")
    full = prompt_tokens(ask(media_server, image_url(big)))
    assert prompt_tokens(ask(media_server, image_url(big, max_pixels=64 * 64))) < full
    assert prompt_tokens(ask(media_server, image_url(big, max_pixels=10**9))) == full


def test_image_pixel_limit(media_server):
    assert prompt_tokens(ask(media_server, image_url(data_url(png(1000, 1000), "image/png")))) > 0
    refused(ask(media_server, image_url(data_url(png(1000, 1001), "image/png"))), "image_too_large")


def test_pixel_bomb_refused_from_header(media_server):
    bomb = pixel_bomb_png()
    assert len(bomb) < 100_000
    error = refused(ask(media_server, image_url(data_url(bomb, "image/png"))), "image_too_large")
    assert "20000x20000" in error["message"]


def test_image_count_limit(media_server):
    image = image_url(data_url(png(), "image/png"))
    ok(ask(media_server, image, image, image))
    refused(ask(media_server, image, image, image, image), "too_many_media", "messages[0].content[3]")


def test_video_count_and_length_limits(media_server):
    ok(ask(media_server, video_url(data_url(mp4(3.0), "video/mp4"))))
    refused(ask(media_server, video_url(data_url(mp4(4.0), "video/mp4"))), "video_too_long")
    clip = video_url(data_url(mp4(1.0), "video/mp4"))
    refused(ask(media_server, clip, clip), "too_many_media", "messages[0].content[1]")


def test_media_byte_limit(media_server, host):
    ok(ask(media_server, image_url(host.url + "/file/exact.png")))
    refused(ask(media_server, image_url(host.url + "/file/over.png")), "media_too_large")
    ok(ask(media_server, {"type": "input_image", "b64_json": b64(padded_png(MAX_MEDIA_BYTES))}))
    refused(ask(media_server, {"type": "input_image", "b64_json": b64(padded_png(MAX_MEDIA_BYTES + 1))}),
            "media_too_large")


@pytest.mark.parametrize("part,code", [
    (image_url("data:image/png;base64,@@@not-base64@@@"), "invalid_base64"),
    ({"type": "input_image", "b64_json": "!!!"}, "invalid_base64"),
    (image_url(data_url(b"plain text, not an image", "image/png")), "invalid_image"),
    (image_url(data_url(truncated_jpeg(), "image/jpeg")), "invalid_image"),
    (video_url(data_url(b"not a video at all" * 10, "video/mp4")), "invalid_video"),
    (image_url("ftp://example.com/a.png"), "unsupported_scheme"),
    (image_url("gopher://example.com/a.png"), "unsupported_scheme"),
    (image_url("data:image/png,rawnotbase64"), None),
    ({"type": "image_url", "image_url": {}}, None),
    ({"type": "input_image"}, None),
])
def test_bad_parts(media_server, part, code):
    refused(ask(media_server, part), code)
    assert httpx.get(media_server.url + "/health").json()["modelReady"]


def test_error_points_at_the_bad_part(media_server):
    body = {"model": "m", "messages": [
        {"role": "system", "content": "s"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, image_url(data_url(png(), "image/png")),
                                     image_url("data:image/png;base64,AAAA")]}]}
    response = httpx.post(media_server.url + "/v1/chat/completions", json=body, timeout=60)
    refused(response, "invalid_image", "messages[1].content[2]")


def test_truncated_image_message(media_server):
    error = refused(ask(media_server, image_url(data_url(truncated_jpeg(), "image/jpeg"))), "invalid_image")
    assert "truncated" in error["message"]


def test_redirects_are_followed_up_to_the_limit(media_server, host):
    target = host.url + "/file/red.png"
    once = f"{host.url}/redirect?to={target}"
    twice = f"{host.url}/redirect?to={once}"
    thrice = f"{host.url}/redirect?to={twice}"
    ok(ask(media_server, image_url(twice)))     # MEDIA_MAX_REDIRECTS=2
    refused(ask(media_server, image_url(thrice)), "media_fetch_failed", fragment="too many redirects")


def test_slow_and_endless_upstreams(media_server, host):
    refused(ask(media_server, image_url(host.url + "/slow")), "media_fetch_timeout")
    refused(ask(media_server, image_url(host.url + "/endless")), "media_too_large")
    ok(ask(media_server, image_url(host.url + "/file/red.png")))


def test_loopback_refused_without_a_hit(strict_server, host):
    before = len(host.hits)
    port = host.port
    for url in [f"http://127.0.0.1:{port}/file/red.png", f"http://localhost:{port}/file/red.png",
                f"http://2130706433:{port}/file/red.png", f"http://0x7f000001:{port}/file/red.png",
                f"http://127.1:{port}/file/red.png", f"http://[::1]:{port}/file/red.png",
                f"http://[::ffff:127.0.0.1]:{port}/file/red.png", f"http://0.0.0.0:{port}/file/red.png",
                f"http://169.254.169.254:{port}/latest/meta-data", f"http://10.0.0.1:{port}/x",
                f"http://100.64.0.1:{port}/x", f"http://224.0.0.1:{port}/x", f"http://[fe80::1]:{port}/x"]:
        refused(ask(strict_server, image_url(url)), "media_address_refused")
    assert len(host.hits) == before


def test_redirect_from_allowed_host_to_private_is_refused(strict_server, host, second_host):
    ok(ask(strict_server, image_url(second_host.url + "/file/red.png")))  # 127.0.0.2 is allowed
    before = len(host.hits)
    hop = f"{second_host.url}/redirect?to={host.url}/file/red.png"
    refused(ask(strict_server, image_url(hop)), "media_address_refused")
    assert len(host.hits) == before


def test_allowed_media_domains(server_factory, vl_ckpt, host):
    server = server_factory(vl_ckpt, MEDIA_ALLOW_PRIVATE_NETWORKS=1, ALLOWED_MEDIA_DOMAINS="localhost")
    ok(ask(server, image_url(f"http://localhost:{host.port}/file/red.png")))
    refused(ask(server, image_url(f"http://127.0.0.1:{host.port}/file/red.png")), "media_host_refused")
    hop = f"http://localhost:{host.port}/redirect?to=http://127.0.0.1:{host.port}/file/red.png"
    refused(ask(server, image_url(hop)), "media_host_refused")


def test_media_to_a_text_only_model(text_server):
    response = ask(text_server, image_url(data_url(png(), "image/png")))
    refused(response, "unsupported_media")
    response = ask(text_server, {"type": "input_video", "b64_json": b64(mp4(1.0))})
    refused(response, "unsupported_media")
    assert httpx.get(text_server.url + "/health").json()["modelReady"]
