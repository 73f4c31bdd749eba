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
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urljoin, urlsplit

import httpx
import numpy as np
from PIL import Image, ImageOps

from .config import Settings
from .protocol import APIError, ChatCompletionRequest, bad_request

IMAGE_TYPES = ("image_url", "input_image")
VIDEO_TYPES = ("video_url", "input_video")
Image.MAX_IMAGE_PIXELS = None  # our own MAX_IMAGE_PIXELS check runs first, from the header


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
        return MediaPart(media, param, url, options={**part, **options})
    if isinstance(part.get("b64_json"), str):
        return MediaPart(media, param, part["b64_json"], is_base64=True, options=part)
    inline = part.get(media)
    if isinstance(inline, str) and inline:
        return MediaPart(media, param, inline, is_base64=not inline.startswith("data:"), options=part)
    raise bad_request(f"{kind} needs 'b64_json' or '{media}' (base64 or a data URL)", param)


class MediaLoader:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.fetcher = SafeFetcher(settings)

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
        scheme = urlsplit(part.source).scheme.lower()
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
    base = Path(root).resolve()
    try:
        resolved = (base / path).resolve(strict=True) if not os.path.isabs(path) else Path(path).resolve(strict=True)
    except (OSError, RuntimeError):
        raise bad_request("local media file not found", param, "media_not_found")
    if not resolved.is_relative_to(base) or not resolved.is_file():
        raise bad_request("local media must be a file inside ALLOWED_LOCAL_MEDIA_PATH", param, "media_path_refused")
    if resolved.stat().st_size > settings.max_media_bytes:
        raise bad_request(f"media is larger than {settings.max_media_bytes} bytes (MAX_MEDIA_BYTES)", param,
                          "media_too_large")
    return resolved.read_bytes()


# ---- decoding --------------------------------------------------------------------------------
def decode_image(data: bytes, part: MediaPart, settings: Settings) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data))
    except Exception:
        raise bad_request("not an image (or an unsupported image format)", part.param, "invalid_image")
    width, height = image.size
    if width * height > settings.max_image_pixels:
        raise bad_request(f"image is {width}x{height} pixels; at most {settings.max_image_pixels} pixels "
                          "(MAX_IMAGE_PIXELS)", part.param, "image_too_large")
    try:
        image.load()
        image = ImageOps.exif_transpose(image).convert("RGB")
    except Exception as exc:
        raise bad_request(f"image could not be decoded ({'truncated file' if 'truncated' in str(exc) else 'corrupt'})",
                          part.param, "invalid_image")
    return _limit_pixels(image, _client_max_pixels(part))


def _client_max_pixels(part: MediaPart) -> int | None:
    value = part.options.get("max_pixels")
    return int(value) if isinstance(value, (int, float)) and value > 0 else None


def _limit_pixels(image: Image.Image, max_pixels: int | None) -> Image.Image:
    """A client may ask for fewer pixels than the processor's budget, never more (the processor caps that)."""
    if max_pixels and image.width * image.height > max_pixels:
        scale = math.sqrt(max_pixels / (image.width * image.height))
        image = image.resize((max(1, int(image.width * scale)), max(1, int(image.height * scale))))
    return image


def frame_count(duration: float, settings: Settings, options: dict) -> int:
    """Frames to sample: MAX_VIDEO_FRAMES, fewer if the client asks (fps or max_frames), never more."""
    count = settings.max_video_frames
    if isinstance(options.get("max_frames"), int) and options["max_frames"] > 0:
        count = min(count, options["max_frames"])
    fps = options.get("fps")
    if isinstance(fps, (int, float)) and fps > 0:
        count = min(count, max(1, math.ceil(duration * fps)))
    return max(count, 2)  # Qwen3-VL groups frames in pairs


def decode_video(data: bytes, part: MediaPart, settings: Settings) -> tuple[np.ndarray, dict]:
    try:
        frames, fps = _decode_with_pyav(data, settings, part)
    except APIError:
        raise
    except Exception:
        try:
            frames, fps = _decode_with_opencv(data, settings, part)
        except APIError:
            raise
        except Exception:
            raise bad_request("not a video (or an unsupported or corrupt video)", part.param, "invalid_video")
    if not frames:
        raise bad_request("the video has no frames", part.param, "invalid_video")
    return _sample(frames, fps, part, settings)


def _check_video_header(duration: float, width: int, height: int, part: MediaPart, settings: Settings) -> None:
    if duration > settings.max_video_seconds:
        raise bad_request(f"video is {duration:.1f}s long; at most {settings.max_video_seconds:g}s "
                          "(MAX_VIDEO_SECONDS)", part.param, "video_too_long")
    if width * height > settings.max_image_pixels:
        raise bad_request(f"video frames are {width}x{height} pixels; at most {settings.max_image_pixels} "
                          "(MAX_IMAGE_PIXELS)", part.param, "video_too_large")


def _decode_with_pyav(data: bytes, settings: Settings, part: MediaPart) -> tuple[list[np.ndarray], float]:
    import imageio.v3 as iio

    with iio.imopen(data, "r", plugin="pyav") as video:
        meta = video.metadata()
        fps = float(meta.get("fps") or 0) or 24.0
        shape = video.properties().shape
        _check_video_header(float(meta.get("duration") or 0), shape[2], shape[1], part, settings)
        limit = int(settings.max_video_seconds * fps) + 1
        frames = []
        for frame in video.iter():
            frames.append(frame)
            if len(frames) > limit:  # the header lied about the duration
                raise bad_request(f"video is longer than {settings.max_video_seconds:g}s (MAX_VIDEO_SECONDS)",
                                  part.param, "video_too_long")
    return frames, fps


def _decode_with_opencv(data: bytes, settings: Settings, part: MediaPart) -> tuple[list[np.ndarray], float]:
    import cv2

    with tempfile.NamedTemporaryFile(suffix=".video") as tmp:
        tmp.write(data)
        tmp.flush()
        capture = cv2.VideoCapture(tmp.name)
        if not capture.isOpened():
            raise ValueError("opencv cannot open the video")
        fps = capture.get(cv2.CAP_PROP_FPS) or 24.0
        count = capture.get(cv2.CAP_PROP_FRAME_COUNT) or 0
        _check_video_header(count / fps, int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)),
                            int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT)), part, settings)
        frames = []
        while True:
            ok, frame = capture.read()
            if not ok:
                break
            frames.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
            if len(frames) > settings.max_video_seconds * fps + 1:
                raise bad_request("video is too long (MAX_VIDEO_SECONDS)", part.param, "video_too_long")
        capture.release()
    return frames, fps


def _sample(frames: list[np.ndarray], fps: float, part: MediaPart, settings: Settings) -> tuple[np.ndarray, dict]:
    total = len(frames)
    duration = total / fps
    wanted = min(frame_count(duration, settings, part.options), max(total, 2))
    indices = np.linspace(0, total - 1, wanted).round().astype(int).tolist()
    clip = np.stack([frames[i] for i in indices])
    height, width = clip.shape[1:3]
    metadata = {"total_num_frames": total, "fps": fps, "duration": duration, "frames_indices": indices,
                "height": height, "width": width}
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
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise bad_request("media URLs must be http or https", param, "unsupported_scheme")
        host = parts.hostname.lower()
        domains = self.settings.allowed_media_domain_list
        if domains and not any(host == d or host.endswith("." + d) for d in domains):
            raise bad_request(f"media host {host[:100]!r} is not in ALLOWED_MEDIA_DOMAINS", param, "media_host_refused")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except socket.gaierror:
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
