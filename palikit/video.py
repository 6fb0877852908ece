"""Video in: a clip as PaliGemma's frames (several images before one prompt), sampled as big_vision's
video transfers sample them (configs/proj/paligemma/transfers/msrvtt_cap.py and the others):
16 frames at a stride of 9, starting at the first frame for evaluation (`deterministic_fs`) or at a
random offset for training where the clip is long enough (DMVR's `_get_random_sampling_offset`);
a clip with fewer frames than that gives what it has, repeated in order up to the count
(big_vision's `video_replicate_img`, pp/proj/paligemma/video.py). Uniform sampling over the whole
clip is the other choice.

Decoding is PyAV's (the `video` extra), one frame at a time: a frame not chosen is dropped as soon
as it is decoded, a chosen one is converted to RGB (and shrunk to `size` when given), so memory
holds the chosen frames only, never the clip.
"""

from __future__ import annotations

import io
import math
import random as _random
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from .processor import InputError

# What a path's suffix makes a video (an animated GIF is one only when asked: read_video, frames=).
VIDEO_SUFFIXES = (".mp4", ".m4v", ".webm", ".mov", ".mkv", ".avi")
NUM_FRAMES, STRIDE = 16, 9  # big_vision's video transfers
MAX_DECODED_FRAMES = 100_000  # a stream longer than this is refused (a clip, not a film)
_EXTRA = "pip install 'palikit[video]'"


@dataclass
class Video:
    """The chosen frames of a clip, in order, with where they come from."""

    frames: list[Image.Image]
    indices: list[int]  # each frame's number in the clip (0-based; repeated for a short clip)
    times: list[float]  # each frame's time in seconds
    total: int  # frames in the clip
    source: str = field(default="video", repr=False)
    size: tuple[int, int] | None = None  # (width, height) of the clip's frames as stored

    def __len__(self) -> int:
        return len(self.frames)

    def __iter__(self):
        return iter(self.frames)

    def __getitem__(self, i):
        return self.frames[i]


def is_video_path(value) -> bool:
    return isinstance(value, (str, Path)) and Path(value).suffix.lower() in VIDEO_SUFFIXES


def strided_indices(total: int, num_frames: int = NUM_FRAMES, stride: int = STRIDE, offset: int = 0) -> list[int]:
    """big_vision's frames of a clip of `total` frames: offset, offset + stride, ... while inside the
    clip, at most num_frames; fewer repeated in order up to num_frames (video_replicate_img)."""
    if total < 1:
        raise InputError("the video has no frames")
    taken = list(range(offset, total, stride))[:num_frames] or [total - 1]
    return (taken * -(-num_frames // len(taken)))[:num_frames]


def random_offset(total: int, num_frames: int = NUM_FRAMES, stride: int = STRIDE,
                  rng: _random.Random | None = None) -> int:
    """Training's first frame: uniform over the offsets where every frame fits, else 0 (DMVR's
    _get_random_sampling_offset: maxval = max(total - (num_frames - 1) * stride, 1))."""
    return (rng or _random).randrange(max(total - (num_frames - 1) * stride, 1))


def uniform_indices(total: int, num_frames: int = NUM_FRAMES) -> list[int]:
    """num_frames spread evenly over the whole clip, its first and last frames included."""
    if total < 1:
        raise InputError("the video has no frames")
    if num_frames == 1:
        return [0]
    return [round(i * (total - 1) / (num_frames - 1)) for i in range(num_frames)]


def _open(source):
    try:
        import av
    except ImportError:
        raise InputError(f"reading video needs PyAV: {_EXTRA}") from None
    name = str(source) if isinstance(source, (str, Path)) else "video"
    if isinstance(source, (str, Path)) and not Path(source).is_file():
        raise InputError(f"video file not found: {source}")
    try:
        container = av.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else str(source))
    except (av.error.FFmpegError, OSError, ValueError) as e:
        raise InputError(f"{name}: not a video PyAV can read ({e})") from None
    if not container.streams.video:
        container.close()
        raise InputError(f"{name}: no video stream in it")
    return av, container, name


def count_frames(source) -> tuple[int, float]:
    """(frames, frames per second) of the clip's first video stream: the count from its header, or
    by demuxing it (no decoding)."""
    av, container, name = _open(source)
    with container:
        stream = container.streams.video[0]
        fps = float(stream.average_rate or stream.guessed_rate or 1)
        if stream.frames:
            return stream.frames, fps
        try:
            return sum(1 for packet in container.demux(stream) if packet.size), fps
        except av.error.FFmpegError as e:
            raise InputError(f"{name}: the video cannot be read ({e})") from None


def read_video(source, frames: int = NUM_FRAMES, stride: int | None = STRIDE, offset: int | str = 0,
               size: int | None = None, resample: str = "bicubic", max_pixels: int = 25_000_000,
               seed: int | None = None, clip: tuple[float, float] | None = None) -> Video:
    """The chosen frames of a clip (a path or the file's bytes: mp4, webm, mov, mkv, animated GIF...).

    stride: big_vision's sampling (strided_indices); None: uniform over the clip (uniform_indices).
    offset: the first frame with a stride, or "random" (training's, random_offset; `seed`).
    size: shrink each chosen frame to size x size as it is decoded (the model's input), with `resample`.
    clip: (start, end) seconds: sample that segment only (ActivityNet Captions' events).
    InputError, one line, for a file that is not a readable video, one without frames, a frame
    over max_pixels, or a codec FFmpeg here cannot decode."""
    if frames < 1:
        raise InputError(f"frames must be >= 1, got {frames}")
    if stride is not None and stride < 1:
        raise InputError(f"stride must be >= 1, got {stride}")
    total, fps = count_frames(source)
    if total > MAX_DECODED_FRAMES:
        raise InputError(f"the video has {total} frames, more than the {MAX_DECODED_FRAMES} palikit reads")
    first, length = 0, total
    if clip is not None:
        first = min(total - 1, max(0, int(clip[0] * fps)))
        length = max(1, min(total, math.ceil(clip[1] * fps)) - first)
    if stride is None:
        indices = uniform_indices(length, frames)
    else:
        if offset == "random":
            offset = random_offset(length, frames, stride, _random.Random(seed))
        indices = strided_indices(length, frames, stride, int(offset))
    indices = [first + i for i in indices]
    wanted = set(indices)
    av, container, name = _open(source)
    chosen: dict[int, tuple[Image.Image, float]] = {}
    stored = None
    with container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        try:
            for n, frame in enumerate(container.decode(stream)):
                if n in wanted:
                    if frame.width * frame.height > max_pixels:
                        raise InputError(f"{name}: {frame.width}x{frame.height} frames are over the limit of "
                                         f"{max_pixels} pixels")
                    image = frame.to_image().convert("RGB")
                    stored = (frame.width, frame.height)
                    if size is not None:
                        from .processor import resize

                        image = resize(image, size, resample)
                    seconds = float(frame.time) if frame.time is not None else n / float(stream.average_rate or 1)
                    chosen[n] = (image, seconds)
                if n >= max(wanted):
                    break
        except av.error.FFmpegError as e:
            raise InputError(f"{name}: the video cannot be decoded ({e})") from None
    missing = sorted(wanted - set(chosen))
    if len(missing) == len(wanted):
        raise InputError(f"{name}: no frame could be decoded")
    if missing:  # the header promised more frames than the stream holds: take the last one read
        last = max(chosen)
        indices = [i if i in chosen else last for i in indices]
    return Video([chosen[i][0] for i in indices], indices, [chosen[i][1] for i in indices], total, name, stored)
