"""Media made by the tests: images, videos, and a local HTTP server that counts its hits."""

from __future__ import annotations

import base64
import io
import struct
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import av
import numpy as np
from PIL import Image


def png(width=64, height=48, color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buf, "PNG")
    return buf.getvalue()


def jpeg_with_orientation(width=60, height=40, orientation=6) -> bytes:
    image = Image.new("RGB", (width, height), (10, 200, 10))
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    image.save(buf, "JPEG", exif=exif.tobytes())
    return buf.getvalue()


def truncated_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.fromarray((np.random.default_rng(0).random((256, 256, 3)) * 255).astype("uint8")).save(buf, "JPEG")
    data = buf.getvalue()
    return data[: len(data) // 2]


def pixel_bomb_png(side=20000) -> bytes:
    """A side x side PNG of a few tens of kilobytes (1-bit, all zero), written row by row so that making it
    costs the test process no more memory than the file."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    packer, row = zlib.compressobj(9), b"\0" * (1 + (side + 7) // 8)  # filter byte + packed bits
    parts = [packer.compress(row) for _ in range(side)] + [packer.flush()]
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b""))


def ico_wrapping(image: bytes) -> bytes:
    """An .ico whose one entry is `image` (a PNG): its directory says 256x256 whatever the PNG holds."""
    return struct.pack("<HHH", 0, 1, 1) + struct.pack("<BBBBHHII", 0, 0, 0, 0, 1, 32, len(image), 22) + image


def animated(fmt: str, frames=3, width=64, height=48) -> bytes:
    """An animated GIF, PNG (APNG) or WEBP whose frames differ."""
    images = [Image.new("RGB", (width, height), (40 * i, 200 - 40 * i, 90)) for i in range(frames)]
    buf = io.BytesIO()
    images[0].save(buf, fmt, save_all=True, append_images=images[1:], duration=100, loop=0)
    return buf.getvalue()


def mp4(seconds: float = 2.0, fps: int = 10, width: int = 64, height: int = 48) -> bytes:
    return video(seconds, fps, width, height)


def video(seconds: float = 2.0, fps: int = 10, width: int = 64, height: int = 48, container: str = "mp4",
          still: bool = False) -> bytes:
    """int(seconds * fps) frames, in an mp4 (whose header counts them) or e.g. a matroska file (whose header
    does not: the count is known only by decoding); `still` frames are all alike, so the file stays small
    whatever their number."""
    buf = io.BytesIO()
    with av.open(buf, "w", format=container) as output:
        stream = output.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(int(seconds * fps)):
            frame = np.full((height, width, 3), 0 if still else (i * 12) % 255, dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                output.mux(packet)
        for packet in stream.encode():
            output.mux(packet)
    return buf.getvalue()


def ffconcat(*names: str) -> bytes:
    """An FFmpeg concat playlist: a demuxer that opens other files (relative to the reader's directory)."""
    return b"ffconcat version 1.0\n" + b"".join(b"file %s\n" % name.encode() for name in names)


def data_url(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


class MediaHost:
    """A threaded HTTP server on a loopback address: /file/<name>, /redirect?to=URL, /slow, /endless."""

    def __init__(self, files: dict[str, bytes], host: str = "127.0.0.1"):
        self.files = files
        self.hits: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                outer.hits.append(self.path)
                parts = urlsplit(self.path)
                if parts.path.startswith("/file/") and parts.path[6:] in outer.files:
                    self._chunked(outer.files[parts.path[6:]])
                elif parts.path == "/redirect":
                    self.send_response(302)
                    self.send_header("Location", parse_qs(parts.query)["to"][0])
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                elif parts.path == "/slow":
                    self._trickle(delay=0.3)
                elif parts.path == "/endless":
                    self._trickle(delay=0)
                else:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()

            def _chunked(self, data: bytes):
                # No Content-Length: the server has to count while reading.
                self.send_response(200)
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                for start in range(0, len(data), 16384):
                    piece = data[start:start + 16384]
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                self.wfile.write(b"0\r\n\r\n")

            def _trickle(self, delay: float):
                self.send_response(200)
                self.send_header("Content-Length", str(10**12))  # a lie: never trusted
                self.end_headers()
                try:
                    for _ in range(10**6):
                        self.wfile.write(b"x" * (1 if delay else 65536))
                        self.wfile.flush()
                        if delay:
                            time.sleep(delay)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.httpd = ThreadingHTTPServer((host, 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://{host}:{self.httpd.server_address[1]}"
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def stop(self):
        self.httpd.shutdown()
