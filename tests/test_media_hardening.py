"""Hostile media through the real server: containers that decode more than their header shows, videos that
claim absurd frame rates or counts, bad client options, and local paths that probe outside the root."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from .helpers import LiveServer
from .mediafiles import (animated, data_url, ffconcat, ico_wrapping, mp4, pixel_bomb_png, png, video)
from .test_media import ask, image_url, ok, prompt_tokens, refused, video_url

MiB = 1024 * 1024


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("allowed")
    (root / "pic.png").write_bytes(png())
    outside = tmp_path_factory.mktemp("outside")
    (outside / "secret.png").write_bytes(png())
    (root / "escape.png").symlink_to(outside / "secret.png")
    (root / "dangling.png").symlink_to(outside / "missing.png")
    workdir = tmp_path_factory.mktemp("server-cwd")  # the server's working directory
    (workdir / "clip.mp4").write_bytes(mp4(1.0))
    return {"root": root, "outside": outside, "workdir": workdir}


@pytest.fixture(scope="module")
def server(request, log_dir, vl_ckpt, dirs):
    server = LiveServer(vl_ckpt, log_dir, cwd=dirs["workdir"], ALLOWED_LOCAL_MEDIA_PATH=dirs["root"],
                        MAX_IMAGE_PIXELS=1_000_000, MAX_VIDEO_FRAMES=4, MAX_VIDEO_DECODED_FRAMES=20,
                        MAX_REQUEST_BYTES=10_000_000, MEDIA_ALLOWED_NETWORKS="127.0.0.1/32")
    request.addfinalizer(server.stop)
    return server


def peak_rss(server: LiveServer) -> int:
    """The server process's peak resident memory so far (VmHWM), in bytes."""
    for line in Path(f"/proc/{server.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def image(data: bytes, mime: str = "image/png", **options) -> dict:
    return image_url(data_url(data, mime), **options)


def clip(data: bytes, **options) -> dict:
    return video_url(data_url(data, "video/mp4"), **options)


# ---- images: limits that hold for every container ---------------------------------------------
def test_ico_wrapping_a_huge_png_is_refused_before_decoding(server_factory, vl_ckpt):
    server = server_factory(vl_ckpt, MAX_IMAGE_PIXELS=1_000_000, MAX_REQUEST_BYTES=10_000_000)
    ok(ask(server, image(ico_wrapping(png()), "image/x-icon")))  # an ordinary icon is fine (and warms up)
    bomb = ico_wrapping(pixel_bomb_png())
    assert len(bomb) < 100_000
    before = peak_rss(server)
    error = refused(ask(server, image(bomb, "image/x-icon")), "image_too_large")
    assert "20000x20000" in error["message"]
    assert peak_rss(server) - before < 150 * MiB  # decoding it would cost 385 MiB


@pytest.mark.parametrize("fmt", ["PPM", "TGA", "PCX", "ICNS"])
def test_formats_outside_the_list_are_refused(server, fmt):
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 30, 30)).save(buf, fmt)
    refused(ask(server, image(buf.getvalue(), "image/" + fmt.lower())), "invalid_image")


def test_pillow_guard_is_an_error_at_max_image_pixels():
    # The second line behind our header checks: whatever Pillow sizes while opening (an ICO's entry, a
    # GIF frame) raises at MAX_IMAGE_PIXELS instead of warning.
    from qwenserve.config import Settings
    from qwenserve.media import MediaLoader

    saved = Image.MAX_IMAGE_PIXELS
    try:
        MediaLoader(Settings(_env_file=None, max_image_pixels=1000))
        assert Image.MAX_IMAGE_PIXELS == 1000
        with pytest.raises((Image.DecompressionBombError, Image.DecompressionBombWarning)):
            Image.open(io.BytesIO(png(40, 30)))
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def first_frame_only(data: bytes, fmt: str) -> bytes:
    """The file cut where its second frame starts: readable only by a decoder that stops after frame one."""
    marker = {"GIF": b"\x21\xf9\x04", "PNG": b"fcTL"}[fmt]
    return data[:data.index(marker, data.index(marker) + 1)]


@pytest.mark.parametrize("fmt", ["GIF", "PNG", "WEBP"])
def test_animated_images_use_their_first_frame(server, fmt):
    still = prompt_tokens(ask(server, image(png(64, 48))))
    assert prompt_tokens(ask(server, image(animated(fmt, frames=40)))) == still
    if fmt != "WEBP":  # libwebp reads the whole file up front; GIF and APNG frames are read one by one
        assert prompt_tokens(ask(server, image(first_frame_only(animated(fmt), fmt)))) == still


# ---- videos: sampled while decoding -----------------------------------------------------------
def test_video_declaring_1000_fps_is_sampled_while_decoding(server_factory, vl_ckpt):
    server = server_factory(vl_ckpt, MAX_REQUEST_BYTES=10_000_000)
    ok(ask(server, clip(video(2.0, 10, 320, 240))))  # warms up the video path at the same frame size
    bomb = video(2.0, fps=1000, width=320, height=240, still=True)  # 2000 frames, 460 MB decoded
    assert len(bomb) < 1_000_000
    before = peak_rss(server)
    ok(ask(server, clip(bomb)))
    assert peak_rss(server) - before < 150 * MiB


def test_decoded_frame_limit(server):
    at_limit = prompt_tokens(ask(server, clip(video(2.0, 10))))           # 20 frames: MAX_VIDEO_DECODED_FRAMES
    assert prompt_tokens(ask(server, clip(video(2.0, 10, container="matroska")))) == at_limit
    for container in ("mp4", "matroska"):  # the mp4 header counts its frames; matroska's does not
        error = refused(ask(server, clip(video(2.1, 10, container=container))), "video_too_many_frames")
        assert "MAX_VIDEO_DECODED_FRAMES" in error["message"]


def test_video_frame_size_limit(server):
    ok(ask(server, clip(video(0.2, 10, 1000, 1000))))                      # MAX_IMAGE_PIXELS=1_000_000
    refused(ask(server, clip(video(0.2, 10, 1002, 1000))), "video_too_large")


@pytest.mark.parametrize("lie", [None, 0, -3, 5])
def test_frame_sampler_keeps_a_bounded_evenly_spread_set(lie):
    """lie: no frame count in the header (None), the true count (0), or one that much off."""
    from qwenserve.media.videos import FrameSampler

    for budget in (2, 4, 16):
        for total in (1, 2, 3, budget * 2, budget * 2 + 1, 100, 1000):
            wanted = min(budget, total)
            declared = 0 if lie is None else max(total + lie, 1)
            sampler = FrameSampler(budget, declared, min(budget, declared) if declared else 0)
            for index in range(total):
                sampler.add(index if sampler.wants() else None)
                assert len(sampler.kept) <= 2 * budget and len(sampler.targets) <= budget
            picked = sampler.pick(wanted)
            assert all(index == frame for index, frame in picked)
            uniform = np.linspace(0, total - 1, wanted).round().astype(int).tolist()
            if total <= 2 * budget or lie == 0:  # nothing dropped, or a true count: the uniform pick itself
                assert [index for index, _ in picked] == uniform
            else:
                assert sampler.stride <= (total - 1) / budget
                assert all(abs(index - ideal) < sampler.stride for (index, _), ideal in zip(picked, uniform))
                assert len({index for index, _ in picked}) == wanted


def test_opencv_fallback_has_the_same_limits():
    from qwenserve.config import Settings
    from qwenserve.media.parts import MediaPart
    from qwenserve.media.videos import _decode_with_opencv
    from qwenserve.protocol import APIError

    settings = Settings(_env_file=None, max_image_pixels=1_000_000, max_video_frames=4, max_video_decoded_frames=20)
    part = MediaPart("video", "messages[0].content[0]", "")
    frames, metadata = _decode_with_opencv(video(2.0, 10), part, settings)
    assert frames.shape == (4, 48, 64, 3) and metadata["total_num_frames"] == 20
    for data, code in [(video(2.1, 10, container="matroska"), "video_too_many_frames"),
                       (video(0.2, 10, 1002, 1000), "video_too_large")]:
        with pytest.raises(APIError) as caught:
            _decode_with_opencv(data, part, settings)
        assert caught.value.code == code


def test_a_playlist_cannot_read_the_servers_files(server, dirs):
    assert (dirs["workdir"] / "clip.mp4").exists()  # next to the server, not in ALLOWED_LOCAL_MEDIA_PATH
    refused(ask(server, clip(ffconcat("clip.mp4"))), "invalid_video")


# ---- client options ---------------------------------------------------------------------------
BAD_NUMBERS = ["4", True, False, -1, 0, -0.5, 10**30, 10**400, [], {"a": 1}]
NAMES = ["str", "true", "false", "negative", "zero", "negative-float", "1e30", "1e400", "list", "dict"]


@pytest.mark.parametrize("value", BAD_NUMBERS + [2.5], ids=NAMES + ["fraction"])
@pytest.mark.parametrize("name", ["max_pixels", "max_frames"])
def test_bad_whole_number_options(server, name, value):
    part = image(png(), **{name: value}) if name == "max_pixels" else clip(mp4(1.0), **{name: value})
    error = refused(ask(server, {"type": "text", "text": "look"}, part), "invalid_media_option",
                    "messages[0].content[1]")
    assert name in error["message"]


@pytest.mark.parametrize("value", BAD_NUMBERS, ids=NAMES)
def test_bad_fps_option(server, value):
    error = refused(ask(server, clip(mp4(1.0), fps=value)), "invalid_media_option")
    assert "fps" in error["message"]


def test_good_options_still_lower_the_budget(server):
    full = prompt_tokens(ask(server, image(png(200, 200))))
    assert prompt_tokens(ask(server, image(png(200, 200), max_pixels=64 * 64))) < full
    assert prompt_tokens(ask(server, image(png(200, 200), max_pixels=4096.0))) < full
    assert prompt_tokens(ask(server, image(png(200, 200), max_pixels=None))) == full
    four = prompt_tokens(ask(server, clip(mp4(2.0))))
    assert prompt_tokens(ask(server, clip(mp4(2.0), max_frames=2))) < four
    assert prompt_tokens(ask(server, clip(mp4(2.0), fps=0.5))) < four
    assert prompt_tokens(ask(server, clip(mp4(2.0), fps=2**53, max_frames=2**53))) == four


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan, 10**400], ids=["inf", "-inf", "nan", "1e400"])
def test_non_finite_options_reached_another_way(value):
    from qwenserve.media.parts import _describe
    from qwenserve.protocol import APIError

    for name in ("fps", "max_frames", "max_pixels"):
        with pytest.raises(APIError) as caught:
            _describe({"type": "video_url", "video_url": {"url": "data:,", name: value}}, "video_url", "p")
        assert (caught.value.status, caught.value.code, caught.value.param) == (400, "invalid_media_option", "p")


# ---- local paths ------------------------------------------------------------------------------
def same_refusal(server, *sources: str) -> dict:
    errors = [refused(ask(server, image_url(source))) for source in sources]
    assert all(error == errors[0] for error in errors), errors
    return errors[0]


def test_outside_the_root_tells_nothing(server, dirs):
    outside = dirs["outside"]
    error = same_refusal(server, f"file://{outside}/secret.png", f"file://{outside}/missing.png",
                         f"{outside}/secret.png", f"{outside}/missing.png", f"{outside}/no/such/dir.png",
                         "/etc/passwd", "/etc/no-such-file", f"file://{dirs['root']}/escape.png",
                         f"file://{dirs['root']}/dangling.png", f"{dirs['root']}/../outside-nowhere/x.png")
    assert error["code"] == "media_path_refused"
    assert str(outside) not in error["message"]


def test_inside_the_root(server, dirs):
    root = dirs["root"]
    ok(ask(server, image_url(f"file://{root}/pic.png")))
    refused(ask(server, image_url(f"file://{root}/missing.png")), "media_not_found")
    refused(ask(server, image_url(f"file://{root}")), "media_not_found")  # a directory is not a file


@pytest.mark.parametrize("source", ["file:///a%00b", "/a\u0000b", "file://{root}/pic.png%00.txt",
                                    "{root}/pic.png\u0000"])
def test_nul_byte_in_a_local_path(server, dirs, source):
    refused(ask(server, image_url(source.format(root=dirs["root"]))), "invalid_media_path")


@pytest.mark.parametrize("url,code", [
    ("http://127.0.0.1:99999/a.png", "invalid_url"),              # port out of range
    ("http://[::1/a.png", "invalid_url"),                         # unclosed bracket
    ("http://127.0.0.1:1/a\u0000b.png", "invalid_url"),           # httpx refuses it
    ("http://127.0.0.1:1/" + "a" * 70000, "invalid_url"),         # too long for httpx
    ("http://" + "a" * 64 + ".invalid/a.png", "media_fetch_failed"),  # a label IDNA cannot encode
], ids=["port", "bracket", "nul", "long", "label"])
def test_malformed_urls_are_400s(server, url, code):
    # None of these reaches the network: each fails while being parsed, encoded or checked.
    refused(ask(server, image_url(url)), code)
