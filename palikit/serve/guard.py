"""The outermost ASGI layer of the server: request metrics, the body-size cap and arrival time,
JSON bodies only (415 otherwise), and the API key on /v1/*. Auth and the header checks run before
the body is read, so a refused request costs nothing."""

from __future__ import annotations

import asyncio
import hmac
import time

from fastapi import HTTPException
from fastapi.responses import JSONResponse

from .prometheus import Metrics
from .schema import error_response

BODY_TIMEOUT_S = 60  # a request body must arrive within this (slow-upload clients hold connections)


class Guard:
    """Wraps the app. paths: the app's routes (filled in once they exist), for the metrics labels."""

    def __init__(self, app, *, api_key: str | None, max_body_bytes: int, metrics: Metrics, paths: set[str]):
        self.app, self.api_key, self.max_body_bytes = app, api_key, max_body_bytes
        self.metrics, self.paths = metrics, paths

    def _endpoint(self, scope) -> str:
        """The metrics label: a known route, or "other", so that scanners cannot grow the label set."""
        path = scope["path"]
        if path in self.paths:
            return path
        return next((prefix for prefix in ("/static", "/docs-assets") if path.startswith(prefix + "/")), "other")

    def _refusal(self, scope) -> JSONResponse | None:
        headers = dict(scope["headers"])
        if self.api_key and scope["path"].startswith("/v1/"):
            given = headers.get(b"authorization", b"")
            scheme, _, token = given.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.api_key.encode()):
                msg = "missing API key: send 'Authorization: Bearer KEY'" if not given else "invalid API key"
                return error_response(401, msg, {"WWW-Authenticate": "Bearer"})
        length = headers.get(b"content-length")
        if length and (not length.isdigit() or int(length) > self.max_body_bytes):
            return error_response(413, f"request body over this server's limit of {self.max_body_bytes} bytes")
        kind = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
        if scope["method"] == "POST" and kind and kind != b"application/json" and not kind.endswith(b"+json"):
            return error_response(415, f"request bodies are JSON: send 'Content-Type: application/json', "
                                       f"not {kind.decode(errors='replace')!r}")
        return None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status, metrics = time.perf_counter(), 500, self.metrics
        seen, cap, body_done = 0, self.max_body_bytes, False

        async def send_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        async def capped_receive():  # the body's size (when sent chunked) and time to arrive
            nonlocal seen, body_done
            if body_done:  # later calls wait for a disconnect, as long as a stream lasts
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), start + BODY_TIMEOUT_S - time.perf_counter())
            except TimeoutError:
                raise HTTPException(408, f"the request body took over {BODY_TIMEOUT_S} s to arrive") from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > cap:
                    raise HTTPException(413, f"request body over this server's limit of {cap} bytes")
                body_done = not message.get("more_body", False)
            return message

        metrics.in_flight += 1
        try:
            refusal = self._refusal(scope)
            if refusal is not None:
                await refusal(scope, receive, send_status)
            else:
                await self.app(scope, capped_receive, send_status)
        finally:
            metrics.in_flight -= 1
            metrics.request(self._endpoint(scope), status, time.perf_counter() - start)
