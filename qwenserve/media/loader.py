"""MediaLoader: a request's media parts, counted, read and decoded off the event loop."""

from __future__ import annotations

import asyncio
from urllib.parse import urlsplit


from ..config import Settings
from ..protocol import ChatCompletionRequest, bad_request
from .fetch import SafeFetcher
from .images import decode_image, install_pillow_guard
from .parts import LoadedMedia, MediaPart, decode_base64, media_parts, read_local
from .videos import decode_video


class MediaLoader:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.fetcher = SafeFetcher(settings)
        install_pillow_guard(settings.max_image_pixels)

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
