"""Images of a request: base64 or data: URLs, and server-side files or http(s) URLs only where the
operator allowed them; size caps before decoding (decompression bombs), decoded off the event loop
and prepared for the model on arrival, so that queued requests hold small images."""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import io
import ipaddress
import socket
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fastapi import HTTPException
from PIL import Image

from ..processor import InputError, load_image


@dataclass
class ImageSize:
    """What parsing and mask pasting need of an image: its size (the queue holds only resized copies)."""

    width: int
    height: int


class ImageReader:
    """prepare: what to do with a decoded image before it queues (the pipeline's resize); read_clip:
    how a clip's bytes become its frames (the pipeline's read_video)."""

    def __init__(self, *, max_bytes: int, max_pixels: int, allow_local_paths: bool | str | Path, allow_urls: bool,
                 prepare: Callable[[Image.Image], Image.Image], allow_private_urls: bool = False,
                 read_clip: Callable | None = None):
        self.max_body_bytes, self.max_image_pixels = max_bytes, max_pixels
        self.allow_local_paths, self.allow_urls, self.prepare = allow_local_paths, allow_urls, prepare
        self.read_clip = read_clip
        self.allow_private_urls = allow_private_urls

    async def read(self, refs: list[str]) -> tuple[list[Image.Image], ImageSize]:
        if not refs:
            raise HTTPException(400, "no image: PaliGemma needs at least one image per request")
        images = []
        for ref in refs:
            data = await self._image_bytes(ref)
            images.append(await asyncio.to_thread(self._decode, data))  # decoding is slow: off the loop
        return [im for im, _ in images], images[0][1]

    async def read_video(self, ref: str, frames: int, stride: int | None):
        """A clip (data URL, base64, or a path / URL where allowed; as capped as an image) -> its
        frames (read_clip: the pipeline's read_video) and the size of its frames as stored."""
        data = await self._image_bytes(ref)
        try:
            clip = await asyncio.to_thread(self.read_clip, data, frames, stride, max_pixels=self.max_image_pixels)
        except InputError as e:
            status = 501 if "needs PyAV" in str(e) else 413 if "over the limit" in str(e) else 400
            raise HTTPException(status, str(e)) from None
        return clip, ImageSize(*clip.size)

    async def _image_bytes(self, ref: str) -> bytes:
        ref = ref.strip()
        if ref.startswith("data:"):
            header, _, payload = ref.partition(",")
            if not header.endswith(";base64"):
                raise HTTPException(400, "data URLs must be base64: data:image/png;base64,...")
            return _b64decode(payload)
        if ref.startswith(("http://", "https://")):
            if not self.allow_urls:
                raise HTTPException(400, "image URLs are disabled on this server: send the image as base64 "
                                         "or a data: URL (the operator can enable fetching with allow_urls)")
            return await asyncio.to_thread(self._fetch, ref)
        if not ref.startswith("file://"):
            with contextlib.suppress(HTTPException):
                return _b64decode(ref)
            if len(ref) > 4096:
                raise HTTPException(400, "image is neither valid base64 nor a data: URL")
        if not self.allow_local_paths:  # a short string that is not base64: a path
            raise HTTPException(400, f"image {ref[:80]!r} is not base64 or a data: URL, and reading "
                                     "server-side files is disabled on this server (allow_local_paths)")
        return await asyncio.to_thread(self._read_path, ref.removeprefix("file://"))

    def local_path(self, name: str, what: str = "image") -> Path:
        """A server-side path a request names, resolved inside the allowed folder (a relative one
        names a path in it), or 400."""
        path = Path(name).expanduser()
        if not isinstance(self.allow_local_paths, bool):
            root = Path(self.allow_local_paths).expanduser().resolve()
            path = (root / path).resolve()
            if not path.is_relative_to(root):
                raise HTTPException(400, f"{what} path {name!r} is outside the allowed folder {root}")
        return path.resolve()

    def _read_path(self, name: str) -> bytes:
        path = self.local_path(name)
        if not path.is_file():
            raise HTTPException(400, f"image file not found: {name}")
        if path.stat().st_size > self.max_body_bytes:
            raise HTTPException(413, f"image file {name} is larger than {self.max_body_bytes} bytes")
        return path.read_bytes()

    def _check_address(self, url: str) -> None:
        """Refuse a URL whose host resolves to a loopback, link-local, private or otherwise non-public
        address (the server's own network: cloud metadata at 169.254.169.254, admin pages), unless
        the operator allowed private URLs. Checked for every redirect too."""
        if self.allow_private_urls:
            return
        host = urllib.parse.urlsplit(url).hostname or ""
        try:
            addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
        except (OSError, UnicodeError) as e:
            raise HTTPException(400, f"could not fetch image {url[:200]}: {e}") from None
        for address in addresses:
            ip = ipaddress.ip_address(address.split("%")[0])
            if not ip.is_global or ip.is_multicast:
                raise HTTPException(400, f"image URL {url[:200]} points to a non-public address ({ip}); "
                                         "the operator can allow those with allow_private_urls")

    def _fetch(self, url: str) -> bytes:
        reader = self

        class CheckedRedirects(urllib.request.HTTPRedirectHandler):
            def redirect_request(self, req, fp, code, msg, headers, newurl):
                if not newurl.startswith(("http://", "https://")):
                    raise HTTPException(400, f"image URL {url[:200]} redirects to {newurl[:200]}")
                reader._check_address(newurl)
                return super().redirect_request(req, fp, code, msg, headers, newurl)

        self._check_address(url)
        try:
            with urllib.request.build_opener(CheckedRedirects).open(url, timeout=10) as r:
                data = r.read(self.max_body_bytes + 1)
        except (urllib.error.URLError, OSError, ValueError) as e:
            raise HTTPException(400, f"could not fetch image {url[:200]}: {e}") from None
        if len(data) > self.max_body_bytes:
            raise HTTPException(413, f"image at {url[:200]} is larger than {self.max_body_bytes} bytes")
        return data

    def _decode(self, data: bytes) -> tuple[Image.Image, ImageSize]:
        try:  # the header alone gives the size: refuse decompression bombs before decoding
            with Image.open(io.BytesIO(data)) as probe:
                w, h = probe.size
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise HTTPException(413, f"image refused: {e}") from None
        except (OSError, ValueError, SyntaxError):
            w = h = 0  # unreadable: load_image says why
        if w * h > self.max_image_pixels:
            raise HTTPException(413, f"image of {w}x{h} pixels is over this server's limit of "
                                     f"{self.max_image_pixels} pixels")
        try:
            image = load_image(data, self.max_image_pixels)
        except InputError as e:
            raise HTTPException(400, str(e)) from None
        size = ImageSize(image.width, image.height)  # after EXIF rotation, as boxes are reported
        return self.prepare(image), size


# Unpadded base64 is taken from this length on: the smallest image files are longer, and a short
# string (a path such as /etc/passwd is in base64's alphabet) is not mistaken for one.
UNPADDED_MIN = 64


def _b64decode(payload: str) -> bytes:
    payload = "".join(payload.split())
    if len(payload) >= UNPADDED_MIN:  # padding is optional (many encoders leave it out)
        payload += "=" * (-len(payload) % 4)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise HTTPException(400, "image is not valid base64") from None
