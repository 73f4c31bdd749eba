"""Images and videos in messages: read from data URLs, base64, safe http(s) fetches or an allowed
directory; decoded here (never by the processor from a client URL), with limits checked first."""

from .loader import MediaLoader
from .parts import LoadedMedia, MediaPart, media_parts

__all__ = ["LoadedMedia", "MediaLoader", "MediaPart", "media_parts"]
