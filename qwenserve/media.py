"""Images and videos in messages: read from data URLs, base64, safe http(s) fetches or an allowed
directory; decoded here (never by the processor from a client URL), with limits checked first."""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import ipaddress
import math
import os
import socket
import struct
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urljoin, urlsplit

import httpx
import numpy as np
from PIL import BmpImagePlugin, IcoImagePlugin, Image, ImageOps, PngImagePlugin

from .config import Settings
from .protocol import APIError, ChatCompletionRequest, bad_request

IMAGE_TYPES = ("image_url", "input_image")
VIDEO_TYPES = ("video_url", "input_video")
# What clients send as pictures; other Pillow formats (EPS runs Ghostscript, ICNS and others decode while
# opening) are refused as not an image.
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "ICO")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# Client options: name -> whether only whole numbers make sense. 2**53 is above any budget and the last
# integer a JSON number carries exactly.
CLIENT_OPTIONS = {"max_pixels": True, "max_frames": True, "fps": False}
OPTION_LIMIT = 2**53
# Pillow's own bomb guard, set to MAX_IMAGE_PIXELS by MediaLoader, is the second line behind our header
# checks: it sizes what plugins decode while opening (an ICO's entry, a GIF frame). As a warning it would
# let the decode go on, so it is an error.
warnings.filterwarnings("error", category=Image.DecompressionBombWarning)


@dataclass
class MediaPart:
    kind: str  # "image" or "video"
    param: str
    source: str  # a URL, a data URL, a path, or raw base64 (when `is_base64`)
    is_base64: bool = False
    options: dict = field(default_factory=dict)


@dataclass
class LoadedMedia:
    images: list = field(default_factory=list)
    videos: list = field(default_factory=list)
    video_metadata: list = field(default_factory=list)

    def processor_args(self) -> tuple:
        return self.images or None, self.videos or None, self.video_metadata or None


def media_parts(request: ChatCompletionRequest) -> list[MediaPart]:
    """Every image or video part, in order, with the `param` path that errors point at."""
    parts = []
    for i, message in enumerate(request.messages):
        if not isinstance(message.content, list):
            continue
        for j, part in enumerate(message.content):
            kind = part["type"]
            if kind in IMAGE_TYPES + VIDEO_TYPES:
                parts.append(_describe(part, kind, f"messages[{i}].content[{j}]"))
    return parts


def _describe(part: dict, kind: str, param: str) -> MediaPart:
    media = "image" if kind in IMAGE_TYPES else "video"
    if kind in ("image_url", "video_url"):
        value = part.get(kind)
        url = value.get("url") if isinstance(value, dict) else value
        options = value if isinstance(value, dict) else {}
        if not isinstance(url, str) or not url:
            raise bad_request(f"{kind} needs a URL string ({kind}.url or {kind} itself)", param)
        return MediaPart(media, param, url, options=client_options({**part, **options}, param))
    if isinstance(part.get("b64_json"), str):
        return MediaPart(media, param, part["b64_json"], is_base64=True, options=client_options(part, param))
    inline = part.get(media)
    if isinstance(inline, str) and inline:
        return MediaPart(media, param, inline, is_base64=not inline.startswith("data:"),
                         options=client_options(part, param))
    raise bad_request(f"{kind} needs 'b64_json' or '{media}' (base64 or a data URL)", param)


def client_options(source: dict, param: str) -> dict:
    """max_pixels, max_frames and fps as numbers (null: not given), checked before anything is fetched so
    that no later arithmetic meets a string, a bool, NaN, an infinity or an int too large for a float."""
    options = {}
    for name, whole in CLIENT_OPTIONS.items():
        value = source.get(name)
        if value is None:
            continue
        if not _valid_option(value, whole):
            kind = "a whole number" if whole else "a number"
            raise bad_request(f"{name} must be {kind} greater than 0 and at most 2**53", param,
                              "invalid_media_option")
        options[name] = int(value) if whole else float(value)
    return options


def _valid_option(value, whole: bool) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    # Comparing first: exact for ints of any size, false for NaN and the infinities.
    return 0 < value <= OPTION_LIMIT and (not whole or float(value).is_integer())


class MediaLoader:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.fetcher = SafeFetcher(settings)
        Image.MAX_IMAGE_PIXELS = settings.max_image_pixels  # Pillow's guard, the second line (see above)

    async def load(self, request: ChatCompletionRequest) -> LoadedMedia | None:
        parts = media_parts(request)
        if not parts:
            return None
        self._check_counts(parts)
        loaded = LoadedMedia()
        for part in parts:
            data = await self._read(part)
            if part.kind == "image":
                loaded.images.append(await asyncio.to_thread(decode_image, data, part, self.settings))
            else:
                frames, metadata = await asyncio.to_thread(decode_video, data, part, self.settings)
                loaded.videos.append(frames)
                loaded.video_metadata.append(metadata)
        return loaded

    def _check_counts(self, parts: list[MediaPart]) -> None:
        limits = {"image": self.settings.max_images_per_request, "video": self.settings.max_videos_per_request}
        seen = {"image": 0, "video": 0}
        for part in parts:
            seen[part.kind] += 1
            if seen[part.kind] > limits[part.kind]:
                setting = "MAX_IMAGES_PER_REQUEST" if part.kind == "image" else "MAX_VIDEOS_PER_REQUEST"
                raise bad_request(f"too many {part.kind}s: at most {limits[part.kind]} per request ({setting})",
                                  part.param, "too_many_media")

    async def _read(self, part: MediaPart) -> bytes:
        limit = self.settings.max_media_bytes
        if part.is_base64:
            return decode_base64(part.source, part.param, limit)
        if part.source.startswith("data:"):
            header, sep, payload = part.source.partition(",")
            if not sep or ";base64" not in header:
                raise bad_request("data URLs must be base64 encoded (data:<type>;base64,<data>)", part.param)
            return decode_base64(payload, part.param, limit)
        try:
            scheme = urlsplit(part.source).scheme.lower()
        except ValueError:  # e.g. an unclosed IPv6 bracket
            raise bad_request("media URL is not valid", part.param, "invalid_url")
        if scheme in ("http", "https"):
            return await self.fetcher.fetch(part.source, part.param)
        if scheme == "file" or (not scheme and part.source.startswith(("/", "."))):
            return read_local(part.source, part.param, self.settings)
        raise bad_request(f"unsupported URL scheme {scheme[:20]!r}: use http, https or data URLs", part.param,
                          "unsupported_scheme")


def decode_base64(text: str, param: str, limit: int) -> bytes:
    if len(text) * 3 // 4 > limit + 3:
        raise bad_request(f"media is larger than {limit} bytes (MAX_MEDIA_BYTES)", param, "media_too_large")
    try:
        data = base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise bad_request("media is not valid base64", param, "invalid_base64")
    if len(data) > limit:
        raise bad_request(f"media is larger than {limit} bytes (MAX_MEDIA_BYTES)", param, "media_too_large")
    return data


def read_local(source: str, param: str, settings: Settings) -> bytes:
    root = settings.allowed_local_media_path
    if not root:
        raise bad_request("local files are not allowed (set ALLOWED_LOCAL_MEDIA_PATH to enable a directory)",
                          param, "local_media_disabled")
    path = unquote(urlsplit(source).path) if source.startswith("file:") else source
    if "\0" in path:
        raise bad_request("local media path contains a NUL byte", param, "invalid_media_path")
    base = Path(os.path.realpath(root))
    # Links followed, the file not required to exist: a path outside the root is refused the same way
    # whether or not something is there, so answers tell nothing about the rest of the disk.
    resolved = Path(os.path.realpath(base / path))
    if not resolved.is_relative_to(base):
        raise bad_request("local media must be a file inside ALLOWED_LOCAL_MEDIA_PATH", param, "media_path_refused")
    try:
        if not resolved.is_file():
            raise FileNotFoundError(path)
        with open(resolved, "rb") as file:
            data = file.read(settings.max_media_bytes + 1)  # bounded even if the file grows meanwhile
    except OSError:
        raise bad_request("local media file not found", param, "media_not_found")
    if len(data) > settings.max_media_bytes:
        raise bad_request(f"media is larger than {settings.max_media_bytes} bytes (MAX_MEDIA_BYTES)", param,
                          "media_too_large")
    return data


# ---- images ----------------------------------------------------------------------------------
def decode_image(data: bytes, part: MediaPart, settings: Settings) -> Image.Image:
    image = _open_image(data, part, settings.max_image_pixels)
    _check_image_size(image.size, part, settings.max_image_pixels)
    try:
        image.load()  # the first frame only: animated GIF, APNG and WEBP frames are decoded one at a time
        image = ImageOps.exif_transpose(image).convert("RGB")
    except Exception as exc:
        raise bad_request(f"image could not be decoded ({'truncated file' if 'truncated' in str(exc) else 'corrupt'})",
                          part.param, "invalid_image")
    return _limit_pixels(image, part.options.get("max_pixels"))


def _open_image(data: bytes, part: MediaPart, limit: int) -> Image.Image:
    if data[:4] == b"\0\0\1\0":
        _check_icon(data, part, limit)
    try:
        image = _identify(data)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise bad_request(f"image is larger than {limit} pixels (MAX_IMAGE_PIXELS)", part.param, "image_too_large")
    except Exception:  # a plugin's own error on a malformed file
        image = None
    if image is None:
        raise bad_request("not an image (or an unsupported image format)", part.param, "invalid_image")
    return image


def _identify(data: bytes) -> Image.Image | None:
    """What `Image.open(formats=IMAGE_FORMATS)` does (headers only, for these formats but ICO), less its
    own size check, so that ours (which names the size) comes first; Pillow's guard still covers what a
    plugin sizes while opening."""
    Image.init()
    for name in IMAGE_FORMATS:
        factory, accept = Image.OPEN[name]
        accepted = accept(data[:16]) if accept else True
        if accepted and not isinstance(accepted, str):  # a str is Pillow's "recognised, cannot read"
            try:
                return factory(io.BytesIO(data), "")
            except (SyntaxError, IndexError, TypeError, struct.error):  # not this format after all
                continue
    return None


def _check_icon(data: bytes, part: MediaPart, limit: int) -> None:
    """Pillow decodes an icon's largest entry while opening it, and the directory says at most 256x256
    whatever the entry holds: the entry's own PNG or BMP header is read here, before any decode."""
    buf = io.BytesIO(data)
    try:
        entry = IcoImagePlugin.IcoFile(buf).entry[0]  # the entry Image.open decodes
        buf.seek(entry.offset)
        reader = PngImagePlugin.PngImageFile if data[entry.offset:entry.offset + 8] == PNG_MAGIC \
            else BmpImagePlugin.DibImageFile
        size = reader(buf).size  # headers only
    except Exception:
        return  # not a readable icon: opening it fails the same way
    _check_image_size(size, part, limit)


def _check_image_size(size: tuple[int, int], part: MediaPart, limit: int) -> None:
    width, height = size
    if width * height > limit:
        raise bad_request(f"image is {width}x{height} pixels; at most {limit} pixels (MAX_IMAGE_PIXELS)",
                          part.param, "image_too_large")


def _limit_pixels(image: Image.Image, max_pixels: int | None) -> Image.Image:
    """A client may ask for fewer pixels than the processor's budget, never more (the processor caps that)."""
    if max_pixels and image.width * image.height > max_pixels:
        scale = math.sqrt(max_pixels / (image.width * image.height))
        image = image.resize((max(1, int(image.width * scale)), max(1, int(image.height * scale))))
    return image


# ---- videos ----------------------------------------------------------------------------------
def frame_budget(settings: Settings, options: dict) -> int:
    """Most frames a video can give: MAX_VIDEO_FRAMES, fewer if the client's max_frames asks."""
    return max(min(settings.max_video_frames, options.get("max_frames", settings.max_video_frames)), 2)


def frame_count(duration: float, settings: Settings, options: dict) -> int:
    """Frames to sample: the budget, fewer if the client's fps asks for fewer over this duration."""
    count = frame_budget(settings, options)
    if "fps" in options:
        count = min(count, max(1, math.ceil(duration * options["fps"])))
    return max(count, 2)  # Qwen3-VL groups frames in pairs


def uniform_indices(total: int, wanted: int) -> list[int]:
    """`wanted` frame indices spread evenly over `total` frames, ends included (as qwen-vl-utils picks)."""
    return np.linspace(0, total - 1, wanted).round().astype(int).tolist()


class FrameSampler:
    """Decides while decoding which frames to keep, so that memory stays bounded whatever the length or
    the frame rate a file claims.

    Two sets, a frame in both kept once: the frames a uniform pick over the header's frame count takes
    (exactly the reference pick when the count proves true), and every `stride`-th frame, at most
    2 * budget of them (one more, and every other one is dropped and the stride doubles), for headers
    that say nothing or lie."""

    def __init__(self, budget: int, declared: int = 0, wanted: int = 0):
        self.budget, self.stride, self.count, self.declared = budget, 1, 0, declared
        self.kept: list[tuple[int, object]] = []
        self.targets: dict[int, object] = dict.fromkeys(uniform_indices(declared, wanted)) if declared else {}

    def wants(self) -> bool:
        """Whether the next frame is one to keep (callers convert only those)."""
        return self.count % self.stride == 0 or self.count in self.targets

    def add(self, frame=None) -> None:
        """Counts the next decoded frame, keeping it when given."""
        if frame is not None and self.count in self.targets:
            self.targets[self.count] = frame
        if frame is not None and self.count % self.stride == 0:
            self.kept.append((self.count, frame))
            if len(self.kept) > 2 * self.budget:
                self.kept = self.kept[::2]
                self.stride *= 2
        self.count += 1

    def pick(self, wanted: int) -> list[tuple[int, object]]:
        """The uniform pick over all frames: exactly, from the header's targets or while nothing was
        dropped; else the kept frames nearest it (within a stride)."""
        complete = all(frame is not None for frame in self.targets.values())
        if self.count == self.declared and len(self.targets) == wanted and complete:
            return list(self.targets.items())
        ideal = np.linspace(0, self.count - 1, wanted)
        positions = np.minimum((ideal / self.stride).round().astype(int), len(self.kept) - 1)
        return [self.kept[p] for p in positions]


def decode_video(data: bytes, part: MediaPart, settings: Settings) -> tuple[np.ndarray, dict]:
    try:
        return _decode_with_pyav(data, part, settings)
    except APIError:
        raise
    except Exception:
        try:
            return _decode_with_opencv(data, part, settings)
        except APIError:
            raise
        except Exception:
            raise bad_request("not a video (or an unsupported or corrupt video)", part.param, "invalid_video")


def _check_video(frames: int, seconds: float, width: int, height: int, part: MediaPart, settings: Settings) -> None:
    """Against the header before decoding, and again for each decoded frame (a header may lie)."""
    if seconds > settings.max_video_seconds:
        raise bad_request(f"video is longer than {settings.max_video_seconds:g}s (MAX_VIDEO_SECONDS)", part.param,
                          "video_too_long")
    if frames > settings.max_video_decoded_frames:
        raise bad_request(f"video has more than {settings.max_video_decoded_frames} frames "
                          "(MAX_VIDEO_DECODED_FRAMES)", part.param, "video_too_many_frames")
    if width * height > settings.max_image_pixels:
        raise bad_request(f"video frames are {width}x{height} pixels; at most {settings.max_image_pixels} "
                          "(MAX_IMAGE_PIXELS)", part.param, "video_too_large")


def _sampler(declared: int, fps: float, part: MediaPart, settings: Settings) -> FrameSampler:
    """A sampler aiming at the pick the header's frame count would get (none when it gives no count).
    A count past MAX_VIDEO_DECODED_FRAMES cannot prove true (decoding stops there), so it is cut to it."""
    declared = max(0, min(declared, settings.max_video_decoded_frames))
    wanted = _wanted(declared, fps, part, settings) if declared else 0
    return FrameSampler(frame_budget(settings, part.options), declared, wanted)


def _wanted(total: int, fps: float, part: MediaPart, settings: Settings) -> int:
    return min(frame_count(total / fps, settings, part.options), max(total, 2))


def _sane_fps(value) -> float:
    value = float(value or 0)
    return value if math.isfinite(value) and value > 0 else 24.0


def _decode_with_pyav(data: bytes, part: MediaPart, settings: Settings) -> tuple[np.ndarray, dict]:
    import av

    # No protocol may be opened from inside the data: playlist demuxers (concat, HLS) would otherwise read
    # files next to the server or fetch URLs around SafeFetcher.
    with av.open(io.BytesIO(data), container_options={"protocol_whitelist": "none"}) as container:
        stream = container.streams.video[0]
        fps = _sane_fps(stream.guessed_rate)
        seconds = float(stream.duration * stream.time_base) if stream.duration else (container.duration or 0) / 1e6
        _check_video(stream.frames, seconds, stream.codec_context.width, stream.codec_context.height, part, settings)
        sampler = _sampler(stream.frames or round(seconds * fps), fps, part, settings)  # matroska counts none
        for frame in container.decode(stream):
            _check_video(sampler.count + 1, sampler.count / fps, frame.width, frame.height, part, settings)
            sampler.add(frame if sampler.wants() else None)  # kept as decoded (YUV): half the memory of RGB
        return _sample(sampler, fps, part, settings, lambda frame: frame.to_ndarray(format="rgb24"))


def _decode_with_opencv(data: bytes, part: MediaPart, settings: Settings) -> tuple[np.ndarray, dict]:
    import cv2

    # A private directory and a random name: a playlist (concat) could name files next to it, and there are
    # none, not even itself.
    with tempfile.TemporaryDirectory() as folder, tempfile.NamedTemporaryFile(dir=folder, suffix=".video") as tmp:
        tmp.write(data)
        tmp.flush()
        capture = cv2.VideoCapture(tmp.name)
        try:
            if not capture.isOpened():
                raise ValueError("opencv cannot open the video")
            return _read_capture(capture, cv2, part, settings)
        finally:
            capture.release()


def _read_capture(capture, cv2, part: MediaPart, settings: Settings) -> tuple[np.ndarray, dict]:
    fps = _sane_fps(capture.get(cv2.CAP_PROP_FPS))
    count = capture.get(cv2.CAP_PROP_FRAME_COUNT)
    frames = int(count) if math.isfinite(count) and count > 0 else 0
    width, height = int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)), int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT))
    _check_video(frames, frames / fps, width, height, part, settings)
    sampler = _sampler(frames, fps, part, settings)
    while capture.grab():  # decodes; retrieve() converts, for the frames kept only
        _check_video(sampler.count + 1, sampler.count / fps, width, height, part, settings)
        sampler.add(capture.retrieve()[1] if sampler.wants() else None)
    return _sample(sampler, fps, part, settings, lambda frame: cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))


def _sample(sampler: FrameSampler, fps: float, part: MediaPart, settings: Settings,
            to_rgb) -> tuple[np.ndarray, dict]:
    if not sampler.kept:
        raise bad_request("the video has no frames", part.param, "invalid_video")
    picked = sampler.pick(_wanted(sampler.count, fps, part, settings))
    clip = np.stack([to_rgb(frame) for _, frame in picked])
    height, width = clip.shape[1:3]
    metadata = {"total_num_frames": sampler.count, "fps": fps, "duration": sampler.count / fps,
                "frames_indices": [index for index, _ in picked], "height": height, "width": width}
    return clip, metadata


# ---- fetching --------------------------------------------------------------------------------
def _address_allowed(address: str, allowed_networks: list) -> bool:
    ip = ipaddress.ip_address(address.split("%")[0])
    if ip.version == 6:
        embedded = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if embedded is not None:
            ip = embedded
    if any(ip in network for network in allowed_networks):
        return True
    return ip.is_global and not (ip.is_multicast or ip.is_reserved or ip.is_loopback or ip.is_link_local
                                 or ip.is_private or ip.is_unspecified)


class SafeFetcher:
    """http(s) only; every hop's host resolved and checked before connecting, and the connection made
    to the checked address (no second DNS answer can swap it); bytes and time capped."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.allowed_networks = [ipaddress.ip_network(n.strip(), strict=False)
                                 for n in settings.media_allowed_networks.split(",") if n.strip()]

    async def fetch(self, url: str, param: str) -> bytes:
        try:
            async with asyncio.timeout(self.settings.media_fetch_timeout_seconds):
                return await self._follow(url, param)
        except TimeoutError:
            raise bad_request(f"fetching the media took longer than {self.settings.media_fetch_timeout_seconds:g}s "
                              "(MEDIA_FETCH_TIMEOUT_SECONDS)", param, "media_fetch_timeout")
        except httpx.HTTPError as exc:
            raise bad_request(f"fetching the media failed: {type(exc).__name__}", param, "media_fetch_failed")
        except httpx.InvalidURL:  # what urlsplit lets through and httpx does not (a NUL, a very long URL)
            raise bad_request("media URL is not valid", param, "invalid_url")

    async def _follow(self, url: str, param: str) -> bytes:
        async with httpx.AsyncClient(follow_redirects=False, trust_env=False) as client:
            for _ in range(self.settings.media_max_redirects + 1):
                target, host_header, sni = await self._check(url, param)
                request = client.build_request("GET", target, headers={"Host": host_header},
                                               extensions={"sni_hostname": sni} if sni else {})
                response = await client.send(request, stream=True)
                try:
                    if response.is_redirect:
                        url = urljoin(url, response.headers.get("location", ""))
                        continue
                    if response.status_code != 200:
                        raise bad_request(f"fetching the media failed with HTTP {response.status_code}", param,
                                          "media_fetch_failed")
                    return await self._read_capped(response, param)
                finally:
                    await response.aclose()
        raise bad_request(f"too many redirects (MEDIA_MAX_REDIRECTS={self.settings.media_max_redirects})", param,
                          "media_fetch_failed")

    async def _check(self, url: str, param: str) -> tuple[str, str, str | None]:
        try:
            parts = urlsplit(url)
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:  # an unclosed IPv6 bracket, a port out of range (a redirect's too)
            raise bad_request("media URL is not valid", param, "invalid_url")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise bad_request("media URLs must be http or https", param, "unsupported_scheme")
        host = parts.hostname.lower()
        domains = self.settings.allowed_media_domain_list
        if domains and not any(host == d or host.endswith("." + d) for d in domains):
            raise bad_request(f"media host {host[:100]!r} is not in ALLOWED_MEDIA_DOMAINS", param, "media_host_refused")
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError):  # UnicodeError: a name IDNA cannot encode (a label too long)
            raise bad_request(f"media host {host[:100]!r} could not be resolved", param, "media_fetch_failed")
        addresses = [info[4][0] for info in infos]
        if not self.settings.media_allow_private_networks:
            if not addresses or not all(_address_allowed(a, self.allowed_networks) for a in addresses):
                raise bad_request("media URL points at a private, loopback or reserved address", param,
                                  "media_address_refused")
        address = addresses[0]
        literal = f"[{address}]" if ":" in address else address
        target = parts._replace(netloc=f"{literal}:{port}").geturl()
        host_header = parts.netloc.rsplit("@", 1)[-1]
        return target, host_header, host if parts.scheme == "https" else None

    async def _read_capped(self, response: httpx.Response, param: str) -> bytes:
        limit = self.settings.max_media_bytes
        chunks, size = [], 0
        async for chunk in response.aiter_bytes():
            size += len(chunk)
            if size > limit:
                raise bad_request(f"media is larger than {limit} bytes (MAX_MEDIA_BYTES)", param, "media_too_large")
            chunks.append(chunk)
        return b"".join(chunks)
