"""Media parts of a request: where each image or video comes from, its client options, and
reading its bytes from base64, a data URL or an allowed local directory."""

from __future__ import annotations

import base64
import binascii
import os
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlsplit

from ..config import Settings
from ..protocol import ChatCompletionRequest, bad_request

IMAGE_TYPES = ("image_url", "input_image")
VIDEO_TYPES = ("video_url", "input_video")
# Client options: name -> whether only whole numbers make sense. 2**53 is above any budget and the last
# integer a JSON number carries exactly.
CLIENT_OPTIONS = {"max_pixels": True, "max_frames": True, "fps": False}
OPTION_LIMIT = 2**53


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
