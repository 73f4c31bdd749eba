"""Videos: PyAV (OpenCV as fallback), limits from the header and again while decoding, frames
sampled while decoding so that memory follows the frame budget, not the file."""

from __future__ import annotations

import io
import math
import tempfile

import numpy as np

from ..config import Settings
from ..protocol import APIError, bad_request
from .parts import MediaPart


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
