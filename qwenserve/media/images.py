"""Images: only the formats clients send, sizes checked from headers (an ICO's embedded image
included) before anything is decoded, Pillow's bomb guard as the second line, first frame only."""

from __future__ import annotations

import io
import math
import struct
import warnings

from PIL import BmpImagePlugin, IcoImagePlugin, Image, ImageOps, PngImagePlugin

from ..config import Settings
from ..protocol import bad_request
from .parts import MediaPart

# What clients send as pictures; other Pillow formats (EPS runs Ghostscript, ICNS and others decode while
# opening) are refused as not an image.
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "ICO")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def install_pillow_guard(max_pixels: int) -> None:
    """Pillow's own bomb guard at MAX_IMAGE_PIXELS: the second line behind our header checks, for what
    plugins decode while opening (an ICO's entry, a GIF frame). As a warning it would let the decode go
    on, so it is made an error (process-wide: installed when the loader is built)."""
    Image.MAX_IMAGE_PIXELS = max_pixels
    warnings.filterwarnings("error", category=Image.DecompressionBombWarning)


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
